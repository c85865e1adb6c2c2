"""What a chain is, apart from its tensors: its blocks, their kinds, gamma, their arguments."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .exact import GAMMA_DENOM
from .saved_ops import SavedOps
from .update import momentum_update

__all__ = ["BlockArguments", "BlockMembers", "ChainSpec", "block_buffers", "block_parameters"]


@dataclass
class ChainSpec:
    """A chain's blocks and how they combine.

    Parameters
    ----------
    blocks : sequence of callables
        ``blocks[t](x, *args, **kwargs)`` is block ``t``.
    residual : sequence of bool
        ``True``: the block returns ``f(x)``; ``False``: it returns ``y`` and ``f(x) = y - x``.
    gamma_num : int
        ``gamma = gamma_num / 2**16``.
    names : sequence of str
        Block names for error messages.
    reads : sequence of (sequence of int or None)
        Per block, the positions of the chain's arguments it reads (None, or an empty
        ``reads``: all of them). A tensor a block does not read is not an input of its
        autograd node: a parameter handed to every block would otherwise have its gradient
        held until the whole chain has gone backward (autograd waits for every node that
        takes it).
    saved : sequence of (SavedOps or None)
        Per block, the outputs of its heavy operators its forward keeps so that its
        recomputation skips them (:mod:`~.saved_ops`); empty or None: none.

    Examples
    --------
    >>> spec = ChainSpec([torch.tanh, torch.sin], [True, True], gamma_num=0)
    >>> x, v = spec.plain_step(0, torch.zeros(2), None, (), {})
    >>> x.tolist(), spec.name(1)
    ([0.0, 0.0], 'block 1')
    """

    blocks: Sequence[Callable[..., torch.Tensor]]
    residual: Sequence[bool]
    gamma_num: int
    names: Sequence[str] = ()
    reads: Sequence[Sequence[int] | None] = ()
    saved: Sequence[SavedOps | None] = ()
    # A spec lives for one call of the chain: modules are listed once per call, not once per
    # use (a block's forward, its backward, the chain's checks each wanted them). A block's
    # list is made when first asked for, which for a block in an FSDP unit must be while the
    # unit is gathered (inside ``fsdp.in_units``): the unit's modules then hold the unsharded
    # parameters the block computes with.
    _members: dict[int, BlockMembers] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def parameters(self, t: int) -> list[torch.Tensor]:
        """Block ``t``'s parameters (none for a plain function), listed once per spec."""
        return self.members(t).parameters

    def buffers(self, t: int) -> list[torch.Tensor]:
        """Block ``t``'s buffers (none for a plain function), listed once per spec."""
        return self.members(t).buffers

    def members(self, t: int) -> BlockMembers:
        """Block ``t``'s modules, parameters and buffers, listed once per spec."""
        members = self._members.get(t)
        if members is None:
            members = self._members[t] = BlockMembers.of(self.blocks[t])
        return members

    def tensor_reads(self, arguments: BlockArguments) -> list[list[int]]:
        """Per block, the indices into ``arguments.tensors`` of the tensors it reads."""
        return [
            arguments.tensor_indices(self.reads[t] if self.reads else None)
            for t in range(len(self.blocks))
        ]

    def saved_ops(self, t: int) -> SavedOps | None:
        """What block ``t``'s forward keeps for its recomputation (None: nothing)."""
        return self.saved[t] if t < len(self.saved) and self.saved[t] else None

    def name(self, t: int) -> str:
        """Block ``t``'s name for messages."""
        return self.names[t] if t < len(self.names) else f"block {t}"

    def output(self, t: int, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Block ``t``'s own output (``f_t(x)`` if residual, else ``x + f_t(x)``)."""
        out = self.blocks[t](x, *args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{self.name(t)} of a momentum chain must return a tensor shaped like its input "
                f"{tuple(x.shape)}, got {got}"
            )
        return out

    def plain_step(
        self, t: int, x: torch.Tensor, v: torch.Tensor | None, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block of the chain in ordinary floating point (autograd records it as usual)."""
        if self.replaces_block(t):
            # gamma = 0 reproduces the original block exactly, without x + (y - x).
            return self.blocks[t](x, *args, **kwargs), v
        return self.advance(t, x, v, self.output(t, x, args, kwargs))

    def replaces_block(self, t: int) -> bool:
        """Whether the plain step of block ``t`` is the original block's call itself
        (gamma 0 and a block that returns ``x + f(x)`` whole)."""
        return self.gamma_num == 0 and not self.residual[t]

    def advance(
        self, t: int, x: torch.Tensor, v: torch.Tensor | None, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The momentum update of block ``t`` from its output ``out`` (:meth:`output`):
        ``v <- gamma v + (1 - gamma) f_t(x)``, ``x <- x + v``, in floating point
        (:func:`~.update.momentum_update`; autograd keeps nothing of it)."""
        if self.replaces_block(t):
            return out, v
        if self.gamma_num == 0:
            return x + out, out
        gamma = self.gamma_num / GAMMA_DENOM
        return momentum_update(x, out, v, gamma, subtract=not self.residual[t])


class BlockArguments:
    """A block's extra arguments, with their tensors taken out (they are autograd inputs).

    Examples
    --------
    >>> mask = torch.ones(2)
    >>> arguments = BlockArguments((mask, 3), {"scale": 0.5})
    >>> len(arguments.tensors), arguments.build([mask * 2])[0][0].tolist()
    (1, [2.0, 2.0])
    """

    def __init__(self, args: tuple, kwargs: dict) -> None:
        leaves, self.tree = tree_flatten((args, kwargs))
        self.tensor_slots = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor)]
        self.leaves = [None if isinstance(a, torch.Tensor) else a for a in leaves]
        self.tensors = [leaves[i] for i in self.tensor_slots]

    def tensor_indices(self, positions: Sequence[int] | None) -> list[int]:
        """Indices into :attr:`tensors` of the tensors in positional arguments ``positions``
        (every tensor for None)."""
        if positions is None:
            return list(range(len(self.tensors)))
        args, _ = tree_unflatten(list(range(len(self.leaves))), self.tree)
        slot = {leaf: k for k, leaf in enumerate(self.tensor_slots)}
        leaves = {leaf for p in positions for leaf in tree_flatten(args[p])[0]}
        return sorted(slot[leaf] for leaf in leaves if leaf in slot)

    def build(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with ``tensors`` in the tensors' places."""
        if not self.leaves:  # no arguments (most chains): skip the tree
            return (), {}
        leaves = list(self.leaves)
        for i, t in zip(self.tensor_slots, tensors, strict=True):
            leaves[i] = t
        return tree_unflatten(leaves, self.tree)


@dataclass
class BlockMembers:
    """A block's modules (by path), parameters and buffers, from one walk of its modules.

    Examples
    --------
    >>> members = BlockMembers.of(torch.nn.BatchNorm1d(3))
    >>> len(members.modules), len(members.parameters), len(members.buffers)
    (1, 2, 3)
    >>> BlockMembers.of(torch.tanh).modules is None
    True
    """

    #: ``(path, module)`` as ``named_modules`` lists them; None for a block that is no module.
    modules: list[tuple[str, torch.nn.Module]] | None
    parameters: list[torch.Tensor]
    buffers: list[torch.Tensor]

    @classmethod
    def of(cls, block: object) -> BlockMembers:
        """List ``block``'s members: what ``parameters()`` and ``buffers()`` give, in their
        order, from the one ``named_modules()`` walk (a walk of a converted graph's block is
        as costly as a small block's forward)."""
        if not isinstance(block, torch.nn.Module):
            return cls(None, block_parameters(block), block_buffers(block))
        modules = list(block.named_modules())
        return cls(
            modules,
            _unique(m._parameters.values() for _, m in modules),
            _unique(m._buffers.values() for _, m in modules),
        )


def _unique(groups: Iterator[Iterable[torch.Tensor | None]]) -> list[torch.Tensor]:
    """The tensors of ``groups`` in order, each once, Nones left out (as ``parameters()``)."""
    seen: set[int] = set()
    out = []
    for group in groups:
        for t in group:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def block_buffers(block: object) -> list[torch.Tensor]:
    """The buffers of a block (none for a plain function)."""
    return list(_listed(block, "buffers"))


def block_parameters(block: object) -> list[torch.Tensor]:
    """The parameters of a block (none for a plain function)."""
    return list(_listed(block, "parameters"))


def _listed(block: object, method: str) -> Iterator[torch.Tensor]:
    found = getattr(block, method, None)
    return found() if callable(found) else iter(())
