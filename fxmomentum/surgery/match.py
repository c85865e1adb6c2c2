"""Match: residual blocks, and chains of them, on a graph's data flow.

A *block* is a region of the graph with one entry ``x`` whose exit is ``x + F(x)``: an
``operator.add`` / ``operator.iadd`` / ``torch.add`` / ``Tensor.add(_)`` node with ``x`` as one
operand (possibly through identity-like modules such as ``nn.Identity``) and, as the other, a
value computed from ``x`` (``F`` may be scaled, dropped, or read tensors from outside: those
become the block's *context*).

* A *pure* block ends at the add; ``f = F``.
* A *generalized* block goes on through shape-preserving ops after the add (a ReLU, a norm)
  that belong to it: ``relu(x + F(x))`` (torchvision's ResNet blocks), ``norm(x + F(x))``
  (post-norm transformers). The block returns its whole output and ``f(x) = y - x``.

Consecutive blocks (one's exit is the next one's entry, and nothing else reads it) form a
*chain*. The work is linear in the size of the graph: each add looks only at the nodes between
its entry and itself.

Examples
--------
>>> import torch
>>> from torch import fx, nn
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.fs = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
...     def forward(self, x):
...         for f in self.fs:
...             x = x + f(x)
...         return x
>>> gm = fx.symbolic_trace(Net())
>>> result = find_chains(gm.graph, dict(gm.named_modules()))
>>> [len(c.blocks) for c in result.chains]
[3]
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx, nn

from ..paths import within
from .dataflow import (
    DataFlow,
    add_operands,
    common_path,
    format_meta,
    is_cast,
    is_inplace,
    is_layout,
    is_metadata_read,
    module_path,
    tensor_meta,
)
from .hoist import Hoist, hoist, valued
from .layout import Link, follow, reaches

__all__ = [
    "Block",
    "Chain",
    "MatchResult",
    "SkippedAdd",
    "find_chains",
    "module_path",
]


@dataclass(eq=False)
class Block:
    """One residual block found in the graph.

    Attributes
    ----------
    entry : torch.fx.Node
        ``x``, the value the block starts from (not part of the block).
    add : torch.fx.Node
        The residual add ``x + F(x)``.
    branch : torch.fx.Node
        ``F(x)``, the add's other operand.
    exit : torch.fx.Node
        The block's last node: ``add`` (pure) or the last op after it (generalized).
    nodes : list of torch.fx.Node
        The region, in graph order (without ``entry``).
    context : list of torch.fx.Node
        Values from outside the region that it reads (parameters, masks, embeddings).
    kind : str
        ``"pure"`` or ``"generalized"``.
    path : str
        Module path of the block (``""`` when it is written in the root's ``forward``).
    alpha : float or None
        ``torch.add(x, F, alpha=a)``: ``f = a * F``.
    source : torch.fx.Node or None
        Where the skip widens a value exactly (``residual = h.to(torch.float32)`` on a
        bfloat16 ``h``): ``h``, which ``F`` reads. ``entry`` is then the widened value (the
        chain's state starts wide) and the block reads ``h`` as ``entry`` cast back, which
        gives ``h`` bit for bit.
    link : Link or None
        In a chain, the layout change from the previous block's exit to ``entry`` (a
        reshape, a permute: see :mod:`fxmomentum.surgery.layout`), or None.
    layout : list of Link
        In a chain, every layout change from the chain's first block to this one: the block
        runs on the chain's state with them replayed, and maps its result back.
    hoisted : list of torch.fx.Node
        What the block computes for code outside it without its input's values (T5's
        position bias), in graph order: computed ahead of the chain, read as context (see
        :mod:`fxmomentum.surgery.hoist`).
    reads : dict of torch.fx.Node to torch.fx.Node
        Among ``hoisted``, each read of the shape, dtype or device of the block's input or
        of a value it computes from it, and that value: ahead of the chain it reads the
        chain's input, and the block checks that the value agrees.
    """

    entry: fx.Node
    add: fx.Node
    branch: fx.Node
    exit: fx.Node
    nodes: list[fx.Node]
    context: list[fx.Node]
    kind: str
    path: str
    alpha: float | None = None
    source: fx.Node | None = None
    link: Link | None = None
    layout: list[Link] = field(default_factory=list)
    hoisted: list[fx.Node] = field(default_factory=list)
    reads: dict[fx.Node, fx.Node] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The module path, or the add's node name when the block has no module."""
        return self.path or self.add.name


