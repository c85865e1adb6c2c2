"""Step time (CPU time of one thread) and memory of bench_budget's configurations.

Wall-clock ratios on a shared 2-core machine scatter by 0.3x; the CPU time of one thread moves
far less with the load. Builds each configuration of ``bench_budget.py`` (the original,
checkpoint per block, and for each gamma: every chain kept, every chain reversible, plans at
the budgets given), runs two warm-up steps each, then ROUNDS rounds in which every
configuration takes one training step in turn, and prints each one's median ratio to the
original's step, with every round's ratio, as JSON. ``--memory`` also measures each
configuration's activation memory in a fresh process (``bench_budget._memory``)::

    python benchmarks/budget_cpu_time.py resnet 0,0.4,0.42 7 --gammas 0.9,0 --memory
    python benchmarks/budget_cpu_time.py transformer 0,0.205 5 --gammas 0.9,0 --memory

"every chain kept" at a gamma is the converted model with plain autograd
(``use_backprop=True``): its own arithmetic (the momentum update per block) and nothing saved,
the least time any plan at that gamma can take.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_budget import FULL, _memory, build
from harness import train_step


def _configs(budgets: list[float], gammas: list[float]) -> list[tuple[str, float | None, float]]:
    out: list[tuple[str, float | None, float]] = [
        ("original", None, 0.0),
        ("checkpoint", None, 0.0),
    ]
    for gamma in gammas:
        out.append(("kept", None, gamma))
        if gamma > 0:
            out.append(("reversible", None, gamma))
        out += [("planned", b, gamma) for b in budgets]
    return out


def _label(kind: str, budget: float | None, gamma: float) -> str:
    if kind in ("original", "checkpoint"):
        return kind
    return f"{kind}{'' if budget is None else f' {budget:g}'} (gamma {gamma:g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=sorted(FULL))
    parser.add_argument("budgets", help="comma-separated memory budgets, e.g. 0,0.42")
    parser.add_argument("rounds", type=int)
    parser.add_argument("--gammas", default="0.9", help="comma-separated, e.g. 0.9,0")
    parser.add_argument("--memory", action="store_true", help="also measure memory")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    gammas = [float(g) for g in args.gammas.split(",")]
    sizes = FULL[args.bench]
    configs = _configs(budgets, gammas)
    torch.set_num_threads(1)
    work = {}
    for kind, budget, gamma in configs:
        start = time.time()
        work[(kind, budget, gamma)] = build(args.bench, kind, budget, gamma, **sizes)
        for _ in range(2):
            train_step(work[(kind, budget, gamma)])
        label = _label(kind, budget, gamma)
        print(f"built {label} in {time.time() - start:.0f}s", file=sys.stderr, flush=True)
    times = {k: [] for k in work}
    for r in range(args.rounds):
        for k, w in work.items():
            t = time.process_time()
            train_step(w)
            times[k].append(time.process_time() - t)
        print(f"round {r}", file=sys.stderr, flush=True)
    base = times[("original", None, 0.0)]
    out = {}
    for k, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base, strict=True)]
        out[_label(*k)] = {"median": statistics.median(ratios), "ratios": ratios}
    if args.memory:
        del work
        memory = {k: _memory(args.bench, k[0], sizes, k[1], k[2]) for k in times}
        original = memory[("original", None, 0.0)]
        for k, nbytes in memory.items():
            out[_label(*k)].update(memory_bytes=nbytes, memory_ratio=nbytes / original)
            print(f"memory {_label(*k)}: {nbytes / original:.3f}", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
