"""convert, inspect, set_gamma: capture -> match -> rewrite -> report.

Examples
--------
>>> import torch, torchvision, fxmomentum
>>> model = torchvision.models.resnet18()
>>> gm, report = fxmomentum.convert(model, gamma=0.9, example_inputs=torch.randn(1, 3, 64, 64),
...                                 return_report=True)
>>> [c.num_blocks for c in report.chains]
[2, 1, 1, 1]
>>> gm.state_dict().keys() == model.state_dict().keys()
True
"""

from __future__ import annotations

import copy
import fnmatch
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from .capture import (
    _FIXED_TYPES,
    TRACE_INTO,
    UNTRACEABLE,
    CallRecord,
    Capture,
    CaptureError,
    GraphPerModeError,
    LeafInfo,
    TracingSnapshot,
    _leaf_arguments,
    _reason,
    capture,
    record_calls,
    tracing_snapshot,
    undo_tracing,
)
from .engine import MomentumChain, quantize_gamma
from .match import Chain, MatchResult, SkippedAdd, find_chains
from .report import ChainInfo, ConversionReport, chain_info, estimate_saved_bytes
from .rewrite import chain_names, rewrite, top_graph

__all__ = ["convert", "inspect", "set_gamma"]

#: A momentum for all chains, per chain (keys: chain index, attribute name, or module path /
#: glob pattern matched against the chain's block paths), or a function of the chain.
GammaSpec = float | Mapping[Any, Any] | Callable[..., Any]


def _check_gamma(value: Any, use_backprop: bool, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"gamma {where} must be a number, got {value!r}")
    n = quantize_gamma(float(value))  # raises for values outside [0, 1]
    if n == 0 and not use_backprop:
        raise ValueError(
            f"gamma {where} is {value!r}: a reversible chain (use_backprop=False) cannot be run "
            f"backwards at gamma = 0, since the inverse divides by gamma. Use "
            f"use_backprop=True (gamma = 0 is the original model), or a gamma > 0."
        )
    return float(value)


def _matches(key: str, paths: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(p, key) or p == key or p.startswith(key + ".") for p in paths)


def _lookup(table: Mapping[Any, Any], index: int, name: str, paths: Sequence[str]) -> Any:
    """The dict entry for a chain: by index, attribute name, then module path / pattern."""
    if index in table:
        return table[index]
    if name in table:
        return table[name]
    for key, value in table.items():
        if isinstance(key, str) and _matches(key, paths):
            return value
    return None


@dataclass
class _Unit:
    """One module captured as a graph: the model itself (path ``""``) or a submodule."""

    path: str
    module: nn.Module
    capture: Capture
    match: MatchResult
    infos: list[ChainInfo] = field(default_factory=list)
    chosen: list[Chain] = field(default_factory=list)
    gammas: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    before: TracingSnapshot | None = None


@dataclass
class _Plan:
    root: nn.Module
    units: list[_Unit]
    leaves: list[LeafInfo]
    notes: list[str]

    @property
    def whole(self) -> bool:
        """Whether the model itself was captured as one graph."""
        return bool(self.units) and self.units[0].path == ""

    @property
    def infos(self) -> list[ChainInfo]:
        return [i for u in self.units for i in u.infos]


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _is_container(m: nn.Module) -> bool:
    """``nn.ModuleList`` / ``nn.ModuleDict`` and the like: modules without a forward."""
    return getattr(type(m), "forward", None) is nn.Module.forward


def _may_hold_chains(m: nn.Module) -> bool:
    """Whether capturing ``m`` can find anything: it has parameters, and is not one of
    torch.nn's own layers (``nn.Linear``, ``nn.LayerNorm``...), which hold no residual add."""
    if isinstance(m, MomentumChain) or next(m.parameters(), None) is None:
        return False
    torch_layer = type(m).__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential)
    return not torch_layer or isinstance(m, TRACE_INTO) or _is_container(m)


def _children(path: str, m: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(_join(path, n), c) for n, c in m.named_children() if c is not None]


def _relative_leaves(paths: Iterable[str], types: Sequence[type], prefix: str) -> list[str | type]:
    inside = [p[len(prefix) + 1 :] for p in paths if p.startswith(prefix + ".")]
    return [*inside, *types]


def _prefixed(info: ChainInfo, prefix: str) -> ChainInfo:
    """``info`` with module paths of the whole model (the unit at ``prefix``)."""
    if not prefix:
        return info
    for b in info.blocks:
        b.name = _join(prefix, b.name)
        b.path = _join(prefix, b.path)
    info.first = info.blocks[0].name
    info.last = info.blocks[-1].name
    return info


