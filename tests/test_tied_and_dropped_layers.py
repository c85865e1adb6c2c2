"""Chains found whole across a shared layer applied several times, and around layer drop.

- ALBERT applies one post-norm layer (attention, then feed-forward, each ``LN(x + F(x))``)
  ``num_hidden_layers`` times with the same weights: 3 applications are one chain of 6
  generalized blocks, every block reading the shared layer's parameters (tied blocks), whose
  gradients add up over the blocks. The attention's residual sits in ``AlbertAttention``,
  which picks its dropout by ``self.training`` (the same, 0, in both modes) and needs the
  example's shapes to trace: the encoder is traced shape-aware through it.
- Hugging Face's Swin: stages of 2 layers, 2 residuals each on ``(B, L, C)``, patch merging
  between: chains of 4 and 4. Each ``SwinLayer`` also returns its attention weights (None
  with SDPA), which its stage passes on and the encoder drops: traced through the layers,
  the encoder's graph reads none of them.
- Wav2Vec2's encoder: ``x + pos_conv(x)`` then a norm, then post-norm layers, 2 generalized
  blocks each: one chain of 5, where its loop is one graph: with layer drop off, or in eval
  mode. In training with layer drop, the loop skips a layer on a random draw per call, which
  no graph holds: it stays Python code, each layer a chain of its own, and the report says
  why. Such a skipped layer in a momentum chain would be a step with ``f = 0``
  (``v <- gamma * v``, ``x <- x + v``): the original's skip at gamma 0 only.

SpecAugment is off in these Wav2Vec2 configs: its masks are drawn with numpy's generator,
which the comparisons below do not seed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_gamma_zero_exact, assert_reversible_gradients, block_counts
from torch import fx, nn

import fxmomentum

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_thread")


class SharedLayer(nn.Module):
    """``x + f(x)``, written as Hugging Face writes a layer: it reads ``x.shape`` into a
    Python tuple (plain torch.fx cannot) and picks its dropout by ``self.training``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.lin, self.p = nn.Linear(8, 8), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, width = x.shape
        p = self.p if self.training else 0.0
        f = torch.tanh(self.lin(x.reshape(-1, width))).reshape(*lead, width)
        return x + F.dropout(f, p, self.training)


class Tied(nn.Module):
    """One layer applied ``depth`` times, by a loop torch.fx traces."""

    def __init__(self, depth: int = 3, p: float = 0.0) -> None:
        super().__init__()
        self.layer, self.depth = SharedLayer(p), depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.depth):
            x = self.layer(x)
        return x


class Gate(nn.Module):
    """A root torch.fx cannot trace (a branch on a value) around ``Tied``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.body = Tied(p=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 1e9 else self.body(x)


@pytest.mark.parametrize("make", [Tied, Gate])
def test_a_layer_applied_several_times_is_one_chain(make):
    torch.manual_seed(0)
    model, inputs = make(), (torch.randn(2, 5, 8),)
    # Traced plainly, the loop holds the layer as a leaf; traced on its own, the layer is a
    # chain of one block, run three times. Traced shape-aware through the layer, the loop is
    # one chain of three blocks, all reading the layer's parameters.
    assert block_counts(model, inputs) == [3]
    assert_gamma_zero_exact(model, inputs)
    assert_reversible_gradients(model, inputs)
    out = fxmomentum.convert(model, 0.5, example_inputs=inputs)
    assert isinstance(out if make is Tied else out.body, fx.GraphModule)


def test_a_layer_whose_graph_differs_per_mode_says_where():
    # With dropout in training, the layer's graph differs between the modes: it stays Python
    # code, which serves both, and the report names the line that picks by the mode.
    torch.manual_seed(0)
    report = fxmomentum.inspect(Gate(p=0.1), (torch.randn(2, 5, 8),))
    assert not report.chains
    (layer,) = [leaf for leaf in report.leaves if leaf.path == "body.layer"]
    assert layer.kind == "per_mode"
    assert "(`p = self.p if self.training else 0.0`)" in layer.reason


def albert() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    config = transformers.AlbertConfig(
        vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AlbertModel(config)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, -2:] = 0
    return model, (torch.randint(1, 99, (2, 8)), mask)


def swin() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    config = transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
        window_size=4,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.SwinModel(config), (torch.randn(2, 3, 32, 32),)


def wav2vec2(layerdrop: float = 0.0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, layerdrop=layerdrop, mask_time_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Wav2Vec2Model(config), (torch.randn(2, 400),)


def test_a_shared_layer_applied_three_times_is_one_chain_of_tied_blocks():
    model, inputs = albert()
    report = fxmomentum.inspect(model, inputs)
    (chain,) = report.chains
    assert (chain.num_blocks, chain.kind) == (6, "generalized")
    shared = "encoder.albert_layer_groups.0.albert_layers.0"
    assert [b.path for b in chain.blocks] == [f"{shared}.attention", shared] * 3
    # The other residual-looking adds are inside gelu's tanh approximation.
    assert {s.path for s in report.skipped} == {f"{shared}.activation"}
    assert any("(AlbertAttention) branches on self.training but traces to the same" in n
               for n in report.notes)  # fmt: skip


def test_swin_stages_are_chains_of_four():
    model, inputs = swin()
    report = fxmomentum.inspect(model, inputs)
    assert [(c.num_blocks, c.kind) for c in report.chains] == [(4, "pure"), (4, "pure")]
    assert not report.skipped


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_wav2vec2_without_layer_drop_is_one_chain(mode):
    model, inputs = wav2vec2()
    getattr(model, mode)()
    assert [c.num_blocks for c in fxmomentum.inspect(model, inputs).chains] == [5]


def test_layer_drop_in_training_keeps_the_loop_and_says_why():
    model, inputs = wav2vec2(layerdrop=0.5)
    report = fxmomentum.inspect(model.train(), inputs)
    assert [c.num_blocks for c in report.chains] == [2, 2]
    (encoder,) = [leaf for leaf in report.leaves if leaf.path == "encoder"]
    assert "branches on a random draw at modeling_wav2vec2.py:" in encoder.reason
    (note,) = [n for n in report.notes if "a layer drop skips a layer" in n]
    assert "config.layerdrop = 0.0" in note and "f = 0 (v <- gamma * v, x <- x + v)" in note


def test_layer_drop_in_training_skips_what_the_original_skips():
    # The loop stays Python code and draws as the original does: at gamma 0 the converted
    # model is the original, seed by seed, in both modes.
    model, inputs = wav2vec2(layerdrop=0.5)
    for seed in range(3):
        assert_gamma_zero_exact(model.train(), inputs, seed=seed)


def test_layer_drop_converted_in_eval_mode_is_one_chain_for_eval_mode():
    model, inputs = wav2vec2(layerdrop=0.5)
    model.eval()
    out, report = fxmomentum.convert(
        model, 0.0, use_backprop=True, example_inputs=inputs, return_report=True
    )
    assert [c.num_blocks for c in report.chains] == [5]
    with torch.no_grad():
        assert torch.equal(out(*inputs).last_hidden_state, model(*inputs).last_hidden_state)
    with pytest.raises(AssertionError, match="captured in eval mode"):
        out.train()(*inputs)


@pytest.mark.parametrize("build", [albert, swin, wav2vec2])
def test_gamma_zero_is_the_original(build):
    model, inputs = build()
    assert_gamma_zero_exact(model, inputs)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("build", [albert, swin, wav2vec2])
def test_reversible_gradients_equal_backprop(build, mode):
    # Every parameter: the shared layer's get the sum over the blocks that read them.
    model, inputs = build()
    assert_reversible_gradients(model, inputs, mode)
