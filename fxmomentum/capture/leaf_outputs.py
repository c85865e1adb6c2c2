"""Outputs of an opaque submodule that the graph computes itself.

A submodule kept whole in a graph (a leaf: its ``forward`` branches on ``self.training``, or
cannot be traced) is one node, and every output of it is computed, as far as the graph
shows, from every input. Some outputs are not: T5's first attention layer returns, besides
its output, the relative position bias it computed from its parameter and the lengths of its
inputs, and every later layer returns the bias it was given. Read by the next layers, such an
output ties each residual block to the next through the opaque node.

:func:`compute_leaf_outputs` traces the submodule on its own, as the model called it, takes
the code that computes the output (reads of an intermediate value's length or device are
taken from the submodule's inputs where its code shows where they come from: the dimension a
``view`` was given, a ``transpose`` of it), and puts that code into the graph right after the
node; what read the output reads the graph's value instead. An output that is one of the
inputs is that input. The graph checks at run time that the submodule returned the same
values (the same tensor, for an input it returns), and raises a clear error where not: the
traced code serves the calls that take the path the example took, and the check says so
where one does not.

Examples
--------
>>> import copy
>>> import torch
>>> from torch import nn
>>> from fxmomentum.capture import capture
>>> class Gated(nn.Module):  # branches on self.training: kept whole in the graph
...     def __init__(self):
...         super().__init__()
...         self.f = nn.Linear(4, 4)
...         self.table = nn.Parameter(torch.randn(16, 4))
...     def forward(self, x):
...         bias = self.table[: x.shape[1]]
...         return (self.f(x) if self.training else self.f(x) * 2), bias
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.gated = Gated()
...     def forward(self, x):
...         out = self.gated(x)
...         return out[0] + out[1]
>>> model, x = Net(), torch.randn(2, 5, 4)
>>> cap = capture(model, x)
>>> [leaf.path for leaf in cap.leaves]
['gated']
>>> bias = next(n for n in cap.graph.nodes if n.name == "getitem_1")
>>> found = compute_leaf_outputs(cap, model, (x,), [bias])
>>> found.computed, [n.target for n in found.graph.nodes if n.op == "get_attr"]
(['getitem_1'], ['gated.table'])
>>> found.graph.print_tabular()  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import one_line
from .effects import side_effect
from .records import CallRecord, record_calls
from .results import Capture, CaptureError
from .trace import capture
from .tracer import FLAG_NAME

__all__ = ["LeafOutputs", "check_leaf_output", "compute_leaf_outputs", "leaf_output_of"]

#: Tensor methods that keep the elements' device.
_SAME_DEVICE_METHODS = frozenset(
    {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "t",
     "squeeze", "unsqueeze", "contiguous", "clone", "float", "double", "half", "bfloat16"}
)  # fmt: skip
#: Tensor methods that return their input's shape (the elements may change).
_SAME_SHAPE_METHODS = frozenset({"contiguous", "clone", "float", "double", "half", "bfloat16"})


@dataclass
class LeafOutputs:
    """What :func:`compute_leaf_outputs` did.

    Attributes
    ----------
    graph : torch.fx.Graph
        A copy of the graph in which the outputs it could compute are computed.
    computed : list of str
        The names of the output nodes (``getitem`` of a leaf) now computed by the graph.
    notes : list of (str, str)
        What the report should say, by module path (relative to the captured module): each
        output computed, and each that could not be.
    """

    graph: fx.Graph
    computed: list[str] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)


def leaf_output_of(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(leaf call, index)`` where ``node`` is ``leaf(...)[index]`` of a submodule's call,
    else None."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    call, index = node.args[0], node.args[1]
    if not isinstance(call, fx.Node) or call.op != "call_module" or not isinstance(index, int):
        return None
    return call, index


def check_leaf_output(value: Any, computed: Any, message: str) -> None:
    """Raise ``AssertionError(message)`` unless the submodule's output ``value`` is
    ``computed`` or holds the same values (same dtype, shape and elements)."""
    if value is computed:
        return
    same = (
        isinstance(value, torch.Tensor)
        and isinstance(computed, torch.Tensor)
        and value.dtype == computed.dtype
        and value.shape == computed.shape
        and value.device == computed.device
        and torch.equal(value, computed)
    )
    if not same:
        raise AssertionError(message)


def compute_leaf_outputs(
    cap: Capture, model: nn.Module, example_inputs: Sequence[Any], outputs: Iterable[fx.Node]
) -> LeafOutputs:
    """A copy of ``cap.graph`` that computes what it can of ``outputs`` itself (see the module
    doc).

    Parameters
    ----------
    cap : Capture
        A captured module (``cap.root``).
    model : nn.Module
        The whole model ``cap.root`` belongs to (``cap.root`` itself when it was captured
        whole), run on ``example_inputs`` to record how it calls the leaves.
    example_inputs : sequence
        The model's positional inputs.
    outputs : iterable of torch.fx.Node
        Nodes of ``cap.graph`` that are an output of a leaf (:func:`leaf_output_of`).

    Returns
    -------
    LeafOutputs
    """
    graph = copy.deepcopy(cap.graph)
    result = LeafOutputs(graph)
    named = {n.name: n for n in graph.nodes}
    wanted = [named[n.name] for n in outputs if leaf_output_of(n) is not None]
    leaves = {str(leaf_output_of(n)[0].target) for n in wanted}  # type: ignore[index]
    modules = {path: cap.root.get_submodule(path) for path in leaves}
    try:
        records = record_calls(model, example_inputs, modules.values())
    except Exception as e:
        why = (
            f"its outputs are not computed in the graph: the model fails on its example "
            f"inputs ({one_line(e, 120)})"
        )
        result.notes += [(path, why) for path in modules]
        return result
    traced: dict[str, Capture | str] = {}
    for node in wanted:
        call, index = leaf_output_of(node)  # type: ignore[misc]
        path = str(call.target)
        if path not in traced:
            traced[path] = _trace_leaf(modules[path], records.get(id(modules[path])))
        leaf = traced[path]
        found = leaf if isinstance(leaf, str) else _inline(graph, node, call, index, leaf, modules)
        what = f"{type(modules[path]).__name__} (kept whole): its output {index} (`{node.name}`)"
        if isinstance(found, str):
            result.notes.append((path, f"{what} {found}"))
            continue
        result.computed.append(node.name)
        result.notes.append((path, f"{what} {_how(found, call)}"))
    graph.lint()
    return result


def _how(value: fx.Node, call: fx.Node) -> str:
    """How the graph gives a leaf's output that ``value`` computes, in words."""
    if value in call.all_input_nodes:
        how = f"is its input `{value.name}`, which later code reads instead"
    else:
        how = (
            "does not depend on its inputs' values: the graph computes it from the module's "
            "code traced on the example, which later code reads instead"
        )
    return f"{how}; the graph checks at run time that the module returns the same"


