"""Benchmark of conversion: how long ``fxmomentum.convert`` takes, shape propagation included.

Three models, random weights, the issue's sizes: torchvision resnet152 (example input 1x3x64x64),
torchvision vit_b_16 (1x3x224x224), and a synthetic model of 2,000 pure residual blocks
(``x + s_t * f_t(x)``, width 8, example input 4x8). Each conversion runs ``--repeats`` times in
this process after one warm-up conversion (imports and first-call caches are not conversion
time); the table gives the median and the spread, plus the chains found as a check that the
work was done.

Run ``python benchmarks/bench_convert.py`` to write ``benchmarks/results/convert.md`` and
``convert.json``; ``--quick`` converts small stand-ins (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate
from torch import nn

import fxmomentum

HERE = Path(__file__).resolve().parent
# The synthetic many-block model is the one the tests check the converter on.
sys.path.insert(0, str(HERE.parent / "tests"))
from archs import Synthetic  # noqa: E402


def cases(quick: bool) -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...], float]]:
    """``(name, builder, example input shape, target seconds)``."""
    if quick:
        return [
            ("resnet18 (1x3x32x32)", torchvision.models.resnet18, (1, 3, 32, 32), 1.0),
            ("synthetic, 50 blocks", lambda: Synthetic(50), (4, 8), 10.0),
        ]
    return [
        ("resnet152 (1x3x64x64)", torchvision.models.resnet152, (1, 3, 64, 64), 1.0),
        ("vit_b_16 (1x3x224x224)", torchvision.models.vit_b_16, (1, 3, 224, 224), 1.0),
        ("synthetic, 2000 blocks", lambda: Synthetic(2000), (4, 8), 10.0),
    ]


def time_conversion(
    model: nn.Module, example: torch.Tensor, repeats: int
) -> tuple[list[float], list[int]]:
    """Seconds per ``convert`` call (after one warm-up) and the chains' block counts."""
    _, report = fxmomentum.convert(model, 0.9, example_inputs=(example,), return_report=True)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fxmomentum.convert(model, 0.9, example_inputs=(example,))
        seconds.append(time.perf_counter() - start)
    return seconds, [c.num_blocks for c in report.chains]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small stand-ins, a smoke test")
    parser.add_argument("--repeats", type=int, default=5, help="timed conversions per model")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows, records = [], []
    for name, build, shape, target in cases(args.quick):
        seconds, blocks = time_conversion(build().eval(), torch.randn(shape), args.repeats)
        median = statistics.median(seconds)
        rows.append([name, f"{median:.2f}", f"{min(seconds):.2f}-{max(seconds):.2f}",
                     f"< {target:g}", "yes" if median < target else "no",
                     ", ".join(map(str, blocks))])  # fmt: skip
        records.append({"model": name, "seconds": seconds, "median_s": median,
                        "target_s": target, "chains": blocks})  # fmt: skip
        print(rows[-1], flush=True)
    headers = ["model", "median s", "range s", "target", "met", "blocks per chain"]
    table = tabulate(rows, headers=headers, tablefmt="github")
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    text = (
        "# Conversion time\n\n"
        f"`python benchmarks/bench_convert.py` ({args.repeats} timed conversions per model after "
        f"one warm-up, shape propagation included; torch {torch.__version__}, {cpu}).\n\n"
        f"{table}\n"
    )
    print(text)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "convert.md").write_text(text)
        (args.out / "convert.json").write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
