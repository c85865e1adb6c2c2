"""Attention recomputed in backward takes the kernel the forward took.

A reversible chain runs each block without grad in forward and recomputes it with grad in
backward, and the two runs must give the same bits. ``F.scaled_dot_product_attention`` picks its
kernel by, among other things, whether its inputs require grad: on CPU an additive mask that
requires grad (a learned position bias such as T5's, computed inside the block) sends it from
the flash kernel to the math one, which rounds differently. Inside the block's forward nothing
computed there requires grad; in the recomputation it does.

While :func:`forward_attention_kernels` is active, an attention call whose kernel would differ
from the forward's gets the forward kernel's values and the gradients of the kernel autograd
picks (the math kernel's, which also reach the mask), computed in its backward. Python code
calls attention as ``F.scaled_dot_product_attention``; a block's graph code, where attention was
traced into, calls it as ``torch._C._nn.scaled_dot_product_attention`` (the function's own
module): both names are replaced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ..patches import replaced

__all__ = ["forward_attention_kernels"]

_SDPA = F.scaled_dot_product_attention


def _as_in_forward(t: torch.Tensor | None) -> torch.Tensor | None:
    # A tensor computed inside the block did not require grad in the forward; one from
    # outside it (a parameter, a context tensor) did as it does now.
    return t.detach() if t is not None and t.grad_fn is not None else t


def _choice(q: Any, k: Any, v: Any, mask: Any, options: dict[str, Any]) -> int:
    return torch._fused_sdp_choice(
        q,
        k,
        v,
        mask,
        options["dropout_p"],
        options["is_causal"],
        scale=options["scale"],
        enable_gqa=options["enable_gqa"],
    )


class _ForwardKernel(torch.autograd.Function):
    """The forward kernel's attention, differentiated by the kernel autograd picks."""

    @staticmethod
    def forward(ctx, options: dict[str, Any], q, k, v, mask):  # type: ignore[override]
        ctx.options = options
        ctx.save_for_backward(q, k, v, mask)
        # Detached as in the forward: the same kernel, the same bits.
        return _SDPA(q.detach(), k.detach(), v.detach(), attn_mask=mask.detach(), **options)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        wanted = ctx.needs_input_grad[1:]
        inputs = [
            t.detach().requires_grad_(need)
            for t, need in zip(ctx.saved_tensors, wanted, strict=True)
        ]
        with torch.enable_grad():
            out = _SDPA(*inputs[:3], attn_mask=inputs[3], **ctx.options)
        needed = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, needed, grad, allow_unused=True))
        return (None, *(next(grads) if t.requires_grad else None for t in inputs))


def _attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    options = {
        "dropout_p": dropout_p,
        "is_causal": is_causal,
        "scale": scale,
        "enable_gqa": enable_gqa,
    }
    tensors = (query, key, value, attn_mask)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return _SDPA(*tensors[:3], attn_mask=attn_mask, **options)
    forward = _choice(*map(_as_in_forward, tensors), options)
    if forward == _choice(*tensors, options):
        return _SDPA(*tensors[:3], attn_mask=attn_mask, **options)
    if dropout_p > 0 or attn_mask is None:
        raise RuntimeError(
            "scaled_dot_product_attention in a reversible momentum chain takes another kernel "
            "when its inputs require grad (as in backward's recomputation) than without (as in "
            "the chain's forward), and the two do not give the same bits. Use the model's "
            'eager attention (Hugging Face: attn_implementation="eager"), or convert with '
            "use_backprop=True."
        )
    return _ForwardKernel.apply(options, query, key, value, attn_mask)


@contextlib.contextmanager
def forward_attention_kernels() -> Iterator[None]:
    """Recompute attention with the forward's kernels (see the module doc).

    Examples
    --------
    >>> q = torch.randn(1, 2, 4, 8)
    >>> bias = torch.randn(1, 2, 4, 4, requires_grad=True)
    >>> with torch.no_grad():
    ...     forward = F.scaled_dot_product_attention(q, q, q, attn_mask=bias * 1.0)
    >>> with forward_attention_kernels():
    ...     again = F.scaled_dot_product_attention(q, q, q, attn_mask=bias * 1.0)
    >>> torch.equal(forward, again)
    True
    """
    name = {"scaled_dot_product_attention": _attention}
    with replaced(F, name), replaced(torch._C._nn, name):
        yield
