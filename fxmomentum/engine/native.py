"""Native CPU kernels: the fused passes of :mod:`fxmomentum.engine.kernels`, built from C.

``torch.compile`` fused these integer passes on CPU, but its loops ran about five times slower
than memory allows (its vectoriser converts int64 to floating point through scalar code), a
fresh process spent about a minute compiling them (one graph per kernel, per shape pattern),
and every call paid 20-50 us of guards. The C source (:mod:`.native_source`) does the same
arithmetic in vectorised double precision, compiles with the system's C compiler in about a
second, and is called through ctypes. The built library is cached on disk, next to Inductor's
cache (``$TORCHINDUCTOR_CACHE_DIR/fxmomentum``, or ``$FXMOMENTUM_CACHE_DIR``), under a key of
the source, the compiler and the flags, so a later process loads it at once.

Each wrapper here takes the arguments of the eager kernel of the same name and returns the same
values (reductions as Python numbers rather than 0-dim tensors), or :data:`NotImplemented`
where it does not apply (another dtype or device, tensors laid out differently), and the caller
runs the eager kernel. :func:`library` returns None, with one warning, if no compiler works.
"""

from __future__ import annotations

import ctypes
import getpass
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .native_source import SOURCE

__all__ = [
    "abs_max_f",
    "backward_step_",
    "cache_dir",
    "checksum",
    "coarsen_",
    "forward_step_",
    "input_grad_",
    "join_wide",
    "library",
    "momentum_update",
    "momentum_update_grad",
    "next_grad_f_",
    "on_grid",
    "split_wide",
    "unadd_",
    "unadd_unshift_",
    "unshift_v_",
]

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_F32 = ctypes.c_float
_INT = ctypes.c_int
#: ctypes argument types of the exported functions (ending with the thread count).
_SIGNATURES: dict[str, list] = {
    "fxm_abs_max_f": [_I64, _P, _P, _P, _INT],
    "fxm_on_grid": [_I64, _P, _F32, _F32, _P, _P, _P, _INT],
    "fxm_forward_step": [
        *[_I64, _P, _P, _P, _P, _P, _P, _F32, _I64, _F32, _F32, _P, _P, _P, _INT, _INT]
    ],
    "fxm_unadd": [_I64, _P, _P, _P, _F32, _F32, _P, _P, _INT],
    "fxm_coarsen": [_I64, _P, _P, _P, _I64, _F32, _F32, _P, _P, _P, _INT],
    "fxm_unadd_unshift": [_I64, _P, _P, _P, _P, _I64, _F32, _F32, _P, _P, _INT],
    "fxm_unshift_v": [_I64, _P, _P, _I64, _INT],
    "fxm_next_grad_f": [_I64, _P, _P, _F32, _F32, _INT],
    "fxm_input_grad": [_I64, _P, _P, _P, _INT],
    "fxm_backward_step": [
        *[_I64, _P, _P, _P, _P, _F32, _I64, _P, _P, _P, _P, _F32, _F32],
        *[_P, _P, _F32, _F32, _P, _P, _INT],
    ],
    "fxm_split_wide": [_I64, _P, _P, _P, _INT],
    "fxm_join_wide": [_I64, _P, _P, _P, _INT],
    "fxm_checksum": [_I64, _P, _P, _P, _INT],
    "fxm_momentum_update": [_I64, _P, _P, _P, _P, _P, _F32, _F32, _INT, _INT],
    "fxm_momentum_update_grad": [_I64, _P, _P, _P, _P, _P, _F32, _F32, _INT],
}

_F = torch.float32
_R = torch.int16  # kernels.R_DTYPE
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


# -- building ----------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where built libraries are kept: ``$FXMOMENTUM_CACHE_DIR``, else ``fxmomentum`` in
    Inductor's cache directory (``$TORCHINDUCTOR_CACHE_DIR``, by default
    ``<temp>/torchinductor_<user>``)."""
    own = os.environ.get("FXMOMENTUM_CACHE_DIR")
    if own:
        return Path(own)
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not inductor:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
        inductor = os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r"\W", "_", user))
    return Path(inductor) / "fxmomentum"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _isa_flags() -> list[str]:
    """Vector extensions of this CPU, as torch detected them (the key keeps a library built
    for one set from loading on a CPU without it)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"]
    if capability.startswith("AVX2"):
        return ["-mavx2", "-mfma"]
    return []


_FLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]


