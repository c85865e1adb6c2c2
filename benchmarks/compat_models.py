"""The model zoo of the compatibility sweep (``benchmarks/compat.py``).

Each :class:`ModelSpec` says how to build a model from a small configuration (no weights are
downloaded), how to make its inputs at a given batch size and length, and which residual
chains its architecture implies: the block counts of the chains, in order, with one line
saying where that comes from. The expectations are written from the architectures' papers and
code, never from what the converter finds.

Conventions of the expectations:

- A *block* is one residual ``x + f(x)`` whose skip is the identity (possibly followed by
  per-element ops or a norm: ``relu(x + f(x))``, post-norm ``norm(x + f(x))``). A projection
  shortcut (``proj(x) + f(x)``), a scaled skip (``s * x + f(x)``) or a skip that is a norm
  of ``x`` is not one.
- A *chain* is a run of blocks where each block's output is the next block's input. A change
  of the state's shape (downsampling, more channels, tokens added or dropped) or a layer that
  is not a block ends it. A layout change that only moves the same numbers (a reshape from
  ``(B, H, W, C)`` to ``(B, H*W, C)``, a permute, a window partition and its inverse) is no
  break: the chain's state follows it exactly.
- Hugging Face models are built with ``use_cache=False`` where they have a cache; inputs carry
  an attention mask with padding in the second row.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelSpec", "select_specs", "zoo"]

Inputs = Callable[[int, int], tuple[Any, ...]]


@dataclass(frozen=True)
class ModelSpec:
    """A model of the sweep.

    Attributes
    ----------
    name : str
        ``family/model`` (unique), e.g. ``"torchvision/resnet50"``.
    family : str
    build : callable
        Returns the model (random weights, small configuration).
    make_inputs : callable
        ``(batch, length) -> tuple`` of positional inputs (``length`` is ignored by models of
        a fixed input size).
    expected : tuple of int
        Block counts of the chains the architecture implies, in order.
    source : str
        Where the expectation comes from (one line).
    batch, length : int
        Batch size and sequence length converted with.
    other_batch : int
        Batch size of the "other batch size" checks.
    other_length : int or None
        Sequence length of those checks (None: the same as ``length``).
    quick : bool
        Part of ``--quick``.
    note : str
        How the model is built or called, where it is not the obvious way.
    """

    name: str
    build: Callable[[], nn.Module]
    make_inputs: Inputs
    expected: tuple[int, ...]
    source: str
    batch: int = 2
    length: int = 8
    other_batch: int = 3
    other_length: int | None = None
    quick: bool = False
    note: str = ""
    family: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "family", self.name.split("/")[0])

    def describe(self) -> dict[str, Any]:
        """What the results table shows about the spec."""
        return {
            "family": self.family,
            "expected": list(self.expected),
            "source": self.source,
            "note": self.note,
            "sizes": {
                "batch": self.batch,
                "length": self.length,
                "other_batch": self.other_batch,
                "other_length": self.other_length,
            },
        }


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def images(size: int, channels: int = 3) -> Inputs:
    """``(batch, channels, size, size)`` standard normal images."""

    def make(batch: int, length: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch, channels, size, size),)

    return make


def padding_mask(batch: int, length: int) -> torch.Tensor:
    """Ones, with the last two positions of the second row zero (padding)."""
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, -2:] = 0
    return mask


def token_ids(vocab: int = 99, mask: bool = True, gap: int = 0, decoder: bool = False) -> Inputs:
    """``input_ids`` in ``[1, vocab)`` and, with ``mask``, a padded ``attention_mask``.

    ``gap`` Nones go between them (models whose second argument is a cache); ``decoder``
    appends ``decoder_input_ids`` of the same length (encoder-decoder models).
    """

    def make(batch: int, length: int) -> tuple[torch.Tensor | None, ...]:
        ids = torch.randint(1, vocab, (batch, length))
        if not mask:
            return (ids,)
        inputs: tuple[torch.Tensor | None, ...] = (ids, *[None] * gap, padding_mask(batch, length))
        if decoder:
            inputs += (torch.randint(1, vocab, (batch, length)),)
        return inputs

    return make


def vectors(dim: int) -> Inputs:
    """``(batch, length, dim)`` standard normal token vectors."""

    def make(batch: int, length: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch, length, dim),)

    return make


def lazy(module: str, name: str, *args: Any, **kwargs: Any) -> Callable[[], nn.Module]:
    """A builder calling ``module.name(*args, **kwargs)``, importing ``module`` only then.

    ``name`` may be dotted (``"maxvit.MaxVit"``: an attribute of an attribute).
    """

    def build() -> nn.Module:
        target: Any = importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part)
        return target(*args, **kwargs)

    build.__qualname__ = f"{module}.{name}"
    return build


# --------------------------------------------------------------------------------------------
# Hand-built models and wrappers
# --------------------------------------------------------------------------------------------


class HandAttention(nn.Module):
    """Multi-head self-attention written out (projections, softmax, dropout)."""

    def __init__(self, dim: int, heads: int, p: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-2, -1)) * (d // self.heads) ** -0.5
        att = self.drop(att.softmax(dim=-1))
        return self.proj((att @ qkv[2]).transpose(1, 2).reshape(b, n, d))


class PreNormStack(nn.Module):
    """``depth`` pre-norm layers ``x + attn(ln(x))``, ``x + mlp(ln(x))``, then a final norm."""

    def __init__(self, dim: int = 16, depth: int = 3, heads: int = 2, p: float = 0.1) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * depth))
        self.attns = nn.ModuleList(HandAttention(dim, heads, p) for _ in range(depth))
        self.mlps = nn.ModuleList(
            nn.Sequential(
                nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(p), nn.Linear(2 * dim, dim)
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (attn, mlp) in enumerate(zip(self.attns, self.mlps, strict=True)):
            x = x + attn(self.norms[2 * i](x))
            x = x + F.dropout(mlp(self.norms[2 * i + 1](x)), 0.1, self.training)
        return self.norm(x)


def causal_mask(length: int) -> torch.Tensor:
    """Float mask, ``-inf`` above the diagonal."""
    return nn.Transformer.generate_square_subsequent_mask(length)


class EncoderWithMasks(nn.Module):
    """``nn.TransformerEncoder`` called with a float causal ``mask`` and a bool key padding mask."""

    def __init__(self, layers: int = 6, dim: int = 32, norm_first: bool = False) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            dim, 4, 2 * dim, dropout=0.1, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim))

    def forward(self, src: torch.Tensor, mask: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.encoder(src, mask=mask, src_key_padding_mask=padding)


def encoder_inputs(dim: int) -> Inputs:
    """Source vectors, a float causal mask, a bool padding mask (True: padding)."""

    def make(batch: int, length: int) -> tuple[torch.Tensor, ...]:
        padding = padding_mask(batch, length) == 0
        return torch.randn(batch, length, dim), causal_mask(length), padding

    return make


class DecoderWithMemory(nn.Module):
    """``nn.TransformerDecoder`` called with memory and a float causal ``tgt_mask``."""

    def __init__(self, layers: int = 4, dim: int = 32) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(dim, 4, 2 * dim, dropout=0.1, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.decoder(tgt, memory, tgt_mask=tgt_mask)


def decoder_inputs(dim: int) -> Inputs:
    """Target vectors, memory (5 positions), a float causal target mask."""

    def make(batch: int, length: int) -> tuple[torch.Tensor, ...]:
        return torch.randn(batch, length, dim), torch.randn(batch, 5, dim), causal_mask(length)

    return make


class TransformerWithMasks(nn.Module):
    """``nn.Transformer`` with a causal target mask and the source's key padding mask."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.transformer = nn.Transformer(
            dim, 4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=2 * dim,
            dropout=0.1, batch_first=True,
        )  # fmt: skip

    def forward(
        self, src: torch.Tensor, tgt: torch.Tensor, tgt_mask: torch.Tensor, padding: torch.Tensor
    ) -> torch.Tensor:
        return self.transformer(
            src, tgt, tgt_mask=tgt_mask, src_key_padding_mask=padding,
            memory_key_padding_mask=padding,
        )  # fmt: skip


