"""Activation memory of a MomentumNet training step against depth: reversible vs backprop.

Each point is measured in a fresh process (``fxmomentum.tools.measure.measure_memory``, the
method of "How things are measured" in ARCHITECTURE.md): one warm-up step, then the peak resident
memory of one training step over the memory before it. Plain backprop keeps every block's
activations, so its memory grows with depth; the reversible chain rebuilds them in backward and
stays flat (apart from the few lost bits per element and block it keeps to be exact).

Run ``python examples/memory_vs_depth.py`` (``--quick``: tiny sizes). The plot goes to
``examples/results/memory_vs_depth.png``, or where ``--out`` says.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

import fxmomentum
from fxmomentum.tools.measure import Workload, measure_memory

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024


def build(kind: str, depth: int, width: int, hidden: int, batch: int) -> Workload:
    """The workload a measuring child builds: ``depth`` blocks ``Linear - Tanh - Linear``."""
    blocks = [
        nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, width))
        for _ in range(depth)
    ]
    net = fxmomentum.MomentumNet(blocks, gamma=0.9, use_backprop=kind == "backprop")
    return Workload(net, (torch.randn(batch, width, requires_grad=True),))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE / "results" / "memory_vs_depth.png",
        help="PNG file (default examples/results/memory_vs_depth.png)",
    )
    args = parser.parse_args(argv)
    if args.quick:  # tensors above the mmap threshold, below the kernels' compile threshold
        depths, sizes = [2, 16], dict(width=256, hidden=1024, batch=96)
    else:
        depths, sizes = [4, 8, 16, 32, 64], dict(width=512, hidden=256, batch=512)
    kinds = ["backprop", "reversible"]
    points = [(kind, depth) for kind in kinds for depth in depths]

    def one(point: tuple[str, int]) -> float:
        kind, depth = point
        res = measure_memory(
            f"{kind}-{depth}",
            "memory_vs_depth:build",
            {"kind": kind, "depth": depth, **sizes},
            extra_paths=[HERE],
        )
        return res["peak_bytes"] / MIB

    # Each child measures its own resident set: two at a time changes the wall time only.
    with ThreadPoolExecutor(2) as pool:
        mib = dict(zip(points, pool.map(one, points), strict=True))

    print(f"activation memory of a training step (MiB), batch {sizes['batch']}, "
          f"width {sizes['width']}, hidden {sizes['hidden']}:")  # fmt: skip
    print(f"{'depth':>6} " + " ".join(f"{k:>11}" for k in kinds))
    for depth in depths:
        print(f"{depth:>6} " + " ".join(f"{mib[(k, depth)]:11.1f}" for k in kinds))
    growth = {k: mib[(k, depths[-1])] / max(mib[(k, depths[0])], 1e-9) for k in kinds}
    print(f"from depth {depths[0]} to {depths[-1]}: backprop x{growth['backprop']:.1f}, "
          f"reversible x{growth['reversible']:.2f}")  # fmt: skip

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    else:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for kind, marker in zip(kinds, "os", strict=True):
            ax.plot(depths, [mib[(kind, d)] for d in depths], marker=marker, label=kind)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel("activation memory (MiB)")
        ax.set_title("MomentumNet training step, gamma = 0.9")
        ax.legend()
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=110)
        print(f"wrote {args.out}")
    ok = mib[("reversible", depths[-1])] < mib[("backprop", depths[-1])]
    print("OK" if ok else "FAILED: the reversible chain does not use less memory")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
