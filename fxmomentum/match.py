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

import fnmatch
import heapq
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from .capture import TrainingFlag

__all__ = [
    "Block",
    "Chain",
    "MatchResult",
    "SkippedAdd",
    "find_chains",
    "module_path",
]

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_IDENTITY_MODULES: tuple[type[nn.Module], ...] = (nn.Identity,)

#: Modules that keep shape and dtype and act per element or normalise: may end a block.
SHAPE_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold,
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
)  # fmt: skip
#: Functions of the same kind.
SHAPE_PRESERVING_FUNCTIONS = frozenset(
    {
        F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu, F.gelu, F.silu, F.mish,
        F.hardswish, F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.softplus, F.softsign,
        F.layer_norm, F.group_norm, F.rms_norm, F.batch_norm, F.instance_norm,
        F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
        torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.selu, torch.clamp,
        torch.layer_norm, torch.batch_norm, torch.group_norm, torch.dropout,
    }
)  # fmt: skip
#: Tensor methods of the same kind.
SHAPE_PRESERVING_METHODS = frozenset(
    {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip"}
)


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
        Whether it passed ``include`` / ``exclude`` / ``min_blocks``.
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
        seen: dict[fx.Node, None] = {}
        for b in self.blocks:
            for c in b.context:
                seen.setdefault(c, None)
        return list(seen)

    @property
    def nodes(self) -> list[fx.Node]:
        """All nodes of the chain's blocks, in graph order."""
        return [n for b in self.blocks for n in b.nodes]


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
    """

    chains: list[Chain] = field(default_factory=list)
    skipped: list[SkippedAdd] = field(default_factory=list)

    @property
    def blocks(self) -> list[Block]:
        return [b for c in self.chains for b in c.blocks]


# -- helpers -----------------------------------------------------------------------------------
def module_path(node: fx.Node) -> str:
    """The innermost module a node was traced in (the module itself for ``call_module``).

    Examples
    --------
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    >>> [module_path(n) for n in gm.graph.nodes]
    ['', '0', '']
    """
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return str(list(stack.values())[-1][0])


def _common_path(paths: Iterable[str]) -> str:
    parts: list[str] | None = None
    for p in paths:
        atoms = p.split(".") if p else []
        if parts is None:
            parts = atoms
            continue
        k = 0
        while k < min(len(parts), len(atoms)) and parts[k] == atoms[k]:
            k += 1
        parts = parts[:k]
        if not parts:
            return ""
    return ".".join(parts or [])


def _within(path: str, scope: str) -> bool:
    return path == scope or path.startswith(scope + ".")


def _meta(node: fx.Node):
    tm = node.meta.get("tensor_meta")
    return tm if hasattr(tm, "shape") and hasattr(tm, "dtype") else None


def _fmt_shape(tm) -> str:
    return f"{tuple(tm.shape)} {str(tm.dtype).replace('torch.', '')}"


def _add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, float | None] | None:
    """``(a, b, alpha)`` of an add of two graph values, else None (``a + alpha * b``)."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        args = list(node.args)
        if node.target is torch.add:
            if "input" in node.kwargs:
                args.insert(0, node.kwargs["input"])
            if "other" in node.kwargs:
                args.insert(1, node.kwargs["other"])
            if node.kwargs.get("out") is not None:
                return None
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        args = list(node.args)
        if "other" in node.kwargs:
            args.insert(1, node.kwargs["other"])
    else:
        return None
    if len(args) < 2 or not all(isinstance(a, fx.Node) for a in args[:2]):
        return None
    alpha = args[2] if len(args) > 2 else node.kwargs.get("alpha")
    if alpha is not None and not isinstance(alpha, (int, float)):
        return None
    return args[0], args[1], (None if alpha in (None, 1) else float(alpha))


def _is_inplace(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.kwargs.get("inplace") is True or (name.endswith("_") and not name.startswith("_")):
            return True
        return node.target in (operator.iadd, operator.imul, operator.isub, operator.itruediv)
    if node.op == "call_module":
        return getattr(modules.get(str(node.target)), "inplace", False) is True
    return False


class _Graph:
    """The data flow of an fx graph as a networkx DiGraph, with graph positions."""

    def __init__(self, graph: fx.Graph, modules: Mapping[str, nn.Module]):
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.modules = modules
        self.dg = nx.DiGraph()
        self.dg.add_nodes_from(self.nodes)
        self.dg.add_edges_from((i, n) for n in self.nodes for i in n.all_input_nodes)
        self.shapes_known = any(_meta(n) is not None for n in self.nodes)

    def descendants_before(self, x: fx.Node, stop: int) -> set[fx.Node]:
        """Nodes computed from ``x`` that come before position ``stop`` (visits only those)."""
        succ, index = self.dg.succ, self.index
        found: set[fx.Node] = set()
        todo = [x]
        while todo:
            for u in succ[todo.pop()]:
                if u not in found and index[u] < stop:
                    found.add(u)
                    todo.append(u)
        return found

    def resolve_identity(self, node: fx.Node) -> fx.Node:
        """See through identity-like modules (``nn.Identity``, dropout with p = 0) that only
        feed the skip."""
        while node.op == "call_module" and len(node.args) == 1 and len(node.users) == 1:
            m = self.modules.get(str(node.target))
            identity = isinstance(m, _IDENTITY_MODULES) or (
                isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0
            )
            if not identity or not isinstance(node.args[0], fx.Node):
                break
            node = node.args[0]
        return node

    def fork(self, p: fx.Node, q: fx.Node, limit: int = 512):
        """Latest common ancestor of ``p`` and ``q`` and the nodes on each side, or None.

        Walks backwards in decreasing graph position, so it looks only at nodes after the
        common ancestor, and gives up after ``limit`` steps.
        """
        marks = {p: 1, q: 2}
        heap = [(-self.index[p], p), (-self.index[q], q)]
        count = {1: 1, 2: 1, 3: 0}
        sides: dict[int, list[fx.Node]] = {1: [], 2: []}
        for _ in range(limit):
            if not heap or (count[3] == 0 and (count[1] == 0 or count[2] == 0)):
                return None
            _, n = heapq.heappop(heap)
            m = marks[n]
            count[m] -= 1
            if m == 3:
                return n, sides[1], sides[2]
            sides[m].append(n)
            for u in n.all_input_nodes:
                old = marks.get(u, 0)
                new = old | m
                if old == 0:
                    heapq.heappush(heap, (-self.index[u], u))
                elif new == old:
                    continue
                else:
                    count[old] -= 1
                marks[u] = new
                count[new] += 1
        return None

    def has_parameters(self, nodes: Iterable[fx.Node], context: Iterable[fx.Node]) -> bool:
        for n in nodes:
            if n.op == "call_module":
                m = self.modules.get(str(n.target))
                if m is not None and any(True for _ in m.parameters()):
                    return True
        for c in context:
            if c.op == "get_attr":
                if isinstance(_get_attr(self.modules, str(c.target)), nn.Parameter):
                    return True
            elif c.op == "call_module" and isinstance(
                self.modules.get(str(c.target)), TrainingFlag
            ):
                continue
            elif _meta(c) is not None or not self.shapes_known:
                return True  # a tensor from outside: an embedding, a mask, a weight
        return False

    def is_parameter_like(self, node: fx.Node) -> bool:
        """A ``get_attr`` (parameter, buffer, constant) or a train/eval flag."""
        if node.op == "get_attr":
            return True
        return node.op == "call_module" and isinstance(
            self.modules.get(str(node.target)), TrainingFlag
        )

    def shape_preserving(self, node: fx.Node, prev: fx.Node, inside: set[fx.Node]) -> bool:
        """Whether ``node`` maps ``prev`` to a value of the same shape, per element / norm."""
        if not node.args or node.args[0] is not prev:
            return False
        if any(i is not prev and i in inside for i in node.all_input_nodes):
            return False
        if node.op == "call_module":
            ok = isinstance(self.modules.get(str(node.target)), SHAPE_PRESERVING_MODULES)
        elif node.op == "call_function":
            ok = node.target in SHAPE_PRESERVING_FUNCTIONS
        elif node.op == "call_method":
            ok = node.target in SHAPE_PRESERVING_METHODS
        else:
            ok = False
        a, b = _meta(prev), _meta(node)
        if ok and a is not None:
            ok = b is not None and a.shape == b.shape and a.dtype == b.dtype
        return ok


def _get_attr(modules: Mapping[str, nn.Module], target: str) -> object:
    owner, _, name = target.rpartition(".")
    m = modules.get(owner)
    return getattr(m, name, None) if m is not None else None


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


def _candidate(g: _Graph, add: fx.Node) -> _Candidate | str | None:
    """A residual add (``x + F(x)``), the reason a residual-looking add is not one, or None."""
    ops = _add_operands(add)
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
            tx, ty = _meta(x), _meta(add)
            if tx is not None and ty is not None and tx.shape != ty.shape:
                return None  # the add broadcasts x to a larger shape: not a residual connection
            if alpha is not None and pos == 1:
                return f"the skip is scaled (alpha={alpha:g}): not x + F(x)"
            return _Candidate(add, x, skip, branch, inner, alpha if pos == 0 else None)
    # Two branches from one value: a projection shortcut such as downsample(x) + F(x)?
    ta, tb = _meta(a), _meta(b)
    if ta is not None and tb is not None and ta.shape != tb.shape:
        return None
    found = g.fork(a, b)
    if found is None:
        return None
    fork, side_a, side_b = found
    # Both paths must start at the fork and read nothing else but parameters.
    sides = {fork, *side_a, *side_b}
    for n in sides - {fork}:
        for i in n.all_input_nodes:
            if i not in sides and not g.is_parameter_like(i):
                return None
    short, long_ = (side_a, side_b) if len(side_a) <= len(side_b) else (side_b, side_a)
    if len(short) > 8 or not g.has_parameters(short, ()) or not g.has_parameters(long_, ()):
        return None
    where = _common_path(module_path(n) for n in short if n.op == "call_module")
    via = f"`{where}`" if where else ", ".join(f"`{n.name}`" for n in short)
    return f"projection shortcut: {via} maps the input `{fork.name}` (the skip is not the identity)"


_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim"})
_META_METHODS = frozenset({"size", "dim", "numel"})
_META_ARITHMETIC = frozenset(
    {operator.getitem, operator.mul, operator.add, operator.sub, operator.floordiv,
     operator.truediv, operator.mod, operator.neg}
)  # fmt: skip


def _metadata_read(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1:
        return n.args[1] in _META_ATTRS
    return n.op == "call_method" and n.target in _META_METHODS


def _release_metadata(g: _Graph, c: _Candidate) -> None:
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
        if _metadata_read(n) or (inputs and c.entry not in n.all_input_nodes):
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


def _reads_values(g: _Graph, c: _Candidate) -> bool:
    """Whether F's output depends on the values of ``x``, not only on its shape, dtype or
    device (``x[:, :, -1]`` read only for its shape does not count)."""
    valued = {c.entry}
    for n in sorted(c.inner, key=g.index.__getitem__):
        if not _metadata_read(n) and any(i in valued for i in n.all_input_nodes):
            valued.add(n)
    return c.branch in valued


def _check(g: _Graph, c: _Candidate, accepted_adds: set[fx.Node]) -> str | None:
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
    tx = _meta(x)
    if g.shapes_known and tx is None:
        return f"the input `{x.name}` is not a tensor"
    if tx is not None:
        if not tx.dtype.is_floating_point:
            return f"the input `{x.name}` is not floating-point ({_fmt_shape(tx)})"
        tb = _meta(c.branch)
        if tb is None or tb.shape != tx.shape or tb.dtype != tx.dtype:
            got = _fmt_shape(tb) if tb is not None else "not a tensor"
            return f"F(x) is {got}, the input is {_fmt_shape(tx)}: shape or dtype changes"
    nested = [n for n in inner if n in accepted_adds]
    if nested:
        return (
            f"encloses {len(nested)} other residual block(s) (converted on their own): "
            f"an outer skip connection, not a chain element"
        )
    if not _reads_values(g, c):
        return (
            f"F reads only the shape of `{x.name}`, not its values (a position embedding?): "
            f"x + F(x) with F constant in x is no residual block"
        )
    _release_metadata(g, c)
    inner = c.inner
    for n in sorted(inner, key=g.index.__getitem__):
        for u in n.users:
            if u not in inner and u is not c.add:
                return f"`{n.name}` is computed inside the block and read by `{u.name}` outside it"
    for u in x.users:
        if u in inner and u.args and u.args[0] is x and _is_inplace(u, g.modules):
            return f"`{u.name}` modifies the block input in place"
    context = {i for n in inner for i in n.all_input_nodes if i not in inner and i is not x}
    if not g.has_parameters(inner, context):
        return "F has no parameters and reads nothing from outside: an elementwise expression"
    return None


def _make_block(g: _Graph, c: _Candidate, tail: list[fx.Node]) -> Block:
    region = set(c.inner) | {c.add, *tail}
    nodes = sorted(region, key=g.index.__getitem__)
    context: dict[fx.Node, None] = {}
    for n in nodes:
        for i in n.all_input_nodes:
            if i not in region and i is not c.entry:
                context.setdefault(i, None)
    ordered = sorted(context, key=g.index.__getitem__)
    # What reads only x's metadata may be code of the enclosing module (a mask built from
    # the batch size): it does not say where the block is.
    paths = [module_path(n) for n in nodes if n not in c.meta]
    path = _common_path(paths)
    if not path:
        path = _common_path(module_path(n) for n in c.inner if n is not c.skip)
    kind = "generalized" if tail else "pure"
    exit_ = tail[-1] if tail else c.add
    return Block(c.entry, c.add, c.branch, exit_, nodes, ordered, kind, path, c.alpha)


def _tails(g: _Graph, cands: list[_Candidate]) -> dict[_Candidate, list[fx.Node]]:
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
        if ops and ops[-1] in entries:
            tails[c] = ops  # leads into the next block: all of it belongs to this one
            continue
        scope = module_path(c.add)
        k = 0
        while scope and k < len(ops) and _within(module_path(ops[k]), scope):
            k += 1
        tails[c] = ops[:k]
    return tails


# -- chains ------------------------------------------------------------------------------------
def _selected(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or _within(path, p) for p in patterns)


def _as_patterns(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def find_chains(
    graph: fx.Graph,
    modules: Mapping[str, nn.Module],
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    min_blocks: int = 1,
) -> MatchResult:
    """Find residual blocks and chains of them in ``graph``.

    Parameters
    ----------
    graph : torch.fx.Graph
        A traced graph; ``node.meta["tensor_meta"]`` (from shape propagation) is used when
        present to check shapes and dtypes.
    modules : mapping of str to nn.Module
        ``dict(root.named_modules())`` for the graph's owner.
    include, exclude : str or iterable of str, optional
        Module paths or glob patterns (``"layer3"``, ``"features.*"``) of blocks to convert /
        not to convert; a path also selects everything under it. Left-out blocks split chains.
    min_blocks : int
        Chains with fewer blocks are not selected.

    Returns
    -------
    MatchResult

    Examples
    --------
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
    g = _Graph(graph, modules)
    skipped: list[SkippedAdd] = []
    cands: list[_Candidate] = []
    accepted_adds: set[fx.Node] = set()
    for node in g.nodes:
        found = _candidate(g, node)
        if found is None:
            continue
        if isinstance(found, str):
            skipped.append(SkippedAdd(node.name, module_path(node), found))
            continue
        why = _check(g, found, accepted_adds)
        if why is not None:
            skipped.append(SkippedAdd(node.name, module_path(node), why))
            continue
        cands.append(found)
        accepted_adds.add(node)

    tails = _tails(g, cands)
    blocks = [_make_block(g, c, tails[c]) for c in cands]

    # One block follows another when it starts from its exit and is the exit's only reader.
    links = nx.DiGraph()
    links.add_nodes_from(blocks)
    by_entry: dict[fx.Node, list[Block]] = {}
    for b in blocks:
        by_entry.setdefault(b.entry, []).append(b)
    for b in blocks:
        nxt = by_entry.get(b.exit, [])
        if len(nxt) == 1:
            region = set(nxt[0].nodes)
            if all(u in region for u in b.exit.users):
                links.add_edge(b, nxt[0])

    inc, exc = _as_patterns(include), _as_patterns(exclude)

    def wanted(b: Block) -> str:
        if inc is not None and not _selected(b.path, inc):
            return "not in include"
        if exc is not None and _selected(b.path, exc):
            return "excluded"
        return ""

    chains: list[Chain] = []
    for comp in nx.weakly_connected_components(links):
        ordered = sorted(comp, key=lambda b: g.index[b.add])
        run: list[Block] = []
        run_reason = None
        for b in [*ordered, None]:
            reason = wanted(b) if b is not None else None
            if run and (b is None or reason != run_reason):
                chains.append(Chain(run, not run_reason, run_reason or ""))
                run = []
            if b is not None:
                run.append(b)
                run_reason = reason
    chains.sort(key=lambda c: g.index[c.blocks[0].add])
    for c in chains:
        if c.selected and len(c.blocks) < min_blocks:
            c.selected = False
            c.reason = f"{len(c.blocks)} block(s) < min_blocks={min_blocks}"
    return MatchResult(chains, skipped)
