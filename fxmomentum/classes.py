"""Classes made at run time from a user's class, that survive ``copy.deepcopy`` and pickling.

Two places swap a module's class for one derived from it, so that the module keeps every
attribute, method, property and ``isinstance`` of its own class while behaving differently:
``transform_to_momentumnet``'s layers (``class (_MomentumLayer, TheLayer)``) and a submodule
replaced by its converted graph (``class (GraphModule, TheModule)``). :func:`derived_class`
makes such a class once per tuple of bases and registers it in this module under a name that
spells the bases' import paths, so pickle finds it by reference in a fresh process (this
module's ``__getattr__`` rebuilds it from the name). :func:`importable` says whether a class
can be found that way at all (a class defined inside a function cannot).

Examples
--------
>>> import pickle
>>> from torch import nn
>>> class Local:
...     pass
>>> cls = derived_class(nn.Identity, nn.Module)
>>> cls.__name__, issubclass(cls, nn.Identity)
('Module', True)
>>> type(pickle.loads(pickle.dumps(cls()))) is cls
True
>>> importable(Local)
False
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = ["derived_class", "importable"]

_PREFIX = "Derived["
_MADE: dict[tuple[type, ...], type] = {}


def _spell(cls: type) -> str:
    # pickle looks classes up by dotted qualname, so the name must hold no dots.
    return f"{cls.__module__.replace('.', '/')}:{cls.__qualname__.replace('.', '/')}"


def _find(module: str, qualname: str) -> Any:
    found: Any = sys.modules.get(module)
    if found is None:
        try:
            found = importlib.import_module(module)
        except ImportError:
            return None
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found


def importable(cls: type) -> bool:
    """Whether ``cls`` can be found by its module and qualified name (as pickle does)."""
    return _find(cls.__module__, cls.__qualname__) is cls


def derived_class(*bases: type) -> type:
    """The class ``(*bases)``, made once per tuple of bases, picklable by reference.

    Parameters
    ----------
    *bases : type
        Its bases, in order (each importable, or itself a derived class).
        Behaviour comes from the bases only (a class rebuilt from its name has no other
        attributes). Its ``__name__`` (what ``repr`` shows) is the first base's
        ``derived_name`` format (``"MomentumLayer[{}]"``) filled with the last base's name, or
        that name alone.

    Returns
    -------
    type
    """
    cls = _MADE.get(bases)
    if cls is None:
        qualname = f"{_PREFIX}{'|'.join(_spell(b) for b in bases)}]"
        namespace = {"__module__": __name__, "__qualname__": qualname}
        cls = type(qualname, bases, namespace)
        cls.__name__ = getattr(bases[0], "derived_name", "{}").format(bases[-1].__name__)
        _MADE[bases] = cls
        globals()[qualname] = cls
    return cls


def __getattr__(qualname: str) -> type:
    # Unpickling in a fresh process: rebuild the class from its name.
    if qualname.startswith(_PREFIX) and qualname.endswith("]"):
        bases = []
        for spelled in qualname[len(_PREFIX) : -1].split("|"):
            module, _, path = spelled.partition(":")
            base = _find(module.replace("/", "."), path.replace("/", "."))
            if not isinstance(base, type):
                raise AttributeError(f"cannot rebuild {qualname}: {spelled} is not importable")
            bases.append(base)
        return derived_class(*bases)
    raise AttributeError(f"module {__name__!r} has no attribute {qualname!r}")
