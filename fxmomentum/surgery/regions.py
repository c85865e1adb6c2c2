"""The regions of a converted graph that the memory planner gives strategies to.

After the chains are chosen, a unit's graph is a sequence of chain calls and, between them,
*gaps* of other nodes (a stem, projection blocks, a head). Each chain is one region. A gap is
cut into *atoms* where a single tensor is live across the cut (as ``checkpoint_sequential``
would cut it); a run of consecutive atoms of one gap may be recomputed as one segment, or
each atom kept. What each costs, for each strategy, is measured once on the example inputs:

* ``keep``: the bytes autograd saves inside the region;
* ``recompute``: its input tensors are kept, its activations exist again while it goes
  backward, and its forward runs once more;
* ``reversible`` (chains): the exact state, one block's activations at a time, one more
  forward and the engine's integer passes.

A chain's recomputing strategies also come with options (:class:`ChainVariant`): its blocks
may keep the outputs of their costliest operators, which the recomputation then skips
(:mod:`fxmomentum.engine.saved_ops`; the best ``j`` by time per byte, for every ``j``), or a
recomputed chain may go 2 to :data:`MAX_SPAN` blocks a segment. At gamma > 0 the kept and
recomputed chains also pay the momentum update, timed on the chain's state.

Examples
--------
>>> import torch
>>> import fxmomentum
>>> from torch import nn
>>> class Block(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.f = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16))
...     def forward(self, x):
...         return x + self.f(x)
>>> net = nn.Sequential(nn.Linear(8, 16), *[Block() for _ in range(8)], nn.Linear(16, 2))
>>> report = fxmomentum.inspect(net, torch.randn(32, 8), memory_budget=0.0)
>>> [(r.kind, r.strategy) for r in report.plan.regions]
[('segment', 'keep'), ('chain', 'reversible'), ('segment', 'keep')]
>>> report = fxmomentum.inspect(net, torch.randn(32, 8), gamma=0.0, memory_budget=1.0)
>>> [(r.kind, r.strategy) for r in report.plan.regions]  # the original, which costs nothing more
[('segment', 'keep'), ('chain', 'keep'), ('segment', 'keep')]
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

from ..engine import GAMMA_DENOM, quantize_gamma
from ..engine.update import momentum_update
from .dataflow import module_path, tensor_meta
from .estimate import STATE_BYTES_PER_ELEMENT, GraphMeasurement
from .match import Chain

__all__ = [
    "Atom",
    "ChainVariant",
    "Cost",
    "Gap",
    "Pick",
    "RegionCosts",
    "atoms_of",
    "chain_costs",
    "segment_cost",
]

#: Time a recomputed region adds beyond its forward, as a share of that forward: saving and
#: restoring its inputs, RNG and buffers, autograd's second graph (torch's checkpoint on
#: ResNet-101 measures 1.44x the original's step in CPU time where one more forward of its
#: blocks is 1.25x: ``benchmarks/results/budget.md``).
RECOMPUTE_OVERHEAD = 0.25
#: The reversible engine's work per block beyond the recomputation, as a share of the
#: block's forward: its integer passes and per-block bookkeeping (ResNet-101, every chain
#: reversible with the native CPU kernels: 1.39x the original's step in CPU time where one
#: more forward of the chains is 1.24x and the chains' forward about a quarter of the step).
REVERSIBLE_OVERHEAD = 0.7
#: Bytes per element of the working state while a reversible chain goes backward (int64
#: velocity, float16 residual, the gradient buffer).
WORKING_STATE_BYTES = 14
#: Longest run of atoms recomputed as one segment (bounds the planner's work on large gaps).
MAX_SEGMENT_ATOMS = 32
#: Most operator outputs a chain's plans may keep for its recomputation (the best ones by time
#: per byte; bounds the planner's choices per chain).
MAX_SAVED_OUTPUTS = 64
#: Most blocks of a chain recomputed as one segment (a transformer layer is two blocks).
MAX_SPAN = 4
#: CPU time torch's dispatch to Python takes per operator of a block whose operator outputs
#: are kept (selective checkpointing's dispatch modes run in its forward and recomputation).
DISPATCH_SECONDS = 8e-6


@dataclass(frozen=True)
class Cost:
    """What one strategy of one region costs.

    Attributes
    ----------
    kept : int
        Bytes held from the region's forward to its backward.
    transient : int
        Bytes live on top of everything kept while the region goes backward.
    seconds : float
        Time added to a training step.
    storages : frozenset of int
        The storages behind ``kept`` (to count once what two neighbours both keep).
    """

    kept: int
    transient: int
    seconds: float
    storages: frozenset[int] = frozenset()


@dataclass
class Atom:
    """Nodes of a gap between two cuts where one tensor is live."""

    nodes: list[str]
    modules: list[str]


@dataclass
class Gap:
    """The nodes between two chains (or before the first, after the last), as atoms."""

    atoms: list[Atom] = field(default_factory=list)


#: ``(block, operator, k)``: the output of the ``k``-th call of ``operator`` in the block.
Pick = tuple[int, str, int]


@dataclass(frozen=True)
class ChainVariant:
    """A recomputing strategy of a chain with options: blocks that keep some operator
    outputs from the forward, so that their recomputation skips those operators (``picks``),
    or blocks recomputed ``span`` at a time."""

    strategy: str
    cost: Cost
    picks: tuple[Pick, ...] = ()
    span: int = 1


@dataclass
class RegionCosts:
    """What each strategy of a chain costs (``strategies`` maps a name to its cost), and its
    recomputing strategies with options (``variants``)."""

    strategies: dict[str, Cost]
    variants: list[ChainVariant] = field(default_factory=list)


def _computes(node: fx.Node) -> bool:
    return node.op in ("call_module", "call_function", "call_method")


def _is_tensor(node: fx.Node) -> bool:
    return tensor_meta(node) is not None


def atoms_of(graph: fx.Graph, chain_calls: Sequence[str]) -> list[Gap | str]:
    """The graph as a sequence of gaps (of atoms) and chain call names, in graph order.

    Parameters
    ----------
    graph : torch.fx.Graph
        A unit's graph after the rewrite's top-level step (each chain one call node).
    chain_calls : sequence of str
        The names of the chain call nodes.
    """
    calls = set(chain_calls)
    order = {n: i for i, n in enumerate(graph.nodes)}
    # How many tensors computed by nodes are live right after each position (placeholders and
    # parameters are held by the caller and the model: they do not pin a cut).
    change = [0] * (len(order) + 1)
    for n in graph.nodes:
        if _computes(n) and n.users and _is_tensor(n):
            change[order[n]] += 1
            change[max(order[u] for u in n.users)] -= 1
    live_after, running = [], 0
    for delta in change:
        running += delta
        live_after.append(running)
    sequence: list[Gap | str] = []
    gap = Gap()
    atom: list[fx.Node] = []

    def close_atom() -> None:
        if atom:
            modules = sorted({module_path(n) for n in atom if module_path(n)})
            gap.atoms.append(Atom([n.name for n in atom], modules))
            atom.clear()

    for node in graph.nodes:
        if node.name in calls:
            close_atom()
            sequence.append(gap)
            sequence.append(node.name)
            gap = Gap()
            continue
        if not _computes(node):
            continue
        atom.append(node)
        if live_after[order[node]] <= 1:
            close_atom()
    close_atom()
    sequence.append(gap)
    return [item for item in sequence if not (isinstance(item, Gap) and not item.atoms)]


def _bytes(storages: Mapping[int, int]) -> int:
    return sum(storages.values())


def _saved(measured: GraphMeasurement, names: Sequence[str]) -> dict[int, int]:
    out: dict[int, int] = {}
    for name in names:
        for key, nbytes in measured.saved.get(name, {}).items():
            if key not in measured.fixed and key not in measured.inputs:
                out[key] = nbytes
    return out


def _gradients(measured: GraphMeasurement, names: Sequence[str], params: int) -> int:
    """Bytes of the gradients live while a region goes backward: the largest activation's
    gradient coming in and going out, and a weight-sized gradient before it is added to
    ``.grad``."""
    largest = max(
        (b for name in names for k, b in measured.outputs.get(name, {}).items()
         if k not in measured.fixed),
        default=0,
    )  # fmt: skip
    return 2 * largest + params


def segment_cost(
    measured: GraphMeasurement,
    names: Sequence[str],
    inputs: Sequence[str],
    params: int,
    strategy: str,
) -> Cost:
    """The cost of nodes ``names`` kept, or recomputed as one segment reading ``inputs``
    (the nodes whose outputs it reads from before it); ``params``: the largest weight."""
    saved = _saved(measured, names)
    grads = _gradients(measured, names, params)
    if strategy == "keep":
        return Cost(_bytes(saved), grads, 0.0, frozenset(saved))
    kept: dict[int, int] = {}
    for name in inputs:
        for key, nbytes in measured.outputs.get(name, {}).items():
            if key not in measured.fixed and key not in measured.inputs:
                kept[key] = nbytes
    seconds = sum(measured.seconds.get(n, 0.0) for n in names) * (1 + RECOMPUTE_OVERHEAD)
    return Cost(_bytes(kept), _bytes(saved) + grads, seconds, frozenset(kept))


def chain_costs(
    measured: GraphMeasurement,
    chain: Chain,
    gamma: float,
    params: int,
    strategies: Sequence[str],
    synthetic: int,
) -> RegionCosts:
    """The cost of each of ``strategies`` for ``chain`` (``synthetic``: a storage key no
    tensor has, for the state a strategy makes)."""
    blocks = [[n.name for n in b.nodes] for b in chain.blocks]
    all_nodes = [name for block in blocks for name in block]
    saved = _saved(measured, all_nodes)
    grads = _gradients(measured, all_nodes, params)
    per_block = max(_bytes(_saved(measured, block)) for block in blocks)
    seconds = sum(measured.seconds.get(n, 0.0) for n in all_nodes)
    exit_storages = dict(measured.outputs.get(chain.exit.name, {}))
    state_bytes = _state_bytes(chain, gamma)
    numel = _numel(chain)
    # At gamma > 0 the floating-point strategies run the momentum update after every block,
    # forward and backward, which the original does not (the reversible engine's own passes
    # are in REVERSIBLE_OVERHEAD).
    update = 0.0
    if quantize_gamma(gamma):
        update = len(blocks) * _update_seconds(tensor_meta(chain.entry), measured.device)
    entry = dict(measured.outputs.get(chain.entry.name, {}))
    x_bytes = _bytes(entry) or _bytes(exit_storages)
    out: dict[str, Cost] = {}
    for strategy in strategies:
        if strategy == "keep":
            # At gamma > 0 a generalized block's output y and the next state x + v are two
            # tensors where the original had one: the next block keeps x + v besides y.
            extra = 0
            if quantize_gamma(gamma):
                extra = sum(_bytes(measured.outputs.get(b.exit.name, {}))
                            for b in chain.blocks if b.kind != "pure")  # fmt: skip
            out[strategy] = Cost(_bytes(saved) + extra, grads, update, frozenset(saved))
        elif strategy == "recompute":
            # Each block keeps its input x (the momentum update around it keeps nothing).
            keys = frozenset({*entry, synthetic})
            cost = seconds * (1 + RECOMPUTE_OVERHEAD) + update
            out[strategy] = Cost(x_bytes * len(blocks), per_block + grads, cost, keys)
        else:
            working = WORKING_STATE_BYTES * numel
            kept = state_bytes + _bytes(exit_storages)
            keys = frozenset({*exit_storages, synthetic})
            cost = seconds * (1 + REVERSIBLE_OVERHEAD)
            out[strategy] = Cost(kept, per_block + working + grads, cost, keys)
    variants = _saving_variants(measured, chain, out, seconds)
    if "recompute" in out:
        variants += _span_variants(out["recompute"], len(blocks), x_bytes, per_block, grads, gamma)
    return RegionCosts(out, variants)


def _span_variants(
    recompute: Cost, blocks: int, x_bytes: int, per_block: int, grads: int, gamma: float
) -> list[ChainVariant]:
    """A chain of ``blocks`` recomputed 2 to :data:`MAX_SPAN` blocks at a time: each segment
    keeps its input ``x`` and, at gamma > 0, its ``v`` (none before the first); a segment's
    blocks are all live while it goes backward."""
    variants = []
    for span in range(2, min(MAX_SPAN, blocks) + 1):
        segments = -(-blocks // span)
        kept = x_bytes * (segments + (segments - 1 if quantize_gamma(gamma) else 0))
        cost = Cost(kept, span * per_block + grads, recompute.seconds, recompute.storages)
        variants.append(ChainVariant("recompute", cost, span=span))
    return variants


def _saving_variants(
    measured: GraphMeasurement, chain: Chain, costs: Mapping[str, Cost], forward: float
) -> list[ChainVariant]:
    """The recomputing strategies of ``chain`` with the best ``j`` operator outputs kept, for
    every ``j``: the outputs ranked by the time their operator takes per byte they hold
    (``forward``: the chain's forward time). A reversible recomputation runs every block
    whole; a checkpointed one stops once its block's saved tensors are back, so an output no
    saved tensor of the block is computed from (a block's last linear layer) is not offered
    there."""
    candidates: list[tuple[float, int, Pick, float, bool]] = []
    operators_per_block = []
    for t, block in enumerate(chain.blocks):
        calls: dict[str, int] = {}
        names = {n.name for n in block.nodes}
        operators_per_block.append(sum(measured.op_counts.get(n, 0) for n in names))
        for node in block.nodes:
            for call in measured.heavy_ops.get(node.name, ()):
                k = calls[call.op] = calls.get(call.op, -1) + 1
                if call.nbytes > 0 and not call.written_later:
                    rate = call.seconds / call.nbytes
                    checkpointed = bool(call.needed_by & names)
                    pick = (t, call.op, k)
                    candidates.append((rate, call.nbytes, pick, call.seconds, checkpointed))
    candidates.sort(key=lambda c: c[0], reverse=True)
    variants = []
    for strategy in ("recompute", "reversible"):
        base = costs.get(strategy)
        if base is None:
            continue
        offered = [c for c in candidates if strategy == "reversible" or c[4]]
        kept, skipped, blocks, picks = 0, 0.0, set(), []
        for _, nbytes, pick, seconds, _ in offered[:MAX_SAVED_OUTPUTS]:
            # The operators' times come from a run of their own: never more than the forward.
            kept, skipped = kept + nbytes, min(skipped + seconds, forward)
            blocks.add(pick[0])
            picks.append(pick)
            dispatch = 2 * DISPATCH_SECONDS * sum(operators_per_block[t] for t in blocks)
            if skipped > dispatch:
                cost = Cost(base.kept + kept, base.transient, base.seconds - skipped + dispatch,
                            base.storages)  # fmt: skip
                variants.append(ChainVariant(strategy, cost, tuple(picks)))
    return variants


def _update_seconds(meta: object, device: str) -> float:
    """CPU time of one momentum update and its backward on a chain's state (the less of
    three runs), measured on tensors of its shape and dtype on ``device``; 0 where unknown."""
    if meta is None or not getattr(meta, "dtype", torch.float32).is_floating_point:
        return 0.0
    return _timed_update(tuple(meta.shape), meta.dtype, device)


@functools.lru_cache(maxsize=64)
@torch.enable_grad()
def _timed_update(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> float:
    try:
        x, y, v = (torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
                   for _ in range(3))  # fmt: skip
    except (RuntimeError, TypeError):
        return 0.0
    best = math.inf
    for _ in range(3):
        start = time.process_time()
        x_new, v_new = momentum_update(x, y, v, 0.9, subtract=True)
        torch.autograd.backward([x_new, v_new], [torch.ones_like(x_new), torch.ones_like(v_new)])
        best = min(best, time.process_time() - start)
    return best


def _numel(chain: Chain) -> int:
    meta = tensor_meta(chain.entry)
    return math.prod(meta.shape) if meta is not None else 0


def _state_bytes(chain: Chain, gamma: float) -> int:
    """Bytes a reversible chain keeps from forward to backward beyond its output: the exact
    state and the lost bits."""
    n = quantize_gamma(gamma)
    if n == 0:
        return 0
    lost_bits = len(chain.blocks) * math.log2(GAMMA_DENOM / n)
    return int(_numel(chain) * (STATE_BYTES_PER_ELEMENT + lost_bits / 8))