def _select(
    chains: Sequence[Chain],
    prefix: str,
    include: Any,
    exclude: Any,
    min_blocks: int,
) -> list[Chain]:
    """``include`` / ``exclude`` / ``min_blocks`` on full module paths, as find_chains does
    on the paths of its graph: a left-out block splits its chain."""
    inc = [include] if isinstance(include, str) else None if include is None else list(include)
    exc = [exclude] if isinstance(exclude, str) else None if exclude is None else list(exclude)

    def selected(path: str, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(path, p) or path == p or path.startswith(p + ".")
                   for p in patterns)  # fmt: skip

    def wanted(b: Any) -> str:
        path = _join(prefix, b.path)
        if inc is not None and not selected(path, inc):
            return "not in include"
        if exc is not None and selected(path, exc):
            return "excluded"
        return ""

    out: list[Chain] = []
    for chain in chains:
        run: list[Any] = []
        reason = ""
        for b in [*chain.blocks, None]:
            why = wanted(b) if b is not None else None
            if run and (b is None or why != reason):
                out.append(Chain(run, not reason, reason))
                run = []
            if b is not None:
                run.append(b)
                reason = why or ""
    for c in out:
        if c.selected and len(c.blocks) < min_blocks:
            c.selected = False
            c.reason = f"{len(c.blocks)} block(s) < min_blocks={min_blocks}"
    return out


def _match(unit: _Unit, include: Any, exclude: Any, min_blocks: int) -> None:
    modules = dict(unit.module.named_modules())
    if unit.path:
        result = find_chains(unit.capture.graph, modules)
        result.chains = _select(result.chains, unit.path, include, exclude, min_blocks)
        result.skipped = [
            SkippedAdd(s.node, _join(unit.path, s.path), s.reason) for s in result.skipped
        ]
    else:
        result = find_chains(
            unit.capture.graph, modules, include=include, exclude=exclude, min_blocks=min_blocks
        )
    unit.match = result
    unit.infos = [_prefixed(chain_info(c, modules), unit.path) for c in result.chains]


