"""Capture: a model as a torch.fx graph, with shapes, whatever the model.

:func:`capture` traces a module with :class:`CaptureTracer`, a :class:`torch.fx.Tracer` that

* turns a submodule that cannot be traced into a leaf (an opaque ``call_module`` node) and
  traces again, instead of failing the whole model; each such leaf is recorded with the reason;
* keeps :class:`~fxmomentum.MomentumChain` modules whole, so a converted model can be captured
  (and converted) again;
* traces into torch's transformer layers (``nn.TransformerEncoderLayer`` and friends, which
  contain the residual connections), with torch's attention fast path turned off while tracing;
* does not bake ``self.training`` into the graph: a traced module that passes ``self.training``
  to a function (``F.dropout(x, p, self.training)``, torchvision's stochastic depth) reads it
  at run time through a small :class:`TrainingFlag` submodule, so ``.train()`` and ``.eval()``
  keep working; one that branches on ``self.training`` becomes a leaf.

Shapes and dtypes come from torch.fx's own :class:`~torch.fx.passes.shape_prop.ShapeProp`
run on example inputs (``node.meta["tensor_meta"]``), without changing the model's buffers or
the global random state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import math
import operator
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace
from torch.fx.passes.shape_prop import ShapeProp

from .engine import MomentumChain
from .factories import traced_factories
from .shaped import ShapedTracing, Specialisation, caller

__all__ = [
    "TRACE_INTO",
    "CallRecord",
    "Capture",
    "CaptureError",
    "CaptureTracer",
    "GraphCodeTracer",
    "GraphPerModeError",
    "LeafInfo",
    "ShapePropagationError",
    "Specialised",
    "TracingSnapshot",
    "TrainingFlag",
    "capture",
    "check_keywords",
    "check_none",
    "clear_shapes",
    "no_side_effects",
    "propagate_shapes",
    "record_calls",
    "specialise",
    "tracing_snapshot",
    "undo_tracing",
]

#: torch.nn modules that hold residual connections: traced into rather than kept whole.
TRACE_INTO: tuple[type[nn.Module], ...] = (
    nn.TransformerEncoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoder,
    nn.TransformerDecoderLayer,
)

#: Attribute name of the :class:`TrainingFlag` added to a module that passes ``self.training``.
FLAG_NAME = "_training_flag"
#: How a leaf's reason starts when the submodule's own forward failed to trace.
UNTRACEABLE = "not traceable"
#: Marks the nodes that check a graph's train / eval mode (see CaptureTracer.branch_on_training).
MODE_CHECK = "fxmomentum_mode_check"


class CaptureError(RuntimeError):
    """The model's own ``forward`` (not a submodule's) cannot be traced.

    Attributes
    ----------
    reason : str
        Why, in a few words (the message without its advice).
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = message if reason is None else reason


class GraphPerModeError(CaptureError):
    """The module's ``forward`` branches on ``self.training`` and traces to a different graph in
    train and eval mode, so no one graph serves both (pass ``one_mode=True`` to
    :func:`capture` to take the current mode's, which checks the mode at run time)."""


@dataclass(frozen=True)
class LeafInfo:
    """A submodule kept opaque in the graph.

    Attributes
    ----------
    path : str
        Module path, as in ``named_modules()``.
    type : str
        Class name of the module.
    reason : str
        Why it is a leaf.
    automatic : bool
        Made a leaf because tracing it failed or it branches on ``self.training`` (not
        requested, not a momentum chain): its own submodules may still be captured.
    """

    path: str
    type: str
    reason: str
    automatic: bool = False

    @property
    def module(self) -> str:
        """The module path (same as :attr:`path`)."""
        return self.path


class TrainingFlag(nn.Module):
    """Reads the train / eval mode at run time, for a traced module that passes it on.

    It is registered as a child of the module whose ``self.training`` it stands for, so
    ``.train()`` and ``.eval()`` set it together with that module. It has no parameters and no
    buffers (``state_dict`` keys do not change).

    Examples
    --------
    >>> flag = TrainingFlag()
    >>> flag.eval()()
    False
    """

    def forward(self) -> bool:
        return self.training


class _TrainingRead:
    """Stands in for ``module.training`` while the module's ``forward`` is traced."""

    __slots__ = ("module", "path", "tracer", "value")

    def __init__(self, tracer: CaptureTracer, module: nn.Module, path: str, value: bool):
        self.tracer, self.module, self.path, self.value = tracer, module, path, value

    def _branch(self) -> bool:
        self.tracer.branch_on_training(self)
        return self.value

    def __bool__(self) -> bool:
        return self._branch()

    def __index__(self) -> int:
        return int(self._branch())

    def __eq__(self, other: object) -> bool:
        return self._branch() == other

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return repr(self.value)


def check_keywords(
    kwargs: Mapping[str, Any], fixed: Mapping[str, Any], tensors: Sequence[str], name: str
) -> None:
    """Check at run time the ``**kwargs`` a graph was traced with (see :class:`CaptureTracer`).

    Raises
    ------
    AssertionError
        If ``kwargs`` has other keys than ``fixed`` and ``tensors``, or another value than
        ``fixed`` gives (the message names the difference, as torch.fx's own checks do).

    Examples
    --------
    >>> check_keywords({"mask": None}, {"mask": None}, (), "kwargs")
    >>> check_keywords({}, {"mask": None}, (), "kwargs")
    Traceback (most recent call last):
    ...
    AssertionError: **kwargs has been specialized to have keys ['mask'] but got []
    """
    keys = sorted([*fixed, *tensors])
    if sorted(kwargs) != keys:
        raise AssertionError(
            f"**{name} has been specialized to have keys {keys} but got {sorted(kwargs)}"
        )
    for key, value in fixed.items():
        got = kwargs[key]
        if type(got) is not type(value) or got != value:
            raise AssertionError(
                f"**{name} has been specialized to have {key}={value!r} but got {key}={got!r}"
            )


