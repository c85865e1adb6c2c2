"""Benchmark of the first training step of a converted model: how much more than a warm step.

Each measurement is a fresh Python process (``--child``) that imports torch, builds a
torchvision ResNet-50 (random weights, batch 8, 3x64x64), converts it with
``fxmomentum.convert(model, 0.9, example_inputs=x)`` (every chain reversible), and times its
first training step (forward, ``output.sum()``, backward) and then ``--warm-steps`` more; the
figure is the first step minus the median warm step. The original model is measured the same
way in processes of its own, for what PyTorch's own first step costs (oneDNN primitives,
allocator growth).

Two cache states, in turn, ``--repeats`` times each:

- *cold*: ``TORCHINDUCTOR_CACHE_DIR`` is a new empty directory (the native kernels'
  library is built under it, as Inductor's caches would be), as on a fresh machine;
- *warm*: the directory the cold process just filled: nothing is built again (the table
  lists the files each process added to the cache directory).

Run ``python benchmarks/bench_first_step.py`` to regenerate ``benchmarks/results/first_step.md``
and ``first_step.json``; ``--quick`` runs a small ResNet in seconds (written to a temporary
folder unless ``--out`` is given). ``--package-root DIR`` measures the ``fxmomentum`` found in
``DIR`` instead of this checkout's (an older version, say).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGET_S = 5.0
_MARK = "@@FIRST_STEP@@ "


def _child(kind: str, layers: list[int], batch: int, size: int, warm_steps: int) -> dict:
    """Runs in the fresh process: the timings of one configuration."""
    start = time.perf_counter()
    import torch
    from torchvision.models.resnet import Bottleneck, ResNet

    import fxmomentum

    imported = time.perf_counter()
    torch.manual_seed(0)
    model = ResNet(Bottleneck, layers).train()
    x = torch.randn(batch, 3, size, size)
    if kind == "converted":
        model = fxmomentum.convert(model, 0.9, example_inputs=x).train()
    converted = time.perf_counter()

    def cpu() -> float:
        # This process's CPU time and its children's (the C compiler building the kernels).
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def step() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), cpu()
        model(x).sum().backward()
        return time.perf_counter() - t0, cpu() - c0

    first, first_cpu = step()
    warm, warm_cpu = zip(*(step() for _ in range(warm_steps)), strict=True)
    return {
        "import_s": imported - start,
        "convert_s": converted - imported,
        "first_s": first,
        "warm_s": statistics.median(warm),
        "warm_all_s": list(warm),
        "first_cpu_s": first_cpu,
        "warm_cpu_s": statistics.median(warm_cpu),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def measure(kind: str, cache: Path, args: argparse.Namespace, package_root: Path) -> dict[str, Any]:
    """One fresh process of ``kind`` with ``cache`` as Inductor's cache directory."""
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    env.pop("FXMOMENTUM_CACHE_DIR", None)  # the native library goes under the Inductor cache
    env.pop("FXMOMENTUM_COMPILE", None)
    env["OMP_NUM_THREADS"] = str(args.threads)
    env["PYTHONPATH"] = os.pathsep.join([str(package_root), *filter(None, [env.get("PYTHONPATH")])])
    payload = json.dumps(
        {
            "kind": kind,
            "layers": args.layers,
            "batch": args.batch,
            "size": args.size,
            "warm_steps": args.warm_steps,
        }
    )
    before = _files(cache)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", payload],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {kind} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK))
    result = json.loads(line[len(_MARK) :])
    added = sorted(_files(cache) - before)
    result["cache_files_added"] = len(added)
    result["cache_files_sample"] = added[:5]
    result["overhead_s"] = result["first_s"] - result["warm_s"]
    result["overhead_cpu_s"] = result["first_cpu_s"] - result["warm_cpu_s"]
    return result


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def write_markdown(path: Path, results: dict[str, Any], args: argparse.Namespace) -> None:
    rows = []
    for state in ("cold", "warm"):
        for kind in ("original", "converted"):
            runs = results["runs"][state][kind]
            if not runs:
                continue
            med = {
                k: statistics.median(r[k] for r in runs)
                for k, v in runs[0].items()
                if k.endswith("_s") and isinstance(v, float)
            }
            added = ", ".join(str(r["cache_files_added"]) for r in runs)
            rows.append(
                f"| {state} | {kind} | {_fmt(med['first_s'])} | {_fmt(med['warm_s'])} | "
                f"{_fmt(med['overhead_s'])} | {_fmt(med['overhead_cpu_s'])} | "
                f"{_fmt(med['import_s'])} | {_fmt(med['convert_s'])} | {added} |"
            )
    conv = {s: results["summary"][s]["converted_overhead_s"] for s in ("cold", "warm")}
    orig = {s: results["summary"][s]["original_overhead_s"] for s in ("cold", "warm")}
    cpu = {s: results["summary"][s]["converted_overhead_cpu_s"] for s in ("cold", "warm")}
    cpu_orig = {s: results["summary"][s]["original_overhead_cpu_s"] for s in ("cold", "warm")}
    # Since conversion runs each converted graph on its example inputs, the native library is
    # built there, in the cold process's convert, not in its first step: counted here too.
    convert = {
        s: statistics.median(r["convert_s"] for r in results["runs"][s]["converted"])
        for s in ("cold", "warm")
    }
    build = convert["cold"] - convert["warm"]
    met = conv["cold"] + max(build, 0.0) <= TARGET_S and conv["warm"] <= TARGET_S
    lines = [
        "# First training step of a converted model",
        "",
        f"Generated by `python benchmarks/bench_first_step.py` (torch {results['torch']}, "
        f"{results['machine']}, {args.threads} thread(s), ResNet layers {args.layers}, batch "
        f"{args.batch}, 3x{args.size}x{args.size}, {args.repeats} fresh process(es) per row, "
        f"medians; load average at the start {results['load']}).",
        "",
        "Each row is a fresh process: import, build, `fxmomentum.convert(model, 0.9, "
        "example_inputs=x)` (converted rows), one training step, then "
        f"{args.warm_steps} more. *Cold*: `TORCHINDUCTOR_CACHE_DIR` is a new empty directory "
        "(a fresh machine); *warm*: the directory the cold process filled. Seconds; *first - "
        "warm (CPU)* is the same difference in the process's CPU time and its children's (the "
        "C compiler), which other processes on a loaded machine do not add to (both threads "
        "count, so a parallel part counts up to twice).",
        "",
        "| cache | model | first step | warm step | first - warm | first - warm (CPU) | import "
        "| convert | files added to the cache |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"- Target: the converted model's first step at most {TARGET_S:.0f} s more than a warm "
        f"step, cold cache: {conv['cold']:.2f} s, plus {build:.2f} s more in `convert` than "
        f"with a warm cache (the library is built there: conversion runs the converted graph "
        f"on its example inputs), {conv['cold'] + max(build, 0.0):.2f} s in all; warm cache: "
        f"{conv['warm']:.2f} s ({'met' if met else 'NOT met'}); the original's own first step "
        f"costs {orig['cold']:.2f} s / {orig['warm']:.2f} s more than its warm step. In CPU time: "
        f"converted {cpu['cold']:.2f} s / {cpu['warm']:.2f} s, original "
        f"{cpu_orig['cold']:.2f} s / {cpu_orig['warm']:.2f} s.",
        "- What a cold process builds: the native kernels' library (C, one compiler call, "
        "cached under `$TORCHINDUCTOR_CACHE_DIR/fxmomentum`); nothing goes through "
        "`torch.compile` on CPU. A warm process loads the library and adds no file.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="a small ResNet, one repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warm-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--package-root", type=Path, default=ROOT)
    args = p.parse_args(argv)
    if args.child:
        cfg = json.loads(args.child)
        res = _child(cfg["kind"], cfg["layers"], cfg["batch"], cfg["size"], cfg["warm_steps"])
        print(_MARK + json.dumps(res), flush=True)
        return 0
    if args.quick:
        args.layers, args.batch, args.size = [1, 1, 2, 1], 2, 32
        args.repeats, args.warm_steps = 1, 2
    else:
        args.layers, args.batch, args.size = [3, 4, 6, 3], 8, 64
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "runs": {s: {"original": [], "converted": []} for s in ("cold", "warm")},
    }
    for r in range(args.repeats):
        for kind in ("converted", "original"):
            with tempfile.TemporaryDirectory(prefix="fxm-first-step-") as tmp:
                cache = Path(tmp)
                for state in ("cold", "warm"):
                    res = measure(kind, cache, args, args.package_root)
                    results["runs"][state][kind].append(res)
                    print(
                        f"  {state} {kind:<9} repeat {r}: first {res['first_s']:.2f} s, warm "
                        f"{res['warm_s']:.2f} s, +{res['overhead_s']:.2f} s, "
                        f"{res['cache_files_added']} cache files added",
                        flush=True,
                    )
    results["torch"] = results["runs"]["cold"]["converted"][0]["torch"]
    results["summary"] = {
        state: {
            f"{kind}_{figure}": statistics.median(r[figure] for r in results["runs"][state][kind])
            for kind in ("original", "converted")
            for figure in ("overhead_s", "overhead_cpu_s")
        }
        for state in ("cold", "warm")
    }
    (out / "first_step.json").write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(out / "first_step.md", results, args)
    print(f"wrote {out / 'first_step.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