def seq2seq_inputs(dim: int) -> Inputs:
    """Source, target (one shorter), causal target mask, source padding mask."""

    def make(batch: int, length: int) -> tuple[torch.Tensor, ...]:
        padding = padding_mask(batch, length) == 0
        tgt = torch.randn(batch, length - 1, dim)
        return torch.randn(batch, length, dim), tgt, causal_mask(length - 1), padding

    return make


# --------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lazy("torchvision.models", name, **kwargs)


def torchvision_specs() -> list[ModelSpec]:
    """torchvision's classification models (64x64 images unless said otherwise)."""
    img = images(64)
    small_maxvit = dict(
        input_size=(64, 64), stem_channels=16, partition_size=2, block_channels=[16, 32, 64, 64],
        block_layers=[2, 2, 5, 2], head_dim=8, stochastic_depth_prob=0.2, num_classes=10,
    )  # fmt: skip
    return [
        ModelSpec("torchvision/resnet18@32", _tv("resnet18", num_classes=10), images(32),
                  (2, 1, 1, 1), "BasicBlocks 2,2,2,2: relu(x + F(x)); the first block of "
                  "layer2-4 has a projection shortcut (stride 2, more channels)", quick=True,
                  batch=8, other_batch=5,
                  note="batch 8: train-mode BatchNorm over 2 samples of layer4 is ill-conditioned"),
        ModelSpec("torchvision/resnet18", _tv("resnet18"), img, (2, 1, 1, 1),
                  "BasicBlocks 2,2,2,2; first block of layer2-4 has a projection shortcut"),
        ModelSpec("torchvision/resnet34", _tv("resnet34"), img, (3, 3, 5, 2),
                  "BasicBlocks 3,4,6,3; first block of layer2-4 has a projection shortcut"),
        ModelSpec("torchvision/resnet50", _tv("resnet50"), img, (2, 3, 5, 2),
                  "Bottlenecks 3,4,6,3; the first of every stage projects (64->256 in layer1)"),
        ModelSpec("torchvision/resnext50_32x4d", _tv("resnext50_32x4d"), img, (2, 3, 5, 2),
                  "ResNet-50 layout with grouped 3x3 convolutions"),
        ModelSpec("torchvision/wide_resnet50_2", _tv("wide_resnet50_2"), img, (2, 3, 5, 2),
                  "ResNet-50 layout with wider bottlenecks"),
        ModelSpec("torchvision/mobilenet_v2", _tv("mobilenet_v2"), img, (1, 2, 3, 2, 2),
                  "inverted residuals x + F(x) when stride 1 and in == out: the repeats of "
                  "groups c=24 (n=2), 32 (3), 64 (4), 96 (3), 160 (3); 16 and 320 have n=1"),
        ModelSpec("torchvision/mobilenet_v3_small", _tv("mobilenet_v3_small"), img, (1, 2, 1, 2),
                  "bneck table: residual for 24->24, 40->40 x2, 48->48, 96->96 x2, "
                  "each run ended by a stride-2 or channel-changing block"),
        ModelSpec("torchvision/mobilenet_v3_large", _tv("mobilenet_v3_large"), img,
                  (1, 1, 2, 3, 1, 2),
                  "bneck table: residual for 16->16, 24->24, 40->40 x2, 80->80 x3, 112->112, "
                  "160->160 x2"),
        ModelSpec("torchvision/efficientnet_b0", _tv("efficientnet_b0"), img, (1, 1, 2, 2, 3),
                  "MBConv stages of 1,2,2,3,3,4,1 layers: all but the first layer of a stage "
                  "are x + drop_path(F(x))"),
        ModelSpec("torchvision/efficientnet_v2_s", _tv("efficientnet_v2_s"), img,
                  (2, 3, 3, 5, 8, 14),
                  "Fused-MBConv 2 (24->24, both residual), 4, 4, MBConv 6, 9, 15: all but "
                  "the first layer of stages 2-6"),
        ModelSpec("torchvision/convnext_tiny", _tv("convnext_tiny"), img, (3, 3, 9, 3),
                  "CNBlocks 3,3,9,3: x + drop_path(layer_scale * F(x)); downsampling between"),
        ModelSpec("torchvision/regnet_y_400mf", _tv("regnet_y_400mf"), img, (2, 5, 5),
                  "stage depths 1,3,6,6 (from w_0, w_a, w_m), relu(x + F(x)); the first "
                  "block of each stage projects"),
        ModelSpec("torchvision/regnet_x_400mf", _tv("regnet_x_400mf"), img, (1, 6, 11),
                  "stage depths 1,2,7,12; the first block of each stage projects"),
        ModelSpec("torchvision/vit_b_16", _tv("vit_b_16", image_size=64), img, (24,),
                  "12 pre-norm encoder blocks, x + attn(ln(x)) and x + mlp(ln(x)): one chain "
                  "of 24 (image_size=64: 16 patches and the class token)"),
        ModelSpec("torchvision/swin_t", _tv("swin_t"), img, (4, 4, 12, 4),
                  "Swin blocks 2,2,6,2, each x + attn(norm(x)) and x + mlp(norm(x)) on "
                  "(B, H, W, C); patch merging between stages"),
        ModelSpec("torchvision/swin_v2_t", _tv("swin_v2_t"), img, (4, 4, 12, 4),
                  "Swin V2 blocks 2,2,6,2 (res-post-norm: x + norm(attn(x))), two residuals "
                  "each"),
        ModelSpec("torchvision/maxvit_t(small)", _tv("maxvit.MaxVit", **small_maxvit),
                  img, (9, 9, 24, 9),
                  "maxvit_t's layers 2,2,5,2; each layer: MBConv (identity skip except the "
                  "stride-2 first of a stage), then window and grid attention, 2 residuals "
                  "each, between partition and departition permutes (no break): 4 + 5 per "
                  "further layer",
                  note="MaxVit(input_size=64, partition_size=2, channels 16-64, head_dim 8)"),
        ModelSpec("torchvision/shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5"), img, (),
                  "channel split, branch, concatenate and shuffle: no addition"),
        ModelSpec("torchvision/densenet121", _tv("densenet121"), img, (),
                  "dense blocks concatenate features: no residual addition"),
        ModelSpec("torchvision/vgg11", _tv("vgg11", num_classes=10), img, (),
                  "plain convolution stack: no residual"),
        ModelSpec("torchvision/googlenet", _tv("googlenet", aux_logits=False, init_weights=True),
                  img, (), "inception modules concatenate branches: no residual"),
        ModelSpec("torchvision/inception_v3",
                  _tv("inception_v3", aux_logits=False, init_weights=True), images(80), (),
                  "inception modules concatenate branches: no residual (80x80: the least it "
                  "takes)"),
        ModelSpec("torchvision/mnasnet0_5", _tv("mnasnet0_5"), img, (2, 2, 2, 1, 3),
                  "stacks of 3,3,3,2,4,1 inverted residuals; all but the first of a stack "
                  "add their input"),
        ModelSpec("torchvision/squeezenet1_1", _tv("squeezenet1_1"), img, (),
                  "fire modules concatenate: no residual"),
    ]  # fmt: skip


