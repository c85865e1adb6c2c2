"""Tests of the command line: commands, bad-input cases, saved files in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fxmomentum.api
import fxmomentum.tools.export
from fxmomentum.tools import cli, commands

# A tiny ResNet-like model: stem, 3 pure residual blocks at 8 channels, a strided projection,
# 2 pure residual blocks at 16 channels, head. Its chains have 3 and 2 blocks.
TINY_RESNET = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
        )

    def forward(self, x):
        return x + self.f(x)


class TinyResNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage1 = nn.Sequential(*[Block(8) for _ in range(3)])
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.stage2 = nn.Sequential(*[Block(16) for _ in range(2)])
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(x.mean((2, 3)))
"""
CHAIN_LENGTHS = [3, 2]


@pytest.fixture(autouse=True)
def writes_bytecode(monkeypatch):
    """As on a user's machine, without PYTHONDONTWRITEBYTECODE: Python writes ``__pycache__``
    next to the files it imports unless the loader stops it, and the folder listings of these
    tests (nothing half-written, nothing else either) would show it."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)


def write_model(tmp_path, body: str = TINY_RESNET, extra: str = "", name: str = "model.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body) + textwrap.dedent(extra))
    return str(path)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fxmomentum: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


# -- help ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["convert", "--help"]])
def test_help_does_not_import_torch(argv):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fxmomentum", *argv],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]  # fmt: skip
    assert "fxmomentum.tools.cli" in imported
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]


def test_no_bytecode_next_to_the_model_in_a_fresh_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    path = write_model(tmp_path)
    (tmp_path / "helper_for_bytecode_cli_test.py").write_text("C = 8\n")
    with open(path, "a") as fh:
        fh.write("from helper_for_bytecode_cli_test import C\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fxmomentum", "inspect", path], capture_output=True, text=True,
        timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["helper_for_bytecode_cli_test.py", "model.py"]


def test_python_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "fxmomentum", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "inspect" in proc.stdout and "convert" in proc.stdout
    assert "exit codes:" in proc.stdout and "examples:" in proc.stdout


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_command_help_has_example_and_exit_codes(capsys, command):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"fxmomentum {command} " in out.split("examples:")[1]
    for code in range(2, 9):
        assert f"\n  {code}  " in out


def test_exit_codes_are_distinct():
    assert len(set(cli.EXIT_CODES)) == len(cli.EXIT_CODES) == 9


# -- usage errors (exit 2) -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, words",
    [
        ([], ["required: COMMAND"]),
        (["frobnicate", "m.py"], ["invalid choice"]),
        (["inspect"], ["TARGET"]),
        (["inspect", "m.py", "--format", "xml"], ["--format"]),
        (["inspect", "m.py", "--gamma", "1.5"], ["--gamma", "outside [0, 1)"]),
        (["inspect", "m.py", "--gamma", "-0.1"], ["outside [0, 1)"]),
        (["inspect", "m.py", "--gamma", "nan"], ["outside [0, 1)"]),
        (["inspect", "m.py", "--gamma", "1"], ["outside [0, 1)", "no block would have an effect"]),
        (["convert", "m.py", "--gamma", "1", "-o", "x.pt"], ["outside [0, 1)", "no block would"]),
        (["profile", "m.py", "--gamma", "1.0"], ["outside [0, 1)", "no block would have"]),
        (["inspect", "m.py", "--gamma", "abc"], ["not a number"]),
        (["inspect", "m.py", "--input-shape", "2,x"], ["--input-shape", "commas"]),
        (["inspect", "m.py", "--input-shape", "2,3", "--dtype", "floaty"], ["unknown dtype"]),
        (["convert", "m.py", "--gamma", "0", "-o", "x.pt"], ["--use-backprop"]),
        (["convert", "m.py"], ["-o OUT.pt"]),
        (["convert", "m.py", "-o", "a.pt", "--onnx", "a.pt"], ["different files"]),
        (["inspect", "m.py", "--min-blocks", "0"], ["positive"]),
    ],
)
def test_usage_errors(capsys, argv, words):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert_one_line_error(err, *words)


def test_dtype_without_input_shape(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", write_model(tmp_path), "--dtype", "float64")
    assert code == 2
    assert_one_line_error(err, "--input-shape")


# -- target errors (3), model errors (4), input errors (6) -----------------------------------------
BAD_TARGETS = {
    "missing file": (None, "", 3, ["file not found", "check the path"]),
    "syntax error": ("x = (\n", "", 3, ["syntax error in", "model.py:1", "fix the file"]),
    "exception": ("import torch\n\nraise RuntimeError('no GPU here')\n", "", 3,
                  ["RuntimeError: no GPU here", "model.py:3", "fix the model file"]),
    "factory raises": ("def build_model():\n    return 1 / 0\n", "", 3,
                       ["build_model() raised ZeroDivisionError", "model.py:2"]),
    "nothing model-like": ("x = 1\n", "", 4, ["no model found", ":NAME"]),
    "ambiguous": ("from torch import nn\na = nn.Linear(1, 1)\nb = nn.Linear(1, 1)\n", "", 4,
                  ["several nn.Module instances", "a, b", ":NAME"]),
    "unknown name": ("from torch import nn\nmodel = nn.Linear(1, 1)\n", ":other", 4,
                     ["no attribute 'other'", "models found: model"]),
    "wrong example inputs": (TINY_RESNET + "example_inputs = torch.randn(1, 4, 8, 8)\n", "", 6,
                             ["1x4x8x8 float32", "example_inputs in", "--input-shape"]),
    "example_inputs not tensors": (TINY_RESNET + "example_inputs = 'cat.jpg'\n", "", 6,
                                   ["example_inputs in", "is a str"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_TARGETS))
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_bad_targets(capsys, tmp_path, case, command):
    body, suffix, expected, words = BAD_TARGETS[case]
    path = str(tmp_path / "model.py") if body is None else write_model(tmp_path, body)
    out_file = tmp_path / "out.pt"
    extra = ["-o", str(out_file)] if command == "convert" else []
    code, out, err = run_cli(capsys, command, path + suffix, *extra)
    assert code == expected
    assert out == ""
    assert_one_line_error(err, *words)
    assert sorted(os.listdir(tmp_path)) == ([] if body is None else ["model.py"])


def test_wrong_input_shape_option(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", write_model(tmp_path), "--input-shape", "1,3")
    assert code == 6
    assert_one_line_error(err, "1x3 float32", "--input-shape")


def test_import_target_not_found(capsys):
    code, _, err = run_cli(capsys, "inspect", "no_such_pkg_zz.models:net")
    assert code == 3
    assert_one_line_error(err, "cannot import module 'no_such_pkg_zz.models'")


def test_debug_shows_the_traceback(capsys, tmp_path):
    path = write_model(tmp_path, "def build_model():\n    return 1 / 0\n")
    code, _, err = run_cli(capsys, "inspect", path, "--debug")
    assert code == 3
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert err.strip().splitlines()[-1].startswith("fxmomentum: error: ")


def test_error_in_a_subprocess_has_no_traceback(tmp_path):
    path = write_model(tmp_path, "x = (\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fxmomentum", "convert", path, "-o", str(tmp_path / "o.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3
    assert proc.stdout == ""
    assert_one_line_error(proc.stderr, "syntax error")


# -- output paths (7) ------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["-o", "--export", "--onnx"])
@pytest.mark.parametrize("where", ["missing dir", "is a dir", "parent is a file"])
def test_unwritable_outputs(capsys, tmp_path, option, where):
    path = write_model(tmp_path, TINY_RESNET, "example_inputs = torch.randn(1, 3, 8, 8)\n")
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    target = {
        "missing dir": tmp_path / "nope" / "out.bin",
        "is a dir": tmp_path / "adir",
        "parent is a file": tmp_path / "afile" / "out.bin",
    }[where]
    before = sorted(os.listdir(tmp_path))
    code, out, err = run_cli(capsys, "convert", path, option, str(target))
    assert code == 7
    assert out == ""
    assert_one_line_error(err, f"cannot write {option}", "choose")
    assert sorted(os.listdir(tmp_path)) == before
    assert os.listdir(tmp_path / "adir") == []


def test_read_only_directory(capsys, tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root can write into read-only directories")
    path = write_model(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_cli(capsys, "convert", path, "-o", str(ro / "out.pt"))
    finally:
        ro.chmod(0o700)
    assert code == 7
    assert_one_line_error(err, "cannot write -o")
    assert os.listdir(ro) == []


TOKENS = """
import torch
from torch import nn


