"""The memory planner: exact within its cost model, and plans that change costs, not results.

Gradients of planned models are compared in float64 with the conversion that keeps everything
(use_backprop=True, the same gamma); the figures of the plans (memory and time against the
original and checkpointing) are measured in benchmarks/, not here.
"""

from __future__ import annotations

import copy
import gc
import io
import itertools
import random
import weakref

import pytest
import torch
import torchvision
from conftest import grad_err, rel_err, seeded_step
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

import fxmomentum
from fxmomentum.engine import MomentumChain
from fxmomentum.surgery.planner import Choice, evaluate, solve
from fxmomentum.surgery.regions import Cost
from fxmomentum.surgery.segments import RecomputedSegment

BUDGETS = [0.0, 0.5, 1.0]


# -- the solver --------------------------------------------------------------------------------
def _random_steps(rng: random.Random, length: int) -> list[list[Choice]]:
    """A random sequence of regions: each step offers choices of span 1 or 2, with costs and
    storages that neighbours may share."""
    steps: list[list[Choice]] = []
    for position in range(length):
        choices = []
        for k in range(rng.randint(1, 3)):
            span = 1 if position == length - 1 else rng.choice([1, 1, 2])
            storages = frozenset(rng.sample(range(6), rng.randint(0, 2)))
            cost = Cost(rng.randint(0, 50), rng.randint(0, 50), rng.random(), storages)
            choices.append(Choice(f"{position}:{k}", "keep", cost, position + span))
        steps.append(choices)
    return steps


def _all_plans(steps: list[list[Choice]], position: int = 0):
    if position == len(steps):
        yield []
        return
    for choice in steps[position]:
        for rest in _all_plans(steps, choice.next):
            yield [choice, *rest]


@pytest.mark.parametrize("seed", range(40))
def test_the_solver_finds_the_best_plan_that_enumeration_finds(seed):
    rng = random.Random(seed)
    steps = _random_steps(rng, rng.randint(1, 6))
    sizes = {k: rng.randint(0, 20) for k in range(6)}
    plans = [evaluate(p, sizes) for p in _all_plans(steps)]
    least = min(p.peak for p in plans)
    found = solve(steps, None, sizes)
    assert found.peak == least
    assert found.seconds == pytest.approx(min(p.seconds for p in plans if p.peak == least))
    for budget in sorted({p.peak for p in plans}):
        found = solve(steps, budget, sizes)
        fastest = min(p.seconds for p in plans if p.peak <= budget)
        assert found.peak <= budget and found.seconds == pytest.approx(fastest)
        assert evaluate(found.choices, sizes).peak == found.peak


