"""Capture: a module as a torch.fx graph, with shapes, whatever the module.

:func:`capture` traces a module with :class:`~fxmomentum.capture.tracer.CaptureTracer` and
retries until the trace settles:

* a submodule whose ``forward`` cannot be traced becomes a leaf (an opaque ``call_module``
  node), with the reason, and the module is traced again, instead of failing the whole model;
* a submodule that branches on ``self.training`` is kept whole, so both modes work;
* with example values, a ``forward`` whose Python code reads tensors (shapes, dtypes) is traced
  again shape-aware (:mod:`fxmomentum.capture.shaped`).

An exception raised by fxmomentum's own code while tracing is a bug, not an untraceable module:
it propagates. A root ``forward`` that branches on ``self.training`` is traced in both modes;
where the graphs differ, :class:`GraphPerModeError` says so (or, with ``one_mode``, the graph
takes the current mode and checks it at run time). Shapes and dtypes come from torch.fx's own
ShapeProp on the example inputs (:mod:`fxmomentum.capture.shapes`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace

from ..engine import MomentumChain
from ..errors import one_line
from ..paths import join_path, within
from .probe import as_tuple
from .records import (
    FIXED_TYPES,
    CallRecord,
    describe_structure,
    record_calls,
    specialise,
    structure,
)
from .results import Capture, CaptureError, GraphPerModeError, LeafInfo
from .shaped import Specialisation, Untraceable
from .shapes import clear_shapes, propagate_shapes
from .snapshot import tracing_snapshot, undo_tracing
from .tracer import (
    FLAG_NAME,
    MODE_CHECK,
    MODE_CHECK_OF,
    CaptureTracer,
    GraphCodeTracer,
    check_none,
)

__all__ = ["capture"]

#: The tracer's own code (this folder and the patches it installs): an exception raised here
#: while tracing is a bug of the tracer. The rest of fxmomentum may be part of the model being
#: traced (a converted or transformed model), whose errors mean "not traceable".
_TRACER_CODE = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "patches.py"),
)


def capture(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    leaf_modules: Iterable[str | type] | None = None,
    concrete_args: dict[str, Any] | None = None,
    call: CallRecord | None = None,
    shape_aware: bool = False,
    one_mode: bool = False,
    mode_free: bool = False,
) -> Capture:
    """Trace ``model`` with torch.fx; make untraceable submodules leaves; propagate shapes.

    ``model`` itself is traced: tracing may add ``TrainingFlag`` children and tensor constants
    to it, so pass a copy when the model must stay untouched (:func:`fxmomentum.convert`
    does).

    With ``call`` (a submodule's call recorded by
    :func:`~fxmomentum.capture.records.record_calls`), the arguments that were None, a bool, a
    number or a string are fixed to their recorded values (the graph checks them at run time
    and raises a clear error on another value), shapes are propagated from the recorded call,
    and the graph must return what the module returned, or :class:`CaptureError` is raised:
    such a graph would not work where the parent calls it.

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
        values (see :mod:`fxmomentum.capture.shaped`); needs example inputs or ``call``. The
        graph must return what the model returns on them.
    one_mode : bool
        Where ``model.forward`` branches on ``self.training`` and traces to a different graph
        in the other mode, take the current mode's graph, which checks the mode at run time
        and raises in the other one, instead of raising :class:`GraphPerModeError`.
    mode_free : bool
        Trace into a submodule that branches on ``self.training`` where each of its calls
        traces to the same operations in the other mode (``0.0 if not self.training else
        p`` with ``p = 0``), instead of keeping it whole: its residual adds then join the
        graph's. Costs a trace in the other mode.

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
        if example_inputs is not None:
            # An argument the example leaves at its default (None, a flag, a number) has that
            # value: traced as a proxy, ``if mask is not None`` would take the other branch.
            # The graph checks it at run time.
            concrete_args = {**_defaults_left(model, example_inputs), **(concrete_args or {})}
    leaves, leaf_types = requested_leaves(model, leaf_modules)
    attempt = _Attempt(model, leaves, leaf_types, concrete_args, example_inputs, var_keyword)
    attempt.call = attempt.reference = call
    attempt.mode_free = set() if mode_free else None
    if shape_aware:
        attempt.examples = _examples_by_name(model, example_inputs, concrete_args, var_keyword)
    snapshot = tracing_snapshot(model)
    try:
        graph, tracer = _trace_until_settled(attempt)
        notes = _settle_mode(attempt, graph, tracer, one_mode)
        if attempt.mode_free:
            _drop_mode_checks(graph, model, attempt.mode_free)
            notes.append(_mode_free_note(model, attempt.mode_free))
        return _finish(attempt, graph, tracer, notes)
    except CaptureError:
        # What the failed attempts added would stay in a module whose Python forward keeps
        # running (harmless, but a change to the module tree): take it out.
        undo_tracing(model, snapshot)
        raise


