"""The official library's MomentumNet: behaviours its tests and examples rely on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxmomentum import MomentumNet


def mlp(d: int = 2, hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))


@pytest.mark.parametrize("use_backprop", [True, False])
@pytest.mark.parametrize("init_speed", [False, True])
def test_empty_momentum_net_is_the_identity(use_backprop, init_speed):
    init = nn.Linear(2, 2) if init_speed else None
    net = MomentumNet([], 0.9, init_speed=init_speed, init_function=init,
                      use_backprop=use_backprop)  # fmt: skip
    x = torch.randn(5, 2, requires_grad=True)
    y = net(x)
    assert torch.equal(y, x)
    y.sum().backward()  # gradients flow through the identity
    assert torch.equal(x.grad, torch.ones_like(x))
    assert len(net.functions) == 0
    assert list(net.state_dict()) == (
        [] if init is None else ["init_function.weight", "init_function.bias"]
    )
    assert "num_blocks=0" in repr(net)


def test_nested_rings_draws_the_states_block_by_block():
    """The official nested-rings example: MomentumNet([function] * i) for i = 0, 1, ..., n."""
    torch.manual_seed(0)
    function = mlp()
    x = torch.randn(50, 2)
    full = MomentumNet([function] * 4, gamma=0.99)
    states, nets = [], []
    with torch.no_grad():
        for i in range(5):
            nets.append(MomentumNet([function] * i, gamma=0.99, init_speed=0))
            states.append(nets[-1](x))
    assert torch.equal(states[0], x)
    torch.testing.assert_close(states[-1], full(x).detach())
    # Each state is the chain after i blocks: v_1 = (1 - gamma) f(x_0), x_1 = x_0 + v_1.
    # (gamma is used as the nearest multiple of 2**-16.)
    g = 1 - nets[1].effective_gamma
    torch.testing.assert_close(states[1], x + g * function(x).detach(), rtol=1e-6, atol=1e-7)


def test_empty_momentum_net_keeps_the_gamma_checks():
    with pytest.raises(ValueError, match="at gamma = 1 the velocity never changes"):
        MomentumNet([], 1.0)
    with pytest.raises(ValueError, match="cannot be run backwards at gamma = 0"):
        MomentumNet([], 0.0, use_backprop=False)
    assert MomentumNet([], 0.0).gamma == 0.0


@pytest.mark.parametrize("use_backprop", [True, False])
def test_momentum_net_refuses_gamma_one(use_backprop):
    with pytest.raises(ValueError) as err:
        MomentumNet([mlp()], 1.0, use_backprop=use_backprop)
    assert str(err.value) == (
        "gamma is 1.0: at gamma = 1 the velocity never changes, so no block has an effect and no "
        "block's parameters get a gradient. Use a gamma below 1 (0.9 is the usual momentum; the "
        "largest is 0.999985)."
    )
    net = MomentumNet([mlp()], 0.9)
    with pytest.raises(ValueError, match="at gamma = 1 the velocity never changes"):
        net.gamma = 1.0
    assert net.gamma == 0.9
