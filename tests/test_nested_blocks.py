"""Nested residual blocks: ``x + F(x)`` with another ``y + G(y)`` inside ``F``.

ConvNeXt-V2's GRN is ``y + (beta + gamma * y * N(y))`` inside the MLP of each block
``x + drop_path(mlp(norm(dwconv(x))))``; EdgeNeXt's attention blocks hold an inner residual
too. The outer blocks chain stage by stage, the inner ones cannot (the outer skip reads their
input): the outer blocks are converted. Where the inner blocks make the longer chains (a
U-Net's long skip around a stage), they are (tests/test_match.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_gamma_zero_exact, assert_reversible_gradients, block_counts
from torch import nn


class GRN(nn.Module):
    """ConvNeXt-V2's global response normalisation (channels last), a residual itself."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(dim) * 0.1)
        self.beta = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return x + (self.beta + self.gamma * x * nx)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up, self.grn, self.down = (
            nn.Linear(dim, 2 * dim),
            GRN(2 * dim),
            nn.Linear(2 * dim, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        return x + self.down(self.grn(torch.nn.functional.gelu(self.up(self.norm(x)))))


class Stages(nn.Module):
    def __init__(self, depths=(2, 3), dim: int = 8) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(*[Block(dim) for _ in range(d)]) for d in depths)
        self.mix = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages[0](x)
        x = self.mix(x)
        return self.stages[1](x)


def build():
    torch.manual_seed(0)
    return Stages(), (torch.randn(2, 4, 4, 8),)


def test_the_outer_blocks_are_the_chains():
    model, inputs = build()
    assert block_counts(model, inputs) == [2, 3]
    import fxmomentum

    report = fxmomentum.inspect(model, inputs)
    inner = [s for s in report.skipped if s.path.endswith(".grn")]
    assert len(inner) == 5 and all("part of that block's F" in s.reason for s in inner)


def test_gamma_zero_and_gradients():
    model, inputs = build()
    assert_gamma_zero_exact(model, inputs)
    assert_reversible_gradients(model, inputs)


@pytest.mark.parametrize(
    ("name", "expected"), [("convnextv2_atto", [2, 2, 6, 2]), ("edgenext_xx_small", [2, 2, 6, 2])]
)
def test_timm_models_with_nested_residuals(name, expected):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4)
    inputs = (torch.randn(1, 3, 64, 64),)
    assert block_counts(model, inputs) == expected
    assert_gamma_zero_exact(model, inputs)
