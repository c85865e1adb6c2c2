"""How long planning a memory budget takes: ``inspect(model, x, memory_budget=b)`` in a fresh
process (capture, the measured run of every region, the dynamic program), wall time.

The issue's models: ResNet-101 (batch 8, 3x96x96) and vit_b_16 (batch 8, 3x224x224), random
weights::

    python benchmarks/plan_time.py            # both, one fresh process each
    python benchmarks/plan_time.py --child resnet101 8 96
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

MODELS = [("resnet101", 8, 96), ("vit_b_16", 8, 224)]


def child(name: str, batch: int, size: int, budget: float) -> None:
    import torch
    import torchvision

    import fxmomentum

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    x = torch.randn(batch, 3, size, size)
    start = time.perf_counter()
    report = fxmomentum.inspect(model, x, gamma=0.9, memory_budget=budget)
    seconds = time.perf_counter() - start
    plan = report.plan
    print(
        f"{name} batch {batch} {size}x{size}, memory_budget {budget:g}: {seconds:.1f} s "
        f"(plan: {plan.memory_ratio:.2f}x memory, {plan.time_ratio:.2f}x time, estimated)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "BATCH", "SIZE"))
    parser.add_argument("--budget", type=float, default=0.4)
    args = parser.parse_args()
    if args.child:
        name, batch, size = args.child
        child(name, int(batch), int(size), args.budget)
        return
    for name, batch, size in MODELS:
        command = [sys.executable, __file__, "--child", name, str(batch), str(size)]
        subprocess.run([*command, "--budget", str(args.budget)], check=True)


if __name__ == "__main__":
    main()