@dataclass(eq=False)
class Chain:
    """Consecutive blocks: each one's exit is the next one's entry.

    Attributes
    ----------
    blocks : list of Block
    selected : bool
        Whether it passed ``include`` / ``exclude`` / ``min_blocks`` (see
        :func:`fxmomentum.surgery.select.select_chains`).
    reason : str
        Why it is not selected (empty when it is).
    """

    blocks: list[Block]
    selected: bool = True
    reason: str = ""

    @property
    def entry(self) -> fx.Node:
        """``x_0``."""
        return self.blocks[0].entry

    @property
    def exit(self) -> fx.Node:
        """The node computing ``x_T``."""
        return self.blocks[-1].exit

    @property
    def kind(self) -> str:
        """``"pure"``, ``"generalized"`` or ``"mixed"``."""
        kinds = {b.kind for b in self.blocks}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def context(self) -> list[fx.Node]:
        """Every value read from outside the chain (``x_0`` only if a later block reads it)."""
        inside = set(self.nodes)
        seen: dict[fx.Node, None] = {}
        for b in self.blocks:
            reads = [i for n in b.link.nodes for i in n.all_input_nodes] if b.link else []
            for c in [*reads, *b.context]:
                if c not in inside:
                    seen.setdefault(c, None)
        return list(seen)

    @property
    def reads(self) -> dict[fx.Node, fx.Node]:
        """The shape, dtype and device reads its blocks move ahead of it
        (:attr:`Block.reads`): there they read :attr:`entry`."""
        return {r: v for b in self.blocks for r, v in b.reads.items()}

    @property
    def nodes(self) -> list[fx.Node]:
        """All nodes of the chain's blocks, and of the layout changes between them, in
        graph order."""
        return [n for b in self.blocks for n in [*(b.link.nodes if b.link else ()), *b.nodes]]


@dataclass(frozen=True)
class SkippedAdd:
    """A residual add that is not converted.

    Attributes
    ----------
    node : str
        Name of the add node.
    path : str
        Module path around it.
    reason : str
    """

    node: str
    path: str
    reason: str

    @property
    def module(self) -> str:
        """The module path (same as :attr:`path`)."""
        return self.path

    def __str__(self) -> str:
        return f"{self.node} ({self.path or 'root'}): {self.reason}"


@dataclass
class MatchResult:
    """Blocks and chains of a graph, and the residual adds left out.

    Attributes
    ----------
    chains : list of Chain
        In graph order; not-selected chains included.
    skipped : list of SkippedAdd
    escaping : list of torch.fx.Node
        Why some adds were skipped: a value their block computes from its input's values
        that code outside the block reads.
    """

    chains: list[Chain] = field(default_factory=list)
    skipped: list[SkippedAdd] = field(default_factory=list)
    escaping: list[fx.Node] = field(default_factory=list)

    @property
    def blocks(self) -> list[Block]:
        return [b for c in self.chains for b in c.blocks]


# -- blocks ------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Candidate:
    add: fx.Node
    entry: fx.Node
    skip: fx.Node
    branch: fx.Node
    inner: set[fx.Node]
    alpha: float | None
    #: Nodes that read only x's shape, dtype or device (see _release_metadata).
    meta: set[fx.Node] = field(default_factory=set)
    #: The value the skip widens (see Block.source), or None.
    source: fx.Node | None = None
    #: Every node computed from the input before the add (``inner`` keeps those the add
    #: needs): an in-place change of the input among them is refused.
    around: set[fx.Node] = field(default_factory=set)
    #: What the block computes for code outside it, moved ahead of the chain.
    hoisted: Hoist = field(default_factory=Hoist)
    #: A value computed from the input's values that code outside the block reads (refused).
    escaping: fx.Node | None = None

    @property
    def inputs(self) -> tuple[fx.Node, ...]:
        """The block's input: the entry, and the value it widens."""
        return (self.entry,) if self.source is None else (self.entry, self.source)


