"""Fused elementwise kernels of the reversible engine.

Each step of a reversible chain does about twenty integer passes over the chain's activation.
Run one by one in eager PyTorch they cost more than the block itself; fused by ``torch.compile``
into one loop they cost about as much as one pass. Every kernel computes exactly the same bits
compiled or not (integer arithmetic, one IEEE multiply and round-half-even), so the compiled
and the eager version may even be mixed between a forward and its backward.

Compilation is used on CPU tensors of at least :data:`COMPILE_MIN_NUMEL` elements, and turned
off with the environment variable ``FXMOMENTUM_COMPILE=0``. If compiling fails (no C++
compiler, say), a warning is given once and the eager kernels are used.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from .exact import GAMMA_BITS, GAMMA_DENOM

__all__ = [
    "COMPILE_MIN_NUMEL",
    "backward_step_",
    "decode",
    "forward_step_",
    "split_grad_",
    "unadd_",
    "unadd_decode_",
]

#: Tensors smaller than this run the eager kernels (compiling would cost more than it saves).
COMPILE_MIN_NUMEL = 1 << 15

_LOW = GAMMA_DENOM - 1
_HALF = GAMMA_DENOM // 2


def _decode(X: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype):
    # X * 2**-s is exact; the int64 -> float conversion rounds once, the same way every time.
    x = (X.to(inv_scale.dtype) * inv_scale).to(dtype)
    return x, X.sum()


def _floor_divmod(a: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Exact floor division by 1 <= n <= 2**16 for |a| < 2**62, without an integer divide
    # (int64 division does not vectorise and cost more than the rest of a step together). The
    # float64 quotient is within 2**11 of the true one; a second round on the remainder, exact
    # in float64, leaves it off by at most one, which the comparisons correct.
    inv = 1.0 / n
    q = torch.floor(a.to(torch.float64) * inv).to(torch.int64)
    r = a - q * n
    q2 = torch.floor(r.to(torch.float64) * inv).to(torch.int64)
    q = q + q2
    r = r - q2 * n
    below = (r < 0).to(torch.int64)
    r = r + below * n
    above = (r >= n).to(torch.int64)
    return q - below + above, r - above * n


# The steps update the state in place (compiled, the fused loop stores straight into it):
# the state is as large as the chain's activation and a copy would count in peak memory.
def _forward_step_(
    X: torch.Tensor,
    V: torch.Tensor,
    head: torch.Tensor,
    f: torch.Tensor,
    c: torch.Tensor,
    n: int,
    inv_scale: torch.Tensor,
    dtype: torch.dtype,
):
    """One step in place; returns the next input decoded, its checksum and max |X|, max |V|."""
    G = torch.round(f.to(c.dtype) * c).to(torch.int64)
    # v <- gamma * v: the low GAMMA_BITS of V go onto the stack, a digit in [0, n) comes off.
    q, r = _floor_divmod((head << GAMMA_BITS) | (V & _LOW), n)
    V_new = (V >> GAMMA_BITS) * n + r + G
    X_new = X + ((V_new + _HALF) >> GAMMA_BITS)
    head.copy_(q)
    V.copy_(V_new)
    X.copy_(X_new)
    x, checksum = _decode(X_new, inv_scale, dtype)
    stats = torch.stack(
        [X_new.abs().amax().to(torch.float64), V_new.abs().amax().to(torch.float64)]
    )
    return x, checksum, stats


def _unadd_(X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return X.sub_((V + _HALF) >> GAMMA_BITS)


def _unadd_decode_(X: torch.Tensor, V: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype):
    """:func:`_unadd_` then :func:`_decode` in one pass."""
    X_new = X - ((V + _HALF) >> GAMMA_BITS)
    X.copy_(X_new)
    return _decode(X_new, inv_scale, dtype)


def _backward_step_(
    V: torch.Tensor, head: torch.Tensor, f: torch.Tensor, c: torch.Tensor, n: int
) -> None:
    V_hi, V_lo = _floor_divmod(V - torch.round(f.to(c.dtype) * c).to(torch.int64), n)
    T = head * n + V_lo
    V.copy_((V_hi << GAMMA_BITS) | (T & _LOW))
    head.copy_(T >> GAMMA_BITS)


def _split_grad_(grad_out: torch.Tensor, b: torch.Tensor, g: float, gamma: float) -> torch.Tensor:
    """Backward of ``v <- gamma v + g f``: with ``c`` the gradient reaching ``v``, ``c = out + b``,
    return ``g c`` (the gradient of ``f``) and set ``b`` to ``gamma c`` in place."""
    c = grad_out.to(b.dtype) + b
    b.copy_(c * gamma)
    return c * g


class _Kernel:
    """An eager function plus, when worthwhile, its torch.compile'd twin."""

    _disabled = os.environ.get("FXMOMENTUM_COMPILE", "1") == "0"

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._compiled: Callable | None = None
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__.lstrip("_")

    def _use_compiled(self, t: torch.Tensor) -> bool:
        return (
            not _Kernel._disabled
            and t.device.type == "cpu"
            and t.numel() >= COMPILE_MIN_NUMEL
            and not torch.compiler.is_compiling()
        )

    def __call__(self, *args):
        if self._use_compiled(args[0]):
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, fullgraph=True)
            try:
                return self._compiled(*args)
            except Exception as err:  # any compiler failure falls back
                _Kernel._disabled = True
                warnings.warn(
                    f"fxmomentum: torch.compile of the reversible kernels failed ({err!r}); "
                    f"using eager kernels, which are slower but give the same bits. Set "
                    f"FXMOMENTUM_COMPILE=0 to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.fn(*args)


decode = _Kernel(_decode)
forward_step_ = _Kernel(_forward_step_)
unadd_ = _Kernel(_unadd_)
unadd_decode_ = _Kernel(_unadd_decode_)
backward_step_ = _Kernel(_backward_step_)
split_grad_ = _Kernel(_split_grad_)
