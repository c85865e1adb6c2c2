"""Attention whose kernel depends on whether its inputs require grad, inside reversible chains.

On CPU, ``F.scaled_dot_product_attention`` with an additive mask that requires grad takes the
math kernel, and the flash kernel otherwise; the two round differently. A learned bias
computed inside a block (T5's relative position bias) requires grad in backward's
recomputation but not in the chain's forward, which runs without grad.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import converted_pair, grad_err, max_rel_err
from torch import nn

import fxmomentum
from fxmomentum.engine.attention import forward_attention_kernels


class BiasedAttention(nn.Module):
    """Self-attention with a learned additive bias; ``computed``: the mask is the bias times
    a scale (a new tensor in the block), else the parameter itself.

    Like Hugging Face's attention it picks its dropout by ``self.training``, so conversion
    keeps it whole and the mask is computed inside the block (as T5's position bias is).
    """

    def __init__(self, width: int = 32, heads: int = 4, n: int = 16, computed: bool = True):
        super().__init__()
        self.heads, self.computed, self.dropout = heads, computed, 0.0
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.bias = nn.Parameter(torch.randn(1, heads, n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = self.bias * 0.5 if self.computed else self.bias
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class TracedAttention(BiasedAttention):
    """``BiasedAttention`` without a dropout to pick: traced into the graph, whose code calls
    attention as ``torch._C._nn.scaled_dot_product_attention``; the mask is expanded to the
    batch size (as Swin's is), which puts it in the block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = self.bias.expand(b, -1, -1, -1) * 0.5
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Stack(nn.Module):
    def __init__(self, depth: int = 3, computed: bool = True, traced: bool = False) -> None:
        super().__init__()
        kind = TracedAttention if traced else BiasedAttention
        self.blocks = nn.ModuleList(kind(computed=computed) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def attend(q: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, q * 0.7, q * 1.3, attn_mask=bias * 0.5)


def test_recomputed_attention_gives_the_forward_bits():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    bias = torch.randn(1, 4, 16, 16, requires_grad=True)
    with torch.no_grad():
        forward = attend(q, bias)
    # The premise: with grad, torch takes another kernel, with other bits.
    assert not torch.equal(attend(q, bias), forward)
    with forward_attention_kernels():
        again = attend(q, bias)
    assert torch.equal(again, forward)
    # The gradients are those of the kernel autograd picks, to rounding.
    grads = torch.autograd.grad(again.sum(), [q, bias])
    expected = torch.autograd.grad(attend(q, bias).sum(), [q, bias])
    assert grad_err(list(grads), list(expected)) <= 1e-5


@pytest.mark.parametrize(
    ("computed", "traced"),
    [(True, False), (False, False), (True, True)],
    ids=["bias-computed", "bias-parameter", "attention-in-the-graph"],
)
def test_reversible_gradients_equal_backprop(computed, traced):
    torch.manual_seed(0)
    model = Stack(computed=computed, traced=traced).double()
    x = torch.randn(4, 16, 32, dtype=torch.float64)
    # The mask is computed in the block (not passed in as context computed with grad); a
    # traced block reads its bias parameter as context.
    (chain,) = fxmomentum.inspect(model, (x,)).chains
    params = [[f"blocks_{i}_bias"] if traced else [] for i in range(3)]
    assert [b.context for b in chain.blocks] == params
    reversible, backprop = converted_pair(model, (x,))
    results = []
    for net in (reversible, backprop):
        y = x.clone().requires_grad_(True)
        out = net(y)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), [y.grad, *(p.grad for p in net.parameters())]))
    (out_r, grads_r), (out_b, grads_b) = results
    assert max_rel_err([out_r], [out_b]) <= 1e-10
    assert all(g is not None for g in grads_r)  # the biases get gradients too
    assert grad_err(grads_r, grads_b) <= 1e-8


def test_float32_chain_rebuilds_its_state():
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(4, 16, 32)
    reversible, backprop = converted_pair(model, (x,))
    for net in (reversible, backprop):
        net(x).sum().backward()  # reversible: raises if a recomputed block differed
    for p, q in zip(reversible.parameters(), backprop.parameters(), strict=True):
        assert max_rel_err([p.grad], [q.grad]) <= 1e-4


def test_outside_recomputation_attention_is_torch_s_own():
    own = F.scaled_dot_product_attention
    with forward_attention_kernels():
        assert F.scaled_dot_product_attention is not own
        assert torch._C._nn.scaled_dot_product_attention is not own
    assert F.scaled_dot_product_attention is own
    assert torch._C._nn.scaled_dot_product_attention is own
