"""Converted models under torch.compile (Inductor, CPU): inference and training match eager.

A reversible chain is not traced: :func:`fxmomentum.engine.reversible_chain` (and
``run_block``, which ``transform_to_momentumnet`` models call) are ``torch.compiler.disable``d,
so each chain is one graph break and runs eagerly, and the rest of the model is compiled.
Before that, Dynamo traced into the chain's autograd function and ran its blocks compiled in
forward, while backward (called by autograd outside the compiled region) recomputed them
eagerly; the two round differently, and the engine's checksum stopped every training step
("could not rebuild the input of blocks.1 bit for bit"). Inference (no grad) and
``use_backprop=True`` chains take the plain path, which compiles whole (``fullgraph=True``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import archs
import pytest
import torch
from conftest import grad_err, max_rel_err
from torch import nn

import fxmomentum

TOL = 1e-4


class ConvNet(nn.Module):
    """Conv stem, two ``relu(x + f(x))`` blocks with BatchNorm (one chain), pooling, head."""

    def __init__(self, ch: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, padding=1)
        self.blocks = nn.Sequential(archs.ResBlock(ch), archs.ResBlock(ch))
        self.head = nn.Linear(ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class LayerList(nn.Module):
    """``x = layer(x)`` over a list of residual layers (for transform_to_momentumnet)."""

    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(5, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim)) for _ in range(depth)
        )
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = archs.MLPResNet(dim=16, depth=3, p=0.1)  # dropout inside the chain only
    x = torch.randn(4, 8)
    return fxmomentum.convert(model, 0.9, example_inputs=x), x


def conv() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    return fxmomentum.convert(ConvNet(), 0.9, example_inputs=x), x


def planned() -> tuple[nn.Module, torch.Tensor]:
    """The least-memory plan of the original model: every region recomputed (checkpointed),
    which compiles whole (the partitioner recomputes; buffers are updated once)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    return fxmomentum.convert(ConvNet(), 0.0, example_inputs=x, memory_budget=0.0), x


def transformed() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = fxmomentum.transform_to_momentumnet(
        LayerList(), sub_layers=["layers"], gamma=0.9, use_backprop=False, keep_first_layer=False
    )
    return model, torch.randn(4, 5)


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 2) -> tuple[list, list]:
    """SGD steps with a fixed seed per step; returns the outputs and the last gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    outs = []
    for step in range(steps):
        opt.zero_grad()
        torch.manual_seed(10 + step)
        out = model(x)
        w = torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
        (out * w).sum().backward()
        opt.step()
        outs.append(out.detach())
    return outs, [p.grad for p in model.parameters()]


def states(model: nn.Module) -> list[torch.Tensor]:
    return [v for v in model.state_dict().values() if v.is_floating_point()]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("make", [mlp, conv], ids=["mlp", "conv"])
def test_inference_compiled_equals_eager(make: Callable):
    model, x = make()
    model.eval()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    with torch.no_grad():
        assert max_rel_err([compiled(x)], [model(x)]) < TOL
        assert max_rel_err([compiled(2 * x)], [model(2 * x)]) < TOL


@pytest.mark.parametrize(
    "make", [mlp, conv, planned, transformed], ids=["mlp", "conv", "planned", "transform"]
)
def test_training_compiled_equals_eager(make: Callable):
    model, x = make()
    eager = copy.deepcopy(model)
    target = copy.deepcopy(model)
    compiled = torch.compile(target)
    outs, grads = train_steps(compiled, x)
    ref_outs, ref_grads = train_steps(eager, x)
    assert max_rel_err(outs, ref_outs) < TOL
    # A conv bias before BatchNorm has a zero gradient up to round-off, which compiled and
    # eager code round differently, by up to about 1e-7 of the largest gradient (on one
    # thread; less on two): a tensor under 1e-2 of the largest is held to an absolute 1e-6 of
    # the largest, float32 round-off.
    assert grad_err(grads, ref_grads, floor=1e-2) < TOL
    assert max_rel_err(states(target), states(eager)) < TOL  # parameters and running stats
    if make in (conv, planned):
        assert target.blocks[0].bn.num_batches_tracked.item() == 2  # once per step


def test_each_reversible_chain_is_one_graph_break_and_nothing_recompiles():
    model, x = mlp()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 1
    assert "a reversible momentum chain runs eagerly" in str(explained.break_reasons[0].reason)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    train_steps(compiled, x, steps=1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        train_steps(compiled, x + 1, steps=2)


def test_fullgraph_training_needs_use_backprop():
    torch.manual_seed(0)
    model, x = archs.MLPResNet(dim=16, depth=3), torch.randn(4, 8)
    backprop = fxmomentum.convert(model, 0.9, example_inputs=x, use_backprop=True)
    eager = copy.deepcopy(backprop)
    outs, grads = train_steps(torch.compile(backprop, fullgraph=True), x)
    ref_outs, ref_grads = train_steps(eager, x)
    assert max_rel_err(outs + grads, ref_outs + ref_grads) < TOL
    reversible = fxmomentum.convert(model, 0.9, example_inputs=x)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="reversible momentum chain runs"):
        torch.compile(reversible, fullgraph=True)(x)


# -- the engine's own kernels: a progress hook, torch's CUDA-home record kept quiet ---------------
def test_first_compile_is_announced_once_and_cuda_home_record_dropped(monkeypatch):
    import logging

    from fxmomentum.engine import kernels

    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    def fake_compile(fn, fullgraph, options=None):
        def compiled(*args):
            # What torch logs when its compiler imports cpp_extension on a CUDA-less machine.
            cpp_log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
            cpp_log.warning("another record")
            return fn(*args)

        return compiled

    calls: list[int] = []
    monkeypatch.setattr(kernels, "_announced", False)
    monkeypatch.setattr(kernels, "on_first_compile", lambda: calls.append(1))
    monkeypatch.setattr(kernels.torch, "compile", fake_compile)
    # torch.compile serves CUDA tensors (CPU has the native kernels): pretend these are.
    monkeypatch.setattr(kernels._Kernel, "_use_compiled", lambda self, t: True)
    monkeypatch.setenv("FXMOMENTUM_COMPILE", "1")
    handler = Keep()
    cpp_log.addHandler(handler)
    try:
        big = torch.ones(kernels.COMPILE_MIN_NUMEL)
        for fn in (lambda t: t + 1, lambda t: t * 2):
            kernel = kernels._Kernel(fn)
            assert torch.equal(kernel(big), fn(big))
            kernel(big)  # compiled already: no filter, no record
        cpp_log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "elsewhere")
    finally:
        cpp_log.removeHandler(handler)
    assert calls == [1]  # once per process
    # Dropped only while compiling; other records and other times pass.
    assert seen == ["another record", "No CUDA runtime is found, using CUDA_HOME='/usr/local/cuda'",
                    "another record", "another record",
                    "No CUDA runtime is found, using CUDA_HOME='/usr/local/cuda'", "another record",
                    "No CUDA runtime is found, using CUDA_HOME='elsewhere'"]  # fmt: skip
