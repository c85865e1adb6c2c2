"""Layout changes between residual blocks: a chain's state follows them exactly.

Between two residual blocks a model may reshape its state without changing a number: timm's
Swin runs attention on ``(B, H, W, C)`` and the MLP on ``(B, H*W, C)``; OPT runs its FFN on
``(batch*seq, hidden)``. The first block's exit then reaches the next block's entry through
operations that only move elements (:data:`ORDER_PRESERVING`: reshapes, views, flattens; and
the permutations of :data:`PERMUTING`), and the shape reads that size them.

A chain keeps its state in the layout of its first block. Each later block replays the
layout changes since the chain's start on the state (:func:`replay`), runs on that, and maps
its result back (:func:`map_back`): a reshape is undone by reshaping to the shape it started
from, a permutation by the inverse one. Both only move the same numbers, so the block computes
bit for bit what it computed in the model, and ``x + v`` in the first layout is ``x + v`` in
every other. After the chain, the state is mapped to the last block's layout.

Examples
--------
>>> import torch
>>> from torch import fx, nn
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.f = nn.Linear(4, 4)
...         self.g = nn.Linear(4, 4)
...     def forward(self, x):  # (B, H, W, C), then (B, H*W, C)
...         b, h, w, c = x.shape
...         x = x + self.f(x)
...         x = x.reshape(b, -1, c)
...         return x + self.g(x)
>>> from fxmomentum.surgery.match import find_chains
>>> gm = fx.symbolic_trace(Net())
>>> [len(c.blocks) for c in find_chains(gm.graph, dict(gm.named_modules())).chains]
[2]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .dataflow import tensor_meta

__all__ = [
    "ORDER_PRESERVING",
    "PERMUTING",
    "Link",
    "follow",
    "invertible",
    "map_back",
    "reaches",
    "replay",
]

#: Methods and functions that keep the elements in their (row-major) order: undone by a
#: reshape to the shape they started from.
ORDER_PRESERVING: frozenset[Any] = frozenset(
    {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous",
     torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten}
)  # fmt: skip
#: Methods and functions that permute dimensions or roll elements: undone by the inverse.
PERMUTING: frozenset[Any] = frozenset(
    {"permute", "transpose", "swapaxes", "t", "movedim", "roll",
     torch.permute, torch.transpose, torch.swapaxes, torch.t, torch.movedim, torch.roll}
)  # fmt: skip

_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim"})
_META_METHODS = frozenset({"size", "dim", "numel"})


@dataclass(frozen=True, eq=False)
class Link:
    """A layout change from one block's exit to the next block's entry.

    Attributes
    ----------
    start : torch.fx.Node
        The first block's exit.
    nodes : list of torch.fx.Node
        What computes it, in graph order: the layout operations and the shape reads (and
        sizes computed from them) that they use.
    ops : list of torch.fx.Node
        The layout operations, from ``start`` to the next block's entry.
    """

    start: fx.Node
    nodes: list[fx.Node]
    ops: list[fx.Node]


def _kind(node: fx.Node) -> Any:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return node.target
    return None


def invertible(node: fx.Node, modules: Mapping[str, Any] | None = None) -> bool:
    """Whether ``node`` moves its first argument's elements in a way :func:`map_back` undoes:
    an order-preserving reshape, a permutation with constant dimensions (a roll with
    constant shifts), or an ``nn.Identity`` of ``modules``."""
    if node.op == "call_module":
        module = (modules or {}).get(str(node.target))
        return isinstance(module, torch.nn.Identity) and len(node.args) == 1
    kind = _kind(node)
    if kind in ORDER_PRESERVING:
        return True
    if kind not in PERMUTING:
        return False
    found: list[fx.Node] = []
    fx.node.map_arg((node.args[1:], node.kwargs), found.append)
    return not found


def _metadata(node: fx.Node) -> bool:
    """A read of a value's shape, dtype or device (not of its elements)."""
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in _META_ATTRS
    return node.op == "call_method" and node.target in _META_METHODS


def _sizes(start: set[fx.Node]) -> set[fx.Node]:
    """The values computed from the shape reads ``start`` alone (sizes, products of sizes)."""
    found = set(start)
    todo = list(start)
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in found or tensor_meta(u) is not None:
                continue
            if u.op == "call_function" and all(i in found for i in u.all_input_nodes):
                found.add(u)
                todo.append(u)
    return found


