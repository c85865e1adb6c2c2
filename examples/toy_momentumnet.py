"""The seed README's toy Momentum ResNet, trained for a few steps on random data.

A MomentumNet iterates ``v <- gamma * v + (1 - gamma) * f(x); x <- x + v`` over ten copies of
one small function (tied weights). With ``use_backprop=False`` backward rebuilds the activations
from the output instead of storing them; its gradients equal plain backprop's (checked here in
float64, where both must agree within 1e-5, as ARCHITECTURE.md asks).

Run ``python examples/toy_momentumnet.py`` (``--quick`` for tiny sizes).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from fxmomentum import MomentumNet


def make_net(d: int, hidden: int, depth: int, use_backprop: bool) -> MomentumNet:
    """The README's toy: ``depth`` times the same ``Linear - Tanh - Linear`` function."""
    function = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))
    return MomentumNet([function] * depth, gamma=0.9, use_backprop=use_backprop)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def gradients(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the mean squared error with respect to the input and every parameter."""
    net.zero_grad()
    x = x.clone().requires_grad_(True)
    nn.functional.mse_loss(net(x), y).backward()
    return [x.grad, *(p.grad for p in net.parameters())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args(argv)
    d, hidden, depth, batch, steps = (500, 8, 10, 64, 30) if not args.quick else (50, 8, 10, 8, 5)
    torch.manual_seed(0)

    # 1. Reversible and backprop gradients agree (float64, same weights and data).
    reversible = make_net(d, hidden, depth, use_backprop=False).double()
    backprop = make_net(d, hidden, depth, use_backprop=True).double()
    backprop.load_state_dict(reversible.state_dict())
    x = torch.randn(batch, d, dtype=torch.float64)
    y = torch.randn(batch, d, dtype=torch.float64)
    g_rev = gradients(reversible, x, y)
    g_bp = gradients(backprop, x, y)
    err = max(rel_err(a, b) for a, b in zip(g_rev, g_bp, strict=True))
    print(f"float64 gradients, reversible vs backprop: max relative error {err:.1e}")
    if err > 1e-5:
        print("FAILED: the gradients differ by more than 1e-5")
        return 1

    # 2. Train the reversible toy (float32) to map random inputs to random targets.
    net = make_net(d, hidden, depth, use_backprop=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = torch.randn(batch, d), torch.randn(batch, d)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"training {steps} steps (reversible, float32): loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if not losses[-1] < losses[0]:
        print("FAILED: the loss did not go down")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
