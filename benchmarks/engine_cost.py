"""Where a reversible ResNet step's time goes, against checkpointing, forward and backward apart.

Issue 17's target compares a reversible chain's step with checkpoint per block. This script
measures, in one process and interleaved step by step (CPU time of one thread, as
``budget_cpu_time.py``), the forward and the backward of each configuration apart:

- ``original``: the model as built;
- ``checkpoint``: ``torch.utils.checkpoint`` (non-reentrant) per block, every block;
- ``checkpoint_chained``: the same on the blocks the chains hold only;
- ``recompute``: the recomputation floor (each chain block run once more, nothing else);
- ``reversible``: converted at gamma 0.9, every chain reversible (``convert``'s default);
- ``backprop``: converted at gamma 0.9, plain autograd (what the momentum update costs);
- ``recomputed``: converted at gamma 0.9, every chain recomputed block by block (checkpoint
  per block on the converted model's own blocks).

It prints, per configuration, the median forward, backward and step over the original's step,
and each configuration's median per-round step ratio to ``checkpoint``'s. Only ratios::

    python benchmarks/engine_cost.py --rounds 15
    python benchmarks/engine_cost.py --rounds 9 --kinds checkpoint,reversible  # the pair alone
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import GAMMA, build

import fxmomentum
from fxmomentum.engine.chain import MomentumChain

KINDS = (
    "original",
    "checkpoint",
    "checkpoint_chained",
    "recompute",
    "reversible",
    "backprop",
    "recomputed",
)


def _workload(kind: str, layers: list[int], size: int, batch: int):
    sizes = dict(layers=layers, batch=batch, size=size)
    if kind != "recomputed":
        return build("resnet", kind, **sizes)
    work = build("resnet", "original", **sizes)
    model = fxmomentum.convert(work.model, GAMMA, example_inputs=work.inputs)
    for chain in model.modules():
        if isinstance(chain, MomentumChain):
            chain.strategy = "recompute"
    work.model = model.train()
    return work


def _step(work) -> tuple[float, float]:
    start = time.thread_time()
    loss = work.model(*work.inputs).sum()
    middle = time.thread_time()
    loss.backward()
    return middle - start, time.thread_time() - middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", default="3,4,23,3", help="blocks per stage (ResNet-101)")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="configurations, checkpoint among them"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = [int(n) for n in args.layers.split(",")]
    asked = args.kinds.split(",")
    unknown = sorted(set(asked) - set(KINDS))
    if unknown:
        known = ", ".join(KINDS)
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {known}")
    kinds = [kind for kind in KINDS if kind in asked]
    if "checkpoint" not in kinds or len(kinds) < 2:
        parser.error(f"--kinds needs checkpoint and another of {', '.join(KINDS)}")
    work = {kind: _workload(kind, layers, args.size, args.batch) for kind in kinds}
    for w in work.values():
        for _ in range(2):
            _step(w)
    forward: dict[str, list[float]] = {k: [] for k in kinds}
    backward: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind, w in work.items():
            f, b = _step(w)
            forward[kind].append(f)
            backward[kind].append(b)
    steps = {k: [f + b for f, b in zip(forward[k], backward[k], strict=True)] for k in kinds}
    base = statistics.median(steps["original" if "original" in kinds else "checkpoint"])
    rows = []
    for kind in kinds:
        to_ckpt = [s / c for s, c in zip(steps[kind], steps["checkpoint"], strict=True)]
        rows.append(
            [
                kind,
                f"{statistics.median(forward[kind]) / base:.3f}",
                f"{statistics.median(backward[kind]) / base:.3f}",
                f"{statistics.median(steps[kind]) / base:.3f}",
                f"{statistics.median(to_ckpt):.3f} ({min(to_ckpt):.2f}-{max(to_ckpt):.2f})",
            ]
        )
    print(
        f"ResNet (layers {args.layers}), batch {args.batch}, 3x{args.size}x{args.size}, "
        f"gamma {GAMMA:g}, {args.rounds} interleaved rounds, CPU time of one thread; times over "
        f"the {'original' if 'original' in kinds else 'checkpoint'}'s step"
    )
    headers = ["configuration", "forward", "backward", "step", "step / checkpoint"]
    print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