def _candidate(g: DataFlow, add: fx.Node) -> _Candidate | str | None:
    """A residual add (``x + F(x)``), the reason a residual-looking add is not one, or None."""
    ops = add_operands(add)
    if ops is None:
        return None
    a, b, alpha = ops
    if a is b:
        return None  # x + x
    stop = g.index[add]
    for skip, branch, pos in ((a, b, 0), (b, a, 1)):
        x = g.resolve_identity(skip)
        inner = g.descendants_before(x, stop)
        if branch in inner and (skip is x or skip in inner):
            tx, ty = tensor_meta(x), tensor_meta(add)
            if tx is not None and ty is not None and tx.shape != ty.shape:
                return None  # the add broadcasts x to a larger shape: not a residual connection
            if alpha is not None and pos == 1:
                return f"the skip is scaled (alpha={alpha:g}): not x + F(x)"
            scale = alpha if pos == 0 else None
            return _Candidate(add, x, skip, branch, _own(g, add, inner), scale, around=inner)
        source = _widened_from(x)
        if source is not None:
            inner = g.descendants_before(source, stop) - {x}
            if branch in inner and not any(x in n.all_input_nodes for n in inner):
                if alpha is not None and pos == 1:
                    return f"the skip is scaled (alpha={alpha:g}): not x + F(x)"
                scale = alpha if pos == 0 else None
                own = _own(g, add, inner)
                return _Candidate(add, x, skip, branch, own, scale, source=source, around=inner)
    # Two branches from one value: a projection shortcut such as downsample(x) + F(x)?
    ta, tb = tensor_meta(a), tensor_meta(b)
    if ta is not None and tb is not None and ta.shape != tb.shape:
        return None
    found = g.fork(a, b)
    if found is None:
        return None
    fork, side_a, side_b = found
    moved = _skip_through(g, fork, side_a, side_b)
    if moved is not None:
        return moved
    # Both paths must start at the fork and read nothing else but parameters.
    sides = {fork, *side_a, *side_b}
    for n in sides - {fork}:
        for i in n.all_input_nodes:
            if i not in sides and not g.is_parameter_like(i):
                return None
    short, long_ = (side_a, side_b) if len(side_a) <= len(side_b) else (side_b, side_a)
    if len(short) > 8 or not g.has_parameters(short, ()) or not g.has_parameters(long_, ()):
        return None
    where = common_path(module_path(n) for n in short if n.op == "call_module")
    via = f"`{where}`" if where else ", ".join(f"`{n.name}`" for n in short)
    return f"projection shortcut: {via} maps the input `{fork.name}` (the skip is not the identity)"


def _own(g: DataFlow, add: fx.Node, computed: set[fx.Node]) -> set[fx.Node]:
    """The nodes of a block: those ``computed`` from its input before ``add``, less the
    tensors computed from the input's values that the add does not need (HRNet's transition
    to a new branch), which stay outside. Reads of the input's shape stay (see
    :func:`_release_metadata`), as do values computed from the block's own work (the
    attention weights a layer drops) and what is no tensor (a call that appends the input to
    a cache)."""
    needed = g.ancestors_within(add, computed)
    shapes: set[fx.Node] = set()
    beside: set[fx.Node] = set()
    for n in sorted(computed, key=g.index.__getitem__):
        inputs = [i for i in n.all_input_nodes if i in computed]
        if is_metadata_read(n) or (inputs and all(i in shapes for i in inputs)):
            shapes.add(n)
        elif n not in needed and tensor_meta(n) is not None and all(i in beside for i in inputs):
            beside.add(n)
    return computed - beside


