"""The residual blocks inside layers whose code torch.fx cannot trace.

``nn.TransformerEncoderLayer`` computes ``x + sa(x)`` then ``x + ff(x)`` (pre-norm), or the same
with a LayerNorm after each add (post-norm); ``nn.TransformerDecoderLayer`` adds a cross-attention
block on ``memory``. Their ``forward`` is full of fast-path checks that symbolic tracing cannot
get through, yet they are two or three residual blocks each. :func:`split_layer` gives those
blocks, so that a chain recomputes one residual block at a time, and so that ``gamma = 0``
reproduces the layer's own arithmetic exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerSplit", "SubBlock", "split_layer"]


class SubBlock:
    """One residual block inside a layer.

    Parameters
    ----------
    layer : nn.Module
        The layer the block belongs to.
    fn : callable
        ``fn(layer, x, *args, **kwargs)``: the residual branch ``f(x)`` (``residual=True``) or the
        block's whole output (``residual=False``).
    residual : bool
        Whether ``fn`` gives ``f(x)`` itself.
    module_names : sequence of str
        The layer's submodules the block uses (their parameters get gradients, their buffers
        are protected during recomputation).
    """

    def __init__(
        self,
        layer: nn.Module,
        fn: Callable[..., torch.Tensor],
        residual: bool,
        module_names: Sequence[str],
    ) -> None:
        self.layer, self.fn, self.residual = layer, fn, residual
        self.module_names = [
            n for n in module_names if isinstance(getattr(layer, n, None), nn.Module)
        ]

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.fn(self.layer, x, *args, **kwargs)

    def _modules(self) -> list[nn.Module]:
        return [getattr(self.layer, n) for n in self.module_names]

    def parameters(self) -> Iterator[nn.Parameter]:
        seen: set[int] = set()
        for m in self._modules():
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def buffers(self) -> Iterator[torch.Tensor]:
        for m in self._modules():
            yield from m.buffers()


class LayerSplit:
    """A layer's residual blocks and how a call's arguments reach each of them."""

    def __init__(self, blocks: list[SubBlock], arguments: Callable[..., list[tuple[tuple, dict]]]):
        self.blocks = blocks
        self._arguments = arguments

    def arguments(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> list[tuple[tuple, dict]]:
        """Per block, its ``(args, kwargs)`` after ``x``, for ``layer(x, *args, **kwargs)``."""
        return self._arguments(x, *args, **kwargs)


def _act_names(layer: nn.Module) -> list[str]:
    return ["activation"] if isinstance(getattr(layer, "activation", None), nn.Module) else []


# -- nn.TransformerEncoderLayer ---------------------------------------------------------------
def _enc_sa_pre(layer, x, mask, kpm, is_causal):
    return layer._sa_block(layer.norm1(x), mask, kpm, is_causal=is_causal)


def _enc_ff_pre(layer, x):
    return layer._ff_block(layer.norm2(x))


def _enc_sa_post(layer, x, mask, kpm, is_causal):
    return layer.norm1(x + layer._sa_block(x, mask, kpm, is_causal=is_causal))


def _enc_ff_post(layer, x):
    return layer.norm2(x + layer._ff_block(x))


def _split_encoder_layer(layer: nn.TransformerEncoderLayer) -> LayerSplit:
    pre = layer.norm_first
    ff_modules = ["linear1", "dropout", "linear2", "norm2", "dropout2", *_act_names(layer)]
    blocks = [
        SubBlock(
            layer, _enc_sa_pre if pre else _enc_sa_post, pre, ["self_attn", "norm1", "dropout1"]
        ),
        SubBlock(layer, _enc_ff_pre if pre else _enc_ff_post, pre, ff_modules),
    ]

    def arguments(src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        # As nn.TransformerEncoderLayer.forward canonicalises them.
        kpm = F._canonical_mask(
            mask=src_key_padding_mask,
            mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(src_mask),
            other_name="src_mask",
            target_type=src.dtype,
        )
        mask = F._canonical_mask(
            mask=src_mask,
            mask_name="src_mask",
            other_type=None,
            other_name="",
            target_type=src.dtype,
            check_other=False,
        )
        return [((mask, kpm, is_causal), {}), ((), {})]

    return LayerSplit(blocks, arguments)


# -- nn.TransformerDecoderLayer ---------------------------------------------------------------
def _dec_sa_pre(layer, x, mask, kpm, is_causal):
    return layer._sa_block(layer.norm1(x), mask, kpm, is_causal)


def _dec_mha_pre(layer, x, memory, mask, kpm, is_causal):
    return layer._mha_block(layer.norm2(x), memory, mask, kpm, is_causal)


def _dec_ff_pre(layer, x):
    return layer._ff_block(layer.norm3(x))


def _dec_sa_post(layer, x, mask, kpm, is_causal):
    return layer.norm1(x + layer._sa_block(x, mask, kpm, is_causal))


def _dec_mha_post(layer, x, memory, mask, kpm, is_causal):
    return layer.norm2(x + layer._mha_block(x, memory, mask, kpm, is_causal))


def _dec_ff_post(layer, x):
    return layer.norm3(x + layer._ff_block(x))


def _split_decoder_layer(layer: nn.TransformerDecoderLayer) -> LayerSplit:
    pre = layer.norm_first
    ff_modules = ["linear1", "dropout", "linear2", "norm3", "dropout3", *_act_names(layer)]
    blocks = [
        SubBlock(
            layer, _dec_sa_pre if pre else _dec_sa_post, pre, ["self_attn", "norm1", "dropout1"]
        ),
        SubBlock(
            layer,
            _dec_mha_pre if pre else _dec_mha_post,
            pre,
            ["multihead_attn", "norm2", "dropout2"],
        ),
        SubBlock(layer, _dec_ff_pre if pre else _dec_ff_post, pre, ff_modules),
    ]

    def arguments(
        tgt,
        memory,
        tgt_mask=None,
        memory_mask=None,
        tgt_key_padding_mask=None,
        memory_key_padding_mask=None,
        tgt_is_causal=False,
        memory_is_causal=False,
    ):
        return [
            ((tgt_mask, tgt_key_padding_mask, tgt_is_causal), {}),
            ((memory, memory_mask, memory_key_padding_mask, memory_is_causal), {}),
            ((), {}),
        ]

    return LayerSplit(blocks, arguments)


_SPLITTERS: dict[type, Callable[[Any], LayerSplit]] = {
    nn.TransformerEncoderLayer: _split_encoder_layer,
    nn.TransformerDecoderLayer: _split_decoder_layer,
}


def split_layer(layer: nn.Module, base: type | None = None) -> LayerSplit | None:
    """The residual blocks of a known layer type, or ``None``.

    Parameters
    ----------
    layer : nn.Module
        The layer.
    base : type, optional
        The class whose ``forward`` the layer runs (when its class was swapped).

    Examples
    --------
    >>> layer = nn.TransformerEncoderLayer(16, 2, 32, norm_first=True)
    >>> split = split_layer(layer)
    >>> len(split.blocks), [b.residual for b in split.blocks]
    (2, [True, True])
    """
    cls = base or type(layer)
    # Exact types only: a subclass may have overridden forward.
    splitter = _SPLITTERS.get(cls)
    return splitter(layer) if splitter is not None else None
