"""Faults and odd inputs: what works, and what fails with a clear error.

* An exception inside a block while backward recomputes it (in the block's forward or in its
  backward) propagates unchanged and leaves the model as a successful forward would: buffers
  as the forward left them, the RNG where the forward left it; the next step is correct.
  Same for an exception in the forward.
* Converting twice, and converting converted or transformed models: works.
* Frozen parameters, inputs that do not require grad, partially frozen chains: gradients as
  plain backprop; a chain with nothing to differentiate takes the plain path.
* float16 / bfloat16 models train, no less accurately than plain backprop in that dtype.
* channels_last models and inputs: the same outputs and gradients as contiguous ones.
* The meta device: conversion and no-grad (shape) runs work; a reversible training forward
  raises a clear NotImplementedError (it used to fail in ``Tensor.item()``).
* pickle, deepcopy, torch.save and state_dict round trips keep outputs and gradients equal.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import archs
import pytest
import torch
from conftest import grad_err, max_rel_err, round_trips
from torch import nn

import fxmomentum
from fxmomentum import MomentumChain

TOL = 1e-6
pytestmark = pytest.mark.usefixtures("one_thread")


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def weighted(out: torch.Tensor) -> torch.Tensor:
    w = torch.sin(torch.arange(out.numel(), dtype=out.dtype) + 1).view_as(out)
    return (out * w).sum()


# -- an exception while backward recomputes a block --------------------------------------------
class Bomb(nn.Module):
    """Identity, unless armed: then it raises in its recomputation (grad enabled), either in
    its forward or in its backward. Kept whole by the converter (a leaf)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed: str | None = None  # None, "forward" or "backward"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed is None or not torch.is_grad_enabled():
            return x
        if self.armed == "forward":
            raise ArithmeticError("bomb in the recomputed forward")
        y = x * 1.0

        def explode(grad: torch.Tensor) -> torch.Tensor:
            raise ArithmeticError("bomb in the block's backward")

        y.register_hook(explode)
        return y


class Trap(nn.Module):
    """A conversion-friendly net whose blocks hold BatchNorm, dropout and a :class:`Bomb`."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), Bomb(),
                nn.Linear(8, 4),
            )
            for _ in range(depth)
        )  # fmt: skip
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def trap_models() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Trap().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    rev = fxmomentum.convert(model, 0.9, example_inputs=x, leaf_modules=[Bomb])
    bp = fxmomentum.convert(model, 0.9, example_inputs=x, leaf_modules=[Bomb], use_backprop=True)
    return rev, bp, x


def train_step(
    model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...], seed: int
) -> torch.Tensor:
    """Forward (seeded) and backward of a weighted sum; returns the output."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(*x) if isinstance(x, tuple) else model(x)
    weighted(out).backward()
    return out.detach()


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("block", [0, 1, 2])
def test_exception_in_backward_recomputation_leaves_the_model_usable(where: str, block: int):
    rev, bp, x = trap_models()
    reference = copy.deepcopy(rev)
    torch.manual_seed(1)
    out = rev(x)
    rev.blocks[block][4].armed = where
    with pytest.raises(ArithmeticError, match=f"bomb in the .*{where}"):
        weighted(out).backward()
    rev.blocks[block][4].armed = None
    rng_after = torch.get_rng_state()
    # The same forward, without backward: buffers and the RNG end where the failed step left.
    torch.manual_seed(1)
    reference(x)
    assert torch.equal(rng_after, torch.get_rng_state())
    for (name, a), b in zip(rev.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(a, b), name
    # The next steps are those of an untroubled model, and agree with plain backprop.
    torch.manual_seed(1)
    bp(x)  # bring its BatchNorm statistics to the same point
    for seed in (2, 3):
        out, ref_out, bp_out = (train_step(m, x, seed) for m in (rev, reference, bp))
        assert torch.equal(out, ref_out)
        assert all(torch.equal(a, b) for a, b in zip(grads(rev), grads(reference), strict=True))
        assert max_rel_err([out], [bp_out]) < TOL
        assert grad_err(grads(rev), grads(bp), 1e-6) < TOL
    for a, b in zip(rev.buffers(), bp.buffers(), strict=True):
        assert torch.equal(a, b) if not a.is_floating_point() else max_rel_err([a], [b]) < TOL


def test_exception_in_a_block_during_forward_leaves_the_model_usable():
    rev, bp, x = trap_models()

    def fail(module: nn.Module, args: tuple) -> None:
        raise ArithmeticError("bomb in the forward")

    hook = rev.blocks[1][5].register_forward_pre_hook(fail)
    with pytest.raises(ArithmeticError, match="bomb in the forward"):
        rev(x)
    hook.remove()
    for m in (rev, bp):
        for b in m.modules():
            if isinstance(b, nn.BatchNorm1d):
                b.reset_running_stats()
    for seed in (2, 3):
        out, bp_out = train_step(rev, x, seed), train_step(bp, x, seed)
        assert max_rel_err([out], [bp_out]) < TOL
        assert grad_err(grads(rev), grads(bp), 1e-6) < TOL


# -- converting twice --------------------------------------------------------------------------
def test_two_conversions_of_one_model_are_independent():
    torch.manual_seed(0)
    model, x = archs.MLPResNet(dim=8, depth=3).double(), torch.randn(4, 8, dtype=torch.float64)
    before = copy.deepcopy(model.state_dict())
    a = fxmomentum.convert(model, 0.9, example_inputs=x)
    b = fxmomentum.convert(model, 0.5, example_inputs=x)
    torch.optim.SGD(a.parameters(), lr=0.1).zero_grad()
    train_step(a, x, 0)
    torch.optim.SGD(a.parameters(), lr=0.1).step()
    for state in (model.state_dict(), b.state_dict()):
        assert all(torch.equal(state[k], v) for k, v in before.items())
    assert a.momentum_chain_0.gamma == 0.9 and b.momentum_chain_0.gamma == 0.5


def test_converting_a_converted_model_keeps_its_chains_and_training():
    torch.manual_seed(0)
    model, x = archs.MLPResNet(dim=8, depth=3).double(), torch.randn(4, 8, dtype=torch.float64)
    once = fxmomentum.convert(model, 0.5, example_inputs=x)
    twice, report = fxmomentum.convert(once, 0.9, example_inputs=x, return_report=True)
    assert report.chains == []
    assert [leaf.reason for leaf in report.leaves] == ["already a momentum chain (3 blocks)"]
    chains = [m for m in twice.modules() if isinstance(m, MomentumChain)]
    assert len(chains) == 1 and chains[0].gamma == 0.5 and not chains[0].use_backprop
    out, ref = train_step(twice, x, 0), train_step(once, x, 0)
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads(twice), grads(once), strict=True))