def check_none(value: Any, message: str) -> None:
    """Check at run time an argument a graph was traced with as None.

    Stands in for torch.fx's own ``_assert_is_none``: a graph module that calls that one
    cannot be pickled safely (once unpickled and compiled again, it registers a name that
    makes every later torch.fx trace in the process fail with a KeyError).

    Examples
    --------
    >>> check_none(None, "mask is fixed to None")
    >>> check_none(1, "mask is fixed to None")
    Traceback (most recent call last):
    ...
    AssertionError: mask is fixed to None
    """
    if value is not None:
        raise AssertionError(message)


class CaptureTracer(ShapedTracing, fx.Tracer):
    """A :class:`torch.fx.Tracer` for conversion.

    Parameters
    ----------
    leaves : mapping of str to str, optional
        Module paths to keep as leaves, with the reason.
    leaf_types : tuple of type
        Module classes to keep as leaves.
    autowrap_modules, autowrap_functions
        As for :class:`torch.fx.Tracer`. :func:`check_keywords` and :func:`check_none` stay
        calls in the graph (also when torch.fx traces the graph's code again, as unpickling
        does).
    var_keyword : mapping, optional
        What the traced ``forward``'s ``**kwargs`` holds (torch.fx's ``concrete_args``
        cannot fix it): None, flags, numbers and strings are fixed and checked at run time,
        tensors stay graph inputs (read from the ``**kwargs`` placeholder).
    examples : mapping, optional
        Example values of the root's arguments, by name: trace shape-aware (see
        :mod:`fxmomentum.shaped`), with the checks that makes in ``checks``.

    Attributes
    ----------
    failure : tuple or None
        After a failed :meth:`trace`: the module paths being traced when the error was raised
        (outermost first) and the exception.
    training_reads : dict of str to str
        Module paths whose ``forward`` read ``self.training``: ``"argument"`` (read at run time
        through a :class:`TrainingFlag`) or ``"control flow"`` (baked into the graph).
    branch_sites : dict of str to str
        For the ``"control flow"`` paths: where the ``forward`` branched first
        (``"file.py:12 (`if self.training:`)"``).
    unwrapped : list of str
        Names of the decorator wrappers of the root's ``forward`` that were not traced (see
        :meth:`create_args_for_root`).

    Examples
    --------
    >>> tracer = CaptureTracer()
    >>> graph = tracer.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    >>> [n.op for n in graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """

    def __init__(
        self,
        leaves: Mapping[str, str] | None = None,
        leaf_types: tuple[type, ...] = (),
        autowrap_modules: tuple[Any, ...] = (math,),
        autowrap_functions: tuple[Any, ...] = (check_keywords, check_none),
        var_keyword: Mapping[str, Any] | None = None,
        examples: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(autowrap_modules=autowrap_modules, autowrap_functions=autowrap_functions)
        self.set_examples(examples)
        self.var_keyword = None if var_keyword is None else dict(var_keyword)
        self.leaves = dict(leaves or {})
        self.leaf_types = tuple(leaf_types)
        self.failure: tuple[tuple[str, ...], BaseException] | None = None
        self.training_reads: dict[str, str] = {}
        self.branch_sites: dict[str, str] = {}
        self.unwrapped: list[str] = []
        self._stack: list[str] = []
        self._param_names: dict[int, str] = {}
        self._buffer_names: dict[int, str] = {}

    # -- leaves -------------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (MomentumChain, TrainingFlag)):
            return True
        if module_qualified_name in self.leaves or isinstance(m, self.leaf_types):
            return True
        if isinstance(m, TRACE_INTO):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    # -- tracing ------------------------------------------------------------------------------
    def create_args_for_root(
        self, root_fn: Any, is_module: bool, concrete_args: Any = None
    ) -> tuple[Any, list[Any]]:
        inner = inspect.unwrap(root_fn)
        code = inner.__code__
        if inner is not root_fn and (
            code.co_kwonlyargcount or code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS)
        ):
            # A decorator's ``(*args, **kwargs)`` wrapper around a forward with keyword-only
            # arguments or ``*args`` / ``**kwargs``: torch.fx rewrites the wrapper's code to
            # the wrapped function's signature, which breaks it (``co_varnames is too
            # small``). The wrapped function is traced instead.
            self.unwrapped.append(getattr(getattr(root_fn, "__code__", None), "co_name", "?"))
            root_fn = inner
        self.patch_range(getattr(root_fn, "__globals__", {}))
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if self.var_keyword is None or not code.co_flags & inspect.CO_VARKEYWORDS:
            return fn, args
        # torch.fx passes ``**kwargs`` as the last positional argument of the patched
        # function: a proxy, which cannot be unpacked into another call. Give it the dict.
        proxy = args[-1]
        name = str(proxy.node.target).lstrip("*")
        fixed = {k: v for k, v in self.var_keyword.items() if not isinstance(v, torch.Tensor)}
        tensors = tuple(k for k in self.var_keyword if k not in fixed)
        self.create_proxy("call_function", check_keywords, (proxy, fixed, tensors, name), {})
        values = {k: proxy[k] if k in tensors else v for k, v in self.var_keyword.items()}
        return fn, [*args[:-1], values]

    def trace(self, root: nn.Module | Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self.failure = None
        self.training_reads = {}
        self.branch_sites = {}
        self.unwrapped = []
        self._stack = []
        self.set_examples(self._examples)  # a new trace makes its own checks
        if isinstance(root, nn.Module):
            self._param_names, self._buffer_names = {}, {}
            for name, p in root.named_parameters():
                self._param_names.setdefault(id(p), name)
            for name, b in root.named_buffers():
                self._buffer_names.setdefault(id(b), name)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_transformers_traceable())
            stack.enter_context(traced_factories(self))
            stack.callback(self.unpatch_range)
            if isinstance(root, nn.Module):
                if self.shaped:
                    # The example runs as it is traced: buffers and the random state stay.
                    stack.enter_context(no_side_effects(root, grad=torch.is_grad_enabled()))
                    stack.enter_context(self.symbolic_indexing())
                stack.enter_context(self._training_read(root, ""))
            try:
                return super().trace(root, concrete_args)
            except Exception as e:
                if self.failure is None:
                    self.failure = ((), e)
                raise
            finally:
                self.forget_examples()

    def call_module(
        self,
        m: nn.Module,
        forward: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        path = self.path_of_module(m)
        self._stack.append(path)
        try:
            if self.is_leaf_module(m, path):
                return super().call_module(m, forward, args, kwargs)
            self.patch_range(getattr(getattr(m, "forward", None), "__globals__", {}))
            with self._training_read(m, path):
                return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            if self.failure is None:
                self.failure = (tuple(self._stack), e)
            raise
        finally:
            self._stack.pop()

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        # torch.fx searches all parameters for every access; a dictionary keeps tracing
        # linear in the size of the model.
        if isinstance(attr_val, nn.Parameter) and not self.param_shapes_constant:
            name = self._param_names.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def concrete_value(self, a: Any) -> Any:
        if isinstance(a, _TrainingRead):
            return a.value
        return super().concrete_value(a)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, _TrainingRead):
            return self._flag_node(a)
        if isinstance(a, torch.Tensor):
            names = self._param_names if isinstance(a, nn.Parameter) else self._buffer_names
            name = names.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        if (
            isinstance(a, dict)
            and type(a) is not dict
            and dataclasses.is_dataclass(a)
            and all(isinstance(k, str) for k in a)
        ):
            # A dataclass that is also a dict (Hugging Face's ModelOutput): torch.fx would
            # return a plain dict, which the caller cannot read by attribute or position.
            # Build the same class from its fields at run time.
            fields = {k: self.create_arg(v) for k, v in a.items()}
            return self.create_node("call_function", type(a), (), fields)
        return super().create_arg(a)

    # -- self.training ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _training_read(self, m: nn.Module, path: str) -> Iterator[None]:
        value = m.__dict__.get("training")
        if not isinstance(value, bool):  # already stood in for (a module calling itself)
            yield
            return
        m.__dict__["training"] = _TrainingRead(self, m, path, value)
        try:
            yield
        finally:
            m.__dict__["training"] = value

    def branch_on_training(self, read: _TrainingRead) -> None:
        """``read.module.training`` steers Python control flow: the graph takes the current
        mode's path and checks the mode at run time (a submodule that branches is made a leaf
        and traced again, so this check stays in the root's graph only)."""
        if self.training_reads.get(read.path) == "control flow":
            return
        self.training_reads[read.path] = "control flow"
        where, line = caller()
        self.branch_sites[read.path] = f"{where}{f' (`{line}`)' if line else ''}"
        mode, other = ("train", "eval") if read.value else ("eval", "train")
        message = (
            f"{type(read.module).__name__}.forward branches on self.training at "
            f"{self.branch_sites[read.path]}, and its graph was captured in {mode} mode; "
            f"this call is in {other} mode. Convert the model in the mode it runs in "
            f"(model.{other}() before fxmomentum.convert)"
        )
        flag = self._flag_node(read)
        same = self.create_node("call_function", operator.eq, (flag, read.value), {})
        check = self.create_node("call_function", torch._assert, (same, message), {})
        same.meta[MODE_CHECK] = check.meta[MODE_CHECK] = True

    def _flag_node(self, read: _TrainingRead) -> fx.Node:
        self.training_reads.setdefault(read.path, "argument")
        flag = read.module._modules.get(FLAG_NAME)
        if not isinstance(flag, TrainingFlag):
            flag = TrainingFlag()
            read.module.add_module(FLAG_NAME, flag)
        flag.training = read.value
        target = f"{read.path}.{FLAG_NAME}" if read.path else FLAG_NAME
        return self.create_node("call_module", target, (), {})


