"""Shape-aware tracing: proxies that carry the example's values.

Plain torch.fx fails on Python code that looks at a tensor: ``if batch != ids.shape[0]``,
``for h in x.shape``, ``torch.finfo(x.dtype)``, ``range(n)`` with ``n`` read from a shape. With
example inputs, :class:`ShapedTracing` runs every operation it records on real values as it
records it, so each proxy knows the value it stands for, and

* a structural attribute (``dtype``, ``device``, ``is_nested``, ``ndim``, ``dim()``, ...)
  answers with the example's value;
* a proxy used in control flow, as an int (``int(n)``, ``range(n)``), by ``len`` or by
  iteration answers with the example's value too.

Each such answer is a *specialisation*, and the graph checks it: a ``torch._assert`` node
compares the value at run time with the example's and raises a clear error, naming the line of
the model's code that made the decision, on a call where it differs. Shapes themselves stay
symbolic (``x.view(b, n, -1)`` with ``b, n = x.shape[:2]`` reads the actual sizes), so the graph
serves other batch sizes and sequence lengths unless a check says it cannot.

Examples
--------
>>> import torch
>>> from torch import fx, nn
>>> class Net(nn.Module):
...     def forward(self, x):
...         if x.shape[0] > 1:
...             return x * 2
...         return x
>>> class Tracer(ShapedTracing, fx.Tracer):
...     pass
>>> tracer = Tracer()
>>> tracer.set_examples({"x": torch.ones(3, 2)})
>>> gm = fx.GraphModule(Net(), tracer.trace(Net()))
>>> gm(torch.ones(4, 2)).sum().item()
16.0
>>> len(tracer.checks)
1
"""

from __future__ import annotations

import contextlib
import linecache
import operator
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx import _symbolic_trace
from torch.fx.node import map_aggregate
from torch.fx.proxy import Attribute
from torch.utils._pytree import tree_map

from ..patches import GlobalNames, replaced
from .factories import is_random_draw, python_random

__all__ = [
    "EXAMPLE",
    "RandomBranch",
    "ShapedProxy",
    "ShapedTracing",
    "Specialisation",
    "Untraceable",
]

#: ``node.meta`` key of a node's example value.
EXAMPLE = "fxmomentum_example"

# A device stays a graph value (``torch.arange(n, device=x.device)`` is traced as such), so a
# converted graph still moves with ``.to()``; a dtype is answered (``torch.finfo(x.dtype)``
# cannot take a proxy) and checked.
_STRUCTURE_ATTRS = frozenset(
    {"dtype", "layout", "is_nested", "is_sparse", "is_quantized", "ndim"}
)  # fmt: skip
_STRUCTURE_METHODS = frozenset({"dim", "ndimension", "is_floating_point", "is_complex"})

# Packages whose frames are not the model's code (with the separator: torchvision's are).
_NOT_MODEL_CODE = tuple(
    os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__)
)
# fxmomentum's own code, which calls the tracer: a decision made in torch's own modules
# (``nn.TransformerDecoder`` traced as a submodule) is placed there, not in the caller.
_FXMOMENTUM = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_TORCH_MACHINERY = tuple(
    os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), *part)
    for part in (("fx", ""), ("nn", "modules", "module.py"))
)


class _Missing:
    def __repr__(self) -> str:
        return "<no example value>"


_MISSING: Any = _Missing()


class _Unknown(Exception):
    pass


class Untraceable(fx.proxy.TraceError):
    """A traced value the model's Python code needs concretely has no example value: the code
    cannot be traced (raised on purpose, unlike an error in the tracer itself)."""


class RandomBranch(Untraceable):
    """The model's Python code branches on a random draw made at every call (Hugging Face's
    layer drop: ``if torch.rand([]) < self.layerdrop: skip the layer``): a graph holds one
    path, and the draw picks one per call.

    Attributes
    ----------
    where : str
        ``file:line`` of the branch, in the model's code.
    """

    def __init__(self, where: str, line: str) -> None:
        code = f" (`{line}`)" if line else ""
        super().__init__(f"branches on a random draw at {where}{code}: a graph holds one path")
        self.where = where


