"""Tests of fxmomentum.capture: tracing with automatic leaves, train/eval flags, shapes."""

from __future__ import annotations

import copy
import re

import archs
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import max_rel_err
from torch import fx, nn

import fxmomentum
from fxmomentum import MomentumChain
from fxmomentum.capture import (
    CaptureError,
    CaptureTracer,
    GraphPerModeError,
    TrainingFlag,
    capture,
    propagate_shapes,
    record_calls,
)


class DataDependent(nn.Module):
    """Branches on a tensor value: cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


class BranchesOnTraining(nn.Module):
    """Branches on self.training: its graph would be fixed to one mode."""

    def forward(self, x):
        if self.training:
            return x * 0.5
        return x


class PassesTraining(nn.Module):
    """Passes self.training to a function: traced, with the mode read at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.lin(x), 0.5, self.training)


class WithParts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.bad = DataDependent()
        self.branchy = BranchesOnTraining()
        self.drop = PassesTraining()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        x = self.bad(self.a(x))
        x = self.drop(self.branchy(x))
        for b in self.blocks:
            x = x + torch.tanh(b(x))
        return x


def test_plain_model_is_traced_with_shapes():
    model = archs.MLPResNet()
    cap = capture(copy.deepcopy(model), torch.randn(3, 8))
    assert cap.shapes_verified and cap.leaves == [] and cap.notes == []
    modules = [n for n in cap.graph.nodes if n.op == "call_module"]
    assert [str(n.target) for n in modules[:3]] == ["stem", "blocks.0.0", "blocks.0.1"]
    shapes = {str(n.target): tuple(n.meta["tensor_meta"].shape) for n in modules}
    assert shapes["stem"] == (3, 16) and shapes["blocks.0.0"] == (3, 32)
    assert shapes["head"] == (3, 3)


def test_without_example_inputs_shapes_are_unverified():
    cap = capture(archs.MLPResNet())
    assert not cap.shapes_verified
    assert all("tensor_meta" not in n.meta for n in cap.graph.nodes)


def test_untraceable_submodule_becomes_a_leaf_and_the_rest_is_traced():
    model = WithParts()
    cap = capture(copy.deepcopy(model), torch.randn(2, 8))
    leaves = {leaf.path: leaf for leaf in cap.leaves}
    assert set(leaves) == {"bad", "branchy"}
    assert leaves["bad"].type == "DataDependent"
    assert "control flow" in leaves["bad"].reason and "not traceable" in leaves["bad"].reason
    assert "self.training" in leaves["branchy"].reason
    targets = [str(n.target) for n in cap.graph.nodes if n.op == "call_module"]
    assert "bad" in targets and "bad.lin" not in targets  # opaque
    assert "drop.lin" in targets  # traced into
    assert "drop._training_flag" in targets  # mode read at run time


def test_leaf_modules_option():
    cap = capture(archs.MLPResNet(), leaf_modules=["blocks.1", nn.LayerNorm])
    targets = {str(n.target) for n in cap.graph.nodes if n.op == "call_module"}
    assert "blocks.1" in targets and "blocks.1.0" not in targets and "blocks.0.0" in targets
    assert [(leaf.path, leaf.reason) for leaf in cap.leaves] == [
        ("blocks.1", "requested (leaf_modules)")
    ]
    with pytest.raises(ValueError, match="no submodule"):
        capture(archs.MLPResNet(), leaf_modules=["nope"])


def test_training_flag_follows_train_and_eval_after_conversion():
    torch.manual_seed(0)
    model = WithParts()
    gm = fxmomentum.convert(model, 0.0, use_backprop=True)
    x = torch.randn(4, 8)
    gm.eval()
    model.eval()
    assert torch.equal(gm(x), gm(x))  # no dropout in eval mode
    assert max_rel_err([gm(x)], [model(x)]) < 1e-6
    gm.train()
    model.train()
    torch.manual_seed(1)
    a = gm(x)
    torch.manual_seed(1)
    assert max_rel_err([a], [model(x)]) < 1e-6
    assert not torch.equal(a, gm(x))  # dropout active again
    flag = gm.get_submodule("drop._training_flag")
    assert isinstance(flag, TrainingFlag) and flag.training
    gm.drop.eval()
    assert not flag.training
    # The original model got no flag: conversion works on a copy.
    assert not hasattr(model.drop, "_training_flag")


def test_model_own_forward_that_cannot_be_traced_raises():
    with pytest.raises(CaptureError, match=r"DataDependent\.forward"):
        capture(DataDependent())


def test_root_branching_on_training_is_noted_and_checked():
    # Its graph in eval mode would be another: by default no graph, with the reason.
    with pytest.raises(
        GraphPerModeError,
        match=r"test_capture.py:\d+ \(`if self.training:`\), and its graph in train",
    ):
        capture(BranchesOnTraining().train())
    cap = capture(BranchesOnTraining().train(), one_mode=True)
    assert any("specialised to train mode, which it checks" in note for note in cap.notes)
    gm = cap.graph_module
    x = torch.ones(2)
    assert torch.equal(gm(x), x * 0.5)
    gm.eval()  # the path taken in eval mode is not in the graph: a clear error, not x * 0.5
    line = re.escape("(`if self.training:`), and its graph was captured in train mode")
    with pytest.raises(AssertionError, match=rf"test_capture.py:\d+ {line}"):
        gm(x)
    assert list(gm.state_dict()) == []


