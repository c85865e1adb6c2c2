"""A torchvision ResNet converted in one line, as a drop-in replacement.

``fxmomentum.convert`` finds the residual chains of the ResNet (torch.fx) and turns each into a
reversible momentum chain. The converted model keeps the module tree and the ``state_dict`` keys of
the original, so the original's checkpoints load into it with ``strict=True`` (and back). This
script:

1. saves a checkpoint of a (randomly initialised) ResNet, as if it were a trained one;
2. converts the ResNet and loads that checkpoint into the converted model, ``strict=True``;
3. checks that ``gamma=0`` with plain backprop computes exactly the original function;
4. trains the converted model (gamma = 0.9, reversible) for a few steps on random data;
5. loads the trained converted weights back into a plain torchvision ResNet.

Run ``python examples/resnet_dropin.py`` (``--quick`` for tiny sizes).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torchvision
from torch import nn

import fxmomentum


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args(argv)
    arch, batch, size, steps = ("resnet18", 4, 32, 3) if args.quick else ("resnet50", 16, 64, 10)
    torch.manual_seed(0)
    build = getattr(torchvision.models, arch)
    model = build(num_classes=10)
    x = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 10, (batch,))

    with tempfile.TemporaryDirectory() as tmp:
        # 1. The "original checkpoint".
        ckpt = os.path.join(tmp, f"{arch}.pt")
        torch.save(model.state_dict(), ckpt)

        # 2. Convert; the checkpoint loads into the converted model with strict=True.
        converted, report = fxmomentum.convert(
            model, gamma=0.9, example_inputs=x, return_report=True
        )
        print(report.summary())
        same_keys = converted.state_dict().keys() == model.state_dict().keys()
        print(f"state_dict keys equal: {same_keys}")
        converted.load_state_dict(torch.load(ckpt, weights_only=True), strict=True)
        print("original checkpoint loaded into the converted model (strict=True)")
        if not same_keys:
            print("FAILED: the state_dict keys differ")
            return 1

    # 3. gamma = 0 with plain autograd is the original ResNet.
    same = fxmomentum.convert(model, gamma=0.0, example_inputs=x, use_backprop=True)
    model.eval()
    same.eval()
    with torch.no_grad():
        diff = (same(x) - model(x)).abs().max().item()
    print(f"gamma=0, use_backprop=True: largest output difference to the original {diff:.1e}")
    if diff > 1e-4:
        print("FAILED: gamma = 0 should give the original function")
        return 1

    # 4. Train the converted model (reversible) for a few steps.
    converted.train()
    opt = torch.optim.SGD(converted.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(converted(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"training {steps} steps on one random batch: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if not losses[-1] < losses[0]:
        print("FAILED: the loss did not go down")
        return 1

    # 5. The trained weights load back into a plain torchvision ResNet.
    plain = build(num_classes=10)
    plain.load_state_dict(converted.state_dict(), strict=True)
    print(f"trained weights loaded back into a plain torchvision {arch} (strict=True)")
    print("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
