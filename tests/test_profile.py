"""``fxmomentum profile``: memory and time of a training step, original against converted."""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap

import pytest
import torch

from fxmomentum.tools import cli
from fxmomentum.tools.profiling import ChainShare, ProfileResult, build_workload, resize_batch

# Eight wide blocks on a narrow state: the original keeps every block's hidden activations
# (64 x 1024 floats, 256 KiB each, above the mmap threshold), the reversible chain keeps none.
MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, depth=8, width=128, hidden=1024):
            super().__init__()
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, width))
                for _ in range(depth)
            )
            self.head = nn.Linear(width, 10)

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return self.head(x)


    model = Net()
    example_inputs = torch.randn(4, 128)
    """
)


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    (tmp_path / "tiny.py").write_text(MODEL)
    (tmp_path / "noinputs.py").write_text("from torch import nn\nmodel = nn.Linear(3, 3)\n")
    (tmp_path / "plain.py").write_text(
        "import torch\nfrom torch import nn\nmodel = nn.Sequential(nn.Linear(3, 3), nn.ReLU())\n"
        "example_inputs = torch.randn(2, 3)\n"
    )
    monkeypatch.chdir(tmp_path)
    # Tiny tensors: the eager kernels, no compilation in the measuring children.
    monkeypatch.setenv("FXMOMENTUM_COMPILE", "0")
    return tmp_path


def _row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        if line.startswith(label):
            return re.split(r"\s{2,}", line.strip())
    raise AssertionError(f"no row {label!r} in:\n{table}")


def test_profile_table(model_dir, capsys):
    code = cli.main(["profile", "tiny.py", "--batch", "64", "--steps", "3", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "memory ratio" in out and "time ratio" in out
    assert "example inputs: 64x128 float32" in out  # --batch replaced the file's 4 rows
    original = _row(out, "original")
    converted = _row(out, "converted (reversible)")
    assert original[2:] == ["1.00x", "1.00x"]
    memory_ratio = float(converted[2].rstrip("x"))
    time_ratio = float(converted[3].rstrip("x"))
    assert 0 < memory_ratio < 0.8  # the hidden activations of eight blocks are not kept
    assert time_ratio > 0
    # The per-chain table: the one chain holds all of the estimated saving.
    chain = _row(out, "momentum_chain_0")
    assert chain[1:4] == ["8", "blocks.0", "blocks.7"]
    assert chain[-1] == "100%"
    # Progress on stderr, not in the result.
    assert "measuring the activation memory of the converted model" in err
    assert "fxmomentum:" not in out


@pytest.mark.parametrize(
    ("argv", "code", "text"),
    [
        (["profile", "missing.py"], cli.EXIT_TARGET, "file not found: missing.py"),
        (["profile", "tiny.py:Nope"], cli.EXIT_MODEL, "Nope"),
        (["profile", "noinputs.py"], cli.EXIT_INPUTS, "profile needs example inputs"),
        (["profile", "plain.py"], cli.EXIT_CONVERT, "nothing to save"),
        (["profile", "tiny.py", "--input-shape", "2,5"], cli.EXIT_INPUTS, "fails on"),
        (["profile", "tiny.py", "--gamma", "0"], cli.EXIT_USAGE, "--use-backprop"),
        (["profile", "tiny.py", "--steps", "0"], cli.EXIT_USAGE, "positive integer"),
    ],
)
def test_profile_errors(model_dir, capsys, argv, code, text):
    assert cli.main(argv) == code
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("fxmomentum: error:")]
    assert len(lines) == 1 and text in lines[0], err
    assert out == ""


def test_profile_help_lists_options(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["profile", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--batch", "--steps", "--gamma", "--input-shape"):
        assert option in out


def test_resize_batch():
    x = torch.arange(6).reshape(3, 2)
    mask = torch.ones(3, 3, dtype=torch.bool)
    big, mask_big, scalar = resize_batch([x, mask, torch.tensor(2.0)], 7)
    assert big.shape == (7, 2) and mask_big.shape == (7, 3) and scalar.shape == ()
    assert torch.equal(big[3:6], x)  # rows repeat cyclically
    assert torch.equal(resize_batch([x], 2)[0], x[:2])
    with pytest.raises(ValueError):
        resize_batch([x], 0)


def test_build_workload_same_weights_and_keys(model_dir):
    torch.manual_seed(0)
    original = build_workload("tiny.py", "original", batch=5)
    torch.manual_seed(0)
    converted = build_workload("tiny.py", "converted", batch=5, gamma=0.5)
    assert original.inputs[0].shape == (5, 128)
    assert torch.equal(original.inputs[0], converted.inputs[0])
    a, b = original.model.state_dict(), converted.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert converted.model.training
    with pytest.raises(ValueError):
        build_workload("tiny.py", "other")


def test_result_formats():
    result = ProfileResult(
        model="Net",
        source="net.py: instance `model`",
        inputs=["8x16 float32"],
        gamma=0.9,
        use_backprop=False,
        device="cpu",
        threads=2,
        memory={"original": 40 << 20, "converted": 10 << 20},
        time_ratios=[1.2, 1.4, 1.3],
        chains=[
            ChainShare("momentum_chain_0", "a.0", "a.2", 3, "8x16 float32", 3 << 20, 0.75),
            ChainShare("momentum_chain_1", "b.0", "b.1", 2, "8x16 float32", 1 << 20, 0.25),
        ],
    )
    assert result.memory_ratio == 0.25
    assert result.time_ratio == pytest.approx(1.3)
    assert result.saved_bytes == 30 << 20
    assert result.estimated_saved_bytes == 4 << 20
    data = json.loads(result.format("json"))
    assert data["memory_ratio"] == 0.25 and data["steps"] == 3
    assert [c["share"] for c in data["chains"]] == [0.75, 0.25]
    table = result.format("table")
    assert _row(table, "converted (reversible)")[1:] == ["10.0 MiB", "0.25x", "1.30x"]
    assert "measured saving: 30.0 MiB (75% of the original's activation memory)" in table
    assert "no saving" not in table
    worse = dataclasses.replace(result, memory={"original": 10 << 20, "converted": 11 << 20})
    assert "no saving on this model" in worse.format("table")
    md = result.format("markdown")
    assert "| converted (reversible) |" in md.replace("  ", " ")
    with pytest.raises(ValueError):
        result.format("xml")


def test_profile_with_a_memory_budget_compares_the_plan_with_the_measurement(model_dir, capsys):
    plot = model_dir / "curve.png"
    code = cli.main(["profile", "tiny.py", "--batch", "64", "--steps", "2", "--threads", "1",
                     "--memory-budget", "0", "--plot", str(plot), "--format", "json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    plan = data["plan"]
    assert plan["budget"] == 0.0 and plan["regions"]
    assert 0 < plan["estimated_memory_ratio"] < 1
    assert set(data["references"]) == {"reversible", "checkpoint"}
    assert all(r["memory"] > 0 and r["time_ratio"] > 0 for r in data["references"].values())
    budgets = [point[0] for point in data["curve"]]
    assert budgets[0] == 0.0 and budgets[-1] == 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_budget_on_the_command_line(model_dir, capsys):
    code = cli.main(["inspect", "tiny.py", "--memory-budget", "0.5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Memory plan" in out and "budget 0.5" in out
    code = cli.main(["inspect", "tiny.py", "--memory-budget", "2"])
    _, err = capsys.readouterr()
    assert code == 2 and "--memory-budget" in err and "outside [0, 1]" in err
