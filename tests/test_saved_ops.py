"""Operator outputs kept for the recomputation: the same bits, fewer operators run again.

A block whose forward keeps some outputs of its heavy operators (fxmomentum.engine.saved_ops)
must compute exactly what it computes without them, in every strategy that recomputes it, and
its recomputation must skip exactly the kept operators. The planner offers them as choices
whose outputs and gradients equal the conversion that keeps everything.
"""

from __future__ import annotations

import copy
import gc
import io
import weakref
from collections import Counter

import pytest
import torch
import torchvision
from conftest import grad_err, seeded_step
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fxmomentum
from fxmomentum.engine import MomentumChain
from fxmomentum.engine.saved_ops import SavedOps
from fxmomentum.surgery import budget as budget_module
from fxmomentum.surgery import regions
from fxmomentum.surgery.planner import Solution, evaluate

ADDMM = "aten.addmm.default"


class _Count(TorchDispatchMode):
    """Counts the operators dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _mlp_blocks(n: int = 4) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 8)) for _ in range(n)]


def _conv_blocks(n: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    blocks = [torchvision.models.resnet.BasicBlock(8, 8) for _ in range(n)]
    for b in blocks:
        nn.init.uniform_(b.bn2.weight, 0.5, 1.5)
    return blocks


def _encoder_blocks(n: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, norm_first=True)
    return [copy.deepcopy(layer) for _ in range(n)]


def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    causal = nn.Transformer.generate_square_subsequent_mask(6)  # float, -inf above
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    return causal, padding


#: (blocks, residual, input, extra arguments, picks per block)
CASES = {
    "mlp": (_mlp_blocks, True, lambda: torch.randn(16, 8), (), {(ADDMM, 0)}),
    "resnet": (
        _conv_blocks,
        False,
        lambda: torch.randn(2, 8, 12, 12),
        (),
        {("aten.convolution.default", 0), ("aten.convolution.default", 1)},
    ),
    "encoder": (
        _encoder_blocks,
        False,
        lambda: torch.randn(2, 6, 16),
        _masks(),
        {("aten.mm.default", 0), ("aten.bmm.default", 0), ("aten.bmm.default", 1),
         (ADDMM, 0), (ADDMM, 1), (ADDMM, 2)},
    ),
}  # fmt: skip


def _train_step(chain: MomentumChain, x: torch.Tensor, args: tuple) -> list[torch.Tensor]:
    chain.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(3)
    y = chain(x, *args)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    buffers = [b.clone() for b in chain.buffers()]
    return [y.detach(), x.grad, *(p.grad for p in chain.parameters()), *buffers]


@pytest.mark.parametrize("strategy", ["reversible", "recompute"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kept_operator_outputs_give_the_same_bits(case, strategy):
    build, residual, make_input, args, picks = CASES[case]
    blocks = build()
    x = make_input()
    saved = [SavedOps(frozenset(picks))] * len(blocks)
    results = []
    for saved_ops in (None, saved):
        chain = MomentumChain(copy.deepcopy(blocks), 0.9, residual=residual, strategy=strategy,
                              saved_ops=saved_ops).train()  # fmt: skip
        results.append(_train_step(chain, x, args))
    without, with_saved = results
    assert all(torch.equal(a, b) for a, b in zip(with_saved, without, strict=True))
    assert "saved_ops=" in repr(chain)


@pytest.mark.parametrize("strategy", ["reversible", "recompute"])
def test_the_recomputation_skips_exactly_the_kept_operators(strategy):
    blocks = _mlp_blocks(4)
    x = torch.randn(16, 8, requires_grad=True)
    counts = []
    for saved_ops in (None, [SavedOps(frozenset({(ADDMM, 0)}))] * 4):
        chain = MomentumChain(blocks, 0.9, strategy=strategy, saved_ops=saved_ops)
        y = chain(x)
        with _Count() as backward:
            y.sum().backward()
        counts.append(backward.calls[ADDMM])
    # Each block's two Linear layers are one addmm each. The reversible recomputation needs the
    # block's output, so it runs both, or only the second with the first's output kept;
    # checkpoint's recomputation stops once it has what backward needs (the second Linear's
    # input), so it runs the first, or nothing.
    assert counts == ([8, 4] if strategy == "reversible" else [4, 0])


def _alive_after(forward, x: torch.Tensor) -> tuple[int, object]:
    """How many storages made by ``forward(x)`` are alive once it returned (its output aside),
    and the output."""
    made: list[weakref.ref] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor):
                    made.append(weakref.ref(t.untyped_storage()))
            return out

    with Record():
        out = forward(x)
    gc.collect()
    alive = {s.data_ptr() for s in (r() for r in made) if s is not None}
    return len(alive - {out.untyped_storage().data_ptr()}), out


def test_kept_outputs_are_held_until_their_block_goes_backward():
    blocks = _mlp_blocks(4)
    x = torch.randn(16, 8, requires_grad=True)
    plain = MomentumChain(blocks, 0.9, strategy="recompute")
    saving = MomentumChain(blocks, 0.9, strategy="recompute",
                           saved_ops=[SavedOps(frozenset({(ADDMM, 0)}))] * 4)  # fmt: skip
    without, _ = _alive_after(plain, x)
    held, y = _alive_after(saving, x)
    assert held == without + 4  # one hidden activation per block
    y.sum().backward()
    del y
    gc.collect()
    assert _alive_after(lambda h: h * 1, x)[0] == 0


def test_only_heavy_operators_can_be_kept():
    with pytest.raises(ValueError, match="operators whose outputs can be saved"):
        SavedOps(frozenset({("aten.tanh.default", 0)}))
    with pytest.raises(ValueError, match="3 saved_ops for 4 blocks"):
        MomentumChain(_mlp_blocks(4), 0.9, saved_ops=[None] * 3)


# -- the planner ---------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        block = torchvision.models.resnet.BasicBlock
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(*[block(8, 8) for _ in range(3)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _encoder_model() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, norm_first=True)
    return nn.Sequential(nn.Linear(8, 16), *[copy.deepcopy(layer) for _ in range(3)])


def _force_plan(monkeypatch, rank) -> None:
    """Make the planner take, at every position, the one-position choice that
    ``rank(choice, region)`` ranks highest (None: not a candidate), else keep: a plan that does
    not depend on timings."""

    def solve(self, budget):
        where, choices = self.sequence.where, []
        for position, options in enumerate(self.sequence.steps):
            single = [c for c in options if c.next == position + 1]
            ranked = [(r, -i, c) for i, c in enumerate(single)
                      if (r := rank(c, where[c.region])) is not None]  # fmt: skip
            keep = next(c for c in single if c.strategy == "keep")
            choices.append(max(ranked, key=lambda r: r[:2])[2] if ranked else keep)
        found = evaluate(choices, self.sequence.sizes)
        return Solution(choices, found.peak, found.seconds)

    monkeypatch.setattr(budget_module.MemoryPlanner, "solve", solve)


def _most_saved(strategy: str):
    """Rank: the choices of ``strategy`` by how many operator outputs they keep."""
    return lambda c, region: len(region.picks) if region.picks and c.strategy == strategy else None


@pytest.mark.parametrize("strategy", ["reversible", "recompute"])
@pytest.mark.parametrize("model", ["resnet", "encoder"])
def test_a_plan_keeping_operator_outputs_changes_costs_not_gradients(model, strategy, monkeypatch):
    torch.manual_seed(0)
    if model == "resnet":
        net, x = _Net().double(), torch.randn(2, 3, 16, 16, dtype=torch.float64)
    else:
        net, x = _encoder_model().double(), torch.randn(2, 5, 8, dtype=torch.float64)
    # Offered whatever the operators' timings: the choice is forced below.
    monkeypatch.setattr(regions, "DISPATCH_SECONDS", -1.0)
    _force_plan(monkeypatch, _most_saved(strategy))
    planned, report = fxmomentum.convert(net, 0.9, example_inputs=x, memory_budget=0.5,
                                         return_report=True)  # fmt: skip
    reference = fxmomentum.convert(net, 0.9, example_inputs=x, use_backprop=True)
    chains = [m for m in planned.modules() if isinstance(m, MomentumChain)]
    assert [c.strategy for c in chains] == [strategy]
    kept = sum(len(s) for s in chains[0].saved_ops if s)
    heavy_per_block = 2 if model == "resnet" else 3  # convs; in_proj, out_proj, attention or FF
    assert kept >= heavy_per_block * len(chains[0].residual) // 2
    region = next(r for r in report.plan.regions if r.kind == "chain")
    assert region.saved_outputs == kept
    assert f"keeps {kept} op outputs" in str(report)
    expected, got = seeded_step(reference.train(), x), seeded_step(planned.train(), x)
    assert grad_err(got, expected) < 1e-6  # reversible chains: exact to their grid


# -- recomputation in segments -------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.0, 0.9])
def test_segments_of_blocks_keep_one_state_per_segment(gamma):
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(6)]
    x = torch.randn(4, 16, requires_grad=True)
    reference = MomentumChain(blocks, gamma, strategy="keep")
    expected = torch.autograd.grad(reference(x).square().sum(), [x, *reference.parameters()])
    kept = {}
    for span in (1, 2, 3):
        chain = MomentumChain(blocks, gamma, strategy="recompute", recompute_span=span)
        kept[span] = _alive_after(chain, x)[0]
        got = torch.autograd.grad(chain(x).square().sum(), [x, *chain.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    # x given, then each block's input x (its update saves nothing); in segments, each
    # segment's input x and, at gamma > 0, its v (none before the first).
    assert kept[1] == 5
    assert kept[2] == 2 * (2 if gamma else 1)
    assert kept[3] == 1 * (2 if gamma else 1)


def test_a_recompute_span_is_checked():
    with pytest.raises(ValueError, match="recompute_span must be a positive int"):
        MomentumChain(_mlp_blocks(2), 0.9, strategy="recompute", recompute_span=0)
    with pytest.raises(ValueError, match="1 with saved_ops"):
        MomentumChain(_mlp_blocks(2), 0.9, strategy="recompute", recompute_span=2,
                      saved_ops=[SavedOps(frozenset({(ADDMM, 0)}))] * 2)  # fmt: skip


def test_a_plan_recomputing_layers_as_segments_is_the_original_at_gamma_zero(monkeypatch):
    net, x = _encoder_model(), torch.randn(2, 5, 8)
    _force_plan(monkeypatch, lambda c, region: 1 if region.span == 2 else None)
    planned, report = fxmomentum.convert(net, 0.0, example_inputs=x, memory_budget=0.5,
                                         return_report=True)  # fmt: skip
    chain = next(m for m in planned.modules() if isinstance(m, MomentumChain))
    assert (chain.strategy, chain.recompute_span, len(chain.residual)) == ("recompute", 2, 6)
    assert "recompute (2 blocks a segment)" in str(report)
    expected, got = seeded_step(net.train(), x), seeded_step(planned.train(), x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_chain_with_options_copies_and_pickles():
    x = torch.randn(16, 8)
    for options in ({"saved_ops": [SavedOps(frozenset({(ADDMM, 0)}))] * 4},
                    {"recompute_span": 2}):  # fmt: skip
        chain = MomentumChain(_mlp_blocks(4), 0.9, strategy="recompute", **options)
        buffer = io.BytesIO()
        torch.save(chain, buffer)
        buffer.seek(0)
        expected = _train_step(chain, x, ())
        for other in (copy.deepcopy(chain), torch.load(buffer, weights_only=False)):
            assert (other.saved_ops, other.recompute_span) == (
                chain.saved_ops,
                chain.recompute_span,
            )
            got = _train_step(other, x, ())
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


class _WritesInPlace(nn.Module):
    """A block that writes its first Linear's output in place (ReLU(inplace=True) on it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu_(self.a(x)))


