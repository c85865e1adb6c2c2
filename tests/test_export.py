"""Tests of fxmomentum.tools.export: torch.export and ONNX of converted models, atomic outputs."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn

import fxmomentum
from fxmomentum import MomentumChain
from fxmomentum.tools import export
from fxmomentum.tools.export import (
    ExportError,
    atomic_output,
    eval_no_grad,
    export_onnx,
    export_program,
    output_leaves,
    relative_error,
    save_program,
)


# -- a converted-like GraphModule that does not need the converter ---------------------------------
class _ChainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        blocks = [nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3)]
        self.chain = MomentumChain(blocks, gamma=0.9)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.norm(self.chain(self.stem(x))))


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, MomentumChain) or super().is_leaf_module(m, qualname)


def chain_graph_module() -> fx.GraphModule:
    torch.manual_seed(0)
    net = _ChainNet()
    return fx.GraphModule(net, _LeafTracer().trace(net))


def test_export_program_runs_the_plain_chain_and_restores_modes():
    gm = chain_graph_module()
    x = torch.randn(4, 8)
    ep = export_program(gm, x)
    assert gm.training and gm.norm.training  # flags restored
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("autograd" in t or "Function" in t for t in targets)
    with eval_no_grad(gm):
        expected = gm(x)
    assert relative_error(ep.module()(x), expected) < 1e-6


def test_save_program_round_trip(tmp_path):
    gm = chain_graph_module()
    x = torch.randn(3, 8)
    path = tmp_path / "m.pt2"
    save_program(export_program(gm, (x,)), path)
    assert os.listdir(tmp_path) == ["m.pt2"]
    loaded = torch.export.load(str(path))
    with eval_no_grad(gm):
        torch.testing.assert_close(loaded.module()(x), gm(x))


def test_export_program_error_is_export_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(ExportError, match=r"torch\.export failed"):
        export_program(DataDependent(), (torch.randn(2),), strict=True)


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.pt"]
    with atomic_output(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "wb") as fh:
            fh.write(b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.pt"]
    fresh = tmp_path / "fresh.pt"
    with atomic_output(fresh) as tmp:
        open(tmp, "wb").close()
    umask = os.umask(0o022)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_atomic_output_missing_directory(tmp_path):
    with pytest.raises(OSError), atomic_output(tmp_path / "missing" / "out.pt"):
        pass


def test_output_leaves_and_relative_error():
    a, b = torch.ones(3), torch.zeros(2)
    assert [t.shape for t in output_leaves({"x": a, "y": [b, 3]})] == [(3,), (2,)]
    assert relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert relative_error(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])) == 1.0


# -- ONNX ------------------------------------------------------------------------------------------
def test_onnx_needs_onnx_and_onnxscript(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_importable", lambda name: name not in ("onnxscript",))
    with pytest.raises(ExportError, match="pip install onnx onnxscript"):
        export_onnx(chain_graph_module(), torch.randn(2, 8), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_onnx_export_and_check(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    gm = chain_graph_module()
    path = tmp_path / "m.onnx"
    result = export_onnx(gm, (torch.randn(4, 8),), path)
    assert result.checked and result.max_relative_error < 1e-4
    assert "onnxruntime outputs match" in str(result)
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert gm.training


def test_onnx_mismatch_writes_nothing(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    with pytest.raises(ExportError, match="nothing was written"):
        export_onnx(chain_graph_module(), torch.randn(4, 8), tmp_path / "m.onnx", tolerance=-1.0)
    assert os.listdir(tmp_path) == []


def test_onnx_without_onnxruntime_is_not_checked(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    real = export._importable
    monkeypatch.setattr(export, "_importable", lambda name: name != "onnxruntime" and real(name))
    result = export_onnx(chain_graph_module(), torch.randn(4, 8), tmp_path / "m.onnx")
    assert not result.checked and "not installed" in str(result)
    assert os.listdir(tmp_path) == ["m.onnx"]


# -- real converted models -------------------------------------------------------------------------
def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 64, 64)


def _small_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )  # fmt: skip
    return model, torch.randn(1, 3, 64, 64)


MODELS = {"resnet18": _resnet18, "vit": _small_vit}


@pytest.fixture(scope="module")
def converted():
    """The converted models (eval) and their inputs, built once for the module."""
    out = {}
    for name, make in MODELS.items():
        model, x = make()
        gm, report = fxmomentum.convert(model, gamma=0.9, example_inputs=(x,), return_report=True)
        assert any(getattr(c, "converted", True) for c in report.chains), name
        out[name] = (gm.eval(), x)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_of_converted_model(converted, name):
    gm, x = converted[name]
    ep = export_program(gm, (x,))
    with torch.no_grad():
        expected = gm(x)
        got = ep.module()(x)
    assert relative_error(got, expected) < 1e-5
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_of_converted_model(converted, name, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    gm, x = converted[name]
    result = export_onnx(gm, (x,), tmp_path / f"{name}.onnx")
    assert result.checked and result.max_relative_error <= 1e-4
    assert os.listdir(tmp_path) == [f"{name}.onnx"]


# -- the user's own export calls, grad enabled -----------------------------------------------------
def _encoder_stack():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    stack = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    model = nn.Sequential(nn.Linear(6, 16), stack)
    return model, torch.randn(2, 5, 6)


STACKS = {"resnet18": _resnet18, "encoder": _encoder_stack}


@pytest.fixture(scope="module")
def stacks():
    out = {}
    for name, make in STACKS.items():
        model, x = make()
        x = torch.cat([x, x.flip(0)]) if x.shape[0] == 1 else x  # batch 2
        gm = fxmomentum.convert(model, gamma=0.9, example_inputs=(x,))
        chains = [m for m in gm.modules() if isinstance(m, MomentumChain)]
        assert chains and not any(c.use_backprop for c in chains), name
        out[name] = (gm.eval(), x)
    return out


@pytest.mark.parametrize("name", list(STACKS))
def test_torch_export_export_with_grad_enabled(stacks, name):
    gm, x = stacks[name]
    assert torch.is_grad_enabled()
    ep = torch.export.export(gm, (x,))  # as on any model: no torch.no_grad() needed
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("autograd" in t or "Function" in t for t in targets)
    with torch.no_grad():
        plain = gm(x)  # the plain chain
    torch.testing.assert_close(ep.module()(x), plain, rtol=1e-5, atol=1e-5)
    x2 = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2), gm(x2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(STACKS))
def test_torch_onnx_export_with_grad_enabled(stacks, name, tmp_path):
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    gm, x = stacks[name]
    path = tmp_path / f"{name}.onnx"
    with fxmomentum.tools.export.captured_output():  # torch.onnx prints its progress
        torch.onnx.export(gm, (x,), str(path), dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        plain = gm(x)
    assert relative_error(torch.from_numpy(got), plain) < 1e-5


# -- the batch dimension ---------------------------------------------------------------------------
def test_batch_dynamic_shapes():
    shapes = export.batch_dynamic_shapes((torch.zeros(2, 3), torch.zeros(2), torch.zeros(7, 2), 3))
    assert [None if s is None else list(s) for s in shapes] == [[0], [0], None, None]
    assert shapes[0][0] is shapes[1][0]  # one batch size for all inputs


@pytest.mark.parametrize("batch", [1, 2])
def test_exports_run_at_another_batch(batch, tmp_path):
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    gm = chain_graph_module()
    x = torch.randn(batch, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", export.StaticBatchWarning)
        ep = export_program(gm, (x,))
        result = export_onnx(gm, (x,), tmp_path / "m.onnx")
    assert result.static_batch == "" and result.batches == [batch, batch, batch + 3]
    assert "batch dimension dynamic" in str(result)
    x5 = torch.randn(5, 8)
    with eval_no_grad(gm):
        expected = gm(x5)
    torch.testing.assert_close(ep.module()(x5), expected, rtol=1e-5, atol=1e-6)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x5.numpy()})
    assert relative_error(torch.from_numpy(got), expected) < 1e-5


class _FixedBatch(nn.Module):
    """Reshapes to a constant batch of 2: the model itself fixes the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x).reshape(2, 2, 4)


