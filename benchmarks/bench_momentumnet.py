"""Benchmark of MomentumNet: memory and time of a training step, gradient accuracy.

Compares, on chains of ``Linear - Tanh - Linear`` blocks:

- ``fxmomentum.MomentumNet(..., use_backprop=False)``: the reversible chain;
- ``fxmomentum.MomentumNet(..., use_backprop=True)``: plain autograd;
- the same with every block under ``torch.utils.checkpoint`` (what users pick instead),
  non-reentrant (PyTorch's recommended form) and, timed only, reentrant (no graph in forward,
  the recomputation floor of any method that recomputes each block);
- the official library ``momentumnet`` (reversible mode), when it is installed.

Run ``python benchmarks/bench_momentumnet.py`` to regenerate ``benchmarks/results/`` (markdown
tables, JSON and PNG plots); ``--quick`` runs tiny sizes in a few seconds (a smoke test).
Methods follow "How things are measured" in DESIGN.md; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from harness import Workload, measure_memory, paired_time, train_step, zero_grads
from torch import nn
from torch.utils.checkpoint import checkpoint

import fxmomentum

HERE = Path(__file__).resolve().parent
BUILDER = "bench_momentumnet:build_chain"
GAMMA = 0.9
MIB = 1024 * 1024

#: Configuration kinds and how the tables name them.
LABELS = {
    "backprop": "backprop",
    "checkpoint": "checkpoint per block",
    "checkpoint_reentrant": "checkpoint per block (reentrant)",
    "reversible": "reversible",
    "official_reversible": "momentumnet reversible",
    "official_backprop": "momentumnet backprop",
}


# -- models ----------------------------------------------------------------------------------------
def official_status() -> tuple[bool, str]:
    """Whether the official library ``momentumnet`` imports, and its version or the error."""
    try:
        import momentumnet
    except Exception as exc:  # any import failure means "skip it"
        return False, f"{type(exc).__name__}: {exc}"
    return True, str(getattr(momentumnet, "__version__", "unknown version"))


def make_blocks(
    depth: int, width: int, hidden: int, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> list[nn.Module]:
    """``depth`` blocks ``Linear(width, hidden) - Tanh - Linear(hidden, width)``.

    Built in float64 from ``seed`` and cast to ``dtype``, so that copies of different dtypes
    hold the same weights (rounded).
    """
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        blocks = [
            nn.Sequential(
                nn.Linear(width, hidden, dtype=torch.float64),
                nn.Tanh(),
                nn.Linear(hidden, width, dtype=torch.float64),
            )
            for _ in range(depth)
        ]
    finally:
        torch.random.set_rng_state(gen_state)
    return [b.to(dtype) for b in blocks]


class Checkpointed(nn.Module):
    """Runs ``block`` under ``torch.utils.checkpoint`` (non-reentrant unless ``reentrant``):
    only its input is kept."""

    def __init__(self, block: nn.Module, reentrant: bool = False) -> None:
        super().__init__()
        self.block = block
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=self.reentrant)


def make_model(kind: str, blocks: Sequence[nn.Module], gamma: float) -> nn.Module:
    """A momentum chain of ``kind`` (a key of :data:`LABELS`) over ``blocks``."""
    if kind == "backprop":
        return fxmomentum.MomentumNet(list(blocks), gamma, use_backprop=True)
    if kind == "reversible":
        return fxmomentum.MomentumNet(list(blocks), gamma, use_backprop=False)
    if kind in ("checkpoint", "checkpoint_reentrant"):
        wrapped = [Checkpointed(b, reentrant=kind == "checkpoint_reentrant") for b in blocks]
        return fxmomentum.MomentumNet(wrapped, gamma, use_backprop=True)
    if kind in ("official_reversible", "official_backprop"):
        from momentumnet import MomentumNet as OfficialMomentumNet

        return OfficialMomentumNet(list(blocks), gamma, use_backprop=kind == "official_backprop")
    raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(LABELS)}")


def build_chain(
    kind: str,
    depth: int,
    width: int,
    hidden: int,
    batch: int,
    gamma: float = GAMMA,
    seed: int = 0,
) -> Workload:
    """The benchmark's workload: a momentum chain and an input that requires grad.

    This is the builder :func:`harness.measure_memory` names as ``bench_momentumnet:build_chain``.

    Parameters
    ----------
    kind : str
        A key of :data:`LABELS`.
    depth, width, hidden : int
        Number of blocks, their input/output width and hidden width.
    batch : int
        Rows of the input.
    gamma : float
        Momentum.
    seed : int
        Seed of the weights; the input uses ``seed + 1``.

    Returns
    -------
    Workload
    """
    model = make_model(kind, make_blocks(depth, width, hidden, seed=seed), gamma)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, width, generator=gen).requires_grad_(True)
    return Workload(model, (x,))


# -- memory ----------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Sizes of one run (full or quick)."""

    mem_depths: list[int]
    mem_backprop_max_depth: int
    mem_official_max_depth: int
    mem_width: int
    mem_hidden: int
    mem_batch: int
    time_depth: int
    time_width: int
    time_hidden: int
    time_batch: int
    time_repeats: int
    time_repeats_official: int
    time_warmup: int
    grad_depths: list[int]
    grad_gammas: list[float]
    grad_width: int
    grad_hidden: int
    grad_batch: int
    memory_repeats: int = 1
    memory_jobs: int = 1
    #: Time steps by this process's CPU time (``time.process_time``) rather than wall time.
    cpu_time: bool = False
    #: Kinds measured for memory (default: all of ``kinds``).
    mem_kinds: list[str] | None = None
    kinds: list[str] = field(default_factory=list)


