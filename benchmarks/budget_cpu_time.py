"""Step time of bench_budget's configurations as CPU time of one thread.

Wall-clock ratios on a shared 2-core machine scatter by 0.3x; the CPU time of one thread moves
far less with the load. Builds each configuration of ``bench_budget.py`` (original, checkpoint
per block, every chain reversible, plans at the budgets given), runs two warm-up steps each,
then ROUNDS rounds in which every configuration takes one training step in turn, and prints
each one's median ratio to the original's step, with every round's ratio, as JSON::

    python benchmarks/budget_cpu_time.py resnet 0,0.42 5
    python benchmarks/budget_cpu_time.py transformer 0,0.123 4
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_budget import FULL, build
from harness import train_step

bench = sys.argv[1]
budgets = [float(b) for b in sys.argv[2].split(",")]
rounds = int(sys.argv[3])
torch.set_num_threads(1)
sizes = FULL[bench]
configs = [("original", None), ("checkpoint", None), ("reversible", None)] + [
    ("planned", b) for b in budgets
]
work = {}
for kind, b in configs:
    t0 = time.time()
    work[(kind, b)] = build(bench, kind, b, **sizes)
    for _ in range(2):
        train_step(work[(kind, b)])
    print(f"built {kind} {b} in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
times = {k: [] for k in work}
for r in range(rounds):
    for k, w in work.items():
        t = time.process_time()
        train_step(w)
        times[k].append(time.process_time() - t)
    print(f"round {r}", file=sys.stderr, flush=True)
base = times[("original", None)]
out = {}
for k, ts in times.items():
    ratios = [t / b for t, b in zip(ts, base, strict=True)]
    out[f"{k[0]} {k[1] if k[1] is not None else ''}".strip()] = {
        "median": statistics.median(ratios),
        "ratios": ratios,
    }
print(json.dumps(out, indent=1))