class GraphCodeTracer(CaptureTracer):
    """Traces a captured graph's own code again, as unpickling a GraphModule does.

    That code has no control flow, so buffers may be proxies: a buffer sliced to a traced
    length (``pos[:, :n]``, from a shape-aware capture) then traces as it did.
    """

    proxy_buffer_attributes = True


@contextlib.contextmanager
def _transformers_traceable() -> Iterator[None]:
    """Make torch's transformer layers traceable while tracing.

    Their inference fast path (taken in eval mode without grad) tests the input in Python; it
    is turned off, so the graph holds the regular path, which computes the same function.
    ``nn.TransformerEncoder`` measures the sequence length only to test a mask for causality:
    without a mask the length is not needed, and a proxy cannot be measured.
    """
    from torch.nn.modules import transformer

    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    seq_len = getattr(transformer, "_get_seq_len", None)

    def _seq_len(src: Any, batch_first: bool) -> int | None:
        if isinstance(src, fx.Proxy):
            return None
        return seq_len(src, batch_first)

    try:
        if fastpath is not None:
            mha.set_fastpath_enabled(False)
        if seq_len is not None:
            transformer._get_seq_len = _seq_len
        yield
    finally:
        if seq_len is not None:
            transformer._get_seq_len = seq_len
        if fastpath is not None:
            mha.set_fastpath_enabled(fastpath)


