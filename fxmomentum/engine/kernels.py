"""Fused elementwise kernels of the reversible engine.

Each step of a reversible chain does about twenty integer passes over the chain's activation.
Run one by one in eager PyTorch they cost more than the block itself. The functions here are
the reference: eager PyTorch, any device and dtype. Each is wrapped in a :class:`_Kernel` that
runs, where it applies, a fused version computing exactly the same bits (integer arithmetic,
one IEEE multiply and round-half-even), so that the versions may even be mixed between a
forward and its backward:

* on CPU, float32 chains: the native kernels (:mod:`fxmomentum.engine.native`), C compiled once
  per machine and cached, one vectorised loop per kernel;
* on CUDA, tensors of at least :data:`COMPILE_MIN_NUMEL` elements: ``torch.compile``.

``FXMOMENTUM_COMPILE=0`` (read at each call) turns both off. If building or compiling fails
(no C compiler, say), a warning is given once and the eager kernels are used.

The first compilation in a process takes seconds: it is logged (INFO, this module's logger)
and :data:`on_first_compile` is called, which the command line uses for a progress line.
torch's "No CUDA runtime is found" log record, which compiling emits on a machine with a CUDA
toolkit and no GPU, is dropped there (and only there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator

import torch

from . import native
from .exact import GAMMA_BITS, GAMMA_DENOM, floor_divmod

__all__ = [
    "COMPILE_MIN_NUMEL",
    "R_DTYPE",
    "abs_max_f",
    "backward_step_",
    "checksum",
    "coarsen_",
    "forward_step_",
    "input_grad_",
    "join",
    "join_wide",
    "next_grad_f_",
    "on_grid",
    "split",
    "split_wide",
    "unadd_",
    "unadd_unshift_",
    "unshift_v_",
]

#: CUDA tensors smaller than this run the eager kernels (compiling would cost more than it
#: saves).
COMPILE_MIN_NUMEL = 1 << 15

#: The dtype of the exact state's residual ``r`` (see below).
R_DTYPE = torch.int16

_LOW = GAMMA_DENOM - 1
_HALF = GAMMA_DENOM // 2
#: Bounds of the quantized f, by work dtype: within them every step stays exact (the native
#: kernels hold float32 chains' integers in doubles, exact below 2**51).
_G_LIMIT = {torch.float32: 2.0**50, torch.float64: 2.0**62}


# The exact state X (int64, x = X * 2**-s) is kept as the float xw = fl(X) * 2**-s, which the
# chain passes to the next block anyway, plus the small integer r = X - fl(X): |X| stays below
# 2**35 within a step (the grid keeps it under 2**32 between steps), where the float32 ulp is at
# most 2**11, so |r| <= 2**10; r is 0 for float64 chains. r is stored as int16. The working
# state then costs r, V and the stack head per element, and xw doubles as the block's input.
def _r_int(r: torch.Tensor) -> torch.Tensor:
    return r.to(torch.int64)


def _join(xw: torch.Tensor, r: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The exact ``X`` from its float part and residual (``xw * 2**s`` is an exact integer)."""
    return (xw.to(scale.dtype) * scale).to(torch.int64) + _r_int(r)


def _split(X: torch.Tensor, inv_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xw, r)`` of an exact ``X``: the conversion to float rounds once, the same way always."""
    Xf = X.to(inv_scale.dtype)
    return Xf * inv_scale, (X - Xf.to(torch.int64)).to(R_DTYPE)


def _on_grid(x: torch.Tensor, scale: torch.Tensor, inv_scale: torch.Tensor):
    """``(xw, r)`` of ``X = round(x * 2**s)``, a chain's input put on its grid, in one pass,
    and their :func:`_checksum`."""
    xw, r = _split((x.to(scale.dtype) * scale).round().to(torch.int64), inv_scale)
    return xw, r, _checksum(xw, r)


def _split_wide(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int64 of at most 48 bits as its high 32 bits (int32) and its low 16 (int16)."""
    return (a >> 16).to(torch.int32), (a & 0xFFFF).to(torch.int32).to(torch.int16)


