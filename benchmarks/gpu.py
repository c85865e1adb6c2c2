"""The engine on one CUDA GPU, in under five minutes: exactness checks, memory and time.

Sections, in order (each is skipped, and says so, once ``--budget`` seconds have gone):

1. *Kernels*: the fused kernels compiled for the GPU (``torch.compile`` with eager numerics,
   :func:`fxmomentum.engine.kernels._eager_numerics`) against the eager ones on random valid
   states, bit for bit; then a reversible chain trained with the compiled kernels against the
   same chain with ``FXMOMENTUM_COMPILE=0``, bit for bit.
2. *RNG replay*: blocks with dropout on the GPU in a reversible chain against plain backprop
   with the same seed, float64 and float32: the recomputation must draw the forward's masks.
3. *ResNet-101* (torchvision, random weights; batch 32 at 3x224x224, or 8 at 3x96x96 with
   ``--small``) and the *encoder stack* (12 pre-norm ``nn.TransformerEncoderLayer``, d 256,
   8 heads, ff 1024, seq 256, batch 8, dropout 0.1): activation memory
   (``torch.cuda.max_memory_allocated`` over one warm training step, after
   ``reset_peak_memory_stats``, minus what was allocated before it) and step time, each
   configuration's steps interleaved with the others' (``torch.cuda.synchronize`` around each),
   as ratios to the original: medians over the rounds.

It writes a markdown report (``--out``, default ``benchmarks/results/gpu.md``) and a JSON file
next to it. Without CUDA, ``--device cuda`` (the default) prints why and exits with status 0.
``--device cpu --quick`` runs every section's logic on tiny sizes on the CPU (memory is then
not measured), for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_models  # noqa: E402
from harness import Workload, train_step, zero_grads  # noqa: E402

import fxmomentum  # noqa: E402
from fxmomentum.engine import kernels  # noqa: E402


@dataclass
class Sizes:
    """Sizes of one run."""

    resnet_layers: list[int]
    resnet_batch: int
    resnet_size: int
    tf_layers: int
    tf_width: int
    tf_heads: int
    tf_ff: int
    tf_seq: int
    tf_batch: int
    rounds: int
    kernel_numel: int


FULL = Sizes([3, 4, 23, 3], 32, 224, 12, 256, 8, 1024, 256, 8, 9, 1 << 20)
SMALL = Sizes([3, 4, 23, 3], 8, 96, 12, 256, 8, 1024, 256, 8, 11, 1 << 20)
QUICK = Sizes([1, 2, 1, 1], 2, 32, 2, 32, 4, 64, 16, 2, 2, kernels.COMPILE_MIN_NUMEL)

RESNET_KINDS = ["original", "reversible", "checkpoint", "checkpoint_chained", "recompute"]
TF_KINDS = ["original", "reversible", "checkpoint", "recompute"]


class OutOfTime(Exception):
    """The time budget is spent."""


class Report:
    """What each section found, for the markdown and JSON files."""

    def __init__(self, budget: float) -> None:
        self.start = time.perf_counter()
        self.budget = budget
        self.sections: dict[str, dict[str, Any]] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def check_time(self) -> None:
        if self.elapsed() > self.budget:
            raise OutOfTime(f"time budget of {self.budget:.0f} s spent")

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        start = time.perf_counter()
        print(f"== {name} ({self.elapsed():.0f} s in)", flush=True)
        try:
            self.check_time()
            result = {"status": "ok", **fn()}
        except OutOfTime as exc:
            result = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:  # a failed section is reported, the others still run
            traceback.print_exc()
            result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:500]}
        result["seconds"] = time.perf_counter() - start
        self.sections[name] = result
        print(f"   {result['status']} in {result['seconds']:.0f} s", flush=True)


# -- 1. kernels ------------------------------------------------------------------------------
def _state(n: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A random valid exact state and block output of ``n`` elements on ``device``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(-(2**31), 2**31, (n,), generator=g)
    V = torch.randint(-(2**46), 2**46, (n,), generator=g)
    head = torch.randint(0, 2**15, (n,), generator=g, dtype=torch.int32)
    f = torch.randn(n, generator=g) * 10
    x = torch.randn(n, generator=g)
    go, gf = torch.randn(n, generator=g), torch.randn(n, generator=g)
    st = {"X": X, "V": V, "head": head, "f": f, "x": x, "go": go, "gf": gf}
    st = {k: v.to(device) for k, v in st.items()}
    st["c"] = torch.tensor(0.1 * 2.0**40, device=device)
    st["scale"] = torch.tensor(2.0**30, device=device)
    st["inv"] = torch.tensor(2.0**-30, device=device)
    st["xw"], st["r"] = kernels.split(st["X"], st["inv"])
    return st


def _kernel_cases(st: dict[str, Any]) -> list[tuple[kernels._Kernel, Callable[[], tuple]]]:
    xw, r, V, head, f, x = st["xw"], st["r"], st["V"], st["head"], st["f"], st["x"]
    c, scale, inv, go, gf = st["c"], st["scale"], st["inv"], st["go"], st["gf"]
    return [
        (kernels.on_grid, lambda: (x, scale, inv)),
        (kernels.abs_max_f, lambda: (f, x)),
        (
            kernels.forward_step_,
            lambda: (xw, r.clone(), V.clone(), head.clone(), f, x, c, 58982, scale, inv),
        ),
        (
            kernels.backward_step_,
            lambda: (
                V.clone(),
                head.clone(),
                f,
                x,
                c,
                58982,
                x.clone(),
                go,
                gf,
                torch.empty_like(gf),
                0.1,
                0.9,
                xw,
                r.clone(),
                scale,
                inv,
            ),
        ),
        (kernels.unadd_, lambda: (xw, r.clone(), V, scale, inv)),
        (kernels.next_grad_f_, lambda: (go, gf.clone(), 0.1, 0.9)),
        (kernels.checksum, lambda: (xw, r)),
        (kernels.split_wide, lambda: (V,)),
    ]


def _flat(value: object) -> list:
    return list(value) if isinstance(value, tuple) else [value]


def _same(a: object, b: object) -> bool:
    a = a.item() if isinstance(a, torch.Tensor) and a.dim() == 0 else a
    b = b.item() if isinstance(b, torch.Tensor) and b.dim() == 0 else b
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def check_kernels(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Fused (compiled on CUDA, native on CPU) against eager, then a trained chain."""
    rows = []
    for kernel, make_args in _kernel_cases(_state(sizes.kernel_numel, device)):
        fused_args, eager_args = make_args(), make_args()
        got, want = kernel(*fused_args), kernel.fn(*eager_args)
        same = all(
            _same(a, b)
            for a, b in zip(
                _flat(got) + list(fused_args), _flat(want) + list(eager_args), strict=True
            )
        )
        compiled = kernel._compiled is not None if device.type == "cuda" else None
        rows.append({"kernel": kernel.__name__, "bits_equal": same, "compiled": compiled})
    chain_equal = _chain_bits_equal(device)
    ok = all(r["bits_equal"] for r in rows) and chain_equal
    return {"kernels": rows, "chain_bits_equal": chain_equal, "passed": ok}


