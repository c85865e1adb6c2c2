"""Hugging Face transformers and timm models, built from small configs with random weights.

What capture gets through (transformers 5, timm 1.0; transformers 5 no longer ships its own
torch.fx tracer, ``transformers.utils.fx``):

- timm's models trace whole with plain torch.fx and automatic leaves: the result is a
  GraphModule.
- A transformers model's own ``forward`` does not trace with plain torch.fx (input checks on
  shapes, mask creation, decorators that fill defaults from the config): conversion descends,
  each submodule traced as the model called it (None arguments fixed, the decorator wrapper
  left out), attention kept whole (it branches on ``self.training``). Where the loop over the
  layers lives in a module that traces (``BertEncoder``), the layers form one chain. Where it
  lives in the model's own forward (``GPT2Model``, ``LlamaModel``, ``ViTModel``), that
  forward is traced shape-aware (:mod:`fxmomentum.shaped`: shapes and dtypes read from the
  example and checked at run time), which puts the loop in the graph: the layers form one
  chain. Where that graph would not return what the model returns (a key/value cache the
  decorator creates from the config), conversion descends: one chain per layer.

Relative errors as in ARCHITECTURE.md; reversible gradients against backprop's in float64, with a
loss that depends on the output's direction (the sum of squares of a LayerNorm's output does
not: its gradient would be round-off only).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import converted_pair, grad_err, max_rel_err
from torch import fx, nn

import fxmomentum

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
transformers.logging.set_verbosity_error()


def ids(batch: int = 2, n: int = 7) -> torch.Tensor:
    return torch.randint(0, 100, (batch, n))


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.BertModel(config)


def gpt2(use_cache: bool = False) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, use_cache=use_cache
    )
    return transformers.GPT2Model(config)


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        use_cache=False,
    )  # fmt: skip
    return transformers.LlamaModel(config)


def t5_encoder() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        dropout_rate=0.0,  # attention dropout would take the math kernel with or without grad
    )  # fmt: skip
    return transformers.T5EncoderModel(config)


def hf_vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, hidden_dropout_prob=0.1,
    )  # fmt: skip
    return transformers.ViTModel(config)


def padded_ids():
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return ids(), mask


def images():
    return (torch.randn(2, 3, 32, 32),)


# name: (builder, inputs, expected chains as (first block, blocks, kind), result is a
# GraphModule). Each expectation follows from the architecture:
MODELS = {
    # Post-norm layers, LayerNorm(x + sublayer(x)) twice per layer: generalized blocks; the
    # 2 layers are one chain of 4.
    "bert": (bert, padded_ids, [("encoder.layer.0.attention", 4, "generalized")], False),
    # Pre-norm, x + attn(ln_1(x)) and x + mlp(ln_2(x)): 2 pure blocks per layer, the 2
    # layers one chain of 4 (the loop is in GPT2Model.forward, traced shape-aware).
    "gpt2": (gpt2, lambda: (ids(),), [("h.0", 4, "pure")], True),
    # Pre-norm with RMSNorm, rotary position embeddings (context of every attention block)
    # and grouped-query attention: like GPT-2, the loop in LlamaModel.forward.
    "llama": (llama, lambda: (ids(),), [("layers.0", 4, "pure")], True),
    # Pre-norm like GPT-2. The first attention (kept whole: it branches on self.training)
    # computes the relative position bias that every later attention reads, from its
    # parameter and the length only: the graph computes it too, ahead of the chain, and the
    # 4 blocks are one chain. The bias, from a parameter, is the attention mask: recomputed
    # with grad it would take another attention kernel.
    "t5_encoder": (t5_encoder, lambda: (ids(),), [("encoder.block.0.layer.0", 4, "pure")], True),
    # Pre-norm like GPT-2, the loop in ViTModel.forward.
    "hf_vit": (hf_vit, images, [("layers.0", 4, "pure")], True),
    # torchvision-style basic blocks: relu(x + F(x)); the first block of layers 2-4 has a
    # projection shortcut.
    "timm_resnet18": (
        lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
        images,
        [("layer1.0", 2, "generalized"), ("layer2.1", 1, "generalized"),
         ("layer3.1", 1, "generalized"), ("layer4.1", 1, "generalized")],
        True,
    ),
    # x + drop_path(ls(attn(norm(x)))) and the same with the MLP: depth 3 is one chain of
    # 6 pure blocks (attention, which branches on self.training, is kept whole).
    "timm_vit": (
        lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                  patch_size=8, depth=3, num_classes=10, drop_rate=0.1,
                                  drop_path_rate=0.1),
        images,
        [("blocks.0", 6, "pure")],
        True,
    ),
    # x + drop_path(gamma * mlp(norm(dwconv(x)))) per block, a downsampling between stages:
    # one chain per stage. Narrower than convnext_atto (float64 depthwise convolutions are
    # slow on a CPU), with its stage depths but the third.
    "timm_convnext": (
        lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10,
                                  dims=(16, 32, 48, 64), depths=(2, 2, 3, 2),
                                  drop_path_rate=0.1),
        images,
        [("stages.0.blocks.0", 2, "pure"), ("stages.1.blocks.0", 2, "pure"),
         ("stages.2.blocks.0", 3, "pure"), ("stages.3.blocks.0", 2, "pure")],
        True,
    ),
}  # fmt: skip


def build(name: str):
    make, inputs, expected, whole = MODELS[name]
    torch.manual_seed(0)
    model = make()
    return model, inputs(), expected, whole


def output(model: nn.Module, inputs, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    out = model(*inputs)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


@pytest.mark.parametrize("name", list(MODELS))
def test_gamma_zero_reproduces_the_original(name):
    model, inputs, expected, whole = build(name)
    out, report = fxmomentum.convert(
        model, 0.0, use_backprop=True, example_inputs=inputs, return_report=True
    )
    assert [(c.first, c.num_blocks, c.kind) for c in report.chains] == expected
    assert all(c.converted for c in report.chains) and report.shapes_verified
    assert isinstance(out, fx.GraphModule) is whole and isinstance(out, type(model)) is not whole
    assert list(out.state_dict()) == list(model.state_dict())
    twin = copy.deepcopy(model)
    out.load_state_dict(twin.state_dict(), strict=True)
    twin.load_state_dict(out.state_dict(), strict=True)
    for mode in ("eval", "train"):  # same seed: the same dropout and drop-path draws
        getattr(twin, mode)()
        getattr(out, mode)()
        with torch.no_grad():
            assert max_rel_err([output(out, inputs)], [output(twin, inputs)]) <= 1e-5, mode
    assert max_rel_err(out.state_dict().values(), twin.state_dict().values()) <= 1e-5


@pytest.mark.parametrize("name", list(MODELS))
def test_reversible_gradients_equal_backprop(name):
    model, inputs, _, _ = build(name)
    model = model.double().train()
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    reversible, backprop = converted_pair(model, inputs)
    results = []
    for net in (reversible, backprop):
        out = output(net, inputs)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        (out.square().mean() + (out * weights).sum()).backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        results.append((out.detach(), grads))
    (out_r, grads_r), (out_b, grads_b) = results
    assert len(grads_r) == len(grads_b) > 0
    assert max_rel_err([out_r], [out_b]) <= 1e-8
    # A tensor's norm is floored at 1e-9 x the largest: the key projection's bias has a zero
    # gradient in exact arithmetic (softmax ignores a shift shared by all keys).
    assert grad_err(grads_r, grads_b) <= 1e-5


def test_transformers_report_says_how_the_model_was_captured():
    model, inputs, _, _ = build("hf_vit")
    report = fxmomentum.inspect(model, inputs)
    assert not [leaf for leaf in report.leaves if leaf.path == ""]
    attention = {leaf.path for leaf in report.leaves if leaf.type == "ViTAttention"}
    assert attention == {"layers.0.attention", "layers.1.attention"}
    (shaped,) = [n for n in report.notes if "reads its inputs' values in Python" in n]
    assert shaped.startswith("ViTModel.forward") and "modeling_vit.py:" in shaped
    assert any(
        "traced shape-aware, which finds 1 chain(s) of 4 blocks where its submodules hold 2 of 4"
        in n
        for n in report.notes
    )
    assert any("traced without its decorator wrapper" in n for n in report.notes)


@pytest.mark.parametrize("name", ["bert", "gpt2", "hf_vit"])
def test_transformers_chains_get_a_memory_estimate(name):
    # Their forwards take None, flags and **kwargs: the estimate runs the graph on every
    # argument the example call had, and what autograd saves inside each chain (attention
    # and MLP activations) outweighs its reversible state.
    model, inputs, _, _ = build(name)
    report = fxmomentum.inspect(model, inputs)
    assert report.chains
    for chain in report.chains:
        assert chain.saved_bytes is not None and chain.saved_bytes > 0, chain


def test_a_key_value_cache_keeps_gpt2_layers_unconverted_when_reversible():
    torch.manual_seed(0)
    model = gpt2(use_cache=True)
    report = fxmomentum.inspect(model, (ids(),))
    # The shape-aware graph would not return the cache the model's decorator asks for from
    # the config: conversion descends, one chain per layer, which the cache reaches.
    (shaped,) = [n for n in report.notes if "shape-aware trace" in n]
    assert "fails too" in shaped and "cache: DynamicCache" in shaped
    assert [c.num_blocks for c in report.chains] == [2, 2]
    assert not any(c.converted for c in report.chains)
    assert all("`cache` (a DynamicCache)" in c.reason for c in report.chains)


def test_shape_aware_gpt2_serves_other_batch_sizes_and_lengths():
    # The graph reads batch size and length from its input; GPT-2's mask code takes another
    # path for a batch of one (``if batch_size != position_ids.shape[0]``), which the graph
    # checks and refuses with the line that decided.
    model, inputs, _, _ = build("gpt2")
    out = fxmomentum.convert(model, 0.0, use_backprop=True, example_inputs=inputs)
    assert isinstance(out, fx.GraphModule)
    model.eval()
    out.eval()
    for batch, n in [(3, 5), (4, 12)]:
        x = ids(batch, n)
        with torch.no_grad():
            assert max_rel_err([output(out, (x,))], [output(model, (x,))]) <= 1e-5
    with pytest.raises(AssertionError, match=r"masking_utils.py:\d+ \(`if batch_size != "):
        out(ids(1, 7))
