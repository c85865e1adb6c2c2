"""Recomputation: a function run without keeping its activations, and again in backward.

The memory planner's *recompute* strategy, for a chain (block by block, in the chain's own
momentum arithmetic: each block keeps its input ``x``) and for a segment of
the graph outside the chains. Both go through :func:`recomputed`, which is
``torch.utils.checkpoint`` (non-reentrant, PyTorch's recommended form: it replays the forward's
RNG and autocast states) plus what a training step needs besides: the buffers the function
changes (BatchNorm running statistics) are restored after the recomputation, so a step counts
once, as in the reversible engine.

Examples
--------
>>> from torch import nn
>>> bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
>>> x = torch.randn(8, 4, requires_grad=True)
>>> recomputed(bn, [bn], x).sum().backward()
>>> int(bn[1].num_batches_tracked)
1
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from .fsdp import in_units, sharded_units
from .replay import restoring_buffers
from .saved_ops import SavedOps
from .spec import BlockArguments, ChainSpec, block_buffers
from .update import needs_grad

__all__ = ["needs_backward", "recomputed", "recomputed_chain"]


def needs_backward(tensors: Iterable[object], parameters: Iterable[torch.Tensor]) -> bool:
    """Whether autograd will differentiate through something that reads ``tensors`` and
    ``parameters`` (:func:`~.update.needs_grad`: never under ``torch.export``)."""
    return needs_grad(itertools.chain(tensors, parameters))


def recomputed(
    fn: Callable[..., Any], owners: Iterable[object], *args: Any, saved: SavedOps | None = None
) -> Any:
    """``fn(*args)`` keeping only its inputs; recomputed in backward, buffers restored after.

    Parameters
    ----------
    fn : callable
        The function (a module, a block, a segment of a graph).
    owners : iterable
        What holds the buffers ``fn`` may change (modules, blocks with a ``buffers()``).
    *args
        Its arguments.
    saved : SavedOps, optional
        Operator outputs the forward keeps and the recomputation takes (:mod:`~.saved_ops`).
    """
    if torch.compiler.is_compiling():
        # Compiled, the recomputation is the partitioner's: it recomputes values, never a
        # buffer's update (functionalized, applied once in the forward), and keeps what it
        # chooses; torch.compile takes no context_fn of this kind.
        return checkpoint(fn, *args, use_reentrant=False)
    buffers = [b for owner in owners for b in block_buffers(owner)]

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        if saved is None:
            return contextlib.nullcontext(), restoring_buffers(buffers)
        forward, recompute = saved.contexts()
        return forward, restoring_buffers(buffers, recompute)

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


def recomputed_chain(
    spec: ChainSpec, x: torch.Tensor, v: torch.Tensor | None, args: tuple, span: int = 1
) -> torch.Tensor:
    """A momentum chain whose blocks keep only their input ``x`` and are recomputed in
    backward, one at a time, or ``span`` at a time.

    Only the block is recomputed; the momentum update after it (:meth:`ChainSpec.advance`)
    saves nothing for backward, so a block keeps one tensor as
    checkpointing the original block does, at any gamma. The arithmetic is the plain
    chain's (:meth:`ChainSpec.plain_step`): the same function, in floating point, as
    ``use_backprop=True``. With ``span > 1`` each run of ``span`` blocks is recomputed as one
    segment that keeps its input ``x`` (and ``v`` at gamma > 0), as checkpointing a layer of
    two residual blocks does; blocks in FSDP units are recomputed one at a time.
    """

    arguments = BlockArguments(args, {})
    reads = spec.tensor_reads(arguments)
    if span > 1 and sharded_units(spec.blocks, arguments.tensors, reads) is None:
        return _recomputed_segments(spec, x, v, arguments, span)

    def output(t: int, x: torch.Tensor, *args: Any) -> torch.Tensor:
        return spec.output(t, x, args, {})

    def step(t: int, state: tuple) -> tuple:
        x, v = state
        block_args, _ = arguments.build(arguments.tensors)
        out = recomputed(output, [spec.blocks[t]], t, x, *block_args, saved=spec.saved_ops(t))
        return spec.advance(t, x, v, out)

    return in_units(spec.blocks, arguments.tensors, reads, (x, v), step)[0]


def _recomputed_segments(
    spec: ChainSpec, x: torch.Tensor, v: torch.Tensor | None, arguments: BlockArguments, span: int
) -> torch.Tensor:
    block_args, _ = arguments.build(arguments.tensors)

    def segment(first: int, last: int, x: torch.Tensor, v: torch.Tensor | None, *args: Any):
        for t in range(first, last):
            x, v = spec.plain_step(t, x, v, args, {})
        return x, v

    for first in range(0, len(spec.blocks), span):
        last = min(first + span, len(spec.blocks))
        owners = spec.blocks[first:last]
        x, v = recomputed(segment, owners, first, last, x, v, *block_args)
        if spec.gamma_num == 0:
            v = None  # the next block does not read it: not kept by the next segment
    return x