def torch_nn_specs() -> list[ModelSpec]:
    """torch.nn's transformer modules, called with masks, and a hand-built stack."""
    return [
        ModelSpec("torch.nn/TransformerEncoder(post-norm)", lambda: EncoderWithMasks(6),
                  encoder_inputs(32), (12,),
                  "6 post-norm layers, norm(x + sa(x)) and norm(x + ff(x)): one chain of 12 "
                  "generalized blocks (the final LayerNorm is outside)", other_length=11,
                  note="wrapper passes a float causal mask= and a bool src_key_padding_mask="),
        ModelSpec("torch.nn/TransformerEncoder(pre-norm)",
                  lambda: EncoderWithMasks(6, norm_first=True), encoder_inputs(32), (12,),
                  "6 pre-norm layers, x + sa(norm(x)) and x + ff(norm(x)): one chain of 12",
                  other_length=11,
                  note="norm_first=True; float causal mask= and bool src_key_padding_mask="),
        ModelSpec("torch.nn/TransformerEncoder(2 layers)",
                  lambda: EncoderWithMasks(2, dim=16), encoder_inputs(16), (4,),
                  "2 post-norm layers, 2 generalized blocks each", other_length=11, quick=True,
                  note="float causal mask= and bool src_key_padding_mask="),
        ModelSpec("torch.nn/TransformerDecoder", lambda: DecoderWithMemory(4),
                  decoder_inputs(32), (12,),
                  "4 post-norm layers of self-attention, cross-attention (memory as context) "
                  "and feed-forward: one chain of 12", other_length=11,
                  note="called with memory and a float causal tgt_mask="),
        ModelSpec("torch.nn/Transformer", TransformerWithMasks, seq2seq_inputs(32), (4, 6),
                  "2 encoder layers (2 blocks each), final norm, 2 decoder layers (3 each)",
                  other_length=11,
                  note="tgt_mask=, src_key_padding_mask= and memory_key_padding_mask="),
        ModelSpec("hand-built/pre-norm stack", PreNormStack, vectors(16), (6,),
                  "3 layers x + attn(ln(x)), x + dropout(mlp(ln(x))) written in one forward",
                  other_length=11, quick=True),
    ]  # fmt: skip


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lazy("timm", "create_model", name, pretrained=False, **kwargs)


