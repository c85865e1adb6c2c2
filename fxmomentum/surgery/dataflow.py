"""The data flow of a captured graph, as the matcher reads it.

:class:`DataFlow` is a graph's nodes as a networkx DiGraph with their positions, and the
questions the matcher asks of it (what is computed from a value before a point, where two values
last share an ancestor, whether a node maps a value to one of the same shape). The functions
below read single nodes: which module made them, what they add, whether they write in place.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Iterable, Mapping

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..capture import TrainingFlag
from ..capture.effects import is_inplace

__all__ = [
    "LAYOUT_FUNCTIONS",
    "LAYOUT_METHODS",
    "SHAPE_PRESERVING_FUNCTIONS",
    "SHAPE_PRESERVING_METHODS",
    "SHAPE_PRESERVING_MODULES",
    "DataFlow",
    "add_operands",
    "common_path",
    "format_meta",
    "get_attr",
    "is_cast",
    "is_identity_cast",
    "is_inplace",
    "is_layout",
    "is_metadata_read",
    "module_path",
    "tensor_meta",
]

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_IDENTITY_MODULES: tuple[type[nn.Module], ...] = (nn.Identity,)
#: Tensor methods that return their input's values where the result has the input's dtype
#: and shape: a cast to the same dtype (``residual.to(torch.float32)`` on float32), a copy.
_CAST_METHODS = frozenset(
    {"to", "type", "float", "double", "half", "bfloat16", "contiguous", "clone"}
)  # fmt: skip

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


def common_path(paths: Iterable[str]) -> str:
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


def tensor_meta(node: fx.Node):
    tm = node.meta.get("tensor_meta")
    return tm if hasattr(tm, "shape") and hasattr(tm, "dtype") else None


def format_meta(tm) -> str:
    return f"{tuple(tm.shape)} {str(tm.dtype).replace('torch.', '')}"


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node, float | None] | None:
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


#: Tensor methods and torch functions that move a tensor's elements without changing them
#: (the same numbers, another shape or order).
LAYOUT_METHODS = frozenset(
    {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "t",
     "movedim", "roll", "squeeze", "unsqueeze", "contiguous"}
)  # fmt: skip
LAYOUT_FUNCTIONS = frozenset(
    {torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.swapaxes, torch.t,
     torch.movedim, torch.roll, torch.squeeze, torch.unsqueeze, torch.unflatten}
)  # fmt: skip


def is_layout(node: fx.Node) -> bool:
    """Whether ``node`` only moves its first argument's elements (a reshape, a permute)."""
    if node.op == "call_method":
        return node.target in LAYOUT_METHODS
    return node.op == "call_function" and node.target in LAYOUT_FUNCTIONS


_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim"})
_META_METHODS = frozenset({"size", "dim", "numel"})


def is_metadata_read(node: fx.Node) -> bool:
    """Whether ``node`` reads a value's shape, dtype or device, not its elements
    (``x.shape``, ``x.size(1)``, ``x.device``).

    Examples
    --------
    >>> gm = fx.symbolic_trace(lambda x: x.new_zeros(x.shape[0]))
    >>> [is_metadata_read(n) for n in gm.graph.nodes]
    [False, True, False, False, False]
    """
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in _META_ATTRS
    return node.op == "call_method" and node.target in _META_METHODS


def is_cast(node: fx.Node) -> bool:
    """Whether ``node`` is a dtype cast or copy of a tensor (``x.to(torch.float32)``,
    ``x.float()``, ``x.clone()``), not a move to another device."""
    if node.op != "call_method" or node.target not in _CAST_METHODS:
        return False
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    rest = [*node.args[1:], *node.kwargs.values()]
    return "device" not in node.kwargs and all(
        isinstance(a, (torch.dtype, bool)) or a is None for a in rest
    )


def is_identity_cast(node: fx.Node) -> bool:
    """Whether ``node`` is a cast (:func:`is_cast`) that returns its input's values: its
    result has the input's dtype and shape (shapes known).

    Examples
    --------
    >>> gm = fx.symbolic_trace(lambda x: x.to(torch.float32))
    >>> cast = [n for n in gm.graph.nodes if n.op == "call_method"][0]
    >>> is_identity_cast(cast)  # without shapes it is not known
    False
    """
    if not is_cast(node):
        return False
    a, b = tensor_meta(node.args[0]), tensor_meta(node)
    return a is not None and b is not None and a.dtype == b.dtype and a.shape == b.shape


class DataFlow:
    """The data flow of an fx graph as a networkx DiGraph, with graph positions."""

    def __init__(self, graph: fx.Graph, modules: Mapping[str, nn.Module]):
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.modules = modules
        self.dg = nx.DiGraph()
        self.dg.add_nodes_from(self.nodes)
        self.dg.add_edges_from((i, n) for n in self.nodes for i in n.all_input_nodes)
        self.shapes_known = any(tensor_meta(n) is not None for n in self.nodes)

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

    def ancestors_within(self, node: fx.Node, among: set[fx.Node]) -> set[fx.Node]:
        """The nodes of ``among`` that ``node`` is computed from (through ``among`` only)."""
        found: set[fx.Node] = set()
        todo = [node]
        while todo:
            for i in todo.pop().all_input_nodes:
                if i in among and i not in found:
                    found.add(i)
                    todo.append(i)
        return found

    def resolve_identity(self, node: fx.Node) -> fx.Node:
        """See through identity-like modules (``nn.Identity``, dropout with p = 0) and casts
        to the same dtype (:func:`is_identity_cast`) that only feed the skip."""
        while len(node.users) == 1 and node.args and isinstance(node.args[0], fx.Node):
            if node.op == "call_module" and len(node.args) == 1:
                m = self.modules.get(str(node.target))
                identity = isinstance(m, _IDENTITY_MODULES) or (
                    isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0
                )
            else:
                identity = is_identity_cast(node)
            if not identity:
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
                if isinstance(get_attr(self.modules, str(c.target)), nn.Parameter):
                    return True
            elif c.op == "call_module" and isinstance(
                self.modules.get(str(c.target)), TrainingFlag
            ):
                continue
            elif tensor_meta(c) is not None or not self.shapes_known:
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
        a, b = tensor_meta(prev), tensor_meta(node)
        if ok and a is not None:
            ok = b is not None and a.shape == b.shape and a.dtype == b.dtype
        return ok


def get_attr(modules: Mapping[str, nn.Module], target: str) -> object:
    owner, _, name = target.rpartition(".")
    m = modules.get(owner)
    return getattr(m, name, None) if m is not None else None
