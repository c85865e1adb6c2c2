"""Tensors that modules keep in plain Python attributes between calls.

Some modules compute a tensor in ``forward`` and keep it for later calls: timm's LeViT and
EfficientFormer attention keep ``attention_biases[:, idxs]`` in ``attention_bias_cache`` in
eval mode. A reversible block runs its forward without grad and is recomputed with grad in
backward: the recomputation would read what the forward stored (computed without grad) instead
of computing it again, and the parameters it came from would get no gradient. So a block must
not store tensors in its modules while it runs: :class:`PythonState` notes which tensors
modules hold in their attributes (directly, or in a dict, list or tuple) and
:meth:`PythonState.stored` says which attributes a call changed.

Examples
--------
>>> from torch import nn
>>> class Cached(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.weight = nn.Parameter(torch.ones(2))
...         self.cache = {}
...     def forward(self, x):
...         if "w" not in self.cache:
...             self.cache["w"] = self.weight * 2
...         return x * self.cache["w"]
>>> model = nn.Sequential(Cached())
>>> before = PythonState.of(model)
>>> _ = model(torch.ones(2))
>>> before.stored()
[('0', 'cache')]
>>> before.restore()
>>> model[0].cache
{}
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["KEEP_NOTHING", "PythonState", "may_keep_tensors", "runs_own_forward"]

#: ``nn.Module`` attributes that are torch's own bookkeeping, not the model's values.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
#: Types of attribute values that hold no tensor and need no copy.
_PLAIN = frozenset({int, float, bool, str, type(None)})


#: torch.nn modules whose own ``forward`` keeps nothing in the module's attributes. A block's
#: snapshot skips them (it is taken before every reversible block's forward, and a converted
#: ResNet block holds seven of them), unless an instance's forward is replaced or hooked.
KEEP_NOTHING = frozenset(
    {
        nn.AdaptiveAvgPool2d,
        nn.AvgPool2d,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.Dropout,
        nn.Embedding,
        nn.GELU,
        nn.GroupNorm,
        nn.Hardswish,
        nn.Identity,
        nn.LayerNorm,
        nn.LeakyReLU,
        nn.Linear,
        nn.MaxPool2d,
        nn.ReLU,
        nn.Sequential,
        nn.SiLU,
        nn.Sigmoid,
        nn.Tanh,
    }
)


def may_keep_tensors(module: nn.Module) -> bool:
    """Whether ``module``'s call may store a tensor in its attributes: False only for the
    torch.nn modules of :data:`KEEP_NOTHING` (the exact types, not subclasses) and classes
    that say so with ``keeps_no_tensors = True`` (a chain's graph blocks, whose generated code
    only calls), with their own ``forward`` and no forward hooks, nor global ones, which could
    store one.

    Examples
    --------
    >>> may_keep_tensors(nn.Linear(2, 2)), may_keep_tensors(nn.MultiheadAttention(4, 2))
    (False, True)
    >>> linear = nn.Linear(2, 2)
    >>> _ = linear.register_forward_hook(lambda m, i, o: None)
    >>> may_keep_tensors(linear)
    True
    """
    kind = type(module)
    if kind not in KEEP_NOTHING and getattr(kind, "keeps_no_tensors", False) is not True:
        return True
    return not runs_own_forward(module)


def runs_own_forward(module: nn.Module) -> bool:
    """Whether a call of ``module`` runs its class's ``forward`` and nothing else: no
    ``forward`` of the instance's own, no forward hooks on it, nor global ones.

    Examples
    --------
    >>> linear = nn.Linear(2, 2)
    >>> runs_own_forward(linear)
    True
    >>> _ = linear.register_forward_pre_hook(lambda m, args: None)
    >>> runs_own_forward(linear)
    False
    """
    hooks = torch.nn.modules.module
    return not (
        "forward" in module.__dict__
        or module._forward_hooks
        or module._forward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
    )


def _tensor_ids(value: Any) -> tuple[int, ...] | None:
    """Identities of the tensors ``value`` holds (itself, or the values of a dict, list or
    tuple), or None if it holds none."""
    if isinstance(value, torch.Tensor):
        return (id(value),)
    if isinstance(value, dict):
        items: Iterable[Any] = value.values()
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        return None
    found = tuple(id(v) for v in items if isinstance(v, torch.Tensor))
    return found or None


def _containers(value: Any) -> Any:
    """A copy of ``value`` one level deep where it is a dict or list (restored in place)."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    return value


@dataclass
class PythonState:
    """The tensors a set of modules hold in plain attributes, at one moment.

    Attributes
    ----------
    modules : list of (str, nn.Module)
        The modules watched, by path.
    held : dict
        Per module index and attribute name, the identities of the tensors it holds.
    saved : dict
        Per module index and attribute name, every plain attribute's value (dicts and lists
        copied), for :meth:`restore`.
    """

    modules: list[tuple[str, nn.Module]]
    held: dict[tuple[int, str], tuple[int, ...] | None] = field(default_factory=dict)
    saved: dict[tuple[int, str], Any] = field(default_factory=dict)

    @classmethod
    def of(cls, root: nn.Module | Iterable[tuple[str, nn.Module]]) -> PythonState:
        """The state of ``root`` and its submodules (or of the given ``(path, module)``)."""
        modules = list(root.named_modules() if isinstance(root, nn.Module) else root)
        state = cls(modules)
        saved, held = state.saved, state.held
        for i, (_, m) in enumerate(modules):
            # A reversible chain takes this snapshot before every block's forward: only the
            # model's own attributes are kept, most of them plain numbers.
            for key, value in m.__dict__.items():
                if key in _MODULE_INTERNALS:
                    continue
                if type(value) in _PLAIN:
                    saved[i, key] = value
                    continue
                saved[i, key] = _containers(value)
                ids = _tensor_ids(value)
                if ids is not None:
                    held[i, key] = ids
        return state

    def stored(self) -> list[tuple[str, str]]:
        """``(module path, attribute)`` of every attribute that holds other tensors now than
        when the state was taken."""
        out = []
        for i, (path, m) in enumerate(self.modules):
            for key, value in m.__dict__.items():
                if type(value) in _PLAIN or key in _MODULE_INTERNALS:
                    continue
                ids = _tensor_ids(value)
                if ids is not None and self.held.get((i, key)) != ids:
                    out.append((path, key))
        return out

    def restore(self, keep_added: bool = False) -> None:
        """Put back every plain attribute as it was when the state was taken (a dict or list
        refilled in place); remove the attributes holding tensors added since, unless
        ``keep_added``."""
        for i, (_, m) in enumerate(self.modules):
            for key, value in list(m.__dict__.items()):
                if key in _MODULE_INTERNALS:
                    continue
                if (i, key) in self.saved:
                    old = self.saved[i, key]
                    if isinstance(value, (dict, list)) and type(value) is type(old):
                        value.clear()
                        if isinstance(value, dict):
                            value.update(old)
                        else:
                            value.extend(old)
                    else:
                        m.__dict__[key] = old
                elif not keep_added and _tensor_ids(value) is not None:
                    del m.__dict__[key]