class Tok(nn.Module):
    def __init__(self, vocab, width=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.fs = nn.ModuleList(nn.Linear(width, width) for _ in range(2))

    def forward(self, ids):
        x = self.emb(ids)
        for f in self.fs:
            x = x + f(x)
        return x
"""


def test_token_model_errors_and_model_args(capsys, tmp_path):
    path = write_model(tmp_path, TOKENS)
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 4 and out == ""
    assert_one_line_error(err, "class Tok needs arguments (vocab)",
                          f"{path}:Tok(vocab=...)", "--model-args 'vocab=...'")  # fmt: skip
    code, out, err = run_cli(capsys, "convert", path + ":Tok(50)", "--export", "t.pt2")
    assert code == 6
    assert_one_line_error(err, "--export needs example inputs; add --input-shape (e.g. "
                               "--input-shape 1,16 --dtype int64)")  # fmt: skip
    code, out, err = run_cli(capsys, "inspect", path + ":Tok", "--model-args", "vocab=50",
                             "--input-shape", "1,3,8,8")  # fmt: skip
    assert code == 6
    assert_one_line_error(err, "at model.py:13;", "e.g. --input-shape 1,16 --dtype int64")
    code, out, err = run_cli(
        capsys,
        "inspect",
        path + ":Tok",
        "--model-args",
        "vocab=50",
        "--input-shape",
        "2,16",
        "--dtype",
        "int64",
        "--format",
        "json",
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["target"]["found"] == "class Tok(vocab=50)"
    assert [c["num_blocks"] for c in data["chains"]] == [2]
    code, _, err = run_cli(capsys, "inspect", path + ":Tok", "--model-args", "vocab=open('x')")
    assert code == 3
    assert_one_line_error(err, "open('x') is not a literal")
    assert sorted(os.listdir(tmp_path)) == ["model.py"]


def test_export_needs_example_inputs(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "convert", write_model(tmp_path), "--export", str(tmp_path / "m.pt2")
    )
    assert code == 6
    assert_one_line_error(err, "--export needs example inputs", "--input-shape")
    assert not (tmp_path / "m.pt2").exists()


# -- inspect ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("inputs", [True, False])
def test_inspect_json(capsys, tmp_path, inputs):
    extra = ["--input-shape", "2,3,16,16"] if inputs else []
    code, out, err = run_cli(capsys, "inspect", write_model(tmp_path), "--format", "json", *extra)
    assert code == 0, err
    data = json.loads(out)
    assert sorted(c["num_blocks"] for c in data["chains"]) == sorted(CHAIN_LENGTHS)
    assert data["target"]["found"] == "class TinyResNet()"
    assert data["target"]["spec"] == str(tmp_path / "model.py")
    assert data["shapes_verified"] is inputs
    if inputs:
        assert data["target"]["example_inputs"] == [{"shape": [2, 3, 16, 16], "dtype": "float32"}]


def test_inspect_table_and_markdown(capsys, tmp_path):
    path = write_model(tmp_path)
    code, table, err = run_cli(capsys, "inspect", path)
    assert code == 0, err
    assert "class TinyResNet()" in table
    assert "shapes not verified" in table
    code, md, err = run_cli(capsys, "inspect", path, "--format", "markdown", "--input-shape",
                            "1,3,8,8")  # fmt: skip
    assert code == 0, err
    assert "|" in md and "shapes not verified" not in md
    assert md != table


def test_inspect_diff(capsys, tmp_path):
    code, out, err = run_cli(capsys, "inspect", write_model(tmp_path), "--diff")
    assert code == 0, err
    assert "--- before" in out and "+++ after" in out
    assert any(line.startswith("+") and "momentum" in line.lower() for line in out.splitlines())
    code, out, _ = run_cli(capsys, "inspect", write_model(tmp_path), "--diff", "--format", "json")
    assert "+++ after" in json.loads(out)["diff"]


def test_inspect_importable_target_and_show_skipped(capsys):
    target = "torchvision.models:resnet18"
    shape = ["--input-shape", "1,3,32,32"]
    code, out, err = run_cli(capsys, "inspect", target, *shape, "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert sum(c["num_blocks"] for c in data["chains"]) >= 4
    num_skipped = len(data["skipped"])
    assert num_skipped >= 1  # the projection shortcuts
    code, out, err = run_cli(capsys, "inspect", target, *shape)
    assert code == 0, err
    assert f"{num_skipped} residual add(s) skipped" in out  # the summary keeps the count
    assert "add --show-skipped" in out
    assert data["skipped"][0]["reason"] not in out
    for fmt in ("table", "markdown"):
        argv = ["inspect", target, *shape, "--show-skipped", "--format", fmt]
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, err
        assert data["skipped"][0]["reason"] in out and "add --show-skipped" not in out


# -- convert ---------------------------------------------------------------------------------------
LOAD_AND_TRAIN = """
import sys, torch
gm = torch.load(sys.argv[1], weights_only=False)
x = torch.randn(4, 3, 16, 16)
opt = torch.optim.SGD(gm.parameters(), lr=0.1)
gm.train()
loss = gm(x).square().mean()
loss.backward()
grads = [p.grad for p in gm.parameters()]
assert all(g is not None and torch.isfinite(g).all() for g in grads), "missing gradients"
before = [p.detach().clone() for p in gm.parameters()]
opt.step()
assert any(not torch.equal(a, p) for a, p in zip(before, gm.parameters())), "no update"
print("TRAINED", type(gm).__name__, len(grads), sep=" ")
"""


def test_convert_then_load_and_train_in_a_fresh_process(capsys, tmp_path):
    path = write_model(tmp_path, TINY_RESNET, "example_inputs = torch.randn(2, 3, 16, 16)\n")
    out_file = tmp_path / "converted.pt"
    code, _, err = run_cli(capsys, "convert", path, "--gamma", "0.9", "-o", str(out_file))
    assert code == 0, err
    assert out_file.exists()
    assert f"wrote {out_file}" in err
    assert sorted(os.listdir(tmp_path)) == ["converted.pt", "model.py"]
    # A fresh process, elsewhere: only fxmomentum installed, the model file not importable.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_TRAIN, str(out_file)],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "TRAINED" in proc.stdout

    # The state_dict keys are the original model's.
    gm = torch.load(out_file, weights_only=False)
    ns: dict = {}
    exec(compile(TINY_RESNET, "tiny", "exec"), ns)
    assert list(gm.state_dict()) == list(ns["TinyResNet"]().state_dict())


def test_convert_json_report(capsys, tmp_path):
    code, out, err = run_cli(
        capsys, "convert", write_model(tmp_path), "-o", str(tmp_path / "m.pt"), "--format", "json"
    )
    assert code == 0, err
    data = json.loads(out)
    assert sorted(c["num_blocks"] for c in data["chains"]) == sorted(CHAIN_LENGTHS)


def test_convert_use_backprop_gamma_zero(capsys, tmp_path):
    path = write_model(tmp_path, TINY_RESNET, "example_inputs = torch.randn(2, 3, 8, 8)\n")
    code, _, err = run_cli(
        capsys, "convert", path, "--gamma", "0", "--use-backprop", "-o", str(tmp_path / "m.pt")
    )
    assert code == 0, err
    gm = torch.load(tmp_path / "m.pt", weights_only=False)
    ns: dict = {}
    exec(compile(TINY_RESNET, "tiny", "exec"), ns)
    torch.manual_seed(0)
    original = ns["TinyResNet"]().eval()
    gm.load_state_dict(original.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), original(x), rtol=1e-5, atol=1e-6)


def test_convert_export_and_onnx(capsys, tmp_path):
    pytest.importorskip("onnxscript")
    path = write_model(tmp_path)
    pt2, onnx_file = tmp_path / "m.pt2", tmp_path / "m.onnx"
    code, _, err = run_cli(
        capsys, "convert", path, "--input-shape", "1,3,8,8", "--export", str(pt2),
        "--onnx", str(onnx_file),
    )  # fmt: skip
    assert code == 0, err
    assert pt2.exists() and onnx_file.exists()
    assert f"wrote {pt2}" in err
    if fxmomentum.tools.export._importable("onnxruntime"):
        assert "onnxruntime outputs match" in err
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.pt2", "model.py"]
    ep = torch.export.load(str(pt2))
    assert ep.module()(torch.randn(1, 3, 8, 8)).shape == (1, 5)


def test_conversion_failure_is_exit_5(capsys, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(fxmomentum.api, "convert", broken)
    path = write_model(tmp_path)
    code, out, err = run_cli(capsys, "convert", path, "-o", str(tmp_path / "m.pt"))
    assert code == 5 and out == ""
    assert_one_line_error(err, "converting the model", "cannot trace this", "--debug")
    assert sorted(os.listdir(tmp_path)) == ["model.py"]


UNTRACEABLE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow in the top-level forward
            return x + self.f(x)
        return x
"""


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_model_that_cannot_be_captured(capsys, tmp_path, command):
    path = write_model(tmp_path, UNTRACEABLE)
    extra = ["-o", str(tmp_path / "m.pt")] if command == "convert" else []
    code, out, err = run_cli(capsys, command, path, *extra)
    assert code == 5 and out == ""
    assert_one_line_error(err, "cannot capture the model from", "control flow")
    assert sorted(os.listdir(tmp_path)) == ["model.py"]


def test_failed_save_leaves_no_file(capsys, tmp_path, monkeypatch):
    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    path = write_model(tmp_path)
    code, _, err = run_cli(capsys, "convert", path, "-o", str(tmp_path / "m.pt"))
    assert code == 7
    assert_one_line_error(err, "No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["model.py"]


# -- saving models that use classes of the model file ---------------------------------------------
LEAFY = """
import torch
from torch import nn


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if x.mean() > 100:  # data-dependent: the converter keeps Gate whole (an opaque leaf)
            return x
        return torch.tanh(self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gates = nn.ModuleList(Gate() for _ in range(3))

    def forward(self, x):
        for g in self.gates:
            x = x + g(x)
        return x


example_inputs = torch.randn(2, 3)
"""

LOAD_LEAFY = """
import sys, torch
gm = torch.load(sys.argv[1], weights_only=False)
gm.train()
gm(torch.ones(2, 3)).sum().backward()
print(type(getattr(gm.gates, "0")).__module__)
"""


def test_saved_model_with_classes_of_the_file_loads_where_the_file_is_importable(capsys, tmp_path):
    path = write_model(tmp_path, LEAFY, name="leafy_model_for_cli_test.py")
    out_file = tmp_path / "gm.pt"
    code, out, err = run_cli(capsys, "convert", path + ":Net", "-o", str(out_file))
    assert code == 0, err
    assert "Gate" in out  # listed as an opaque module
    assert "importable as `leafy_model_for_cli_test`" in err
    assert "leafy_model_for_cli_test" not in sys.modules
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_LEAFY, str(out_file)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["leafy_model_for_cli_test"]


# -- export failures (8) ---------------------------------------------------------------------------
UNPICKLABLE = LEAFY.replace(
    "        self.fc = nn.Linear(3, 3)\n",
    "        self.fc = nn.Linear(3, 3)\n        self.post = lambda t: t  # pickle cannot save it\n",
)


def test_unpicklable_model_is_exit_8_and_writes_nothing(capsys, tmp_path):
    path = write_model(tmp_path, UNPICKLABLE)
    code, out, err = run_cli(capsys, "convert", path + ":Net", "-o", str(tmp_path / "m.pt"))
    assert code == 8 and "momentum_chain_0" in out
    assert_one_line_error(err, "cannot save the converted model", "state_dict")
    assert err.strip().endswith(f"; {tmp_path / 'm.pt'} was not written; nothing else was written")
    assert sorted(os.listdir(tmp_path)) == ["model.py"]


@pytest.mark.parametrize("option", ["--export", "--onnx"])
def test_export_failure_is_exit_8(capsys, tmp_path, monkeypatch, option):
    def failing(*args, **kwargs):
        raise fxmomentum.tools.export.ExportError("torch.export failed: Unsupported: something")

    name = "export_program" if option == "--export" else "export_onnx"
    monkeypatch.setattr(commands, name, failing)
    path = write_model(tmp_path, TINY_RESNET, "example_inputs = torch.randn(1, 3, 8, 8)\n")
    out_file = tmp_path / "out.bin"
    code, out, err = run_cli(capsys, "convert", path, "-o", str(tmp_path / "m.pt"), option,
                             str(out_file))  # fmt: skip
    assert code == 8
    assert "Residual chains" in out  # the report comes first
    assert_one_line_error(err, "Unsupported: something")
    assert err.strip().endswith(
        f"; {out_file} was not written; wrote {tmp_path / 'm.pt'}; try without {option}, or "
        f"rerun with --debug to see torch's output"
    )
    assert not out_file.exists()
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "model.py"]  # -o was complete before


def test_real_export_failure_is_one_line_after_the_table(capfd, tmp_path):
    """Gate's data-dependent branch stops torch.export: torch's 30-odd lines stay hidden."""
    path = write_model(tmp_path, LEAFY)
    pt, pt2, onnx_file = (str(tmp_path / n) for n in ("m.pt", "m.pt2", "m.onnx"))
    code = cli.main(["convert", path + ":Net", "-o", pt, "--export", pt2, "--onnx", onnx_file])
    out, err = capfd.readouterr()
    assert code == 8
    assert out.startswith(f"{path}: class Net() (Net)") and "momentum_chain_0" in out
    assert_one_line_error(err, "torch.export failed: GuardOnDataDependentSymNode")
    assert "\x1b" not in err
    assert err.strip().endswith(
        f"; {pt2} was not written; wrote {pt}; --onnx {onnx_file} not attempted; try without "
        f"--export, or rerun with --debug to see torch's output"
    )
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "model.py"]
    code = cli.main(["convert", path + ":Net", "--export", pt2, "--debug"])
    _, err = capfd.readouterr()
    assert code == 8 and len(err.strip().splitlines()) > 1  # --debug shows torch's output
    assert err.strip().splitlines()[-1].endswith("; nothing else was written; try without "
                                                 "--export, or rerun with --debug to see torch's "
                                                 "output")  # fmt: skip


