"""Property-based tests of the converter and the engine on random residual architectures.

Hypothesis draws a :class:`Plan`: segments of residual blocks, pure ``x + f(x)`` or
generalized ``relu(x + f(x))`` / ``layer_norm(x + f(x))``, separated by a tap (the state is
also read by a head of its own, so the chain must end there) or a breaker (a non-residual
layer); ``f`` may add a context tensor computed outside the chain, hold BatchNorm and
dropout, or be the module of an earlier block (tied weights). For each model:

* ``fxmomentum.inspect`` finds one chain per segment, with the segment's number of blocks
  (and ``convert`` reports the same);
* ``gamma = 0`` with ``use_backprop=True`` gives exactly the original outputs (same operations,
  same random numbers, in train mode);
* reversible gradients (``gamma`` drawn from 0.9, 0.5, 0.99, 1e-3) equal plain backprop's in
  float64 (1e-6), for the parameters and both inputs, and the BatchNorm statistics agree
  after the step.

Derandomized, with no example database, so CI runs the same 200 examples every time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from conftest import grad_err
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import fxmomentum

TOL = 1e-6
pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Body:
    """What ``f`` holds: BatchNorm, dropout, a context tensor added inside it."""

    bn: bool = False
    dropout: bool = False
    context: bool = False


@dataclass(frozen=True)
class Blk:
    """A block: ``kind`` is "pure", "generalized" (relu after the add) or "norm" (a LayerNorm
    after the add); ``tie`` reuses block ``tie``'s ``f``."""

    kind: str = "pure"
    body: Body = Body()
    tie: int | None = None


@dataclass(frozen=True)
class Plan:
    """A model: segments of blocks; ``separators[i]`` ("tap" or "breaker") follows segment i.

    ``tap_first`` also reads the first chain's input outside the chain (which must not end it).
    """

    width: int
    batch: int
    segments: tuple[tuple[Blk, ...], ...]
    separators: tuple[str, ...]
    tap_first: bool = False
    gamma: float = 0.9

    def blocks(self) -> list[Blk]:
        return [b for seg in self.segments for b in seg]


