"""Smoke test of benchmarks/bench_models.py: the quick mode runs every path and writes results."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_models.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_models")
    cmd = [sys.executable, str(BENCH), "--quick", "--out", str(out)]
    plots = importlib.util.find_spec("matplotlib") is not None
    if not plots:
        cmd.append("--no-plots")
    env = dict(os.environ, FXMOMENTUM_COMPILE="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, proc, plots


def test_quick_tables(quick_run):
    out, proc, _ = quick_run
    text = (out / "models.md").read_text()
    assert text.strip() == proc.stdout.strip()  # the tables are also printed
    for heading in ("## ResNet", "## Pre-norm nn.TransformerEncoderLayer stack", "## torchvision"):
        assert heading in text
    assert "memory ratio" in text and "time ratio" in text
    assert "| fxmomentum.convert (reversible) |" in text
    assert "| torch.utils.checkpoint per block |" in text
    assert text.count("- Recomputation floor: ") == 2


def test_run_twice_runs_the_block_again_with_grad():
    sys.path.insert(0, str(BENCH.parent))
    try:
        from bench_models import RunTwice
    finally:
        sys.path.remove(str(BENCH.parent))
    import torch

    calls = []

    class Probe(torch.nn.Linear):
        def forward(self, x):
            calls.append(torch.is_grad_enabled())
            return super().forward(x)

    probe = Probe(3, 3)
    x = torch.randn(2, 3)
    with torch.no_grad():
        out = RunTwice(probe)(x)
    # The output is the first run's; the second runs with grad, as a recomputation does.
    assert calls == [False, True]
    torch.testing.assert_close(out, probe(x), rtol=0, atol=0)
    assert not out.requires_grad


def test_step_breakdown_quick():
    script = BENCH.parent / "step_breakdown.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--repeats", "2", "--threads", "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip().split(",")[0] for r in rows] == [
        "ResNet", "encoder stack", "encoder stack",
    ]  # fmt: skip
    for row in rows:
        cells = [c.strip() for c in row.split("|")[2:-1]]
        assert float(cells[0]) > 0 and 0 < float(cells[1]) < 1
    assert float(rows[1].split("|")[4]) > 0  # dropout's forward over the plain one


def test_quick_json(quick_run):
    out, _, _ = quick_run
    data = json.loads((out / "models.json").read_text())
    resnet = data["resnet"]
    # Memory measured in fresh processes for the quick mode's two ResNet configurations.
    assert resnet["memory"]["original"]["peak_bytes"] > 0
    assert resnet["memory"]["reversible"]["peak_bytes"] > 0
    assert data["ratios"]["resnet"]["reversible"]["memory"] > 0
    # Every configuration built and timed: a positive median ratio with its per-pair ratios.
    for bench in ("resnet", "transformer", "vit"):
        times = data[bench]["time"]
        if bench == "resnet":
            times = next(iter(times.values()))
        for kind in data[bench]["kinds"]:
            if kind == "original":
                continue
            assert times[kind]["ratio"] > 0, (bench, kind, times[kind])
            assert len(times[kind]["ratios"]) == data["sizes"]["time_repeats"]
    # The recomputation floor is timed for both, and never measured for memory.
    for bench in ("resnet", "transformer"):
        assert "recompute" in data[bench]["kinds"]
        assert not any(name.startswith("recompute") for name in data[bench]["memory"])
    assert data["transformer"]["method"] in ("convert", "transform")
    assert data["vit"]["chains"] == [2 * data["sizes"]["vit_layers"]]


def test_quick_plots(quick_run):
    out, _, plots = quick_run
    if not plots:
        pytest.skip("matplotlib is not installed")
    for name in ("models_resnet101.png", "models_transformer.png", "models_vit.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")


@pytest.fixture(scope="module")
def quick_gpt2(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("bench_models_gpt2")
    cmd = [sys.executable, str(BENCH), "--quick", "--only", "gpt2", "--out", str(out)]
    cmd += [] if importlib.util.find_spec("matplotlib") else ["--no-plots"]
    env = dict(os.environ, FXMOMENTUM_COMPILE="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


def test_quick_gpt2(quick_gpt2):
    out = quick_gpt2
    text = (out / "models.md").read_text()
    assert "## Hugging Face GPT2Model" in text
    assert "| fxmomentum.convert (reversible) |" in text
    data = json.loads((out / "models.json").read_text())
    gpt2, sizes = data["gpt2"], data["sizes"]
    # One chain across all the layers: attention and MLP of each.
    assert gpt2["chains"] == {str(sizes["gpt2_time_layers"]): [2 * sizes["gpt2_time_layers"]]}
    for kind in ("reversible", "checkpoint"):
        assert gpt2["time"][kind]["ratio"] > 0, (kind, gpt2["time"][kind])
        assert len(gpt2["time"][kind]["ratios"]) == sizes["time_repeats"]
    assert gpt2["method"] in ("hf", "wrap")
    if importlib.util.find_spec("matplotlib"):
        assert (out / "models_gpt2.png").read_bytes().startswith(b"\x89PNG")
