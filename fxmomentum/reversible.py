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

from .exact import GAMMA_BITS, GAMMA_DENOM, BitStack, floor_divmod

__all__ = ["ChainSpec", "NumericalError", "reversible_chain"]

# x lives on a grid with |X| < 2**(_RANGE_BITS + 1); v on a grid 2**GAMMA_BITS finer.
_RANGE_BITS = 32
# Keep away from the ends of float32's exponent range so that 2**-s and 2**(s + 16) stay normal.
_SCALE_LIMITS = {torch.float32: (-100, 100), torch.float64: (-900, 900)}
# Only refine the grid when at least this many bits are gained (each change costs a pass).
_REFINE_HYSTERESIS = 4
_V_SHIFT_MASK = GAMMA_DENOM - 1
_V_HALF = GAMMA_DENOM // 2


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
        for pos, c in zip(self.tensor_arg_positions, context):
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
    scale: int  # grid exponent used for the block's F (after the shift)
    checksum: torch.Tensor
    cpu_rng: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None
    mutated_buffers: list[torch.Tensor] = field(default_factory=list)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_float(X: torch.Tensor, s: int, dtype: torch.dtype) -> torch.Tensor:
    work = _work_dtype(dtype)
    return (X.to(work) * (2.0**-s)).to(dtype)


def _from_float(x: torch.Tensor, s: int) -> torch.Tensor:
    return torch.round(x.to(_work_dtype(x.dtype)) * (2.0**s)).to(torch.int64)


def _scale_for(m: float, dtype: torch.dtype) -> int:
    lo, hi = _SCALE_LIMITS[_work_dtype(dtype)]
    if m == 0.0:
        return hi
    return max(lo, min(hi, _RANGE_BITS - math.frexp(m)[1]))


def _signed_bits(a: torch.Tensor) -> int:
    return int(a.abs().max().item()).bit_length() + 1 if a.numel() else 1


def _buffers(block: object) -> list[torch.Tensor]:
    return list(block.buffers()) if isinstance(block, nn.Module) else []


def _block_params(block: object) -> list[torch.Tensor]:
    return list(block.parameters()) if isinstance(block, nn.Module) else []


def _inf_norms(*tensors: torch.Tensor) -> list[float]:
    return torch.stack(
        [torch.linalg.vector_norm(t.detach(), math.inf).to(torch.float64) for t in tensors]
    ).tolist()