def _capture_tree(
    root: nn.Module,
    example_inputs: Any,
    leaf_modules: Iterable[str | type] | None,
    concrete_args: dict[str, Any] | None,
) -> _Plan:
    """Capture ``root`` whole, or else every capturable subtree of it.

    A module whose ``forward`` cannot be traced, or that its traced parent keeps opaque (not
    traceable, branches on ``self.training``), keeps its Python code; its children are
    captured one by one, each called as the recorded run of the whole model called it.
    """
    leaf_modules = list(leaf_modules or ())
    requested = {p for p in leaf_modules if isinstance(p, str)}
    types = tuple(t for t in leaf_modules if isinstance(t, type))
    units: list[_Unit] = []
    leaves: list[LeafInfo] = []
    notes: list[str] = []
    frontier: list[tuple[str, nn.Module]] = []
    name = type(root).__name__
    failure: CaptureError | None = None
    shaped: tuple[list[int], list[str], bool] | CaptureError | None = None

    # Submodules a parent's trace made leaves because their forward failed: each is tried
    # shape-aware on its recorded call before conversion descends into it.
    untraced: set[str] = set()

    def take(path: str, m: nn.Module, cap: Capture) -> None:
        units.append(_Unit(path, m, cap, MatchResult()))
        for leaf in cap.leaves:
            full = _join(path, leaf.path)
            leaves.append(LeafInfo(full, leaf.type, leaf.reason, leaf.automatic))
            sub = m.get_submodule(leaf.path)
            if leaf.automatic and leaf.reason.startswith(UNTRACEABLE) and recorded:
                untraced.add(full)
                frontier.append((full, sub))
            elif leaf.automatic:
                frontier.extend(_children(full, sub))
        notes.extend(_about(path, n) for n in cap.notes)

    recorded = example_inputs is not None

    arguments = dict(leaf_modules=leaf_modules, concrete_args=concrete_args)
    try:
        take("", root, capture(root, example_inputs, **arguments))
    except CaptureError as e:
        per_mode = isinstance(e, GraphPerModeError)
        cap = None
        if per_mode:
            cap = _one_mode_capture(root, dict(example_inputs=example_inputs, **arguments))
        if cap is not None:
            notes.append(_one_mode_note(name))
            take("", root, cap)
        else:
            if leaf_modules:
                _leaf_arguments(root, leaf_modules)  # unknown paths are errors, as when captured
            failure, reason = e, e.reason
            if per_mode:
                what, kept = _PER_MODE, "it stays Python code, so that both modes work, and"
            else:
                what, kept = "cannot be traced", "it stays Python code, and"
                shaped = _shape_aware_chains(root, example_inputs, leaf_modules, concrete_args)
            why = _descended(reason, _PER_MODE) if per_mode else _descended(reason)
            leaves.append(LeafInfo("", name, why, True))
            notes.append(
                f"{name}.forward {what} ({reason}): {kept} its submodules were captured one by "
                f"one; convert returns a {name}, not a GraphModule"
            )
            frontier = _children("", root)
    seen: set[int] = {id(root)}
    while frontier:
        todo = []
        for path, m in frontier:
            if id(m) in seen:
                continue
            seen.add(id(m))
            if path in requested or isinstance(m, types):
                if path in requested and all(leaf.path != path for leaf in leaves):
                    leaves.append(LeafInfo(path, type(m).__name__, "requested (leaf_modules)"))
                continue
            if _may_hold_chains(m):
                todo.append((path, m))
        frontier = []
        records: dict[int, CallRecord] = {}
        to_call = [m for _, m in todo if not _is_container(m)]
        if recorded and to_call:
            try:
                records = record_calls(root, example_inputs, to_call)
            except Exception as e:
                recorded = False
                notes.append(
                    f"running {name} on example_inputs failed ({_reason(e)}): its submodules "
                    f"were captured from their structure only"
                )
        for path, m in todo:
            if _is_container(m):
                frontier.extend(_children(path, m))
                continue
            call = records.get(id(m))
            if path in untraced:
                before = tracing_snapshot(m)
                cap = _shape_aware_submodule(m, _relative_leaves(requested, types, path), call)
                if cap is None:
                    frontier.extend(_children(path, m))
                    continue
                untraced.discard(path)
                failed = [leaf for leaf in leaves if leaf.path == path]
                leaves[:] = [leaf for leaf in leaves if leaf.path != path]
                why = failed[0].reason.replace(f"{UNTRACEABLE}: ", "", 1)
                notes.append(_about(path, _shaped_note(type(m).__name__, why)))
                take(path, m, cap)
                units[-1].before = before
                continue
            if recorded and call is None:
                notes.append(_about(path, "not called on example_inputs: left as it is"))
                continue
            before = tracing_snapshot(m)
            relative = _relative_leaves(requested, types, path)
            try:
                cap = capture(m, leaf_modules=relative, call=call)
            except GraphPerModeError as e:
                cap = _one_mode_capture(m, dict(leaf_modules=relative, call=call))
                if cap is None:
                    why = _descended(e.reason, _PER_MODE)
                    leaves.append(LeafInfo(path, type(m).__name__, why, True))
                    frontier.extend(_children(path, m))
                    continue
                notes.append(_about(path, _one_mode_note(type(m).__name__)))
            except CaptureError as e:
                cap = _shape_aware_submodule(m, relative, call)
                if cap is None:
                    leaves.append(LeafInfo(path, type(m).__name__, _descended(e.reason), True))
                    frontier.extend(_children(path, m))
                    continue
                notes.append(_about(path, _shaped_note(type(m).__name__, e.reason)))
            take(path, m, cap)
            units[-1].before = before
    if isinstance(shaped, CaptureError):
        notes.append(f"a shape-aware trace of {name}.forward fails too ({shaped.reason})")
    elif failure is not None and shaped is not None:
        chains = [len(c.blocks) for u in units for c in find_chains(u.capture.graph, dict(
            u.module.named_modules())).chains]  # fmt: skip
        found, data, one_mode = shaped
        joins = sum(found) > sum(chains) or (sum(found) == sum(chains) and len(found) < len(chains))
        if joins and data:
            notes.append(
                f"a shape-aware trace of {name}.forward would find {len(found)} chains of "
                f"{sum(found)} blocks, but its graph would serve only inputs whose values take "
                f"the example's path ({', '.join(data[:3])}): descended instead"
            )
        elif joins:
            # The shape-aware graph holds the loop over the blocks that the model's Python
            # forward keeps: its chains join what descending leaves apart.
            for unit in reversed(units):
                if unit.before is not None:
                    undo_tracing(unit.module, unit.before)
            cap = capture(root, example_inputs, shape_aware=True, one_mode=one_mode, **arguments)
            units, leaves, frontier = [], [], []
            notes = [
                f"{name}.forward cannot be traced by torch.fx alone ({reason}): it was traced "
                f"shape-aware, which finds {len(found)} chain(s) of {sum(found)} blocks where "
                f"its submodules hold {len(chains)} of {sum(chains)}"
            ]
            if one_mode:
                notes.append(_one_mode_note(name))
            take("", root, cap)
            failure = None
    # Chains in the order of the modules: the model's own graph first, then the submodules.
    order = {id(m): i for i, m in enumerate(root.modules())}
    units.sort(key=lambda u: (u.path != "", order.get(id(u.module), 0)))
    if failure is not None and not units:
        raise CaptureError(
            f"{failure} No submodule of it (other than torch.nn's own layers) can be "
            f"captured either."
        ) from failure
    if example_inputs is None and any(u.path for u in units):
        notes.append(
            "without example_inputs, submodules were traced with every argument of their "
            "forward as a graph input (none fixed to None or a flag): pass example_inputs "
            "to capture them as their parent calls them"
        )
    return _Plan(root, units, leaves, notes)


