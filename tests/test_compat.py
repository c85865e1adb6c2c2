"""Smoke test of the compatibility sweep: ``benchmarks/compat.py --quick`` on three tiny models.

The quick set is a torchvision resnet18 at 32x32, a two-layer ``nn.TransformerEncoder``
called with a causal mask and a key padding mask, and a hand-built pre-norm stack. The test
checks what the sweep writes, row by row, against what those models are: each converts as its
architecture implies (the encoder's two layers one chain of 4), exactly at gamma 0, with
float64 gradients equal to backprop's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compat.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], str]:
    """The rows of ``compat.py --quick`` by model name, and the Markdown page."""
    out = tmp_path_factory.mktemp("compat")
    command = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--timeout", "120"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "compat.json").read_text())
    rows = {row["name"]: row for row in results["models"]}
    return rows, (out / "compatibility.md").read_text()


@pytest.fixture(scope="module")
def quick_rows(quick_run) -> dict[str, dict]:
    return quick_run[0]


def test_quick_runs_the_quick_models(quick_rows):
    assert set(quick_rows) == {
        "torchvision/resnet18@32",
        "torch.nn/TransformerEncoder(2 layers)",
        "hand-built/pre-norm stack",
    }


@pytest.mark.parametrize(
    "name",
    [
        "torchvision/resnet18@32",
        "torch.nn/TransformerEncoder(2 layers)",
        "hand-built/pre-norm stack",
    ],
)
def test_quick_rows_are_right(quick_rows, name):
    row = quick_rows[name]
    assert row["status"] == "match"
    assert row["chains"]["chains"] == row["expected"]
    assert "failure" not in row
    assert all(row["gamma0"][key]["exact"] for key in ("eval", "train", "other"))
    grad = row["grad64"]
    assert grad["runs_on_example"] and not grad["unpaired"]
    assert grad["grad_error"] <= 1e-8
    assert grad["eval_grad_error"] <= 1e-8
    assert row["runs"]["ok"] and row["other_batch"]["ok"]
    assert row["fully_right"]


def test_quick_rows_record_what_the_models_are(quick_rows):
    resnet = quick_rows["torchvision/resnet18@32"]
    assert resnet["expected"] == [2, 1, 1, 1]
    assert len([s for s in resnet["chains"]["skipped"] if "projection" in s["reason"]]) == 3
    stack = quick_rows["hand-built/pre-norm stack"]
    assert stack["build"]["input_shapes"] == [[2, 8, 16]]
    assert stack["build"]["other_shapes"] == [[3, 11, 16]]


def test_every_model_gets_a_row_right_or_not(quick_run):
    rows, page = quick_run
    encoder = rows["torch.nn/TransformerEncoder(2 layers)"]
    assert encoder["expected"] == [4] and encoder["build"]["ok"]
    if encoder["status"] != "match":
        assert not encoder["fully_right"]
    for name in rows:
        assert f"`{name}`" in page
    assert "## Summary" in page and "**3 models**" in page
