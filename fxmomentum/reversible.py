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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .exact import GAMMA_BITS, GAMMA_DENOM, BitStack
from .kernels import backward_step, decode, forward_step, unadd

__all__ = ["ChainSpec", "NumericalError", "reversible_chain"]

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
    """Everything about a chain that is not a tensor input of the autograd function.

    Parameters
    ----------
    blocks : sequence of callables
        ``blocks[t](x, *args)`` is block ``t``.
    residual : sequence of bool
        ``True``: the block returns ``f(x)``; ``False``: it returns ``y`` and ``f(x) = y - x``.
    gamma_num : int
        ``gamma = gamma_num / 2**16``.
    args : tuple
        Extra arguments after ``x``; tensors among them are replaced, position by position,
        by the autograd function's context inputs.
    names : sequence of str
        Block names for error messages.
    """

    blocks: Sequence[Callable[..., torch.Tensor]]
    residual: Sequence[bool]
    gamma_num: int
    args: tuple = ()
    names: Sequence[str] = ()
    tensor_arg_positions: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.tensor_arg_positions = tuple(
            i for i, a in enumerate(self.args) if isinstance(a, torch.Tensor)
        )

    def name(self, t: int) -> str:
        return self.names[t] if t < len(self.names) else f"block {t}"

    def call(self, t: int, x: torch.Tensor, context: Sequence[torch.Tensor]) -> torch.Tensor:
        args = list(self.args)
        for pos, c in zip(self.tensor_arg_positions, context, strict=True):
            args[pos] = c
        out = self.blocks[t](x, *args)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{self.name(t)} of a momentum chain must return a tensor shaped like its input "
                f"{tuple(x.shape)}, got {got}"
            )
        return out if self.residual[t] else out - x


@dataclass
class _BlockRecord:
    shift: int  # >0: grid coarsened by this many bits before the block; <0: refined
    scale: int  # grid exponent s (x = X * 2**-s) after the shift
    checksum: torch.Tensor
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
    return torch.round(x.to(_work_dtype(x.dtype)) * (2.0**s)).to(torch.int64)


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
    return int(a.abs().max().item()).bit_length() + 1 if a.numel() else 1


def _buffers(block: object) -> list[torch.Tensor]:
    return list(block.buffers()) if isinstance(block, nn.Module) else []


def _block_params(block: object) -> list[torch.Tensor]:
    return list(block.parameters()) if isinstance(block, nn.Module) else []


def _too_large(spec: ChainSpec, t: int, what: str, value: float) -> NumericalError:
    return NumericalError(
        f"{spec.name(t)} of a reversible momentum chain: {what} is not finite or too large for "
        f"an exact state (max |value| = {value:.3g}). Lower the learning rate, check the inputs "
        f"and the block for overflow, or run this chain with use_backprop=True to debug."
    )


def _shifted(X: torch.Tensor, V: torch.Tensor, shift: int):
    """Move X and V to a grid ``shift`` bits coarser (>0, rounding) or finer (<0, exact).

    Returns the moved tensors and the digits that coarsening drops, each in ``[0, 2**shift)``.
    """
    if shift <= 0:
        return X << -shift, V << -shift, None, None
    half = 1 << (shift - 1)
    Xs, Vs = (X + half) >> shift, (V + half) >> shift
    return Xs, Vs, X - (Xs << shift) + half, V - (Vs << shift) + half


def _unshifted(X: torch.Tensor, low: torch.Tensor | None, shift: int) -> torch.Tensor:
    if shift <= 0:
        return X >> -shift
    return (X << shift) + low - (1 << (shift - 1))