def requested_leaves(
    model: nn.Module, leaf_modules: Iterable[str | type] | None
) -> tuple[dict[str, LeafInfo], tuple[type, ...]]:
    """The leaves ``leaf_modules`` asks for: by path (checked to exist) and by class.

    Examples
    --------
    >>> paths, types = requested_leaves(nn.Sequential(nn.Linear(2, 2)), ["0", nn.ReLU])
    >>> list(paths), types
    (['0'], (<class 'torch.nn.modules.activation.ReLU'>,))
    """
    paths: dict[str, LeafInfo] = {}
    types: list[type] = []
    names = dict(model.named_modules())
    for item in leaf_modules or ():
        if isinstance(item, type):
            types.append(item)
        elif isinstance(item, str):
            if item not in names:
                raise ValueError(f"leaf_modules: {type(model).__name__} has no submodule {item!r}")
            paths[item] = LeafInfo(item, type(names[item]).__name__, "requested")
        else:
            raise TypeError(f"leaf_modules items are module paths or classes, got {item!r}")
    return paths, tuple(types)


@dataclass
class _Attempt:
    """One capture's settings, refined from one trace attempt to the next."""

    model: nn.Module
    #: Submodules kept whole, by path: requested, or made leaves by a failed attempt.
    leaves: dict[str, LeafInfo]
    leaf_types: tuple[type, ...]
    concrete_args: dict[str, Any] | None
    example_inputs: Any
    var_keyword: dict[str, Any] | None
    #: Example values of the root's arguments by name, for a shape-aware retry (None: none).
    examples: dict[str, Any] | None = None
    shaped: bool = False
    #: The recorded call traced (a submodule as its parent calls it), if any.
    call: CallRecord | None = None
    #: What the module returned on the examples: the graph must return the same.
    reference: CallRecord | None = None
    #: With ``mode_free``: the submodules that branch on ``self.training`` but trace to the
    #: same operations in both modes, traced into (None: such submodules are leaves).
    mode_free: set[str] | None = None

    def tracer(self, examples: bool | None = None) -> CaptureTracer:
        shaped = self.shaped if examples is None else examples
        return CaptureTracer(
            self.leaves,
            self.leaf_types,
            var_keyword=self.var_keyword,
            examples=self.examples if shaped else None,
        )

    def go_shape_aware(self) -> None:
        """Trace with the example's values from now on, arguments that were None, flags,
        numbers or strings fixed to them."""
        assert self.examples is not None
        self.shaped = True
        examples = self.examples
        fixed = {k: v for k, v in examples.items() if v is None or type(v) in FIXED_TYPES}
        self.concrete_args = {**fixed, **(self.concrete_args or {})}
        if self.reference is None:
            # The graph must return what the model returns (a decorator that torch.fx cannot
            # run may fill arguments in: use_cache from the config, say).
            with contextlib.suppress(Exception):
                records = record_calls(self.model, self.example_inputs, [self.model])
                self.reference = records.get(id(self.model))
        # One input per placeholder, as a recorded call gives them.
        self.example_inputs = tuple(examples[name] for name in _named_arguments(self.model))


