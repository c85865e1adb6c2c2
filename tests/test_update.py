"""The momentum update in floating point: one autograd node, the native kernel's bits equal
the eager operators', gradients equal autograd's of the formula, and nothing kept."""

from __future__ import annotations

import itertools

import pytest
import torch

from fxmomentum.engine import native, update

GAMMA = 58982 / 2**16  # 0.9 on the engine's grid


def _args(shape, has_v: bool, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = (
        torch.randn(shape, generator=g, dtype=dtype),
        torch.randn(shape, generator=g, dtype=dtype),
    )
    return x, y, (torch.randn(shape, generator=g, dtype=dtype) if has_v else None)


@pytest.mark.parametrize("n_el", [7, 70001])
@pytest.mark.parametrize("has_v, subtract", list(itertools.product([True, False], repeat=2)))
def test_the_native_update_gives_the_eager_bits(n_el, has_v, subtract):
    if native.library() is None:
        pytest.skip("no C compiler: the native kernels are not built")
    x, y, v = _args((n_el,), has_v)
    want = update._momentum_update(x, y, v, GAMMA, subtract)
    got = native.momentum_update(x, y, v, GAMMA, subtract)
    assert got is not NotImplemented
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    gx, gv, _ = _args((n_el,), True, seed=1)
    for grad_x, grad_v in [(gx, gv), (None, gv), (gx, None), (gx.expand(3, -1)[0], gv)]:
        ref = grad_x if grad_x is not None else grad_v
        want = update._momentum_update_grad(ref, grad_x, grad_v, GAMMA, has_v, subtract)
        got = native.momentum_update_grad(ref, grad_x, grad_v, GAMMA, has_v, subtract)
        for a, b in zip(got, want, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("has_v, subtract", list(itertools.product([True, False], repeat=2)))
def test_the_update_differentiates_as_its_formula(has_v, subtract):
    x, y, v = (
        t.requires_grad_() if t is not None else None for t in _args((5, 6), has_v, torch.float64)
    )
    inputs = [t for t in (x, y, v) if t is not None]

    def formula(x, y, v=None):
        f = y - x if subtract else y
        v_new = (1 - GAMMA) * f if v is None else GAMMA * v + (1 - GAMMA) * f
        return x + v_new, v_new

    got = update.momentum_update(x, y, v, GAMMA, subtract)
    want = formula(*inputs)
    assert all(torch.allclose(a, b, rtol=1e-15, atol=0) for a, b in zip(got, want, strict=True))
    weights = [torch.randn(5, 6, dtype=torch.float64) for _ in range(2)]
    for used in [(0, 1), (0,), (1,)]:  # the next state, the velocity, or both read after
        loss_got = sum((got[i] * weights[i]).sum() for i in used)
        loss_want = sum((want[i] * weights[i]).sum() for i in used)
        grads_got = torch.autograd.grad(loss_got, inputs, retain_graph=True, allow_unused=True)
        grads_want = torch.autograd.grad(loss_want, inputs, retain_graph=True, allow_unused=True)
        for a, b, t in zip(grads_got, grads_want, inputs, strict=True):
            a = torch.zeros_like(t) if a is None else a
            b = torch.zeros_like(t) if b is None else b
            assert torch.allclose(a, b, rtol=1e-14, atol=1e-15)


def test_the_update_keeps_nothing_for_backward():
    x, y, v = (t.requires_grad_() for t in _args((4, 4), True))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        update.momentum_update(x, y, v, GAMMA, subtract=True)
    assert saved == []


def test_without_grad_the_update_is_the_plain_operators():
    x, y, v = _args((3, 3), True)
    out = update.momentum_update(x, y, v, GAMMA, subtract=True)
    assert out[0].grad_fn is None
    assert torch.equal(out[1], update._momentum_update(x, y, v, GAMMA, True)[1])
