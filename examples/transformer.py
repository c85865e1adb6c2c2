"""nn.Transformer with masks, turned into a Momentum Transformer (the seed README's example).

The official library's ``transform_to_momentumnet`` replaces ``encoder.layers`` by one module,
so ``nn.TransformerEncoder`` (which reads ``self.layers[0].self_attn``) and the masks it passes to
each layer break. ``fxmomentum.transform_to_momentumnet`` keeps every layer where it is and only
swaps its class: the parent's loop, its masks and the ``state_dict`` keys keep working.
``split_layers=True`` makes each encoder layer two residual blocks (attention, feed-forward) and
each decoder layer three, so that backward recomputes one sub-block at a time.

Checked here, for both variants: the state_dict keys are the original's; ``gamma=0`` with plain
autograd gives the original outputs; reversible gradients equal backprop's (float64, training mode,
the same dropout masks); a few training steps with causal and padding masks lower the loss.

Run ``python examples/transformer.py`` (``--quick`` for tiny sizes).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fxmomentum

SUB_LAYERS = ["encoder.layers", "decoder.layers"]


def momentum(model: nn.Transformer, gamma: float, use_backprop: bool, split: bool) -> nn.Module:
    """The README's call, plus ``split_layers``."""
    return fxmomentum.transform_to_momentumnet(
        model,
        sub_layers=SUB_LAYERS,
        gamma=gamma,
        use_backprop=use_backprop,
        keep_first_layer=False,
        split_layers=split,
    )


def masks(batch: int, src_len: int, tgt_len: int) -> dict[str, torch.Tensor]:
    """A causal target mask and key padding masks (the last positions of odd rows padded).

    All boolean (``True`` = not attended), since torch deprecates mixing float and bool masks.
    """
    src_pad = torch.zeros(batch, src_len, dtype=torch.bool)
    tgt_pad = torch.zeros(batch, tgt_len, dtype=torch.bool)
    src_pad[1::2, -2:] = True
    tgt_pad[1::2, -1:] = True
    return {
        "tgt_mask": torch.ones(tgt_len, tgt_len, dtype=torch.bool).triu(1),  # True: masked
        "tgt_is_causal": True,
        "src_key_padding_mask": src_pad,
        "tgt_key_padding_mask": tgt_pad,
        "memory_key_padding_mask": src_pad,
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def grads(model: nn.Module, src, tgt, kw) -> list[torch.Tensor]:
    """Gradients of ``sum(output ** 2)`` with respect to every parameter."""
    model.zero_grad()
    model(src, tgt, **kw).pow(2).sum().backward()
    return [p.grad for p in model.parameters()]


def check(base: nn.Transformer, split: bool, src, tgt, kw) -> bool:
    """Keys, gamma = 0 equivalence and float64 gradients of one variant; prints the figures."""
    name = "split_layers=True" if split else "one block per layer"
    ok = True
    mt = momentum(base, 0.9, use_backprop=False, split=split)
    keys = mt.state_dict().keys() == base.state_dict().keys()
    print(f"[{name}] state_dict keys equal: {keys}")
    ok &= keys

    # gamma = 0 with plain autograd computes the original (with grad enabled: torch's inference
    # fast path, taken in eval mode without grad, zeroes padded positions).
    same = momentum(base, 0.0, use_backprop=True, split=split).eval()
    base.eval()
    diff = (same(src, tgt, **kw) - base(src, tgt, **kw)).abs().max().item()
    print(f"[{name}] gamma=0, use_backprop=True: largest output difference {diff:.1e}")
    ok &= diff < 1e-4

    # Reversible against backprop gradients, float64, in training mode: the same seed before
    # each, so that both draw the same dropout masks (the reversible backward replays them).
    rev = momentum(base, 0.9, use_backprop=False, split=split).double().train()
    bp = momentum(base, 0.9, use_backprop=True, split=split).double().train()
    s64, t64 = src.double(), tgt.double()
    kw64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in kw.items()}  # fmt: skip
    torch.manual_seed(1)
    g_rev = grads(rev, s64, t64, kw64)
    torch.manual_seed(1)
    g_bp = grads(bp, s64, t64, kw64)
    err = max(rel_err(a, b) for a, b in zip(g_rev, g_bp, strict=True))
    print(f"[{name}] float64 gradients, reversible vs backprop: max relative error {err:.1e}")
    ok &= err < 1e-5
    base.train()
    return ok


def train(base: nn.Transformer, split: bool, src, tgt, target, kw, steps: int) -> bool:
    """A few Adam steps of the reversible Momentum Transformer (dropout on, masks on)."""
    mt = momentum(base, 0.9, use_backprop=False, split=split).train()
    opt = torch.optim.Adam(mt.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(mt(src, tgt, **kw), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    name = "split_layers=True" if split else "one block per layer"
    print(f"[{name}] training {steps} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return losses[-1] < losses[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args(argv)
    if args.quick:
        dims = dict(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                    dim_feedforward=64)  # fmt: skip
        batch, src_len, tgt_len, steps = 4, 10, 8, 5
    else:  # the README's nn.Transformer(num_encoder_layers=6, num_decoder_layers=6)
        dims = dict(d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                    dim_feedforward=2048)  # fmt: skip
        batch, src_len, tgt_len, steps = 8, 32, 24, 5
    torch.manual_seed(0)
    base = nn.Transformer(**dims, dropout=0.1, batch_first=True)
    d = dims["d_model"]
    src, tgt = torch.randn(batch, src_len, d), torch.randn(batch, tgt_len, d)
    target = torch.randn(batch, tgt_len, d)
    kw = masks(batch, src_len, tgt_len)

    ok = True
    for split in (False, True):
        ok &= check(base, split, src, tgt, kw)
        ok &= train(base, split, src, tgt, target, kw, steps)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