#: Floating dtypes each of which holds every value of the dtypes listed with it exactly.
_WIDER = {
    torch.float32: (torch.float16, torch.bfloat16),
    torch.float64: (torch.float16, torch.bfloat16, torch.float32),
}


def _widened_from(node: fx.Node) -> fx.Node | None:
    """``h`` where ``node`` is an exact widening cast of ``h`` (``h.to(torch.float32)`` on
    bfloat16) read only by the add, else None."""
    if len(node.users) != 1 or not is_cast(node):
        return None
    source = node.args[0]
    a, b = tensor_meta(source), tensor_meta(node)
    if a is None or b is None or a.shape != b.shape:
        return None
    return source if a.dtype in _WIDER.get(b.dtype, ()) else None


def _skip_through(
    g: DataFlow, fork: fx.Node, side_a: list[fx.Node], side_b: list[fx.Node]
) -> str | None:
    """Why an add of ``ops(x)`` and ``F(x)`` is no residual block, where ``ops`` are a few
    casts or layout operations of ``x`` alone (a reshape, a permute) and ``F`` has
    parameters; else None."""
    for short, long_ in ((side_a, side_b), (side_b, side_a)):
        if not short or len(short) > 4 or not g.has_parameters(long_, _read_by(long_, fork)):
            continue
        if not all(is_cast(n) or is_layout(n) for n in short):
            continue
        inside = {fork, *short}
        if any(i not in inside and not g.is_parameter_like(i) for n in short
               for i in n.all_input_nodes):  # fmt: skip
            continue
        ops = sorted(short, key=g.index.__getitem__)
        names = ", ".join(f"`{_op_name(n)}`" for n in ops)
        first, last = tensor_meta(fork), tensor_meta(ops[-1])
        change = ""
        if first is not None and last is not None and first.dtype != last.dtype:
            rounds = "" if first.dtype in _WIDER.get(last.dtype, ()) else ", which rounds"
            change = f" ({_dtype_name(first.dtype)} to {_dtype_name(last.dtype)}{rounds})"
            fix = (
                "cast the state once before the blocks, so that each skip casts to the dtype "
                "it has, or keep the model in one dtype"
            )
        else:
            fix = "write the block as x + F(x) on one layout of x"
        return (
            f"the skip is {names} of `{fork.name}`{change}, not `{fork.name}` itself: "
            f"not x + F(x) ({fix})"
        )
    return None


def _read_by(nodes: list[fx.Node], fork: fx.Node) -> list[fx.Node]:
    """The values ``nodes`` read from outside themselves, other than ``fork``."""
    inside = {fork, *nodes}
    return [i for n in nodes for i in n.all_input_nodes if i not in inside]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    return str(getattr(node.target, "__name__", node.target))


def _release_metadata(g: DataFlow, c: _Candidate) -> None:
    """Leave outside the block the shape metadata of ``x`` that code after the block reads.

    ``b, n, d = x.shape`` written before a loop of blocks is computed right after ``x``, so it
    falls between ``x`` and the first add; it depends on ``x`` alone and stays in the outer
    graph (later blocks read it as context).
    """
    inner = c.inner
    meta: set[fx.Node] = set()
    order = sorted(inner, key=g.index.__getitem__)
    for n in order:
        inputs = [i for i in n.all_input_nodes if i in inner]
        if not all(i in meta for i in inputs):
            continue
        # A read of x's shape or dtype, or a value built from them only (a mask expanded to
        # the batch size of x).
        if is_metadata_read(n) or (inputs and not set(c.inputs) & set(n.all_input_nodes)):
            meta.add(n)
    c.meta = meta
    escaping = [n for n in meta if any(u not in inner and u is not c.add for u in n.users)]
    if not escaping:
        return
    released: set[fx.Node] = set()
    todo = list(escaping)
    while todo:
        n = todo.pop()
        if n in released:
            continue
        released.add(n)
        todo.extend(i for i in n.all_input_nodes if i in meta)
    c.inner = inner - released


