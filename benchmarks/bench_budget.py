"""The memory planner measured: plans at several budgets against the original and checkpointing.

For ResNet-101 (batch 8, 3x96x96) and the 12-layer pre-norm encoder stack (d 256, 8 heads, ff
1024, seq 256, batch 8, dropout 0), in the same run:

- the original's training step, torch.utils.checkpoint per block (non-reentrant), and
  ``fxmomentum.convert`` with every chain reversible (no budget);
- ``fxmomentum.convert(..., memory_budget=b)`` for the least-memory plan (b = 0), the plan at
  checkpoint per block's own measured memory, and a few budgets between;

each one's activation memory in a fresh process and its step time against the original's
(paired, interleaved, median), with the plan's own estimates beside the measurements, and a plot
of the memory / time curve. Run ``python benchmarks/bench_budget.py`` (about 20-40 minutes on
2 cores; ``--quick``: small sizes, for a smoke test); results in ``benchmarks/results/budget.md``,
``budget.json`` and ``budget_*.png``. Methods: "How things are measured" (ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_models import Checkpointed, encoder_stack
from harness import Workload, measure_memory, paired_time, train_step
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

import fxmomentum

HERE = Path(__file__).resolve().parent
BUILDER = "bench_budget:build"
GAMMA = 0.9
MIB = 1024 * 1024

FULL = {
    "resnet": {"layers": [3, 4, 23, 3], "batch": 8, "size": 96},
    "transformer": {"layers": 12, "width": 256, "heads": 8, "ff": 1024, "seq": 256, "batch": 8},
}
QUICK = {
    "resnet": {"layers": [1, 2, 3, 1], "batch": 2, "size": 32},
    "transformer": {"layers": 3, "width": 32, "heads": 4, "ff": 64, "seq": 16, "batch": 2},
}
#: Targets of the issue (memory ratios to the original's; times to checkpoint per block's).
TARGETS = {"resnet": {"least": 0.30}, "transformer": {}}


def model_and_input(bench: str, sizes: dict[str, Any]) -> tuple[nn.Module, torch.Tensor]:
    """The original model and its input (random weights, seeded)."""
    torch.manual_seed(0)
    if bench == "resnet":
        model = ResNet(Bottleneck, list(sizes["layers"]))
        return model, torch.randn(sizes["batch"], 3, sizes["size"], sizes["size"])
    s = dict(sizes)
    stack = encoder_stack(s["layers"], s["width"], s["heads"], s["ff"])
    for m in stack.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, nn.MultiheadAttention):  # its own attention dropout, a float
            m.dropout = 0.0
    return stack, torch.randn(s["batch"], s["seq"], s["width"])


def _checkpointed(bench: str, model: nn.Module) -> nn.Module:
    if bench == "resnet":
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            for i in range(len(stage)):
                stage[i] = Checkpointed(stage[i])
        return model
    return nn.Sequential(*[Checkpointed(layer) for layer in model])


def build(
    bench: str, kind: str, budget: float | None = None, gamma: float = GAMMA, **sizes: Any
) -> Workload:
    """One configuration: ``original``, ``checkpoint``, ``reversible``, ``planned`` or
    ``kept`` (converted at ``gamma`` with every chain kept: what the converted model's own
    arithmetic costs, the least time of any plan at that gamma)."""
    model, x = model_and_input(bench, sizes)
    if kind == "checkpoint":
        model = _checkpointed(bench, model)
    elif kind == "reversible":
        model = fxmomentum.convert(model, gamma, example_inputs=x)
    elif kind == "kept":
        model = fxmomentum.convert(model, gamma, example_inputs=x, use_backprop=True)
    elif kind == "planned":
        model = fxmomentum.convert(model, gamma, example_inputs=x, memory_budget=budget)
    elif kind != "original":
        raise ValueError(f"unknown kind {kind!r}")
    return Workload(model.train(), (x,))


def _memory(
    bench: str,
    kind: str,
    sizes: dict[str, Any],
    budget: float | None = None,
    gamma: float = GAMMA,
) -> int:
    kwargs = {"bench": bench, "kind": kind, "budget": budget, "gamma": gamma, **sizes}
    return int(measure_memory(kind, BUILDER, kwargs)["peak_bytes"])


def _time(bench: str, kinds: list[tuple[str, float | None]], sizes: dict, repeats: int):
    """Each configuration's step time over the original's, paired and interleaved."""
    base = build(bench, "original", **sizes)
    out = {}
    for kind, budget in kinds:
        other = build(bench, kind, budget, **sizes)
        for _ in range(2):  # compile the engine's kernels, warm the allocator
            train_step(other)
        timing = paired_time(lambda: train_step(base), lambda o=other: train_step(o), repeats)
        out[_label(kind, budget)] = {"ratio": timing.ratio, "ratios": timing.ratios}
    return out


def _label(kind: str, budget: float | None) -> str:
    return kind if budget is None else f"planned {budget:g}"


def run(bench: str, sizes: dict[str, Any], budgets: list[float], repeats: int, log) -> dict:
    """Measure one model: the references, then the plans."""
    model, x = model_and_input(bench, sizes)
    log(f"{bench}: planning (measuring the regions once)")
    start = time.perf_counter()
    report = fxmomentum.inspect(model, x, gamma=GAMMA, memory_budget=0.0)
    plan_seconds = time.perf_counter() - start
    memory = {}
    for kind in ("original", "checkpoint", "reversible"):
        log(f"{bench}: memory of {kind}")
        memory[kind] = _memory(bench, kind, sizes)
    at_checkpoint = memory["checkpoint"] / memory["original"]
    budgets = sorted({*budgets, round(at_checkpoint, 3)})
    estimates = {}
    for budget in budgets:
        log(f"{bench}: memory of the plan at budget {budget:g}")
        memory[_label("planned", budget)] = _memory(bench, "planned", sizes, budget)
        plan = fxmomentum.inspect(model, x, gamma=GAMMA, memory_budget=budget).plan
        estimates[_label("planned", budget)] = {
            "memory_ratio": plan.memory_ratio,
            "time_ratio": plan.time_ratio,
            "strategies": [(r.name, r.strategy) for r in plan.regions if r.strategy != "keep"],
        }
    log(f"{bench}: timing {repeats} interleaved pairs per configuration")
    kinds = [("checkpoint", None), ("reversible", None), *[("planned", b) for b in budgets]]
    times = _time(bench, kinds, sizes, repeats)
    return {
        "sizes": sizes,
        "memory_bytes": memory,
        "memory_ratio": {k: v / memory["original"] for k, v in memory.items()},
        "times": times,
        "estimates": estimates,
        "at_checkpoint_budget": round(at_checkpoint, 3),
        "least_estimate": report.plan.least_bytes / report.plan.original_bytes,
        "plan_seconds": plan_seconds,
    }


def _section(bench: str, r: dict[str, Any]) -> list[str]:
    ratio, times, est = r["memory_ratio"], r["times"], r["estimates"]
    lines = [
        f"## {bench}: {json.dumps(r['sizes'])}",
        "",
        "| configuration | activation memory (MiB) | memory ratio | estimated | time ratio | "
        "estimated |",
        "|---|---|---|---|---|---|",
        f"| original | {r['memory_bytes']['original'] / MIB:.1f} | 1.00x | - | 1.00x | - |",
    ]
    for label in ("checkpoint", "reversible", *est):
        e = est.get(label, {})
        mem_est = f"{e['memory_ratio']:.2f}x" if e else "-"
        time_est = f"{e['time_ratio']:.2f}x" if e else "-"
        name = {"checkpoint": "torch.utils.checkpoint per block",
                "reversible": "fxmomentum.convert (every chain reversible)"}.get(
            label, f"fxmomentum.convert(memory_budget={label.split()[-1]})")  # fmt: skip
        lines.append(
            f"| {name} | {r['memory_bytes'][label] / MIB:.1f} | {ratio[label]:.2f}x | "
            f"{mem_est} | {times[label]['ratio']:.2f}x | {time_est} |"
        )
    at = f"planned {r['at_checkpoint_budget']:g}"
    lines += [
        "",
        f"- Least-memory plan (budget 0): {ratio['planned 0']:.2f}x measured "
        f"(estimated {est['planned 0']['memory_ratio']:.2f}x).",
        f"- Plan at checkpoint per block's measured memory (budget {r['at_checkpoint_budget']:g}):"
        f" {ratio[at]:.2f}x memory (checkpoint {ratio['checkpoint']:.2f}x), "
        f"{times[at]['ratio']:.2f}x time (checkpoint {times['checkpoint']['ratio']:.2f}x).",
        f"- Planning (measuring the regions and solving) took {r['plan_seconds']:.1f} s.",
        "- Strategies other than keep, per plan: "
        + "; ".join(f"{k}: {len(v['strategies'])} regions" for k, v in est.items()),
        "",
    ]
    return lines


def _plot(bench: str, r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    est = r["estimates"]
    labels = sorted(est, key=lambda k: float(k.split()[-1]))
    ax.plot([r["memory_ratio"][k] for k in labels], [r["times"][k]["ratio"] for k in labels],
            "o-", label="fxmomentum plans (measured)")  # fmt: skip
    ax.plot([est[k]["memory_ratio"] for k in labels], [est[k]["time_ratio"] for k in labels],
            "x--", alpha=0.6, label="plans (estimated)")  # fmt: skip
    for kind, marker in (("original", "s"), ("checkpoint", "^"), ("reversible", "D")):
        t = 1.0 if kind == "original" else r["times"][kind]["ratio"]
        ax.plot([r["memory_ratio"][kind]], [t], marker, markersize=9, label=kind)
    ax.set_xlabel("activation memory / original's")
    ax.set_ylabel("step time / original's")
    ax.set_title(f"{bench}: memory budget 0 .. 1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    parser.add_argument("--only", default="resnet,transformer", help="resnet,transformer")
    parser.add_argument("--budgets", default="0,0.2,0.5,0.8,1", help="budgets besides")
    parser.add_argument("--time-repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    sizes = QUICK if args.quick else FULL
    budgets = [float(b) for b in args.budgets.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[bench_budget] {message}", file=sys.stderr, flush=True)

    results = {}
    for bench in args.only.split(","):
        results[bench] = run(bench, sizes[bench], budgets, args.time_repeats, log)
        _plot(bench, results[bench], args.out / f"budget_{bench}.png")
    env = f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads"
    lines = [
        "# Memory budgets: plans measured against the original and checkpointing",
        "",
        f"Generated by `python benchmarks/bench_budget.py{' --quick' if args.quick else ''}` "
        f"({env}, {time.strftime('%Y-%m-%d')}). Activation memory in a fresh process per "
        f"configuration; time ratios are medians of {args.time_repeats} interleaved pairs "
        f"against the original; 'estimated' is the plan's own estimate (report.plan).",
        "",
    ]
    for bench, r in results.items():
        lines += _section(bench, r)
    (args.out / "budget.md").write_text("\n".join(lines))
    (args.out / "budget.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