def timm_specs() -> list[ModelSpec]:
    """timm models (``pretrained=False``; 64x64 images unless said otherwise)."""
    img = images(64)
    s64 = dict(img_size=64)
    repvit = (1, 5, 2, 5, 2, 4, 4, 4, 4, 4, 4, 5, 2, 3)
    return [
        ModelSpec("timm/resnet18", _timm("resnet18"), img, (2, 1, 1, 1),
                  "BasicBlocks 2,2,2,2, act(x + F(x)); first block of layer2-4 projects"),
        ModelSpec("timm/resnet50", _timm("resnet50"), img, (2, 3, 5, 2),
                  "Bottlenecks 3,4,6,3; the first of every stage projects"),
        ModelSpec("timm/resnetv2_50", _timm("resnetv2_50"), img, (2, 3, 5, 2),
                  "pre-activation bottlenecks 3,4,6,3 (x + F(norm(x))); the first of every "
                  "stage projects"),
        ModelSpec("timm/seresnext26d_32x4d", _timm("seresnext26d_32x4d"), img, (1, 1, 1, 1),
                  "SE-ResNeXt bottlenecks 2,2,2,2 (SE inside the branch); the first of every "
                  "stage projects"),
        ModelSpec("timm/res2net50_14w_8s", _timm("res2net50_14w_8s"), img, (2, 3, 5, 2),
                  "Res2Net bottlenecks 3,4,6,3 (the split-scale adds are inside the branch); "
                  "the first of every stage projects"),
        ModelSpec("timm/convnext_atto", _timm("convnext_atto"), img, (2, 2, 6, 2),
                  "ConvNeXt blocks 2,2,6,2, x + drop_path(gamma * F(x)); downsampling between"),
        ModelSpec("timm/convnextv2_atto", _timm("convnextv2_atto"), img, (2, 2, 6, 2),
                  "ConvNeXt-V2 blocks 2,2,6,2 (GRN in the branch, no layer scale)"),
        ModelSpec("timm/edgenext_xx_small", _timm("edgenext_xx_small"), img, (2, 2, 6, 2),
                  "stages of 2,2,6,2 blocks: conv encoders, and a split-transpose block last "
                  "in stages 2-4 whose outer residual contains the XCA residual"),
        ModelSpec("timm/vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", **s64), img, (24,),
                  "12 pre-norm blocks, x + attn(norm(x)) and x + mlp(norm(x)): one chain of 24"),
        ModelSpec("timm/deit_tiny_patch16_224", _timm("deit_tiny_patch16_224", **s64), img,
                  (24,), "12 pre-norm blocks like ViT"),
        ModelSpec("timm/deit_tiny_distilled_patch16_224",
                  _timm("deit_tiny_distilled_patch16_224", **s64), img, (24,),
                  "12 pre-norm blocks on class, distillation and patch tokens"),
        ModelSpec("timm/swin_tiny_patch4_window7_224",
                  _timm("swin_tiny_patch4_window7_224", **s64), img, (4, 4, 12, 4),
                  "Swin blocks 2,2,6,2 with two residuals each; the state is reshaped "
                  "(B,H,W,C) <-> (B,HW,C) between them (a view)"),
        ModelSpec("timm/swinv2_cr_tiny_ns_224", _timm("swinv2_cr_tiny_ns_224", **s64), img,
                  (4, 4, 12, 4),
                  "Swin-V2-CR blocks 2,2,6,2, x + norm(attn(x)), x + norm(mlp(x)) (views "
                  "between), a main-branch norm after the last block of a stage"),
        ModelSpec("timm/maxvit_rmlp_pico_rw_256", _timm("maxvit_rmlp_pico_rw_256", **s64), img,
                  (9, 9, 24, 9),
                  "MaxViT blocks 2,2,5,2: MBConv (identity skip except the strided first of a "
                  "stage, NCHW), permute, window and grid attention with 2 residuals each "
                  "(NHWC, partitioning inside the branch): 4 + 5 per further block"),
        ModelSpec("timm/coatnet_pico_rw_224", _timm("coatnet_pico_rw_224", **s64), img,
                  (1, 2, 9, 3),
                  "C,C,T,T stages of 2,3,5,2: MBConv stages lose their strided first block; "
                  "transformer stages lose the first attention residual (its skip "
                  "downsamples), keeping its MLP residual: 1+2*4 and 1+2*1"),
        ModelSpec("timm/levit_128s", _timm("levit_128s", **s64), img, (4, 7, 9),
                  "stages of 2,3,4 blocks with attention and MLP residuals; stages 2-3 start "
                  "with an attention downsampling followed by a residual MLP: 4, 1+6, 1+8"),
        ModelSpec("timm/hrnet_w18_small", _timm("hrnet_w18_small"), img, (2,) * 9,
                  "BasicBlocks, 2 per branch in stages 2-4 (2+3+4 branches); stage 1's single "
                  "bottleneck and the head's bottlenecks project"),
        ModelSpec("timm/hiera_tiny_224", _timm("hiera_tiny_224", **s64), img, (2, 3, 13, 3),
                  "blocks 1,2,7,2 with 2 residuals each; the first block of stages 2-4 pools "
                  "and projects its skip, so only its MLP residual counts: 2, 1+2, 1+12, 1+2"),
        ModelSpec("timm/efficientformer_l1", _timm("efficientformer_l1"), images(224),
                  (6, 4, 12, 8),
                  "MetaBlock2d stages 3,2,6,4 (pool and MLP residuals); the last block of stage "
                  "4 is a MetaBlock1d after a flatten and transpose (no break): 6, 4, 12, 8",
                  batch=2, other_batch=1, note="224x224: the attention bias is sized for 7x7"),
        ModelSpec("timm/poolformer_s12", _timm("poolformer_s12"), img, (4, 4, 12, 4),
                  "MetaFormer blocks 2,2,6,2 with layer scale and no res scale: 2 residuals "
                  "each"),
        ModelSpec("timm/poolformerv2_s12", _timm("poolformerv2_s12"), img, (4, 4),
                  "MetaFormer blocks 2,2,6,2; stages 3-4 scale the skip (res_scale * x + F(x)), "
                  "which is not an identity skip"),
        ModelSpec("timm/caformer_s18", _timm("caformer_s18"), img, (6, 6),
                  "blocks 3,3,9,3; stages 3-4 (attention) scale the skip (res_scale)"),
        ModelSpec("timm/mixer_s16_224", _timm("mixer_s16_224", **s64), img, (16,),
                  "8 Mixer blocks, token-mixing and channel-mixing residuals"),
        ModelSpec("timm/resmlp_12_224", _timm("resmlp_12_224", **s64), img, (24,),
                  "12 ResMLP blocks, two layer-scaled residuals each"),
        ModelSpec("timm/gmlp_ti16_224", _timm("gmlp_ti16_224", **s64), img, (30,),
                  "30 gMLP blocks, one residual each (spatial gating inside)"),
        ModelSpec("timm/cait_xxs24_224", _timm("cait_xxs24_224", **s64), img, (48, 4),
                  "24 LayerScale blocks (48 residuals); then 2 class-attention blocks whose "
                  "residuals update the class token, reading the patch tokens as context"),
        ModelSpec("timm/xcit_nano_12_p16_224", _timm("xcit_nano_12_p16_224", **s64), img,
                  (36, 1, 2, 1),
                  "12 XCA blocks, 3 residuals each (attention, local patch interaction, MLP); "
                  "2 class-attention blocks whose class-token norm (tokens_norm=False: norm of "
                  "x[:, :1] concatenated back) sits between their two residuals"),
        ModelSpec("timm/beit_base_patch16_224(small)",
                  _timm("beit_base_patch16_224", img_size=64, embed_dim=64, depth=4, num_heads=2),
                  img, (8,), "4 BEiT blocks with layer scale and relative position bias",
                  note="beit_base_patch16_224 with embed_dim=64, depth=4, num_heads=2"),
        ModelSpec("timm/eva02_tiny_patch14_224", _timm("eva02_tiny_patch14_224", img_size=56),
                  images(56), (24,), "12 EVA blocks (rotary embedding as context, SwiGLU)"),
        ModelSpec("timm/regnetz_b16", _timm("regnetz_b16"), img, (1, 5, 11, 1),
                  "bottlenecks 2,6,12,2 with identity shortcuts; the strided first block of a "
                  "stage has no shortcut at all (downsample='')"),
        ModelSpec("timm/dm_nfnet_f0", _timm("dm_nfnet_f0"), img, (1, 5, 2),
                  "normalizer-free blocks 1,2,6,3, x + alpha * F(beta * x); the first of every "
                  "stage downsamples its skip"),
        ModelSpec("timm/nf_resnet26", _timm("nf_resnet26"), img, (1, 1, 1, 1),
                  "normalizer-free bottlenecks 2,2,2,2; the first of every stage projects"),
        ModelSpec("timm/mobilevit_xxs", _timm("mobilevit_xxs"), img, (1, 2, 4, 8, 6),
                  "inverted residuals 16->16, 24->24 x2; MobileViT blocks (no outer residual: "
                  "concatenate and fuse) hold transformers of depth 2, 4, 3"),
        ModelSpec("timm/fastvit_t8", _timm("fastvit_t8"), img, (4, 4, 8, 4),
                  "RepMixer blocks 2,2,4,2: x + ls(mixer(x) - norm(x)) and x + ls(mlp(x))"),
        ModelSpec("timm/repvit_m0_9", _timm("repvit_m0_9"), img, repvit,
                  "blocks 2,2,14,2: token mixer bn(x + convs(x)), SE every other block (a "
                  "break), MLP residual; stage 2-4 downsamplers start with an SE-free block "
                  "and end with an MLP residual"),
        ModelSpec("timm/ghostnet_100", _timm("ghostnet_100"), img, (1, 1, 1, 3, 1, 4),
                  "ghost bottleneck table: identity skips for 16, 24, 40, 80 x3, 112, 160 x4"),
        ModelSpec("timm/efficientnet_b0", _timm("efficientnet_b0"), img, (1, 1, 2, 2, 3),
                  "MBConv stages 1,2,2,3,3,4,1: all but the first block of a stage have a skip"),
        ModelSpec("timm/mobilenetv3_large_100", _timm("mobilenetv3_large_100"), img,
                  (1, 1, 2, 3, 1, 2), "same block table as torchvision's mobilenet_v3_large"),
        ModelSpec("timm/regnety_002", _timm("regnety_002"), img, (3, 6),
                  "stage depths 1,1,4,7; the first block of a stage projects"),
        ModelSpec("timm/pit_ti_224", _timm("pit_ti_224", **s64), img, (4, 12, 8),
                  "transformer stages of 2,6,4 blocks, pooling between"),
        ModelSpec("timm/convmixer(small)",
                  lazy("timm.models.convmixer", "ConvMixer", dim=64, depth=8, kernel_size=5,
                       patch_size=8, num_classes=10),
                  img, (1,) * 8,
                  "8 blocks: Residual(depthwise conv) then a pointwise conv that is not one",
                  note="ConvMixer(dim=64, depth=8, kernel_size=5, patch_size=8)"),
        ModelSpec("timm/rexnet_100", _timm("rexnet_100"), img, (),
                  "the skip adds to the first in_channels of a wider output: no block keeps "
                  "its shape"),
        ModelSpec("timm/repvgg_a0", _timm("repvgg_a0"), img, (),
                  "the identity branch is a BatchNorm of x, not x"),
        ModelSpec("timm/lcnet_050", _timm("lcnet_050"), img, (),
                  "depthwise-separable blocks without skips"),
        ModelSpec("timm/ese_vovnet19b_dw", _timm("ese_vovnet19b_dw"), img, (),
                  "OSA modules concatenate; residual=False in this variant"),
        ModelSpec("timm/cspresnet50", _timm("cspresnet50"), img, (3, 3, 5, 2),
                  "cross-stage partial stages of 3,3,5,2 bottlenecks with identity skips on "
                  "half the channels"),
        ModelSpec("timm/starnet_s1", _timm("starnet_s1"), img, (2, 2, 8, 3),
                  "star blocks 2,2,8,3, x + drop_path(F(x)); downsampling between"),
        ModelSpec("timm/mambaout_femto", _timm("mambaout_femto"), img, (3, 3, 9, 3),
                  "gated CNN blocks 3,3,9,3 on NHWC"),
        ModelSpec("timm/pvt_v2_b0", _timm("pvt_v2_b0"), img, (4, 4, 4, 4),
                  "PVT-v2 blocks 2,2,2,2 with attention and MLP residuals (feature size as a "
                  "Python argument)"),
        ModelSpec("timm/efficientvit_b0", _timm("efficientvit_b0"), img, (1, 1, 1, 4, 4),
                  "stem residual block, MBConv stages of depth 2 (one residual after the "
                  "strided block), ViT stages of 2 blocks with context and local residuals"),
        ModelSpec("timm/fasternet_t0", _timm("fasternet_t0"), img, (1, 2, 8, 2),
                  "FasterNet blocks 1,2,8,2 (partial conv then MLP, one residual)"),
        ModelSpec("timm/densenet121", _timm("densenet121"), img, (),
                  "dense blocks concatenate: no residual addition"),
    ]  # fmt: skip