def test_converting_a_model_that_holds_momentum_nets_keeps_them_whole():
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 4)
            fs = [nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)]
            self.net = fxmomentum.MomentumNet(fs, gamma=0.9, use_backprop=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(self.inp(x))

    torch.manual_seed(0)
    outer, x = Outer().double(), torch.randn(2, 3, dtype=torch.float64)
    gm, report = fxmomentum.convert(outer, 0.9, example_inputs=x, return_report=True)
    assert report.chains == [] and [leaf.path for leaf in report.leaves] == ["net"]
    assert torch.equal(train_step(gm, x, 0), train_step(outer, x, 0))
    assert all(torch.equal(a, b) for a, b in zip(grads(gm), grads(outer), strict=True))


def test_converting_a_transformed_model_works():
    from test_compile import LayerList

    torch.manual_seed(0)
    transformed = fxmomentum.transform_to_momentumnet(
        LayerList().double(), sub_layers=["layers"], gamma=0.9, keep_first_layer=False
    )
    x = torch.randn(4, 5, dtype=torch.float64)
    gm = fxmomentum.convert(transformed, 0.5, example_inputs=x)
    assert torch.equal(train_step(gm, x, 0), train_step(transformed, x, 0))
    assert all(torch.equal(a, b) for a, b in zip(grads(gm), grads(transformed), strict=True))


# -- frozen parameters, inputs without grad ----------------------------------------------------
def mlp_pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = archs.MLPResNet(dim=8, depth=3).double(), torch.randn(4, 8, dtype=torch.float64)
    rev = fxmomentum.convert(model, 0.9, example_inputs=x)
    bp = fxmomentum.convert(model, 0.9, example_inputs=x, use_backprop=True)
    return rev, bp, x


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)


def chain_grad_fns(model: nn.Module, run: Callable[[], object]) -> list[str]:
    names: list[str] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: names.append(type(out.grad_fn).__name__))
        for m in model.modules()
        if isinstance(m, MomentumChain)
    ]
    run()
    for h in hooks:
        h.remove()
    return names


