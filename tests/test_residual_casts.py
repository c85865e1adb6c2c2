"""Chains across dtype casts of the residual stream.

Hugging Face's Mamba (``residual_in_fp32=True``, its default) writes each layer as
``residual = h.to(torch.float32); h = residual + mixer(norm(h.to(norm_dtype)))``. On a float32
model the cast is the identity; on a bfloat16 one it widens the first layer's input, exactly,
and every later layer's state is float32 already. Either way the layers are one chain: the
widened value is the chain's state, and the first block reads ``h`` as the state cast back,
which is ``h`` bit for bit. A skip that narrows, reshapes or permutes is reported with the
reason.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_gamma_zero_exact, block_counts, converted_pair, grad_err
from torch import nn

import fxmomentum


class Layer(nn.Module):
    """Mamba's residual: the skip cast to ``wide``, F on ``h`` cast to the weights' dtype."""

    def __init__(self, dim: int, wide: torch.dtype) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        self.wide = wide

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        residual = h
        h = self.mixer(self.norm(h.to(dtype=self.norm.weight.dtype)))
        residual = residual.to(self.wide)
        return residual + h


class Stack(nn.Module):
    def __init__(self, wide: torch.dtype, depth: int = 3, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(Layer(dim, wide) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return h


# (weights' dtype, the skip's dtype): the same (the cast is the identity), or wider.
CASES = {
    "same": (torch.float32, torch.float32),
    "bf16_to_fp32": (torch.bfloat16, torch.float32),
    "fp32_to_fp64": (torch.float32, torch.float64),
}


def build(name: str):
    dtype, wide = CASES[name]
    torch.manual_seed(0)
    return Stack(wide).to(dtype), (torch.randn(2, 5, 8, dtype=dtype),)


@pytest.mark.parametrize("name", list(CASES))
def test_the_layers_are_one_chain_across_the_cast(name):
    model, inputs = build(name)
    report = fxmomentum.inspect(model, inputs)
    assert [c.num_blocks for c in report.chains] == [3]
    assert not report.skipped
    assert report.chains[0].dtype == str(CASES[name][1]).removeprefix("torch.")


@pytest.mark.parametrize("name", list(CASES))
def test_gamma_zero_is_the_model_bit_for_bit(name):
    model, inputs = build(name)
    assert_gamma_zero_exact(model, inputs)


@pytest.mark.parametrize("name", ["same", "fp32_to_fp64"])
def test_reversible_gradients_equal_backprop_s(name):
    # float64 where the chain's state is float64 (the skip widens float32 to it).
    model, inputs = build(name)
    if name == "same":
        torch.manual_seed(0)
        model = Stack(torch.float64).double()
        inputs = (inputs[0].double(),)
    reversible, backprop = converted_pair(model.train(), inputs)
    grads = []
    for net in (reversible, backprop):
        x = inputs[0].clone().requires_grad_(True)
        out = net(x)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        (out.square().mean() + (out * weights).sum()).backward()
        grads.append([p.grad for p in net.parameters()] + [x.grad])
    assert grad_err(grads[0], grads[1]) <= 1e-8


class Narrowing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float16) + self.f(x).to(torch.float16)


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2) + self.f(x).transpose(1, 2)


@pytest.mark.parametrize(
    ("model", "words"),
    [(Narrowing(), ["`to` of `x`", "float32 to float16, which rounds", "cast the state once"]),
     (Transposed(), ["`transpose` of `x`", "one layout"])],
)  # fmt: skip
def test_a_skip_that_is_not_the_identity_is_reported(model, words):
    report = fxmomentum.inspect(model, (torch.randn(2, 8, 8),))
    assert not report.chains
    (skipped,) = report.skipped
    for word in words:
        assert word in skipped.reason, skipped.reason


def test_hugging_face_mamba_with_residual_in_fp32():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.MambaConfig(
        vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=3, expand=2,
        conv_kernel=3, use_cache=False, residual_in_fp32=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MambaModel(config)
    ids = (torch.randint(0, 50, (2, 6)),)
    assert block_counts(model, ids) == [3]
    assert_gamma_zero_exact(model, ids)