def test_a_model_that_fixes_the_batch_exports_static_and_says_why(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    x = torch.randn(2, 8)
    with pytest.warns(export.StaticBatchWarning) as record:
        ep = export_program(_FixedBatch(), (x,))
    (message,) = [str(w.message) for w in record]
    assert message.startswith(
        "torch.export: the batch dimension is static (the exported model takes a batch of 2 only): "
    )
    assert "\n" not in message and len(message) < 400
    assert ep.module()(x).shape == (2, 2, 4)
    with pytest.warns(export.StaticBatchWarning, match="^ONNX export: the batch dimension"):
        result = export_onnx(_FixedBatch(), (x,), tmp_path / "m.onnx")
    assert result.static_batch and result.checked and result.batches == [2, 2]
    assert str(result).startswith(f"wrote {tmp_path / 'm.onnx'} (batch dimension static: ")


# -- the ONNX check --------------------------------------------------------------------------------
def test_onnx_check_says_when_outputs_do_not_vary(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    result = export_onnx(model, (torch.randn(2, 8),), tmp_path / "a.onnx")
    assert result.checked and result.weak == "" and "weak" not in str(result)
    nn.init.zeros_(model[2].weight)  # as torchvision's ViT heads: the output is the bias
    result = export_onnx(model, (torch.randn(2, 8),), tmp_path / "b.onnx")
    assert result.checked and result.weak.startswith("the outputs do not change with the inputs")
    assert str(result).endswith(
        "; the check is weak: the outputs do not change with the inputs (the same for two "
        "different inputs), so a wrong graph could match them"
    )


def test_onnx_check_on_vit_b_16_is_weak(tmp_path):
    """torchvision's vit_b_16 initialises its head to zero: a random one outputs zeros."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    gm = fxmomentum.convert(model, 0.9, example_inputs=torch.randn(1, 3, 32, 32))
    result = export_onnx(gm, (torch.randn(1, 3, 32, 32),), tmp_path / "vit.onnx")
    assert result.max_relative_error == 0.0 and result.weak


# -- what torch prints -----------------------------------------------------------------------------
class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        if x.mean() > 100:
            return x
        return self.lin(x)


@pytest.mark.parametrize("which", ["torch.export", "onnx"])
def test_failed_export_prints_nothing(capfd, tmp_path, which):
    if which == "onnx":
        pytest.importorskip("onnxscript")
    with pytest.raises(ExportError) as err:
        if which == "onnx":
            export_onnx(_DataDependent(), (torch.randn(2, 3),), tmp_path / "m.onnx")
        else:
            export_program(_DataDependent(), (torch.randn(2, 3),))
    out, errout = capfd.readouterr()
    assert out == "" and errout == ""
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(
        "torch.export failed: " if which == "torch.export" else "ONNX export failed: "
    )
    assert err.value.output  # torch's own output is kept for --debug
    assert os.listdir(tmp_path) == []