FULL = Settings(
    mem_depths=[8, 16, 32, 64, 128, 256, 512],
    mem_backprop_max_depth=512,
    # The official library takes about 20 s per step at depth 128 on 2 cores.
    mem_official_max_depth=128,
    mem_width=256,
    mem_hidden=64,
    mem_batch=1024,
    time_depth=64,
    time_width=256,
    time_hidden=256,
    time_batch=512,
    time_repeats=25,
    time_repeats_official=8,
    time_warmup=2,
    grad_depths=[10, 100, 1000],
    grad_gammas=[0.5, 0.9, 0.99],
    grad_width=32,
    grad_hidden=16,
    grad_batch=16,
)

# Quick sizes: tensors over the mmap threshold (so memory shows) but under the engine's
# compile threshold (so no compilation).
QUICK = Settings(
    mem_depths=[4],
    mem_backprop_max_depth=4,
    mem_official_max_depth=4,
    mem_width=256,
    mem_hidden=16,
    mem_batch=64,
    time_depth=4,
    time_width=64,
    time_hidden=16,
    time_batch=16,
    time_repeats=3,
    time_repeats_official=3,
    time_warmup=1,
    grad_depths=[2, 8],
    grad_gammas=[0.9],
    grad_width=16,
    grad_hidden=8,
    grad_batch=4,
    memory_jobs=2,
    mem_kinds=["backprop", "reversible"],
)


