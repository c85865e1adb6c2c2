"""GammaScheduler: the schedule's values, its checks, its state, and exact gradients across
changes of gamma."""

from __future__ import annotations

import math

import archs
import pytest
import torch
from conftest import grad_err

import fxmomentum
from fxmomentum import GammaScheduler, MomentumChain


def chains(model):
    return [m for m in model.modules() if isinstance(m, MomentumChain)]


@pytest.fixture
def gm():
    torch.manual_seed(0)
    return fxmomentum.convert(archs.MLPResNet(depth=3), gamma=0.9)


def test_linear_and_cosine(gm):
    s = GammaScheduler(gm, start=0.1, end=0.9, steps=4)
    assert s.get_last_gamma() == 0.1 and chains(gm)[0].gamma == 0.1  # set at construction
    seen = []
    for _ in range(6):
        s.step()
        seen.append(s.get_last_gamma())
        assert all(c.gamma == seen[-1] for c in chains(gm))
    assert seen == pytest.approx([0.3, 0.5, 0.7, 0.9, 0.9, 0.9])
    c = GammaScheduler(gm, start=0.2, end=0.8, steps=10, kind="cosine")
    expected = [0.8 - 0.6 * (1 + math.cos(math.pi * min(k, 10) / 10)) / 2 for k in range(12)]
    assert [c.gamma_at(k) for k in range(12)] == pytest.approx(expected)
    assert c.gamma_at(5) == pytest.approx(0.5) and c.gamma_at(12) == 0.8
    down = GammaScheduler(gm, start=0.9, end=0.5, steps=2)  # lowering works as well
    down.step()
    assert down.get_last_gamma() == pytest.approx(0.7)


def test_state_dict_round_trip(gm):
    s = GammaScheduler(gm, start=0.1, end=0.9, steps=8, kind="cosine")
    for _ in range(3):
        s.step()
    state = s.state_dict()
    assert state == {"start": 0.1, "end": 0.9, "steps": 8, "kind": "cosine", "last_step": 3}
    other = fxmomentum.convert(archs.MLPResNet(depth=3), gamma=0.9)
    resumed = GammaScheduler(other, start=0.5, end=0.6, steps=1)
    resumed.load_state_dict(state)
    assert resumed.get_last_gamma() == s.get_last_gamma()
    assert chains(other)[0].gamma == s.get_last_gamma()
    s.step()
    resumed.step()
    assert resumed.get_last_gamma() == s.get_last_gamma()
    assert "last_step=4" in repr(resumed)


def test_gamma_zero_needs_backprop_chains(gm):
    with pytest.raises(ValueError) as err:
        GammaScheduler(gm, start=0.0, end=0.9, steps=10)
    assert str(err.value) == (
        "GammaScheduler start=0.0: momentum_chain_0 is reversible (use_backprop=False), and a "
        "reversible chain cannot run at gamma = 0 (the inverse divides by gamma). Start at a "
        "small positive gamma such as 0.05 or 0.1 (close to the original), or convert with "
        "use_backprop=True (which stores activations) to start at 0."
    )
    assert chains(gm)[0].gamma == 0.9  # nothing changed
    bp = fxmomentum.convert(archs.MLPResNet(depth=3), gamma=0.0, use_backprop=True)
    s = GammaScheduler(bp, start=0.0, end=0.9, steps=2)
    assert chains(bp)[0].gamma == 0.0
    s.step()
    assert chains(bp)[0].gamma == pytest.approx(0.45)


def test_bad_arguments(gm):
    with pytest.raises(ValueError, match="holds no momentum chain: GammaScheduler acts on"):
        GammaScheduler(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="kind must be one of 'linear', 'cosine', got 'exp'"):
        GammaScheduler(gm, kind="exp")
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        GammaScheduler(gm, steps=0)
    with pytest.raises(ValueError, match=r"gamma \(end\) is 1.0: at gamma = 1 the velocity"):
        GammaScheduler(gm, end=1.0)


def _grads(model, x, loss_weights):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * loss_weights).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_gradients_stay_exact_across_changes():
    """Float64: after every change of gamma the reversible gradients equal backprop's, also
    when gamma changes between a forward and its backward (the backward uses the forward's)."""
    torch.manual_seed(0)
    model = archs.MLPResNet(depth=6).double()
    rev = fxmomentum.convert(model, gamma=0.9)
    bp = fxmomentum.convert(model, gamma=0.9, use_backprop=True)
    assert not chains(rev)[0].use_backprop and chains(bp)[0].use_backprop
    schedules = [GammaScheduler(m, start=0.05, end=0.95, steps=5, kind="cosine") for m in (rev, bp)]
    x = torch.randn(16, 8, dtype=torch.float64)
    w = torch.randn(16, 3, dtype=torch.float64)
    previous = None
    for _ in range(7):
        g_rev, g_bp = _grads(rev, x, w), _grads(bp, x, w)
        assert grad_err(g_rev, g_bp) < 1e-10
        if previous is not None:
            assert grad_err(g_bp, previous) > 1e-6 or schedules[1].last_step > 5  # gamma moved
        previous = g_bp
        for s in schedules:
            s.step()
    # A change between forward and backward: both backwards use the forward's gamma.
    reference = fxmomentum.convert(model, gamma=schedules[0].get_last_gamma(), use_backprop=True)
    expected = _grads(reference, x, w)
    for m, s in zip((rev, bp), schedules, strict=True):
        m.zero_grad(set_to_none=True)
        out = m(x)
        s.load_state_dict({**s.state_dict(), "last_step": 1})  # gamma changes here
        (out * w).sum().backward()
        assert grad_err([p.grad for p in m.parameters()], expected) < 1e-10
