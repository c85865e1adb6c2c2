"""Smoke tests of benchmarks/: the measurement harness and the quick mode of the benchmark."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_harness():
    spec = importlib.util.spec_from_file_location("harness", BENCH / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("harness", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


harness = _load_harness()

# Tensors of 256 x 256 float32 (256 KiB) lie above the mmap threshold, so the step shows in RSS.
TINY = dict(kind="backprop", depth=3, width=256, hidden=16, batch=256)


def test_measure_memory_fresh_process():
    res = harness.measure_memory("tiny", "bench_momentumnet:build_chain", TINY, timeout=120)
    assert res["config"] == "tiny"
    assert res["device"] == "cpu"
    assert res["peak_bytes"] > 0
    assert res["hwm_bytes"] >= res["rss_before_bytes"]
    # Three blocks keep at least their three 256 KiB inputs until backward.
    assert res["peak_bytes"] >= 3 * 256 * 256 * 4


def test_measure_memory_reports_child_failure():
    with pytest.raises(RuntimeError, match="failed"):
        harness.measure_memory("bad", "bench_momentumnet:no_such_builder", timeout=120)
    with pytest.raises(ValueError, match="module:function"):
        harness.load_builder("no_colon")


def test_paired_time_returns_ratio():
    calls = []
    res = harness.paired_time(lambda: calls.append("a"), lambda: calls.append("b"), 5, 1)
    ratio, ratios = res
    assert ratio == res.ratio > 0
    assert len(ratios) == 5 and all(r > 0 for r in ratios)
    assert calls == ["a", "b"] * 6  # warm-up pair first, then interleaved
    with pytest.raises(ValueError):
        harness.paired_time(lambda: None, lambda: None, 0)


def test_child_env():
    env = harness.child_env(3, ["/some/where"])
    assert env["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["PYTHONPATH"].split(":")[:2] == [str(BENCH), "/some/where"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    plots = importlib.util.find_spec("matplotlib") is not None
    cmd = [sys.executable, str(BENCH / "bench_momentumnet.py"), "--quick", "--out", str(out)]
    if not plots:
        cmd.append("--no-plots")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


def test_quick_mode_tables(quick_run):
    text = (quick_run / "momentumnet.md").read_text()
    for heading in ("Activation memory", "Time of a training step", "Gradient accuracy"):
        assert heading in text
    assert "| reversible |" in text  # time table row
    assert (quick_run / "momentumnet.json").is_file()


def test_quick_mode_plots(quick_run):
    pytest.importorskip("matplotlib")
    for name in ("memory_vs_depth.png", "grad_error_vs_depth.png"):
        data = (quick_run / name).read_bytes()
        assert data.startswith(b"\x89PNG")


def test_bench_convert_quick_finds_the_chains(capsys):
    spec = importlib.util.spec_from_file_location("bench_convert", BENCH / "bench_convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    # resnet18: layer1 is one chain of 2 pure-after-ReLU blocks, each later stage's one block
    # after its projection block; the synthetic model is one chain of all its blocks.
    assert "| 2, 1, 1, 1 " in out and "| 50 " in out


def test_bench_fsdp_quick_gathers_one_layer_at_a_time(tmp_path):
    # 2 ranks (gloo): per rank its half of the model plus the running layer, and the 2-rank
    # step equal to one process's (float64); the script exits 1 if that check fails.
    cmd = [sys.executable, str(BENCH / "bench_fsdp.py"), "--quick", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    text = (tmp_path / "fsdp.md").read_text()
    assert "at most 1 layer unit(s) unsharded at once" in text
    assert "tolerance 1e-06: passed" in text


def test_engine_cost_times_every_configuration(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # engine_cost imports bench_models beside it
    spec = importlib.util.spec_from_file_location("engine_cost", BENCH / "engine_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # layers 1,3,1,1: one chain, layer2's two blocks after its projection block.
    recomputed = module._workload("recomputed", [1, 3, 1, 1], size=32, batch=2).model
    chains = [m for m in recomputed.modules() if isinstance(m, module.MomentumChain)]
    assert [(len(c.residual), c.strategy) for c in chains] == [(2, "recompute")]
    argv = ["engine_cost", "--rounds", "1", "--size", "32", "--batch", "2", "--layers", "1,3,1,1"]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    try:
        module.main()  # times one thread's CPU
    finally:
        torch.set_num_threads(threads)  # the tests after this one run as they would alone
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and not line.startswith("| configuration")
    }
    assert list(rows) == list(module.KINDS)
    assert rows["original"][2] == "1" and rows["checkpoint"][3] == "1.000 (1.00-1.00)"