def _reads_values(g: DataFlow, c: _Candidate) -> bool:
    """Whether F's output depends on the values of ``x``, not only on its shape, dtype or
    device (``x[:, :, -1]`` read only for its shape does not count)."""
    return c.branch in valued(g, c.inputs, c.inner)


def _hoist(g: DataFlow, c: _Candidate) -> str | None:
    """Move ahead of the chain what the block computes for code outside it without its
    input's values (see :mod:`fxmomentum.surgery.hoist`); why not, where it reads them."""
    inner = c.inner
    escaping = [
        n
        for n in sorted(inner, key=g.index.__getitem__)
        if any(u not in inner and u is not c.add for u in n.users)
    ]
    if not escaping:
        return None
    computed = valued(g, c.inputs, inner)
    for n in escaping:
        if n in computed:
            c.escaping = n
            u = next(u for u in n.users if u not in inner and u is not c.add)
            return f"`{n.name}` is computed inside the block and read by `{u.name}` outside it"
    found = hoist(g, inner, c.entry, escaping, computed)
    if isinstance(found, str):
        return found
    c.inner = inner - found.nodes
    c.hoisted = found
    return None


def _check(g: DataFlow, c: _Candidate) -> str | None:
    """Why a candidate cannot be a block, or None."""
    x, inner = c.entry, c.inner
    if c.add.op == "call_method" and c.add.target == "add_":
        # ``t.add_(u)`` changes ``t``: code that reads ``t`` afterwards expects the sum, and the
        # graph shows no edge for that.
        target = c.add.args[0]
        later = [u for u in target.users if g.index[u] > g.index[c.add]]
        if later:
            return (
                f"adds in place into `{target.name}`, which `{later[0].name}` reads afterwards "
                f"(write `x = x.add_(...)` or `x = x + ...`)"
            )
    tx = tensor_meta(x)
    if g.shapes_known and tx is None:
        return f"the input `{x.name}` is not a tensor"
    if tx is not None:
        if not tx.dtype.is_floating_point:
            return f"the input `{x.name}` is not floating-point ({format_meta(tx)})"
        tb = tensor_meta(c.branch)
        promoted = tb is not None and tb.dtype in _WIDER.get(tx.dtype, ())
        if tb is None or tb.shape != tx.shape or (tb.dtype != tx.dtype and not promoted):
            got = format_meta(tb) if tb is not None else "not a tensor"
            return f"F(x) is {got}, the input is {format_meta(tx)}: shape or dtype changes"
    if not _reads_values(g, c):
        return (
            f"F reads only the shape of `{x.name}`, not its values (a position embedding?): "
            f"x + F(x) with F constant in x is no residual block"
        )
    _release_metadata(g, c)
    why = _hoist(g, c)
    if why is not None:
        return why
    inner = c.inner
    for i in c.inputs:
        for u in i.users:
            if u in c.around and u.args and u.args[0] is i and is_inplace(u, g.modules):
                return f"`{u.name}` modifies the block input in place"
    context = {i for n in inner for i in n.all_input_nodes if i not in inner and i not in c.inputs}
    if not g.has_parameters(inner, context):
        return "F has no parameters and reads nothing from outside: an elementwise expression"
    return None


def _make_block(g: DataFlow, c: _Candidate, tail: list[fx.Node]) -> Block:
    region = set(c.inner) | {c.add, *tail}
    nodes = sorted(region, key=g.index.__getitem__)
    context: dict[fx.Node, None] = {}
    for n in nodes:
        for i in n.all_input_nodes:
            if i not in region and i not in c.inputs:
                context.setdefault(i, None)
    ordered = sorted(context, key=g.index.__getitem__)
    # What reads only x's metadata may be code of the enclosing module (a mask built from
    # the batch size): it does not say where the block is.
    paths = [module_path(n) for n in nodes if n not in c.meta]
    path = common_path(paths)
    if not path:
        path = common_path(module_path(n) for n in c.inner if n is not c.skip)
    kind = "generalized" if tail else "pure"
    exit_ = tail[-1] if tail else c.add
    block = Block(c.entry, c.add, c.branch, exit_, nodes, ordered, kind, path, c.alpha, c.source)
    block.hoisted = sorted(c.hoisted.nodes, key=g.index.__getitem__)
    block.reads = dict(c.hoisted.reads)
    return block