def test_the_mode_check_names_the_line_in_a_library_s_model():
    # torchvision's own code, not the caller's: "torchvision" starts like "torch".
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    x = torch.randn(2, 3, 64, 64)
    gm = capture(model.train(), x, one_mode=True).graph_module
    with pytest.raises(AssertionError, match=r"googlenet.py:\d+ \(`if self.training"):
        gm.eval()(x)


class SameEitherWay(nn.Module):
    """Branches on self.training, then on a setting that makes both paths the same."""

    def __init__(self) -> None:
        super().__init__()
        self.layerdrop = 0.0

    def forward(self, x):
        if self.training and self.layerdrop > 0:
            x = x * torch.rand([])
        return x + 1


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_root_traced_the_same_in_both_modes_is_not_checked(mode):
    model = getattr(SameEitherWay(), mode)()
    cap = capture(model)
    assert any("the same in train and eval mode" in note for note in cap.notes)
    assert not [n for n in cap.graph.nodes if n.target is torch._assert]
    gm = cap.graph_module
    for switch in ("train", "eval"):
        assert torch.equal(getattr(gm, switch)()(torch.ones(2)), torch.full((2,), 2.0))
    # Tracing in the other mode left the model as it was.
    assert model.training is (mode == "train") and not list(model.children())
    model.layerdrop = 0.5  # now the paths differ: the graph is specialised and checked
    cap = capture(model, one_mode=True)
    assert any("which it checks at run time" in note for note in cap.notes)


