"""Saved operator outputs: a recomputed block that skips its costliest operators.

A recomputed block (a chain's block under the *recompute* strategy, or in a reversible chain's
backward) runs its forward a second time. Where the output of one of its expensive operators
(a convolution, a matrix product, an attention kernel) is small for the time it takes, keeping
that output from the forward lets the recomputation take it instead of computing it again: the
operator's backward still gets everything it needs (its inputs are recomputed, its output is
the forward's, the same bits). This is torch's selective activation checkpointing
(``torch.utils.checkpoint.create_selective_checkpoint_contexts``): one dispatch mode caches the
chosen outputs during the forward, another hands them out, in call order, during the
recomputation. The memory planner chooses which outputs pay (:mod:`fxmomentum.surgery.budget`).

Examples
--------
>>> from torch import nn
>>> block = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 8))
>>> saved = SavedOps(frozenset({("aten.addmm.default", 0)}))
>>> forward, recompute = saved.contexts()
>>> x = torch.randn(4, 8)
>>> with torch.no_grad(), forward:
...     first = block(x)
>>> with recompute:  # the first addmm's output comes from the forward
...     again = block(x)
>>> torch.equal(first, again)
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["HEAVY_OPS", "SavedOps", "op_key"]

_aten = torch.ops.aten

#: The operators whose outputs a recomputation may take from the forward: those whose time
#: is large for the bytes they write (the rest is cheaper to recompute than to keep).
_HEAVY = {
    op: str(op)
    for op in (
        _aten.convolution.default,
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten.baddbmm.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
    )
}
#: Their names, as ``str(torch.ops.aten...)`` writes them.
HEAVY_OPS = frozenset(_HEAVY.values())


def op_key(func: Any) -> str | None:
    """The name of ``func`` (an aten operator) if it is one of :data:`HEAVY_OPS`, else None
    (a dictionary look-up: the dispatch modes call it for every operator)."""
    return _HEAVY.get(func)


@dataclass(frozen=True)
class SavedOps:
    """Which outputs of one block's heavy operators its forward keeps for the recomputation.

    Parameters
    ----------
    picks : frozenset of (str, int)
        ``(operator, k)``: the output of the ``k``-th call (from 0, in call order) of that
        operator (one of :data:`HEAVY_OPS`, as ``str(torch.ops.aten...)`` names it) in one run
        of the block.
    """

    picks: frozenset[tuple[str, int]]

    def __post_init__(self) -> None:
        unknown = sorted({op for op, _ in self.picks} - HEAVY_OPS)
        if unknown:
            raise ValueError(f"operators whose outputs can be saved are {sorted(HEAVY_OPS)}, "
                             f"got {unknown}")  # fmt: skip

    def __len__(self) -> int:
        return len(self.picks)

    def contexts(self) -> tuple[_Keeping, _Taking]:
        """``(forward, recompute)``: the forward runs under the first, which keeps the picked
        outputs; the recomputation under the second, which hands them out. A fresh pair per run
        of the block."""
        kept: dict[tuple[str, int], Any] = {}
        return _Keeping(self.picks, kept), _Taking(kept)


class _HeavyCalls(TorchDispatchMode):
    """Numbers the calls of each heavy operator; every other operator just runs (the
    recomputation may dispatch a few the forward did not, such as attention's kernel choice,
    which torch's own selective checkpointing modes, counting every operator, refuse)."""

    def __init__(self, kept: dict[tuple[str, int], Any]) -> None:
        super().__init__()
        self.kept = kept
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        name = op_key(func)
        if name is None:
            return func(*args, **(kwargs or {}))
        k = self.calls[name] = self.calls.get(name, -1) + 1
        return self.call((name, k), func, args, kwargs or {})

    def call(self, key: tuple[str, int], func: Any, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError


class _Keeping(_HeavyCalls):
    def __init__(self, picks: frozenset[tuple[str, int]], kept: dict) -> None:
        super().__init__(kept)
        self.picks = picks

    def call(self, key: tuple[str, int], func: Any, args: tuple, kwargs: dict) -> Any:
        out = func(*args, **kwargs)
        if key in self.picks:
            self.kept[key] = tree_map(_frozen, out)
        return out


class _Taking(_HeavyCalls):
    def call(self, key: tuple[str, int], func: Any, args: tuple, kwargs: dict) -> Any:
        found = self.kept.pop(key, None)  # handed out once: held no longer than needed
        if found is None or not all(_unchanged(v) for v in tree_leaves(found)):
            # Not kept, or written in place after the operator in the forward (the same write
            # will follow in the recomputation): computed again, as without keeping.
            return func(*args, **kwargs)
        return tree_map(_thawed, found)


class _Kept:
    """A kept output and its version (a leaf for tree_map, unlike a tuple)."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.version = tensor.detach(), tensor._version


def _frozen(value: Any) -> Any:
    return _Kept(value) if isinstance(value, torch.Tensor) else value


def _unchanged(value: Any) -> bool:
    return not isinstance(value, _Kept) or value.tensor._version == value.version


def _thawed(value: Any) -> Any:
    return value.tensor if isinstance(value, _Kept) else value