def _trace_leaf(module: nn.Module, record: CallRecord | None) -> Capture | str:
    """``module``'s graph, traced on its own as the model called it, or why not."""
    if record is None:
        return "is not computed in the graph: the module was not called on the example inputs"
    if record.calls != 1 or record.differing:
        return "is not computed in the graph: the module is called more than once"
    try:
        return capture(copy.deepcopy(module), call=record, shape_aware=True, one_mode=True)
    except CaptureError as e:
        return f"is not computed in the graph: the module's code does not trace ({e.reason})"


def _inline(
    graph: fx.Graph,
    node: fx.Node,
    call: fx.Node,
    index: int,
    leaf: Capture,
    modules: Mapping[str, nn.Module],
) -> fx.Node | str:
    """Compute output ``index`` of the leaf ``call`` in ``graph`` from the leaf's graph, and
    check it against ``node``: the node computing it, or why it cannot be (``modules``: the
    leaves by path)."""
    path = str(call.target)
    out = _output(leaf.graph, index)
    if out is None:
        return f"is not computed in the graph: the module does not return a tuple of {index + 1}"
    arguments = _arguments(leaf.root, call)
    if arguments is None:
        return "is not computed in the graph: its arguments do not match its forward"
    if isinstance(out, fx.Node):
        _read_from_inputs(leaf.graph)
        nodes = _ancestors(out)
        why = _refused(nodes, dict(leaf.root.named_modules()), arguments, modules[path])
        if why is not None:
            return f"is not computed in the graph: {why}"
        value = _copy_into(graph, call, nodes, arguments, path)[out]
    else:
        value = out
    if not isinstance(value, fx.Node):
        return "is not computed in the graph: it is a constant"
    node.replace_all_uses_with(value)
    message = (
        f"`{path}` returned another output {index} than the code fxmomentum traced from it "
        f"on the example inputs computes (the graph computes that output itself: later "
        f"blocks read it). Convert the model with example inputs that take the path this "
        f"call takes"
    )
    with graph.inserting_after(node):
        check = graph.call_function(check_leaf_output, (node, value, message))
    check.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
    return value