@dataclass
class Capture:
    """The result of :func:`capture`.

    Attributes
    ----------
    root : nn.Module
        The traced module (with any :class:`TrainingFlag` children added).
    graph : torch.fx.Graph
        Its graph.
    graph_module : torch.fx.GraphModule
        ``GraphModule(root, graph)``, sharing the modules of ``root``.
    leaves : list of LeafInfo
        Submodules made opaque and why (torch.nn's own leaf modules are not listed).
    shapes_verified : bool
        Whether shapes and dtypes were propagated from example inputs.
    notes : list of str
        Things the report should say (shape propagation failures, mode specialisation).
    inputs : tuple or None
        The positional inputs shapes were propagated from (``example_inputs``, or those of
        a recorded call), to run the graph again; None without shapes.
    var_keyword : dict or None
        What the graph's ``**kwargs`` placeholder receives with ``inputs`` (a recorded
        call's), else None.
    checks : list of Specialisation
        Values of the example that steered the model's code, which the graph checks at run
        time (a shape-aware trace, see :mod:`fxmomentum.shaped`).
    """

    root: nn.Module
    graph: fx.Graph
    graph_module: fx.GraphModule
    leaves: list[LeafInfo] = field(default_factory=list)
    shapes_verified: bool = False
    notes: list[str] = field(default_factory=list)
    inputs: tuple[Any, ...] | None = None
    var_keyword: dict[str, Any] | None = None
    checks: list[Specialisation] = field(default_factory=list)


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = msg[0] if msg else ""
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _leaf_arguments(
    model: nn.Module, leaf_modules: Iterable[str | type] | None
) -> tuple[dict[str, str], tuple[type, ...]]:
    paths: dict[str, str] = {}
    types: list[type] = []
    names = dict(model.named_modules())
    for item in leaf_modules or ():
        if isinstance(item, type):
            types.append(item)
        elif isinstance(item, str):
            if item not in names:
                raise ValueError(f"leaf_modules: {type(model).__name__} has no submodule {item!r}")
            paths[item] = "requested (leaf_modules)"
        else:
            raise TypeError(f"leaf_modules items are module paths or classes, got {item!r}")
    return paths, tuple(types)


def capture(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    leaf_modules: Iterable[str | type] | None = None,
    concrete_args: dict[str, Any] | None = None,
    call: CallRecord | None = None,
    shape_aware: bool = False,
    one_mode: bool = False,
) -> Capture:
    """Trace ``model`` with torch.fx; make untraceable submodules leaves; propagate shapes.

    ``model`` itself is traced: tracing may add :class:`TrainingFlag` children and tensor
    constants to it, so pass a copy when the model must stay untouched
    (:func:`fxmomentum.convert` does).

    With ``call`` (a submodule's call recorded by :func:`record_calls`), the arguments that
    were None, a bool, a number or a string are fixed to their recorded values (the graph
    checks them at run time and raises a clear error on another value), shapes are propagated
    from the recorded call, and the graph must return what the module returned, or
    :class:`CaptureError` is raised: such a graph would not work where the parent calls it.

    Parameters
    ----------
    model : nn.Module
        The module to trace.
    example_inputs : Tensor or sequence of Tensor, optional
        Positional inputs for shape propagation. Without them shapes stay unknown.
    leaf_modules : iterable of str or type, optional
        Module paths or classes to keep opaque.
    concrete_args : dict, optional
        Passed to :meth:`torch.fx.Tracer.trace` (for arguments that steer control flow).
    call : CallRecord, optional
        A recorded call to trace and check against (instead of ``example_inputs`` and
        ``concrete_args``).
    shape_aware : bool
        Where plain tracing of ``model.forward`` fails, trace it again with the example's
        values (see :mod:`fxmomentum.shaped`); needs example inputs or ``call``. The graph
        must return what the model returns on them.
    one_mode : bool
        Where ``model.forward`` branches on ``self.training`` and traces to a different graph
        in the other mode, take the current mode's graph, which checks the mode at run time
        and raises in the other one, instead of raising :class:`GraphPerModeError`.

    Returns
    -------
    Capture

    Raises
    ------
    CaptureError
        If the model's own ``forward`` cannot be traced (a submodule's failure makes that
        submodule a leaf instead), or its graph does not reproduce ``call``.
    GraphPerModeError
        If the model's own ``forward`` has a graph per mode and ``one_mode`` is False (a
        submodule's does not matter: it is kept whole).

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    >>> cap = capture(model, torch.randn(2, 8))
    >>> [tuple(n.meta["tensor_meta"].shape) for n in cap.graph.nodes if n.op == "call_module"]
    [(2, 8), (2, 8)]
    """
    if call is not None:
        if example_inputs is not None or concrete_args is not None:
            raise ValueError("capture: pass either call or example_inputs / concrete_args")
        concrete_args, example_inputs, var_keyword = specialise(model, call)
    else:
        var_keyword = None
    leaves, leaf_types = _leaf_arguments(model, leaf_modules)
    snapshot = tracing_snapshot(model)
    try:
        return _capture(
            model,
            example_inputs,
            leaves,
            leaf_types,
            concrete_args,
            call,
            var_keyword,
            shape_aware,
            one_mode,
        )
    except CaptureError:
        # What the failed attempts added would stay in a module whose Python forward keeps
        # running (harmless, but a change to the module tree): take it out.
        undo_tracing(model, snapshot)
        raise


@dataclass(frozen=True)
class TracingSnapshot:
    """What a module held before tracing could add to it (see :func:`undo_tracing`)."""

    flag_owners: frozenset[int]
    attributes: frozenset[str]


def tracing_snapshot(module: nn.Module) -> TracingSnapshot:
    """Remember the :class:`TrainingFlag` children and attributes of ``module``."""
    owners = frozenset(
        id(m) for m in module.modules() if isinstance(m._modules.get(FLAG_NAME), TrainingFlag)
    )
    return TracingSnapshot(owners, frozenset(module.__dict__))