NO_RESIDUAL = """
import torch
from torch import nn

model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())
example_inputs = torch.randn(1, 3, 8, 8)
"""


def test_convert_with_nothing_to_convert_writes_nothing(capsys, tmp_path):
    path = write_model(tmp_path, NO_RESIDUAL)
    code, out, err = run_cli(capsys, "convert", path, "-o", str(tmp_path / "m.pt"))
    assert code == 5 and out == ""
    assert_one_line_error(err)
    assert err.strip() == (
        f"fxmomentum: error: nothing to convert: no residual chain of {path} was converted "
        f"(Sequential: 0 residual chain(s), 0 converted (0 blocks); 0 residual add(s) skipped; "
        f"0 opaque module(s); graph 6 -> 6 nodes; shapes verified); nothing was written; see why "
        f"with `fxmomentum inspect {path} --show-skipped`"
    )
    assert sorted(os.listdir(tmp_path)) == ["model.py"]
    assert cli.EXIT_CODES[5] == "the model could not be captured or converted"


EXPORTED_AT_5 = """
import sys, torch, onnxruntime
x = torch.randn(5, 3, 8, 8)
ep = torch.export.load(sys.argv[1])
session = onnxruntime.InferenceSession(sys.argv[2])
(got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
ref = ep.module()(x)
print(tuple(ref.shape), tuple(got.shape), float((ref - torch.from_numpy(got)).abs().max()))
"""