class PicksDropout(nn.Module):
    """Hugging Face's attention: its dropout picked by ``self.training``, with a residual."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p, self.lin = p, nn.Linear(8, 8)

    def forward(self, x):
        p = self.p if self.training else 0.0
        return x + F.dropout(self.lin(x), p, self.training)


class Picks(nn.Module):
    """A module that picks by ``self.training`` around one that picks too."""

    def __init__(self, p: float, inner: float) -> None:
        super().__init__()
        self.p, self.inner = p, PicksDropout(inner)

    def forward(self, x):
        x = self.inner(x)
        return x * 2 if self.training and self.p > 0 else x


class PicksTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.same, self.differs, self.nested = PicksDropout(0.0), PicksDropout(0.5), Picks(0, 0.5)

    def forward(self, x):
        return self.nested(self.differs(self.same(x)))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mode_free_traces_into_what_branches_on_the_mode_but_computes_the_same(mode):
    model = getattr(PicksTwice(), mode)()
    kept = {leaf.path for leaf in capture(copy.deepcopy(model), torch.randn(2, 8)).leaves}
    assert kept == {"same", "differs", "nested", "nested.inner"}
    cap = capture(model, torch.randn(2, 8), mode_free=True)
    # Only the dropout probability differs between the modes; ``nested`` does the same in
    # both once the ``inner`` module, which does not, is kept whole.
    assert {leaf.path for leaf in cap.leaves} == {"differs", "nested.inner"}
    assert any("`nested` (Picks), `same` (PicksDropout) branch on self.training" in n
               for n in cap.notes)  # fmt: skip
    assert not [n for n in cap.graph.nodes if n.target is torch._assert]
    assert "same._training_flag" in {str(n.target) for n in cap.graph.nodes}  # F.dropout's
    assert "_training_flag" not in model.nested._modules  # the checks' flag, read by nothing
    gm = cap.graph_module
    x = torch.randn(3, 8)
    for switch in ("train", "eval"):
        getattr(gm, switch)()
        getattr(model, switch)()
        torch.manual_seed(0)
        expected = model(x)
        torch.manual_seed(0)
        assert torch.equal(gm(x), expected), switch


def test_momentum_chain_is_a_leaf():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.chain = MomentumChain([nn.Linear(4, 4) for _ in range(3)], 0.9)

        def forward(self, x):
            return self.chain(x) * 2

    cap = capture(Holder(), torch.randn(2, 4))
    assert [str(n.target) for n in cap.graph.nodes if n.op == "call_module"] == ["chain"]
    assert [leaf.path for leaf in cap.leaves] == ["chain"]
    assert "already a momentum chain" in cap.leaves[0].reason


def test_torch_transformer_encoder_is_traced_into():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    model = nn.Sequential(nn.Linear(6, 16), encoder)
    before = torch.backends.mha.get_fastpath_enabled()
    cap = capture(model, torch.randn(2, 5, 6))
    assert torch.backends.mha.get_fastpath_enabled() == before
    targets = {str(n.target) for n in cap.graph.nodes if n.op == "call_module"}
    assert {"1.layers.0.self_attn", "1.layers.1.norm2"} <= targets
    assert cap.leaves == []


def test_shape_propagation_has_no_side_effects():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    gm = fx.symbolic_trace(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 4) + 3
    rng = torch.get_rng_state()
    propagate_shapes(gm, x, model)
    assert torch.equal(rng, torch.get_rng_state())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert tuple(list(gm.graph.nodes)[-2].meta["tensor_meta"].shape) == (8, 4)


def test_failed_shape_propagation_is_a_note():
    cap = capture(archs.MLPResNet(), torch.randn(3, 5))  # wrong feature size
    assert not cap.shapes_verified
    assert any("shape propagation" in note for note in cap.notes)


def test_example_inputs_type_is_checked():
    with pytest.raises(TypeError, match="example_inputs"):
        propagate_shapes(fx.symbolic_trace(nn.Linear(2, 2)), "bad")


def test_tracer_reads_parameters_by_identity():
    model = archs.Synthetic(5)
    graph = CaptureTracer().trace(model)
    attrs = [str(n.target) for n in graph.nodes if n.op == "get_attr"]
    assert attrs == [f"scales.{i}" for i in range(5)]


class Residual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.f = archs.mlp(dim)

    def forward(self, x):
        return x + self.f(x)


class AuxInTraining(nn.Module):
    """A residual stack in a child, and an auxiliary output in training only (as Inception's)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.body = nn.Sequential(*(Residual(16) for _ in range(3)))
        self.aux = nn.Linear(16, 2)

    def forward(self, x):
        x = self.body(self.stem(x))
        if self.training:
            return x, self.aux(x)
        return x


class LoopAndTrainingPath(nn.Module):
    """Its chain is its own loop, and training adds noise: descending would split the chain."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(archs.mlp(8) for _ in range(3))

    def forward(self, x):
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_root_with_a_graph_per_mode_stays_python_and_serves_both(mode):
    torch.manual_seed(0)
    model = getattr(AuxInTraining(), mode)()
    x = torch.randn(4, 8)
    out, report = fxmomentum.convert(
        model, 0.0, use_backprop=True, example_inputs=x, return_report=True
    )
    assert not isinstance(out, fx.GraphModule)
    assert [(c.num_blocks, c.first, c.last) for c in report.chains] == [(3, "body.0", "body.2")]
    assert any("a different graph in train and eval mode" in n for n in report.notes)
    out.train(), model.train()
    assert max_rel_err(list(out(x)), list(model(x))) <= 1e-6
    out.eval(), model.eval()
    assert max_rel_err([out(x)], [model(x)]) <= 1e-6


def test_a_root_whose_own_loop_is_the_chain_keeps_its_mode_s_graph():
    torch.manual_seed(0)
    model = LoopAndTrainingPath().eval()
    x = torch.randn(4, 8)
    out, report = fxmomentum.convert(
        model, 0.0, use_backprop=True, example_inputs=x, return_report=True
    )
    assert isinstance(out, fx.GraphModule)
    assert [c.num_blocks for c in report.chains] == [3]
    assert any("specialised to eval mode, which it checks" in n for n in report.notes)
    assert max_rel_err([out(x)], [model(x)]) <= 1e-6
    with pytest.raises(AssertionError, match="captured in eval mode"):
        out.train()(x)


def test_googlenet_converted_in_train_mode_also_evaluates():
    # Its forward returns the auxiliary logits in training only: no one graph serves both
    # modes, so it stays Python code (it has no residual chain to lose).
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    x = torch.randn(2, 3, 64, 64)
    out = fxmomentum.convert(model.train(), 0.0, use_backprop=True, example_inputs=x)
    model.eval(), out.eval()
    assert max_rel_err([out(x)], [model(x)]) <= 1e-6


class WithSpare(nn.Module):
    """Draws random numbers (dropout), and holds a module no run calls."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare, self.drop = nn.Linear(4, 4), nn.Linear(4, 4), nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.used(x))


def test_recording_runs_again_only_for_layers_a_random_drop_skipped():
    model = WithSpare().train()
    runs = []
    model.register_forward_pre_hook(lambda m, a: runs.append(m.training))
    records = record_calls(model, torch.randn(2, 4), [model.used, model.spare])
    # The spare is no layer of a list whose other layers ran: no seed would call it. One run in the
    # model's mode, one in the other.
    assert list(records) == [id(model.used)] and runs == [True, False]


def test_a_bug_in_the_tracer_is_raised_not_taken_for_an_untraceable_module(monkeypatch):
    # The retry loop makes a leaf of a submodule whose tracing fails; an error raised by the
    # tracer's own code must not be hidden that way.
    from fxmomentum.capture import tracer

    # A method whose code sits in the tracer's file, as a bug there would.
    namespace: dict = {}
    code = "def call_module(self, m, forward, args, kwargs):\n    raise KeyError('tracer bug')\n"
    exec(compile(code, tracer.__file__, "exec"), namespace)
    monkeypatch.setattr(tracer.CaptureTracer, "call_module", namespace["call_module"])
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(KeyError, match="tracer bug"):
        capture(model, torch.randn(2, 4))