def _modules_outside_graphs(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` and its submodules, but not those of a GraphModule below it (a converted
    submodule, whose graph reads the flags it holds)."""
    todo = [module]
    while todo:
        m = todo.pop()
        yield m
        todo.extend(c for c in m.children() if not isinstance(c, fx.GraphModule))


def undo_tracing(module: nn.Module, snapshot: TracingSnapshot) -> None:
    """Remove what tracing added to ``module`` since ``snapshot``.

    That is :class:`TrainingFlag` children and the tensor constants torch.fx stores on the
    traced root (``_tensor_constant0``...): for a module that was traced but keeps its Python
    ``forward``, which never reads them. A GraphModule below ``module`` (a submodule converted
    on its own) keeps its flags.

    Examples
    --------
    >>> model = nn.Sequential(nn.Dropout())
    >>> before = tracing_snapshot(model)
    >>> model[0].add_module(FLAG_NAME, TrainingFlag())
    >>> undo_tracing(model, before)
    >>> FLAG_NAME in model[0]._modules
    False
    """
    for m in _modules_outside_graphs(module):
        if id(m) not in snapshot.flag_owners and isinstance(
            m._modules.get(FLAG_NAME), TrainingFlag
        ):
            del m._modules[FLAG_NAME]
    for name in [k for k in module.__dict__ if k not in snapshot.attributes]:
        if name.startswith("_tensor_constant"):
            del module.__dict__[name]


def _capture(
    model: nn.Module,
    example_inputs: Any,
    leaves: dict[str, str],
    leaf_types: tuple[type, ...],
    concrete_args: dict[str, Any] | None,
    call: CallRecord | None,
    var_keyword: dict[str, Any] | None,
    shape_aware: bool,
    one_mode: bool,
) -> Capture:
    modules = dict(model.named_modules())
    found: list[LeafInfo] = []
    notes: list[str] = []
    examples = None
    if shape_aware:
        examples = _examples_by_name(model, example_inputs, concrete_args, var_keyword)
    shaped = False
    reference = call
    for _ in range(len(modules) + 2):
        tracer = CaptureTracer(
            leaves, leaf_types, var_keyword=var_keyword, examples=examples if shaped else None
        )
        try:
            graph = tracer.trace(model, concrete_args)
        except Exception as e:
            if not shaped and examples is not None:
                # Python code that looks at tensors: trace again with the example's values,
                # arguments that were None, flags, numbers or strings fixed to them.
                shaped = True
                fixed = {k: v for k, v in examples.items() if v is None or type(v) in _FIXED_TYPES}
                concrete_args = {**fixed, **(concrete_args or {})}
                if reference is None:
                    # The graph must return what the model returns (a decorator that torch.fx
                    # cannot run may fill arguments in: use_cache from the config, say).
                    with contextlib.suppress(Exception):
                        reference = record_calls(model, example_inputs, [model]).get(id(model))
                # One input per placeholder, as a recorded call gives them.
                example_inputs = tuple(examples[name] for name in _named_arguments(model))
                continue
            stack = tracer.failure[0] if tracer.failure is not None else ()
            culprit = next(
                (p for p in reversed(stack) if not tracer.is_leaf_module(modules[p], p)), None
            )
            if culprit is None:
                raise CaptureError(
                    f"cannot trace {type(model).__name__}.forward itself ({_reason(e)}). "
                    f"Convert a submodule instead, or pass concrete_args for arguments that "
                    f"steer control flow.",
                    _reason(e),
                ) from e
            leaves[culprit] = f"{UNTRACEABLE}: {_reason(e)}"
            found.append(LeafInfo(culprit, type(modules[culprit]).__name__, leaves[culprit], True))
            continue
        branching = [p for p, how in tracer.training_reads.items() if how == "control flow"]
        redo = False
        for path in branching:
            if path == "":
                continue
            if path not in leaves:
                leaves[path] = "branches on self.training (kept whole so that both modes work)"
                found.append(LeafInfo(path, type(modules[path]).__name__, leaves[path], True))
                redo = True
        if not redo:
            break
    else:  # pragma: no cover - every retry adds a leaf, so this cannot loop forever
        raise CaptureError("tracing did not settle")
    if tracer.training_reads.get("") == "control flow":
        name, mode = type(model).__name__, "train" if model.training else "eval"
        other = _trace_in_other_mode(
            model, leaves, leaf_types, var_keyword, examples if shaped else None, concrete_args
        )
        if other is not None and _signature(other) == _signature(graph):
            _drop_mode_checks(graph)
            if not any(n.op == "call_module" and n.target == FLAG_NAME for n in graph.nodes):
                del model._modules[FLAG_NAME]  # the checks' flag, read by nothing else
            notes.append(
                f"{name}.forward branches on self.training, but its graph is the same in train "
                f"and eval mode"
            )
        elif not one_mode:
            where = tracer.branch_sites[""]
            raise GraphPerModeError(
                f"{name}.forward branches on self.training at {where}, and its graph in train "
                f"mode differs from the one in eval mode: no one graph serves both. Convert "
                f"its submodules, or capture with one_mode=True for the {mode} mode's graph "
                f"(which checks the mode at run time)",
                f"it branches on self.training at {where}",
            )
        else:
            notes.append(
                f"{name}.forward branches on self.training: the graph is specialised to {mode} "
                f"mode, which it checks at run time"
            )
    if tracer.checks:
        notes.append(_describe_checks(type(model).__name__, tracer.checks))
    if tracer.unwrapped:
        notes.append(
            f"{type(model).__name__}.forward was traced without its decorator wrapper "
            f"({', '.join(tracer.unwrapped)}), which torch.fx cannot run"
        )

    for path, m in model.named_modules():
        if isinstance(m, MomentumChain) and path:
            why = f"already a momentum chain ({len(m.residual)} blocks)"
            found.append(LeafInfo(path, type(m).__name__, why))
    for path, reason in leaves.items():
        if reason.startswith("requested"):
            found.append(LeafInfo(path, type(modules[path]).__name__, reason))

    _keep_argument_names(graph, concrete_args)
    graph._tracer_cls = GraphCodeTracer
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    verified = False
    if example_inputs is not None:
        try:
            out = propagate_shapes(gm, example_inputs, model, var_keyword=var_keyword)
            verified = True
        except Exception as e:
            # The nodes that ran before the failure have shapes and the rest have none, which
            # matching would read as "not a tensor" for every block after the failure: the
            # whole graph is matched as without example inputs instead.
            clear_shapes(graph)
            if call is not None:
                raise CaptureError(
                    f"the graph of {type(model).__name__}.forward fails on the arguments its "
                    f"parent passes ({_reason(e)})"
                ) from e
            notes.append(
                f"shape propagation on example_inputs failed ({_reason(e)}); shapes are "
                f"unverified for the whole graph and chains were matched from its structure "
                f"only, as without example_inputs"
            )
        if reference is not None and verified and _structure(out) != reference.output:
            raise CaptureError(
                f"the graph of {type(model).__name__}.forward returns "
                f"{_describe_structure(_structure(out))} where the module returns "
                f"{_describe_structure(reference.output)}"
            )
    inputs = _as_tuple(example_inputs) if verified else None
    return Capture(model, graph, gm, found, verified, notes, inputs, var_keyword, tracer.checks)


def _trace_in_other_mode(
    model: nn.Module,
    leaves: dict[str, str],
    leaf_types: tuple[type, ...],
    var_keyword: dict[str, Any] | None,
    examples: dict[str, Any] | None,
    concrete_args: dict[str, Any] | None,
) -> fx.Graph | None:
    """``model``'s graph traced in the other mode (None if that fails); the modes and the
    module tree are left as they were."""
    modes = {m: m.training for m in model.modules()}
    before = tracing_snapshot(model)
    model.train(not model.training)
    try:
        tracer = CaptureTracer(leaves, leaf_types, var_keyword=var_keyword, examples=examples)
        return tracer.trace(model, dict(concrete_args or {}))
    except Exception:
        return None
    finally:
        for m, training in modes.items():
            m.training = training
        undo_tracing(model, before)


def _signature(graph: fx.Graph) -> list[tuple]:
    """What a graph computes, without its mode checks, for comparing two traces."""
    index: dict[fx.Node, int] = {}

    def number(a: fx.Node) -> tuple[str, int]:
        return ("node", index.get(a, -1))

    out = []
    for node in graph.nodes:
        if node.meta.get(MODE_CHECK):
            continue
        index[node] = len(index)
        out.append(
            (node.op, str(node.target), repr(fx.node.map_arg(node.args, number)),
             repr(fx.node.map_arg(node.kwargs, number)))
        )  # fmt: skip
    return out


def _drop_mode_checks(graph: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if node.meta.get(MODE_CHECK) or (
            node.op == "call_module" and str(node.target).endswith(FLAG_NAME) and not node.users
        ):
            graph.erase_node(node)


def _examples_by_name(
    model: nn.Module,
    example_inputs: Any,
    concrete_args: Mapping[str, Any] | None,
    var_keyword: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    """The example value of each argument of ``model.forward``, by name (for shape-aware
    tracing), or None if they are not all known."""
    if example_inputs is None:
        return None
    try:
        values = _as_tuple(example_inputs)
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    out: dict[str, Any] = {}
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(values) > len(named):
        return None
    for i, p in enumerate(named):
        if i < len(values):
            out[p.name] = values[i]
        elif p.default is not p.empty:
            out[p.name] = p.default
        else:
            return None
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            out[p.name] = ()
        elif p.kind is p.VAR_KEYWORD:
            out[p.name] = dict(var_keyword or {})
    out.update(concrete_args or {})
    return out


def _named_arguments(model: nn.Module) -> list[str]:
    """The arguments of ``model.forward`` other than ``*args`` and ``**kwargs``, in order."""
    params = inspect.signature(model.forward).parameters.values()
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _describe_checks(name: str, checks: Sequence[Specialisation]) -> str:
    data = [c for c in checks if c.data]
    places = sorted({c.where for c in checks})
    shown = ", ".join(places[:4]) + (f" and {len(places) - 4} more" if len(places) > 4 else "")
    text = (
        f"{name}.forward reads its inputs' values in Python ({shown}): it was traced with the "
        f"example inputs' values, and the graph checks {len(checks)} of them at run time "
        f"(a call where one differs raises an error naming the line)"
    )
    if data:
        text += (
            f"; {len(data)} depend on tensor contents, not only on shapes and dtypes "
            f"({', '.join(sorted({c.where for c in data})[:3])})"
        )
    return text


def _keep_argument_names(graph: fx.Graph, concrete_args: Mapping[str, Any] | None) -> None:
    """Give the placeholders of fixed arguments their names back; check None with
    :func:`check_none`.

    torch.fx names the placeholder of a fixed argument ``mask`` ``mask_1``, so the graph
    module would no longer accept ``mask=...`` by keyword, as the parent may pass it.
    """
    if not concrete_args:
        return
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _symbolic_trace._assert_is_none:
            node.target = check_none
    taken = {str(n.target) for n in graph.nodes if n.op == "placeholder"}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        name, sep, count = str(node.target).rpartition("_")
        if sep and count == "1" and name in concrete_args and name not in taken:
            node.target = name
            taken.add(name)


# -- recorded calls ------------------------------------------------------------------------------
_FIXED_TYPES = (bool, int, float, str)
_UNSET = object()


@dataclass(eq=False)
class CallRecord:
    """A module's first call while the whole model ran on example inputs.

    Attributes
    ----------
    args : tuple
        Positional arguments of the first call (the tensors themselves, not copies).
    kwargs : dict
        Keyword arguments of the first call.
    output : tuple
        What it returned: types, and shapes and dtypes of tensors (see :func:`record_calls`).
    calls : int
        How many times it was called.
    differing : bool
        Whether a later call, or a call in the other mode (train / eval), passed other
        non-tensor values (None, flags, numbers, strings), or arguments of other kinds.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = _UNSET
    calls: int = 1
    differing: bool = False
    key: tuple[Any, ...] = ()


def _structure(value: Any) -> Any:
    """Types, and shapes and dtypes of tensors, of a (nested) value."""
    if isinstance(value, torch.Tensor):
        return ("Tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_structure(v) for v in value))
    if isinstance(value, dict):
        return (type(value), tuple((k, _structure(v)) for k, v in value.items()))
    return (type(value),)


def _describe_structure(struct: Any) -> str:
    if struct is _UNSET:
        return "nothing (it did not return)"
    kind = struct[0]
    if kind == "Tensor":
        return f"a {'x'.join(map(str, struct[1])) or 'scalar'} tensor"
    if len(struct) == 1:
        return kind.__name__
    if kind in (tuple, list) or issubclass(kind, (tuple, list)):
        inner = ", ".join(_describe_structure(s) for s in struct[1])
    else:
        inner = ", ".join(f"{k}: {_describe_structure(s)}" for k, s in struct[1])
    return f"{kind.__name__}({inner})"


def _argument_kind(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return "Tensor"
    if value is None or type(value) in _FIXED_TYPES:
        return (type(value), value)
    return type(value)


def _call_key(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        tuple(_argument_kind(a) for a in args),
        tuple(sorted((k, _argument_kind(v)) for k, v in kwargs.items())),
    )


#: At most this many more runs of :func:`record_calls` for modules its first run skipped.
RECORD_SEEDS = 16


def _dropped_layers(
    model: nn.Module, wanted: Mapping[int, nn.Module], records: Mapping[int, CallRecord]
) -> list[int]:
    """The ``wanted`` modules not recorded while a module of their class in the same
    ``nn.ModuleList`` (or ``ModuleDict``) was: the layers a random layer drop skipped."""
    kind = {
        id(child): (id(m), type(child))
        for m in model.modules()
        if isinstance(m, (nn.ModuleList, nn.ModuleDict))
        for child in m.children()
    }
    ran = {kind.get(i) for i in records} - {None}
    return [i for i in wanted if i not in records and kind.get(i) in ran]


def record_calls(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[Any],
    modules: Iterable[nn.Module],
) -> dict[int, CallRecord]:
    """Run ``model`` on ``example_inputs`` and record how ``modules`` are called.

    Hooks record each module's first call (arguments and output structure) in the model's
    current mode, and whether later calls differ, also in a second run in the other mode
    (train / eval): a parent that passes ``0.0 if not self.training else p`` calls its child
    differently in each mode. Where the first run drew random numbers and skipped layers of an
    ``nn.ModuleList`` whose other layers of that class ran (a random layer drop), up to
    :data:`RECORD_SEEDS` more runs, seeded 0, 1, ..., record the skipped ones, so that which
    layers are recorded does not hang on one draw. The runs have no side effects: no grad,
    the global random states (torch's and Python's) forked, the buffers and modes restored.

    Parameters
    ----------
    model : nn.Module
        The whole model.
    example_inputs : Tensor or sequence
        Its positional inputs.
    modules : iterable of nn.Module
        Submodules of ``model`` to record.

    Returns
    -------
    dict
        ``id(module)`` to :class:`CallRecord`, for the modules that were called.

    Raises
    ------
    Exception
        Whatever ``model`` raises on ``example_inputs``.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    >>> records = record_calls(model, torch.randn(2, 3), [model[1]])
    >>> record = records[id(model[1])]
    >>> tuple(record.args[0].shape), record.calls
    ((2, 4), 1)
    """
    inputs = _as_tuple(example_inputs)
    records: dict[int, CallRecord] = {}
    wanted = {id(m): m for m in modules}
    # The run a module's record comes from, whose calls it counts; -1: the other mode's run.
    run, made_in = 0, {}

    def before(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        key = _call_key(args, kwargs)
        record = records.get(id(m))
        if record is None and run >= 0:
            records[id(m)] = CallRecord(tuple(args), dict(kwargs), key=key)
            made_in[id(m)] = run
        elif record is not None:
            record.calls += made_in[id(m)] == run
            record.differing = record.differing or key != record.key

    def after(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        record = records[id(m)]
        if record.output is _UNSET:
            record.output = _structure(out)

    handles = []
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m in wanted.values():
            handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(m.register_forward_hook(after, with_kwargs=True))
        with no_side_effects(model, inputs):
            states = torch.get_rng_state(), random.getstate()
            model(*inputs)
            drew = not torch.equal(states[0], torch.get_rng_state()) or (
                states[1] != random.getstate()
            )
            for seed in range(RECORD_SEEDS if drew else 0):
                if not _dropped_layers(model, wanted, records):
                    break
                run = seed + 1
                torch.manual_seed(seed)
                random.seed(seed)
                model(*inputs)
            run = -1
            model.train(not model.training)
            # The other mode may refuse these inputs (train-mode BatchNorm on a batch of
            # one); then a graph fixed to this mode's values still checks them at run time.
            with contextlib.suppress(Exception):
                model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return records


class Specialised(NamedTuple):
    """How to trace and run a module as a recorded call did (see :func:`specialise`)."""

    #: Arguments fixed for tracing (torch.fx's ``concrete_args``).
    concrete_args: dict[str, Any]
    #: Positional values of the graph's placeholders, ``**kwargs`` excepted.
    inputs: tuple[Any, ...]
    #: What ``**kwargs`` held (None when ``forward`` has no ``**kwargs``).
    var_keyword: dict[str, Any] | None


def specialise(module: nn.Module, call: CallRecord) -> Specialised:
    """``concrete_args``, inputs and ``**kwargs`` that trace and run ``module`` as ``call`` did.

    Arguments that were None, a bool, a number or a string are fixed (``concrete_args``);
    tensors and other values stay graph inputs. The inputs list every named argument of
    ``forward`` in the order of the graph's placeholders, defaults filled in. ``**kwargs``
    may hold tensors and values of the fixed kinds (see :class:`CaptureTracer`).

    Raises
    ------
    CaptureError
        If the module was called in several ways, with values through ``*args``, or with
        other kinds of values through ``**kwargs``.

    Examples
    --------
    >>> class Masked(nn.Module):
    ...     def forward(self, x, mask=None, scale=1.0):
    ...         return x * scale if mask is None else x.masked_fill(mask, 0.0) * scale
    >>> call = CallRecord((torch.ones(2),), {})
    >>> concrete, inputs, var_keyword = specialise(Masked(), call)
    >>> concrete, len(inputs), var_keyword
    ({'mask': None, 'scale': 1.0}, 3, None)
    """
    name = type(module).__name__
    if call.differing:
        raise CaptureError(
            f"{name} is called with different non-tensor arguments (in several calls, or in "
            f"train and eval mode): one graph cannot serve every call"
        )
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*call.args, **call.kwargs)
    except (TypeError, ValueError) as e:
        raise CaptureError(f"cannot match the recorded call of {name} ({_reason(e)})") from e
    bound.apply_defaults()
    concrete: dict[str, Any] = {}
    positional: list[Any] = []
    keyword_only: list[Any] = []
    var_keyword: dict[str, Any] | None = None
    for pname, param in sig.parameters.items():
        value = bound.arguments.get(pname)
        if param.kind is param.VAR_POSITIONAL:
            if value:
                raise CaptureError(
                    f"{name} is called with arguments through *{pname}, which torch.fx "
                    f"cannot fix to the recorded values"
                )
            continue
        if param.kind is param.VAR_KEYWORD:
            var_keyword = dict(value or {})
            odd = [k for k, v in var_keyword.items() if _argument_kind(v) is type(v)]
            if odd:
                kinds = ", ".join(f"{k}: {type(var_keyword[k]).__name__}" for k in odd)
                raise CaptureError(
                    f"{name} is called with values through **{pname} that are neither tensors "
                    f"nor None, flags, numbers or strings ({kinds})"
                )
            continue
        if value is None or type(value) in _FIXED_TYPES:
            concrete[pname] = value
        (keyword_only if param.kind is param.KEYWORD_ONLY else positional).append(value)
    return Specialised(concrete, tuple(positional + keyword_only), var_keyword)


def _as_tuple(example_inputs: torch.Tensor | Sequence[Any]) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    got = type(example_inputs).__name__
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {got}")


def propagate_shapes(
    gm: fx.GraphModule,
    example_inputs: torch.Tensor | Sequence[Any],
    owner: nn.Module | None = None,
    *,
    var_keyword: Mapping[str, Any] | None = None,
) -> Any:
    """Run :class:`~torch.fx.passes.shape_prop.ShapeProp` on ``gm`` without side effects.

    Fills ``node.meta["tensor_meta"]`` and returns the graph's output. Buffers (BatchNorm
    running statistics) are restored and the global random state is left as it was.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The graph to run.
    example_inputs : Tensor or sequence
        Its positional inputs.
    owner : nn.Module, optional
        Module whose buffers to restore (default: ``gm``).
    var_keyword : mapping, optional
        The value of the graph's ``**kwargs`` placeholder, if it has one.

    Raises
    ------
    ShapePropagationError
        Naming the node that failed; the nodes before it keep the metadata they got (see
        :func:`clear_shapes`).

    Examples
    --------
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 5)))
    >>> out = propagate_shapes(gm, torch.randn(2, 3))
    >>> list(gm.graph.nodes)[1].meta["tensor_meta"].shape
    torch.Size([2, 5])
    """
    inputs = _as_tuple(example_inputs)
    owner = gm if owner is None else owner
    prop = _ShapeProp(gm, var_keyword)
    try:
        with no_side_effects(owner, inputs):
            # ShapeProp prints the traceback of a failing node itself; the caller reports it.
            with contextlib.redirect_stderr(io.StringIO()):
                return prop.propagate(*inputs)
    except Exception as e:
        node = prop.current
        if node is None:
            raise
        cause = e.__cause__ if e.__cause__ is not None else e
        raise ShapePropagationError(
            f"at node `{node.name}` ({_describe_target(node)}): {_reason(cause)}", node.name
        ) from cause


def clear_shapes(graph: fx.Graph) -> None:
    """Remove what shape propagation wrote (``tensor_meta``, ``type``) from every node.

    Examples
    --------
    >>> gm = fx.symbolic_trace(nn.Linear(2, 2))
    >>> _ = propagate_shapes(gm, torch.randn(1, 2))
    >>> clear_shapes(gm.graph)
    >>> any("tensor_meta" in n.meta for n in gm.graph.nodes)
    False
    """
    for node in graph.nodes:
        node.meta.pop("tensor_meta", None)
        node.meta.pop("type", None)


class ShapePropagationError(RuntimeError):
    """Shape propagation failed at a node of the graph.

    Attributes
    ----------
    node : str
        Name of the node that raised.
    """

    def __init__(self, message: str, node: str) -> None:
        super().__init__(message)
        self.node = node


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running (to name it when it fails), and gives
    a ``**kwargs`` placeholder its dict (torch.fx's Interpreter gives it the leftover
    positional values)."""

    def __init__(self, gm: fx.GraphModule, var_keyword: Mapping[str, Any] | None = None) -> None:
        super().__init__(gm)
        self.current: fx.Node | None = None
        self.var_keyword = dict(var_keyword or {})

    def placeholder(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if str(target).startswith("**"):
            return dict(self.var_keyword)
        return super().placeholder(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        self.current = None
        return result


def _describe_target(node: fx.Node) -> str:
    if node.op in ("call_module", "call_method", "get_attr"):
        return f"{node.op} {node.target}"
    name = getattr(node.target, "__name__", None) or str(node.target)
    return f"{node.op} {name}"


@contextlib.contextmanager
def no_side_effects(
    owner: nn.Module, inputs: Sequence[Any] = (), *, grad: bool = False
) -> Iterator[None]:
    """Run a probe of ``owner``: grad as asked, the global random states forked (torch's, on
    every CUDA device ``owner`` or ``inputs`` live on too, and Python's) and ``owner``'s buffers
    restored afterwards."""
    saved = [(b, b.detach().clone()) for b in owner.buffers()]
    python_random = random.getstate()
    tensors = [*owner.parameters(), *owner.buffers(), *inputs]
    devices = sorted(
        {t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda}
    )
    try:
        with torch.random.fork_rng(devices=devices), torch.set_grad_enabled(grad):
            yield
    finally:
        random.setstate(python_random)
        with torch.no_grad():
            for b, old in saved:
                if b.shape == old.shape:
                    b.copy_(old)
