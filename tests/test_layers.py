"""torch's transformer layers as two or three residual blocks each."""

from __future__ import annotations

import pytest
import torch
from conftest import max_rel_err, rel_err
from torch import nn

from fxmomentum import transform_to_momentumnet
from fxmomentum.official.layers import split_layer


def weighted_loss(out: torch.Tensor) -> torch.Tensor:
    w = torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    return (out * w).sum()


def run(model, *inputs, **kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks in every run
    out = model(*inputs, **kwargs)
    weighted_loss(out).backward()
    return out, [p.grad for p in model.parameters()]


def convert(model, path, gamma, use_backprop):
    return transform_to_momentumnet(
        model,
        sub_layers=[path],
        keep_first_layer=False,
        gamma=gamma,
        use_backprop=use_backprop,
        split_layers=True,
    ).train()


def check(model, path, *inputs, **kwargs):
    """gamma = 0 is the original; reversible gradients equal backprop's (float64)."""
    model.train()
    out, _ = run(model, *inputs, **kwargs)
    out0, _ = run(convert(model, path, 0.0, True), *inputs, **kwargs)
    assert rel_err(out0, out) == 0.0
    out_bp, g_bp = run(convert(model, path, 0.9, True), *inputs, **kwargs)
    out_rev, g_rev = run(convert(model, path, 0.9, False), *inputs, **kwargs)
    assert rel_err(out_rev, out_bp) < 1e-10
    assert max_rel_err(g_rev, g_bp) < 1e-9


@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_six_layers_are_one_chain_of_twelve_blocks(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).double()
    m = convert(enc, "layers", 0.9, False)
    chain = m.layers[0].__dict__["_momentum_chain"]
    assert len(chain.blocks) == 12
    assert chain.residual == [norm_first] * 12
    src = torch.randn(9, 3, 32, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(9, dtype=torch.float64)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[2, 6:] = True
    check(enc, "layers", src, mask=mask, src_key_padding_mask=pad)


def test_decoder_four_layers_are_one_chain_of_twelve_blocks():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.1)
    dec = nn.TransformerDecoder(layer, 4).double()
    m = convert(dec, "layers", 0.9, False)
    assert len(m.layers[0].__dict__["_momentum_chain"].blocks) == 12
    tgt = torch.randn(7, 2, 32, dtype=torch.float64)
    memory = torch.randn(5, 2, 32, dtype=torch.float64, requires_grad=True)
    mask = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    check(dec, "layers", tgt, memory, tgt_mask=mask)


def test_memory_gets_its_gradient_from_every_cross_attention_block():
    torch.manual_seed(0)
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0), 3).double()
    tgt = torch.randn(4, 2, 16, dtype=torch.float64)
    grads = []
    for use_backprop in (True, False):
        memory = torch.randn(
            5, 2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
        memory.requires_grad_(True)
        weighted_loss(convert(dec, "layers", 0.8, use_backprop)(tgt, memory)).backward()
        grads.append(memory.grad)
    assert grads[1].abs().sum() > 0
    assert rel_err(grads[1], grads[0]) < 1e-10


def test_sequential_of_encoder_layers():
    torch.manual_seed(0)
    stack = nn.Sequential(
        *[nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, norm_first=True) for _ in range(4)]
    ).double()
    wrapper = nn.Sequential(stack)  # the usual way of stacking layers, one level down
    m = convert(wrapper, "0", 0.9, False)
    assert len(m[0][0].__dict__["_momentum_chain"].blocks) == 8
    check(wrapper, "0", torch.randn(6, 2, 32, dtype=torch.float64))


def test_split_layer_only_for_exact_known_types():
    class MyLayer(nn.TransformerEncoderLayer):
        def forward(self, src, *args, **kwargs):
            return super().forward(src, *args, **kwargs) * 2

    assert split_layer(MyLayer(8, 2, 16)) is None
    assert split_layer(nn.Linear(2, 2)) is None
    assert len(split_layer(nn.TransformerDecoderLayer(8, 2, 16)).blocks) == 3