class _ReversibleChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: ChainSpec, n_context: int, x0, v0, *tensors):  # type: ignore[override]
        dtype, device = x0.dtype, x0.device
        work = _work_dtype(dtype)
        lo, hi = _SCALE_LIMITS[work]
        R = _RANGE_BITS[work]
        n = spec.gamma_num
        g = (GAMMA_DENOM - n) / GAMMA_DENOM
        context = tensors[:n_context]
        stack = BitStack(x0)
        records: list[_BlockRecord] = []
        use_cuda_rng = x0.is_cuda

        m0 = torch.linalg.vector_norm(x0.detach(), math.inf).item()
        mv = 0.0 if v0 is None else torch.linalg.vector_norm(v0.detach(), math.inf).item()
        if not math.isfinite(m0 + mv):
            raise _too_large(spec, 0, "the chain input", m0 + mv)
        s = hi if max(m0, mv) == 0 else max(lo, min(hi, R - 1 - _exponent(max(m0, mv))))
        X = _from_float(x0, s)
        V = (
            torch.zeros_like(X)
            if v0 is None
            else torch.round(v0.to(work) * 2.0 ** (s + GAMMA_BITS)).to(torch.int64)
        )
        xm, vm, gm = m0 * 2.0**s, mv * 2.0 ** (s + GAMMA_BITS), 0.0

        for t in range(len(spec.blocks)):
            block = spec.blocks[t]
            x, checksum = decode(X, _scalar(2.0**-s, work, device), dtype)
            buffers = _buffers(block)
            # Kernels such as batch_norm update running statistics without bumping the version
            # counter, so compare values too.
            before = [b.clone() for b in buffers]
            cpu_rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state(device) if use_cuda_rng else None

            f = spec.call(t, x, context)

            rec = _BlockRecord(shift=0, scale=s, checksum=checksum)
            if not torch.equal(cpu_rng, torch.get_rng_state()):
                rec.cpu_rng = cpu_rng
            if use_cuda_rng and not torch.equal(cuda_rng, torch.cuda.get_rng_state(device)):
                rec.cuda_rng = cuda_rng
            rec.mutated_buffers = [
                b for b, old in zip(buffers, before, strict=True) if not torch.equal(b, old)
            ]
            del before

            stack.note_push(GAMMA_DENOM)
            stack.note_pop(n)
            shift = _shift_for(xm, vm, gm, R)
            while True:
                shift = max(s - hi, min(shift, s - lo))
                Xs, Vs, low_x, low_v = _shifted(X, V, shift) if shift else (X, V, None, None)
                c = _scalar(g * 2.0 ** (s - shift + GAMMA_BITS), work, device)
                X1, V1, head, stats = forward_step(Xs, Vs, stack.head, f, c, n)
                gm, xm, vm = stats.tolist()
                if not math.isfinite(gm):
                    raise _too_large(spec, t, "its output f(x)", gm * 2.0 ** -(s - shift + 16))
                if gm < 2.0 ** (R + GAMMA_BITS):
                    break
                if s - shift <= lo:
                    raise _too_large(spec, t, "its output f(x)", gm * 2.0 ** -(s - shift + 16))
                more = _shift_for(0.0, 0.0, gm, R)
                shift += more
                gm *= 2.0**-more
            X, V, stack.head = X1, V1, head
            s -= shift
            if shift > 0:
                stack.push(low_x, 1 << shift)
                stack.push(low_v, 1 << shift)
            rec.shift, rec.scale = shift, s
            records.append(rec)

        y, _ = decode(X, _scalar(2.0**-s, work, device), dtype)
        if not torch.isfinite(y).all():
            raise _too_large(spec, len(spec.blocks) - 1, "the chain output", math.inf)
        residual = X - _from_float(y, s)
        bits_r, bits_v = _signed_bits(residual), _signed_bits(V)
        stack.push_signed(residual, bits_r)
        stack.push_signed(V, bits_v)
        stack.freeze()

        ctx.spec = spec
        ctx.n_context = n_context
        ctx.stack = stack
        ctx.records = records
        ctx.final = (s, bits_r, bits_v)
        ctx.has_v0 = v0 is not None
        ctx.autocast = _autocast_state(device.type)
        ctx.save_for_backward(y, *tensors)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "A reversible momentum chain does not support double backward "
                "(create_graph=True). Convert with use_backprop=True for higher-order gradients."
            )
        if ctx.stack is None:
            raise RuntimeError(
                "Trying to backward through a reversible momentum chain a second time: its "
                "state is consumed by the first backward (retain_graph=True cannot keep it). "
                "Run the forward again."
            )
        spec: ChainSpec = ctx.spec
        y, *tensors = ctx.saved_tensors
        context = tensors[: ctx.n_context]
        params = tensors[ctx.n_context :]
        dtype, device = y.dtype, y.device
        work = _work_dtype(dtype)
        n = spec.gamma_num
        gamma = n / GAMMA_DENOM
        g = (GAMMA_DENOM - n) / GAMMA_DENOM
        stack: BitStack = ctx.stack
        ctx.stack = None  # the state is consumed as the chain is reversed

        s, bits_r, bits_v = ctx.final
        stack.thaw(y)
        V = stack.undo_push_signed(bits_v)
        X = _from_float(y, s) + stack.undo_push_signed(bits_r)

        wanted = [(i, c) for i, c in enumerate(context) if c.requires_grad]
        param_index = {id(p): j for j, p in enumerate(params)}
        grad_context: list[torch.Tensor | None] = [None] * len(context)
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        a = grad_y.to(acc) if grad_y is not None else torch.zeros_like(y, dtype=acc)
        b = torch.zeros_like(a)
        mismatches = []

        devices = [device] if y.is_cuda else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            for t in reversed(range(len(spec.blocks))):
                rec: _BlockRecord = ctx.records[t]
                shift = rec.shift
                low_v = stack.undo_push(1 << shift) if shift > 0 else None
                low_x = stack.undo_push(1 << shift) if shift > 0 else None
                X = unadd(X, V)
                if shift:
                    X = _unshifted(X, low_x, shift)
                x, checksum = decode(X, _scalar(2.0 ** -(rec.scale + shift), work, device), dtype)
                mismatches.append(checksum != rec.checksum)

                block = spec.blocks[t]
                x.requires_grad_(True)
                block_params = [p for p in _block_params(block) if id(p) in param_index]
                c = a + b
                inputs = [x, *(ci for _, ci in wanted), *block_params]
                # Buffers are restored after the block's backward, which may read them.
                with _replay(ctx, rec, device):
                    with torch.enable_grad():
                        f = spec.call(t, x, context)
                    scale = _scalar(g * 2.0 ** (rec.scale + GAMMA_BITS), work, device)
                    V, stack.head = backward_step(V, stack.head, f.detach(), scale, n)
                    stack.undo_note()
                    stack.undo_note()
                    grads = torch.autograd.grad(
                        f, inputs, grad_outputs=(c * g).to(f.dtype), allow_unused=True
                    )
                del f
                if shift:
                    V = _unshifted(V, low_v, shift)
                if grads[0] is not None:
                    a = a + grads[0].to(acc)
                b = c * gamma
                for (i, _), gi in zip(wanted, grads[1 : 1 + len(wanted)], strict=True):
                    grad_context[i] = _accumulate(grad_context[i], gi)
                for p, gp in zip(block_params, grads[1 + len(wanted) :], strict=True):
                    j = param_index[id(p)]
                    grad_params[j] = _accumulate(grad_params[j], gp)

        if mismatches and bool(torch.stack(mismatches).any()):
            raise RuntimeError(
                "A reversible momentum chain could not rebuild its activations bit for bit: "
                "some block is not deterministic (a different result for the same input). "
                "Call torch.use_deterministic_algorithms(True), or use use_backprop=True for "
                "this chain."
            )
        grad_x0 = a.to(dtype)
        grad_v0 = b.to(dtype) if ctx.has_v0 else None
        return (None, None, grad_x0, grad_v0, *grad_context, *grad_params)