def _shape_aware_chains(
    root: nn.Module,
    example_inputs: Any,
    leaf_modules: list[str | type],
    concrete_args: dict[str, Any] | None,
) -> tuple[list[int], list[str], bool] | CaptureError | None:
    """The block counts of the chains a shape-aware trace of ``root`` finds (see
    :mod:`fxmomentum.shaped`), where its graph checks tensor values and whether it serves
    only the current mode (a graph per mode), or why it fails, or None without example
    inputs; ``root`` is left as it was."""
    if example_inputs is None:
        return None
    before = tracing_snapshot(root)
    arguments = dict(leaf_modules=leaf_modules, concrete_args=concrete_args, shape_aware=True)
    try:
        try:
            cap, one_mode = capture(root, example_inputs, **arguments), False
        except GraphPerModeError:
            cap, one_mode = capture(root, example_inputs, one_mode=True, **arguments), True
        found = find_chains(cap.graph, dict(root.named_modules())).chains
        data = sorted({c.where for c in cap.checks if c.data})
        return [len(c.blocks) for c in found], data, one_mode
    except CaptureError as e:
        return e
    finally:
        undo_tracing(root, before)


def _shape_aware_submodule(
    m: nn.Module, leaf_modules: list[str | type], call: CallRecord | None
) -> Capture | None:
    """``m`` traced shape-aware on the arguments its parent passed (``call``), or None where
    that fails, where its graph would check tensor values (a data-dependent branch), or where
    it has no chain that descending would not find as well (one with a block in ``m``'s own
    code, or blocks in two of its submodules); ``m`` is then left as it was."""
    if call is None:
        return None
    before = tracing_snapshot(m)
    try:
        cap = capture(m, leaf_modules=leaf_modules, call=call, shape_aware=True)
    except CaptureError:
        return None
    if not _joins_chains(cap, m) or any(c.data for c in cap.checks):
        undo_tracing(m, before)
        return None
    return cap


def _joins_chains(cap: Capture, m: nn.Module) -> bool:
    """Whether ``cap``'s graph of ``m`` has a chain that capturing ``m``'s submodules one by
    one would not find: one with a block in ``m``'s own code, or blocks in two submodules."""
    chains = find_chains(cap.graph, dict(m.named_modules())).chains
    owners = [{_traced_in(b.add) for b in c.blocks} for c in chains]
    return any("" in o or len(o) > 1 for o in owners)


#: Why a module whose ``forward`` has a graph per mode stays Python code.
_PER_MODE = "has a different graph in train and eval mode"


def _one_mode_capture(m: nn.Module, arguments: dict[str, Any]) -> Capture | None:
    """``m`` captured in its current mode only (see ``capture``'s ``one_mode``), where that
    graph joins chains that descending would not (:func:`_joins_chains`); else None, and
    ``m`` is left as it was: its Python code then serves both modes."""
    before = tracing_snapshot(m)
    try:
        cap = capture(m, one_mode=True, **arguments)
    except CaptureError:
        return None
    if not _joins_chains(cap, m):
        undo_tracing(m, before)
        return None
    return cap


def _one_mode_note(name: str) -> str:
    return (
        f"{name}.forward {_PER_MODE}: its submodules one by one would not hold its chains, so "
        f"the graph serves the mode it was converted in"
    )


def _shaped_note(name: str, reason: str) -> str:
    return f"{name}.forward cannot be traced by torch.fx alone ({reason}): traced shape-aware"


