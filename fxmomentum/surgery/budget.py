"""A memory budget: every region of every captured graph gets the strategy that pays.

``convert(model, example_inputs=x, memory_budget=b)`` asks for the fastest training step whose
activation memory is at most ``b`` times the original model's (``0``: the least memory the
model can reach, ``1``: the fastest, as torch.compile's ``activation_memory_budget``). The
regions (:mod:`fxmomentum.surgery.regions`) are measured once on the example inputs, the
solver (:mod:`fxmomentum.surgery.planner`) picks the strategies, and :func:`plan_memory`
records them on the conversion for the rewrite: a chain's ``MomentumChain.strategy`` and
options (``saved_ops``, ``recompute_span``), and the runs of other nodes to recompute
(:mod:`fxmomentum.surgery.segments`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import fx, nn

from ..engine import quantize_gamma
from ..engine.saved_ops import SavedOps
from ..paths import join_path
from .estimate import GraphMeasurement, measure_graph
from .planner import Choice, Solution, evaluate, solve
from .regions import MAX_SEGMENT_ATOMS, Gap, Pick, atoms_of, chain_costs, segment_cost
from .rewrite import top_graph

if TYPE_CHECKING:
    from .conversion import Conversion, UnitChoice

__all__ = ["MemoryPlan", "MemoryPlanner", "PlannedRegion", "plan_memory"]

#: A training step's time over its forward's, for the time ratio's estimate (a backward costs
#: about twice a forward).
STEP_OVER_FORWARD = 3.0


@dataclass
class PlannedRegion:
    """One region of the plan.

    Attributes
    ----------
    name : str
        The chain's attribute (``layer1.momentum_chain_0``) or ``segment <first module>``.
    kind : str
        ``"chain"`` or ``"segment"``.
    strategy : str
        ``"reversible"``, ``"recompute"`` or ``"keep"``.
    modules : list of str
        Module paths it runs.
    kept_bytes : int
        Bytes it keeps from its forward to its backward (estimated).
    time_added : float
        Seconds it adds to a training step (estimated).
    saved_outputs : int
        Operator outputs (of convolutions, matrix products, attention) its blocks keep from
        the forward so that their recomputation skips those operators; their bytes are in
        ``kept_bytes``.
    span : int
        Blocks of a recomputed chain recomputed as one segment.
    """

    name: str
    kind: str
    strategy: str
    modules: list[str]
    kept_bytes: int
    time_added: float
    saved_outputs: int = 0
    span: int = 1

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class MemoryPlan:
    """What the memory planner chose, and the estimates it chose from.

    Attributes
    ----------
    budget : float
        The budget asked for, a fraction of the original's activation memory.
    regions : list of PlannedRegion
        In order.
    peak_bytes, original_bytes, least_bytes : int
        Estimated activation memory of a training step: the plan's, the original model's
        (everything kept), the least any plan reaches.
    added_seconds, step_seconds : float
        Estimated time the plan adds to a training step, and the original step's.
    notes : list of str
    """

    budget: float
    regions: list[PlannedRegion] = field(default_factory=list)
    peak_bytes: int = 0
    original_bytes: int = 0
    least_bytes: int = 0
    added_seconds: float = 0.0
    step_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def memory_ratio(self) -> float:
        """Estimated activation memory over the original's."""
        return self.peak_bytes / max(self.original_bytes, 1)

    @property
    def time_ratio(self) -> float:
        """Estimated step time over the original's."""
        return 1.0 + self.added_seconds / max(self.step_seconds, 1e-12)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (the report's ``"plan"``)."""
        return {
            "budget": self.budget,
            "estimated_memory_ratio": self.memory_ratio,
            "estimated_time_ratio": self.time_ratio,
            "estimated_bytes": self.peak_bytes,
            "original_bytes": self.original_bytes,
            "least_bytes": self.least_bytes,
            "regions": [r.as_dict() for r in self.regions],
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class _Region:
    """Where a choice's region is: its unit, and a chain (by index) or a run of atoms."""

    unit: int
    chain: int | None = None
    gap: int | None = None
    atoms: tuple[int, int] = (0, 0)
    #: Operator outputs the chain's blocks keep for their recomputation.
    picks: tuple[Pick, ...] = ()
    #: Blocks of the chain recomputed as one segment.
    span: int = 1


def _param_bytes(modules: dict[str, nn.Module], names: Sequence[str]) -> int:
    """The largest weight among the modules ``names``: its gradient, before it is added to
    ``.grad``, is a temporary of the backward."""
    sizes = [
        max((p.numel() * p.element_size() for p in modules[m].parameters()), default=0)
        for m in names
        if m in modules
    ]
    return max(sizes, default=0)


class _Sequence:
    """The choices of every unit, position by position, and where each choice points."""

    def __init__(self) -> None:
        self.steps: list[list[Choice]] = []
        self.where: dict[str, _Region] = {}
        self.sizes: dict[int, int] = {}
        self.forward_seconds = 0.0
        self.gaps: dict[tuple[int, int], Gap] = {}
        #: Per chain position, its cost in the original model.
        self.originals: dict[int, Choice] = {}
        self._synthetic = -1

    def synthetic(self) -> int:
        self._synthetic -= 1
        return self._synthetic

    def add(self, key: str, region: _Region, strategy: str, cost: Any, span: int) -> Choice:
        position = len(self.steps)
        choice = Choice(key, strategy, cost, position + span)
        self.where[key] = region
        return choice

    def unit(self, index: int, unit: UnitChoice, measured: GraphMeasurement, options: Any):
        graph = top_graph(unit.capture.graph, unit.chosen, unit.names)
        modules = dict(unit.module.named_modules())
        exits = {name: c.exit.name for name, c in zip(unit.names, unit.chosen, strict=True)}
        for storages in (*measured.saved.values(), *measured.outputs.values()):
            self.sizes.update(storages)
        self.forward_seconds += sum(measured.seconds.values())
        gap_index = 0
        for item in atoms_of(graph, unit.names):
            if isinstance(item, Gap):
                self._gap(index, gap_index, item, graph, modules, exits, measured)
                gap_index += 1
            else:
                self._chain(index, unit, unit.names.index(item), modules, measured, options)

    def _chain(self, index: int, unit: UnitChoice, k: int, modules, measured, options) -> None:
        chain, gamma = unit.chosen[k], unit.gammas[k]
        strategies = ["keep", "recompute"]
        if not options.use_backprop and quantize_gamma(gamma) > 0:
            strategies.append("reversible")
        called = [str(n.target) for n in chain.nodes if n.op == "call_module"]
        params = _param_bytes(modules, called)
        costs = chain_costs(measured, chain, gamma, params, strategies, self.synthetic())
        key_base = f"{index}:{unit.names[k]}"
        # The original model's chain (gamma 0, kept): the reference the budget is a part of.
        original = chain_costs(measured, chain, 0.0, params, ["keep"], 0).strategies["keep"]
        self.originals[len(self.steps)] = Choice(key_base, "keep", original, len(self.steps) + 1)
        choices = [
            self.add(f"{key_base}:{s}", _Region(index, chain=k), s, cost, 1)
            for s, cost in costs.strategies.items()
        ]
        for j, variant in enumerate(costs.variants):
            region = _Region(index, chain=k, picks=variant.picks, span=variant.span)
            key = f"{key_base}:{variant.strategy}:variant{j}"
            choices.append(self.add(key, region, variant.strategy, variant.cost, 1))
        self.steps.append(choices)

    def _gap(self, index, gap_index, gap: Gap, graph: fx.Graph, modules, exits, measured):
        by_name = {n.name: n for n in graph.nodes}
        self.gaps[(index, gap_index)] = gap
        start = len(self.steps)
        atoms = gap.atoms
        for i in range(len(atoms)):
            choices = []
            for c in range(i + 1, min(len(atoms), i + MAX_SEGMENT_ATOMS) + 1):
                names = [n for atom in atoms[i:c] for n in atom.nodes]
                inside = set(names)
                inputs = {
                    exits.get(p.name, p.name)
                    for n in names
                    for p in by_name[n].all_input_nodes
                    if p.name not in inside and p.op not in ("placeholder", "get_attr")
                }
                called = [str(by_name[n].target) for n in names
                          if by_name[n].op == "call_module"]  # fmt: skip
                params = _param_bytes(modules, called)
                region = _Region(index, gap=gap_index, atoms=(i, c))
                key = f"{index}:gap{gap_index}:{i}-{c}"
                if c == i + 1:
                    keep = segment_cost(measured, names, sorted(inputs), params, "keep")
                    choices.append(self.add(f"{key}:keep", region, "keep", keep, 1))
                cost = segment_cost(measured, names, sorted(inputs), params, "recompute")
                choices.append(self.add(f"{key}:recompute", region, "recompute", cost, c - i))
            self.steps.append(choices)
        assert len(self.steps) == start + len(atoms)


class MemoryPlanner:
    """The regions of a conversion, measured once, and plans for any budget.

    Parameters
    ----------
    conversion : Conversion
        Chains chosen (:func:`fxmomentum.surgery.conversion.prepare`).

    Raises
    ------
    ValueError
        If a captured graph cannot run on its example inputs (the costs are measured there).
    """

    def __init__(self, conversion: Conversion) -> None:
        self.conversion = conversion
        sequence = self.sequence = _Sequence()
        for index, unit in enumerate(conversion.units):
            inputs = unit.capture.graph_inputs()
            measured = measure_graph(unit.capture.graph, inputs, timed=True)
            if measured is None or unit.capture.inputs is None:
                where = unit.path or type(unit.module).__name__
                raise ValueError(
                    f"memory_budget: the graph of {where} could not be run on its example "
                    f"inputs with grad, so its costs cannot be measured; pass example_inputs "
                    f"the model trains on, or convert without memory_budget"
                )
            sequence.unit(index, unit, measured, conversion.options)
        self.original = evaluate(self.fixed("original"), sequence.sizes)
        self.least = solve(sequence.steps, None, sequence.sizes)

    @property
    def step_seconds(self) -> float:
        """The original training step's estimated time."""
        return STEP_OVER_FORWARD * self.sequence.forward_seconds

    def solve(self, budget: float) -> Solution:
        """The fastest plan within ``budget`` (a fraction of the original's activation
        memory), or the least-memory plan where none is."""
        steps, sizes = self.sequence.steps, self.sequence.sizes
        return solve(steps, int(budget * self.original.peak), sizes)

    def fixed(self, chains: str = "keep", segments: str = "keep") -> list[Choice]:
        """The plan that gives every chain one strategy and every atom another (a chain
        without it, such as ``reversible`` at gamma 0, is kept). Chains ``"original"``: as
        the original model runs them (the budget's reference)."""
        out, position, steps = [], 0, self.sequence.steps
        while position < len(steps):
            kind = "segment" if ":gap" in steps[position][0].region else "chain"
            wanted = chains if kind == "chain" else segments
            if kind == "chain" and wanted == "original":
                out.append(self.sequence.originals[position])
                position += 1
                continue
            single = [c for c in steps[position] if c.next == position + 1]
            choice = next((c for c in single if c.strategy == wanted), None)
            choice = choice or next(c for c in single if c.strategy == "keep")
            out.append(choice)
            position = choice.next
        return out

    def ratios(self, choices: Sequence[Choice]) -> tuple[float, float]:
        """Estimated activation memory and step time of a plan, over the original's."""
        found = evaluate(choices, self.sequence.sizes)
        memory = found.peak / max(self.original.peak, 1)
        return memory, 1.0 + found.seconds / max(self.step_seconds, 1e-12)

    def plan(self, budget: float) -> MemoryPlan:
        """Choose every region's strategy within ``budget`` and record it on the
        conversion's units (``strategies``, ``segments``); returns the plan for the report."""
        solution, original, least = self.solve(budget), self.original, self.least
        plan = MemoryPlan(
            budget=budget,
            peak_bytes=solution.peak,
            original_bytes=original.peak,
            least_bytes=least.peak,
            added_seconds=solution.seconds,
            step_seconds=self.step_seconds,
        )
        if solution.peak > budget * original.peak:
            plan.notes.append(
                f"memory_budget {budget:g} is below the least this model reaches "
                f"({least.peak / max(original.peak, 1):.2f} of the original's estimated "
                f"activation memory): the least-memory plan is used"
            )
        _record(self.conversion, solution, self.sequence, plan)
        return plan


def plan_memory(conversion: Conversion, budget: float) -> MemoryPlan:
    """Choose every region's strategy within ``budget`` and record it on ``conversion``'s
    units; returns the plan for the report (:meth:`MemoryPlanner.plan`)."""
    return MemoryPlanner(conversion).plan(budget)


def _record(
    conversion: Conversion, solution: Solution, sequence: _Sequence, plan: MemoryPlan
) -> None:
    units = conversion.units
    for unit in units:
        unit.strategies = ["keep"] * len(unit.chosen)
        unit.chain_options = [{} for _ in unit.chosen]
        unit.segments = []
    for choice in solution.choices:
        region = sequence.where[choice.region]
        unit = units[region.unit]
        if region.chain is not None:
            unit.strategies[region.chain] = choice.strategy
            chain = unit.chosen[region.chain]
            if region.picks:
                saved_ops = _saved_ops(region.picks, len(chain.blocks))
                unit.chain_options[region.chain]["saved_ops"] = saved_ops
            if region.span > 1:
                unit.chain_options[region.chain]["recompute_span"] = region.span
            name = join_path(unit.path, unit.names[region.chain])
            modules = sorted({join_path(unit.path, b.path) for b in chain.blocks})
            kind = "chain"
        else:
            start, end = region.atoms
            atoms = sequence.gaps[(region.unit, region.gap)].atoms[start:end]
            nodes = [n for atom in atoms for n in atom.nodes]
            if choice.strategy == "recompute":
                unit.segments.append(nodes)
            modules = [join_path(unit.path, m) for atom in atoms for m in atom.modules]
            name = f"segment {modules[0] if modules else nodes[0]}"
            kind = "segment"
        plan.regions.append(
            PlannedRegion(
                name,
                kind,
                choice.strategy,
                modules,
                choice.cost.kept,
                choice.cost.seconds,
                len(region.picks),
                region.span,
            )
        )


def _saved_ops(picks: Sequence[Pick], blocks: int) -> list[SavedOps | None]:
    """Per block of a chain, the operator outputs it keeps (None: none)."""
    per_block: list[set[tuple[str, int]]] = [set() for _ in range(blocks)]
    for t, op, k in picks:
        per_block[t].add((op, k))
    return [SavedOps(frozenset(p)) if p else None for p in per_block]
