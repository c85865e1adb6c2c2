"""Fine-tune a converted model from trained weights: gamma 0.9 at once, or raised by a schedule.

The handwritten digits (8x8 images, shipped with scikit-learn: ``sklearn.datasets.load_digits``,
nothing is downloaded) are classified by a small ResNet of BasicBlock-style residual blocks,
trained with plain backprop. Then three runs fine-tune from those weights, the test accuracy
measured after each epoch (epoch 0: before fine-tuning):

* the original, trained on with backprop (the reference);
* converted with ``fxmomentum.convert(model, gamma=0.9)`` and fine-tuned reversibly: at 0.9 the
  converted model computes another function of the same weights, so its accuracy drops at
  first and fine-tuning brings it back;
* converted the same way, gamma raised from 0.1 (close to the original) to 0.9 over the first
  epochs by ``fxmomentum.GammaScheduler``, one step per optimizer step.

It prints the table and plots it (``--out``, a PNG; the full run writes
``examples/results/finetune_digits.png`` and ``.md``, shown in the README).
``fxmomentum.tools.profiling`` then measures the activation memory and time of one training
step of both models (a fresh process per configuration).

Run ``python examples/finetune_digits.py`` (``--quick``: a few seconds, no files unless
``--out``). Needs scikit-learn (and matplotlib for the plot). The model is also a target for
the command line: ``fxmomentum profile examples/finetune_digits.py:SmallResNet --batch 256``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

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


HERE = Path(__file__).resolve().parent
RUNS = ("original (backprop)", "gamma 0.9 at once", "gamma 0.1 -> 0.9 (GammaScheduler)")


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    *,
    scheduler: fxmomentum.GammaScheduler | None = None,
    after_epoch=None,
) -> float:
    """Adam on mini-batches of 64; returns the last epoch's mean loss. ``scheduler.step()``
    after every optimizer step; ``after_epoch(model)`` after every epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    mean = float("nan")
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        mean = total / count
        if after_epoch is not None:
            after_epoch(model)
    return mean


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def table(curves: dict[str, list[float]]) -> str:
    """The accuracies as a markdown table, one row per epoch."""
    lines = ["| epoch | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
    for epoch in range(len(next(iter(curves.values())))):
        cells = " | ".join(f"{c[epoch]:.3f}" for c in curves.values())
        lines.append(f"| {epoch} | {cells} |")
    return "\n".join(lines)


def plot(curves: dict[str, list[float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for (label, acc), marker in zip(curves.items(), "os^", strict=True):
        ax.plot(range(len(acc)), acc, marker=marker, label=label)
    ax.set_xlabel("fine-tuning epoch (0: before)")
    ax.set_ylabel("test accuracy")
    ax.set_title("digits: fine-tuning a converted SmallResNet")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs, a few seconds")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="PNG of the accuracies (a .md table next to it); default "
        "examples/results/finetune_digits.png, none with --quick",
    )
    args = parser.parse_args(argv)
    quick = (2, 1, 0.5, 96, 2)  # epochs: training, fine-tuning, gamma's ramp
    epochs, finetune, ramp, mem_batch, steps = quick if args.quick else (10, 8, 4, 256, 3)
    out = args.out or (None if args.quick else HERE / "results" / "finetune_digits.png")
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
    scheduled = fxmomentum.convert(model, gamma=0.9, example_inputs=x_train[:64])
    ramp_steps = round(ramp * -(-len(y_train) // 64))
    scheduler = fxmomentum.GammaScheduler(scheduled, start=0.1, end=0.9, steps=ramp_steps)
    print(f"schedule: gamma 0.1 -> 0.9 over {ramp:g} epoch(s) ({ramp_steps} steps), linear")

    curves: dict[str, list[float]] = {}
    losses: dict[str, float] = {}
    for label, net, sched in zip(
        RUNS, (copy.deepcopy(model), converted, scheduled), (None, None, scheduler), strict=True
    ):
        curve = [accuracy(net, x_test, y_test)]

        def measure(m: nn.Module, curve: list[float] = curve) -> None:
            curve.append(accuracy(m, x_test, y_test))

        losses[label] = fit(net, x_train, y_train, finetune, 1e-3, scheduler=sched,
                            after_epoch=measure)  # fmt: skip
        curves[label] = curve
        print(f"{label}: test accuracy {curve[0]:.3f} before fine-tuning, {curve[-1]:.3f} after "
              f"{finetune} epoch(s) (loss {losses[label]:.3f})")  # fmt: skip
    acc_converted, acc_finetuned = curves[RUNS[1]][0], curves[RUNS[1]][-1]
    acc_scheduled = curves[RUNS[2]][-1]
    print(f"converted (gamma 0.9), before fine-tuning: test accuracy {acc_converted:.3f}")
    print(f"converted, {finetune} epoch(s) of reversible fine-tuning: loss {losses[RUNS[1]]:.3f}, "
          f"test accuracy {acc_finetuned:.3f} (original {acc_original:.3f})")  # fmt: skip
    print(f"final gamma of the scheduled run: {scheduler.get_last_gamma():g}")
    print("test accuracy per fine-tuning epoch:")
    print(table(curves))
    if out is not None and plot(curves, out):
        out.with_suffix(".md").write_text(
            f"Test accuracy per fine-tuning epoch (`python examples/finetune_digits.py`; "
            f"pretrained {epochs} epochs with backprop, then fine-tuned {finetune} epochs, "
            f"Adam lr 1e-3, batch 64):\n\n{table(curves)}\n"
        )
        print(f"wrote {out} and {out.with_suffix('.md')}")

    # Memory and time of one training step of this architecture, original vs converted.
    result = profile(f"{__file__}:SmallResNet", input_shapes=[(mem_batch, 1, 8, 8)], steps=steps)
    print(f"one training step at batch {mem_batch}: activation memory "
          f"{result.memory['original'] / 2**20:.2f} MiB original, "
          f"{result.memory['converted'] / 2**20:.2f} MiB converted "
          f"({result.memory_ratio:.2f}x); time {result.time_ratio:.2f}x")  # fmt: skip

    if args.quick:
        print("(quick mode: eager kernels and a small batch, so the memory figures say little)")
    if not args.quick and (
        abs(acc_finetuned - acc_original) > 0.03 or abs(acc_scheduled - acc_original) > 0.03
    ):
        print("FAILED: a fine-tuned converted model is not as accurate as the original")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
