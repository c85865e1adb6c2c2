"""The descent: capture a model whole, or else every capturable subtree of it.

A module whose ``forward`` cannot be traced, or that its traced parent keeps opaque (not
traceable, branches on ``self.training``), keeps its Python code; its children are captured one
by one, each traced as the recorded run of the whole model called it
(:mod:`fxmomentum.capture.records`). Where descending would split a chain, because the loop
over the blocks sits in the untraceable ``forward`` itself, that ``forward`` is traced
shape-aware instead; whether it does is decided with the chains each graph holds, which the
caller's matcher finds (capture knows nothing of residual blocks).

Examples
--------
>>> import torch
>>> from torch import nn
>>> class Gate(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
...     def forward(self, x):
...         if x.sum() > 0:  # control flow on a value: not traceable
...             return self.body(x)
...         return x
>>> descent = descend(Gate(), torch.ones(2, 4), find_chains=lambda graph, module: [])
>>> [unit.path for unit in descent.units], descent.leaves[0].kind
(['body'], 'descended')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from ..engine import MomentumChain
from ..errors import one_line
from ..paths import join_path
from .records import CallRecord, record_calls
from .results import Capture, CaptureError, GraphPerModeError, LeafInfo, Note
from .shaped import RandomBranch
from .snapshot import TracingSnapshot, tracing_snapshot, undo_tracing
from .trace import capture, requested_leaves
from .tracer import TRACE_INTO

__all__ = ["ChainFinder", "Descent", "Unit", "descend"]

#: ``find_chains(graph, module)``: for each residual chain of a graph of ``module``, the
#: residual add node of each of its blocks.
ChainFinder = Callable[[fx.Graph, nn.Module], list[list[fx.Node]]]

#: Why a module whose ``forward`` has a graph per mode stays Python code.
_PER_MODE = "has a different graph in train and eval mode"


@dataclass
class Unit:
    """One module captured as a graph: the model itself (path ``""``) or a submodule."""

    path: str
    module: nn.Module
    capture: Capture
    #: What the module held before it was traced (to undo the trace if it is not replaced).
    before: TracingSnapshot | None = None
    #: How its parent called it on the example inputs (None: the model itself, or unknown).
    call: CallRecord | None = None


@dataclass
class Descent:
    """What :func:`descend` captured: the units in module order, the modules kept opaque
    and why, and what the report should say."""

    root: nn.Module
    units: list[Unit] = field(default_factory=list)
    leaves: list[LeafInfo] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        """Whether the model itself was captured as one graph."""
        return bool(self.units) and self.units[0].path == ""


def descend(
    root: nn.Module,
    example_inputs: Any,
    leaf_modules: Iterable[str | type] | None = None,
    concrete_args: dict[str, Any] | None = None,
    *,
    find_chains: ChainFinder,
    whole: str | None = None,
) -> Descent:
    """Capture ``root`` whole, or else every capturable subtree of it (see the module doc).

    Parameters
    ----------
    root : nn.Module
        The model (traced in place: pass a copy).
    example_inputs : Tensor or tuple, optional
        Its inputs; without them submodules are traced with every argument a graph input.
    leaf_modules : iterable of str or type, optional
        Module paths or classes to keep whole.
    concrete_args : dict, optional
        For torch.fx, values of ``root.forward``'s arguments that steer control flow.
    find_chains : ChainFinder
        The residual chains of a graph (which decide where shape-aware tracing pays).
    whole : str, optional
        Why the model is not to be captured whole (its converted graph failed): descend at
        once.

    Returns
    -------
    Descent

    Raises
    ------
    CaptureError
        If neither ``root.forward`` nor any submodule that may hold a chain can be captured.
    """
    descender = _Descender(root, example_inputs, leaf_modules, concrete_args, find_chains)
    descender.refused = whole
    return descender.run()


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
    return [(join_path(path, n), c) for n, c in m.named_children() if c is not None]


def _under(path: str, scope: str) -> bool:
    """Whether ``path`` is a submodule of ``scope`` (not ``scope`` itself)."""
    return path != scope and (not scope or path.startswith(scope + "."))


def _traced_in(node: fx.Node) -> str:
    """The submodule of the traced module whose code made ``node`` ("" for its own code):
    torch.fx records the stack of the modules it traced through."""
    stack = node.meta.get("nn_module_stack")
    return next(iter(stack.values()))[0] if stack else ""


def _one_mode_note(name: str) -> str:
    return (
        f"{name}.forward {_PER_MODE}: its submodules one by one would not hold its chains, so "
        f"the graph serves the mode it was converted in"
    )


def _random_note(name: str, error: CaptureError) -> str | None:
    """What a ``forward`` that branches on a random draw (a layer drop) means for its chains,
    or None where ``error`` is another failure."""
    branch = error.__cause__
    if not isinstance(branch, RandomBranch):
        return None
    return (
        f"{name}.forward branches on a random draw made at every call ({branch.where}; a "
        f"layer drop skips a layer so): no graph holds that choice, so this loop stays Python "
        f"code and its submodules are converted one by one. Without the draw the loop is one "
        f"graph and its layers one chain: with the layer drop probability 0 (config.layerdrop "
        f"= 0.0 in Hugging Face's models), or converted in eval mode (a graph for eval mode "
        f"only). In a momentum chain a skipped layer would be a step with f = 0 (v <- gamma * "
        f"v, x <- x + v): the original's skip at gamma = 0, while at gamma > 0 the velocity "
        f"still moves x"
    )


def _shaped_note(name: str, reason: str) -> str:
    return f"{name}.forward cannot be traced by torch.fx alone ({reason}): traced shape-aware"


#: What a shape-aware trace of the root found: the block count of each chain, where its graph
#: checks tensor values, and whether it serves only the current mode.
_ShapedRoot = tuple[list[int], list[str], bool]


class _Descender:
    """The state of one descent (see :func:`descend`)."""

    def __init__(
        self,
        root: nn.Module,
        example_inputs: Any,
        leaf_modules: Iterable[str | type] | None,
        concrete_args: dict[str, Any] | None,
        find_chains: ChainFinder,
    ) -> None:
        self.root, self.example_inputs = root, example_inputs
        self.leaf_modules = list(leaf_modules or ())
        self.concrete_args = concrete_args
        self.find_chains = find_chains
        self.requested = {p for p in self.leaf_modules if isinstance(p, str)}
        self.types = tuple(t for t in self.leaf_modules if isinstance(t, type))
        self.name = type(root).__name__
        self.result = Descent(root)
        self.frontier: list[tuple[str, nn.Module]] = []
        # Submodules a parent's trace made leaves because their forward failed: each is tried
        # shape-aware on its recorded call before conversion descends into it.
        self.untraced: set[str] = set()
        # Those of them that stayed Python code (their own graph joined no chain).
        self.kept_untraced: list[str] = []
        self.recorded = example_inputs is not None
        #: Why the model itself is not captured whole, when it is not to be.
        self.refused: str | None = None

    # -- the whole model ------------------------------------------------------------------------
    def run(self) -> Descent:
        failure = self._capture_root()
        self._descend_frontier()
        if failure is not None:
            failure = self._shape_aware_root(*failure)
        elif self.kept_untraced:
            self._shape_aware_over_leaves()
        self._join_through_units()
        result = self.result
        order = {id(m): i for i, m in enumerate(self.root.modules())}
        result.units.sort(key=lambda u: (u.path != "", order.get(id(u.module), 0)))
        if failure is not None and not result.units:
            raise CaptureError(
                f"{failure} No submodule of it (other than torch.nn's own layers) can be "
                f"captured either."
            ) from failure
        if self.example_inputs is None and any(u.path for u in result.units):
            self._note(
                "",
                "without example_inputs, submodules were traced with every argument of their "
                "forward as a graph input (none fixed to None or a flag): pass example_inputs "
                "to capture them as their parent calls them",
            )
        return result

    def _take(
        self,
        path: str,
        m: nn.Module,
        cap: Capture,
        before: TracingSnapshot | None = None,
        call: CallRecord | None = None,
    ) -> None:
        self.result.units.append(Unit(path, m, cap, before, call))
        for leaf in cap.leaves:
            full = join_path(path, leaf.path)
            self.result.leaves.append(dataclasses.replace(leaf, path=full))
            sub = m.get_submodule(leaf.path)
            if leaf.kind == "untraceable" and self.recorded:
                self.untraced.add(full)
                self.frontier.append((full, sub))
            elif leaf.automatic:
                self.frontier.extend(_children(full, sub))
        self.result.notes.extend(Note(path, n) for n in cap.notes)

    def _note(self, path: str, text: str) -> None:
        self.result.notes.append(Note(path, text))

    def _capture_root(self) -> tuple[CaptureError, _ShapedRoot | CaptureError | None] | None:
        """Capture the model whole; where that fails, note why, start the descent at its
        children and return the failure with what a shape-aware trace of it would find."""
        root, name = self.root, self.name
        arguments = dict(leaf_modules=self.leaf_modules, concrete_args=self.concrete_args)
        try:
            if self.refused is not None:
                raise CaptureError(self.refused)
            before = tracing_snapshot(root)
            self._take("", root, capture(root, self.example_inputs, **arguments), before)
            return None
        except CaptureError as e:
            per_mode = isinstance(e, GraphPerModeError)
            cap = None
            if per_mode:
                cap = self._one_mode_capture(root, dict(example_inputs=self.example_inputs,
                                                        **arguments))  # fmt: skip
            if cap is not None:
                self._note("", _one_mode_note(name))
                self._take("", root, cap)
                return None
            if self.leaf_modules:
                requested_leaves(root, self.leaf_modules)  # unknown paths are errors
            shaped: _ShapedRoot | CaptureError | None = None
            if per_mode:
                what, kept = _PER_MODE, "it stays Python code, so that both modes work, and"
            elif self.refused is not None:
                what, kept = "has a converted graph that fails", "it stays Python code, and"
            else:
                what, kept = "cannot be traced", "it stays Python code, and"
                shaped = self._shape_aware_chains()
            self.result.leaves.append(
                LeafInfo("", name, "per_mode" if per_mode else "descended", e.reason)
            )
            random = _random_note(name, e)
            if random is not None:
                self._note("", random)
            self._note(
                "",
                f"{name}.forward {what} ({e.reason}): {kept} its submodules were captured one "
                f"by one; convert returns a {name}, not a GraphModule",
            )
            self.frontier = _children("", root)
            return e, shaped

    def _shape_aware_root(
        self, failure: CaptureError, shaped: _ShapedRoot | CaptureError | None
    ) -> CaptureError | None:
        """Take the shape-aware graph of the whole model where its chains join what the
        descent left apart; return the failure that still stands (None once taken)."""
        name = self.name
        if isinstance(shaped, CaptureError):
            self._note("", f"a shape-aware trace of {name}.forward fails too ({shaped.reason})")
            return failure
        if shaped is None:
            return failure
        held = self._chains_held()
        if not self._takes_shaped(shaped, held):
            return failure
        # The shape-aware graph holds the loop over the blocks that the model's Python
        # forward keeps: its chains join what descending leaves apart.
        found = shaped[0]
        self._retake_root(
            shaped,
            lambda _: (
                f"{name}.forward cannot be traced by torch.fx alone ({failure.reason}): "
                f"it was traced shape-aware, which finds {len(found)} chain(s) of {sum(found)} "
                f"blocks where its submodules hold {len(held)} of {sum(held)}"
            ),
        )
        return None

    def _shape_aware_over_leaves(self) -> None:
        """Where the model's graph keeps submodules opaque that torch.fx alone cannot trace,
        and their own shape-aware graphs join no chain, trace the whole model shape-aware
        (which traces into them) where that joins what the descent left apart.

        Such a submodule may return what it computes between its blocks (DeBERTa's encoder
        returns every layer's output, which the model drops): in its own graph each of those
        values leaves the chain; in the model's graph nothing reads them.
        """
        shaped = self._shape_aware_chains()
        if not isinstance(shaped, tuple):
            return
        held = self._chains_held()
        if not self._takes_shaped(shaped, held):
            return
        found = shaped[0]

        def describe(cap: Capture) -> str:
            opaque = {leaf.path for leaf in cap.leaves}
            kept = [p for p in self.kept_untraced if p not in opaque]
            return (
                f"{', '.join(f'`{p}`' for p in kept)}: torch.fx alone cannot trace "
                f"{'it' if len(kept) == 1 else 'them'} and {'its' if len(kept) == 1 else 'their'} "
                f"own {'graph joins' if len(kept) == 1 else 'graphs join'} no chain; "
                f"{self.name}.forward was traced shape-aware (into "
                f"{'it' if len(kept) == 1 else 'them'}), which finds {len(found)} chain(s) of "
                f"{sum(found)} blocks where its submodules hold {len(held)} of {sum(held)}"
            )

        self._retake_root(shaped, describe)

    def _chains_held(self) -> list[int]:
        """The block count of every chain of the units captured so far."""
        units = self.result.units
        return [len(c) for u in units for c in self.find_chains(u.capture.graph, u.module)]

    def _takes_shaped(self, shaped: _ShapedRoot, held: list[int]) -> bool:
        """Whether the shape-aware graph of the whole model is taken over the units: its
        chains join theirs, and it checks no tensor value (else a note says so)."""
        found, data, _ = shaped
        joins = sum(found) > sum(held) or (sum(found) == sum(held) and len(found) < len(held))
        if joins and data:
            self._note(
                "",
                f"a shape-aware trace of {self.name}.forward would find {len(found)} chains of "
                f"{sum(found)} blocks, but its graph would serve only inputs whose values take "
                f"the example's path ({', '.join(data[:3])}): descended instead",
            )
        return joins and not data

    def _retake_root(self, shaped: _ShapedRoot, note: Callable[[Capture], str]) -> None:
        """Undo every capture so far and capture the whole model shape-aware; ``note`` says
        why, given the capture."""
        for unit in reversed(self.result.units):
            if unit.before is not None:
                undo_tracing(unit.module, unit.before)
        one_mode = shaped[2]
        cap = capture(
            self.root,
            self.example_inputs,
            shape_aware=True,
            one_mode=one_mode,
            leaf_modules=self.leaf_modules,
            concrete_args=self.concrete_args,
        )
        self.result = Descent(self.root)
        self.frontier = []
        self._note("", note(cap))
        if one_mode:
            self._note("", _one_mode_note(self.name))
        self._take("", self.root, cap)

    # -- units traced through the units below them --------------------------------------------
    def _join_through_units(self) -> None:
        """Capture a unit again, shape-aware and through its submodules that branch on
        ``self.training`` but compute the same in both modes (see ``capture``'s
        ``mode_free``), where the units below it hold chains and that graph joins them:
        Hugging Face's ALBERT applies one layer whose attention residual sits in a module its
        encoder's plain trace keeps whole, and Swin's stages call layers that only a
        shape-aware trace gets through."""
        units = self.result.units
        chains = {
            u.path: [len(c) for c in self.find_chains(u.capture.graph, u.module)] for u in units
        }
        done: list[str] = []
        for unit in sorted(units, key=lambda u: u.path.count(".") + bool(u.path)):
            if any(_under(unit.path, p) or unit.path == p for p in done):
                continue
            below = [u for u in units if _under(u.path, unit.path)]
            if not any(chains[u.path] for u in below):
                continue
            if self._join_through(unit, below, [n for u in [unit, *below] for n in chains[u.path]]):
                done.append(unit.path)
        if done:
            self._descend_frontier()  # the submodules the new graphs keep whole

    def _join_through(self, unit: Unit, below: list[Unit], chains: list[int]) -> bool:
        """Replace ``unit`` and the units ``below`` it, whose chains have ``chains`` blocks, by
        a graph of ``unit`` traced through them, where its chains join theirs (whether it was
        taken)."""
        m, path = unit.module, unit.path
        before = tracing_snapshot(m)
        arguments: dict[str, Any] = dict(
            leaf_modules=self._relative_leaves(path) if path else self.leaf_modules,
            shape_aware=True,
            mode_free=True,
        )
        if unit.call is not None:
            arguments["call"] = unit.call
        elif path == "" and self.example_inputs is not None:
            arguments.update(example_inputs=self.example_inputs, concrete_args=self.concrete_args)
        else:
            return False
        try:
            cap = capture(m, **arguments)
        except CaptureError:
            return False
        found = [len(c) for c in self.find_chains(cap.graph, m)]
        joins = sum(found) > sum(chains) or (sum(found) == sum(chains) and len(found) < len(chains))
        if not joins or any(c.branches_on_data for c in cap.checks):
            undo_tracing(m, before)
            return False
        # The flags and constants the replaced graphs read, and this one does not, go.
        undo_tracing(m, unit.before or before, keep=cap.graph)
        inside = {path, *(u.path for u in below)}
        result = self.result
        result.units = [u for u in result.units if u.path not in inside]
        result.leaves = [leaf for leaf in result.leaves if not _under(leaf.path, path)]
        result.notes = [n for n in result.notes if n.path != path and not _under(n.path, path)]
        self.untraced = {p for p in self.untraced if not _under(p, path)}
        self._note(
            path,
            f"{type(m).__name__}.forward was traced shape-aware through its submodules, which "
            f"finds {len(found)} chain(s) of {sum(found)} blocks where it and its submodules "
            f"captured one by one hold {len(chains)} of {sum(chains)}",
        )
        self._take(path, m, cap, unit.before or before, unit.call)
        return True

    # -- submodules -----------------------------------------------------------------------------
    def _descend_frontier(self) -> None:
        seen: set[int] = {id(self.root)}
        while self.frontier:
            todo = []
            for path, m in self.frontier:
                if id(m) in seen:
                    continue
                seen.add(id(m))
                if path in self.requested or isinstance(m, self.types):
                    leaves = self.result.leaves
                    if path in self.requested and all(leaf.path != path for leaf in leaves):
                        leaves.append(LeafInfo(path, type(m).__name__, "requested"))
                    continue
                if _may_hold_chains(m):
                    todo.append((path, m))
            self.frontier = []
            records = self._record([m for _, m in todo if not _is_container(m)])
            for path, m in todo:
                if _is_container(m):
                    self.frontier.extend(_children(path, m))
                else:
                    self._capture_submodule(path, m, records.get(id(m)))

    def _record(self, modules: list[nn.Module]) -> dict[int, CallRecord]:
        """How the model, run on the example inputs, calls ``modules``."""
        if not (self.recorded and modules):
            return {}
        try:
            return record_calls(self.root, self.example_inputs, modules)
        except Exception as e:
            self.recorded = False
            self._note(
                "",
                f"running {self.name} on example_inputs failed ({one_line(e, 160)}): its "
                f"submodules were captured from their structure only",
            )
            return {}

    def _relative_leaves(self, prefix: str) -> list[str | type]:
        inside = [p[len(prefix) + 1 :] for p in self.requested if p.startswith(prefix + ".")]
        return [*inside, *self.types]

    def _capture_submodule(self, path: str, m: nn.Module, call: CallRecord | None) -> None:
        relative = self._relative_leaves(path)
        kind = type(m).__name__
        before = tracing_snapshot(m)
        if path in self.untraced:
            cap = self._shape_aware_submodule(m, relative, call)
            leaves = self.result.leaves
            if not isinstance(cap, Capture):
                if cap is not None:  # the leaf's reason: it has a graph per mode
                    leaves[:] = [leaf for leaf in leaves if leaf.path != path]
                    leaves.append(LeafInfo(path, kind, "per_mode", cap.reason))
                else:
                    self.kept_untraced.append(path)
                self.frontier.extend(_children(path, m))
                return
            self.untraced.discard(path)
            failed = next(leaf for leaf in leaves if leaf.path == path)
            leaves[:] = [leaf for leaf in leaves if leaf.path != path]
            self._note(path, _shaped_note(kind, failed.cause))
            self._take(path, m, cap, before, call)
            return
        if self.recorded and call is None:
            self._note(path, "not called on example_inputs: left as it is")
            return
        try:
            cap = capture(m, leaf_modules=relative, call=call)
        except GraphPerModeError as e:
            cap = self._one_mode_capture(m, dict(leaf_modules=relative, call=call))
            if cap is None:
                self.result.leaves.append(LeafInfo(path, kind, "per_mode", e.reason))
                self.frontier.extend(_children(path, m))
                return
            self._note(path, _one_mode_note(kind))
        except CaptureError as e:
            cap = self._shape_aware_submodule(m, relative, call)
            if not isinstance(cap, Capture):
                self._descended(path, kind, e, cap)
                self.frontier.extend(_children(path, m))
                return
            self._note(path, _shaped_note(kind, e.reason))
        self._take(path, m, cap, before, call)

    def _descended(
        self, path: str, kind: str, failure: CaptureError, shaped: GraphPerModeError | None
    ) -> None:
        """Record why the submodule at ``path`` keeps its Python code: ``failure`` (its plain
        trace's), or else ``shaped`` (its shape-aware trace's, where it has a graph per mode),
        unless the first is a branch on a random draw, which says most."""
        random = _random_note(kind, failure)
        if random is not None:
            self._note(path, random)
        elif shaped is not None:
            failure = shaped
        how = "per_mode" if isinstance(failure, GraphPerModeError) else "descended"
        self.result.leaves.append(LeafInfo(path, kind, how, failure.reason))

    # -- the other ways to capture a module -----------------------------------------------------
    def _joins_chains(self, cap: Capture, m: nn.Module) -> bool:
        """Whether ``cap``'s graph of ``m`` has a chain that capturing ``m``'s submodules one
        by one would not find: one with a block in ``m``'s own code, or blocks in two
        submodules."""
        owners = [{_traced_in(add) for add in chain} for chain in self.find_chains(cap.graph, m)]
        return any("" in o or len(o) > 1 for o in owners)

    def _one_mode_capture(self, m: nn.Module, arguments: dict[str, Any]) -> Capture | None:
        """``m`` captured in its current mode only (see ``capture``'s ``one_mode``), where that
        graph joins chains that descending would not; else None, and ``m`` is left as it was:
        its Python code then serves both modes."""
        before = tracing_snapshot(m)
        try:
            cap = capture(m, one_mode=True, **arguments)
        except CaptureError:
            return None
        if not self._joins_chains(cap, m):
            undo_tracing(m, before)
            return None
        return cap

    def _shape_aware_submodule(
        self, m: nn.Module, leaf_modules: list[str | type], call: CallRecord | None
    ) -> Capture | GraphPerModeError | None:
        """``m`` traced shape-aware on the arguments its parent passed (``call``), or None
        where that fails, where its graph would check tensor values (a data-dependent
        branch), or where it has no chain that descending would not find as well; ``m`` is
        then left as it was. Where it fails because ``m``'s graph differs between train and
        eval mode, that error, which says where ``m`` branches on the mode."""
        if call is None:
            return None
        before = tracing_snapshot(m)
        try:
            cap = capture(m, leaf_modules=leaf_modules, call=call, shape_aware=True)
        except GraphPerModeError as e:
            return e
        except CaptureError:
            return None
        if not self._joins_chains(cap, m) or any(c.branches_on_data for c in cap.checks):
            undo_tracing(m, before)
            return None
        return cap

    def _shape_aware_chains(self) -> _ShapedRoot | CaptureError | None:
        """What a shape-aware trace of the root finds (see :data:`_ShapedRoot`), or why it
        fails, or None without example inputs; the root is left as it was."""
        if self.example_inputs is None:
            return None
        root = self.root
        before = tracing_snapshot(root)
        arguments = dict(
            leaf_modules=self.leaf_modules, concrete_args=self.concrete_args, shape_aware=True
        )
        try:
            try:
                cap, one_mode = capture(root, self.example_inputs, **arguments), False
            except GraphPerModeError:
                cap = capture(root, self.example_inputs, one_mode=True, **arguments)
                one_mode = True
            found = self.find_chains(cap.graph, root)
            data = sorted({c.where for c in cap.checks if c.branches_on_data})
            return [len(c) for c in found], data, one_mode
        except CaptureError as e:
            return e
        finally:
            undo_tracing(root, before)
