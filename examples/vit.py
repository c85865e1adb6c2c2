"""vit_pytorch's ViT (the official library's example) with a reversible momentum transformer.

The official library converts ``ViT(image_size=256, patch_size=32, num_classes=1000, dim=1024,
depth=6, heads=16, mlp_dim=2048, dropout=0.1, emb_dropout=0.1)`` after flattening
``v.transformer.layers`` into an ``nn.Sequential`` by hand. Here no surgery is needed:

- torch.fx cannot trace ``ViT.forward`` itself (einops on the patches), so ``fxmomentum.convert(v)``
  descends: it returns a copy of the ``ViT`` whose own forward is unchanged, with
  ``v.transformer`` (``x = attn(x) + x; x = ff(x) + x`` per layer, then a norm) captured as one
  graph, its ``Attention`` modules (einops inside) kept whole, and the 2 * depth residual blocks
  one reversible chain; the report says what was captured and what stayed opaque.

(``transform_to_momentumnet`` over ``v.transformer.layers`` does not fit this model: the parent's
loop unpacks each layer's ``attn, ff`` pair and adds the residuals itself.)

Checked here: the state_dict keys are unchanged; ``gamma=0`` with plain autograd gives the
original outputs; reversible gradients equal backprop's (float64, same dropout masks); a few
training steps lower the loss. Needs ``pip install vit-pytorch einops``.

Run ``python examples/vit.py`` (``--quick`` for tiny sizes).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fxmomentum


def convert_vit(v: nn.Module, images: torch.Tensor, gamma: float, use_backprop: bool = False):
    """The converted copy of ``v`` and the conversion report (``v`` is left as it was)."""
    return fxmomentum.convert(
        v, gamma, example_inputs=images, use_backprop=use_backprop, return_report=True
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def grads(model: nn.Module, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Gradients of ``sum(logits ** 2)``; ``seed`` fixes the dropout masks."""
    model.zero_grad()
    torch.manual_seed(seed)
    model(x).pow(2).sum().backward()
    return [p.grad for p in model.parameters()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args(argv)
    try:
        from vit_pytorch import ViT
    except ImportError:
        print("vit_pytorch is not installed: pip install vit-pytorch einops")
        return 1
    if args.quick:
        cfg = dict(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4,
                   mlp_dim=128)  # fmt: skip
        batch, steps = 4, 5
    else:  # the official library's example
        cfg = dict(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=16,
                   mlp_dim=2048)  # fmt: skip
        batch, steps = 4, 5
    torch.manual_seed(0)
    v = ViT(**cfg, dropout=0.1, emb_dropout=0.1)
    images = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"])
    labels = torch.randint(0, cfg["num_classes"], (batch,))

    ok = True
    mv, report = convert_vit(v, images, 0.9)
    print(report.summary())
    print(f"converted model: {type(mv).__name__}, transformer: {type(mv.transformer).__name__}")
    blocks = [c.num_blocks for c in report.converted]
    print(f"converted chains (blocks): {blocks}; expected one chain of {2 * cfg['depth']}")
    ok &= blocks == [2 * cfg["depth"]]
    keys = mv.state_dict().keys() == v.state_dict().keys()
    print(f"state_dict keys equal: {keys}")
    ok &= keys

    same, _ = convert_vit(v, images, 0.0, use_backprop=True)
    v.eval()
    same.eval()
    with torch.no_grad():
        diff = (same(images) - v(images)).abs().max().item()
    print(f"gamma=0, use_backprop=True: largest output difference {diff:.1e}")
    ok &= diff < 1e-4
    v.train()

    rev = mv.double().train()
    bp, _ = convert_vit(v, images, 0.9, use_backprop=True)
    bp = bp.double().train()
    x64 = images.double()
    err = max(rel_err(a, b) for a, b in zip(grads(rev, x64, 1), grads(bp, x64, 1), strict=True))
    print(f"float64 gradients, reversible vs backprop: max relative error {err:.1e}")
    ok &= err < 1e-5

    model, _ = convert_vit(v, images, 0.9)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"training {steps} steps (reversible): loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    ok &= losses[-1] < losses[0]
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
