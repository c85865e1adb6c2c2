"""Train a small ResNet on scikit-learn's digits, convert it, fine-tune it reversibly.

The handwritten digits (8x8 images, shipped with scikit-learn: ``sklearn.datasets.load_digits``,
nothing is downloaded) are classified by a small ResNet of BasicBlock-style residual blocks. It is
trained with plain backprop, converted with ``fxmomentum.convert(model, gamma=0.9)`` (reversible
chains: activations rebuilt in backward) and fine-tuned a few epochs from the trained weights. The
fine-tuned converted model reaches the original's accuracy. ``fxmomentum.tools.profiling`` then
measures the activation memory and time of one training step of both (a fresh process per
configuration).

Run ``python examples/finetune_digits.py`` (``--quick``: a few seconds). Needs scikit-learn.
The model is also a target for the command line:
``fxmomentum profile examples/finetune_digits.py:SmallResNet --batch 256``.
"""

from __future__ import annotations

import argparse
import os
import sys

if "--quick" in sys.argv:
    # Quick mode: the eager kernels of the reversible engine; compiling them (torch.compile,
    # done once per process for chains of 32768 elements or more) would take longer than the run.
    os.environ.setdefault("FXMOMENTUM_COMPILE", "0")

import torch
from torch import nn

import fxmomentum
from fxmomentum.tools.profiling import profile


class Block(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))``, as torchvision's BasicBlock."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class SmallResNet(nn.Module):
    """A stem, ``depth`` residual blocks at 8x8, global pooling and a linear classifier."""

    def __init__(self, channels: int = 16, depth: int = 6, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[Block(channels) for _ in range(depth)])
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


#: For ``fxmomentum profile examples/finetune_digits.py:SmallResNet``.
example_inputs = torch.zeros(64, 1, 8, 8)


def load_data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Digits as ``(N, 1, 8, 8)`` floats in [0, 1]; a fixed 75/25 train/test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.75 * len(y))
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test]


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> float:
    """Adam on mini-batches of 64; returns the last epoch's mean loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    model.train()
    mean = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        mean = total / count
    return mean


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs, a few seconds")
    args = parser.parse_args(argv)
    epochs, finetune, mem_batch, steps = (2, 1, 96, 2) if args.quick else (10, 3, 256, 3)
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_data()
    print(f"digits: {len(y_train)} training and {len(y_test)} test images, 8x8")

    model = SmallResNet()
    loss = fit(model, x_train, y_train, epochs, lr=3e-3)
    acc_original = accuracy(model, x_test, y_test)
    print(f"original ResNet, {epochs} epochs of backprop: loss {loss:.3f}, "
          f"test accuracy {acc_original:.3f}")  # fmt: skip

    converted, report = fxmomentum.convert(
        model, gamma=0.9, example_inputs=x_train[:64], return_report=True
    )
    print(report.summary())
    acc_converted = accuracy(converted, x_test, y_test)
    print(f"converted (gamma 0.9), before fine-tuning: test accuracy {acc_converted:.3f}")
    loss = fit(converted, x_train, y_train, finetune, lr=1e-3)
    acc_finetuned = accuracy(converted, x_test, y_test)
    print(f"converted, {finetune} epoch(s) of reversible fine-tuning: loss {loss:.3f}, "
          f"test accuracy {acc_finetuned:.3f} (original {acc_original:.3f})")  # fmt: skip

    # Memory and time of one training step of this architecture, original vs converted.
    result = profile(f"{__file__}:SmallResNet", input_shapes=[(mem_batch, 1, 8, 8)], steps=steps)
    print(f"one training step at batch {mem_batch}: activation memory "
          f"{result.memory['original'] / 2**20:.2f} MiB original, "
          f"{result.memory['converted'] / 2**20:.2f} MiB converted "
          f"({result.memory_ratio:.2f}x); time {result.time_ratio:.2f}x")  # fmt: skip

    if args.quick:
        print("(quick mode: eager kernels and a small batch, so the memory figures say little)")
    if not args.quick and abs(acc_finetuned - acc_original) > 0.03:
        print("FAILED: the fine-tuned converted model is not as accurate as the original")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