def _accumulate(total: torch.Tensor | None, g: torch.Tensor | None) -> torch.Tensor | None:
    if g is None:
        return total
    return g if total is None else total + g


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype] | None:
    if device_type not in ("cpu", "cuda"):
        return None
    return (
        device_type,
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
    )


@contextlib.contextmanager
def _replay(ctx, rec: _BlockRecord, device: torch.device):
    """Recompute a block as the forward ran it: its RNG state and autocast state, and leave its
    buffers as the forward left them (the recomputation must not count a step twice)."""
    if rec.cpu_rng is not None:
        torch.set_rng_state(rec.cpu_rng)
    if rec.cuda_rng is not None:
        torch.cuda.set_rng_state(rec.cuda_rng, device)
    saved = [b.clone() for b in rec.mutated_buffers]
    autocast = (
        torch.autocast(ctx.autocast[0], dtype=ctx.autocast[2], enabled=ctx.autocast[1])
        if ctx.autocast is not None
        else contextlib.nullcontext()
    )
    try:
        with autocast:
            yield
    finally:
        with torch.no_grad():
            for b, old in zip(rec.mutated_buffers, saved, strict=True):
                b.copy_(old)


def reversible_chain(
    spec: ChainSpec,
    x0: torch.Tensor,
    v0: torch.Tensor | None,
    context: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Run a momentum chain whose backward rebuilds activations instead of storing them.

    Parameters
    ----------
    spec : ChainSpec
        Blocks, their kinds, ``gamma`` and extra arguments.
    x0 : torch.Tensor
        Chain input.
    v0 : torch.Tensor or None
        Initial velocity (``None`` means zero).
    context : sequence of torch.Tensor
        The tensors among ``spec.args``, in order: every block receives them, and their
        gradients are returned.
    params : sequence of torch.Tensor
        Every distinct parameter of the blocks that requires grad.

    Returns
    -------
    torch.Tensor
        ``x_T``.

    Examples
    --------
    >>> blocks = [torch.nn.Linear(4, 4) for _ in range(3)]
    >>> spec = ChainSpec(blocks, [True] * 3, gamma_num=58982)
    >>> params = [p for b in blocks for p in b.parameters()]
    >>> y = reversible_chain(spec, torch.randn(2, 4), None, [], params)
    >>> y.sum().backward()
    """
    if spec.gamma_num == 0:
        raise ValueError(
            "gamma = 0 cannot be reversed (the inverse divides by gamma): use gamma > 0, or "
            "use_backprop=True"
        )
    if not x0.is_floating_point():
        raise TypeError(f"a momentum chain needs a floating-point input, got {x0.dtype}")
    return _ReversibleChain.apply(spec, len(context), x0, v0, *context, *params)