def _chain_bits_equal(device: torch.device) -> bool:
    """A reversible chain's output and gradients, fused kernels against eager ones."""
    torch.backends.cudnn.deterministic = True
    results = []
    for compile_flag in ("1", "0"):
        torch.manual_seed(0)
        blocks = [
            nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256)) for _ in range(6)
        ]
        net = fxmomentum.MomentumNet(blocks, 0.9, use_backprop=False).to(device)
        x = torch.randn(256, 256, device=device, requires_grad=True)
        with _env("FXMOMENTUM_COMPILE", compile_flag):
            y = net(x)
            y.pow(2).sum().backward()
        results.append([y.detach(), x.grad, *(p.grad for p in net.parameters())])
    return all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


# -- 2. RNG replay ---------------------------------------------------------------------------
def check_rng(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Dropout blocks in a reversible chain against backprop, the same seed."""
    out = {}
    tolerances = {torch.float64: 1e-8, torch.float32: 1e-4}
    for dtype, tol in tolerances.items():
        torch.manual_seed(0)
        blocks = [
            nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 64))
            for _ in range(8)
        ]
        x = torch.randn(128, 64, device=device, dtype=dtype)
        grads = {}
        for mode in (True, False):
            net = fxmomentum.MomentumNet(blocks, 0.9, use_backprop=mode).to(device, dtype).train()
            net.zero_grad(set_to_none=True)
            xx = x.clone().requires_grad_(True)
            torch.manual_seed(123)
            if device.type == "cuda":
                torch.cuda.manual_seed(123)
            net(xx).pow(2).sum().backward()
            grads[mode] = [xx.grad, *(p.grad.clone() for p in net.parameters())]
        err = max(
            ((a - b).norm() / b.norm()).item()
            for a, b in zip(grads[False], grads[True], strict=True)
        )
        out[str(dtype).replace("torch.", "")] = {"max_rel_err": err, "tol": tol, "ok": err < tol}
    out["passed"] = all(v["ok"] for v in out.values())
    return out


# -- 3. memory and time ------------------------------------------------------------------------
def _workloads(bench: str, kinds: list[str], kwargs: dict, device: torch.device) -> dict:
    built = {}
    for kind in kinds:
        torch.manual_seed(0)
        built[kind] = bench_models.build(bench, kind, **kwargs).to(device)
    return built


def _step(w: Workload) -> None:
    zero_grads(w)
    train_step(w)


def _memory(w: Workload, device: torch.device) -> int | None:
    """Peak bytes allocated during one warm step beyond what was allocated before it."""
    if device.type != "cuda":
        return None
    zero_grads(w)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(w)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _compare(
    workloads: dict[str, Workload], device: torch.device, rounds: int, report: Report
) -> dict[str, Any]:
    """Warm-up, memory of each, then rounds of interleaved steps: ratios to the original."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for w in workloads.values():  # compiles the kernels, grows the caching allocator
        _step(w)
        _step(w)
    sync()
    memory = {k: _memory(w, device) for k, w in workloads.items()}
    times: dict[str, list[float]] = {k: [] for k in workloads}
    order = list(workloads)
    for r in range(rounds):
        report.check_time()
        for kind in order if r % 2 == 0 else order[::-1]:
            sync()
            start = time.perf_counter()
            _step(workloads[kind])
            sync()
            times[kind].append(time.perf_counter() - start)
    base_mem, base_t = memory["original"], times["original"]
    rows = {}
    for kind in workloads:
        ratios = [a / b for a, b in zip(times[kind], base_t, strict=True)]
        rows[kind] = {
            "memory_bytes": memory[kind],
            "memory_ratio": None if base_mem in (None, 0) else memory[kind] / base_mem,
            "time_ratio": statistics.median(ratios),
            "time_ratios": ratios,
            "step_ms": 1e3 * statistics.median(times[kind]),
        }
    return {"rows": rows, "rounds": rounds}


def bench_resnet(device: torch.device, sizes: Sizes, report: Report) -> dict[str, Any]:
    kw = {"layers": sizes.resnet_layers, "batch": sizes.resnet_batch, "size": sizes.resnet_size}
    res = _compare(_workloads("resnet", RESNET_KINDS, kw, device), device, sizes.rounds, report)
    res["config"] = (
        f"Bottleneck layers {sizes.resnet_layers}, batch {sizes.resnet_batch}, "
        f"3x{sizes.resnet_size}x{sizes.resnet_size}"
    )
    return res


def bench_encoder(device: torch.device, sizes: Sizes, report: Report) -> dict[str, Any]:
    kw = {
        "method": "convert",
        "layers": sizes.tf_layers,
        "width": sizes.tf_width,
        "heads": sizes.tf_heads,
        "ff": sizes.tf_ff,
        "seq": sizes.tf_seq,
        "batch": sizes.tf_batch,
    }
    res = _compare(_workloads("transformer", TF_KINDS, kw, device), device, sizes.rounds, report)
    res["config"] = (
        f"{sizes.tf_layers} layers, d {sizes.tf_width}, {sizes.tf_heads} heads, ff "
        f"{sizes.tf_ff}, seq {sizes.tf_seq}, batch {sizes.tf_batch}, dropout 0.1"
    )
    return res


# -- report ----------------------------------------------------------------------------------
def _x(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def write_markdown(path: Path, report: Report, meta: dict[str, Any]) -> None:
    s = report.sections
    lines = [
        "# fxmomentum on a GPU",
        "",
        f"Generated by `python benchmarks/gpu.py {meta['argv']}` on {meta['device_name']} "
        f"(torch {torch.__version__}, {meta['when']}); {report.elapsed():.0f} s in all.",
        "",
    ]

    def status(name: str) -> str:
        sec = s.get(name, {})
        extra = f": {sec['reason']}" if "reason" in sec else ""
        return f"{sec.get('status', 'not run')}{extra} ({sec.get('seconds', 0):.0f} s)"

    lines += ["## Exactness", "", f"Kernels: {status('kernels')}."]
    if s.get("kernels", {}).get("status") == "ok":
        k = s["kernels"]
        lines += [
            "",
            "| kernel | compiled for the GPU | bits equal eager |",
            "|---|---|---|",
            *[
                f"| {r['kernel']} | {'-' if r['compiled'] is None else r['compiled']} | "
                f"{r['bits_equal']} |"
                for r in k["kernels"]
            ],
            "",
            f"A reversible chain (6 MLP blocks) trained with the fused kernels and with "
            f"`FXMOMENTUM_COMPILE=0`: output and gradients bit for bit equal: "
            f"{k['chain_bits_equal']}.",
        ]
    lines += ["", f"RNG replay (dropout 0.2 in 8 blocks, same seed): {status('rng')}."]
    if s.get("rng", {}).get("status") == "ok":
        lines += ["", "| dtype | max relative gradient error vs backprop | tolerance | ok |"]
        lines += ["|---|---|---|---|"]
        for dt in ("float64", "float32"):
            v = s["rng"][dt]
            lines.append(f"| {dt} | {v['max_rel_err']:.2e} | {v['tol']:.0e} | {v['ok']} |")
    for name, title in (("resnet", "ResNet"), ("encoder", "Encoder stack")):
        sec = s.get(name, {})
        lines += ["", f"## {title}", "", f"{status(name)}."]
        if sec.get("status") != "ok":
            continue
        lines += [
            "",
            f"{sec['config']}; {sec['rounds']} rounds of interleaved steps, medians of the "
            f"per-round ratios to the original.",
            "",
            "| configuration | activation memory (MiB) | memory ratio | time ratio | step (ms) |",
            "|---|---|---|---|---|",
        ]
        for kind, row in sec["rows"].items():
            lines.append(
                f"| {bench_models.LABELS[kind]} | {_mib(row['memory_bytes'])} | "
                f"{_x(row['memory_ratio'], 3)} | {_x(row['time_ratio'])} | {row['step_ms']:.1f} |"
            )
        rows, rev = sec["rows"], sec["rows"]["reversible"]
        lines.append("")
        for ref in ("checkpoint", "checkpoint_chained"):
            if ref not in rows:
                continue
            line = f"- Reversible over {bench_models.LABELS[ref]}: time "
            line += f"{rev['time_ratio'] / rows[ref]['time_ratio']:.2f}x"
            if rows[ref]["memory_ratio"]:
                line += f", memory {rev['memory_ratio'] / rows[ref]['memory_ratio']:.2f}x"
            lines.append(line + ".")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the logic, in seconds)")
    p.add_argument("--small", action="store_true", help="ResNet-101 at batch 8, 3x96x96")
    p.add_argument("--budget", type=float, default=270.0, help="seconds before skipping")
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu.md")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; skipped (use --device cpu --quick to "
              "run its logic on the CPU).")  # fmt: skip
        return 0
    device = torch.device(args.device)
    sizes = QUICK if args.quick else (SMALL if args.small else FULL)
    report = Report(args.budget)
    report.run("kernels", lambda: check_kernels(device, sizes))
    report.run("rng", lambda: check_rng(device, sizes))
    report.run("resnet", lambda: bench_resnet(device, sizes, report))
    report.run("encoder", lambda: bench_encoder(device, sizes, report))
    meta = {
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"CPU ({platform.machine()})"
        ),
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out, report, meta)
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "sections": report.sections}, indent=1, default=str) + "\n"
    )
    print(f"wrote {args.out}")
    failed = [n for n, sec in report.sections.items() if sec["status"] == "failed"]
    checks = [report.sections[n].get("passed") for n in ("kernels", "rng")]
    return 1 if failed or False in checks else 0


if __name__ == "__main__":
    sys.exit(main())