def _tails(g: DataFlow, cands: list[_Candidate]) -> dict[_Candidate, list[fx.Node]]:
    """The shape-preserving ops after each add that belong to its block."""
    entries = {c.entry for c in cands}
    tails = {}
    for c in cands:
        ops: list[fx.Node] = []
        inside = set(c.inner) | {c.add}
        cur = c.add
        while len(cur.users) == 1:
            u = next(iter(cur.users))
            if not g.shape_preserving(u, cur, inside):
                break
            ops.append(u)
            inside.add(u)
            cur = u
        if ops and reaches(ops[-1], entries, g.modules):
            tails[c] = ops  # leads into the next block: all of it belongs to this one
            continue
        scope = module_path(c.add)
        k = 0
        while scope and k < len(ops) and within(module_path(ops[k]), scope):
            k += 1
        tails[c] = ops[:k]
    return tails


# -- chains ------------------------------------------------------------------------------------
def find_chains(graph: fx.Graph, modules: Mapping[str, nn.Module]) -> MatchResult:
    """Find residual blocks and chains of them in ``graph``.

    Parameters
    ----------
    graph : torch.fx.Graph
        A traced graph; ``node.meta["tensor_meta"]`` (from shape propagation) is used when
        present to check shapes and dtypes.
    modules : mapping of str to nn.Module
        ``dict(root.named_modules())`` for the graph's owner.

    Returns
    -------
    MatchResult
        Every chain (selection is :func:`fxmomentum.surgery.select.select_chains`'s), and the
        residual adds left out with the reason.

    Examples
    --------
    >>> import torch
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.f = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return torch.relu(x + self.f(x))
    >>> gm = fx.symbolic_trace(Net())
    >>> [b.kind for b in find_chains(gm.graph, dict(gm.named_modules())).blocks]
    ['pure']
    """
    g = DataFlow(graph, modules)
    skipped: dict[fx.Node, str] = {}
    escaping: list[fx.Node] = []
    cands: list[_Candidate] = []
    for node in g.nodes:
        found = _candidate(g, node)
        if found is None:
            continue
        why = found if isinstance(found, str) else _check(g, found)
        if why is not None:
            skipped[node] = why
            if isinstance(found, _Candidate) and found.escaping is not None:
                escaping.append(found.escaping)
            continue
        cands.append(found)
    cands = _resolve_nesting(g, cands, skipped)
    chains = _link(g, _blocks(g, cands))
    left_out = [
        SkippedAdd(n.name, module_path(n), why)
        for n, why in sorted(skipped.items(), key=lambda item: g.index[item[0]])
    ]
    return MatchResult(chains, left_out, escaping)


def _blocks(g: DataFlow, cands: list[_Candidate]) -> list[Block]:
    tails = _tails(g, cands)
    return [_make_block(g, c, tails[c]) for c in cands]


def _resolve_nesting(
    g: DataFlow, cands: list[_Candidate], skipped: dict[fx.Node, str]
) -> list[_Candidate]:
    """One block of each nest of residual blocks (``x + F(x)`` with another ``y + G(y)``
    inside ``F``): the outer ones (ConvNeXt-V2's blocks around the GRN residual in their MLP)
    where they put more blocks in chains of two or more than the inner ones do, else the inner
    ones (a U-Net's long skips around stages of blocks). The others are noted in
    ``skipped``."""
    adds = {c.add: c for c in cands}
    inside = {c: [adds[n] for n in c.inner if n in adds] for c in cands}
    enclosed = {i for inner in inside.values() for i in inner}
    if not enclosed:
        return cands
    inner_first = [c for c in cands if not inside[c]]
    outer_first = [c for c in cands if c not in enclosed]
    inner_chains = _link(g, _blocks(g, inner_first))
    outer_chains = _link(g, _blocks(g, outer_first))
    if _chained(outer_chains) > _chained(inner_chains):
        length = {c.add: len(chain.blocks) for chain in outer_chains for c in chain.blocks}
        for c in outer_first:
            for i in inside[c]:
                skipped[i.add] = (
                    f"inside the residual block that ends at `{c.add.name}`, whose chain "
                    f"({length[c.add]} blocks) is longer: part of that block's F"
                )
        return outer_first
    for c in cands:
        if inside[c]:
            skipped[c.add] = (
                f"encloses {len(inside[c])} other residual block(s) (converted on their own, "
                f"which chains more blocks): an outer skip connection, not a chain element"
            )
    return inner_first


