"""Every chain a model has, found whole (issue 18): values blocks hand to later blocks.

A block may compute a value that later blocks read. Where it does not depend on the block
input's values (T5's relative position bias: a parameter and the sequence length), it is
computed ahead of the chain and the blocks read it as context; where it does, the block is
refused with the reason. T5's bias is computed inside its attention, which the graph keeps
whole (it branches on ``self.training``): the graph computes that output itself, from the
attention's traced code, and checks it against the attention's at run time. DeBERTa-v2's
encoder returns every layer's output (the model keeps the last): the model is traced
shape-aware into it, where nothing reads them.

Expected block counts follow from the architectures: T5's encoder layers hold 2 pre-norm
residuals (attention, feed-forward), its decoder layers 3 (self-attention, cross-attention,
feed-forward); DeBERTa's post-norm layers 2. Relative errors as in ARCHITECTURE.md.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_gamma_zero_exact, assert_reversible_gradients, block_counts
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import fxmomentum
from fxmomentum.capture.leaf_outputs import check_leaf_output
from fxmomentum.surgery.match import find_chains

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH, LENGTH = 2, 8


def t5_config() -> object:
    # T5's defaults (dropout 0.1, 32 buckets, d_kv 64), small otherwise. Without a
    # key/value cache: the decoder's cache is a Python object its blocks would change (see
    # test_hf_timm), which keeps the decoder's layers apart.
    return transformers.T5Config(
        d_model=32, d_ff=64, num_heads=4, num_layers=3, num_decoder_layers=3, use_cache=False
    )


def ids(n: int = LENGTH) -> torch.Tensor:
    return torch.randint(0, 100, (BATCH, n))


def t5_encoder():
    return transformers.T5EncoderModel(t5_config()), (ids(),)


def t5():
    # The decoder's length differs from the encoder's: the cross-attention's zero bias is
    # sized by both.
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    return transformers.T5Model(t5_config()), (ids(), mask, ids(LENGTH - 2))


def deberta_v2():
    config = transformers.DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, relative_attention=True,
        position_buckets=16, pos_att_type=["p2c", "c2p"], position_biased_input=False,
        norm_rel_ebd="layer_norm",
    )  # fmt: skip
    return transformers.DebertaV2Model(config), (ids(),)


# name: (builder, block counts of the chains)
MODELS = {
    "t5_encoder": (t5_encoder, [6]),
    "t5": (t5, [6, 9]),
    "deberta_v2": (deberta_v2, [6]),
}


def build(name: str):
    torch.manual_seed(0)
    return MODELS[name][0]()


@pytest.mark.parametrize("name", list(MODELS))
def test_every_chain_is_found_whole(name):
    model, inputs = build(name)
    assert block_counts(model, inputs) == MODELS[name][1]


@pytest.mark.parametrize("name", list(MODELS))
def test_gamma_zero_reproduces_the_original_bit_for_bit(name):
    model, inputs = build(name)
    assert_gamma_zero_exact(model, inputs)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_reversible_gradients_equal_backprop_in_float64(name, mode):
    model, inputs = build(name)
    assert_reversible_gradients(model, inputs, mode=mode, tolerance=1e-8)


def test_t5_report_says_how_the_bias_is_computed():
    model, inputs = build("t5_encoder")
    report = fxmomentum.inspect(model, inputs)
    assert not report.skipped
    notes = [n for n in report.notes if "T5Attention (kept whole): its output 1" in n]
    assert any("does not depend on its inputs' values" in n for n in notes)
    assert any("is its input" in n for n in notes)


# -- models written for these tests ----------------------------------------------------------
class LengthBias(nn.Module):
    """The first block computes a bias from the length of a value it computes from x
    (``norm(x)``); every block reads it."""

    def __init__(self, depth: int = 3, width: int = 4):
        super().__init__()
        self.table = nn.Parameter(torch.randn(16, width))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.fs = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        bias = None
        for norm, f in zip(self.norms, self.fs, strict=True):
            h = norm(x)
            if bias is None:
                bias = self.table[: h.shape[1]]
            x = x + f(h) * bias
        return x


class Truncated(nn.Module):
    """Like :class:`LengthBias`, with the bias sized by the first 5 positions of x: the
    same length as x's on an example of 5, not on longer inputs."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(16, 4))
        self.fs = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        bias = None
        for f in self.fs:
            if bias is None:
                bias = self.table[: x[:, :5].shape[1]].mean()
            x = x + f(x) * bias
        return x


