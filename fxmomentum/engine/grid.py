"""The power-of-two grid of a chain's exact state, and the integer helpers that move it.

``x = X * 2**-exponent`` and ``v = V * 2**-(exponent + 16)`` with ``X`` and ``V`` integers
(ARCHITECTURE.md, "The engine"). :class:`Grid` holds the exponent, chooses the *shift* (> 0
coarser, rounding; < 0 finer, exact) as magnitudes grow or shrink, and caches the scalars the
kernels take. The helpers here shift an integer tensor between grids (the digits a coarsening
drops go on the bit stack) and pack one to the bits it needs between forward and backward.
:mod:`fxmomentum.engine.run` drives them.

Examples
--------
>>> grid = Grid(torch.float32, torch.device("cpu"))
>>> grid.fit(3.0)  # |x| <= 3 gets 29 bits below the point: |X| < 2**31
>>> grid.exponent
29
>>> X = torch.tensor([5, -6, 7])
>>> low = shift_(X, 2)  # a grid 2 bits coarser, rounding half up
>>> X.tolist(), low.tolist()
([1, -1, 2], [3, 0, 1])
>>> unshift_(X, low, 2).tolist()
[5, -6, 7]
"""

from __future__ import annotations

import math

import torch

from .exact import GAMMA_BITS
from .kernels import join_wide, split_wide

__all__ = [
    "FUSED_SHIFT",
    "Grid",
    "from_float",
    "narrow",
    "pack",
    "shift_",
    "signed_bits",
    "unpack",
    "unshift_",
    "work_dtype",
]

# At the start of a block |X| < 2**range_bits and |V| < 2**(range_bits + GAMMA_BITS); after a
# coarsening both are below half of that. 32 gives float32 chains 8 bits more than float32
# holds; float64 chains get 44. Everything stays far from int64 overflow (V < 2**(range_bits +
# 18) within a step).
_RANGE_BITS = {torch.float32: 32, torch.float64: 44}
# Keep 2**-exponent, 2**(exponent + 16) and the decoded values inside the float32 / float64
# exponent range.
_EXPONENT_LIMITS = {torch.float32: (-88, 100), torch.float64: (-900, 900)}
# Only refine the grid when at least this many bits are gained (each change costs a pass).
_REFINE_HYSTERESIS = 4
# Grid changes below this many bits are fused into one pass (their digits fit int32).
FUSED_SHIFT = 32


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The float dtype the exact state is decoded in (float32 for narrower dtypes)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _binary_exponent(m: float) -> int:
    """The e with m < 2**e (0 for m = 0)."""
    return math.frexp(m)[1]


class Grid:
    """The power-of-two grid of a chain's exact state, and the scalars its kernels take.

    ``x = X * 2**-exponent`` and ``v = V * 2**-(exponent + GAMMA_BITS)``; the exponent changes
    (by a *shift*, > 0 coarser) as values grow or shrink.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.work = work_dtype(dtype)
        self.device = device
        self.range_bits = _RANGE_BITS[self.work]
        self.min_exponent, self.max_exponent = _EXPONENT_LIMITS[self.work]
        self.exponent = self.max_exponent
        self._scalars: dict[float | tuple[str, int], torch.Tensor] = {}

    def fit(self, magnitude: float) -> None:
        """The finest exponent that holds values up to ``magnitude``."""
        if magnitude == 0:
            self.exponent = self.max_exponent
            return
        fitted = self.range_bits - 1 - _binary_exponent(magnitude)
        self.exponent = max(self.min_exponent, min(self.max_exponent, fitted))

    def shift_for(self, x_max: float, v_max: float, f_max: float) -> int:
        """Grid change (bits, > 0 coarser) that brings the largest magnitudes on the grid
        (``|X|``, ``|V|`` and ``|(1 - gamma) f|`` on ``V``'s grid) to about half range,
        within the exponent limits."""
        bits = self.range_bits
        over = max(
            _binary_exponent(x_max) - (bits - 1),
            _binary_exponent(v_max) - (bits + GAMMA_BITS - 1),
            _binary_exponent(f_max) - (bits + GAMMA_BITS - 1),
        )
        if over > 0 or x_max >= 2.0**bits or v_max >= 2.0 ** (bits + GAMMA_BITS):
            shift = max(over, 1)
        else:
            shift = over if over <= -_REFINE_HYSTERESIS else 0
        e = self.exponent
        return max(e - self.max_exponent, min(shift, e - self.min_exponent))

    def scale(self, exponent: int | None = None) -> torch.Tensor:
        """``2**exponent`` (the current one by default) as a work-dtype scalar."""
        return self.scalar(2.0 ** (self.exponent if exponent is None else exponent))

    def inverse_scale(self, exponent: int | None = None) -> torch.Tensor:
        """``2**-exponent`` as a work-dtype scalar."""
        return self.scalar(2.0 ** -(self.exponent if exponent is None else exponent))

    def shift_tensor(self, bits: int) -> torch.Tensor:
        """``bits`` as an int64 scalar tensor."""
        return self.scalar(("shift", bits))

    def scalar(self, value: float | tuple[str, int]) -> torch.Tensor:
        """A cached 0-dim tensor: compiled kernels are then not specialised (and recompiled)
        for every grid exponent, and the grid changes seldom, so a few serve block after
        block."""
        cached = self._scalars.get(value)
        if cached is None:
            if isinstance(value, tuple):
                cached = torch.tensor(value[1], dtype=torch.int64, device=self.device)
            else:
                cached = torch.tensor(value, dtype=self.work, device=self.device)
            self._scalars[value] = cached
        return cached

    def clear(self) -> None:
        """Drop the cached scalars (the run is over)."""
        self._scalars.clear()


def from_float(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """``round(x * 2**exponent)`` as int64: ``x`` put on the grid of that exponent."""
    return (x.to(work_dtype(x.dtype)) * (2.0**exponent)).round_().to(torch.int64)


def signed_bits(a: torch.Tensor) -> int:
    """Bits of a two's complement integer holding every element of ``a``."""
    if not a.numel():
        return 1
    lo, hi = torch.aminmax(a)
    return max(-int(lo.item()), int(hi.item())).bit_length() + 1


def pack(a: torch.Tensor, bits: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An integer tensor in the fewest bytes its values need: one narrow tensor, or the high
    int32 part and the low 16 bits (48-bit values, the velocity's usual size). ``bits``, when
    the caller knows it, saves a pass."""
    bits = signed_bits(a) if bits is None else bits
    if bits <= 16:
        return a.to(torch.int16), None
    if bits <= 32:
        return a.to(torch.int32), None
    if bits <= 48:
        return split_wide(a)
    return a.to(torch.int64), None


def unpack(packed: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """Reverse :func:`pack`: the int64 tensor."""
    high, low = packed
    if low is None:
        return high.to(torch.int64)
    return join_wide(high, low)


def shift_(X: torch.Tensor, shift: int) -> torch.Tensor | None:
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
    return narrow(low, shift)


def narrow(low: torch.Tensor, shift: int) -> torch.Tensor:
    """The digits a coarsening by ``shift`` bits dropped, as int32 when they fit (they wait
    through a whole block)."""
    return low.to(torch.int32) if shift < FUSED_SHIFT else low


def unshift_(X: torch.Tensor, low: torch.Tensor | None, shift: int) -> torch.Tensor:
    """Reverse :func:`shift_` in place."""
    if shift <= 0:
        X >>= -shift
        return X
    X <<= shift
    X += low
    X -= 1 << (shift - 1)
    return X