@pytest.mark.parametrize("strategy", ["reversible", "recompute"])
def test_an_output_written_in_place_later_is_computed_again(strategy):
    torch.manual_seed(0)
    blocks = [_WritesInPlace() for _ in range(3)]
    x = torch.randn(16, 8)
    results = []
    for saved_ops in (None, [SavedOps(frozenset({(ADDMM, 0)}))] * 3):
        chain = MomentumChain(copy.deepcopy(blocks), 0.9, strategy=strategy, saved_ops=saved_ops)
        results.append(_train_step(chain, x, ()))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_the_planner_does_not_offer_outputs_written_in_place_later(monkeypatch):
    from fxmomentum.surgery.conversion import prepare
    from fxmomentum.surgery.estimate import measure_graph
    from fxmomentum.surgery.options import ConvertOptions

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), *[_Residual(_WritesInPlace()) for _ in range(3)])
    x = torch.randn(16, 8)
    unit = prepare(net, ConvertOptions(gamma=0.9), x).units[0]
    measured = measure_graph(unit.capture.graph, unit.capture.graph_inputs(), timed=True)
    calls = [c for per_node in measured.heavy_ops.values() for c in per_node]
    assert [c.written_later for c in calls] == [False] + [True, False] * 3
    chain = unit.chosen[0]
    monkeypatch.setattr(regions, "DISPATCH_SECONDS", -1.0)  # offered whatever the timings
    costs = regions.chain_costs(measured, chain, 0.9, 0, ["recompute", "reversible"], -1)
    picked = {pick for v in costs.variants for pick in v.picks}
    assert picked == {(t, ADDMM, 1) for t in range(3)}  # never the first Linear's output