def _chained(chains: list[Chain]) -> int:
    """Blocks in chains of two or more."""
    return sum(len(c.blocks) for c in chains if len(c.blocks) > 1)


def _link(g: DataFlow, blocks: list[Block]) -> list[Chain]:
    """The chains of ``blocks``: one follows another when it starts from its exit, or from
    a layout change of it (:func:`fxmomentum.surgery.layout.follow`), and is the only reader
    of it (shape reads aside, which the chain computes)."""
    by_entry: dict[fx.Node, list[Block]] = {}
    for b in blocks:
        by_entry.setdefault(b.entry, []).append(b)
    entries = {e: found[0] for e, found in by_entry.items() if len(found) == 1}
    # The shape reads of a block's input that are moved ahead of the chain are the block's.
    regions = {b: {*b.nodes, *b.reads} for b in blocks}
    edges: dict[Block, tuple[Block, Link | None]] = {}
    for b in blocks:
        found = follow(b.exit, entries, regions, g.modules)
        if found is not None:
            edges[b] = found
    while True:
        links = nx.DiGraph()
        links.add_nodes_from(blocks)
        links.add_edges_from((b, nxt) for b, (nxt, _) in edges.items())
        groups = [
            sorted(comp, key=lambda b: g.index[b.add])
            for comp in nx.weakly_connected_components(links)
        ]
        # A layout change's shape reads serve the chain, or what comes after it (the graph
        # computes them again there): the chain computes them.
        bad = [b for group in groups for b in _outside_readers(g, group, edges)]
        bad += [b for group in groups for b in _relaid_before_reads(group, edges)]
        if not bad:
            break
        for b in bad:
            del edges[b]
    chains = []
    for group in groups:
        for prev, b in itertools.pairwise(group):
            b.link = edges[prev][1]
            b.layout = [*prev.layout, *([b.link] if b.link else [])]
        chains.append(Chain(group))
    chains.sort(key=lambda c: g.index[c.blocks[0].add])
    return chains


def _relaid_before_reads(
    group: list[Block], edges: dict[Block, tuple[Block, Link | None]]
) -> list[Block]:
    """The blocks of ``group`` whose link to the next block changes the state's layout where a
    block after it has a shape read moved ahead of the chain (which reads the chain's input,
    whose layout is then not that block's)."""
    bad, reads_later = [], False
    for b in reversed(group):
        link = edges[b][1] if b in edges else None
        if reads_later and link is not None and link.ops:
            bad.append(b)
        reads_later = reads_later or bool(b.reads)
    return bad


def _outside_readers(
    g: DataFlow, group: list[Block], edges: dict[Block, tuple[Block, Link | None]]
) -> list[Block]:
    """The blocks of ``group`` whose layout change to the next block is read outside the
    chain before its end."""
    links = {b: edges[b][1] for b in group if b in edges and edges[b][1] is not None}
    inside = {n for b in group for n in b.nodes}
    inside |= {n for link in links.values() for n in link.nodes}  # type: ignore[union-attr]
    end = g.index[group[-1].exit]
    return [
        b
        for b, link in links.items()
        if any(
            u not in inside and g.index[u] < end
            for n in link.nodes  # type: ignore[union-attr]
            for u in n.users
        )
    ]
