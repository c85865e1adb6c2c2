"""torch's own transformer stacks called as users call them: a float causal mask and a bool
key padding mask, memory, a wrapper module whose ``forward`` calls the stack.

``nn.TransformerEncoder`` and ``nn.TransformerDecoder`` test their masks in Python: the mask's
dtype (``F._none_or_dtype``), whether it is causal (``_detect_is_causal_mask``, from its
values). Traced shape-aware, the stack is one graph: every residual of every layer is one
chain. A causal example mask makes the graph take the causal kernel, checked at run time.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_gamma_zero_exact, assert_reversible_gradients, block_counts
from torch import nn

import fxmomentum


def causal(n: int) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(n)


def padding(batch: int, n: int) -> torch.Tensor:
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask[1:, n - 2 :] = True
    return mask


class Encoder(nn.Module):
    def __init__(self, layers: int = 3, norm_first: bool = False) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.1, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(
            layer, layers, norm=nn.LayerNorm(16), enable_nested_tensor=False
        )

    def forward(self, src, mask, pad):
        return self.encoder(src, mask=mask, src_key_padding_mask=pad)


class Decoder(nn.Module):
    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)

    def forward(self, tgt, memory, tgt_mask):
        return self.decoder(tgt, memory, tgt_mask=tgt_mask)


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Transformer(
            16, 2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32,
            dropout=0.1, batch_first=True,
        )  # fmt: skip

    def forward(self, src, tgt, tgt_mask, pad):
        return self.transformer(
            src, tgt, tgt_mask=tgt_mask, src_key_padding_mask=pad, memory_key_padding_mask=pad
        )


def encoder_inputs(batch: int = 2, n: int = 6):
    return torch.randn(batch, n, 16), causal(n), padding(batch, n)


def decoder_inputs(batch: int = 2, n: int = 6):
    return torch.randn(batch, n, 16), torch.randn(batch, 4, 16), causal(n)


def seq2seq_inputs(batch: int = 2, n: int = 6):
    src, tgt = torch.randn(batch, n, 16), torch.randn(batch, n - 1, 16)
    return src, tgt, causal(n - 1), padding(batch, n)


CASES = {
    # Two residuals per layer (post-norm: generalized), the loop in TransformerEncoder.forward.
    "encoder": (lambda: Encoder(3), encoder_inputs, [6]),
    "encoder_pre_norm": (lambda: Encoder(3, norm_first=True), encoder_inputs, [6]),
    # Three per decoder layer (self-attention, cross-attention, feed-forward).
    "decoder": (lambda: Decoder(3), decoder_inputs, [9]),
    # nn.Transformer itself: its encoder's chain, then its decoder's (memory is between).
    "transformer": (Seq2Seq, seq2seq_inputs, [4, 6]),
}


def build(name: str):
    make, inputs, expected = CASES[name]
    torch.manual_seed(0)
    return make(), inputs(), expected


@pytest.mark.parametrize("name", list(CASES))
def test_every_layer_of_the_stack_is_one_chain(name):
    model, inputs, expected = build(name)
    assert block_counts(model, inputs) == expected


@pytest.mark.parametrize("name", list(CASES))
def test_gamma_zero_is_the_stack_bit_for_bit(name):
    model, inputs, _ = build(name)
    assert_gamma_zero_exact(model, inputs)


@pytest.mark.parametrize("name", list(CASES))
def test_reversible_gradients_equal_backprop_s(name):
    model, inputs, _ = build(name)
    assert_reversible_gradients(model, inputs)


def test_other_lengths_with_a_causal_mask_and_a_clear_error_for_another_mask():
    model, inputs, _ = build("decoder")
    model.eval()
    out = fxmomentum.convert(model, 0.0, use_backprop=True, example_inputs=inputs)
    out.eval()
    other = decoder_inputs(3, 9)
    with torch.no_grad():
        assert torch.equal(out(*other), model(*other))
    # With a causal example mask the graph takes the causal kernel, which leaves the mask
    # aside: a mask that is not causal is refused, not ignored.
    tgt, memory, _ = other
    band = torch.zeros(9, 9).masked_fill(torch.ones(9, 9, dtype=torch.bool).tril(-3), -torch.inf)
    with pytest.raises(AssertionError, match="is causal"):
        out(tgt, memory, band + causal(9))
    report = fxmomentum.inspect(model, inputs)
    assert any("is_causal hint" in note for note in report.notes)


def test_a_mask_that_is_not_causal_is_applied_as_given_and_serves_every_mask():
    model, _, _ = build("decoder")
    model.eval()
    tgt, memory, _ = decoder_inputs()
    band = torch.zeros(6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).tril(-2), -torch.inf)
    out = fxmomentum.convert(model, 0.0, use_backprop=True, example_inputs=(tgt, memory, band))
    out.eval()
    for mask in (band, causal(6), torch.zeros(6, 6)):
        with torch.no_grad():
            assert torch.allclose(out(tgt, memory, mask), model(tgt, memory, mask), atol=1e-6)