def _traced_in(node: fx.Node) -> str:
    """The submodule of the traced module whose code made ``node`` ("" for its own code):
    torch.fx records the stack of the modules it traced through."""
    stack = node.meta.get("nn_module_stack")
    return next(iter(stack.values()))[0] if stack else ""


def _descended(reason: str, what: str = "not traceable") -> str:
    return f"forward {what} ({reason}): kept as Python code, submodules captured one by one"


def _plan(
    root: nn.Module,
    gamma: GammaSpec,
    *,
    example_inputs: Any,
    use_backprop: bool,
    min_blocks: int,
    include: Any,
    exclude: Any,
    cost_model: bool,
    leaf_modules: Iterable[str | type] | None,
    concrete_args: dict[str, Any] | None,
) -> _Plan:
    if not isinstance(root, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(root).__name__}")
    if isinstance(min_blocks, bool) or not isinstance(min_blocks, int) or min_blocks < 1:
        raise ValueError(f"min_blocks must be an integer >= 1, got {min_blocks!r}")
    if isinstance(gamma, (int, float)):
        _check_gamma(gamma, use_backprop, "")
    elif not (isinstance(gamma, Mapping) or callable(gamma)):
        raise TypeError(f"gamma must be a number, a dict or a callable, got {type(gamma).__name__}")

    plan = _capture_tree(root, example_inputs, leaf_modules, concrete_args)
    k = 0
    for unit in plan.units:
        _match(unit, include, exclude, min_blocks)
        selected = [
            (c, i) for c, i in zip(unit.match.chains, unit.infos, strict=True) if c.selected
        ]
        names = chain_names(unit.module, len(selected))
        objects = _python_objects(unit.capture)
        if cost_model and not unit.capture.shapes_verified and selected:
            plan.notes.append(
                _about(
                    unit.path, "cost_model needs shapes (example_inputs): every chain is converted"
                )
            )
        for local, (chain, info) in enumerate(selected):
            name = _join(unit.path, names[local])
            paths = [b.path for b in info.blocks]
            if isinstance(gamma, Mapping):
                value = _lookup(gamma, k, name, paths)
            elif callable(gamma) and not isinstance(gamma, (int, float)):
                value = gamma(info)
            else:
                value = gamma
            k += 1
            if value is None:
                info.reason = "no gamma given for this chain"
                continue
            value = _check_gamma(value, use_backprop, f"for chain {k - 1} ({info.first})")
            passed = [c for c in chain.context if c in objects]
            if passed and not use_backprop:
                info.reason = (
                    f"its blocks receive `{passed[0].target}` (a {objects[passed[0]]}), a "
                    f"Python object they may change (a key/value cache grows at every call): "
                    f"recomputing them in backward would change it again. Pass None instead "
                    f"(use_cache=False), or convert with use_backprop=True"
                )
                continue
            recorded = _recorded_inputs(unit.capture)
            saved = estimate_saved_bytes(chain, value, use_backprop, example_inputs=recorded)
            if saved is None and recorded is not None:
                saved = estimate_saved_bytes(chain, value, use_backprop)
            info.saved_bytes = saved
            if cost_model and saved is not None and saved <= 0 and not use_backprop:
                info.reason = (
                    "cost model: the reversible state would not be smaller than what it saves"
                )
                continue
            info.name = name
            info.converted = True
            info.gamma = value
            unit.chosen.append(chain)
            unit.gammas.append(value)
            unit.names.append(names[local])
        if unit.path:
            blocks = sum(len(c.blocks) for c in unit.match.chains)
            chains = len(unit.match.chains)
            found = f"{chains} chain(s), {blocks} block(s)" if blocks else "no residual chain"
            what = f"{type(unit.module).__name__}: captured as one graph, {found}"
            plan.notes.append(_about(unit.path, what))
    plan.notes = _grouped(plan.notes)
    return plan


#: Separates a module path from what a note says about it (until notes are grouped).
_SEP = "\x00"


def _about(path: str, text: str) -> str:
    return f"{path}{_SEP}{text}" if path else text


def _grouped(notes: Sequence[str], most: int = 4) -> list[str]:
    """One note per text: "`h.0`, `h.1`, ... (12 modules): text", in order of appearance."""
    paths: dict[str, list[str]] = {}
    for note in notes:
        path, sep, text = note.partition(_SEP)
        if not sep:
            path, text = "", note
        paths.setdefault(text, []).append(path)
    out = []
    for text, where in paths.items():
        named = [f"`{p}`" for p in where if p]
        if not named:
            out.append(text)
            continue
        head = ", ".join(named[:most])
        if len(named) > most:
            head += f", ... ({len(named)} modules)"
        out.append(f"{head}: {text}")
    return out


