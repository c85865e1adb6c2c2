"""Measurement helpers shared by the benchmarks ("How things are measured", ARCHITECTURE.md).

The implementation lives in :mod:`fxmomentum.tools.measure` (``fxmomentum profile`` uses it
too); this module re-exports it and puts the ``benchmarks/`` directory on the measuring child's
``PYTHONPATH``, so that builders such as ``"bench_momentumnet:build_chain"`` import there.

Two measurements:

- :func:`measure_memory`: the activation memory of one training step, taken in a fresh Python
  process per configuration. The configuration is named by an importable builder
  (``"module:function"`` plus JSON keyword arguments) that returns a :class:`Workload`.
- :func:`paired_time`: the time of one step against another, interleaved, as the median of
  the per-pair ratios. Absolute times from a shared machine are never reported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fxmomentum.tools import measure as _measure
from fxmomentum.tools.measure import (
    MMAP_THRESHOLD,
    PairedTiming,
    Workload,
    load_builder,
    output_loss,
    paired_time,
    train_step,
    zero_grads,
)

__all__ = [
    "MMAP_THRESHOLD",
    "PairedTiming",
    "Workload",
    "child_env",
    "load_builder",
    "measure_memory",
    "output_loss",
    "paired_time",
    "train_step",
    "zero_grads",
]

HERE = Path(__file__).resolve().parent


def child_env(
    threads: int = 2, extra_paths: Sequence[str | os.PathLike[str]] = ()
) -> dict[str, str]:
    """:func:`fxmomentum.tools.measure.child_env` with this directory first on ``PYTHONPATH``."""
    return _measure.child_env(threads, [HERE, *extra_paths])


def measure_memory(
    config_name: str,
    build_fn_spec: str,
    kwargs: dict[str, Any] | None = None,
    *,
    extra_paths: Sequence[str | os.PathLike[str]] = (),
    **options: Any,
) -> dict[str, Any]:
    """:func:`fxmomentum.tools.measure.measure_memory` with this directory on the child's path."""
    return _measure.measure_memory(
        config_name, build_fn_spec, kwargs, extra_paths=[HERE, *extra_paths], **options
    )