def follow(
    exit_: fx.Node,
    entries: Mapping[fx.Node, Any],
    regions: Mapping[Any, set[fx.Node]],
    modules: Mapping[str, Any] | None = None,
) -> tuple[Any, Link | None] | None:
    """The block whose entry ``exit_`` reaches through layout changes, and the nodes of those.

    Parameters
    ----------
    exit_ : torch.fx.Node
        A block's exit.
    entries : mapping
        Each block entry's block (entries of several blocks are left out).
    regions : mapping
        Each block's nodes.
    modules : mapping, optional
        The graph's modules by path (an ``nn.Identity`` moves nothing).

    Returns
    -------
    (block, Link or None) or None
        The next block and the layout change to it (None: ``exit_`` is its entry, read by
        nothing else), or None where ``exit_`` leads to no one block, or also elsewhere.
    """
    data, ops, reads = exit_, [], set()
    for _ in range(32):
        shapes = {u for u in data.users if _metadata(u)}
        others = [u for u in data.users if u not in shapes]
        nxt = entries.get(data)
        if nxt is not None and all(u in regions[nxt] for u in others):
            # Shape reads of the entry inside the next block stay there.
            reads |= {u for u in shapes if u not in regions[nxt]}
            break
        if len(others) != 1 or not _moves(others[0], data, modules):
            return None
        if any(others[0] in region for region in regions.values()):
            return None
        reads |= shapes
        data = others[0]
        ops.append(data)
    else:
        return None
    nodes = set(ops) | _sizes(reads)
    if not nodes:
        return nxt, None
    # The operations read sizes from here or from outside the blocks, nothing inside one.
    for op in ops:
        for i in op.all_input_nodes[1:]:
            if i not in nodes and any(i in region for region in regions.values()):
                return None
    return nxt, Link(exit_, sorted(nodes, key=_position(exit_.graph)), ops)


def reaches(node: fx.Node, entries: Any, modules: Mapping[str, Any] | None = None) -> bool:
    """Whether ``node`` is one of ``entries``, or leads to one through layout changes only
    (each the only reader of the last, shape reads aside)."""
    for _ in range(32):
        if node in entries:
            return True
        others = [u for u in node.users if not _metadata(u)]
        if len(others) != 1 or not _moves(others[0], node, modules):
            return False
        node = others[0]
    return False


def _moves(node: fx.Node, data: fx.Node, modules: Mapping[str, Any] | None) -> bool:
    """Whether ``node`` moves the elements of ``data``, its first argument (undoably)."""
    return bool(node.args) and node.args[0] is data and invertible(node, modules)


def _position(graph: fx.Graph) -> Any:
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__


def replay(
    g: fx.Graph, state: fx.Node, links: Sequence[Link], env: dict[fx.Node, fx.Node]
) -> fx.Node:
    """Apply the layout changes ``links`` to ``state`` in ``g``; return the result.

    Each link's start is mapped to the value so far (only its shape is read, and layout
    changes: the state has the shape the start had), its nodes are copied into ``g`` with
    ``env`` (which they fill in).
    """
    value = state
    for link in links:
        env[link.start] = value
        for n in link.nodes:
            env[n] = g.node_copy(n, env.__getitem__)
            env[n].meta = dict(n.meta)
        value = env[link.ops[-1]] if link.ops else value
    return value


def map_back(
    g: fx.Graph, out: fx.Node, links: Sequence[Link], env: Mapping[fx.Node, fx.Node]
) -> fx.Node:
    """Undo the layout changes ``links`` (replayed with ``env``) on ``out``, last first."""
    for link in reversed(links):
        for n in reversed(link.ops):
            out = _inverse(g, n, env[n.args[0]], out)  # type: ignore[index]
    return out


def _inverse(g: fx.Graph, node: fx.Node, before: fx.Node, out: fx.Node) -> fx.Node:
    """``out`` moved back through ``node``, whose input was ``before`` (in ``g``)."""
    if node.op == "call_module":
        return out  # an nn.Identity
    kind = _kind(node)
    if kind in ORDER_PRESERVING:
        shape = g.call_function(getattr, (before, "shape"))
        return g.call_method("reshape", (out, shape))
    args = list(node.args[1:])
    kwargs = dict(node.kwargs)
    if kind in ("permute", torch.permute):
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = list(kwargs.get("dims", dims))
        order = [d % len(dims) for d in dims]
        inverse = [order.index(i) for i in range(len(dims))]
        return g.call_method("permute", (out, *inverse))
    if kind in ("transpose", "swapaxes", torch.transpose, torch.swapaxes):
        return g.call_method("transpose", (out, *args[:2]))
    if kind in ("t", torch.t):
        return g.call_method("t", (out,))
    if kind in ("movedim", torch.movedim):
        source = kwargs.get("source", args[0] if args else None)
        destination = kwargs.get("destination", args[1] if len(args) > 1 else None)
        return g.call_method("movedim", (out, destination, source))
    if kind in ("roll", torch.roll):
        shifts = kwargs.get("shifts", args[0] if args else None)
        dims = kwargs.get("dims", args[1] if len(args) > 1 else None)
        back = [-s for s in shifts] if isinstance(shifts, (list, tuple)) else -shifts
        return g.call_function(torch.roll, (out, back, dims))
    raise ValueError(f"no inverse for {node.format_node()}")  # pragma: no cover - invertible