def _recorded_inputs(cap: Capture) -> tuple[Any, ...] | None:
    """The graph's inputs from the call recorded on example_inputs, one per placeholder (a
    ``**kwargs`` placeholder gets the recorded keywords as one dict), or None when they do not
    map onto the placeholders (the memory estimate then runs on inputs made from the recorded
    shapes)."""
    if cap.inputs is None:
        return None
    targets = [str(n.target) for n in cap.graph.nodes if n.op == "placeholder"]
    var_keyword = bool(targets) and targets[-1].startswith("**")
    named = targets[:-1] if var_keyword else targets
    if len(named) != len(cap.inputs) or any(t.startswith("*") for t in named):
        return None
    return (*cap.inputs, dict(cap.var_keyword or {})) if var_keyword else tuple(cap.inputs)


def _python_objects(cap: Capture) -> dict[fx.Node, str]:
    """Placeholders that received a Python object (not a tensor, None, flag, number or
    string) in the recorded call, and its class name."""
    if cap.inputs is None:
        return {}
    placeholders = [n for n in cap.graph.nodes if n.op == "placeholder"]
    named = [n for n in placeholders if not str(n.target).startswith("*")]
    out = {}
    for node, value in zip(named, cap.inputs, strict=False):
        if not isinstance(value, (torch.Tensor, *_FIXED_TYPES)) and value is not None:
            out[node] = type(value).__name__
    return out


def _code(plan: _Plan, codes: Sequence[str]) -> str:
    if plan.whole and len(plan.units) == 1:
        return codes[0]
    parts = []
    for unit, code in zip(plan.units, codes, strict=True):
        parts.append(f"# {unit.path or '(model)'} ({type(unit.module).__name__})\n{code}")
    return "\n".join(parts)


def _report(
    plan: _Plan, use_backprop: bool, nodes_after: int, codes_after: Sequence[str]
) -> ConversionReport:
    units = plan.units
    return ConversionReport(
        model=type(plan.root).__name__,
        chains=plan.infos,
        skipped=[s for u in units for s in u.match.skipped],
        leaves=list(plan.leaves),
        nodes_before=sum(len(u.capture.graph.nodes) for u in units),
        nodes_after=nodes_after,
        shapes_verified=bool(units) and all(u.capture.shapes_verified for u in units),
        code_before=_code(plan, [u.capture.graph_module.code for u in units]),
        code_after=_code(plan, codes_after),
        use_backprop=use_backprop,
        notes=list(plan.notes),
    )


_METHOD_CLASSES: dict[type, type] = {}


def _keep_methods(gm: fx.GraphModule, cls: type) -> None:
    """Make ``gm`` an instance of the module class it replaces, with its methods.

    The graph module's class derives from GraphModule and then ``cls``: the graph's forward
    and GraphModule's own machinery come first, then every method, property and override of
    ``cls`` (``super()`` in them works, and ``isinstance(gm, cls)`` holds). ``cls.__init__`` is
    not run again: the graph module holds the replaced module's attributes. ``copy.deepcopy``
    keeps the class (torch.fx builds each copy's class on it) and pickling restores it when
    ``cls`` can be imported.
    """
    if cls is nn.Module or not issubclass(cls, nn.Module) or issubclass(cls, fx.GraphModule):
        return
    base = _METHOD_CLASSES.get(cls)
    if base is None:
        # GraphModule.__init__ calls super().__init__(), which would reach cls.__init__: a
        # class in between sends it to nn.Module's.
        init = type(f"_{cls.__name__}Init", (cls,), {"__init__": _module_init})
        base = type(cls.__name__, (fx.GraphModule, init), {"__reduce__": _reduce_kept})
        base._fxmomentum_methods_of = cls  # type: ignore[attr-defined]
        _METHOD_CLASSES[cls] = base
    # One class per instance, as torch.fx makes them (its qualified name tells torch.fx so):
    # recompile puts forward on it.
    impl = type("GraphModuleImpl", (base,), {})
    impl.__name__ = cls.__name__
    gm.__class__ = impl
    gm.recompile()