class _ReversibleChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: ChainSpec, n_context: int, x0, v0, *tensors):  # type: ignore[override]
        dtype = x0.dtype
        work = _work_dtype(dtype)
        n = spec.gamma_num
        g = (GAMMA_DENOM - n) / GAMMA_DENOM
        context = tensors[:n_context]
        stack = BitStack(x0)
        records: list[_BlockRecord] = []
        use_cuda_rng = x0.is_cuda

        vmax = 0.0
        mx0, = _inf_norms(x0)
        if v0 is not None:
            vmax, = _inf_norms(v0)
        s = _scale_for(max(mx0, vmax), dtype)
        X = _from_float(x0, s)
        V = (
            torch.zeros_like(X)
            if v0 is None
            else torch.round(v0.to(work) * 2.0 ** (s + GAMMA_BITS)).to(torch.int64)
        )

        for t in range(len(spec.blocks)):
            block = spec.blocks[t]
            x = _to_float(X, s, dtype)
            checksum = X.sum()
            buffers = _buffers(block)
            versions = [b._version for b in buffers]
            cpu_rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state(x0.device) if use_cuda_rng else None

            f = spec.call(t, x, context)

            rec = _BlockRecord(shift=0, scale=s, checksum=checksum)
            if not torch.equal(cpu_rng, torch.get_rng_state()):
                rec.cpu_rng = cpu_rng
            if use_cuda_rng and not torch.equal(cuda_rng, torch.cuda.get_rng_state(x0.device)):
                rec.cuda_rng = cuda_rng
            rec.mutated_buffers = [b for b, ver in zip(buffers, versions) if b._version != ver]

            mx, mf = _inf_norms(x, f)
            if not (math.isfinite(mx) and math.isfinite(mf)):
                bad = "its input" if not math.isfinite(mx) else "its output"
                raise NumericalError(
                    f"{spec.name(t)} of a reversible momentum chain: {bad} is not finite "
                    f"(max |x| = {mx:.3g}, max |f(x)| = {mf:.3g}). Lower the learning rate, "
                    f"check the inputs, or run this chain with use_backprop=True to debug."
                )
            s_new = _scale_for(max(mx, vmax, g * mf), dtype)
            shift = s - s_new
            if -_REFINE_HYSTERESIS < shift < 0:
                shift, s_new = 0, s
            if shift > 0:
                # Round to the coarser grid (floor would bias the chain downwards).
                half = 1 << (shift - 1)
                X_in, V_in = X, V
                X, V = (X + half) >> shift, (V + half) >> shift
                low_x, low_v = X_in - (X << shift) + half, V_in - (V << shift) + half
            elif shift < 0:
                X, V = X << -shift, V << -shift
            s = s_new
            rec.shift, rec.scale = shift, s

            F = torch.round(f.to(work) * (g * 2.0 ** (s + GAMMA_BITS))).to(torch.int64)
            # V <- gamma * V exactly: the low bits go on the stack, n's worth come back off it.
            stack.push(V & _V_SHIFT_MASK, GAMMA_DENOM)
            V = (V >> GAMMA_BITS) * n + stack.pop(n)
            V += F
            X += (V + _V_HALF) >> GAMMA_BITS
            if shift > 0:
                stack.push(low_x, 1 << shift)
                stack.push(low_v, 1 << shift)
            vmax = (n / GAMMA_DENOM) * vmax + g * mf + 2.0 ** (-s)
            records.append(rec)

        y = _to_float(X, s, dtype)
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
        ctx.autocast = _autocast_state(x0.device.type)
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
        dtype = y.dtype
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

        devices = [y.device] if y.is_cuda else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            for t in reversed(range(len(spec.blocks))):
                rec: _BlockRecord = ctx.records[t]
                shift = rec.shift
                if shift > 0:
                    low_v = stack.undo_push(1 << shift)
                    low_x = stack.undo_push(1 << shift)
                X = X - ((V + _V_HALF) >> GAMMA_BITS)
                if shift > 0:
                    half = 1 << (shift - 1)
                    X_in = (X << shift) + low_x - half
                elif shift < 0:
                    X_in = X >> -shift
                else:
                    X_in = X
                mismatches.append(X_in.sum() != rec.checksum)

                block = spec.blocks[t]
                x = _to_float(X_in, rec.scale + shift, dtype).requires_grad_(True)
                block_params = [
                    p for p in _block_params(block) if id(p) in param_index
                ]
                f = _recompute(ctx, rec, spec, t, x, context)

                F = torch.round(f.detach().to(work) * (g * 2.0 ** (rec.scale + GAMMA_BITS)))
                V = V - F.to(torch.int64)
                V_hi, r = floor_divmod(V, n)
                stack.undo_pop(r, n)
                V = (V_hi << GAMMA_BITS) | stack.undo_push(GAMMA_DENOM)
                if shift > 0:
                    V = (V << shift) + low_v - half
                elif shift < 0:
                    V = V >> -shift
                X = X_in

                c = a + b
                inputs = [x, *(ci for _, ci in wanted), *block_params]
                grads = torch.autograd.grad(
                    f, inputs, grad_outputs=(c * g).to(f.dtype), allow_unused=True
                )
                del f
                if grads[0] is not None:
                    a = a + grads[0].to(acc)
                b = c * gamma
                for (i, _), gi in zip(wanted, grads[1 : 1 + len(wanted)]):
                    grad_context[i] = _accumulate(grad_context[i], gi)
                for p, gp in zip(block_params, grads[1 + len(wanted) :]):
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


def _recompute(ctx, rec: _BlockRecord, spec: ChainSpec, t: int, x, context) -> torch.Tensor:
    if rec.cpu_rng is not None:
        torch.set_rng_state(rec.cpu_rng)
    if rec.cuda_rng is not None:
        torch.cuda.set_rng_state(rec.cuda_rng, x.device)
    saved = [b.clone() for b in rec.mutated_buffers]
    autocast = (
        torch.autocast(ctx.autocast[0], dtype=ctx.autocast[2], enabled=ctx.autocast[1])
        if ctx.autocast is not None
        else contextlib.nullcontext()
    )
    try:
        with torch.enable_grad(), autocast:
            return spec.call(t, x, context)
    finally:
        with torch.no_grad():
            for b, old in zip(rec.mutated_buffers, saved):
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
