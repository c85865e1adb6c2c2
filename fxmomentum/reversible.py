"""The reversible momentum-chain autograd function.

Forward runs the chain ``v <- gamma*v + (1-gamma)*f_t(x); x <- x + v`` in exact integer
arithmetic (:mod:`fxmomentum.exact`) without recording a graph, and keeps only the chain's
output plus a compact bit stack. Backward walks the chain in reverse, rebuilding every ``x_t``
bit for bit, recomputing ``f_t(x_t)`` with grad enabled (same RNG state, same autocast state,
buffers left as the forward left them) and back-propagating through that one block.

This module knows nothing about torch.fx; :class:`fxmomentum.chain.MomentumChain` calls it.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .attention import forward_attention_kernels
from .exact import GAMMA_BITS, GAMMA_DENOM, BitStack
from .kernels import (
    abs_max_f,
    backward_step_,
    checksum,
    coarsen_,
    forward_step_,
    input_grad_,
    join,
    join_wide,
    on_grid,
    split,
    split_wide,
    state_stats,
    unadd_,
    unadd_unshift_,
    unshift_v_,
)

_HALF = GAMMA_DENOM // 2

__all__ = ["ChainRun", "ChainSpec", "NumericalError", "reversible_chain"]

# At the start of a block |X| < 2**R and |V| < 2**(R + GAMMA_BITS); after a coarsening both are
# below half of that. R = 32 gives float32 chains 8 bits more than float32 holds; float64 chains
# get 44. Everything stays far from int64 overflow (V < 2**(R + 18) within a step).
_RANGE_BITS = {torch.float32: 32, torch.float64: 44}
# Keep 2**-s, 2**(s + 16) and the decoded values inside the float32 / float64 exponent range.
_SCALE_LIMITS = {torch.float32: (-88, 100), torch.float64: (-900, 900)}
# Only refine the grid when at least this many bits are gained (each change costs a pass).
_REFINE_HYSTERESIS = 4


class NumericalError(FloatingPointError):
    """A value in a reversible chain is not finite, so the chain cannot be run exactly."""


@dataclass
class ChainSpec:
    """What a chain is, apart from its tensors.

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
    """

    blocks: Sequence[Callable[..., torch.Tensor]]
    residual: Sequence[bool]
    gamma_num: int
    names: Sequence[str] = ()
    reads: Sequence[Sequence[int] | None] = ()

    def name(self, t: int) -> str:
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

    def call(self, t: int, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """``f_t(x)``: the block's output, minus ``x`` for a non-residual block."""
        out = self.output(t, x, args, kwargs)
        return out if self.residual[t] else out - x

    def plain_step(
        self, t: int, x: torch.Tensor, v: torch.Tensor | None, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One block of the chain in ordinary floating point (autograd records it as usual)."""
        n = self.gamma_num
        if n == 0 and not self.residual[t]:
            # gamma = 0 reproduces the original block exactly, without x + (y - x).
            return self.blocks[t](x, *args, **kwargs), v
        f = self.call(t, x, args, kwargs)
        if n == 0:
            v = f
        elif v is None:
            v = ((GAMMA_DENOM - n) / GAMMA_DENOM) * f
        else:
            v = (n / GAMMA_DENOM) * v + ((GAMMA_DENOM - n) / GAMMA_DENOM) * f
        return x + v, v


class _Arguments:
    """A block's extra arguments, with their tensors taken out (they are autograd inputs)."""

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
        leaves = list(self.leaves)
        for i, t in zip(self.tensor_slots, tensors, strict=True):
            leaves[i] = t
        return tree_unflatten(leaves, self.tree)


@dataclass
class _BlockRecord:
    shift: int  # >0: grid coarsened by this many bits before the block; <0: refined
    scale: int  # grid exponent s (x = X * 2**-s) after the shift
    # The sum of V after the block's step (a Python int: one small tensor kept per block lands
    # on top of the block's freed temporaries and fragments the heap, which then grows with the
    # chain's depth). Backward compares it with the rebuilt V's, which with the next block's
    # input, checked the same way, determines this block's input.
    checksum: int
    arguments: _Arguments
    # Indices into arguments.tensors of those the block's autograd node takes (see
    # ChainSpec.reads).
    reads: tuple[int, ...] = ()
    cpu_rng: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None
    mutated_buffers: list[torch.Tensor] = field(default_factory=list)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalar(value: float, work: torch.dtype, device: torch.device) -> torch.Tensor:
    # A 0-dim tensor rather than a Python float, so that compiled kernels are not
    # specialised (and recompiled) for every grid exponent.
    return torch.tensor(value, dtype=work, device=device)


def _from_float(x: torch.Tensor, s: int) -> torch.Tensor:
    return (x.to(_work_dtype(x.dtype)) * (2.0**s)).round_().to(torch.int64)


def _exponent(m: float) -> int:
    """The e with m < 2**e (0 for m = 0)."""
    return math.frexp(m)[1]


def _shift_for(xm: float, vm: float, gm: float, R: int) -> int:
    """Grid change (bits, >0 coarser) that brings the largest magnitudes to about half range."""
    over = max(
        _exponent(xm) - (R - 1),
        _exponent(vm) - (R + GAMMA_BITS - 1),
        _exponent(gm) - (R + GAMMA_BITS - 1),
    )
    if over > 0 or xm >= 2.0**R or vm >= 2.0 ** (R + GAMMA_BITS):
        return max(over, 1)
    return over if over <= -_REFINE_HYSTERESIS else 0


def _signed_bits(a: torch.Tensor) -> int:
    """Bits of a two's complement integer holding every element of ``a``."""
    if not a.numel():
        return 1
    lo, hi = torch.aminmax(a)
    return max(-int(lo.item()), int(hi.item())).bit_length() + 1


def _pack(a: torch.Tensor, bits: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An integer tensor in the fewest bytes its values need: one narrow tensor, or the high
    int32 part and the low 16 bits (48-bit values, the velocity's usual size). ``bits``, when
    the caller knows it, saves a pass."""
    bits = _signed_bits(a) if bits is None else bits
    if bits <= 16:
        return a.to(torch.int16), None
    if bits <= 32:
        return a.to(torch.int32), None
    if bits <= 48:
        high, low = split_wide(a)
        return high, low.to(torch.int16)
    return a.to(torch.int64), None


def _unpack(packed: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    high, low = packed
    if low is None:
        return high.to(torch.int64)
    return join_wide(high, low.to(torch.int32))


def _buffers(block: object) -> list[torch.Tensor]:
    buffers = getattr(block, "buffers", None)
    return list(buffers()) if callable(buffers) else []


def _block_params(block: object) -> list[torch.Tensor]:
    parameters = getattr(block, "parameters", None)
    return list(parameters()) if callable(parameters) else []


def _too_large(spec: ChainSpec, t: int, what: str, value: float) -> NumericalError:
    return NumericalError(
        f"{spec.name(t)} of a reversible momentum chain: {what} is not finite or too large for "
        f"an exact state (max |value| = {value:.3g}). Lower the learning rate, check the inputs "
        f"and the block for overflow, or run this chain with use_backprop=True to debug."
    )


def _shift_(X: torch.Tensor, shift: int) -> torch.Tensor | None:
    """Move X, in place, to a grid ``shift`` bits coarser (>0, rounding) or finer (<0, exact).

    Returns the digits that coarsening drops (each in ``[0, 2**shift)``, as int32 when they
    fit), which the caller keeps on the bit stack.
    """
    if shift <= 0:
        X <<= -shift
        return None
    X += 1 << (shift - 1)
    low = X & ((1 << shift) - 1)
    X >>= shift
    return _narrow(low, shift)


def _narrow(low: torch.Tensor, shift: int) -> torch.Tensor:
    # Dropped digits wait through a whole block: keep them in int32 when they fit.
    return low.to(torch.int32) if shift < 32 else low


def _unshift_(X: torch.Tensor, low: torch.Tensor | None, shift: int) -> torch.Tensor:
    """Reverse :func:`_shift_` in place."""
    if shift <= 0:
        X >>= -shift
        return X
    X <<= shift
    X += low
    X -= 1 << (shift - 1)
    return X


class ChainRun:
    """The exact state of one run of a chain, shared by its blocks' autograd nodes.

    Forward moves it from block to block; backward moves it back, block by block, in the order
    in which autograd calls the nodes (last block first).
    """

    def __init__(self, spec: ChainSpec) -> None:
        self.spec = spec
        self.n = spec.gamma_num
        self.gamma = self.n / GAMMA_DENOM
        self.g = (GAMMA_DENOM - self.n) / GAMMA_DENOM
        self.records: list[_BlockRecord] = []
        self.consumed = False
        self.shared: set[int] | None = None  # ids of parameters in more than one block
        self._scalars: dict[float | tuple[str, int], torch.Tensor] = {}

    # -- forward ------------------------------------------------------------------------------
    def start(self, x0: torch.Tensor, v0: torch.Tensor | None) -> torch.Tensor:
        """Put ``x0`` (and ``v0``) on the grid; return the first block's input."""
        self.dtype, self.device = x0.dtype, x0.device
        self.work = _work_dtype(self.dtype)
        self.lo, self.hi = _SCALE_LIMITS[self.work]
        self.R = _RANGE_BITS[self.work]
        self.autocast = _autocast_state(self.device.type)
        self.has_v0 = v0 is not None
        self.stack = BitStack(x0)
        m0 = torch.linalg.vector_norm(x0.detach(), math.inf).item()
        mv = 0.0 if v0 is None else torch.linalg.vector_norm(v0.detach(), math.inf).item()
        if not math.isfinite(m0 + mv):
            raise _too_large(self.spec, 0, "the chain input", m0 + mv)
        m = max(m0, mv)
        s = self.hi if m == 0 else max(self.lo, min(self.hi, self.R - 1 - _exponent(m)))
        self.s = s
        self.V = (
            torch.zeros(x0.shape, dtype=torch.int64, device=x0.device)
            if v0 is None
            else torch.round(v0.to(self.work) * 2.0 ** (s + GAMMA_BITS)).to(torch.int64)
        )
        self.xm, self.vm, self.gm = m0 * 2.0**s, mv * 2.0 ** (s + GAMMA_BITS), 0.0
        xw, self.r = on_grid(x0.detach(), self._scalar(2.0**s), self._scalar(2.0**-s))
        x = self._decoded(xw)
        del xw
        # The whole initial state, for the check that backward returns to it exactly.
        self.start_sums = (checksum(self._xw(x), self.r), self.V.sum() if self.has_v0 else 0)
        return x

    # The exact X is held as (xw, r), see fxmomentum.kernels. For float32 and float64 chains xw
    # is the decoded x itself, which forward hands to the next block and backward recomputes
    # the block from, so it is not kept here between blocks (an autograd output kept by the
    # run would tie the run to its own graph); float16 / bfloat16 chains keep a float32 xw.
    def _set_x(self, X: torch.Tensor) -> torch.Tensor:
        xw, self.r = split(X, self._scalar(2.0**-self.s))
        return self._decoded(xw)

    def _decoded(self, xw: torch.Tensor) -> torch.Tensor:
        if self.dtype == self.work:
            self.xw = None
            return xw
        self.xw = xw
        return xw.to(self.dtype)

    def _xw(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() if self.xw is None else self.xw

    def _exact_x(self, x: torch.Tensor) -> torch.Tensor:
        X = join(self._xw(x), self.r, self._scalar(2.0**self.s))
        self.r = self.xw = None
        return X

    def _shift(self, bits: int) -> torch.Tensor:
        # A tensor, so that compiled kernels are not specialised for every shift.
        return self._scalar(("shift", bits))

    def _scalar(self, value: float | tuple[str, int]) -> torch.Tensor:
        # The grid changes seldom, so the same few scalars serve block after block.
        cached = self._scalars.get(value)
        if cached is None:
            if isinstance(value, tuple):
                cached = torch.tensor(value[1], dtype=torch.int64, device=self.device)
            else:
                cached = _scalar(value, self.work, self.device)
            self._scalars[value] = cached
        return cached

    def forward_block(
        self,
        t: int,
        x: torch.Tensor,
        arguments: _Arguments,
        reads: Sequence[int],
    ) -> torch.Tensor:
        """Run block ``t`` on its input ``x`` (the decoded state); return the next input.

        ``reads`` indexes the tensors of the block's extra ``arguments`` that are inputs of its
        autograd node (which get gradients).
        """
        spec, stack, n, R = self.spec, self.stack, self.n, self.R
        block = spec.blocks[t]
        buffers = _buffers(block)
        # Kernels such as batch_norm update running statistics without bumping the version
        # counter, so compare values.
        before = [b.clone() for b in buffers]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if x.is_cuda else None

        args, kwargs = arguments.build(arguments.tensors)
        version = x._version
        with _same_path_as_backward():
            out = spec.output(t, x, args, kwargs)
        if x._version != version:
            raise RuntimeError(
                f"{spec.name(t)} modified its input in place; a reversible momentum chain keeps "
                f"its state in that tensor. Make the block's first in-place op out of place "
                f"(e.g. ReLU(inplace=False)), or use use_backprop=True for this chain."
            )
        x_f = None if spec.residual[t] else x

        rec = _BlockRecord(
            shift=0,
            scale=self.s,
            checksum=0,
            arguments=arguments,
            reads=tuple(reads),
        )
        if not torch.equal(cpu_rng, torch.get_rng_state()):
            rec.cpu_rng = cpu_rng
        if cuda_rng is not None and not torch.equal(cuda_rng, torch.cuda.get_rng_state(x.device)):
            rec.cuda_rng = cuda_rng
        rec.mutated_buffers = [
            b for b, old in zip(buffers, before, strict=True) if not torch.equal(b, old)
        ]
        del before

        # The grid for this step: room for x, v and (1 - gamma) * f(x) on it.
        if x_f is None:
            lo, hi = torch.aminmax(out.detach())
            mf = max(-float(lo), float(hi))
        else:
            mf = float(abs_max_f(out.detach(), x_f.detach()))
        if not math.isfinite(mf):
            raise _too_large(spec, t, "its output f(x)", mf)
        s = self.s
        gm = self.g * mf * 2.0 ** (s + GAMMA_BITS)
        shift = max(s - self.hi, min(_shift_for(self.xm, self.vm, gm, R), s - self.lo))
        gm *= 2.0**-shift
        if gm >= 2.0 ** (R + GAMMA_BITS):
            raise _too_large(spec, t, "its output f(x)", mf)
        xw, low_x = self._xw(x), None
        if 0 < shift < 32:
            xw, low_x, low_v = coarsen_(
                xw,
                self.r,
                self.V,
                self._shift(shift),
                self._scalar(2.0**s),
                self._scalar(2.0 ** -(s - shift)),
            )
            # V's dropped digits go below this step's; X's on top, as backward needs them.
            stack.push(low_v, 1 << shift)
            del low_v
            self.s = s - shift
            xw = self._xw(self._decoded(xw))
        elif shift:
            X = self._exact_x(x)
            low_x = _shift_(X, shift)
            if shift > 0:
                # V's dropped digits go below this step's; X's on top, as backward needs them.
                stack.push(_shift_(self.V, shift).to(torch.int64), 1 << shift)
            else:
                _shift_(self.V, shift)
            self.s = s - shift
            xw = self._xw(self._set_x(X))
            del X
        c = self._scalar(self.g * 2.0 ** (self.s + GAMMA_BITS))
        stack.note_push(GAMMA_DENOM)
        stack.note_pop(n)
        xw_next, v_sum = forward_step_(
            xw,
            self.r,
            self.V,
            stack.head,
            out.detach(),
            None if x_f is None else x_f.detach(),
            c,
            n,
            self._scalar(2.0**self.s),
            self._scalar(2.0**-self.s),
        )
        del xw, out, x_f
        x_next = self._decoded(xw_next)
        rec.checksum = int(v_sum)
        stats = state_stats(xw_next, self.V)
        xwm, self.vm = stats.tolist()
        self.xm = xwm * 2.0**self.s
        self.gm = gm
        if shift > 0:
            stack.push(low_x, 1 << shift)
        rec.shift, rec.scale = shift, self.s
        self.records.append(rec)
        if t == len(spec.blocks) - 1:
            self._finish(x_next)
        return x_next

    def _finish(self, y: torch.Tensor) -> None:
        if not math.isfinite(self.xm):
            raise _too_large(self.spec, len(self.spec.blocks) - 1, "the chain output", math.inf)
        # What the output y does not hold of X, and V, are kept packed to the bits they need;
        # y is the rest. For float32 / float64 chains y is xw itself and r is that residual.
        if self.xw is None:
            # r is as narrow as a packed residual would be.
            self.kept_r, self.r = (self.r, None), None
        else:
            residual = _from_float(y, self.s).neg_().add_(self._exact_x(y))
            self.kept_r = _pack(residual)
            del residual
        # vm is V's largest magnitude, which the last step measured.
        self.kept_v = _pack(self.V, int(self.vm).bit_length() + 1)
        self.V = None
        self.stack.freeze()
        # The output is held here rather than saved on the autograd node, so that backward can
        # let go of it as soon as the state has moved back past it (a saved tensor lives until
        # the node's backward returns, through the recomputation of the last block).
        self.y, self.y_version = y.detach(), y._version

    @property
    def kept_nbytes(self) -> int:
        """Bytes the run keeps from its forward to its backward, beyond the output."""
        kept = [*self.kept_r, *self.kept_v] if hasattr(self, "kept_r") else []
        return self.stack.nbytes + sum(t.nbytes for t in kept if t is not None)

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
        y, self.y = self.y, None
        if y._version != self.y_version:
            raise RuntimeError(
                f"The output of a reversible momentum chain was modified by an in-place "
                f"operation after the chain (version {y._version}, expected "
                f"{self.y_version}); the chain rebuilds its state from that output. Make the "
                f"operation after the chain out of place (e.g. ReLU(inplace=False))."
            )
        self.stack.thaw(y)
        self.V = _unpack(self.kept_v)
        if self.dtype == self.work:
            # The decoded state is y itself: keep y, not a copy.
            self.r = self.kept_r[0]
            self.xw, self.x = None, y.detach()
        else:
            X = _from_float(y, self.s)
            X += _unpack(self.kept_r)
            self.x = self._set_x(X)
            del X
        self.kept_r = self.kept_v = (None, None)
        acc = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        # The gradient of the current block's f, which is (1 - gamma) times the gradient
        # reaching the velocity (see kernels._next_grad_f_): one buffer for both.
        self.grad_f = torch.zeros_like(y, dtype=acc)

    def _check_returned_to_start(self, x: torch.Tensor) -> None:
        # The per-block checks sample the state; the full state (x, v, an empty stack) must
        # come back to the start's bit for bit, or some block was not deterministic.
        stack = self.stack
        sums = (checksum(self._xw(x.detach()), self.r), self.V.sum())
        same = all(bool(a == b) for a, b in zip(sums, self.start_sums, strict=True))
        if not same or stack.words or stack.bound != 1 or bool(stack.head.any()):
            raise _not_rebuilt("the chain's input", "a block of the chain")

    def backward_block(self, t: int, grad_out: torch.Tensor | None, params: Sequence[torch.Tensor]):
        """Reverse block ``t``: rebuild its input, recompute it, return the input's gradients.

        Returns ``(grad_x, grad_context, grad_params)``, ``grad_context`` for the context
        tensors the block's node takes (``reads`` of :meth:`forward_block`).
        """
        spec, stack, n = self.spec, self.stack, self.n
        rec = self.records[t]
        shift = rec.shift
        low_x = _narrow(stack.undo_push(1 << shift), shift) if shift > 0 else None
        # References to superseded state are dropped at once: this runs while the block's
        # recomputed activations are alive, at the peak of the step's memory.
        x_next, self.x = self.x, None
        if 0 < shift < 32:
            xw, v_sum = unadd_unshift_(
                self._xw(x_next),
                self.r,
                self.V,
                low_x,
                self._shift(shift),
                self._scalar(2.0**self.s),
                self._scalar(2.0 ** -(rec.scale + shift)),
            )
            del low_x
            self.s = rec.scale + shift
            x = self._decoded(xw)
            del xw
        elif shift:
            v_sum = self.V.sum()
            X = self._exact_x(x_next)
            X -= (self.V + _HALF) >> GAMMA_BITS
            _unshift_(X, low_x, shift)
            del low_x
            self.s = rec.scale + shift
            x = self._set_x(X)
            del X
        else:
            xw, v_sum = unadd_(
                self._xw(x_next),
                self.r,
                self.V,
                self._scalar(2.0**self.s),
                self._scalar(2.0**-self.s),
            )
            x = self._decoded(xw)
            del xw
        del x_next
        if int(v_sum) != rec.checksum:
            raise _not_rebuilt(f"the input of {spec.name(t)}", "a block after it")
        del v_sum
        self.x = x
        x = x.detach().requires_grad_(True)
        taken = set(rec.reads)
        context = [
            c.detach().requires_grad_(c.requires_grad and i in taken)
            for i, c in enumerate(rec.arguments.tensors)
        ]
        args, kwargs = rec.arguments.build(context)
        wanted = [c for c in context if c.requires_grad]
        if grad_out is None:
            grad_out = torch.zeros_like(self.grad_f)
        grad_f = self.grad_f
        # Buffers are restored after the block's backward, which may read them.
        with _replay(self, rec, x.device):
            with torch.enable_grad(), forward_attention_kernels():
                out = spec.output(t, x, args, kwargs)
            x_f = None if spec.residual[t] else x.detach()
            scale = self._scalar(self.g * 2.0 ** (rec.scale + GAMMA_BITS))
            V, head, g = self.V, stack.head, self.g
            backward_step_(V, head, out.detach(), x_f, scale, n, grad_out, grad_f, g, self.gamma)
            stack.undo_note()
            stack.undo_note()
            if 0 < shift < 32:
                unshift_v_(self.V, stack.undo_push(1 << shift), self._shift(shift))
            elif shift:
                low_v = stack.undo_push(1 << shift) if shift > 0 else None
                _unshift_(self.V, low_v, shift)
                del low_v
            if t == 0:
                self._check_returned_to_start(x)
            if self.g == 0:
                # gamma = 1: f does not reach v, so the block gets no gradient and grad_f
                # carries the velocity's gradient itself.
                grad_f += grad_out
                grads = [None] * (1 + len(wanted) + len(params))
            else:
                # For a non-residual block f = out - x: the gradient goes through out, and x
                # gets -grad_f besides (no f tensor is formed).
                if self._accumulates_in_place(params):
                    # Each parameter's gradient goes into its .grad as soon as it is made, as
                    # in the original's backward; returned, a block's would all be held at once.
                    leaves = [x, *wanted]
                    torch.autograd.backward(out, grad_f.to(out.dtype), inputs=[*leaves, *params])
                    grads = [leaf.grad for leaf in leaves] + [None] * len(params)
                else:
                    grads = torch.autograd.grad(
                        out,
                        [x, *wanted, *params],
                        grad_outputs=grad_f.to(out.dtype),
                        allow_unused=True,
                    )
        del out
        # Autograd may pass grad_outputs straight through (the gradient of a bias added at
        # the end is grad_f itself); grad_f changes in place at the next block.
        grads = [g.clone() if g is not None and _aliased(g, [grad_f]) else g for g in grads]
        grad_x = _input_grad(grads, grad_out, None if x_f is None else grad_f, grad_f)
        it = iter(grads[1 : 1 + len(wanted)])
        grad_all = [next(it) if ci.requires_grad else None for ci in context]
        grad_context = [grad_all[i] for i in rec.reads]
        return grad_x, grad_context, list(grads[1 + len(wanted) :])

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
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            return False
        if self.shared is None:
            seen: set[int] = set()
            self.shared = set()
            for block in self.spec.blocks:
                for p in _block_params(block):
                    (self.shared if id(p) in seen else seen).add(id(p))
        return not any(
            id(p) in self.shared or p._backward_hooks or p._post_accumulate_grad_hooks
            for p in params
        )

    def release(self) -> None:
        """Drop the state once block 0 has gone backward.

        Autograd keeps every node, and so this run, until the whole backward has finished;
        the chains before this one recompute their blocks meanwhile.
        """
        self.V = self.r = self.x = self.xw = self.grad_f = self.stack = None
        self.records.clear()
        self._scalars.clear()

    def grad_v0(self) -> torch.Tensor:
        """The gradient of the initial velocity, once block 0 has gone backward."""
        return self.grad_f if self.g == 0 else self.grad_f * (self.gamma / self.g)


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


def _not_rebuilt(what: str, culprit: str) -> RuntimeError:
    return RuntimeError(
        f"A reversible momentum chain could not rebuild {what} bit for bit: {culprit} is not "
        f"deterministic (a different result for the same input). Call "
        f"torch.use_deterministic_algorithms(True), or use use_backprop=True for this chain."
    )


class _ReversibleBlock(torch.autograd.Function):
    """One block of a reversible chain: saves nothing (the run holds the chain's output)."""

    @staticmethod
    def forward(
        ctx,
        run: ChainRun,
        t: int,
        arguments: _Arguments,
        reads: list[int],
        n_params: int,
        x,
        v0,
        *tensors,
    ):  # type: ignore[override]
        if t == 0:
            x = run.start(x, v0)
        y = run.forward_block(t, x, arguments, reads)
        ctx.run, ctx.t = run, t
        ctx.params = tensors[len(tensors) - n_params :]
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "A reversible momentum chain does not support double backward "
                "(create_graph=True). Convert with use_backprop=True for higher-order gradients."
            )
        run: ChainRun = ctx.run
        if ctx.t == len(run.spec.blocks) - 1:
            run.begin_backward()
        devices = [grad_y.device] if grad_y is not None and grad_y.is_cuda else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            grad_x, grad_context, grad_params = run.backward_block(ctx.t, grad_y, ctx.params)
        grad_x = grad_x.to(run.dtype)
        grad_v0 = run.grad_v0().to(run.dtype) if ctx.t == 0 and run.has_v0 else None
        if ctx.t == 0:
            run.release()
        return (None, None, None, None, None, grad_x, grad_v0, *grad_context, *grad_params)


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype] | None:
    if device_type not in ("cpu", "cuda"):
        return None
    return (
        device_type,
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
    )


@contextlib.contextmanager
def _same_path_as_backward():
    """Keep torch's attention inference fast path off while a block runs without grad.

    ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take a fused kernel in eval
    mode when grad is off, which is the case inside the chain's forward but not in the
    recomputation; the two round differently, so the rebuilt activations would differ.
    """
    mha = torch.backends.mha
    enabled = mha.get_fastpath_enabled()
    if not enabled:
        yield
        return
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(True)


@contextlib.contextmanager
def _replay(run: ChainRun, rec: _BlockRecord, device: torch.device):
    """Recompute a block as the forward ran it: its RNG state and autocast state, and leave its
    buffers as the forward left them (the recomputation must not count a step twice)."""
    if rec.cpu_rng is not None:
        torch.set_rng_state(rec.cpu_rng)
    if rec.cuda_rng is not None:
        torch.cuda.set_rng_state(rec.cuda_rng, device)
    saved = [b.clone() for b in rec.mutated_buffers]
    autocast = (
        torch.autocast(run.autocast[0], dtype=run.autocast[2], enabled=run.autocast[1])
        if run.autocast is not None
        else contextlib.nullcontext()
    )
    try:
        with autocast:
            yield
    finally:
        with torch.no_grad():
            for b, old in zip(rec.mutated_buffers, saved, strict=True):
                b.copy_(old)


# torch.compile must not trace into a reversible run: the forward would run blocks compiled by
# Inductor while backward recomputes them eagerly (autograd calls it outside the compiled
# region), and the two round differently, so the rebuilt activations would not be the forward's
# bits. Each run is one graph break; the rest of the model is compiled as usual.
_EAGER_ONLY = (
    "a reversible momentum chain runs eagerly: backward recomputes its blocks outside the "
    "compiled graph and must get the forward's bits (use_backprop=True chains compile whole)"
)


@torch.compiler.disable(reason=_EAGER_ONLY)
def reversible_chain(
    spec: ChainSpec,
    x0: torch.Tensor,
    v0: torch.Tensor | None = None,
    args: tuple = (),
    kwargs: dict | None = None,
) -> torch.Tensor:
    """Run a momentum chain whose backward rebuilds activations instead of storing them.

    Each block is one autograd node that saves nothing (the last saves the output, which is
    the exact state); the chain's bit stack is shared between them. Parameter gradients reach
    ``.grad`` block by block, as in plain backprop.

    Parameters
    ----------
    spec : ChainSpec
        Blocks, their kinds and ``gamma``.
    x0 : torch.Tensor
        Chain input.
    v0 : torch.Tensor or None
        Initial velocity (``None`` means zero).
    args, kwargs
        Extra arguments passed to every block; tensors among them (masks, embeddings) get
        gradients.

    Returns
    -------
    torch.Tensor
        ``x_T``.

    Examples
    --------
    >>> blocks = [torch.nn.Linear(4, 4) for _ in range(3)]
    >>> spec = ChainSpec(blocks, [True] * 3, gamma_num=58982)
    >>> y = reversible_chain(spec, torch.randn(2, 4, requires_grad=True))
    >>> y.sum().backward()
    """
    run = start_run(spec, x0)
    arguments = _Arguments(args, kwargs or {})
    x = x0
    for t in range(len(spec.blocks)):
        x = run_block(run, t, x, v0 if t == 0 else None, arguments)
    return x


def start_run(spec: ChainSpec, x0: torch.Tensor) -> ChainRun:
    """A new run of a reversible chain; feed it blocks in order with :func:`run_block`."""
    if spec.gamma_num == 0:
        raise ValueError(
            "gamma = 0 cannot be reversed (the inverse divides by gamma): use gamma > 0, or "
            "use_backprop=True"
        )
    if not x0.is_floating_point():
        raise TypeError(f"a momentum chain needs a floating-point input, got {x0.dtype}")
    if x0.is_meta:
        raise NotImplementedError(
            "a reversible momentum chain cannot run on the meta device: it keeps an exact "
            "integer copy of its state, built from the values, which meta tensors do not have. "
            "Run meta models under torch.no_grad() (the chain then computes shapes as plain "
            "autograd would), or convert with use_backprop=True."
        )
    sharded = _fsdp_module(spec)
    if sharded is not None:
        raise RuntimeError(
            f"{sharded} is sharded by FSDP (fully_shard) inside a reversible momentum chain. "
            f"FSDP gathers a module's parameters around its forward and hooks its backward onto "
            f"the forward's autograd graph; a reversible chain records no graph and recomputes "
            f"the block in backward, so the sharded parameters would get no gradient. Apply "
            f"fully_shard to modules outside the chains and to the root (which keeps its "
            f"parameters gathered from forward to backward), or convert with use_backprop=True."
        )
    return ChainRun(spec)


def _fsdp_module(spec: ChainSpec) -> str | None:
    """The first submodule of a block managed by FSDP's ``fully_shard``, or None."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    kind = getattr(fsdp, "FSDPModule", None)
    if not isinstance(kind, type):
        return None
    for t, block in enumerate(spec.blocks):
        named_modules = getattr(block, "named_modules", None)
        if not callable(named_modules):
            continue
        for name, module in named_modules():
            if isinstance(module, kind):
                return f"{spec.name(t)}" + (f" (module {name!r})" if name else "")
    return None


@torch.compiler.disable(reason=_EAGER_ONLY)
def run_block(
    run: ChainRun, t: int, x: torch.Tensor, v0: torch.Tensor | None, arguments: _Arguments
) -> torch.Tensor:
    """Apply block ``t`` of ``run`` as its own autograd node; return the next input."""
    params = [p for p in _block_params(run.spec.blocks[t]) if p.requires_grad]
    spec = run.spec
    reads = arguments.tensor_indices(spec.reads[t] if spec.reads else None)
    taken = [arguments.tensors[i] for i in reads]
    return _ReversibleBlock.apply(run, t, arguments, reads, len(params), x, v0, *taken, *params)