class Residual(nn.Module):
    """``f(x, e) = lin2(drop(tanh(bn(lin1(x) [+ e]))))``."""

    def __init__(self, width: int, body: Body) -> None:
        super().__init__()
        self.lin1 = nn.Linear(width, 2 * width)
        self.bn = nn.BatchNorm1d(2 * width) if body.bn else nn.Identity()
        self.drop = nn.Dropout(0.3) if body.dropout else nn.Identity()
        self.lin2 = nn.Linear(2 * width, width)
        self.context = body.context

    def forward(self, x: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        h = self.lin1(x)
        if self.context:
            h = h + e
        return self.lin2(self.drop(torch.tanh(self.bn(h))))


class Net(nn.Module):
    """The model a :class:`Plan` describes; ``forward(x, c)`` with ``c`` the context input."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        w = plan.width
        self.plan = plan
        self.stem = nn.Linear(3, w)
        self.embed = nn.Linear(2, 2 * w)
        self.fs = nn.ModuleList()
        self.which: list[int] = []  # block -> index into fs
        for blk in plan.blocks():
            if blk.tie is None:
                self.which.append(len(self.fs))
                self.fs.append(Residual(w, blk.body))
            else:
                self.which.append(self.which[blk.tie])
        self.breakers = nn.ModuleList(nn.Linear(w, w) for s in plan.separators if s == "breaker")
        taps = plan.separators.count("tap") + plan.tap_first
        self.tap_heads = nn.ModuleList(nn.Linear(w, 2) for _ in range(taps))
        self.norms = nn.ModuleList(nn.LayerNorm(w) for _ in plan.blocks())
        self.head = nn.Linear(w, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        e = self.embed(c)
        h = self.stem(x)
        taps = [h] if self.plan.tap_first else []
        breakers = iter(self.breakers)
        t = 0
        for s, segment in enumerate(self.plan.segments):
            if s > 0:
                if self.plan.separators[s - 1] == "tap":
                    taps.append(h)
                else:
                    h = torch.tanh(next(breakers)(h))
            for blk in segment:
                y = h + self.fs[self.which[t]](h, e)
                if blk.kind == "generalized":
                    y = torch.relu(y)
                elif blk.kind == "norm":
                    y = self.norms[t](y)
                h = y
                t += 1
        out = self.head(h)
        for tap, head in zip(taps, self.tap_heads, strict=True):
            out = out + head(tap)
        return out


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """Random plans: 1-3 segments of 1-4 blocks, width 2-4, batch 3-4."""
    n_segments = draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, 4)) for _ in range(n_segments)]
    segments, index = [], 0
    for length in lengths:
        seg = []
        for _ in range(length):
            tie = None
            if index and draw(st.integers(0, 4)) == 0:
                tie = draw(st.integers(0, index - 1))
            body = Body(draw(st.booleans()), draw(st.booleans()), draw(st.booleans()))
            kind = draw(st.sampled_from(["pure", "generalized", "norm"]))
            seg.append(Blk(kind, body, tie))
            index += 1
        segments.append(tuple(seg))
    separators = tuple(draw(st.sampled_from(["tap", "breaker"])) for _ in range(n_segments - 1))
    return Plan(
        width=draw(st.integers(2, 4)),
        batch=draw(st.integers(3, 4)),
        segments=tuple(segments),
        separators=separators,
        tap_first=draw(st.booleans()),
        gamma=draw(st.sampled_from([0.9, 0.5, 0.99, 1e-3])),
    )


def inputs(plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(plan.batch, 3, generator=g, dtype=torch.float64)
    c = torch.randn(plan.batch, 2, generator=g, dtype=torch.float64)
    return x, c


def run(model: nn.Module, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Output and gradients (parameters, x, c) of one weighted-sum step, seeded."""
    x, c = x.clone().requires_grad_(), c.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    out = model(x, c)
    w = torch.sin(torch.arange(out.numel(), dtype=out.dtype) + 1).view_as(out)
    (out * w).sum().backward()
    leaves = [*model.parameters(), x, c]  # c reaches no block when none reads the context
    return out.detach(), [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def check(plan: Plan) -> None:
    torch.manual_seed(0)
    model = Net(plan).double().train()
    x, c = inputs(plan)
    expected = [len(seg) for seg in plan.segments]

    report = fxmomentum.inspect(model, (x, c))
    assert [ch.num_blocks for ch in report.chains] == expected, str(report)
    assert all(ch.converted for ch in report.chains), str(report)

    # gamma = 0 with use_backprop: the original model, bit for bit.
    plain = fxmomentum.convert(model, 0.0, example_inputs=(x, c), use_backprop=True)
    original = copy.deepcopy(model)
    out, _ = run(plain, x, c)
    ref, _ = run(original, x, c)
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(plain.buffers(), original.buffers(), strict=True))

    # Reversible against backprop.
    g = plan.gamma
    reversible, rep = fxmomentum.convert(model, g, example_inputs=(x, c), return_report=True)
    assert [ch.num_blocks for ch in rep.chains] == expected
    backprop = fxmomentum.convert(model, g, example_inputs=(x, c), use_backprop=True)
    out_rev, g_rev = run(reversible, x, c)
    out_bp, g_bp = run(backprop, x, c)
    assert (out_rev - out_bp).norm() <= TOL * out_bp.norm()
    assert grad_err(g_rev, g_bp, 1e-6) < TOL
    for a, b in zip(reversible.buffers(), backprop.buffers(), strict=True):
        assert torch.equal(a, b) if not a.is_floating_point() else (a - b).norm() <= TOL * b.norm()


TIED_ACROSS_TAP = Plan(
    width=3,
    batch=3,
    segments=(
        (Blk("generalized", Body(bn=True, context=True)), Blk("pure", Body(dropout=True))),
        (Blk("pure", tie=0), Blk("generalized", tie=1)),
    ),
    separators=("tap",),
    tap_first=True,
)
EVERYTHING_IN_ONE_CHAIN = Plan(
    width=2,
    batch=4,
    segments=((Blk("pure", Body(True, True, True)), Blk("generalized", tie=0), Blk("pure")),),
    separators=(),
)
BREAKERS_AND_TAPS = Plan(
    width=4,
    batch=3,
    segments=(
        (Blk("generalized"),),
        (Blk("pure", Body(context=True)),),
        (Blk("generalized", Body(bn=True)), Blk("norm", tie=0)),
    ),
    separators=("breaker", "tap"),
    gamma=1e-3,
)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@example(TIED_ACROSS_TAP)
@example(EVERYTHING_IN_ONE_CHAIN)
@example(BREAKERS_AND_TAPS)
@given(plans())
def test_random_residual_architectures(plan: Plan) -> None:
    check(plan)
