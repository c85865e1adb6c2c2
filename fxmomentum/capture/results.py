"""What capture gives back: the graph and its records, the leaves and why, the errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import fx, nn

from .shaped import Specialisation

__all__ = ["Capture", "CaptureError", "GraphPerModeError", "LeafInfo", "LeafKind", "Note"]


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


#: Why a submodule is a leaf (:attr:`LeafInfo.kind`).
LeafKind = Literal["requested", "chain", "untraceable", "branches", "descended", "per_mode"]

_LEAF_REASONS: dict[str, str] = {
    "requested": "requested (leaf_modules)",
    "chain": "already a momentum chain ({})",
    "untraceable": "not traceable: {}",
    "branches": "branches on self.training (kept whole so that both modes work)",
    "descended": "forward not traceable ({}): kept as Python code, submodules captured one by one",
    "per_mode": "forward has a different graph in train and eval mode ({}): kept as Python "
    "code, submodules captured one by one",
}


@dataclass(frozen=True)
class LeafInfo:
    """A submodule kept opaque in the graph, or kept as Python code while its submodules were
    captured one by one.

    Attributes
    ----------
    path : str
        Module path, as in ``named_modules()`` (``""``: the model itself).
    type : str
        Class name of the module.
    kind : str
        ``"requested"`` (``leaf_modules``), ``"chain"`` (already a momentum chain),
        ``"untraceable"`` (its ``forward`` failed to trace inside its parent's graph),
        ``"branches"`` (its ``forward`` branches on ``self.training``), ``"descended"`` (its
        ``forward`` cannot be traced: it stays Python code and its submodules were captured)
        or ``"per_mode"`` (its graph differs between train and eval mode: likewise).
    cause : str
        What made it so, in words: the error (one line), or the number of blocks of a chain.

    Examples
    --------
    >>> leaf = LeafInfo("body", "Gate", "untraceable", "TraceError: control flow")
    >>> leaf.reason, leaf.automatic
    ('not traceable: TraceError: control flow', True)
    """

    path: str
    type: str
    kind: LeafKind
    cause: str = ""

    @property
    def reason(self) -> str:
        """Why it is a leaf, in words."""
        return _LEAF_REASONS[self.kind].format(self.cause)

    @property
    def automatic(self) -> bool:
        """Made a leaf by capture itself (not requested, not a momentum chain): its own
        submodules may still be captured."""
        return self.kind not in ("requested", "chain")

    @property
    def module(self) -> str:
        """The module path (same as :attr:`path`)."""
        return self.path


@dataclass(frozen=True)
class Note:
    """Something a report should say about the module at :attr:`path` (``""``: the model)."""

    path: str
    text: str


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
        Things the report should say about the module (shape propagation failures, mode
        specialisation).
    inputs : tuple or None
        The positional inputs shapes were propagated from (``example_inputs``, or those of
        a recorded call), to run the graph again; None without shapes.
    var_keyword : dict or None
        What the graph's ``**kwargs`` placeholder receives with ``inputs`` (a recorded
        call's), else None.
    checks : list of Specialisation
        Values of the example that steered the model's code, which the graph checks at run
        time (a shape-aware trace, see :mod:`fxmomentum.capture.shaped`).
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

    def call_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """``(args, kwargs)`` to call the graph module as the example call did, or None."""
        inputs = self.graph_inputs()
        if inputs is None:
            return None
        targets = [str(n.target) for n in self.graph.nodes if n.op == "placeholder"]
        if targets and targets[-1].startswith("**"):
            return tuple(inputs[:-1]), dict(inputs[-1])
        return tuple(inputs), {}

    def graph_inputs(self) -> tuple[Any, ...] | None:
        """The graph's inputs from :attr:`inputs`, one per placeholder (a ``**kwargs``
        placeholder gets :attr:`var_keyword` as one dict), or None when they do not map onto
        the placeholders (or there are none)."""
        if self.inputs is None:
            return None
        targets = [str(n.target) for n in self.graph.nodes if n.op == "placeholder"]
        var_keyword = bool(targets) and targets[-1].startswith("**")
        named = targets[:-1] if var_keyword else targets
        if len(named) != len(self.inputs) or any(t.startswith("*") for t in named):
            return None
        if var_keyword:
            return (*self.inputs, dict(self.var_keyword or {}))
        return tuple(self.inputs)