@pytest.mark.parametrize(
    ("frozen", "path"),
    [
        (("stem", "blocks"), "NoneType"),  # nothing before the head learns: plain, no graph
        (("blocks",), "_ReversibleBlockBackward"),  # the stem learns through the chain
        (("blocks.0", "blocks.2", "head"), "_ReversibleBlockBackward"),  # partly frozen
    ],
    ids=["backbone", "chain", "partial"],
)
def test_frozen_parameters(frozen: tuple[str, ...], path: str):
    rev, bp, x = mlp_pair()
    for m in (rev, bp):
        freeze(m, frozen)
    assert chain_grad_fns(rev, lambda: train_step(rev, x, 0)) == [path]
    train_step(bp, x, 0)
    for (name, a), b in zip(rev.named_parameters(), bp.parameters(), strict=True):
        assert (a.grad is None) == name.startswith(frozen), name
        if a.grad is not None:
            assert max_rel_err([a.grad], [b.grad]) < TOL, name


def test_inputs_with_and_without_grad():
    torch.manual_seed(0)
    rev, bp, x = mlp_pair()
    for m in (rev, bp):
        freeze(m, ("stem", "blocks", "norm", "head"))
    # Nothing requires grad: plain path, no graph.
    assert chain_grad_fns(rev, lambda: rev(x)) == ["NoneType"]
    # Only the input: the reversible engine gives its gradient.
    xs = [x.clone().requires_grad_() for _ in range(2)]
    for m, xi in zip((rev, bp), xs, strict=True):
        weighted(m(xi)).backward()
    assert max_rel_err([xs[0].grad], [xs[1].grad]) < TOL
    # A context tensor without grad next to an input with it (and the other way round).
    chain = fxmomentum.MomentumChain([archs.CondBlock(8, 3).double() for _ in range(3)], 0.9)
    ref = copy.deepcopy(chain)
    ref.use_backprop = True
    for x_grad, e_grad in ((True, False), (False, True)):
        results = []
        for m in (chain, ref):
            m.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(x_grad)
            e = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
            e.requires_grad_(e_grad)
            weighted(m(xi, e)).backward()
            results.append([xi.grad if x_grad else e.grad, *grads(m)])
        assert grad_err(*results, 1e-6) < TOL


def test_integer_chain_input_is_refused():
    chain = fxmomentum.MomentumChain([nn.Linear(4, 4)], 0.9)
    with pytest.raises(TypeError, match=r"needs a floating-point input, got torch\.int64"):
        chain(torch.ones(2, 4, dtype=torch.int64))


# -- dtypes and memory formats -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_train_as_accurately_as_backprop(dtype: torch.dtype):
    torch.manual_seed(0)
    model, x = archs.MLPResNet(dim=16, depth=4), torch.randn(4, 8)
    truth = fxmomentum.convert(model, 0.9, example_inputs=x, use_backprop=True).double()
    rev = fxmomentum.convert(model, 0.9, example_inputs=x).to(dtype)
    bp = fxmomentum.convert(model, 0.9, example_inputs=x, use_backprop=True).to(dtype)
    assert rev.momentum_chain_0.block_list()[0].get_submodule("blocks.0.0").weight.dtype == dtype

    def step(m: nn.Module, xi: torch.Tensor) -> list[torch.Tensor]:
        out = train_step(m, xi, 0)
        assert out.dtype == xi.dtype and torch.isfinite(out).all()
        return [out, *grads(m)]

    ref = step(truth, x.double())
    rev_err = max_rel_err(step(rev, x.to(dtype)), ref)
    bp_err = max_rel_err(step(bp, x.to(dtype)), ref)
    assert rev_err <= 2 * bp_err, (rev_err, bp_err)


