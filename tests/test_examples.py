"""Every example runs with ``--quick`` in a subprocess and its checks hold.

The examples are started together (one process each, one thread each) and each test waits for
its own; the figures they print are parsed and checked.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = [
    "toy_momentumnet",
    "resnet_dropin",
    "transformer",
    "memory_vs_depth",
    "finetune_digits",
    "vit",
]
NEEDS = {"finetune_digits": ["sklearn"], "vit": ["vit_pytorch", "einops"], "memory_vs_depth": []}
TIMEOUT = 300


def _missing(name: str) -> list[str]:
    return [m for m in NEEDS.get(name, []) if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every example with ``--quick``; ``runs[name]()`` waits and gives (code, out, png)."""
    out_dir = tmp_path_factory.mktemp("examples")
    env = dict(os.environ, OMP_NUM_THREADS="1", FXMOMENTUM_COMPILE="0")
    procs = {}
    for name in NAMES:
        if _missing(name):
            continue
        cmd = [sys.executable, str(EXAMPLES / f"{name}.py"), "--quick"]
        if name in ("memory_vs_depth", "finetune_digits"):
            cmd += ["--out", str(out_dir / f"{name}.png")]
        procs[name] = subprocess.Popen(
            cmd,
            cwd=out_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    results: dict[str, tuple[int, str]] = {}

    def wait(name: str) -> tuple[int, str, Path]:
        if name not in procs:
            pytest.skip(f"{name} needs {', '.join(_missing(name))}")
        if name not in results:
            out, _ = procs[name].communicate(timeout=TIMEOUT)
            results[name] = (procs[name].returncode, out)
        return (*results[name], out_dir)

    yield wait
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _floats(pattern: str, text: str) -> list[float]:
    found = re.findall(pattern, text)
    assert found, f"{pattern!r} not in:\n{text}"
    return [float(x) for x in (found[0] if isinstance(found[0], tuple) else found)]


def _ok(code: int, out: str) -> None:
    assert code == 0, out[-3000:]
    assert out.rstrip().splitlines()[-1] == "OK", out[-3000:]


def test_toy_momentumnet(runs):
    code, out, _ = runs("toy_momentumnet")
    _ok(code, out)
    (err,) = _floats(r"reversible vs backprop: max relative error (\S+)", out)
    assert err < 1e-5
    first, last = _floats(r"loss (\S+) -> (\S+)", out)
    assert last < first


def test_resnet_dropin(runs):
    code, out, _ = runs("resnet_dropin")
    _ok(code, out)
    assert "state_dict keys equal: True" in out
    assert "original checkpoint loaded into the converted model (strict=True)" in out
    assert "loaded back into a plain torchvision resnet18 (strict=True)" in out
    (diff,) = _floats(r"largest output difference to the original (\S+)", out)
    assert diff <= 1e-4
    first, last = _floats(r"loss (\S+) -> (\S+)", out)
    assert last < first


def test_transformer(runs):
    code, out, _ = runs("transformer")
    _ok(code, out)
    for variant in ("one block per layer", "split_layers=True"):
        lines = "\n".join(ln for ln in out.splitlines() if ln.startswith(f"[{variant}]"))
        assert "state_dict keys equal: True" in lines
        (diff,) = _floats(r"largest output difference (\S+)", lines)
        assert diff <= 1e-4
        (err,) = _floats(r"max relative error (\S+)", lines)
        assert err < 1e-5
        first, last = _floats(r"loss (\S+) -> (\S+)", lines)
        assert last < first


def test_memory_vs_depth(runs):
    code, out, out_dir = runs("memory_vs_depth")
    _ok(code, out)
    rows = {int(d): (float(b), float(r)) for d, b, r in re.findall(r"^\s+(\d+)\s+(\S+)\s+(\S+)$",
                                                                     out, re.M)}  # fmt: skip
    assert sorted(rows) == [2, 16], out
    assert rows[16][0] > 2 * rows[2][0]  # backprop grows with depth
    assert rows[16][1] < rows[16][0]  # the reversible chain keeps less
    assert rows[16][1] < 1.3 * rows[2][1]  # ... and stays about flat
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out_dir / "memory_vs_depth.png").read_bytes().startswith(b"\x89PNG")


def test_finetune_digits(runs):
    code, out, out_dir = runs("finetune_digits")
    _ok(code, out)
    (original,) = _floats(r"backprop: loss \S+, test accuracy (\S+)", out)
    (finetuned,) = _floats(r"fine-tuning: loss \S+, test accuracy (\S+)", out)
    assert original > 0.5 and finetuned > 0.5  # ten classes: chance is 0.1
    # The table: epoch 0 (before fine-tuning) and 1, three runs.
    rows = re.findall(r"^\| (\d+) \| (\S+) \| (\S+) \| (\S+) \|$", out, re.M)
    assert [int(r[0]) for r in rows] == [0, 1], out
    before = [float(x) for x in rows[0][1:]]
    assert before[0] == pytest.approx(original, abs=1e-3)
    assert before[1] < before[0] - 0.1  # gamma 0.9 at once: another function of the weights
    assert abs(before[2] - before[0]) < 0.15  # gamma 0.1: close to the original
    assert "final gamma of the scheduled run: 0.9" in out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out_dir / "finetune_digits.png").read_bytes().startswith(b"\x89PNG")
        assert "| epoch |" in (out_dir / "finetune_digits.md").read_text()
    orig_mib, conv_mib, ratio = _floats(
        r"activation memory (\S+) MiB original, (\S+) MiB converted \((\S+)x\)", out
    )
    # Quick mode runs the eager kernels on a shallow chain: no saving is promised, only figures.
    assert orig_mib > 1 and conv_mib > 0
    # The three figures are printed to two decimals: the ratio of the printed MiB can differ
    # from the printed ratio by that rounding.
    rounding = 0.005 + (1 + ratio) * 0.005 / orig_mib
    assert ratio == pytest.approx(conv_mib / orig_mib, abs=rounding + 1e-9)


def test_vit(runs):
    code, out, _ = runs("vit")
    _ok(code, out)
    # ViT.forward does not trace (einops): convert descends and captures v.transformer whole.
    assert "converted model: ViT, transformer: " in out
    assert "converted chains (blocks): [4]" in out
    assert "state_dict keys equal: True" in out
    (err,) = _floats(r"max relative error (\S+)", out)
    assert err < 1e-5