def _hf(config: str, model: str, **kwargs: Any) -> Callable[[], nn.Module]:
    """A builder of ``transformers.<model>(transformers.<config>(**kwargs))``."""

    def build() -> nn.Module:
        transformers = importlib.import_module("transformers")
        transformers.logging.set_verbosity_error()
        return getattr(transformers, model)(getattr(transformers, config)(**kwargs))

    build.__qualname__ = f"transformers.{model}"
    return build


def _whisper_encoder() -> nn.Module:
    transformers = importlib.import_module("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.WhisperConfig(
        vocab_size=99, num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
        max_source_positions=16, max_target_positions=32,
    )  # fmt: skip
    module = importlib.import_module("transformers.models.whisper.modeling_whisper")
    return module.WhisperEncoder(config)


def audio(samples: int | None = None, mels: int | None = None) -> Inputs:
    """Raw audio ``(batch, samples)`` (``length`` samples when None), or log-mel features."""

    def make(batch: int, length: int) -> tuple[torch.Tensor]:
        if mels is not None:
            return (torch.randn(batch, mels, samples or length),)
        return (torch.randn(batch, samples or length),)

    return make


#: Small text-model sizes: 3 layers, width 32, 4 heads, feed-forward 64, vocabulary 99.
TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)  # fmt: skip
DECODER = dict(TEXT, num_key_value_heads=2, use_cache=False)
VISION = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
              image_size=32, patch_size=8)  # fmt: skip