class _Residual(nn.Module):
    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


@pytest.mark.parametrize("strategy", ["reversible", "recompute"])
def test_gpt2_with_its_default_dropouts_keeps_operator_outputs_exactly(strategy, monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=50,
                                     n_positions=16, use_cache=False)  # fmt: skip
    net = transformers.GPT2Model(config).double().train()
    ids = torch.randint(0, 50, (2, 8))
    monkeypatch.setattr(regions, "DISPATCH_SECONDS", -1.0)
    _force_plan(monkeypatch, _most_saved(strategy))
    planned = fxmomentum.convert(net, 0.9, example_inputs=(ids,), memory_budget=0.5)
    reference = fxmomentum.convert(net, 0.9, example_inputs=(ids,), use_backprop=True)
    chains = [m for m in planned.modules() if isinstance(m, MomentumChain)]
    assert sum(len(s) for c in chains for s in (c.saved_ops or []) if s) > 0

    def step(model):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # attention, residual and embedding dropout: 0.1 by default
        out = model(ids).last_hidden_state
        out.square().mean().backward()
        return [out.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    assert grad_err(step(planned.train()), step(reference.train())) < 1e-6


def test_a_graph_whose_operators_cannot_be_noted_is_still_measured(monkeypatch):
    from fxmomentum.surgery import estimate

    def refuse(self, func, types, args=(), kwargs=None):
        raise RuntimeError("no Python dispatch here")

    monkeypatch.setattr(estimate._OperatorCalls, "__torch_dispatch__", refuse)
    net = nn.Sequential(nn.Linear(8, 8), *[_Residual(_mlp_blocks(1)[0]) for _ in range(3)])
    x = torch.randn(16, 8)
    report = fxmomentum.inspect(net, x, gamma=0.9, memory_budget=0.0)
    assert report.plan is not None and report.chains[0].saved_bytes > 0
    assert all(r.saved_outputs == 0 for r in report.plan.regions)  # none offered


def test_a_checkpointed_chain_is_not_offered_outputs_its_recomputation_never_reaches(monkeypatch):
    from fxmomentum.surgery.conversion import prepare
    from fxmomentum.surgery.estimate import measure_graph
    from fxmomentum.surgery.options import ConvertOptions

    net = nn.Sequential(nn.Linear(8, 8), *[_Residual(b) for b in _mlp_blocks(3)])
    x = torch.randn(16, 8)
    unit = prepare(net, ConvertOptions(gamma=0.9), x).units[0]
    measured = measure_graph(unit.capture.graph, unit.capture.graph_inputs(), timed=True)
    monkeypatch.setattr(regions, "DISPATCH_SECONDS", -1.0)  # offered whatever the timings
    costs = regions.chain_costs(measured, unit.chosen[0], 0.9, 0, ["recompute", "reversible"], -1)
    offered = {s: {p for v in costs.variants if v.strategy == s for p in v.picks}
               for s in ("recompute", "reversible")}  # fmt: skip
    # Tanh saves its output, computed from the first Linear's: checkpoint's recomputation
    # runs that Linear, and stops before the second, whose output no saved tensor needs.
    assert offered["recompute"] == {(t, ADDMM, 0) for t in range(3)}
    assert offered["reversible"] == {(t, ADDMM, k) for t in range(3) for k in (0, 1)}
