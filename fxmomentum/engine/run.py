"""The exact state of one run of a reversible chain, moved forward and back block by block.

Forward runs ``v <- gamma*v + (1-gamma)*f_t(x); x <- x + v`` in exact integer arithmetic
(:mod:`fxmomentum.engine.exact`, fused by :mod:`fxmomentum.engine.kernels`) without recording
a graph, and keeps only the chain's output plus a compact bit stack. Backward walks the chain in
reverse, rebuilding every ``x_t`` bit for bit, recomputing ``f_t(x_t)`` with grad enabled as the
forward ran it (:mod:`fxmomentum.engine.replay`) and back-propagating through that one block.

Notation (ARCHITECTURE.md, "The engine"): ``X`` and ``V`` are the exact integers of ``x`` and
``v`` on the grid, ``x = X * 2**-exponent`` and ``v = V * 2**-(exponent + 16)``. ``X`` is held
as ``x_work``, the float the next block receives anyway, plus ``x_residual = X - fl(X)``.

Passes over the state per block: forward, one (the step, which also measures ``f`` and the
maxima the next grid is chosen from); backward, one after the block's own backward (the step
reversed, the input's gradient, the previous block's ``grad_f`` and input, and the sum that
checks that input). Grid changes and a chain's two ends add a few.

This module knows nothing about torch.fx or autograd Functions;
:mod:`fxmomentum.engine.function` drives it.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .attention import forward_attention_kernels
from .exact import GAMMA_BITS, GAMMA_DENOM, BitStack
from .grid import (
    FUSED_SHIFT,
    Grid,
    from_float,
    narrow,
    pack,
    shift_,
    unpack,
    unshift_,
)
from .kernels import (
    abs_max_f,
    backward_step_,
    checksum,
    coarsen_,
    forward_step_,
    input_grad_,
    join,
    next_grad_f_,
    on_grid,
    split,
    unadd_,
    unadd_unshift_,
    unshift_v_,
)
from .replay import ForwardRun, autocast_state
from .spec import BlockArguments, ChainSpec

__all__ = ["BlockRecord", "ChainRun", "NumericalError"]

_HALF = GAMMA_DENOM // 2


class NumericalError(FloatingPointError):
    """A value in a reversible chain is not finite, so the chain cannot be run exactly."""


@dataclass
class BlockRecord:
    """What backward needs of one block's forward."""

    #: >0: grid coarsened by this many bits before the block; <0: refined.
    shift: int
    #: The grid exponent after the shift.
    exponent: int
    #: The sum of ``V`` after the block's step (a Python int: one small tensor kept per block
    #: lands on top of the block's freed temporaries and fragments the heap, which then grows
    #: with the chain's depth). Backward compares it with the rebuilt ``V``'s, which with the
    #: next block's input, checked the same way, determines this block's input.
    checksum: int
    arguments: BlockArguments
    #: Indices into ``arguments.tensors`` of those the block's autograd node takes (see
    #: ChainSpec.reads).
    reads: tuple[int, ...]
    #: RNG and autocast states and changed buffers, to recompute the block as it ran.
    forward: ForwardRun
    #: Hands the recomputation the operator outputs the forward kept (None: none kept).
    saved_outputs: Any = None


def _too_large(spec: ChainSpec, t: int, what: str, value: float) -> NumericalError:
    return NumericalError(
        f"{spec.name(t)} of a reversible momentum chain: {what} is not finite or too large for "
        f"an exact state (max |value| = {value:.3g}). Lower the learning rate, check the inputs "
        f"and the block for overflow, or run this chain with use_backprop=True to debug."
    )


def _not_rebuilt(what: str, culprit: str) -> RuntimeError:
    return RuntimeError(
        f"A reversible momentum chain could not rebuild {what} bit for bit: {culprit} is not "
        f"deterministic (a different result for the same input). Call "
        f"torch.use_deterministic_algorithms(True), or use use_backprop=True for this chain."
    )