def _output(graph: fx.Graph, index: int) -> Any:
    """Element ``index`` of what ``graph`` returns (a tuple or list), or None."""
    returned = next(n for n in graph.nodes if n.op == "output").args[0]
    if not isinstance(returned, (tuple, list)) or index >= len(returned):
        return None
    return returned[index]


def _arguments(module: nn.Module, call: fx.Node) -> dict[str, Any] | None:
    """Each parameter of ``module.forward`` to what ``call`` passes it (defaults included)."""
    try:
        bound = inspect.signature(module.forward).bind(*call.args, **call.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _ancestors(out: fx.Node) -> list[fx.Node]:
    """``out`` and what it is computed from, in graph order."""
    found: set[fx.Node] = set()
    todo = [out]
    while todo:
        n = todo.pop()
        if n not in found:
            found.add(n)
            todo.extend(n.all_input_nodes)
    return [n for n in out.graph.nodes if n in found]


def _refused(
    nodes: list[fx.Node],
    modules: Mapping[str, nn.Module],
    arguments: Mapping[str, Any],
    original: nn.Module,
) -> str | None:
    """Why the leaf's code ``nodes`` cannot run in the graph besides the leaf (``original``,
    whose traced copy's modules are ``modules``), or None. It may read its inputs' shapes,
    dtypes and devices, not their values: the graph would compute again what the leaf
    does."""
    for n in nodes:
        if n.op == "placeholder":
            name = str(n.target).lstrip("*")
            if str(n.target).startswith("*") or name not in arguments:
                return f"it reads `{n.target}`"
            continue
        if n.op == "get_attr" and not _has_attribute(original, str(n.target)):
            return f"it reads `{n.target}`, which only its trace holds"
        read = next((i for i in n.all_input_nodes if i.op == "placeholder"), None)
        if read is not None and not _metadata_read(n):
            return f"it is computed from the values of the module's input `{read.target}`"
        if n.op == "call_module" and str(n.target).split(".")[-1] == FLAG_NAME:
            return "it depends on the mode (train or eval)"
        why = side_effect(n, modules)
        if why is not None:
            return f"its code `{n.name}` {why}"
    return None


def _metadata_read(n: fx.Node) -> bool:
    """A read of a tensor's shape, dtype or device (``x.shape``, ``x.size(1)``)."""
    if n.op == "call_function" and n.target is getattr:
        return n.args[1] in ("shape", "dtype", "device", "ndim")
    return n.op == "call_method" and n.target in ("size", "dim", "numel")


def _has_attribute(module: nn.Module, target: str) -> bool:
    obj: Any = module
    for atom in target.split("."):
        if not hasattr(obj, atom):
            return False
        obj = getattr(obj, atom)
    return True


def _copy_into(
    graph: fx.Graph,
    call: fx.Node,
    nodes: list[fx.Node],
    arguments: Mapping[str, Any],
    path: str,
) -> dict[fx.Node, Any]:
    """Copy the leaf's ``nodes`` into ``graph`` right after ``call``, its placeholders bound
    to ``arguments`` and its module paths under ``path``; the copies by original."""
    env: dict[fx.Node, Any] = {}
    stack = dict(call.meta.get("nn_module_stack", {}))
    last = call
    for n in nodes:
        if n.op == "placeholder":
            env[n] = arguments[str(n.target)]
            continue
        with graph.inserting_after(last):
            new = graph.node_copy(n, env.__getitem__)
        if n.op in ("call_module", "get_attr"):
            new.target = f"{path}.{n.target}"
        new.meta = {k: n.meta[k] for k in ("tensor_meta", "type") if k in n.meta}
        new.meta["nn_module_stack"] = stack
        env[n] = last = new
    return env


# -- reads of an intermediate value's length or device, taken from the inputs ----------------
def _read_from_inputs(graph: fx.Graph) -> None:
    """Make reads of an intermediate value's device, or of one of its dimensions, read the
    leaf's input it comes from, where the code shows it (in place: ``graph`` is the leaf's
    own, traced for this)."""
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is getattr and n.args[1] == "device":
            source = _device_source(n.args[0])
            if source is not None and source is not n.args[0]:
                with graph.inserting_before(n):
                    read = graph.call_function(getattr, (source, "device"))
                n.replace_all_uses_with(read)
        dim = _dimension_read(n)
        if dim is not None and dim[0].op != "placeholder":
            found = _dimension_source(*dim)
            if found is not None:
                _replace(graph, n, found)


def _dimension_read(n: fx.Node) -> tuple[fx.Node, int] | None:
    """``(v, i)`` where ``n`` is ``v.shape[i]`` or ``v.size(i)`` with a constant ``i``."""
    if n.op == "call_method" and n.target == "size" and len(n.args) == 2:
        v, i = n.args
    elif n.op == "call_function" and n.target is operator.getitem:
        shape, i = n.args
        if not (isinstance(shape, fx.Node) and shape.op == "call_function"):
            return None
        if shape.target is not getattr or shape.args[1] != "shape":
            return None
        v = shape.args[0]
    else:
        return None
    if not isinstance(v, fx.Node) or not isinstance(i, int) or isinstance(i, bool):
        return None
    return v, i


def _ndim(v: fx.Node) -> int | None:
    meta = v.meta.get("tensor_meta")
    return len(meta.shape) if hasattr(meta, "shape") else None


def _dimension_source(v: fx.Node, i: int) -> fx.Node | int | tuple[fx.Node, int] | None:
    """Where dimension ``i`` of ``v`` comes from: a size the code passed (a node or a
    constant), or ``(input, dimension)`` of a leaf input; None where it does not show."""
    ndim = _ndim(v)
    if ndim is None or not -ndim <= i < ndim:
        return None
    i %= ndim
    if v.op == "placeholder":
        return v, i
    first = v.args[0] if v.args else None
    if not isinstance(first, fx.Node):
        return None
    if v.op == "call_method" and v.target in ("view", "reshape"):
        sizes = (
            v.args[1] if len(v.args) == 2 and isinstance(v.args[1], (tuple, list)) else v.args[1:]
        )
        if len(sizes) != ndim:
            return None
        size = sizes[i]
        if isinstance(size, fx.Node):
            return size
        return size if isinstance(size, int) and size >= 0 else None
    if v.op == "call_method" and v.target in ("transpose", "swapaxes"):
        a, b = (d % ndim for d in v.args[1:3])
        return _dimension_source(first, b if i == a else a if i == b else i)
    if v.op == "call_method" and v.target in _SAME_SHAPE_METHODS:
        return _dimension_source(first, i)
    if v.op == "call_module" and i < ndim - 1 and _is_linear(v):
        return _dimension_source(first, i)
    return None


def _is_linear(v: fx.Node) -> bool:
    owner = v.graph.owning_module
    module = owner.get_submodule(str(v.target)) if owner is not None else None
    return isinstance(module, nn.Linear)


def _device_source(v: Any) -> fx.Node | None:
    """The leaf input whose device ``v`` has, where its code shows it, else None."""
    while isinstance(v, fx.Node):
        if v.op == "placeholder":
            return v
        if v.op == "call_method" and v.target in _SAME_DEVICE_METHODS:
            v = v.args[0]
        elif v.op == "call_module" and type(_module_of(v)).__module__.startswith("torch.nn"):
            v = v.args[0] if v.args else None
        else:
            return None
    return None


def _module_of(v: fx.Node) -> nn.Module | None:
    owner = v.graph.owning_module
    return owner.get_submodule(str(v.target)) if owner is not None else None


def _replace(graph: fx.Graph, n: fx.Node, found: fx.Node | int | tuple[fx.Node, int]) -> None:
    """Make the users of ``n`` read ``found`` (a node, a constant, or a dimension of a leaf
    input, read here)."""
    if isinstance(found, tuple):
        source, i = found
        with graph.inserting_before(n):
            shape = graph.call_function(getattr, (source, "shape"))
            found = graph.call_function(operator.getitem, (shape, i))
    if isinstance(found, fx.Node):
        n.replace_all_uses_with(found)
        return
    for user in list(n.users):
        user.args = fx.map_arg(user.args, lambda a: found if a is n else a)
        user.kwargs = fx.map_arg(user.kwargs, lambda a: found if a is n else a)