def test_exports_take_any_batch(capsys, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    path = write_model(tmp_path)
    pt2, onnx_file = tmp_path / "m.pt2", tmp_path / "m.onnx"
    code, _, err = run_cli(
        capsys, "convert", path, "--input-shape", "2,3,8,8", "--export", str(pt2),
        "--onnx", str(onnx_file),
    )  # fmt: skip
    assert code == 0, err
    assert f"wrote {pt2} (torch.export ExportedProgram, eval mode, batch dimension dynamic;" in err
    assert f"wrote {onnx_file} (batch dimension dynamic); onnxruntime outputs match" in err
    assert "at batch 2, 2, 5" in err
    proc = subprocess.run(
        [sys.executable, "-c", EXPORTED_AT_5, str(pt2), str(onnx_file)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("(5, 5) (5, 5) "), proc.stdout
    diff = float(proc.stdout.split()[-1])
    assert diff < 1e-4


# -- converter options -----------------------------------------------------------------------------
def test_converter_options_reach_the_converter(capsys, tmp_path):
    path = write_model(tmp_path)

    def chains(*options):
        code, out, err = run_cli(capsys, "inspect", path, "--format", "json", *options)
        assert code == 0, err
        data = json.loads(out)
        return [(c["first"], c["num_blocks"], c["converted"]) for c in data["chains"]], data

    everything, _ = chains()
    assert everything == [("stage1.0", 3, True), ("stage2.0", 2, True)]
    assert chains("--min-blocks", "3")[0] == [("stage1.0", 3, True), ("stage2.0", 2, False)]
    assert [c[2] for c in chains("--exclude", "stage2")[0]] == [True, False]
    assert [c[2] for c in chains("--include", "stage2*")[0]] == [False, True]
    _, data = chains("--leaf", "stage1.1")
    assert [leaf["module"] for leaf in data["leaves"]] == ["stage1.1"]
    _, data = chains("--gamma", "0", "--use-backprop")
    assert data["use_backprop"] is True


def test_unknown_leaf_is_a_usage_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", write_model(tmp_path), "--leaf", "stage1.01")
    assert code == 2
    assert_one_line_error(err, "--leaf stage1.01", "did you mean stage1.1")


def test_profile_announces_kernel_compilation(capsys):
    from fxmomentum.engine import kernels

    before = kernels.on_first_compile
    restore = commands._show_compile_progress(commands._StderrProgress(quiet=False))
    kernels.on_first_compile()  # what the engine calls before its first compilation
    restore()
    assert kernels.on_first_compile is before
    assert capsys.readouterr().err == (
        "fxmomentum: compiling the reversible engine's kernels (torch.compile, once per "
        "process; this takes a while)\n"
    )