@dataclass(frozen=True)
class Specialisation:
    """A value of the example that steered the model's Python code, checked at run time."""

    #: Where the decision was made (``file:line``), in the model's code.
    where: str
    #: What was decided, e.g. ``bool(ne) is False`` or ``len(size) == 2``.
    what: str
    #: Whether it depends on tensor values (not only on shapes, dtypes and devices).
    data: bool
    #: Whether it is torch's causal-mask hint (``is_causal``, which torch's transformer
    #: layers derive from the mask's values to pick a kernel): a model is called with one
    #: kind of mask, so the check holds where the model's own data-dependent branches may not.
    hint: bool = False

    @property
    def branches_on_data(self) -> bool:
        """Whether the model's own code branched on tensor values here (not a hint): a call
        with other values may take a path the graph does not hold."""
        return self.data and not self.hint


class ShapedProxy(fx.Proxy):
    """A proxy that answers structural questions with its example value (see module doc)."""

    def __getattr__(self, k: str) -> Any:
        if k in _STRUCTURE_ATTRS or k in _STRUCTURE_METHODS:
            found = self.tracer.structure(self, k)  # type: ignore[attr-defined]
            if found is not _MISSING:
                return found
        return _ShapedAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.length(self)  # type: ignore[attr-defined]

    # No __index__: torch's argument parsers would call it on a size in ``torch.ones((b, n))``
    # or ``torch.narrow(x, 1, 0, n)`` and bake the example's value in, where torch.fx traces
    # them. ``range(n)`` gets its ints from ShapedTracing.patch_range instead.
    def __int__(self) -> int:
        return self.tracer.to_int(self)  # type: ignore[attr-defined]


class _ShapedAttribute(Attribute, ShapedProxy):
    pass


def caller() -> tuple[str, str]:
    """``file:line`` of the innermost frame in the model's code (not torch's, not ours), and
    the text of that line."""
    frame = sys._getframe(1)
    torch_frame = None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_NOT_MODEL_CODE):
            if torch_frame is not None and path.startswith(_FXMOMENTUM):
                frame = torch_frame  # the module traced is torch's own
                path = os.path.abspath(frame.f_code.co_filename)
            line = linecache.getline(path, frame.f_lineno).strip()
            return f"{os.path.basename(path)}:{frame.f_lineno}", line
        if (
            torch_frame is None
            and path.startswith(_NOT_MODEL_CODE[1])
            and not path.startswith(_TORCH_MACHINERY)
        ):
            torch_frame = frame
        frame = frame.f_back
    return "?", ""