# -- planned models compute what the conversion computes -----------------------------------
class SmallResNet(nn.Module):
    """A stem, chains of torchvision BasicBlocks around a projection block, a head: narrow,
    so that activations, not weights, fill a training step's memory."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        block = torchvision.models.resnet.BasicBlock
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU())  # fmt: skip
        self.stage1 = nn.Sequential(*[block(width, width) for _ in range(3)])
        down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2), nn.BatchNorm2d(2 * width))
        self.stage2 = nn.Sequential(block(width, 2 * width, stride=2, downsample=down),
                                    *[block(2 * width, 2 * width) for _ in range(2)])  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(self.stem(x))))


def _resnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallResNet().double()
    for m in model.modules():  # BatchNorm weights that are not all equal: blocks differ
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    return model, torch.randn(4, 3, 32, 32, dtype=torch.float64)


def _encoder() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, norm_first=True)
    model = nn.Sequential(nn.Linear(8, 16), *[copy.deepcopy(layer) for _ in range(3)])
    return model.double(), torch.randn(2, 5, 8, dtype=torch.float64)


@pytest.mark.parametrize("build", [_resnet, _encoder], ids=["resnet18", "encoder"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_a_plan_changes_costs_not_outputs_or_gradients(build, budget):
    model, x = build()
    reference = fxmomentum.convert(model, 0.9, example_inputs=x, use_backprop=True).train()
    planned, report = fxmomentum.convert(
        model, 0.9, example_inputs=x, memory_budget=budget, return_report=True
    )
    planned.train()
    assert report.plan is not None and report.plan.regions
    expected, got = seeded_step(reference, x), seeded_step(planned, x)
    assert grad_err(got, expected) < 1e-6  # reversible chains: exact to their grid
    if budget == 0.0:
        strategies = {r.strategy for r in report.plan.regions}
        assert strategies & {"recompute", "reversible"}


def _state_tensors_kept(forward, x: torch.Tensor) -> int:
    """How many tensors shaped like ``x`` that ``forward(x)`` made are still held (by the
    autograd graph or a checkpoint) once it has returned, besides its output."""
    made: list[weakref.ref] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape == x.shape:
                made.append(weakref.ref(out))
            return out

    with Record():
        out = forward(x)
    gc.collect()
    alive = {t.untyped_storage().data_ptr() for t in (r() for r in made) if t is not None}
    return len(alive - {out.untyped_storage().data_ptr()})


@pytest.mark.parametrize("gamma", [0.0, 0.9])
def test_a_recomputed_chain_keeps_what_checkpointing_the_original_keeps(gamma):
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(6)]
    x = torch.randn(4, 16, requires_grad=True)

    def checkpointed(h: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = h + checkpoint(block, h, use_reentrant=False)
        return h

    chain = MomentumChain(blocks, gamma, use_backprop=True, strategy="recompute")
    kept = _state_tensors_kept(chain, x)
    assert kept == _state_tensors_kept(checkpointed, x) == len(blocks) - 1  # x itself is given
    reference = MomentumChain(blocks, gamma, use_backprop=True, strategy="keep")
    expected = torch.autograd.grad(reference(x).square().sum(), [x, *chain.parameters()])
    got = torch.autograd.grad(chain(x).square().sum(), [x, *chain.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_gamma_zero_plans_keep_the_original_model_exactly():
    model, x = _resnet()
    planned, report = fxmomentum.convert(
        model, 0.0, example_inputs=x, memory_budget=0.0, return_report=True
    )
    assert "reversible" not in {r.strategy for r in report.plan.regions}
    assert {r.strategy for r in report.plan.regions} >= {"recompute"}
    expected, got = seeded_step(model.train(), x), seeded_step(planned.train(), x)
    assert max(rel_err(a, b) for a, b in zip(got, expected, strict=True)) < 1e-12


def test_a_model_without_chains_is_planned_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 4)).double()  # fmt: skip
    x = torch.randn(2048, 8, dtype=torch.float64)
    planned, report = fxmomentum.convert(
        model, 0.0, example_inputs=x, memory_budget=0.0, return_report=True
    )
    assert "recompute" in [r.strategy for r in report.plan.regions]
    assert any(isinstance(m, RecomputedSegment) for m in planned.modules())
    expected, got = seeded_step(model, x), seeded_step(planned, x)
    assert max(rel_err(a, b) for a, b in zip(got, expected, strict=True)) < 1e-12


def test_recomputation_counts_batchnorm_statistics_once():
    model, x = _resnet()
    planned = fxmomentum.convert(model, 0.9, example_inputs=x, memory_budget=0.0).train()
    assert any(isinstance(m, RecomputedSegment) for m in planned.modules())
    reference = fxmomentum.convert(model, 0.9, example_inputs=x, use_backprop=True).train()
    seeded_step(planned, x), seeded_step(reference, x)
    for (name, a), b in zip(planned.named_buffers(), reference.buffers(), strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name  # reversible chains: rounding
    counts = [int(b) for n, b in planned.named_buffers() if n.endswith("num_batches_tracked")]
    assert set(counts) == {1}


def test_a_planned_model_keeps_keys_copies_and_pickles():
    model, x = _encoder()
    planned = fxmomentum.convert(model, 0.9, example_inputs=x, memory_budget=0.0)
    assert planned.state_dict().keys() == model.state_dict().keys()
    buffer = io.BytesIO()
    torch.save(planned, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(planned), torch.load(buffer, weights_only=False)]
    expected = seeded_step(planned.train(), x)
    for other in copies:
        assert grad_err(seeded_step(other.train(), x), expected) < 1e-12


@pytest.mark.parametrize("build", [_resnet, _encoder], ids=["resnet18", "encoder"])
def test_larger_budgets_give_plans_no_slower_and_within_the_budget(build):
    from fxmomentum.surgery.budget import MemoryPlanner
    from fxmomentum.surgery.conversion import prepare
    from fxmomentum.surgery.options import ConvertOptions

    model, x = build()
    planner = MemoryPlanner(prepare(copy.deepcopy(model), ConvertOptions(gamma=0.9), x))
    budgets = [i / 20 for i in range(21)]
    solutions = [planner.solve(b) for b in budgets]
    least = planner.least.peak / planner.original.peak
    assert least < 0.9
    for budget, solution in zip(budgets, solutions, strict=True):
        assert solution.peak <= max(budget, least) * planner.original.peak + 1
    times = [s.seconds for s in solutions]
    assert all(a >= b for a, b in itertools.pairwise(times))
    fastest = planner.fixed("keep")  # everything kept, in the chains' momentum arithmetic
    kept = evaluate(fastest, planner.sequence.sizes)
    assert kept.seconds > 0  # the momentum update, which the original does not run
    assert all(s.seconds >= kept.seconds for s in solutions)  # no plan is faster
    memory, _ = planner.ratios(fastest)
    assert memory > 1.0 or solutions[-1].seconds == kept.seconds


def test_the_plan_exports_in_eval_mode():
    model, x = _resnet()
    planned = fxmomentum.convert(model.float(), 0.9, example_inputs=x.float(), memory_budget=0.0)
    planned.eval()
    with torch.no_grad():
        expected = planned(x.float())
        program = torch.export.export(planned, (x.float(),))
    assert torch.allclose(program.module()(x.float()), expected, atol=1e-6)


def test_memory_budget_is_checked():
    model, x = _resnet()
    with pytest.raises(ValueError, match=r"memory_budget must be a number in \[0, 1\]"):
        fxmomentum.convert(model, 0.9, example_inputs=x, memory_budget=1.5)
    with pytest.raises(ValueError, match="memory_budget needs example_inputs"):
        fxmomentum.convert(model, 0.9, memory_budget=0.5)


def test_the_report_shows_the_plan():
    model, x = _resnet()
    report = fxmomentum.inspect(model, x, memory_budget=0.3)
    text = str(report)
    assert "Memory plan" in text and "recompute" in text
    data = report.as_dict()["plan"]
    assert data["budget"] == 0.3 and data["regions"]
    assert {"name", "kind", "strategy", "modules", "kept_bytes", "time_added"} <= set(
        data["regions"][0]
    )
    assert list(itertools.chain.from_iterable(r["modules"] for r in data["regions"]))
