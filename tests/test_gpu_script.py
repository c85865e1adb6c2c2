"""``benchmarks/gpu.py``: its logic on the CPU (``--device cpu --quick``), and a clean skip
without CUDA. The GPU run itself needs a GPU (see the script's doc)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_script"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_cpu_run_writes_the_report(tmp_path):
    gpu = _load()
    out = tmp_path / "gpu.md"
    assert gpu.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "output and gradients bit for bit equal: True" in text
    assert "| float64 |" in text and "| float32 |" in text
    for label in ("fxmomentum.convert (reversible)", "torch.utils.checkpoint per block"):
        assert text.count(label) >= 2  # both models
    data = (tmp_path / "gpu.json").read_text()
    assert '"status": "ok"' in data


def test_a_spent_budget_skips_the_remaining_sections(tmp_path):
    gpu = _load()
    out = tmp_path / "gpu.md"
    assert gpu.main(["--device", "cpu", "--quick", "--budget", "0", "--out", str(out)]) == 0
    assert out.read_text().count("skipped: time budget") == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without CUDA")
def test_without_cuda_it_exits_cleanly(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "gpu.md")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout
    assert not (tmp_path / "gpu.md").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_run_passes_its_checks(tmp_path):
    gpu = _load()
    assert gpu.main(["--quick", "--out", str(tmp_path / "gpu.md")]) == 0
