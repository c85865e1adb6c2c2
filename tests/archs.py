"""Small hand-written architectures for the converter's tests (random weights).

Each class documents the chains the converter should find in it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(dim: int, p: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(p), nn.Linear(2 * dim, dim))


class MLPResNet(nn.Module):
    """Linear stem, ``depth`` pure blocks ``x + f(x)`` written in the root, a final norm and head.

    Chains: one of ``depth`` pure blocks (``blocks.0`` ... ``blocks.<depth-1>``); the final
    LayerNorm stays outside the chain.
    """

    def __init__(self, dim: int = 16, depth: int = 4, p: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(mlp(dim, p) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x))


class Attention(nn.Module):
    """Multi-head self-attention written by hand (reshapes, softmax, optional mask)."""

    def __init__(self, dim: int, heads: int, p: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        if mask is not None:
            att = att + mask
        att = self.drop(att.softmax(dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(y)


class PreNormBlock(nn.Module):
    """``x = x + drop_path(ls1 * attn(norm1(x)))``; ``x = x + mlp(norm2(x))``: two pure blocks.

    ``layer_scale`` is a parameter of this module (read through ``get_attr``); the drop path
    uses ``F.dropout`` with ``self.training`` (read at run time after conversion).
    """

    def __init__(self, dim: int = 16, heads: int = 2, p: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, p)
        self.layer_scale = nn.Parameter(torch.full((dim,), 0.5))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, p)
        self.p = p

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.layer_scale * self.attn(self.norm1(x), mask)
        x = x + F.dropout(y, self.p, self.training)
        return x + self.mlp(self.norm2(x))


class PreNormTransformer(nn.Module):
    """Embedding, ``depth`` :class:`PreNormBlock` layers, final norm, mean pooling, head.

    Chains: one of ``2 * depth`` pure blocks. With ``use_mask=True`` every attention reads
    an additive mask built from a second input (context of every attention block).
    """

    def __init__(self, dim: int = 16, depth: int = 3, p: float = 0.0, use_mask: bool = False):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.layers = nn.ModuleList(PreNormBlock(dim, 2, p) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)
        self.use_mask = use_mask

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        mask = bias.unsqueeze(1) if self.use_mask else None
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(self.norm(x).mean(dim=1))


class PostNormLayer(nn.Module):
    """``x = norm1(x + attn(x))``; ``x = norm2(x + ff(x))``: two generalized blocks."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.ff(x))


class PostNormTransformer(nn.Module):
    """Chains: one of ``2 * depth`` generalized blocks."""

    def __init__(self, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.layers = nn.Sequential(*(PostNormLayer(dim) for _ in range(depth)))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.embed(x)).mean(dim=1))


class ResBlock(nn.Module):
    """``relu(x + conv(relu(bn(conv(x)))))`` at constant width: a generalized block."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.bn(self.conv1(x)))))


class UNet(nn.Module):
    """Two-level U-Net with residual blocks; the decoder taps encoder states.

    ``enc1 = [ResBlock] * 3``, but the skip connection taps the state after the *second* block,
    so ``enc1`` holds a chain of 2 (``enc1.0``, ``enc1.1``) and a chain of 1 (``enc1.2``).
    ``enc2`` (3 blocks, tapped at its end) is one chain of 3; the bottleneck ``mid`` holds one
    block; ``dec1`` (2 blocks) is one chain of 2. The decoder's two ``up(h) + tap`` adds are
    not blocks: ``tap + F(tap)`` would enclose the inner blocks (an outer skip connection).
    """

    def __init__(self, ch: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, padding=1)
        self.enc1 = nn.ModuleList(ResBlock(ch) for _ in range(3))
        self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.enc2 = nn.ModuleList(ResBlock(2 * ch) for _ in range(3))
        down = nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1)
        self.mid = nn.Sequential(down, ResBlock(2 * ch))
        self.up2 = nn.ConvTranspose2d(2 * ch, 2 * ch, 2, stride=2)
        self.up1 = nn.ConvTranspose2d(2 * ch, ch, 2, stride=2)
        self.dec1 = nn.ModuleList(ResBlock(ch) for _ in range(2))
        self.out = nn.Conv2d(ch, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.enc1[0](h)
        h = self.enc1[1](h)
        tap1 = h
        h = self.enc1[2](h)
        h = self.down(h)
        for block in self.enc2:
            h = block(h)
        tap2 = h
        h = self.up2(self.mid(h)) + tap2
        h = self.up1(h) + tap1
        for block in self.dec1:
            h = block(h)
        return self.out(h)


class CondBlock(nn.Module):
    """``x + mlp(x * (1 + scale(emb)) + shift(emb))``: reads a conditioning embedding."""

    def __init__(self, dim: int, emb: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.scale = nn.Linear(emb, dim)
        self.shift = nn.Linear(emb, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) * (1 + self.scale(emb)) + self.shift(emb)
        return x + self.mlp(h)


class Conditioned(nn.Module):
    """Blocks reading ``emb = embed(t)`` (a second input): one chain of ``depth`` pure blocks
    whose context holds ``emb``."""

    def __init__(self, dim: int = 16, emb: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(5, dim)
        self.embed = nn.Sequential(nn.Linear(1, emb), nn.SiLU())
        self.blocks = nn.ModuleList(CondBlock(dim, emb) for _ in range(depth))
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed(t)
        x = self.inp(x)
        for block in self.blocks:
            x = block(x, emb)
        return self.head(x)


class WeightTied(nn.Module):
    """One block module applied ``times`` times: a chain of ``times`` pure blocks that all call
    the same submodule (its parameters appear once)."""

    def __init__(self, dim: int = 16, times: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.block = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))
        self.times = times
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for _ in range(self.times):
            x = x + self.block(x)
        return self.head(x)


class Synthetic(nn.Module):
    """``depth`` pure blocks ``x + s_t * f_t(x)`` (a per-block scale parameter): one chain."""

    def __init__(self, depth: int, dim: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)) for _ in range(depth)
        )
        self.scales = nn.ParameterList(nn.Parameter(torch.ones(dim)) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, scale in zip(self.blocks, self.scales, strict=True):
            x = x + scale * block(x)
        return x


def wide_weight_chain(hooked: bool = False, width: int = 512, depth: int = 4):
    """A reversible chain whose blocks hold 4 MiB of weights and almost no activations.

    A workload for :func:`fxmomentum.tools.measure.measure_memory`: its step's peak is the parameter
    gradients alive at once. ``hooked`` puts a (no-op) hook on every parameter, which makes the
    chain return a block's parameter gradients from its autograd node instead of accumulating
    each into ``.grad`` as it is made.
    """
    from fxmomentum import MomentumNet
    from fxmomentum.tools.measure import Workload

    blocks = [
        nn.Sequential(*(m for _ in range(4) for m in (nn.Linear(width, width), nn.Tanh())))
        for _ in range(depth)
    ]
    net = MomentumNet(blocks, 0.9, use_backprop=False)
    if hooked:
        for p in net.parameters():
            p.register_post_accumulate_grad_hook(lambda p: None)
    return Workload(net, (torch.randn(4, width),))
