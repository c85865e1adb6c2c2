"""A value read by a residual block and, beside it, by other code (HRNet's transitions).

HRNet's stage transitions read a branch's output to start a new branch, and the graph computes
them before that branch's next residual add: the transition is computed from the block's input
before the add, but the add does not need it. Such nodes are not the block's: the block is what
its add is computed from. The input has a reader outside the block then, so a chain cannot
reach it from the block before: the block starts a chain.
"""

from __future__ import annotations

import torch
from conftest import assert_gamma_zero_exact, assert_reversible_gradients
from torch import nn

import fxmomentum


def body(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))


class Branches(nn.Module):
    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.stem = nn.Linear(dim, dim)
        self.a = nn.ModuleList(body(dim) for _ in range(2))
        self.transition = nn.Linear(dim, dim)
        self.b = nn.ModuleList(body(dim) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        new = self.transition(x)  # a second branch from the first one's input
        for f in self.a:
            x = x + f(x)
        for g in self.b:
            new = new + g(new)
        return x * new


def build():
    torch.manual_seed(0)
    return Branches(), (torch.randn(3, 6),)


def test_the_transition_is_not_part_of_the_block():
    model, inputs = build()
    report = fxmomentum.inspect(model, inputs)
    assert [c.num_blocks for c in report.chains] == [2, 2]
    assert not report.skipped


def test_gamma_zero_and_gradients():
    model, inputs = build()
    assert_gamma_zero_exact(model, inputs)
    assert_reversible_gradients(model, inputs)


def test_an_in_place_change_of_the_input_beside_the_block_is_still_refused():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = body(4)

        def forward(self, x):
            x = x * 1.0
            h = self.f(x)
            x.mul_(2.0)  # the add reads the changed x: not x + F(x)
            return x + h

    report = fxmomentum.inspect(InPlace(), (torch.randn(2, 4),))
    assert not report.chains
    assert "modifies the block input in place" in report.skipped[0].reason