def _join_wide(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Reverse :func:`_split_wide`."""
    return (high.to(torch.int64) << 16) | (low.to(torch.int64) & 0xFFFF)


def _f(out: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    # f = out for a residual block, out - x for one whose output is the next state.
    return out if x is None else out - x


def _quantized_f(out: torch.Tensor, x: torch.Tensor | None, c: torch.Tensor) -> torch.Tensor:
    """(1 - gamma) * f on V's grid: forward and backward must round it to the same integers.

    Clamped (NaN to 0) to a bound no valid step reaches (the grid keeps ``|G| < 2**48``, or
    ``2**60`` for float64 chains), so that a step taken before the grid is known to suit
    ``f`` is exactly reversible even where it does not (see ``ChainRun.forward_block``).
    """
    limit = _G_LIMIT[c.dtype]
    G = torch.round(_f(out, x).to(c.dtype) * c).clamp_(-limit, limit).nan_to_num_(0.0)
    return G.to(torch.int64)


def _abs_max_f(out: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    """``max |f|`` without materialising ``f`` (NaN if any element is NaN)."""
    lo, hi = torch.aminmax(_f(out, x))
    return torch.maximum(-lo, hi)


# The steps update the state in place (compiled, the fused loop stores straight into it):
# the state is as large as the chain's activation and a copy would count in peak memory.
def _forward_step_(
    xw: torch.Tensor,
    r: torch.Tensor,
    V: torch.Tensor,
    head: torch.Tensor,
    out: torch.Tensor,
    x: torch.Tensor | None,
    c: torch.Tensor,
    n: int,
    scale: torch.Tensor,
    inv_scale: torch.Tensor,
    fresh: bool = False,
):
    """One step, ``r``, ``V`` and ``head`` in place.

    Returns the next ``xw``, the sum of the new ``V`` (see :func:`_unadd_`), ``max |xw|`` and
    ``max |V|`` after the step, from which the next step's grid is chosen, and ``max |f|``
    (NaN if any is NaN), which tells whether this step's grid suited ``f``. ``fresh``: ``V``
    and ``head`` hold no values yet and are taken as zero (a chain's first step; the native
    kernel then does not read them, which saves zeroing them).
    """
    if fresh:
        V.zero_()
        head.zero_()
    G = _quantized_f(out, x, c)
    # v <- gamma * v: the low GAMMA_BITS of V go onto the stack, a digit in [0, n) comes off.
    q, rem = floor_divmod((head.to(torch.int64) << GAMMA_BITS) | (V & _LOW), n)
    V_new = (V >> GAMMA_BITS) * n + rem + G
    X_new = _join(xw, r, scale) + ((V_new + _HALF) >> GAMMA_BITS)
    head.copy_(q)
    V.copy_(V_new)
    xw_new, r_new = _split(X_new, inv_scale)
    r.copy_(r_new)
    return xw_new, V_new.sum(), xw_new.abs().amax(), V_new.abs().amax(), _abs_max_f(out, x)


def _unadd_(
    xw: torch.Tensor, r: torch.Tensor, V: torch.Tensor, scale: torch.Tensor, inv_scale: torch.Tensor
):
    """``x <- x - v`` on the same grid, ``r`` in place; returns the new ``xw`` and the sum of
    ``V``, which backward compares with the forward's."""
    X = _join(xw, r, scale) - ((V + _HALF) >> GAMMA_BITS)
    xw_new, r_new = _split(X, inv_scale)
    r.copy_(r_new)
    return xw_new, V.sum()


def _coarsen_(
    xw: torch.Tensor,
    r: torch.Tensor,
    V: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    inv_scale: torch.Tensor,
):
    """Move ``X`` and ``V`` to a grid ``shift`` (> 0) bits coarser, rounding, in one pass.

    ``r`` and ``V`` in place; returns the new ``xw`` and the digits dropped from ``X`` and
    from ``V`` (in ``[0, 2**shift)``, int32; ``shift < 32``). ``scale`` is the old grid's,
    ``inv_scale`` the new one's. Without it a grid change made several int64 temporaries as
    large as the chain's activation, the peak of a deep chain's step.
    """
    one = torch.ones_like(shift)
    half, mask = one << (shift - 1), (one << shift) - 1
    X = _join(xw, r, scale) + half
    low_x = (X & mask).to(torch.int32)
    Vh = V + half
    low_v = (Vh & mask).to(torch.int32)
    V.copy_(Vh >> shift)
    xw_new, r_new = _split(X >> shift, inv_scale)
    r.copy_(r_new)
    return xw_new, low_x, low_v


def _unadd_unshift_(
    xw: torch.Tensor,
    r: torch.Tensor,
    V: torch.Tensor,
    low_x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    inv_scale: torch.Tensor,
):
    """``x <- x - v`` on the coarse grid, then ``X`` back to the grid ``shift`` bits finer
    with its dropped digits ``low_x``: backward's half of :func:`_coarsen_` (``V`` stays).
    Returns the new ``xw`` and the sum of ``V``, as :func:`_unadd_`."""
    one = torch.ones_like(shift)
    X = _join(xw, r, scale) - ((V + _HALF) >> GAMMA_BITS)
    X = (X << shift) + low_x.to(torch.int64) - (one << (shift - 1))
    xw_new, r_new = _split(X, inv_scale)
    r.copy_(r_new)
    return xw_new, V.sum()


def _unshift_v_(V: torch.Tensor, low_v: torch.Tensor, shift: torch.Tensor) -> None:
    """``V`` back to the grid ``shift`` bits finer with its dropped digits, in place."""
    one = torch.ones_like(shift)
    V.copy_((V << shift) + low_v.to(torch.int64) - (one << (shift - 1)))


def _checksum(xw: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """An integer hash of the exact state ``(xw, r)``: the same bits give the same sum."""
    bits = xw.view(torch.int64 if xw.dtype == torch.float64 else torch.int32)
    # Summed with the cast on the fly: a converted copy of a sampled r would be a heap-sized
    # temporary per block, and those fragment the heap that a deep chain's step grows.
    return bits.sum(dtype=torch.int64) + r.sum(dtype=torch.int64)


def _backward_step_(
    V: torch.Tensor,
    head: torch.Tensor,
    out: torch.Tensor,
    x: torch.Tensor | None,
    c: torch.Tensor,
    n: int,
    grad_x: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    grad_f: torch.Tensor | None,
    grad_f_next: torch.Tensor | None,
    g: float,
    gamma: float,
    xw: torch.Tensor | None,
    r: torch.Tensor | None,
    scale: torch.Tensor,
    inv_scale: torch.Tensor,
):
    """Reverse a step, after the block's backward: ``V`` and ``head`` in place, back to before
    the step.

    Besides, in the same pass, unless ``grad_x`` is None: the input's gradient, in place
    (:func:`_input_grad_`; ``grad_f`` is subtracted where ``f = out - x``), and, given
    ``grad_f_next``, the previous block's ``grad_f`` for an incoming gradient ``grad_x``
    (:func:`_next_grad_f_`, into ``grad_f_next``); and, given ``xw`` (the block's input), the
    previous block's input (:func:`_unadd_` with the rebuilt ``V``; ``r`` in place), else
    None; and the sum of the rebuilt ``V``.

    One pass does what the end of one block's backward and the start of the next need: ``V``
    is read once, and the sum that checks the previous block comes with it.
    """
    G = _quantized_f(out, x, c)
    V_hi, V_lo = floor_divmod(V - G, n)
    T = head.to(torch.int64) * n + V_lo
    V.copy_((V_hi << GAMMA_BITS) | (T & _LOW))
    head.copy_(T >> GAMMA_BITS)
    if grad_x is not None:
        _input_grad_(grad_x, grad_out, None if x is None else grad_f)
        if grad_f_next is not None:
            grad_f_next.copy_(grad_f)
            _next_grad_f_(grad_x, grad_f_next, g, gamma)
    if xw is None:
        return None, V.sum()
    return _unadd_(xw, r, V, scale, inv_scale)


def _next_grad_f_(grad_out: torch.Tensor, grad_f: torch.Tensor, g: float, gamma: float) -> None:
    """The gradient of block ``t``'s ``f`` from block ``t + 1``'s, in place.

    Backward of ``v_{t+1} = gamma v_t + g f_t``: with ``c_t`` the gradient reaching ``v_{t+1}``
    (the incoming ``grad_out`` plus ``gamma c_{t+1}``), ``f_t`` gets ``g c_t``, so
    ``g c_t = g grad_out + gamma (g c_{t+1})``. One buffer serves as the velocity's gradient and
    as the ``grad_outputs`` of the block's backward.
    """
    grad_f.copy_(grad_out.to(grad_f.dtype) * g + grad_f * gamma)


def _input_grad_(grad_x: torch.Tensor, grad_out: torch.Tensor, grad_f: torch.Tensor | None) -> None:
    """``grad_x += grad_out`` (``- grad_f`` for a block whose ``f`` is ``out - x``), in place."""
    total = grad_x + grad_out.to(grad_x.dtype)
    grad_x.copy_(total if grad_f is None else total - grad_f)


#: Called with no arguments just before the first kernel of this process compiles.
on_first_compile: Callable[[], None] | None = None
_announced = False
_log = logging.getLogger(__name__)


def _announce_compile() -> None:
    global _announced
    if _announced:
        return
    _announced = True
    _log.info("compiling the reversible engine's kernels (torch.compile, once per process)")
    if on_first_compile is not None:
        on_first_compile()


class _NoCudaRuntimeRecord(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


@contextlib.contextmanager
def _compiling() -> Iterator[None]:
    """Drop torch's "No CUDA runtime is found" (its C++ extension module, imported by the
    compiler, logs it on a machine with a CUDA toolkit and no GPU) while a kernel compiles."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _NoCudaRuntimeRecord()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _eager_numerics() -> dict[str, bool]:
    """Inductor options under which its GPU kernels round as eager PyTorch does.

    Triton contracts ``a * b + c`` into one fused multiply-add and flushes subnormals by
    default, which changes the last bit of the gradients (``_next_grad_f_``); the integer
    state is exact either way. Only the options this torch knows are set.
    """
    from torch._inductor import config

    wanted = {
        "emulate_precision_casts": True,  # also turns off the multiply-add contraction
        "eager_numerics.disable_ftz": True,
        "eager_numerics.division_rounding": True,
    }
    known = config.get_config_copy()
    return {k: v for k, v in wanted.items() if k in known}


class _Kernel:
    """An eager function, its native twin (CPU) and, when worthwhile, its torch.compile'd twin
    (CUDA)."""

    #: Set once compiling has failed: the eager kernels serve from then on.
    _failed = False

    def __init__(self, fn: Callable, native_fn: Callable | None = None) -> None:
        self.fn = fn
        self.native = native_fn
        self._compiled: Callable | None = None
        self._warm = False
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__.lstrip("_")

    def _use_compiled(self, t: torch.Tensor) -> bool:
        return (
            not _Kernel._failed
            and t.device.type == "cuda"
            and t.numel() >= COMPILE_MIN_NUMEL
            and not torch.compiler.is_compiling()
        )

    def __call__(self, *args):
        if os.environ.get("FXMOMENTUM_COMPILE", "1") == "0":
            return self.fn(*args)
        t = args[0]
        if t.device.type == "cpu" and self.native is not None and native.library() is not None:
            result = self.native(*args)
            if result is not NotImplemented:
                return result
        if self._use_compiled(t):
            if self._compiled is None:
                _announce_compile()
                self._compiled = torch.compile(self.fn, fullgraph=True, options=_eager_numerics())
                self._warm = False
            try:
                if self._warm:
                    return self._compiled(*args)
                with _compiling():  # the first call compiles
                    out = self._compiled(*args)
                self._warm = True
                return out
            except Exception as err:  # any compiler failure falls back
                _Kernel._failed = True
                warnings.warn(
                    f"fxmomentum: torch.compile of the reversible kernels failed ({err!r}); "
                    f"using eager kernels, which are slower but give the same bits. Set "
                    f"FXMOMENTUM_COMPILE=0 to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.fn(*args)


# Rare paths (a chain's start and end, grid changes): eager.
join = _join
split = _split

abs_max_f = _Kernel(_abs_max_f, native.abs_max_f)
on_grid = _Kernel(_on_grid, native.on_grid)
split_wide = _Kernel(_split_wide, native.split_wide)
join_wide = _Kernel(_join_wide, native.join_wide)
checksum = _Kernel(_checksum, native.checksum)
forward_step_ = _Kernel(_forward_step_, native.forward_step_)
unadd_ = _Kernel(_unadd_, native.unadd_)
coarsen_ = _Kernel(_coarsen_, native.coarsen_)
unadd_unshift_ = _Kernel(_unadd_unshift_, native.unadd_unshift_)
unshift_v_ = _Kernel(_unshift_v_, native.unshift_v_)
backward_step_ = _Kernel(_backward_step_, native.backward_step_)
next_grad_f_ = _Kernel(_next_grad_f_, native.next_grad_f_)
input_grad_ = _Kernel(_input_grad_, native.input_grad_)