def _module_init(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    nn.Module.__init__(self)


def _reduce_kept(self: fx.GraphModule) -> tuple[Any, ...]:
    rebuild, args = fx.GraphModule.__reduce__(self)
    cls = type(self)._fxmomentum_methods_of  # type: ignore[attr-defined]
    module = sys.modules.get(cls.__module__)
    found: Any = module
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    if found is not cls:  # not importable (a local class): the plain graph module
        return rebuild, args
    return _rebuild_with_methods, (rebuild, args, cls)


def _rebuild_with_methods(rebuild: Callable[..., Any], args: tuple, cls: type) -> nn.Module:
    gm = rebuild(*args)
    _keep_methods(gm, cls)
    return gm


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered under ``root``."""
    for m in list(root.modules()):
        for key, child in m._modules.items():
            if child is old:
                m._modules[key] = new


def convert(
    model: nn.Module,
    gamma: GammaSpec = 0.9,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    use_backprop: bool = False,
    min_blocks: int = 1,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    cost_model: bool = False,
    return_report: bool = False,
    leaf_modules: Iterable[str | type] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Turn the residual chains of ``model`` into momentum chains.

    Each chain ``x <- x + f_t(x)`` becomes ``v <- gamma * v + (1 - gamma) * f_t(x);
    x <- x + v`` (a :class:`~fxmomentum.MomentumChain`). ``model`` is left untouched: the
    result works on a deep copy, keeps its module tree and ``state_dict`` keys, and loads the
    original's weights (``gm.load_state_dict(model.state_dict())``) and vice versa.

    When torch.fx cannot trace ``model.forward`` itself (shape unpacking, data-dependent
    control flow, einops), its code stays as it is and conversion descends: each child is
    captured as a graph if it can be, else its own children, and so on; the same happens
    inside submodules that a captured graph keeps opaque. The result is then a copy of
    ``model``'s own class with converted GraphModules in place of the submodules whose graphs
    hold chains. With ``example_inputs``, the whole model runs once first and each submodule
    is traced as its parent called it: arguments that were None, flags or numbers are fixed
    (the graph checks them at run time), and the graph must return what the module returned.

    Parameters
    ----------
    model : nn.Module
        Any module; the parts torch.fx cannot trace are kept whole (see above).
    gamma : float, dict or callable
        Momentum in ``[0, 1]``. A dict gives it per chain, keyed by chain index, attribute
        name (``"momentum_chain_0"``) or module path / glob pattern (``"layer3"``); chains it
        does not name are not converted. A callable receives the chain's
        :class:`~fxmomentum.report.ChainInfo` and returns a gamma, or None to skip the chain.
    example_inputs : Tensor or tuple of Tensor, optional
        Inputs to check shapes and dtypes on (and to estimate memory). Without them the
        structure is still found; the report says shapes are unverified.
    use_backprop : bool
        ``False``: the reversible function (activations rebuilt in backward, not stored).
        ``True``: plain autograd; with ``gamma = 0`` it computes exactly what ``model`` does.
    min_blocks : int
        Leave chains with fewer blocks as they are.
    include, exclude : str or iterable of str, optional
        Module paths or glob patterns of the blocks to convert / to leave alone.
    cost_model : bool
        Convert a chain only if its estimated memory saving is positive.
    return_report : bool
        Also return the :class:`~fxmomentum.report.ConversionReport`.
    leaf_modules : iterable of str or type, optional
        Submodule paths or classes to keep whole (not traced into).
    concrete_args : dict, optional
        For torch.fx: values of ``forward`` arguments that steer control flow.

    Returns
    -------
    torch.fx.GraphModule, or a copy of ``model``'s class when its ``forward`` cannot be
    traced; with ``return_report=True``, a tuple (module, ConversionReport). The report's
    chains and opaque modules carry full module paths of ``model``; its notes say which
    submodules were captured as graphs.

    Raises
    ------
    fxmomentum.capture.CaptureError
        If neither ``model.forward`` nor any submodule that may hold a chain can be traced.

    Examples
    --------
    >>> from torch import nn
    >>> class MLP(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fs = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4))
    ...     def forward(self, x):
    ...         for f in self.fs:
    ...             x = x + f(x)
    ...         return x
    >>> gm = convert(MLP(), gamma=0.9)
    >>> print(gm.code.strip().splitlines()[-2].strip())
    momentum_chain_0 = self.momentum_chain_0(x);  x = None

    A model whose own ``forward`` torch.fx cannot trace:

    >>> class Wrapper(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body = MLP()
    ...     def forward(self, x):
    ...         if x.dim() == 3:  # control flow on a traced value
    ...             x = x.flatten(0, 1)
    ...         return self.body(x)
    >>> net, report = convert(Wrapper(), gamma=0.9, example_inputs=torch.randn(2, 8),
    ...                       return_report=True)
    >>> type(net).__name__, type(net.body).__name__, report.chains[0].name
    ('Wrapper', 'MLP', 'body.momentum_chain_0')
    """
    root = copy.deepcopy(model)
    plan = _plan(
        root,
        gamma,
        example_inputs=example_inputs,
        use_backprop=use_backprop,
        min_blocks=min_blocks,
        include=include,
        exclude=exclude,
        cost_model=cost_model,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
    )
    result: nn.Module = root
    graphs: list[fx.Graph] = []
    # Innermost first: a unit inside an opaque module of another is replaced in that module,
    # which the outer graph calls as it is.
    for unit in reversed(plan.units):
        if unit.path and not unit.chosen:
            if unit.before is not None:
                undo_tracing(unit.module, unit.before)
            graphs.append(unit.capture.graph)
            continue
        gm = rewrite(
            unit.module, unit.capture.graph, unit.chosen, unit.gammas, use_backprop=use_backprop
        )
        graphs.append(gm.graph)
        if unit.path:
            # The parent's code stays, and may read its child's attributes (a config, a
            # flag): the graph module keeps those of the module it replaces, also through
            # copy.deepcopy (which rebuilds a GraphModule from its graph and its meta).
            kept = {
                key: value
                for key, value in unit.module.__dict__.items()
                if not key.startswith("_") and not hasattr(gm, key)
            }
            gm.__dict__.update(kept)
            gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {}).update(kept)
            # ... and may call its methods (``self.encoder.head(x)``).
            _keep_methods(gm, type(unit.module))
            _replace(root, unit.module, gm)
        else:
            result = gm
    graphs.reverse()
    if not return_report:
        return result
    codes = [g.python_code(root_module="self").src for g in graphs]
    report = _report(plan, use_backprop, sum(len(g.nodes) for g in graphs), codes)
    return result, report


