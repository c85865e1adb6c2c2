"""A converted submodule in place of the original, in a model that keeps its Python code.

Where a model's own ``forward`` stays Python code, conversion replaces each captured
submodule by its converted GraphModule. The parent's code may read the child's attributes (a
config, a flag) and call its methods (``self.encoder.head(x)``), so the graph module keeps
them: its class derives from GraphModule and from the replaced module's class
(:func:`fxmomentum.classes.derived_class`), and it holds the replaced module's attributes, also
through ``copy.deepcopy`` and pickling.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from ..classes import derived_class, importable

__all__ = ["keep_module_class", "put_in_place"]


class _SkipInit:
    """Sits between GraphModule and the replaced module's class: GraphModule.__init__ calls
    ``super().__init__()``, which would reach that class's own ``__init__``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        nn.Module.__init__(self)  # type: ignore[arg-type]


class _KeepsClass(fx.GraphModule):
    """A graph module that pickles back into the class of the module it replaced."""

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild, args = fx.GraphModule.__reduce__(self)
        derived = next(c for c in type(self).__mro__ if c.__bases__[:1] == (_KeepsClass,))
        original = derived.__bases__[-1]
        if not importable(original):  # a local class: the plain graph module
            return rebuild, args
        return _rebuild_keeping_class, (rebuild, args, original)


def _rebuild_keeping_class(rebuild: Any, args: tuple, cls: type) -> nn.Module:
    gm = rebuild(*args)
    keep_module_class(gm, cls)
    return gm


def keep_module_class(gm: fx.GraphModule, cls: type) -> None:
    """Make ``gm`` an instance of the module class it replaces, with its methods.

    The graph module's class derives from GraphModule and then ``cls``: the graph's forward
    and GraphModule's own machinery come first, then every method, property and override of
    ``cls`` (``super()`` in them works, and ``isinstance(gm, cls)`` holds). ``cls.__init__`` is
    not run again: the graph module holds the replaced module's attributes. ``copy.deepcopy``
    keeps the class (torch.fx builds each copy's class on it) and pickling restores it when
    ``cls`` can be imported.

    Examples
    --------
    >>> class Head(nn.Linear):
    ...     def scale(self):
    ...         return 2.0
    >>> gm = fx.symbolic_trace(Head(2, 2))
    >>> keep_module_class(gm, Head)
    >>> isinstance(gm, Head), gm.scale(), type(gm).__name__
    (True, 2.0, 'Head')
    """
    if cls is nn.Module or not issubclass(cls, nn.Module) or issubclass(cls, fx.GraphModule):
        return
    base = derived_class(_KeepsClass, _SkipInit, cls)
    # One class per instance, as torch.fx makes them (its qualified name tells torch.fx so):
    # recompile puts forward on it.
    impl = type("GraphModuleImpl", (base,), {})
    impl.__name__ = cls.__name__
    gm.__class__ = impl
    gm.recompile()


def put_in_place(root: nn.Module, old: nn.Module, gm: fx.GraphModule) -> None:
    """Register ``gm`` wherever ``old`` is registered under ``root``, with ``old``'s public
    attributes (also through ``copy.deepcopy``, which rebuilds a GraphModule from its graph
    and its meta) and its class's methods."""
    kept = {
        key: value
        for key, value in old.__dict__.items()
        if not key.startswith("_") and not hasattr(gm, key)
    }
    gm.__dict__.update(kept)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {}).update(kept)
    keep_module_class(gm, type(old))
    for m in list(root.modules()):
        for key, child in m._modules.items():
            if child is old:
                m._modules[key] = gm