def test_channels_last_models_and_inputs():
    from test_compile import ConvNet

    torch.manual_seed(0)
    net, x = ConvNet().double(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    bp = fxmomentum.convert(net, 0.9, example_inputs=x, use_backprop=True)
    ref = [train_step(bp, x, 0), *grads(bp)]
    for model_last, input_last in ((False, True), (True, False), (True, True)):
        rev = fxmomentum.convert(net, 0.9, example_inputs=x)
        if model_last:
            rev = rev.to(memory_format=torch.channels_last)
            assert rev.stem.weight.is_contiguous(memory_format=torch.channels_last)
        xi = x.to(memory_format=torch.channels_last) if input_last else x
        got = [train_step(rev, xi, 0), *grads(rev)]
        assert max_rel_err(got[:1], ref[:1]) < TOL
        assert grad_err(got[1:], ref[1:], 1e-6) < TOL


# -- the meta device ---------------------------------------------------------------------------
def test_meta_device_converts_and_runs_shapes_but_not_reversible_training():
    model = archs.MLPResNet(dim=8, depth=3).to("meta")
    x = torch.randn(2, 8, device="meta")
    gm, report = fxmomentum.convert(model, 0.9, example_inputs=x, return_report=True)
    assert [c.num_blocks for c in report.chains] == [3] and report.shapes_verified
    with torch.no_grad():
        out = gm(x)
    assert out.is_meta and out.shape == (2, 3)
    with pytest.raises(NotImplementedError, match="cannot run on the meta device"):
        gm(x)
    bp = fxmomentum.convert(model, 0.9, example_inputs=x, use_backprop=True)
    bp(x).sum().backward()
    assert bp.blocks[1][0].weight.grad.is_meta
    # Materialised afterwards, the converted model trains as usual.
    gm = gm.to_empty(device="cpu")
    for p in gm.parameters():
        nn.init.normal_(p, std=0.3)
    gm(torch.randn(2, 8)).sum().backward()
    assert torch.isfinite(gm.blocks[1][0].weight.grad).all()


# -- round trips -------------------------------------------------------------------------------
class Mixed(nn.Module):
    """Stem, a chain with BatchNorm, dropout, a context input and one tied block, head."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.stem = nn.Linear(3, dim)
        self.embed = nn.Linear(2, 2 * dim)
        self.fs = nn.ModuleList(
            nn.ModuleDict(
                {
                    "inp": nn.Linear(dim, 2 * dim),
                    "bn": nn.BatchNorm1d(2 * dim),
                    "drop": nn.Dropout(0.2),
                    "out": nn.Linear(2 * dim, dim),
                }
            )
            for _ in range(2)
        )
        self.head = nn.Linear(dim, 2)

    def f(self, i: int, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        m = self.fs[i]
        return m["out"](m["drop"](torch.tanh(m["bn"](m["inp"](x) + e))))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        e = self.embed(c)
        h = self.stem(x)
        for i in (0, 1, 0):  # block 2 reuses block 0's weights
            h = h + self.f(i, h, e)
        return self.head(h)


def test_pickle_deepcopy_save_and_state_dict_round_trips_keep_outputs():
    torch.manual_seed(0)
    x, c = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    model = Mixed().double()
    gm, report = fxmomentum.convert(model, 0.9, example_inputs=(x, c), return_report=True)
    assert [ch.num_blocks for ch in report.chains] == [3]
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    for seed in (0, 1):  # trained a little: BatchNorm statistics and weights moved
        train_step(gm, (x, c), seed)
        opt.step()

    reloaded = fxmomentum.convert(Mixed().double(), 0.9, example_inputs=(x, c))
    reloaded.load_state_dict(gm.state_dict())
    copies = {**round_trips(gm), "state_dict": reloaded}
    gm.eval()
    with torch.no_grad():
        expected = gm(x, c)
    gm.train()
    out, ref_grads = train_step(gm, (x, c), 5), grads(gm)
    for name, other in copies.items():
        assert list(other.state_dict()) == list(gm.state_dict()), name
        other.eval()
        with torch.no_grad():
            assert torch.equal(other(x, c), expected), name
        other.train()
        assert torch.equal(train_step(other, (x, c), 5), out), name
        assert all(torch.equal(a, b) for a, b in zip(grads(other), ref_grads, strict=True)), name


# -- converter issues found here ---------------------------------------------------------------
class Fussy(nn.Module):
    """Traceable only as a leaf (shape-dependent control flow); refuses small batches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 8:
            raise ValueError("needs a batch of at least 8")
        return x


class FussyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(4, 4), Fussy(), nn.Tanh()) for _ in range(3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def test_example_inputs_the_model_refuses_are_reported():
    report = fxmomentum.inspect(FussyNet(), torch.randn(2, 4))
    assert not report.shapes_verified
    assert any("shape propagation on example_inputs failed" in n for n in report.notes)


def test_failed_shape_propagation_matches_as_without_example_inputs():
    model = FussyNet()
    without = fxmomentum.inspect(model)
    assert [c.num_blocks for c in without.chains] == [3]
    # Shape propagation fails in the first block (Fussy refuses a batch of 2): the metadata
    # of the nodes that ran before it is dropped, and the graph is matched as without inputs.
    with_examples = fxmomentum.inspect(model, torch.randn(2, 4))
    assert [c.num_blocks for c in with_examples.chains] == [3]
    assert with_examples.as_dict()["chains"] == without.as_dict()["chains"]
    assert not with_examples.shapes_verified
    (note,) = with_examples.notes
    assert "at node `blocks_0_1`" in note and "needs a batch of at least 8" in note
    assert "structure only" in note
    gm = fxmomentum.convert(model, 0.0, example_inputs=torch.randn(2, 4), use_backprop=True)
    x = torch.randn(8, 4)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