def inspect(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    gamma: GammaSpec = 0.9,
    use_backprop: bool = False,
    min_blocks: int = 1,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    cost_model: bool = False,
    leaf_modules: Iterable[str | type] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> ConversionReport:
    """What :func:`convert` would do with the same options, without building the result.

    Examples
    --------
    >>> import torchvision
    >>> report = inspect(torchvision.models.resnet50())
    >>> [c.num_blocks for c in report.chains], len(report.skipped)
    ([2, 3, 5, 2], 4)
    """
    root = copy.deepcopy(model)
    plan = _plan(
        root,
        gamma,
        example_inputs=example_inputs,
        use_backprop=use_backprop,
        min_blocks=min_blocks,
        include=include,
        exclude=exclude,
        cost_model=cost_model,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
    )
    graphs = [top_graph(u.capture.graph, u.chosen, u.names) for u in plan.units]
    codes = [g.python_code(root_module="self").src for g in graphs]
    return _report(plan, use_backprop, sum(len(g.nodes) for g in graphs), codes)


def set_gamma(model: nn.Module, gamma: GammaSpec) -> dict[str, float]:
    """Change the momentum of the chains of a converted model, without converting again.

    Parameters
    ----------
    model : nn.Module
        A model returned by :func:`convert` (any module holding
        :class:`~fxmomentum.MomentumChain` submodules).
    gamma : float, dict or callable
        One value for every chain; a dict keyed by chain index (order of ``named_modules``),
        attribute name or block path / glob pattern (chains it does not name keep their
        gamma); or a callable ``gamma(name, chain) -> float | None``.

    Returns
    -------
    dict of str to float
        The chains changed and their new gamma.

    Examples
    --------
    >>> from torch import nn
    >>> class Res(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.f = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return x + self.f(x)
    >>> gm = convert(Res(), gamma=0.9)
    >>> set_gamma(gm, 0.5)
    {'momentum_chain_0': 0.5}
    """
    chains = [(n, m) for n, m in model.named_modules() if isinstance(m, MomentumChain)]
    changed: dict[str, float] = {}
    for k, (name, chain) in enumerate(chains):
        if isinstance(gamma, Mapping):
            owner = name.rpartition(".")[0]  # block names are relative to the chain's owner
            paths = [_join(owner, p.split("#")[0]) for p in chain.names]
            value = _lookup(gamma, k, name, paths)
        elif callable(gamma):
            value = gamma(name, chain)
        else:
            value = gamma
        if value is None:
            continue
        value = _check_gamma(value, chain.use_backprop, f"for {name}")
        chain.gamma = value
        changed[name] = value
    return changed