class Gated(nn.Module):
    """Branches on self.training (kept whole in a graph); returns a second value computed
    from its input's values."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x, keep=None):
        out = self.f(x) if self.training else self.f(x) * 1.0
        return out, (torch.tanh(out) if keep is None else keep)


class HandsOn(nn.Module):
    """Each block's first value, computed from x's values, is read by every later block:
    directly (``leaf=False``) or returned by a module kept whole (``leaf=True``)."""

    def __init__(self, leaf: bool):
        super().__init__()
        self.leaf = leaf
        self.fs = nn.ModuleList(Gated() if leaf else nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        keep = None
        for f in self.fs:
            if self.leaf:
                h, keep = f(x, keep)
            else:
                h = f(x)
                keep = torch.tanh(h) if keep is None else keep
            x = x + h * keep
        return x


def test_a_value_from_the_length_of_a_computed_value_is_hoisted():
    torch.manual_seed(0)
    model, x = LengthBias(), torch.randn(2, 5, 4)
    gm = fx.symbolic_trace(model)
    ShapeProp(gm).propagate(x)
    (chain,) = find_chains(gm.graph, dict(gm.named_modules())).chains
    first = chain.blocks[0]
    assert len(chain.blocks) == 3
    assert [n.name for n in first.hoisted] == ["getattr_1", "getitem", "getitem_1"]
    assert [v.name for v in first.reads.values()] == ["norms_0"]
    assert_gamma_zero_exact(model, (x,))
    assert_reversible_gradients(model, (x,))
    # Another length: the bias ahead of the chain is sized by the input's.
    converted = fxmomentum.convert(model, 0.0, example_inputs=(x,), use_backprop=True)
    other = torch.randn(3, 7, 4)
    with torch.no_grad():
        assert torch.equal(converted(other), model(other))


def test_a_hoisted_read_that_does_not_hold_raises_clearly():
    torch.manual_seed(0)
    model = Truncated()
    x = torch.randn(2, 5, 4)
    converted, report = fxmomentum.convert(
        model, 0.0, example_inputs=(x,), use_backprop=True, return_report=True
    )
    assert [c.num_blocks for c in report.chains] == [3]
    with pytest.raises(AssertionError, match=r"`getitem(_\d+)?` has another shape than the chain"):
        converted(torch.randn(2, 7, 4))


@pytest.mark.parametrize("leaf", [False, True], ids=["in the graph", "from a module kept whole"])
def test_a_value_computed_from_the_input_and_read_by_later_blocks_is_refused(leaf):
    torch.manual_seed(0)
    model, x = HandsOn(leaf), torch.randn(2, 5, 4)
    report = fxmomentum.inspect(model, x)
    assert [c.num_blocks for c in report.chains] == [2]  # the 2 blocks that hand nothing on
    (skipped,) = report.skipped
    assert "is computed inside the block and read by" in skipped.reason
    assert "outside it" in skipped.reason


def test_check_leaf_output_takes_the_same_tensor_or_equal_values():
    a = torch.arange(6.0)
    check_leaf_output(a, a, "same tensor")
    check_leaf_output(a, a.clone(), "equal values")
    with pytest.raises(AssertionError, match="differs"):
        check_leaf_output(a, a + 1, "differs")
    with pytest.raises(AssertionError, match="dtype"):
        check_leaf_output(a, a.double(), "dtype")