class ShapedTracing:
    """Mixin for a :class:`torch.fx.Tracer`: shape-aware tracing once :meth:`set_examples`
    has given the root's arguments; without it the tracer behaves as torch.fx's.

    Attributes
    ----------
    checks : list of Specialisation
        The decisions the traced graph checks at run time.
    """

    _examples: dict[str, Any] | None = None
    _running = False

    def set_examples(self, examples: Mapping[str, Any] | None) -> None:
        """Trace with these example values of the root's arguments (by parameter name;
        ``**kwargs`` by its own name), or plainly with None."""
        self._examples = None if examples is None else dict(examples)
        self.checks: list[Specialisation] = []
        if examples is not None:
            # A buffer read in forward is a graph value too (``self.pos.expand(b, -1)``, with
            # b a proxy, is beyond a tensor's own argument parsing).
            self.proxy_buffer_attributes = True
        self._checked: set[tuple[fx.Node, str]] = set()
        self._range_names = GlobalNames()

    @property
    def shaped(self) -> bool:
        return self._examples is not None

    @contextlib.contextmanager
    def symbolic_indexing(self) -> Iterator[None]:
        """Trace ``t[:, :n]`` on a tensor that is not a proxy (a buffer) with a proxy ``n``,
        which torch.fx cannot (the tensor's own indexing wants an int)."""
        original = torch.Tensor.__getitem__
        tracer = self

        def getitem(t: torch.Tensor, index: Any) -> Any:
            if _holds_proxy(index):
                return tracer.create_proxy("call_function", operator.getitem, (t, index), {})  # type: ignore[attr-defined]
            return original(t, index)

        with replaced(torch.Tensor, {"__getitem__": getitem}):
            yield

    def patch_range(self, fn_globals: dict[str, Any]) -> None:
        """Make ``range`` in the code with these globals take traced ints (``range(n)`` with
        ``n`` read from a shape), each checked like ``int(n)``, until :meth:`unpatch_range`."""
        if self._examples is not None:
            self._range_names.add(fn_globals, "range", _range)

    def unpatch_range(self) -> None:
        """Undo :meth:`patch_range` (the end of a trace)."""
        names = getattr(self, "_range_names", None)
        if names is not None:
            names.remove()

    @property
    def recording(self) -> bool:
        """False while real code runs in the middle of the trace (an example's operation)."""
        return not self._running

    # -- proxies carry their example ----------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        if self._examples is None:
            return super().proxy(node)  # type: ignore[misc]
        return ShapedProxy(node, self)  # type: ignore[arg-type]

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **kw: Any):
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)  # type: ignore[misc]
        if self._examples is not None and EXAMPLE not in proxy.node.meta:
            proxy.node.meta[EXAMPLE] = self._evaluate(kind, target, args, kwargs)
        return proxy

    def concrete_value(self, a: Any) -> Any:
        """The example value of a traced argument (override for other stand-ins)."""
        if isinstance(a, fx.Proxy):
            value = self.example_of(a.node)
            if value is _MISSING:
                raise _Unknown
            return value
        if isinstance(a, fx.Node):
            return self.concrete_value(fx.Proxy(a, self))  # type: ignore[arg-type]
        return a

    def example_of(self, node: fx.Node) -> Any:
        """The example value of ``node``, or a marker for none."""
        if EXAMPLE in node.meta:
            return node.meta[EXAMPLE]
        value = _MISSING
        if node.op in ("get_attr", "call_module"):
            value = self._run(node.op, node.target, node.args, node.kwargs)
        node.meta[EXAMPLE] = value
        return value

    def _evaluate(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            name = str(target).lstrip("*")
            if name in self._examples:  # type: ignore[operator]
                value = self._examples[name]  # type: ignore[index]
            else:
                # A fixed argument's placeholder is ``name_1``: its value is the fixed one.
                base, _, _ = name.rpartition("_")
                value = self._examples.get(base, _MISSING)  # type: ignore[union-attr]
            # The example runs in place where the model does: not on the caller's tensors.
            return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)
        return self._run(kind, target, args, kwargs)

    def _run(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        try:
            a = map_aggregate(args, self.concrete_value)
            k = map_aggregate(kwargs, self.concrete_value)
        except _Unknown:
            return _MISSING
        # torch.fx patches nn.Module.__call__ and __getattr__ while it traces: the example
        # runs the real ones. Without grad: an autograd graph per value would hold every
        # activation's saved tensors as well.
        with _symbolic_trace._maybe_revert_all_patches(), torch.no_grad(), self._real_code():
            try:
                if kind == "call_function":
                    return target(*a, **k)
                if kind == "call_method":
                    return getattr(a[0], target)(*a[1:], **k)
                if kind == "call_module":
                    return self.root.get_submodule(target)(*a, **k)  # type: ignore[attr-defined]
                if kind == "get_attr":
                    value = self.root  # type: ignore[attr-defined]
                    for name in str(target).split("."):
                        value = getattr(value, name)
                    return value
            except Exception:
                return _MISSING
        return _MISSING

    @contextlib.contextmanager
    def _real_code(self) -> Iterator[None]:
        running, self._running = self._running, True
        try:
            yield
        finally:
            self._running = running

    def forget_examples(self) -> None:
        """Drop the example values from the traced graph's nodes (each holds an activation
        of the example's forward)."""
        graph = getattr(self, "graph", None)
        if graph is not None:
            for node in graph.nodes:
                node.meta.pop(EXAMPLE, None)

    # -- answers, each checked in the graph ---------------------------------------------------
    def _known(self, obj: fx.Proxy) -> Any:
        return self.example_of(obj.node) if self._examples is not None else _MISSING

    def _check(
        self, key: tuple[fx.Node, str], make_cond: Any, what: str, data: bool, hint: bool = False
    ) -> None:
        if key in self._checked:
            return
        self._checked.add(key)
        where, line = caller()
        code = f" (`{line}`)" if line else ""
        message = (
            f"{where}{code}: the graph was captured with example inputs for which {what}; "
            f"not so for this call, which takes another path through the model's code. "
            f"Convert again with example_inputs like this call's"
        )
        self.create_proxy("call_function", torch._assert, (make_cond(), message), {})
        self.checks.append(Specialisation(where, what, data, hint))

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self._known(obj)
        if value is _MISSING and _drawn(obj.node):
            raise RandomBranch(*caller())
        if value is _MISSING or _reads_requires_grad(obj.node):
            # The example runs without grad: whether a tensor requires grad is not known.
            return super().to_bool(obj)  # type: ignore[misc]
        result = bool(value)

        def cond() -> Any:
            # ``== False``, not ``not``: a graph is traced again when it is unpickled, and
            # ``not`` would ask the proxy for a bool.
            return (
                obj if result else self.create_proxy("call_function", operator.eq, (obj, False), {})
            )

        self._check((obj.node, "bool"), cond, f"it is {result}", _depends_on_data(obj.node))
        return result

    def to_int(self, obj: fx.Proxy) -> int:
        value = self._known(obj)
        if value is _MISSING:
            raise Untraceable(f"{obj.node.name} is used as an int and has no example value")
        result = operator.index(value)

        def cond() -> Any:
            return self.create_proxy("call_function", operator.eq, (obj, result), {})

        self._check((obj.node, "int"), cond, f"a value is {result}", _depends_on_data(obj.node))
        return result

    def length(self, obj: fx.Proxy) -> int:
        value = self._known(obj)
        if value is _MISSING:
            raise Untraceable(f"len() of {obj.node.name}, which has no example value")
        if not hasattr(value, "__len__"):
            # The model's code takes the traced value for a sequence where the example's is
            # not one (a flag where a list of layers may be given): another path than the
            # example's, which the graph cannot hold.
            raise Untraceable(
                f"len() of {obj.node.name}, whose example value is a {type(value).__name__}"
            )
        result = len(value)

        def cond() -> Any:
            size = self.create_proxy("call_function", len, (obj,), {})
            return self.create_proxy("call_function", operator.eq, (size, result), {})

        self._check((obj.node, "len"), cond, f"a length is {result}", False)
        return result

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        value = self._known(obj)
        if value is _MISSING or isinstance(value, Mapping):
            return super().iter(obj)  # type: ignore[misc]
        return iter([obj[i] for i in range(self.length(obj))])

    def structure(self, obj: fx.Proxy, attr: str) -> Any:
        """``obj.<attr>`` (or the method ``attr``) answered with the example tensor's value."""
        value = self._known(obj)
        if not isinstance(value, torch.Tensor):
            return _MISSING
        method = attr in _STRUCTURE_METHODS
        result = getattr(value, attr)() if method else getattr(value, attr)

        def cond() -> Any:
            if method:
                read = self.create_proxy("call_method", attr, (obj,), {})
            else:
                read = self.create_proxy("call_function", getattr, (obj, attr), {})
            return self.create_proxy("call_function", operator.eq, (read, result), {})

        what = f"`{attr}{'()' if method else ''}` is {result}"
        self._check((obj.node, attr), cond, what, False)
        return (lambda *args, **kwargs: result) if method else result


def _range(*args: Any) -> range:
    return range(*(int(a) if isinstance(a, fx.Proxy) else a for a in args))


def _computed_from(
    node: fx.Node, found: Callable[[fx.Node], bool], through_tensors: bool = False
) -> bool:
    """Whether ``found`` holds for ``node`` or a node its value is computed from through
    values that are not tensors (a tensor ends the search: its sizes are not its data), or
    through every value with ``through_tensors``."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if found(n):
            return True
        if through_tensors or not isinstance(n.meta.get(EXAMPLE), torch.Tensor):
            todo.extend(n.all_input_nodes)
    return False


def _drawn(node: fx.Node) -> bool:
    """Whether ``node`` is computed from a random draw made at run time."""
    return _computed_from(node, is_random_draw, through_tensors=True)


def _reads_requires_grad(node: fx.Node) -> bool:
    return _computed_from(
        node,
        lambda n: (
            n.op == "call_function" and n.target is getattr and n.args[1:] == ("requires_grad",)
        ),
    )


def _holds_proxy(index: Any) -> bool:
    if isinstance(index, fx.Proxy):
        return True
    if isinstance(index, slice):
        return any(isinstance(i, fx.Proxy) for i in (index.start, index.stop, index.step))
    if isinstance(index, (tuple, list)):
        return any(_holds_proxy(i) for i in index)
    return False


def _depends_on_data(node: fx.Node) -> bool:
    """Whether ``node``'s value reads tensor contents or a random draw of Python's (not only
    sizes, dtypes, devices)."""
    if isinstance(node.meta.get(EXAMPLE, _MISSING), torch.Tensor):
        return True
    return _computed_from(node, lambda n: n.op == "call_function" and n.target is python_random)