def run_memory(s: Settings, device: str, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Activation memory of a training step against depth, one fresh process per point.

    ``s.memory_jobs`` children may run at once: each measures its own resident set, so this
    changes the time taken, not the figures (the quick mode uses 2).
    """
    points = [
        (kind, depth)
        for kind in s.kinds
        if s.mem_kinds is None or kind in s.mem_kinds
        for depth in s.mem_depths
        if not (kind in ("backprop", "official_backprop") and depth > s.mem_backprop_max_depth)
        and not (kind.startswith("official") and depth > s.mem_official_max_depth)
    ]

    def one(point: tuple[str, int]) -> dict[str, Any]:
        kind, depth = point
        kwargs = dict(
            kind=kind,
            depth=depth,
            width=s.mem_width,
            hidden=s.mem_hidden,
            batch=s.mem_batch,
            gamma=GAMMA,
        )
        start = time.perf_counter()
        try:
            res = measure_memory(
                f"{kind}-{depth}", BUILDER, kwargs, device=device, repeats=s.memory_repeats
            )
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log(f"  memory {kind} depth {depth}: FAILED {str(exc).splitlines()[0]}")
            return {"kind": kind, "depth": depth, "error": str(exc)[-500:]}
        res.update(kind=kind, depth=depth)
        log(
            f"  memory {kind:>20} depth {depth:>4}: {res['peak_bytes'] / MIB:8.1f} MiB"
            f"  ({time.perf_counter() - start:.1f} s)"
        )
        return res

    if s.memory_jobs <= 1:
        return [one(p) for p in points]
    with ThreadPoolExecutor(s.memory_jobs) as pool:
        return list(pool.map(one, points))


# -- time ------------------------------------------------------------------------------------------
def run_time(s: Settings, device: str, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Median ratio of paired train steps of each kind against backprop."""
    workloads = {
        kind: build_chain(kind, s.time_depth, s.time_width, s.time_hidden, s.time_batch, GAMMA).to(
            device
        )
        for kind in s.kinds
    }
    sync = torch.cuda.synchronize if device.startswith("cuda") else None

    def step_of(w: Workload) -> Callable[[], None]:
        def step() -> None:
            zero_grads(w)
            train_step(w)

        return step

    base = step_of(workloads["backprop"])
    rows = []
    for kind in s.kinds:
        if kind == "backprop":
            continue
        start = time.perf_counter()
        repeats = s.time_repeats_official if kind.startswith("official") else s.time_repeats
        clock = time.process_time if s.cpu_time else time.perf_counter
        res = paired_time(
            base, step_of(workloads[kind]), repeats, s.time_warmup, sync=sync, clock=clock
        )
        q25, _, q75 = (
            statistics.quantiles(res.ratios, n=4) if len(res.ratios) > 1 else [res.ratio] * 3
        )
        rows.append(
            {
                "kind": kind,
                "ratio": res.ratio,
                "ratios": res.ratios,
                "repeats": repeats,
                "q25": q25,
                "q75": q75,
            }
        )
        log(
            f"  time {kind:>20} / backprop: {res.ratio:.2f}x  ({time.perf_counter() - start:.1f} s)"
        )
    return rows


# -- gradient accuracy -----------------------------------------------------------------------------
def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    return (a - ref).norm().item() / (denom if denom > 0 else 1.0)


def _grads(
    kind: str, depth: int, s: Settings, gamma: float, dtype: torch.dtype
) -> list[torch.Tensor]:
    """``[x.grad, *parameter grads]`` of one chain; same weights, input, cotangent each time."""
    blocks = make_blocks(depth, s.grad_width, s.grad_hidden, seed=depth, dtype=dtype)
    model = make_model(kind, blocks, gamma)
    gen = torch.Generator().manual_seed(depth + 1)
    x64 = torch.randn(s.grad_batch, s.grad_width, generator=gen, dtype=torch.float64)
    g64 = torch.randn(s.grad_batch, s.grad_width, generator=gen, dtype=torch.float64)
    x = x64.to(dtype).requires_grad_(True)
    out = model(x)
    out.backward(g64.to(dtype))
    return [x.grad] + [p.grad for b in blocks for p in b.parameters()]


def _max_rel_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    errs = [_rel_err(a, b) for a, b in zip(got, ref, strict=True)]
    return math.nan if any(math.isnan(e) for e in errs) else max(errs)


def run_grad(s: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Largest relative gradient error against a float64 backprop reference.

    fxmomentum computes with gamma rounded to a multiple of 2**-16 in every mode, the official
    library with gamma as given: each is compared with its own float64 backprop.
    """
    official = "official_reversible" in s.kinds
    columns: list[tuple[str, str, torch.dtype, str]] = [
        # (column, kind, dtype, reference kind)
        ("backprop f32", "backprop", torch.float32, "backprop"),
        ("reversible f32", "reversible", torch.float32, "backprop"),
        ("reversible f64", "reversible", torch.float64, "backprop"),
    ]
    if official:
        columns.append(
            (
                "momentumnet reversible f32",
                "official_reversible",
                torch.float32,
                "official_backprop",
            )
        )
    rows = []
    for gamma in s.grad_gammas:
        for depth in s.grad_depths:
            refs: dict[str, list[torch.Tensor]] = {}
            row: dict[str, Any] = {"gamma": gamma, "depth": depth}
            start = time.perf_counter()
            for column, kind, dtype, ref_kind in columns:
                if ref_kind not in refs:
                    refs[ref_kind] = _grads(ref_kind, depth, s, gamma, torch.float64)
                try:
                    row[column] = _max_rel_err(_grads(kind, depth, s, gamma, dtype), refs[ref_kind])
                except Exception as exc:  # report the failure in the table, go on
                    row[column] = f"{type(exc).__name__}"
                    row[column + " error"] = str(exc)[:300]
            rows.append(row)
            shown = ", ".join(
                f"{c}: {row[c]:.1e}" if isinstance(row[c], float) else f"{c}: {row[c]}"
                for c, *_ in columns
            )
            log(
                f"  grad gamma {gamma} depth {depth:>4}: {shown}  "
                f"({time.perf_counter() - start:.1f} s)"
            )
    return rows


# -- output ----------------------------------------------------------------------------------------
def _fmt_mib(b: float | None) -> str:
    return "-" if b is None else f"{b / MIB:.1f}"


def _fmt_err(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.1e}"
    return "-" if v is None else str(v)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(HERE), "status", "--porcelain", "--", "../fxmomentum"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out + (" (fxmomentum/ modified)" if dirty else "")


def memory_summary(mem: list[dict[str, Any]]) -> dict[str, Any]:
    """Growth figures: reversible 128 vs 16 (target within 15%) and backprop's growth."""
    peak = {(r["kind"], r["depth"]): r.get("peak_bytes") for r in mem}
    out: dict[str, Any] = {}
    for kind in ("reversible", "backprop", "checkpoint", "official_reversible"):
        for deep in (128, 512):
            a, b = peak.get((kind, 16)), peak.get((kind, deep))
            if a and b:
                out[f"{kind} {deep}/16"] = b / a
    return out


def write_markdown(
    path: Path,
    s: Settings,
    device: str,
    mem: list[dict[str, Any]],
    tim: list[dict[str, Any]],
    grad: list[dict[str, Any]],
    official: tuple[bool, str],
    quick: bool,
    plots: list[str],
) -> None:
    """Write the results as markdown tables."""
    kinds = s.kinds
    lines = [
        "# MomentumNet benchmark" + (" (quick smoke run, tiny sizes)" if quick else ""),
        "",
        'Regenerate with `python benchmarks/bench_momentumnet.py`. Methods: "How things are '
        'measured" in DESIGN.md (fresh process per memory point, `MALLOC_MMAP_THRESHOLD_=65536`,'
        " VmHWM - VmRSS of one step after a warm-up step; times are medians of paired ratios).",
        "",
        f"- fxmomentum commit {_git_commit()}, torch {torch.__version__}, python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, device {device}, "
        f"{torch.get_num_threads()} thread(s)"
        + (", times by the process's CPU time (`--cpu-time`)" if s.cpu_time else ""),
        "- momentumnet (official library): "
        + (f"version {official[1]}" if official[0] else f"not available ({official[1]}); skipped"),
        "",
        "## Activation memory of a training step against depth",
        "",
        f"Blocks Linear({s.mem_width},{s.mem_hidden})-Tanh-Linear({s.mem_hidden},{s.mem_width}),"
        f" batch {s.mem_batch}, gamma {GAMMA}. MiB (VmHWM - VmRSS over one step"
        + (", CUDA figure: max_memory_allocated increase" if device.startswith("cuda") else "")
        + f"); one chain activation is {s.mem_batch * s.mem_width * 4 / MIB:.2f} MiB in float32.",
        "",
    ]
    key = "cuda_peak_bytes" if device.startswith("cuda") else "peak_bytes"
    peak = {(r["kind"], r["depth"]): r.get(key) for r in mem}
    mem_kinds = [k for k in kinds if any(r["kind"] == k for r in mem)]
    header = ["depth", *(LABELS[k] for k in mem_kinds)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for depth in s.mem_depths:
        cells = [str(depth), *(_fmt_mib(peak.get((k, depth))) for k in mem_kinds)]
        lines.append("| " + " | ".join(cells) + " |")
    summary = memory_summary(mem)
    lines.append("")
    for name, ratio in summary.items():
        kind, depths = name.split()
        deep = depths.split("/")[0]
        lines.append(f"- {LABELS[kind]}: depth {deep} / depth 16 = {ratio:.2f}x")
    if "reversible 128/16" in summary and not quick:
        ok = summary["reversible 128/16"] <= 1.15
        lines.append(
            f"- target (reversible depth 128 within 15% of depth 16): {'met' if ok else 'NOT met'}"
        )
        ok = summary["reversible 128/16"] <= 1.10
        lines.append(f"- target (issue 17: at most 1.10x): {'met' if ok else 'NOT met'}")
    failed = [r for r in mem if "error" in r]
    for r in failed:
        lines.append(
            f"- {LABELS[r['kind']]} depth {r['depth']} failed: "
            f"`{r['error'].strip().splitlines()[-1][:200]}`"
        )
    if s.mem_backprop_max_depth < max(s.mem_depths):
        lines.append(f"- backprop measured up to depth {s.mem_backprop_max_depth} only.")
    if "official_reversible" in kinds and s.mem_official_max_depth < max(s.mem_depths):
        lines.append(
            f"- momentumnet reversible measured up to depth {s.mem_official_max_depth} only "
            "(its steps are slow: about 20 s at depth 128 on 2 cores)."
        )

    lines += [
        "",
        "## Time of a training step",
        "",
        f"Depth {s.time_depth}, blocks Linear({s.time_width},{s.time_hidden})-Tanh-"
        f"Linear({s.time_hidden},{s.time_width}), batch {s.time_batch}, gamma {GAMMA}. Median "
        "over interleaved pairs (backprop, other) of the ratio to the backprop step "
        "(fxmomentum, use_backprop=True), with the quartiles of the ratios.",
        "",
        "| configuration | time / backprop | quartiles | pairs |",
        "|---|---:|---:|---:|",
    ]
    for r in tim:
        lines.append(
            f"| {LABELS[r['kind']]} | {r['ratio']:.2f}x | {r['q25']:.2f} - {r['q75']:.2f} "
            f"| {r['repeats']} |"
        )
    by_kind = {r["kind"]: r["ratio"] for r in tim}
    rev = by_kind.get("reversible")
    if rev is not None:
        lines.append("")
        for ref in ("checkpoint", "checkpoint_reentrant"):
            if ref in by_kind:
                lines.append(
                    f"- reversible / {LABELS[ref]}: {rev / by_kind[ref]:.2f}x (ratio of the "
                    "medians above; each measured against backprop)"
                )
    if rev is not None and not quick:
        ok = rev <= 1.6
        lines.append(f"- target (reversible <= 1.6x): {'met' if ok else 'NOT met'}")
        if "checkpoint" in by_kind:
            ok = rev <= by_kind["checkpoint"]
            lines.append(
                f"- target (issue 17: reversible no slower than checkpoint per block): "
                f"{'met' if ok else 'NOT met'}"
            )

    grad_cols = [
        c
        for c in (grad[0] if grad else {})
        if c not in ("gamma", "depth") and not c.endswith(" error")
    ]
    lines += [
        "",
        "## Gradient accuracy against depth",
        "",
        f"Blocks Linear({s.grad_width},{s.grad_hidden})-Tanh-Linear({s.grad_hidden},"
        f"{s.grad_width}), batch {s.grad_batch}. Largest relative error (L2 norm of the "
        "difference over the L2 norm of the reference, per tensor: x.grad and every parameter "
        "grad) against float64 backprop with the same weights, input and output cotangent. "
        "fxmomentum rounds gamma to a multiple of 2**-16 in every mode and the official library "
        "does not, so each is compared with its own float64 backprop.",
        "",
        "| gamma | depth | " + " | ".join(grad_cols) + " |",
        "|---:|---:|" + "---:|" * len(grad_cols),
    ]
    for r in grad:
        lines.append(
            f"| {r['gamma']} | {r['depth']} | "
            + " | ".join(_fmt_err(r.get(c)) for c in grad_cols)
            + " |"
        )
    errors = [(r, c) for r in grad for c in grad_cols if f"{c} error" in r]
    if errors:
        lines.append("")
        for r, c in errors:
            lines.append(
                f"- {c}, gamma {r['gamma']}, depth {r['depth']}: "
                f"`{r[c + ' error'].splitlines()[0][:200]}`"
            )
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    path.write_text("\n".join(lines) + "\n")


def make_plots(
    out: Path, s: Settings, device: str, mem: list[dict[str, Any]], grad: list[dict[str, Any]]
) -> list[str]:
    """Memory against depth and gradient error against depth, as PNG files in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "cuda_peak_bytes" if device.startswith("cuda") else "peak_bytes"
    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in s.kinds:
        pts = sorted((r["depth"], r[key] / MIB) for r in mem if r["kind"] == kind and key in r)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=LABELS[kind])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth (blocks)")
    ax.set_ylabel("activation memory of a step (MiB)")
    ax.set_title(f"Linear({s.mem_width},{s.mem_hidden}) blocks, batch {s.mem_batch}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory_vs_depth.png", dpi=120)
    plt.close(fig)
    files.append("memory_vs_depth.png")

    cols = [
        c
        for c in (grad[0] if grad else {})
        if c not in ("gamma", "depth") and not c.endswith(" error")
    ]
    fig, axes = plt.subplots(
        1, len(s.grad_gammas), figsize=(4 * len(s.grad_gammas), 3.8), squeeze=False, sharey=True
    )
    for ax, gamma in zip(axes[0], s.grad_gammas, strict=True):
        for c in cols:
            pts = [
                (r["depth"], r[c])
                for r in grad
                if r["gamma"] == gamma and isinstance(r[c], float) and math.isfinite(r[c])
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=c)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"gamma {gamma}")
        ax.set_xlabel("depth")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("max relative gradient error")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "grad_error_vs_depth.png", dpi=120)
    plt.close(fig)
    files.append("grad_error_vs_depth.png")
    return files


# -- main ------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write the results; see ``--help``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (smoke test)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default benchmarks/results, or a temp folder with --quick)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    p.add_argument("--no-official", action="store_true", help="leave the official library out")
    p.add_argument("--time-repeats", type=int, default=None, help="timed pairs per comparison")
    p.add_argument(
        "--memory-repeats", type=int, default=None, help="fresh processes per memory point (median)"
    )
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the process's CPU time (a loaded machine; best with --threads 1)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--memory-depths",
        default=None,
        help="comma-separated depths of the memory section (default 8,16,...,512)",
    )
    p.add_argument(
        "--only",
        default="memory,time,grad",
        help="comma-separated sections to run (memory, time, grad)",
    )
    args = p.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    s = copy.deepcopy(QUICK if args.quick else FULL)
    s.cpu_time = args.cpu_time
    if args.time_repeats:
        s.time_repeats = args.time_repeats
    if args.memory_repeats:
        s.memory_repeats = args.memory_repeats
    if args.memory_depths:
        s.mem_depths = [int(d) for d in args.memory_depths.split(",") if d.strip()]
    official = (False, "left out with --no-official") if args.no_official else official_status()
    s.kinds = ["backprop", "checkpoint", "checkpoint_reentrant", "reversible"]
    if official[0]:
        s.kinds.append("official_reversible")
    if s.mem_kinds is None:  # reentrant checkpointing is timed only
        s.mem_kinds = [k for k in s.kinds if k != "checkpoint_reentrant"]
    if args.out is None:
        if args.quick:
            import tempfile

            args.out = Path(tempfile.mkdtemp(prefix="bench_momentumnet_"))
        else:
            args.out = HERE / "results"
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sections = {x.strip() for x in args.only.split(",") if x.strip()}

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(
        f"bench_momentumnet: {'quick' if args.quick else 'full'} run, device {device}, "
        f"official library: {official[1]}, output {out}"
    )
    t0 = time.perf_counter()
    mem = run_memory(s, device, log) if "memory" in sections else []
    tim = run_time(s, device, log) if "time" in sections else []
    grad = run_grad(s, log) if "grad" in sections else []

    plots: list[str] = []
    if not args.no_plots:
        try:
            plots = make_plots(out, s, device, mem, grad)
        except ImportError as exc:
            log(f"plots skipped: {exc}")
    write_markdown(out / "momentumnet.md", s, device, mem, tim, grad, official, args.quick, plots)
    raw = {
        "settings": asdict(s),
        "device": device,
        "official": list(official),
        "memory": mem,
        "time": tim,
        "grad": grad,
        "summary": memory_summary(mem),
    }
    (out / "momentumnet.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    log(f"wrote {out / 'momentumnet.md'} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
