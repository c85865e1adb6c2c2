"""Undoing what tracing adds to a module that keeps its Python ``forward``.

Tracing may register :class:`~fxmomentum.capture.tracer.TrainingFlag` children and store tensor
constants on the traced root. Where the module is not replaced by its graph (a failed capture, a
graph that joins no chain), they are taken out again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import fx, nn

from ..paths import join_path
from .tracer import FLAG_NAME, TrainingFlag

__all__ = ["TracingSnapshot", "tracing_snapshot", "undo_tracing"]


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


def _modules_outside_graphs(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``module`` and its submodules with their paths, but not those of a GraphModule below
    it (a converted submodule, whose graph reads the flags it holds)."""
    todo = [("", module)]
    while todo:
        path, m = todo.pop()
        yield path, m
        todo.extend(
            (join_path(path, name), c)
            for name, c in m.named_children()
            if not isinstance(c, fx.GraphModule)
        )


def undo_tracing(
    module: nn.Module, snapshot: TracingSnapshot, keep: fx.Graph | None = None
) -> None:
    """Remove what tracing added to ``module`` since ``snapshot``, but what ``keep`` (a graph
    of ``module``) reads.

    That is :class:`TrainingFlag` children and the tensor constants torch.fx stores on the
    traced root (``_tensor_constant0``...): for a module that was traced but keeps its Python
    ``forward``, which never reads them, or whose graph is another trace's. A GraphModule
    below ``module`` (a submodule converted on its own) keeps its flags.

    Examples
    --------
    >>> model = nn.Sequential(nn.Dropout())
    >>> before = tracing_snapshot(model)
    >>> model[0].add_module(FLAG_NAME, TrainingFlag())
    >>> undo_tracing(model, before)
    >>> FLAG_NAME in model[0]._modules
    False
    >>> model[0].add_module(FLAG_NAME, TrainingFlag())
    >>> graph = fx.Graph()
    >>> flag = graph.call_module(f"0.{FLAG_NAME}")  # a graph that reads the flag
    >>> undo_tracing(model, before, keep=graph)
    >>> FLAG_NAME in model[0]._modules
    True
    """
    read = {str(n.target) for n in keep.nodes} if keep is not None else set()
    for path, m in _modules_outside_graphs(module):
        if (
            id(m) not in snapshot.flag_owners
            and isinstance(m._modules.get(FLAG_NAME), TrainingFlag)
            and join_path(path, FLAG_NAME) not in read
        ):
            del m._modules[FLAG_NAME]
    for name in [k for k in module.__dict__ if k not in snapshot.attributes]:
        if name.startswith("_tensor_constant") and name not in read:
            del module.__dict__[name]