def _build(compiler: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "fxmomentum_kernels.c"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        subprocess.run(
            [compiler, *flags, str(src), "-o", str(out)],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        os.replace(out, target)  # atomic: a concurrent process loads either file whole


def _load() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=60
    ).stdout.splitlines()[:1]
    base = [*_FLAGS, *_isa_flags()]
    errors = []
    # OpenMP where the compiler has it (Apple's clang does not): the kernels then use torch's
    # thread count; the runtime is the one torch loaded (the same soname).
    for flags in ([*base, "-fopenmp"], base):
        key = hashlib.sha256(
            "\0".join([SOURCE, compiler, *version, *flags, platform.machine()]).encode()
        ).hexdigest()[:24]
        path = cache_dir() / f"kernels-{key}.so"
        try:
            if not path.exists():
                _build(compiler, flags, path)
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as err:
            stderr = getattr(err, "stderr", "") or ""
            errors.append(f"{err}{': ' + stderr.strip()[-300:] if stderr else ''}")
            continue
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, None
        return lib
    raise RuntimeError("; ".join(errors))


def library() -> ctypes.CDLL | None:
    """The native kernels, built or loaded on first use; None (warned once) if that fails."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _load()
            except Exception as err:  # no compiler, a failed build: the eager kernels serve
                warnings.warn(
                    f"fxmomentum: could not build the native reversible kernels ({err}); using "
                    f"the eager kernels, which are slower but give the same bits. Set "
                    f"FXMOMENTUM_COMPILE=0 to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _tried = True
    return _lib


# -- wrappers ----------------------------------------------------------------------------------
def _threads() -> int:
    return torch.get_num_threads()


def _alike(ref: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether ``ref`` and ``others`` (None aside), all on the CPU and shaped alike, lie in
    memory element for element alike and densely (contiguous, or channels-last with equal
    strides)."""
    if ref.device.type != "cpu":
        return False
    if ref.is_contiguous():
        return all(o is None or (o.device.type == "cpu" and o.is_contiguous()) for o in others)
    if not ref.is_contiguous(memory_format=torch.channels_last):
        return False
    stride = ref.stride()
    return all(o is None or (o.device.type == "cpu" and o.stride() == stride) for o in others)


def _laid_out_like(ref: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
    """A read-only operand as :func:`_alike` wants it next to ``ref``: ``t`` itself, or a copy
    in ``ref``'s layout where ``t`` is laid out otherwise (same shape, on the CPU).

    Autograd hands over expanded and transposed tensors: the gradient of ``output.sum()``
    reaches the last block as one value broadcast (stride 0). Declined, the step would run the
    eager kernel, whose int64 temporaries set the peak memory of a training step; the copy
    costs one activation and the same bits.
    """
    if (
        t is None
        or t.shape != ref.shape
        or t.device.type != "cpu"
        or ref.device.type != "cpu"
        or _alike(ref, t)
        or not _alike(ref)
    ):
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f32(out: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor | None:
    """``out`` as float32 where ``out - x`` is computed in float32, else None.

    A float16 / bfloat16 output minus a float32 input (autocast) is promoted to float32, so
    converting the output first gives the same bits; a half-precision chain subtracts in half
    precision, which the C kernels do not do.
    """
    if out.dtype == _F:
        return out if x is None or x.dtype == _F else None
    if out.dtype in (torch.float16, torch.bfloat16) and (x is None or x.dtype == _F):
        return out.to(_F)
    return None


def abs_max_f(out: torch.Tensor, x: torch.Tensor | None) -> float:
    """Native :func:`fxmomentum.engine.kernels._abs_max_f`."""
    out32 = _f32(out, x)
    if out32 is None or not _alike(out32, x):
        return NotImplemented
    res = (ctypes.c_double * 1)()
    _lib.fxm_abs_max_f(out.numel(), out32.data_ptr(), _ptr(x), res, _threads())
    return res[0]


def on_grid(x: torch.Tensor, scale: torch.Tensor, inv_scale: torch.Tensor):
    """Native :func:`fxmomentum.engine.kernels._on_grid`."""
    if x.dtype != _F or scale.dtype != _F or not _alike(x):
        return NotImplemented
    xw, r = torch.empty_like(x), torch.empty_like(x, dtype=_R)
    ires = (ctypes.c_int64 * 1)()
    _lib.fxm_on_grid(
        x.numel(), x.data_ptr(), float(scale), float(inv_scale), xw.data_ptr(), r.data_ptr(),
        ires, _threads(),
    )  # fmt: skip
    return xw, r, ires[0]


def _state_ok(xw: torch.Tensor, r: torch.Tensor, V: torch.Tensor, *more: torch.Tensor) -> bool:
    return xw.dtype == _F and r.dtype == _R and V.dtype == torch.int64 and _alike(xw, r, V, *more)


def forward_step_(xw, r, V, head, out, x, c, n, scale, inv_scale, fresh=False):
    """Native :func:`fxmomentum.engine.kernels._forward_step_` (``fresh``: ``V`` and ``head``
    are not read, only written)."""
    out32, x = _laid_out_like(xw, _f32(out, x)), _laid_out_like(xw, x)
    if out32 is None or head.dtype != torch.int32 or not _state_ok(xw, r, V, head, out32, x):
        return NotImplemented
    xw_new = torch.empty_like(xw)
    ires, dres = (ctypes.c_int64 * 1)(), (ctypes.c_double * 3)()
    _lib.fxm_forward_step(
        xw.numel(), xw.data_ptr(), r.data_ptr(), V.data_ptr(), head.data_ptr(),
        out32.data_ptr(), _ptr(x), float(c), n, float(scale), float(inv_scale),
        xw_new.data_ptr(), ires, dres, int(fresh), _threads(),
    )  # fmt: skip
    return xw_new, ires[0], dres[0], dres[1], dres[2]


def unadd_(xw, r, V, scale, inv_scale):
    """Native :func:`fxmomentum.engine.kernels._unadd_`."""
    if not _state_ok(xw, r, V):
        return NotImplemented
    xw_new = torch.empty_like(xw)
    ires = (ctypes.c_int64 * 1)()
    _lib.fxm_unadd(
        xw.numel(), xw.data_ptr(), r.data_ptr(), V.data_ptr(), float(scale), float(inv_scale),
        xw_new.data_ptr(), ires, _threads(),
    )  # fmt: skip
    return xw_new, ires[0]


def coarsen_(xw, r, V, shift, scale, inv_scale):
    """Native :func:`fxmomentum.engine.kernels._coarsen_`."""
    if not _state_ok(xw, r, V):
        return NotImplemented
    xw_new = torch.empty_like(xw)
    low_x, low_v = torch.empty_like(xw, dtype=torch.int32), torch.empty_like(xw, dtype=torch.int32)
    _lib.fxm_coarsen(
        xw.numel(), xw.data_ptr(), r.data_ptr(), V.data_ptr(), int(shift), float(scale),
        float(inv_scale), xw_new.data_ptr(), low_x.data_ptr(), low_v.data_ptr(), _threads(),
    )  # fmt: skip
    return xw_new, low_x, low_v


def unadd_unshift_(xw, r, V, low_x, shift, scale, inv_scale):
    """Native :func:`fxmomentum.engine.kernels._unadd_unshift_`."""
    if low_x.dtype != torch.int32 or not _state_ok(xw, r, V, low_x):
        return NotImplemented
    xw_new = torch.empty_like(xw)
    ires = (ctypes.c_int64 * 1)()
    _lib.fxm_unadd_unshift(
        xw.numel(), xw.data_ptr(), r.data_ptr(), V.data_ptr(), low_x.data_ptr(), int(shift),
        float(scale), float(inv_scale), xw_new.data_ptr(), ires, _threads(),
    )  # fmt: skip
    return xw_new, ires[0]


def unshift_v_(V, low_v, shift):
    """Native :func:`fxmomentum.engine.kernels._unshift_v_`."""
    if V.dtype != torch.int64 or low_v.dtype != torch.int32 or not _alike(V, low_v):
        return NotImplemented
    _lib.fxm_unshift_v(V.numel(), V.data_ptr(), low_v.data_ptr(), int(shift), _threads())
    return None


def next_grad_f_(grad_out, grad_f, g, gamma):
    """Native :func:`fxmomentum.engine.kernels._next_grad_f_`."""
    grad_out = _laid_out_like(grad_f, grad_out)
    if grad_out.dtype != _F or grad_f.dtype != _F or not _alike(grad_f, grad_out):
        return NotImplemented
    _lib.fxm_next_grad_f(
        grad_f.numel(), grad_out.data_ptr(), grad_f.data_ptr(), g, gamma, _threads()
    )
    return None


def input_grad_(grad_x, grad_out, grad_f):
    """Native :func:`fxmomentum.engine.kernels._input_grad_`."""
    grad_out, grad_f = _laid_out_like(grad_x, grad_out), _laid_out_like(grad_x, grad_f)
    if (
        grad_x.dtype != _F
        or grad_out.dtype != _F
        or (grad_f is not None and grad_f.dtype != _F)
        or not _alike(grad_x, grad_out, grad_f)
    ):
        return NotImplemented
    _lib.fxm_input_grad(
        grad_x.numel(), grad_x.data_ptr(), grad_out.data_ptr(), _ptr(grad_f), _threads()
    )
    return None


def backward_step_(
    V, head, out, x, c, n, grad_x, grad_out, grad_f, grad_f_next, g, gamma, xw, r, scale, inv_scale
):
    """Native :func:`fxmomentum.engine.kernels._backward_step_`."""
    out32, x = _laid_out_like(V, _f32(out, x)), _laid_out_like(V, x)
    grad_out = _laid_out_like(V, grad_out)
    if (
        out32 is None
        or V.dtype != torch.int64
        or head.dtype != torch.int32
        or not _alike(V, head, out32, x, xw, r)
    ):
        return NotImplemented
    if grad_x is not None and (
        any(t.dtype != _F for t in (grad_x, grad_out, grad_f))
        or (grad_f_next is not None and grad_f_next.dtype != _F)
        or not _alike(V, grad_x, grad_out, grad_f, grad_f_next)
    ):
        return NotImplemented
    if xw is not None and (xw.dtype != _F or r.dtype != _R):
        return NotImplemented
    xw_prev = None if xw is None else torch.empty_like(xw)
    grads = grad_x is not None
    ires = (ctypes.c_int64 * 1)()
    _lib.fxm_backward_step(
        V.numel(), V.data_ptr(), head.data_ptr(), out32.data_ptr(), _ptr(x), float(c), n,
        _ptr(grad_x), _ptr(grad_out if grads else None), _ptr(grad_f if grads else None),
        _ptr(grad_f_next if grads else None), g, gamma, _ptr(xw), _ptr(r), float(scale),
        float(inv_scale), _ptr(xw_prev), ires, _threads(),
    )  # fmt: skip
    return xw_prev, ires[0]


def split_wide(a):
    """Native :func:`fxmomentum.engine.kernels._split_wide`."""
    if a.dtype != torch.int64 or not _alike(a):
        return NotImplemented
    high, low = torch.empty_like(a, dtype=torch.int32), torch.empty_like(a, dtype=torch.int16)
    _lib.fxm_split_wide(a.numel(), a.data_ptr(), high.data_ptr(), low.data_ptr(), _threads())
    return high, low


def join_wide(high, low):
    """Native :func:`fxmomentum.engine.kernels._join_wide`."""
    if high.dtype != torch.int32 or low.dtype != torch.int16 or not _alike(high, low):
        return NotImplemented
    a = torch.empty_like(high, dtype=torch.int64)
    _lib.fxm_join_wide(high.numel(), high.data_ptr(), low.data_ptr(), a.data_ptr(), _threads())
    return a


def checksum(xw, r):
    """Native :func:`fxmomentum.engine.kernels._checksum`."""
    if xw.dtype != _F or r.dtype != _R or not _alike(xw, r):
        return NotImplemented
    ires = (ctypes.c_int64 * 1)()
    _lib.fxm_checksum(xw.numel(), xw.data_ptr(), r.data_ptr(), ires, _threads())
    return ires[0]


def momentum_update(x, y, v, gamma, subtract):
    """Native :func:`fxmomentum.engine.update._momentum_update`."""
    if x.dtype != _F or y.dtype != _F or (v is not None and v.dtype != _F):
        return NotImplemented
    if not _alike(x, y, v):
        return NotImplemented
    x_new, v_new = torch.empty_like(x), torch.empty_like(x)
    _lib.fxm_momentum_update(
        x.numel(), x.data_ptr(), y.data_ptr(), _ptr(v), x_new.data_ptr(), v_new.data_ptr(),
        gamma, 1 - gamma, int(subtract), _threads(),
    )  # fmt: skip
    return x_new, v_new


def momentum_update_grad(ref, grad_x_new, grad_v_new, gamma, has_v, subtract):
    """Native :func:`fxmomentum.engine.update._momentum_update_grad`."""
    grad_v_new = _laid_out_like(ref, grad_v_new)
    grad_x_new = _laid_out_like(ref, grad_x_new)
    if any(g is not None and g.dtype != _F for g in (grad_x_new, grad_v_new)):
        return NotImplemented
    if not _alike(ref, grad_x_new, grad_v_new):
        return NotImplemented
    grad_y = torch.empty_like(ref)
    grad_v = torch.empty_like(ref) if has_v else None
    grad_x = torch.empty_like(ref) if subtract else grad_x_new
    _lib.fxm_momentum_update_grad(
        ref.numel(), _ptr(grad_x_new), _ptr(grad_v_new), grad_y.data_ptr(), _ptr(grad_v),
        _ptr(grad_x) if subtract else None, gamma, 1 - gamma, _threads(),
    )  # fmt: skip
    return grad_x, grad_y, grad_v
