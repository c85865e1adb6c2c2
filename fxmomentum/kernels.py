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
    "abs_max",
    "backward_step_",
    "decode",
    "forward_step_",
    "unadd_",
]

#: Tensors smaller than this run the eager kernels (compiling would cost more than it saves).
COMPILE_MIN_NUMEL = 1 << 15

_LOW = GAMMA_DENOM - 1
_HALF = GAMMA_DENOM // 2


def _decode(X: torch.Tensor, inv_scale: torch.Tensor, dtype: torch.dtype):
    # X * 2**-s is exact; the int64 -> float conversion rounds once, the same way every time.
    x = (X.to(inv_scale.dtype) * inv_scale).to(dtype)
    return x, X.sum()


def _abs_max(f: torch.Tensor) -> torch.Tensor:
    return f.detach().abs().amax().to(torch.float64)


# The steps update the state in place (compiled, the fused loop stores straight into it):
# the state is as large as the chain's activation and a copy would count in peak memory.
def _forward_step_(
    X: torch.Tensor, V: torch.Tensor, head: torch.Tensor, f: torch.Tensor, c: torch.Tensor, n: int
) -> torch.Tensor:
    G = torch.round(f.to(c.dtype) * c).to(torch.int64)
    # v <- gamma * v: the low GAMMA_BITS of V go onto the stack, a digit in [0, n) comes off.
    T = (head << GAMMA_BITS) | (V & _LOW)
    q = torch.div(T, n, rounding_mode="floor")
    V_new = (V >> GAMMA_BITS) * n + (T - q * n) + G
    X_new = X + ((V_new + _HALF) >> GAMMA_BITS)
    head.copy_(q)
    V.copy_(V_new)
    X.copy_(X_new)
    return torch.stack(
        [X_new.abs().amax().to(torch.float64), V_new.abs().amax().to(torch.float64)]
    )


def _unadd_(X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return X.sub_((V + _HALF) >> GAMMA_BITS)


def _backward_step_(
    V: torch.Tensor, head: torch.Tensor, f: torch.Tensor, c: torch.Tensor, n: int
) -> None:
    V_f = V - torch.round(f.to(c.dtype) * c).to(torch.int64)
    V_hi = torch.div(V_f, n, rounding_mode="floor")
    T = head * n + (V_f - V_hi * n)
    V.copy_((V_hi << GAMMA_BITS) | (T & _LOW))
    head.copy_(T >> GAMMA_BITS)


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
abs_max = _Kernel(_abs_max)
forward_step_ = _Kernel(_forward_step_)
unadd_ = _Kernel(_unadd_)
backward_step_ = _Kernel(_backward_step_)