SEQ2SEQ = dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
               decoder_ffn_dim=64, max_position_embeddings=64, use_cache=False)  # fmt: skip
GPT2 = dict(vocab_size=99, n_embd=32, n_layer=3, n_head=4, n_positions=64, use_cache=False)


def hf_specs() -> list[ModelSpec]:
    """Hugging Face transformers models from small configs, called as users call them."""
    ids, ids_gap = token_ids(), token_ids(gap=1)
    seq = dict(length=8, other_length=11)
    img32 = images(32)
    t5 = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
              use_cache=False)  # fmt: skip
    return [
        ModelSpec("hf/BertModel", _hf("BertConfig", "BertModel", **TEXT), ids, (6,),
                  "3 post-norm layers, LN(x + attn(x)) and LN(x + ffn(x)): one chain of 6 "
                  "generalized blocks", **seq),
        ModelSpec("hf/RobertaModel", _hf("RobertaConfig", "RobertaModel", **TEXT), ids, (6,),
                  "BERT's layers (post-norm), 3 layers", **seq),
        ModelSpec("hf/DistilBertModel",
                  _hf("DistilBertConfig", "DistilBertModel", vocab_size=99, dim=32, n_layers=3,
                      n_heads=4, hidden_dim=64, max_position_embeddings=64),
                  ids, (6,), "3 post-norm blocks, sa_layer_norm(x + sa(x)) and "
                  "output_layer_norm(x + ffn(x))", **seq),
        ModelSpec("hf/AlbertModel",
                  _hf("AlbertConfig", "AlbertModel", embedding_size=16, **TEXT), ids, (6,),
                  "one shared post-norm layer applied 3 times: 6 generalized blocks (shared "
                  "weights)", **seq),
        ModelSpec("hf/ElectraModel",
                  _hf("ElectraConfig", "ElectraModel", embedding_size=16, **TEXT), ids, (6,),
                  "BERT's layers after an embedding projection, 3 layers", **seq),
        ModelSpec("hf/DebertaV2Model",
                  _hf("DebertaV2Config", "DebertaV2Model", relative_attention=True,
                      position_buckets=16, pos_att_type=["p2c", "c2p"],
                      position_biased_input=False, norm_rel_ebd="layer_norm", **TEXT),
                  ids, (6,), "3 post-norm layers; relative embeddings computed once by the "
                  "encoder are context of every attention", **seq,
                  note="DeBERTa-v3 style: relative attention, p2c and c2p"),
        ModelSpec("hf/GPT2Model", _hf("GPT2Config", "GPT2Model", **GPT2), ids_gap, (6,),
                  "3 pre-norm layers, x + attn(ln_1(x)) and x + mlp(ln_2(x))", **seq,
                  note="called as model(input_ids, None, attention_mask): the cache is second"),
        ModelSpec("hf/GPTNeoModel",
                  _hf("GPTNeoConfig", "GPTNeoModel", vocab_size=99, hidden_size=32, num_layers=2,
                      attention_types=[[["global", "local"], 1]], num_heads=4,
                      intermediate_size=64, max_position_embeddings=64, window_size=4,
                      use_cache=False),
                  ids_gap, (4,), "2 pre-norm layers (global then local attention)", **seq,
                  note="model(input_ids, None, attention_mask)"),
        ModelSpec("hf/GPTJModel",
                  _hf("GPTJConfig", "GPTJModel", rotary_dim=4, **GPT2), ids_gap, (3,),
                  "3 parallel layers, x + attn(ln(x)) + mlp(ln(x)): one residual each", **seq,
                  note="model(input_ids, None, attention_mask)"),
        ModelSpec("hf/GPTNeoXModel",
                  _hf("GPTNeoXConfig", "GPTNeoXModel", **dict(TEXT, use_cache=False)), ids,
                  (3,), "3 layers with use_parallel_residual=True: x + attn(ln1(x)) + "
                  "mlp(ln2(x)), one residual each", **seq),
        ModelSpec("hf/OPTModel",
                  _hf("OPTConfig", "OPTModel", vocab_size=99, hidden_size=32,
                      num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                      max_position_embeddings=64, word_embed_proj_dim=32, use_cache=False),
                  ids, (6,), "3 pre-norm layers, 2 residuals each (the MLP residual on a "
                  "(B*T, D) view of the state)", **seq),
        ModelSpec("hf/LlamaModel", _hf("LlamaConfig", "LlamaModel", **DECODER), ids, (6,),
                  "3 pre-norm layers (RMSNorm, rotary embeddings as context, GQA)", **seq),
        ModelSpec("hf/LlamaForCausalLM", _hf("LlamaConfig", "LlamaForCausalLM", **DECODER), ids,
                  (6,), "LlamaModel's 3 layers under a language-model head", **seq),
        ModelSpec("hf/MistralModel",
                  _hf("MistralConfig", "MistralModel", sliding_window=4, **DECODER), ids, (6,),
                  "3 pre-norm layers, sliding-window attention", **seq),
        ModelSpec("hf/MixtralModel",
                  _hf("MixtralConfig", "MixtralModel", num_local_experts=4,
                      num_experts_per_tok=2, **DECODER),
                  ids, (6,), "3 pre-norm layers whose MLP is a top-2 mixture of 4 experts",
                  **seq, note="default experts implementation (grouped_mm: no float64)"),
        ModelSpec("hf/MixtralModel(eager experts)",
                  _hf("MixtralConfig", "MixtralModel", num_local_experts=4,
                      num_experts_per_tok=2, experts_implementation="eager", **DECODER),
                  ids, (6,), "as MixtralModel", **seq,
                  note="experts_implementation='eager', which runs in float64"),
        ModelSpec("hf/Qwen2Model", _hf("Qwen2Config", "Qwen2Model", **DECODER), ids, (6,),
                  "3 pre-norm layers like Llama (biased q/k/v)", **seq),
        ModelSpec("hf/Qwen3Model", _hf("Qwen3Config", "Qwen3Model", head_dim=8, **DECODER),
                  ids, (6,), "3 pre-norm layers like Llama (q/k norms)", **seq),
        ModelSpec("hf/GemmaModel", _hf("GemmaConfig", "GemmaModel", head_dim=8, **DECODER),
                  ids, (6,), "3 pre-norm layers (RMSNorm with 1 + weight, scaled embeddings)",
                  **seq),
        ModelSpec("hf/Gemma2Model",
                  _hf("Gemma2Config", "Gemma2Model", head_dim=8, sliding_window=4, **DECODER),
                  ids, (6,), "3 layers, x + post_norm(attn(pre_norm(x))) and the same with "
                  "the MLP: pure residuals", **seq),
        ModelSpec("hf/PhiModel",
                  _hf("PhiConfig", "PhiModel", partial_rotary_factor=0.5,
                      **dict(TEXT, use_cache=False)),
                  ids, (3,), "3 parallel layers, x + attn(ln(x)) + mlp(ln(x))", **seq),
        ModelSpec("hf/Phi3Model",
                  _hf("Phi3Config", "Phi3Model", pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, **DECODER),
                  ids, (6,), "3 pre-norm layers, 2 residuals each", **seq),
        ModelSpec("hf/FalconModel",
                  _hf("FalconConfig", "FalconModel", vocab_size=99, hidden_size=32,
                      num_hidden_layers=3, num_attention_heads=4, use_cache=False),
                  ids_gap, (3,), "3 layers with parallel attention (the default): "
                  "dropout_add(attn + mlp, x)", **seq,
                  note="model(input_ids, None, attention_mask)"),
        ModelSpec("hf/BloomModel",
                  _hf("BloomConfig", "BloomModel", vocab_size=99, hidden_size=32, n_layer=3,
                      n_head=4, use_cache=False),
                  ids_gap, (6,), "3 pre-norm layers; the residual is added inside the "
                  "attention and MLP modules (passed in as an argument); ALiBi as context",
                  **seq, note="model(input_ids, None, attention_mask)"),
        ModelSpec("hf/T5Model", _hf("T5Config", "T5Model", **t5), token_ids(decoder=True),
                  (6, 9), "3 encoder layers, x + attn(ln(x)) and x + ff(ln(x)); 3 decoder "
                  "layers with cross-attention: 3 residuals each. The relative position bias "
                  "depends on the length only (context)", **seq,
                  note="model(input_ids, attention_mask, decoder_input_ids)"),
        ModelSpec("hf/T5EncoderModel", _hf("T5Config", "T5EncoderModel", **t5), ids, (6,),
                  "T5's 3 encoder layers, 2 pre-norm residuals each", **seq),
        ModelSpec("hf/BartModel", _hf("BartConfig", "BartModel", **SEQ2SEQ),
                  token_ids(decoder=True), (4, 6),
                  "2 post-norm encoder layers (2 generalized blocks each), 2 decoder layers "
                  "(3 each)", **seq, note="model(input_ids, attention_mask, decoder_input_ids)"),
        ModelSpec("hf/MBartModel", _hf("MBartConfig", "MBartModel", **SEQ2SEQ),
                  token_ids(decoder=True), (4, 6),
                  "2 pre-norm encoder layers (2 each), 2 pre-norm decoder layers (3 each)",
                  **seq, note="model(input_ids, attention_mask, decoder_input_ids)"),
        ModelSpec("hf/WhisperEncoder", _whisper_encoder, audio(32, mels=16), (4,),
                  "2 pre-norm encoder layers, 2 residuals each", length=32, other_length=32,
                  note="input features of the fixed length 2 * max_source_positions"),
        ModelSpec("hf/ViTModel",
                  _hf("ViTConfig", "ViTModel", hidden_dropout_prob=0.1, **VISION), img32, (6,),
                  "3 pre-norm layers, 2 residuals each"),
        ModelSpec("hf/DeiTModel", _hf("DeiTConfig", "DeiTModel", **VISION), img32, (6,),
                  "ViT's 3 pre-norm layers (class and distillation tokens)"),
        ModelSpec("hf/BeitModel",
                  _hf("BeitConfig", "BeitModel", use_relative_position_bias=True, **VISION),
                  img32, (6,), "3 pre-norm layers with layer scale (lambda_1, lambda_2) and a "
                  "relative position bias per layer",
                  note="use_relative_position_bias=True (as BEiT checkpoints have it)"),
        ModelSpec("hf/Dinov2Model",
                  _hf("Dinov2Config", "Dinov2Model", hidden_size=32, num_hidden_layers=3,
                      num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=8),
                  img32, (6,), "3 pre-norm layers with layer scale"),
        ModelSpec("hf/SwinModel",
                  _hf("SwinConfig", "SwinModel", image_size=32, patch_size=2, embed_dim=16,
                      depths=[2, 2], num_heads=[2, 4], window_size=4),
                  img32, (4, 4), "stages of 2 Swin layers, 2 residuals each on (B, L, C); "
                  "patch merging between"),
        ModelSpec("hf/ConvNextModel",
                  _hf("ConvNextConfig", "ConvNextModel", hidden_sizes=[16, 32, 64],
                      depths=[2, 2, 2], num_stages=3),
                  img32, (2, 2, 2), "stages of 2 ConvNeXt layers, x + drop_path(ls * F(x))"),
        ModelSpec("hf/ConvNextV2Model",
                  _hf("ConvNextV2Config", "ConvNextV2Model", hidden_sizes=[16, 32, 64],
                      depths=[2, 2, 2], num_stages=3),
                  img32, (2, 2, 2), "stages of 2 ConvNeXt-V2 layers (GRN)"),
        ModelSpec("hf/ResNetModel",
                  _hf("ResNetConfig", "ResNetModel", embedding_size=16,
                      hidden_sizes=[32, 64, 128], depths=[2, 3, 2], layer_type="bottleneck"),
                  img32, (1, 2, 1), "bottleneck stages of 2,3,2 layers; the first of every "
                  "stage has a projection shortcut (16->32 channels in the first)"),
        ModelSpec("hf/MambaModel",
                  _hf("MambaConfig", "MambaModel", vocab_size=99, hidden_size=32, state_size=8,
                      num_hidden_layers=3, expand=2, conv_kernel=4, use_cache=False),
                  token_ids(mask=False), (3,),
                  "3 blocks, x + mixer(norm(x)) (residual_in_fp32=True: the skip is "
                  "x.to(float32), the identity in float32)", **seq,
                  note="model(input_ids); the slow (non-CUDA) selective scan"),
        ModelSpec("hf/CLIPVisionModel",
                  _hf("CLIPVisionConfig", "CLIPVisionModel", hidden_size=32,
                      num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                      image_size=32, patch_size=8),
                  img32, (6,), "pre_layrnorm, then 3 pre-norm layers, 2 residuals each"),
        ModelSpec("hf/CLIPTextModel",
                  _hf("CLIPTextConfig", "CLIPTextModel", **TEXT), ids, (6,),
                  "3 pre-norm layers (causal and padding masks as context)", **seq),
        ModelSpec("hf/Wav2Vec2Model",
                  _hf("Wav2Vec2Config", "Wav2Vec2Model", hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
                      conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=4),
                  audio(), (5,), "encoder: x + pos_conv(x) then norm (generalized), then 2 "
                  "post-norm layers, 2 generalized blocks each", length=400, other_length=480,
                  note="raw audio, no attention mask (group-norm feature extractor); "
                  "layerdrop 0.1 and SpecAugment (mask_time_prob 0.05) as configured"),
        ModelSpec("hf/SegformerModel",
                  _hf("SegformerConfig", "SegformerModel", depths=[2, 2, 2, 2],
                      hidden_sizes=[8, 16, 32, 64], num_attention_heads=[1, 1, 2, 2],
                      decoder_hidden_size=32),
                  images(64), (4, 4, 4, 4),
                  "4 stages of 2 layers (efficient attention, Mix-FFN), 2 residuals each; "
                  "overlapping patch embeddings between"),
    ]  # fmt: skip