def _raised_by_tracer(exc: BaseException) -> bool:
    """Whether ``exc`` was raised in the tracer's own code (a bug), not in the model's or
    torch's, other than on purpose (:class:`~fxmomentum.capture.shaped.Untraceable`)."""
    if isinstance(exc, Untraceable):
        return False
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and os.path.abspath(last.tb_frame.f_code.co_filename).startswith(
        _TRACER_CODE
    )


def _trace_until_settled(attempt: _Attempt) -> tuple[fx.Graph, CaptureTracer]:
    """Trace, making leaves of what fails or branches on ``self.training``, until a trace
    makes no new leaf."""
    model = attempt.model
    modules = dict(model.named_modules())
    for _ in range(len(modules) + 2):
        tracer = attempt.tracer()
        try:
            graph = tracer.trace(model, attempt.concrete_args)
        except Exception as e:
            if _raised_by_tracer(e):
                raise
            if not attempt.shaped and attempt.examples is not None:
                # Python code that looks at tensors: trace again with the example's values.
                attempt.go_shape_aware()
                continue
            culprit = _culprit(tracer, modules)
            if culprit is None:
                reason = one_line(e, 160)
                raise CaptureError(
                    f"cannot trace {type(model).__name__}.forward itself ({reason}). Convert a "
                    f"submodule instead, or pass concrete_args for arguments that steer control "
                    f"flow.",
                    reason,
                ) from e
            kind = type(modules[culprit]).__name__
            attempt.leaves[culprit] = LeafInfo(culprit, kind, "untraceable", one_line(e, 160))
            continue
        branching = [
            p
            for p, how in tracer.training_reads.items()
            if how == "control flow" and p and p not in attempt.leaves
            and p not in (attempt.mode_free or ())
        ]  # fmt: skip
        if branching and attempt.mode_free is not None:
            attempt.mode_free |= _same_in_both_modes(attempt, graph, tracer, branching)
            branching = _innermost([p for p in branching if p not in attempt.mode_free])
        for path in branching:
            attempt.leaves[path] = LeafInfo(path, type(modules[path]).__name__, "branches")
        if not branching:
            return graph, tracer
    raise CaptureError("tracing did not settle")  # pragma: no cover - each retry adds a leaf


def _same_in_both_modes(
    attempt: _Attempt, graph: fx.Graph, tracer: CaptureTracer, paths: Sequence[str]
) -> set[str]:
    """The ``paths`` whose calls trace to the same operations in the other mode (the mode
    checks aside), each call compared on its own: what the rest of the graph does in the
    other mode does not matter."""
    other = _trace_in_other_mode(attempt)
    if other is None:
        return set()
    mine = _call_signatures(graph, tracer.spans, paths)
    theirs = _call_signatures(*other, paths)
    return {p for p in paths if mine.get(p) and mine[p] == theirs.get(p)}


def _call_signatures(
    graph: fx.Graph, spans: Mapping[str, list[tuple[int, int]]], paths: Iterable[str]
) -> dict[str, list[list[tuple]]]:
    """For each of ``paths``, what each of its calls computes (:func:`_signature` of the nodes
    the call made, the values it reads from before the call numbered in order of use)."""
    nodes = list(graph.nodes)
    return {p: [_signature(nodes[a:b]) for a, b in spans[p]] for p in paths if p in spans}


def _mode_free_note(model: nn.Module, paths: Iterable[str]) -> str:
    named = sorted(f"`{p}` ({type(model.get_submodule(p)).__name__})" for p in paths)
    shown = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
    branch, trace = ("branches", "traces") if len(named) == 1 else ("branch", "trace")
    return (
        f"{shown} {branch} on self.training but {trace} to the same operations in train and "
        f"eval mode: traced into, not kept whole"
    )


def _innermost(paths: list[str]) -> list[str]:
    """The ``paths`` under none of the others: a module holding one of them may trace to the
    same operations in both modes once that one is a leaf."""
    return [p for p in paths if not any(q != p and within(q, p) for q in paths)]


