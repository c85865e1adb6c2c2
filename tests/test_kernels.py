"""The fused kernels give the eager kernels' bits: native on CPU, torch.compile'd on CUDA.

The eager functions of :mod:`fxmomentum.engine.kernels` are the reference. A forward may run
one version and its backward another (the native library may be built after a forward began,
or a chain may move between devices), so every version must give exactly the same integers
and floats.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import fxmomentum
from fxmomentum.engine import kernels, native


def _cases(n_el: int, device: str) -> list[tuple[kernels._Kernel, Callable[[], tuple]]]:
    """Each kernel with a factory of its arguments (fresh copies of what it changes in place):
    states as large as a valid run's, ties of the rounding, and NaN and infinity for the
    maximum."""
    g = torch.Generator().manual_seed(n_el)

    def rand(*shape: int, lo: int, hi: int, dtype=torch.int64) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=g).to(dtype).to(device)

    X = rand(n_el, lo=-(2**32), hi=2**32)
    V = rand(n_el, lo=-(2**48), hi=2**48)
    head = rand(n_el, lo=0, hi=2**15, dtype=torch.int32)
    f = torch.randn(n_el, generator=g).to(device) * 100
    f[::7] = (f[::7] * 2**10).round() / 2**10 + 2.0**-11  # ties of (1 - gamma) f on the grid
    x = torch.randn(n_el, generator=g).to(device) * 100
    go = torch.randn(n_el, generator=g).to(device)
    gf = torch.randn(n_el, generator=g).to(device)
    c = torch.tensor(2.0**10, device=device)
    scale = torch.tensor(2.0**30, device=device)
    inv = torch.tensor(2.0**-30, device=device)
    xw, r = kernels.split(X, inv)
    V48 = V >> 2  # 47 bits and a sign
    shift = torch.tensor(3, device=device)
    nan_f = torch.where(f > 30, math.nan, f)
    inf_f = torch.where(f > 30, math.inf, f)
    shift31 = torch.tensor(31, device=device)
    zeros_x = x.clone()  # -0 and small negatives round to -0 in floating point, to 0 in int64
    zeros_x[::3], zeros_x[1::3] = -0.0, -1e-12
    huge_f = f * 1e12
    huge_f[1::5] = math.nan
    huge_f[2::5] = -math.inf

    def unstep_huge() -> tuple:
        return (V.clone(), head.clone(), huge_f, x, c, 58982, *[None] * 4, 0.1, 0.9)

    def step(out: torch.Tensor, x_f: torch.Tensor | None, n: int) -> Callable[[], tuple]:
        return lambda: (xw, r.clone(), V.clone(), head.clone(), out, x_f, c, n, scale, inv)

    def fresh_step(out: torch.Tensor, x_f: torch.Tensor | None) -> Callable[[], tuple]:
        # V and head hold other values: a fresh step must neither read them nor keep them.
        return lambda: (
            xw,
            r.clone(),
            V.clone(),
            head.clone(),
            out,
            x_f,
            c,
            58982,
            scale,
            inv,
            True,
        )

    def unstep(x_f, n, grads: bool, ahead: bool, rebuild: bool) -> Callable[[], tuple]:
        def make() -> tuple:
            gx = x.clone() if grads else None
            gf_next = torch.empty_like(x) if ahead else None
            state = (xw, r.clone()) if rebuild else (None, None)
            return (V.clone(), head.clone(), f, x_f, c, n, gx, go, gf, gf_next, 0.1, 0.9, *state)

        return lambda: (*make(), scale, inv)

    return [
        (kernels.forward_step_, step(f, x, 58982)),
        (kernels.forward_step_, step(f, None, 3)),
        (kernels.forward_step_, step(f.bfloat16(), x, 32768)),  # autocast's output
        (kernels.backward_step_, unstep(x, 58982, grads=True, ahead=True, rebuild=True)),
        (kernels.backward_step_, unstep(x, 58982, grads=True, ahead=False, rebuild=False)),
        (kernels.backward_step_, unstep(None, 32768, grads=True, ahead=True, rebuild=False)),
        (kernels.backward_step_, unstep(None, 40000, grads=False, ahead=False, rebuild=True)),
        # f beyond any grid, NaN and infinite: clamped alike, and exactly reversible.
        (kernels.forward_step_, step(huge_f, x, 58982)),
        (kernels.backward_step_, lambda: (*unstep_huge(), None, None, scale, inv)),
        (kernels.on_grid, lambda: (x, scale, inv)),
        (kernels.on_grid, lambda: (zeros_x, scale, inv)),
        (kernels.coarsen_, lambda: (xw, r.clone(), V48.clone(), shift, scale, inv * 8)),
        (kernels.coarsen_, lambda: (xw, r.clone(), V48.clone(), shift31, scale, inv * 2**31)),
        (kernels.unadd_unshift_, lambda: (xw, r.clone(), V48, head, shift, scale, inv / 8)),
        (kernels.unadd_, lambda: (xw, r.clone(), V, scale, inv)),
        (kernels.unshift_v_, lambda: (V48.clone() >> 4, head, shift)),
        (kernels.unshift_v_, lambda: (V.clone() << 8, head, shift)),  # 60 bits (float64 chains)
        (kernels.split_wide, lambda: (V48,)),
        (kernels.join_wide, lambda: kernels.split_wide.fn(V48)),
        (kernels.next_grad_f_, lambda: (go, x.clone(), 0.1, 0.9)),
        (kernels.input_grad_, lambda: (x.clone(), f, f * 0.5)),
        (kernels.input_grad_, lambda: (x.clone(), f, None)),
        (kernels.checksum, lambda: (xw, r)),
        (kernels.abs_max_f, lambda: (f, x)),
        (kernels.abs_max_f, lambda: (f, None)),
        (kernels.abs_max_f, lambda: (nan_f, None)),
        (kernels.abs_max_f, lambda: (inf_f, x)),
        (kernels.forward_step_, fresh_step(f, x)),
        (kernels.forward_step_, fresh_step(f, None)),
    ]


def _flat(value: object) -> list:
    return list(value) if isinstance(value, tuple) else [value]


def _same(a: object, b: object) -> bool:
    """Bit for bit, a 0-dim tensor and a Python number alike (NaN equals NaN)."""
    if isinstance(a, torch.Tensor) and a.dim() == 0:
        a = a.item()
    if isinstance(b, torch.Tensor) and b.dim() == 0:
        b = b.item()
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return False
        same = a == b
        if a.is_floating_point():
            same &= torch.signbit(a) == torch.signbit(b)  # -0 is not +0
            same |= a.isnan() & b.isnan()
        return bool(same.all())
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def _check(kernel: kernels._Kernel, make_args: Callable[[], tuple], fused: Callable) -> None:
    fused_args, eager_args = make_args(), make_args()
    got, want = fused(*fused_args), kernel.fn(*eager_args)
    assert got is not NotImplemented, kernel.__name__
    # The results, then every argument (those changed in place included).
    for a, b in zip(_flat(got) + list(fused_args), _flat(want) + list(eager_args), strict=True):
        assert _same(a, b), kernel.__name__


@pytest.mark.parametrize("n_el", [1000, 70001, 1 << 18])
def test_native_kernels_give_the_eager_bits(n_el):
    # 70001 and 2**18 run on several threads (ranges of 64 elements and a tail).
    if native.library() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    for kernel, make_args in _cases(n_el, "cpu"):
        _check(kernel, make_args, kernel.native)


@pytest.mark.parametrize("isa", [["-mavx2", "-mfma"], []])
def test_native_kernels_built_without_avx512_give_the_eager_bits(isa, monkeypatch, tmp_path):
    # With AVX-512DQ the steps work in int64 lanes; without it (AVX2 machines, other CPUs) in
    # doubles. This machine builds one of the two; both must give the eager bits.
    if native._compiler() is None or native._isa_flags()[:1] != ["-mavx512f"]:
        pytest.skip("needs a C compiler and an AVX-512 CPU (which runs either build)")
    monkeypatch.setenv("FXMOMENTUM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_isa_flags", lambda: isa)
    monkeypatch.setattr(native, "_lib", native._load())
    for kernel, make_args in _cases(70001, "cpu"):
        _check(kernel, make_args, kernel.native)


def test_native_kernels_decline_what_they_do_not_cover():
    if native.library() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    x64 = torch.randn(100, dtype=torch.float64)
    assert native.abs_max_f(x64, None) is NotImplemented
    x = torch.randn(10, 10)
    assert native.abs_max_f(x, x.t()) is NotImplemented  # laid out differently
    half = torch.randn(100, dtype=torch.float16)
    assert native.abs_max_f(half, half) is NotImplemented  # f in half precision
    # ...and the dispatch then runs the eager kernel.
    assert kernels.abs_max_f(x64, None) == x64.abs().max()


def test_native_kernels_take_read_only_operands_laid_out_otherwise():
    # Autograd hands over expanded and transposed tensors (the gradient of output.sum() is one
    # value broadcast): the native kernels copy those operands into the state's layout rather
    # than leave the step to the eager kernel, and give its bits.
    if native.library() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    n = 70001
    kernel, make_args = _cases(n, "cpu")[3]  # backward_step_: grads, ahead, rebuild
    assert kernel is kernels.backward_step_

    def odd_args() -> tuple:
        args = list(make_args())
        strided = torch.empty(2 * n)
        strided[::2] = args[2]
        args[2] = strided[::2]  # out: every other element of a buffer
        args[7] = args[7][:1].expand(n)  # grad_out: one value broadcast
        return tuple(args)

    _check(kernel, odd_args, kernel.native)
    go, gf = torch.randn(1).expand(n), torch.randn(n)
    _check(kernels.next_grad_f_, lambda: (go, gf.clone(), 0.1, 0.9), kernels.next_grad_f_.native)
    transposed, state = torch.randn(64, 33).t(), torch.randn(33, 64)
    copy = native._laid_out_like(state, transposed)
    assert copy.is_contiguous() and torch.equal(copy, transposed)


def test_a_chain_under_sum_runs_no_eager_kernel(monkeypatch):
    # The loss output.sum() gives the last block a gradient of stride 0; run eagerly, that
    # block's backward step set the step's peak memory (a float32 MLP chain, batch 1024 x 256:
    # 29 MiB against 10).
    if native.library() is None:
        pytest.skip("no C compiler: the native kernels are not built")

    eager: list[str] = []
    for kernel in (kernels.forward_step_, kernels.backward_step_, kernels.next_grad_f_,
                   kernels.input_grad_):  # fmt: skip
        fn = kernel.fn

        def spy(*args, name=kernel.__name__, fn=fn):
            eager.append(name)
            return fn(*args)

        monkeypatch.setattr(kernel, "fn", spy)
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 32)) for _ in range(4)]
    net = fxmomentum.MomentumNet(blocks, 0.9, use_backprop=False)
    x = torch.randn(64, 32, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and not eager, eager


def test_native_kernels_follow_the_thread_count():
    if native.library() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    kernel, make_args = _cases(1 << 18, "cpu")[0]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3):
            torch.set_num_threads(n)
            args = make_args()
            results.append(_flat(kernel.native(*args)) + list(args))
    finally:
        torch.set_num_threads(threads)
    assert all(_same(a, b) for a, b in zip(*results, strict=True))


def test_compile_off_runs_the_eager_kernels(monkeypatch):
    monkeypatch.setenv("FXMOMENTUM_COMPILE", "0")
    calls = []
    monkeypatch.setattr(native, "library", lambda: calls.append(1))
    kernel, make_args = _cases(100, "cpu")[0]
    kernel(*make_args())
    assert not calls


def test_a_failed_build_warns_once_and_the_eager_kernels_serve(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("FXMOMENTUM_CACHE_DIR", str(tmp_path / "cache"))
    kernel, make_args = _cases(100, "cpu")[0]
    with pytest.warns(RuntimeWarning, match="could not build the native"):
        got = kernel(*make_args())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel(*make_args())
    assert _same(got[0], kernel.fn(*make_args())[0])


def test_the_library_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("FXMOMENTUM_CACHE_DIR", str(tmp_path))
    if native._compiler() is None:
        pytest.skip("no C compiler")
    native._load()
    built = list(tmp_path.glob("kernels-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    native._load()  # a later process loads the same file
    assert built[0].stat().st_mtime_ns == mtime
    assert native.cache_dir() == tmp_path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_cuda_kernels_give_the_eager_bits():
    for kernel, make_args in _cases(kernels.COMPILE_MIN_NUMEL, "cuda"):
        _check(kernel, make_args, kernel)
        assert kernel._compiled is not None, kernel.__name__


def test_fresh_step_is_a_step_from_zero():
    """A chain's first step takes V and the stack's head as zero without reading them."""
    g = torch.Generator().manual_seed(3)
    n_el = 5000
    xw, r = kernels.split(
        torch.randint(-(2**32), 2**32, (n_el,), generator=g), 2.0**-30 * torch.ones(())
    )
    f = torch.randn(n_el, generator=g) * 100
    c, scale, inv = torch.tensor(2.0**10), torch.tensor(2.0**30), torch.tensor(2.0**-30)
    results = []
    for fresh in (False, True):
        fill = 7 if fresh else 0  # values a fresh step must not read
        V = torch.full((n_el,), fill, dtype=torch.int64)
        head = torch.full((n_el,), fill, dtype=torch.int32)
        r_ = r.clone()
        out = kernels.forward_step_(xw, r_, V, head, f, None, c, 58982, scale, inv, fresh)
        results.append([*_flat(out), r_, V, head])
    for a, b in zip(*results, strict=True):
        assert _same(a, b)