def vit_pytorch_specs() -> list[ModelSpec]:
    """lucidrains' vit-pytorch (einops inside)."""
    vit = lazy(
        "vit_pytorch", "ViT", image_size=32, patch_size=8, num_classes=10, dim=32, depth=4,
        heads=2, mlp_dim=64, dropout=0.1, emb_dropout=0.1,
    )  # fmt: skip
    return [
        ModelSpec("vit-pytorch/ViT", vit, images(32), (8,),
                  "Transformer of depth 4: x = attn(x) + x; x = ff(x) + x (norms inside)"),
    ]  # fmt: skip


def zoo() -> list[ModelSpec]:
    """Every model of the sweep, in table order."""
    return [
        *torchvision_specs(), *torch_nn_specs(), *timm_specs(), *hf_specs(), *vit_pytorch_specs(),
    ]  # fmt: skip


def select_specs(
    only: str | None = None, quick: bool = False, exact: str | None = None
) -> list[ModelSpec]:
    """The specs to run.

    Parameters
    ----------
    only : str, optional
        Keep the models whose name contains it (case-insensitive; several separated by commas).
    quick : bool
        Keep the ``--quick`` models.
    exact : str, optional
        Keep only the model of this exact name.
    """
    specs = zoo()
    if exact is not None:
        return [s for s in specs if s.name == exact]
    if quick:
        specs = [s for s in specs if s.quick]
    if only:
        words = [w.strip().lower() for w in only.split(",") if w.strip()]
        specs = [s for s in specs if any(w in s.name.lower() for w in words)]
    return specs