def _culprit(tracer: CaptureTracer, modules: Mapping[str, nn.Module]) -> str | None:
    """The innermost submodule being traced when tracing failed that is not a leaf already
    (None: the failure is in the root's own code)."""
    stack = tracer.failure[0] if tracer.failure is not None else ()
    return next((p for p in reversed(stack) if not tracer.is_leaf_module(modules[p], p)), None)


def _settle_mode(
    attempt: _Attempt, graph: fx.Graph, tracer: CaptureTracer, one_mode: bool
) -> list[str]:
    """Where the root's ``forward`` branches on ``self.training``: drop the mode checks when
    the graph is the same in the other mode, else raise or keep them (``one_mode``). Returns
    the notes for the report."""
    if tracer.training_reads.get("") != "control flow":
        return []
    model = attempt.model
    name, mode = type(model).__name__, "train" if model.training else "eval"
    other = _trace_in_other_mode(attempt)
    if other is not None and _signature(other[0].nodes) == _signature(graph.nodes):
        _drop_mode_checks(graph, model)
        return [
            f"{name}.forward branches on self.training, but its graph is the same in train "
            f"and eval mode"
        ]
    if not one_mode:
        where = tracer.branch_sites[""]
        raise GraphPerModeError(
            f"{name}.forward branches on self.training at {where}, and its graph in train "
            f"mode differs from the one in eval mode: no one graph serves both. Convert "
            f"its submodules, or capture with one_mode=True for the {mode} mode's graph "
            f"(which checks the mode at run time)",
            f"it branches on self.training at {where}",
        )
    return [
        f"{name}.forward branches on self.training: the graph is specialised to {mode} "
        f"mode, which it checks at run time"
    ]


def _finish(attempt: _Attempt, graph: fx.Graph, tracer: CaptureTracer, notes: list[str]) -> Capture:
    """The capture: notes, the leaves to report, argument names, shapes."""
    model = attempt.model
    if tracer.checks:
        notes.append(_describe_checks(type(model).__name__, tracer.checks))
    if tracer.unwrapped:
        notes.append(
            f"{type(model).__name__}.forward was traced without its decorator wrapper "
            f"({', '.join(tracer.unwrapped)}), which torch.fx cannot run"
        )
    found = [leaf for leaf in attempt.leaves.values() if leaf.automatic]
    for path, m in model.named_modules():
        if isinstance(m, MomentumChain) and path:
            found.append(LeafInfo(path, type(m).__name__, "chain", f"{len(m.residual)} blocks"))
    found += [leaf for leaf in attempt.leaves.values() if not leaf.automatic]

    _keep_argument_names(graph, attempt.concrete_args)
    graph._tracer_cls = GraphCodeTracer
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    verified = attempt.example_inputs is not None and _verify_shapes(attempt, gm, notes)
    inputs = as_tuple(attempt.example_inputs) if verified else None
    return Capture(
        model, graph, gm, found, verified, notes, inputs, attempt.var_keyword, tracer.checks
    )


def _verify_shapes(attempt: _Attempt, gm: fx.GraphModule, notes: list[str]) -> bool:
    """Propagate shapes on the example inputs; whether that worked. The graph must return
    what the module returned (a recorded call's graph must also run)."""
    model = attempt.model
    try:
        out = propagate_shapes(gm, attempt.example_inputs, model, var_keyword=attempt.var_keyword)
    except Exception as e:
        # The nodes that ran before the failure have shapes and the rest have none, which
        # matching would read as "not a tensor" for every block after the failure: the
        # whole graph is matched as without example inputs instead.
        clear_shapes(gm.graph)
        if attempt.call is not None:
            raise CaptureError(
                f"the graph of {type(model).__name__}.forward fails on the arguments its "
                f"parent passes ({one_line(e, 160)})"
            ) from e
        notes.append(
            f"shape propagation on example_inputs failed ({one_line(e, 160)}); shapes are "
            f"unverified for the whole graph and chains were matched from its structure "
            f"only, as without example_inputs"
        )
        return False
    reference = attempt.reference
    if reference is not None and structure(out) != reference.output:
        raise CaptureError(
            f"the graph of {type(model).__name__}.forward returns "
            f"{describe_structure(structure(out))} where the module returns "
            f"{describe_structure(reference.output)}"
        )
    return True


