"""Chains across layout changes of the state: reshapes, views, flattens, permutes.

timm's Swin runs each block's attention on ``(B, H, W, C)`` and its MLP on ``(B, H*W, C)``,
reshaping between; OPT runs its FFN on ``(batch*seq, hidden)``. The numbers do not change, so
the chain keeps its state in its first block's layout: each later block replays the layout
changes on it and maps its result back (reshape to the shape it started from, the inverse
permutation). Gamma 0 is the model bit for bit, reversible gradients are backprop's, other
batch sizes work (the sizes are read from the state at run time).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_gamma_zero_exact, assert_reversible_gradients, block_counts
from torch import nn

import fxmomentum


def mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                         nn.Linear(2 * dim, dim), nn.Dropout(0.1))  # fmt: skip


class SwinLike(nn.Module):
    """Per block ``x + f(x)`` on (B, H, W, C), reshape to (B, H*W, C), ``x + g(x)``, back."""

    def __init__(self, depth: int = 3, dim: int = 8) -> None:
        super().__init__()
        self.fs = nn.ModuleList(mlp(dim) for _ in range(depth))
        self.gs = nn.ModuleList(mlp(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for f, g in zip(self.fs, self.gs, strict=True):
            b, h, w, c = x.shape
            x = x + f(x)
            x = x.reshape(b, -1, c)
            x = x + g(x)
            x = x.reshape(b, h, w, c)
        return x.mean(dim=(1, 2))


class OPTLike(nn.Module):
    """Attention-like ``x + f(x)`` on (B, S, D), the FFN on (B*S, D), a post-norm block."""

    def __init__(self, depth: int = 3, dim: int = 8) -> None:
        super().__init__()
        self.fs = nn.ModuleList(mlp(dim) for _ in range(depth))
        self.gs = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for f, g, norm in zip(self.fs, self.gs, self.norms, strict=True):
            x = x + f(x)
            shape = x.shape
            x = x.reshape(-1, x.size(-1))
            x = norm(x + g(x)).view(shape)
        return x


class Transposed(nn.Module):
    """Token mixing on (B, D, N) between channel mixing on (B, N, D), by transposes."""

    def __init__(self, depth: int = 2, tokens: int = 5, dim: int = 8) -> None:
        super().__init__()
        self.tokens = nn.ModuleList(mlp(tokens) for _ in range(depth))
        self.channels = nn.ModuleList(mlp(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for t, c in zip(self.tokens, self.channels, strict=True):
            x = x.transpose(1, 2)
            x = x + t(x)
            x = x.permute(0, 2, 1)
            x = x + c(x)
        return x


CASES = {
    "swin": (SwinLike, lambda b=2: (torch.randn(b, 4, 4, 8),), [6]),
    "opt": (OPTLike, lambda b=2: (torch.randn(b, 5, 8),), [6]),
    # The first transpose comes before the first block: the chain starts on (B, D, N).
    "transposed": (Transposed, lambda b=2: (torch.randn(b, 5, 8),), [4]),
}


def build(name: str):
    make, inputs, expected = CASES[name]
    torch.manual_seed(0)
    return make(), inputs(), expected


@pytest.mark.parametrize("name", list(CASES))
def test_one_chain_across_the_layout_changes(name):
    model, inputs, expected = build(name)
    assert block_counts(model, inputs) == expected


@pytest.mark.parametrize("name", list(CASES))
def test_gamma_zero_is_the_model_bit_for_bit(name):
    model, inputs, _ = build(name)
    assert_gamma_zero_exact(model, inputs)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_reversible_gradients_equal_backprop_s(name, mode):
    model, inputs, _ = build(name)
    assert_reversible_gradients(model, inputs, mode)


@pytest.mark.parametrize("name", list(CASES))
def test_other_batch_sizes(name):
    make, inputs, _ = CASES[name]
    torch.manual_seed(0)
    model = make().eval()
    converted = fxmomentum.convert(model, 0.0, example_inputs=inputs(), use_backprop=True).eval()
    other = inputs(3)
    with torch.no_grad():
        assert torch.equal(converted(*other), model(*other))
    reversible = fxmomentum.convert(model, 0.9, example_inputs=inputs())
    reversible(*other).sum().backward()


def test_the_state_keeps_the_first_layout():
    model, inputs, _ = build("swin")
    report = fxmomentum.inspect(model, inputs)
    (chain,) = report.chains
    assert chain.shape == (2, 4, 4, 8)