class ChainRun:
    """The exact state of one run of a chain, shared by its blocks' autograd nodes.

    Forward moves it from block to block; backward moves it back, block by block, in the order
    in which autograd calls the nodes (last block first).

    Attributes
    ----------
    velocity : torch.Tensor
        ``V``, int64, while the chain runs forward or backward.
    x_residual : torch.Tensor
        ``X - fl(X)``, int16 (``|X - fl(X)| <= 2**10``; zero for float64 chains).
    x_work : torch.Tensor or None
        The float part of ``X`` where the chain's dtype is narrower than the work dtype
        (float16, bfloat16); None for float32 / float64 chains, whose decoded ``x`` is it.
    bit_stack : BitStack
        The lost bits: digits destroyed by ``v <- gamma * v`` and by coarsening the grid.
    """

    def __init__(self, spec: ChainSpec) -> None:
        self.spec = spec
        self.gamma_num = spec.gamma_num
        self.gamma = self.gamma_num / GAMMA_DENOM
        #: ``1 - gamma``, the weight of ``f`` in the velocity's update.
        self.f_weight = (GAMMA_DENOM - self.gamma_num) / GAMMA_DENOM
        self.records: list[BlockRecord] = []
        self.consumed = False
        self.shared: set[int] | None = None  # ids of parameters in more than one block

    # -- forward ------------------------------------------------------------------------------
    def start(self, x0: torch.Tensor, v0: torch.Tensor | None) -> torch.Tensor:
        """Put ``x0`` (and ``v0``) on the grid; return the first block's input."""
        self.dtype, self.device = x0.dtype, x0.device
        self.grid = grid = Grid(self.dtype, self.device)
        self.autocast = autocast_state(self.device.type)
        self.has_v0 = v0 is not None
        # Without v0, V and the stack start at zero: the first step takes them as zero without
        # reading them, and nothing zeroes them before (two passes less per chain).
        self.fresh = v0 is None
        self.bit_stack = BitStack(x0, zeroed=not self.fresh)
        x_max = float(abs_max_f(x0.detach(), None))
        v_max = 0.0 if v0 is None else float(abs_max_f(v0.detach(), None))
        if not math.isfinite(x_max + v_max):
            raise _too_large(self.spec, 0, "the chain input", x_max + v_max)
        grid.fit(max(x_max, v_max))
        e = grid.exponent
        self.velocity = (
            torch.empty_like(x0, dtype=torch.int64)
            if v0 is None
            else torch.round(v0.to(grid.work) * 2.0 ** (e + GAMMA_BITS)).to(torch.int64)
        )
        # The largest |X| and |V| on the grid, which the next step's grid change is chosen from.
        self.x_max, self.v_max = x_max * 2.0**e, v_max * 2.0 ** (e + GAMMA_BITS)
        x_work, self.x_residual, x_sum = on_grid(x0.detach(), grid.scale(), grid.inverse_scale())
        x = self._decoded(x_work)
        del x_work
        # The whole initial state, for the check that backward returns to it exactly.
        v_sum = self.velocity.sum() if self.has_v0 else 0
        self.start_sums = (x_sum, v_sum)
        return x

    # For float32 and float64 chains x_work is the decoded x itself, which forward hands to the
    # next block and backward recomputes the block from, so it is not kept here between blocks
    # (an autograd output kept by the run would tie the run to its own graph); float16 /
    # bfloat16 chains keep a float32 x_work.
    def _set_x(self, X: torch.Tensor) -> torch.Tensor:
        x_work, self.x_residual = split(X, self.grid.inverse_scale())
        return self._decoded(x_work)

    def _decoded(self, x_work: torch.Tensor) -> torch.Tensor:
        if self.dtype == self.grid.work:
            self.x_work = None
            return x_work
        self.x_work = x_work
        return x_work.to(self.dtype)

    def _x_work(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() if self.x_work is None else self.x_work

    def _exact_x(self, x: torch.Tensor) -> torch.Tensor:
        X = join(self._x_work(x), self.x_residual, self.grid.scale())
        self.x_residual = self.x_work = None
        return X

    def forward_block(
        self,
        t: int,
        x: torch.Tensor,
        arguments: BlockArguments,
        reads: Sequence[int],
    ) -> torch.Tensor:
        """Run block ``t`` on its input ``x`` (the decoded state); return the next input.

        ``reads`` indexes the tensors of the block's extra ``arguments`` that are inputs of its
        autograd node (which get gradients).
        """
        spec, stack, grid = self.spec, self.bit_stack, self.grid
        args, kwargs = arguments.build(arguments.tensors)
        version = x._version
        saved = spec.saved_ops(t)
        keeping, saved_outputs = saved.contexts() if saved else (contextlib.nullcontext(), None)
        members = spec.members(t)
        forward = ForwardRun(spec.blocks[t], x, self.autocast, members.buffers, members.modules)
        with forward as ran, keeping:
            out = spec.output(t, x, args, kwargs)
        if x._version != version:
            raise RuntimeError(
                f"{spec.name(t)} modified its input in place; a reversible momentum chain keeps "
                f"its state in that tensor. Make the block's first in-place op out of place "
                f"(e.g. ReLU(inplace=False)), or use use_backprop=True for this chain."
            )
        x_f = None if spec.residual[t] else x.detach()  # f = out - x_f for a non-residual block
        out = out.detach()
        # The grid must hold x, v and (1 - gamma) f. When x and v fit it, the step is taken
        # at once and measures f as it goes (a pass less); in the rare case f did not fit, the
        # step is reversed exactly (the kernels clamp f to a bound within which they are
        # exact) and taken again on a coarser grid.
        shift = grid.shift_for(self.x_max, self.v_max, 0.0)
        stepped = None
        if shift == 0:
            stepped = self._step(self._x_work(x), out, x_f)
            shift = self._shift_for(t, stepped[-1])
            if shift:
                self._unstep_forward(stepped[0], out, x_f)
                stepped = None
        else:
            shift = self._shift_for(t, float(abs_max_f(out, x_f)))
        low_x = None
        if stepped is None:
            self._materialize()
            x_work, low_x = self._regrid(x, shift)
            stepped = self._step(x_work, out, x_f)
            del x_work
        x_work_next, v_sum, x_work_max, v_max, _ = stepped
        del out, x_f, stepped
        x_next = self._decoded(x_work_next)
        self.v_max = float(v_max)
        self.x_max = float(x_work_max) * 2.0**grid.exponent
        if shift > 0:
            stack.push(low_x, 1 << shift)
        self.records.append(
            BlockRecord(
                shift, grid.exponent, int(v_sum), arguments, tuple(reads), ran, saved_outputs
            )
        )
        if t == len(spec.blocks) - 1:
            self._finish(x_next)
        return x_next

    def _materialize(self) -> None:
        """Zero ``V`` and the stack's head if no step has written them yet."""
        if self.fresh:
            self.velocity.zero_()
            self.bit_stack.head.zero_()
            self.fresh = False

    def _step(self, x_work: torch.Tensor, out: torch.Tensor, x_f: torch.Tensor | None) -> tuple:
        """One step on the current grid: ``forward_step_``'s results, ``max |f|`` last."""
        stack, grid = self.bit_stack, self.grid
        stack.note_push(GAMMA_DENOM)
        stack.note_pop(self.gamma_num)
        fresh, self.fresh = self.fresh, False
        x_work_next, v_sum, x_work_max, v_max, f_abs = forward_step_(
            x_work,
            self.x_residual,
            self.velocity,
            stack.head,
            out,
            x_f,
            self._f_scale(grid.exponent),
            self.gamma_num,
            grid.scale(),
            grid.inverse_scale(),
            fresh,
        )
        return x_work_next, v_sum, x_work_max, v_max, float(f_abs)

    def _unstep_forward(
        self, x_work_next: torch.Tensor, out: torch.Tensor, x_f: torch.Tensor | None
    ) -> None:
        """Reverse :meth:`_step` exactly: ``x_residual``, ``V`` and the stack as they were."""
        stack, grid = self.bit_stack, self.grid
        unadd_(x_work_next, self.x_residual, self.velocity, grid.scale(), grid.inverse_scale())
        backward_step_(
            self.velocity,
            stack.head,
            out,
            x_f,
            self._f_scale(grid.exponent),
            self.gamma_num,
            *[None] * 4,
            self.f_weight,
            self.gamma,
            None,
            None,
            grid.scale(),
            grid.inverse_scale(),
        )
        stack.undo_note()
        stack.undo_note()

    def _f_scale(self, exponent: int) -> torch.Tensor:
        """``(1 - gamma) * 2**(exponent + 16)``: ``f`` onto ``V``'s grid."""
        return self.grid.scalar(self.f_weight * 2.0 ** (exponent + GAMMA_BITS))

    def _shift_for(self, t: int, f_abs: float) -> int:
        """The grid change before block ``t``'s step: room for ``x``, ``v`` and
        ``(1 - gamma) * f(x)`` (``max |f| = f_abs``) on the grid."""
        if not math.isfinite(f_abs):
            raise _too_large(self.spec, t, "its output f(x)", f_abs)
        grid = self.grid
        f_max = self.f_weight * f_abs * 2.0 ** (grid.exponent + GAMMA_BITS)
        shift = grid.shift_for(self.x_max, self.v_max, f_max)
        if f_max * 2.0**-shift >= 2.0 ** (grid.range_bits + GAMMA_BITS):
            raise _too_large(self.spec, t, "its output f(x)", f_abs)
        return shift

    def _regrid(self, x: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Move the state to a grid ``shift`` bits coarser (or finer, < 0).

        Returns the float part of ``X`` on the new grid and, when coarser, the digits dropped
        from ``X``, which go on the stack above the step's (``V``'s go below them now, as
        backward needs them).
        """
        grid, stack = self.grid, self.bit_stack
        x_work, low_x = self._x_work(x), None
        if not shift:
            return x_work, None
        e = grid.exponent
        if 0 < shift < FUSED_SHIFT:
            x_work, low_x, low_v = coarsen_(
                x_work,
                self.x_residual,
                self.velocity,
                grid.shift_tensor(shift),
                grid.scale(e),
                grid.inverse_scale(e - shift),
            )
            stack.push(low_v, 1 << shift)
            del low_v
            grid.exponent = e - shift
            return self._x_work(self._decoded(x_work)), low_x
        X = self._exact_x(x)
        low_x = shift_(X, shift)
        if shift > 0:
            stack.push(shift_(self.velocity, shift).to(torch.int64), 1 << shift)
        else:
            shift_(self.velocity, shift)
        grid.exponent = e - shift
        x_work = self._x_work(self._set_x(X))
        return x_work, low_x

    def _finish(self, y: torch.Tensor) -> None:
        if not math.isfinite(self.x_max):
            raise _too_large(self.spec, len(self.spec.blocks) - 1, "the chain output", math.inf)
        # What the output y does not hold of X, and V, are kept packed to the bits they need;
        # y is the rest. For float32 / float64 chains y is x_work itself and x_residual is that
        # residual, as narrow as a packed one would be.
        if self.x_work is None:
            self.kept_residual, self.x_residual = (self.x_residual, None), None
        else:
            residual = from_float(y, self.grid.exponent).neg_().add_(self._exact_x(y))
            self.kept_residual = pack(residual)
            del residual
        # v_max is V's largest magnitude, which the last step measured.
        self.kept_velocity = pack(self.velocity, int(self.v_max).bit_length() + 1)
        self.velocity = None
        self.bit_stack.freeze()
        # The output is held here rather than saved on the autograd node, so that backward can
        # let go of it as soon as the state has moved back past it (a saved tensor lives until
        # the node's backward returns, through the recomputation of the last block).
        self.output, self.output_version = y.detach(), y._version

    @property
    def kept_nbytes(self) -> int:
        """Bytes the run keeps from its forward to its backward, beyond the output."""
        kept = [*self.kept_residual, *self.kept_velocity] if hasattr(self, "kept_residual") else []
        return self.bit_stack.nbytes + sum(t.nbytes for t in kept if t is not None)

    # -- backward -----------------------------------------------------------------------------
    def begin_backward(self) -> None:
        """Rebuild the final exact state from the output and the bit stack."""
        if self.consumed:
            raise RuntimeError(
                "Trying to backward through a reversible momentum chain a second time: its "
                "state is consumed by the first backward (retain_graph=True cannot keep it). "
                "Run the forward again."
            )
        self.consumed = True
        y, self.output = self.output, None
        if y._version != self.output_version:
            raise RuntimeError(
                f"The output of a reversible momentum chain was modified by an in-place "
                f"operation after the chain (version {y._version}, expected "
                f"{self.output_version}); the chain rebuilds its state from that output. Make "
                f"the operation after the chain out of place (e.g. ReLU(inplace=False))."
            )
        self.bit_stack.thaw(y)
        self.velocity = unpack(self.kept_velocity)
        if self.dtype == self.grid.work:
            # The decoded state is y itself: keep y, not a copy.
            self.x_residual = self.kept_residual[0]
            self.x_work, self.x = None, y.detach()
        else:
            X = from_float(y, self.grid.exponent)
            X += unpack(self.kept_residual)
            self.x = self._set_x(X)
            del X
        self.rebuilt = len(self.spec.blocks)  # self.x is the input of this block
        self.kept_residual = self.kept_velocity = (None, None)
        self.grad_dtype = (
            torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        )
        # The gradient of the current block's f, which is (1 - gamma) times the gradient
        # reaching the velocity (see kernels._next_grad_f_): one buffer for both. Made by the
        # last block's backward, from the gradient reaching the chain's output.
        self.grad_f: torch.Tensor | None = None
        # The previous block's grad_f, computed ahead (see _take_grad_f), and what it assumed.
        self.grad_f_next: torch.Tensor | None = None
        self.ahead: tuple[torch.Tensor, int] | None = None

    def _check_returned_to_start(self, x: torch.Tensor, v_sum: object) -> None:
        # The per-block checks sample the state; the full state (x, v, an empty stack) must
        # come back to the start's bit for bit, or some block was not deterministic.
        stack = self.bit_stack
        sums = (checksum(self._x_work(x.detach()), self.x_residual), v_sum)
        same = all(bool(a == b) for a, b in zip(sums, self.start_sums, strict=True))
        if not same or stack.words or stack.bound != 1 or bool(stack.head.any()):
            raise _not_rebuilt("the chain's input", "a block of the chain")

    def _unadd(self, t: int, record: BlockRecord) -> torch.Tensor:
        """``x_t`` from ``x_{t+1}``: ``x <- x - v``, then the grid block ``t`` changed to,
        undone for ``X``; checks the velocity's sum against the forward's."""
        grid, stack, shift = self.grid, self.bit_stack, record.shift
        low_x = narrow(stack.undo_push(1 << shift), shift) if shift > 0 else None
        # References to superseded state are dropped at once: this runs while the block's
        # recomputed activations are alive, at the peak of the step's memory.
        x_next, self.x = self.x, None
        before = record.exponent + shift
        if 0 < shift < FUSED_SHIFT:
            x_work, v_sum = unadd_unshift_(
                self._x_work(x_next),
                self.x_residual,
                self.velocity,
                low_x,
                grid.shift_tensor(shift),
                grid.scale(),
                grid.inverse_scale(before),
            )
            grid.exponent = before
            x = self._decoded(x_work)
        elif shift:
            v_sum = self.velocity.sum()
            X = self._exact_x(x_next)
            X -= (self.velocity + _HALF) >> GAMMA_BITS
            unshift_(X, low_x, shift)
            grid.exponent = before
            x = self._set_x(X)
            del X
        else:
            x_work, v_sum = unadd_(
                self._x_work(x_next),
                self.x_residual,
                self.velocity,
                grid.scale(),
                grid.inverse_scale(),
            )
            x = self._decoded(x_work)
        del x_next, low_x
        if int(v_sum) != record.checksum:
            raise _not_rebuilt(f"the input of {self.spec.name(t)}", "a block after it")
        return x

    def _unstep(
        self,
        t: int,
        out: torch.Tensor,
        x_f: torch.Tensor | None,
        grads: list[torch.Tensor | None],
        grad_out: torch.Tensor,
    ) -> torch.Tensor:
        """After block ``t``'s backward, in one pass where it can: ``V`` back to before its
        step and grid change; the gradient of its input (returned); the previous block's
        ``grad_f`` for that gradient (see :meth:`_take_grad_f`); and, where no grid change
        lies between, the previous block's input (``self.x``, checked against the forward)."""
        grid, stack, record = self.grid, self.bit_stack, self.records[t]
        shift, grad_f = record.shift, self.grad_f
        minus = None if x_f is None else grad_f
        gx = grads[0]
        in_place = (
            gx is not None
            and gx.dtype == grad_f.dtype
            and gx.is_contiguous()
            and not _aliased(gx, [*grads[1:], grad_out])
        )
        ahead = in_place and t > 0
        if ahead and self.grad_f_next is None:
            self.grad_f_next = torch.empty_like(grad_f)
        fuse = t > 0 and shift == 0 and self.records[t - 1].shift == 0
        x_t = self.x
        x_prev, v_sum = backward_step_(
            self.velocity,
            stack.head,
            out,
            x_f,
            self._f_scale(record.exponent),
            self.gamma_num,
            gx if in_place else None,
            grad_out,
            grad_f,
            self.grad_f_next if ahead else None,
            self.f_weight,
            self.gamma,
            self._x_work(x_t) if fuse else None,
            self.x_residual if fuse else None,
            grid.scale(),
            grid.inverse_scale(),
        )
        # grad_f_next is block t-1's grad_f if autograd hands that block gx, unchanged.
        self.ahead = (gx, gx._version) if ahead else None
        stack.undo_note()
        stack.undo_note()
        if 0 < shift < FUSED_SHIFT:
            unshift_v_(self.velocity, stack.undo_push(1 << shift), grid.shift_tensor(shift))
        elif shift:
            low_v = stack.undo_push(1 << shift) if shift > 0 else None
            unshift_(self.velocity, low_v, shift)
        grad_x = gx if in_place else _input_grad(grads, grad_out, minus, grad_f)
        if fuse:
            self.x, self.rebuilt = self._decoded(x_prev), t - 1
            del x_prev
            if int(v_sum) != self.records[t - 1].checksum:
                raise _not_rebuilt(f"the input of {self.spec.name(t - 1)}", "a block after it")
        elif t == 0:
            v_sum = v_sum if shift == 0 else self.velocity.sum()  # V was unshifted since
            self._check_returned_to_start(x_t, v_sum)
        return grad_x

    def _take_grad_f(self, grad_out: torch.Tensor) -> None:
        """Make ``grad_f`` this block's from the gradient reaching its output.

        Within a chain that gradient is the next block's input gradient, handed on by
        autograd as it was returned, and the next block's pass has computed this block's
        ``grad_f`` from it already; otherwise (hooks, another use of the block's output),
        it is computed here.
        """
        ahead, self.ahead = self.ahead, None
        if self.grad_f is None:  # the last block: grad_f = (1 - gamma) grad_out
            self.grad_f = grad_out.to(self.grad_dtype) * self.f_weight
        elif ahead is not None and grad_out is ahead[0] and grad_out._version == ahead[1]:
            self.grad_f, self.grad_f_next = self.grad_f_next, self.grad_f
        else:
            next_grad_f_(grad_out, self.grad_f, self.f_weight, self.gamma)

    def backward_block(self, t: int, grad_out: torch.Tensor | None, params: Sequence[torch.Tensor]):
        """Reverse block ``t``: rebuild its input, recompute it, return the input's gradients.

        Returns ``(grad_x, grad_context, grad_params)``, ``grad_context`` for the context
        tensors the block's node takes (``reads`` of :meth:`forward_block`).
        """
        spec, record = self.spec, self.records[t]
        if self.rebuilt != t:  # the next block's backward did not rebuild this input
            self.x, self.rebuilt = self._unadd(t, record), t
        x = self.x.detach().requires_grad_(True)
        taken = set(record.reads)
        context = [
            c.detach().requires_grad_(c.requires_grad and i in taken)
            for i, c in enumerate(record.arguments.tensors)
        ]
        args, kwargs = record.arguments.build(context)
        wanted = [c for c in context if c.requires_grad]
        if grad_out is None:
            grad_out = torch.zeros_like(x, dtype=self.grad_dtype)
        # Buffers are restored after the block's backward, which may read them.
        taking = record.saved_outputs or contextlib.nullcontext()
        plain = record.forward.plain  # no attention kernel to hold to the forward's
        attention = contextlib.nullcontext() if plain else forward_attention_kernels()
        with record.forward.replay(x.device):
            with torch.enable_grad(), attention, taking:
                out = spec.output(t, x, args, kwargs)
            self._take_grad_f(grad_out)
            grads = self._block_gradients(out, [x, *wanted], params)
        # Autograd may pass grad_outputs straight through (the gradient of a bias added at
        # the end is grad_f itself); grad_f's buffer is written again at the next block.
        grad_f = self.grad_f
        grads = [g.clone() if g is not None and _aliased(g, [grad_f]) else g for g in grads]
        x_f = None if spec.residual[t] else x.detach()
        grad_x = self._unstep(t, out.detach(), x_f, grads, grad_out)
        del out, x_f, x
        it = iter(grads[1 : 1 + len(wanted)])
        grad_all = [next(it) if ci.requires_grad else None for ci in context]
        grad_context = [grad_all[i] for i in record.reads]
        return grad_x, grad_context, list(grads[1 + len(wanted) :])

    def _block_gradients(
        self, out: torch.Tensor, leaves: list[torch.Tensor], params: Sequence[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        """The gradients of the block's ``out`` (cotangent ``grad_f``) for ``leaves`` (its
        input and context) and ``params`` (None where they went into ``.grad`` already).

        For a non-residual block ``f = out - x``: the gradient goes through ``out``, and ``x``
        gets ``-grad_f`` besides (no ``f`` tensor is formed).
        """
        grad_outputs = self.grad_f.to(out.dtype)
        if self._accumulates_in_place(params):
            # Each parameter's gradient goes into its .grad as soon as it is made, as in the
            # original's backward; returned, a block's would all be held at once.
            torch.autograd.backward(out, grad_outputs, inputs=[*leaves, *params])
            return [leaf.grad for leaf in leaves] + [None] * len(params)
        return list(
            torch.autograd.grad(
                out, [*leaves, *params], grad_outputs=grad_outputs, allow_unused=True
            )
        )

    def _accumulates_in_place(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether a block's parameter gradients may go straight into ``.grad``.

        Only in a plain ``.backward()`` (``torch.autograd.grad`` and ``backward(inputs=...)``
        want them returned), and only where accumulating from inside this node cannot be told
        apart from accumulating after it: no distributed training (DDP's reducer marks each
        parameter ready once per backward), no hooks on the parameters, and none shared with
        another block of the chain (each block would accumulate and call hooks on its own).
        """
        if not params or not torch.autograd._is_checkpoint_valid():
            return False
        if self.shared is None:  # once per run
            dist = sys.modules.get("torch.distributed")
            self.distributed = bool(
                dist is not None and dist.is_available() and dist.is_initialized()
            )
            seen: set[int] = set()
            self.shared = set()
            for t in range(len(self.spec.blocks)):
                for p in self.spec.parameters(t):
                    (self.shared if id(p) in seen else seen).add(id(p))
        if self.distributed:
            return False
        return not any(
            id(p) in self.shared or p._backward_hooks or p._post_accumulate_grad_hooks
            for p in params
        )

    def release(self) -> None:
        """Drop the state once block 0 has gone backward.

        Autograd keeps every node, and so this run, until the whole backward has finished;
        the chains before this one recompute their blocks meanwhile.
        """
        self.velocity = self.x_residual = self.x = self.x_work = self.grad_f = None
        self.grad_f_next = self.ahead = None
        self.bit_stack = None
        self.records.clear()
        self.grid.clear()

    def grad_v0(self) -> torch.Tensor:
        """The gradient of the initial velocity, once block 0 has gone backward."""
        return self.grad_f * (self.gamma / self.f_weight)


def _input_grad(
    grads: Sequence[torch.Tensor | None],
    grad_out: torch.Tensor,
    minus: torch.Tensor | None,
    grad_f: torch.Tensor,
) -> torch.Tensor:
    """``grad_out - minus`` plus what the block's backward gave its input (``grads[0]``).

    Added in place into ``grads[0]`` when that is a tensor of the run's own (autograd may hand
    the same tensor to several inputs: a block ``x + bias`` gives x and bias one gradient).
    The caller has copied every gradient that shares ``grad_f``'s storage.
    """
    gx = grads[0]
    if (
        gx is None
        or gx.dtype != grad_f.dtype
        or not gx.is_contiguous()
        or _aliased(gx, [*grads[1:], grad_out])
    ):
        total = grad_out.to(grad_f.dtype)
        total = total if minus is None else total - minus
        return total if gx is None else total + gx
    input_grad_(gx, grad_out, minus)
    return gx


def _aliased(t: torch.Tensor, others: Sequence[torch.Tensor | None]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(o is not None and o.untyped_storage().data_ptr() == ptr for o in others)