def _trace_in_other_mode(
    attempt: _Attempt,
) -> tuple[fx.Graph, dict[str, list[tuple[int, int]]]] | None:
    """The root's graph traced in the other mode and the spans of its submodules' calls
    (see :class:`CaptureTracer`), or None if that fails; the modes and the module tree are
    left as they were."""
    model = attempt.model
    modes = {m: m.training for m in model.modules()}
    before = tracing_snapshot(model)
    model.train(not model.training)
    try:
        tracer = attempt.tracer()
        return tracer.trace(model, dict(attempt.concrete_args or {})), tracer.spans
    except Exception:
        return None
    finally:
        for m, training in modes.items():
            m.training = training
        undo_tracing(model, before)


def _signature(nodes: Iterable[fx.Node]) -> list[tuple]:
    """What a sequence of nodes computes, without the mode checks, for comparing two traces;
    the values they read from outside are numbered in order of first use."""
    index: dict[fx.Node, int] = {}
    outside: dict[fx.Node, int] = {}

    def number(a: fx.Node) -> tuple[str, int]:
        if a in index:
            return ("node", index[a])
        return ("outside", outside.setdefault(a, len(outside)))

    out = []
    for node in nodes:
        if node.meta.get(MODE_CHECK):
            continue
        index[node] = len(index)
        out.append(
            (node.op, str(node.target), repr(fx.node.map_arg(node.args, number)),
             repr(fx.node.map_arg(node.kwargs, number)))
        )  # fmt: skip
    return out


def _drop_mode_checks(
    graph: fx.Graph, model: nn.Module, paths: Iterable[str] | None = None
) -> None:
    """Remove the mode checks of ``paths`` (every one: None), with the flags only they read,
    from ``graph`` and from ``model``."""
    wanted = None if paths is None else set(paths)
    dropped: set[str] = set()
    for node in reversed(list(graph.nodes)):
        if node.meta.get(MODE_CHECK) and (wanted is None or node.meta[MODE_CHECK_OF] in wanted):
            graph.erase_node(node)
        elif node.op == "call_module" and str(node.target).endswith(FLAG_NAME) and not node.users:
            owner = str(node.target).removesuffix(FLAG_NAME).removesuffix(".")
            if wanted is None or owner in wanted:
                graph.erase_node(node)
                dropped.add(owner)
    read = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    for owner in dropped:
        if join_path(owner, FLAG_NAME) not in read:
            # The checks' flag, read by nothing else.
            model.get_submodule(owner)._modules.pop(FLAG_NAME, None)


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
        values = as_tuple(example_inputs)
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


def _defaults_left(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """The arguments of ``model.forward`` after the example's positional ones whose default
    is None, a flag, a number or a string, with their defaults."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
        given = len(as_tuple(example_inputs))
    except (TypeError, ValueError):
        return {}
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                             p.KEYWORD_ONLY)]  # fmt: skip
    return {
        p.name: p.default
        for p in named[given:]
        if p.default is None or type(p.default) in FIXED_TYPES
    }


def _named_arguments(model: nn.Module) -> list[str]:
    """The arguments of ``model.forward`` other than ``*args`` and ``**kwargs``, in order."""
    params = inspect.signature(model.forward).parameters.values()
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _describe_checks(name: str, checks: Sequence[Specialisation]) -> str:
    data = [c for c in checks if c.branches_on_data]
    hints = [c for c in checks if c.hint]
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
    if hints:
        text += (
            f"; {len(hints)} that a mask is causal, as in the example (torch's is_causal "
            f"hint: attention takes the causal kernel and leaves the mask aside)"
        )
    return text


def _keep_argument_names(graph: fx.Graph, concrete_args: Mapping[str, Any] | None) -> None:
    """Give the placeholders of fixed arguments their names back; check None with
    :func:`~fxmomentum.capture.tracer.check_none`.

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
