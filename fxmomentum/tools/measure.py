"""Measurement of a training step: activation memory in a fresh process, paired time ratios.

The methods of "How things are measured" (ARCHITECTURE.md), used by ``fxmomentum profile`` and
by the benchmarks (``benchmarks/harness.py`` re-exports this module):

- :func:`measure_memory`: the activation memory of one training step, taken in a fresh Python
  process per configuration. The configuration is named by an importable builder
  (``"module:function"`` plus JSON keyword arguments) that returns a :class:`Workload`.
- :func:`paired_time`: the time of one step against another, interleaved, as the median of
  the per-pair ratios. Absolute times from a shared machine are never reported.

The builder module must be importable in the child process: ``extra_paths`` are put on the
child's ``PYTHONPATH`` (and so is the directory holding this package).

Examples
--------
>>> from fxmomentum.tools.measure import paired_time
>>> paired_time(lambda: sum(range(1000)), lambda: sum(range(2000)), repeats=5).ratio > 0
True
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
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

#: The directory holding the ``fxmomentum`` package: on the child's ``PYTHONPATH`` (last), so that
#: the child imports this very copy even when the package is not installed.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
#: glibc returns freed blocks above this size to the system, so the resident set follows use.
MMAP_THRESHOLD = 65536
_RESULT_MARK = "@@HARNESS_RESULT@@ "
_CHILD_CODE = """
import sys
from fxmomentum.tools.measure import _child_main
sys.exit(_child_main(sys.argv[1]))
"""


@dataclass
class Workload:
    """A model and its inputs: what one training step runs.

    Parameters
    ----------
    model : nn.Module
        The model; ``model(*inputs)`` gives the output.
    inputs : tuple of torch.Tensor
        Positional inputs. Those with ``requires_grad`` get a ``.grad`` like parameters do.
    loss : callable, optional
        Maps the output to a scalar; ``output.sum()`` when omitted (:func:`output_loss` sums
        every floating-point tensor of a tuple, list or dict output).

    Examples
    --------
    >>> w = Workload(nn.Linear(4, 2), (torch.randn(3, 4),))
    >>> train_step(w)
    >>> w.model.weight.grad.shape
    torch.Size([2, 4])
    """

    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None

    def to(self, device: str | torch.device) -> Workload:
        """Move the model and inputs to ``device``; inputs stay leaves."""
        self.model.to(device)
        self.inputs = tuple(
            x.detach().to(device).requires_grad_(x.requires_grad) for x in self.inputs
        )
        return self


def zero_grads(workload: Workload) -> None:
    """Zero every gradient buffer in place, keeping it allocated (``set_to_none=False``)."""
    workload.model.zero_grad(set_to_none=False)
    for x in workload.inputs:
        if x.grad is not None:
            x.grad.zero_()


def output_loss(output: Any) -> torch.Tensor:
    """The sum of every floating-point tensor in ``output`` (tensors, tuples, lists, dicts).

    A loss for models whose output is not a single tensor; it reaches every output that
    depends on the parameters.

    Raises
    ------
    ValueError
        If ``output`` holds no floating-point tensor that requires grad.

    Examples
    --------
    >>> x = torch.ones(2, requires_grad=True)
    >>> output_loss({"a": x, "b": (2 * x, torch.zeros(3, dtype=torch.long))})
    tensor(6., grad_fn=<AddBackward0>)
    """
    found: list[torch.Tensor] = []

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.requires_grad:
                found.append(value)
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item)
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)

    walk(output)
    if not found:
        raise ValueError(
            "the output holds no floating-point tensor that requires grad: nothing to train"
        )
    total = found[0].sum()
    for t in found[1:]:
        total = total + t.sum()
    return total


def train_step(workload: Workload) -> None:
    """One training step: forward, loss, backward (gradients accumulate in place).

    Examples
    --------
    >>> w = Workload(nn.Linear(4, 2), (torch.randn(3, 4),), loss=output_loss)
    >>> train_step(w); train_step(w)
    >>> bool(w.model.bias.grad.eq(6).all())
    True
    """
    out = workload.model(*workload.inputs)
    loss = workload.loss(out) if workload.loss is not None else out.sum()
    loss.backward()


def load_builder(spec: str) -> Callable[..., Workload]:
    """The function named by ``"module:function"``.

    Examples
    --------
    >>> load_builder("fxmomentum.tools.measure:train_step") is train_step
    True
    """
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"builder spec must look like 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module_name), func_name)


# -- memory ----------------------------------------------------------------------------------------
def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                value, unit = line.split()[1:3]
                if unit != "kB":
                    raise RuntimeError(f"unexpected unit {unit!r} for {key}")
                return int(value) * 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _reset_hwm() -> None:
    # "5" resets the peak resident set size (VmHWM) to the current resident set size.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _child_main(payload: str) -> int:
    """Entry point of the fresh process: build, warm up, measure one step, print JSON."""
    cfg = json.loads(payload)
    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(int(cfg.get("seed", 0)))
    device = torch.device(cfg["device"])
    workload = load_builder(cfg["builder"])(**cfg["kwargs"])
    workload.to(device)
    is_cuda = device.type == "cuda"

    for _ in range(int(cfg["warmup"])):
        train_step(workload)
    zero_grads(workload)
    if is_cuda:
        torch.cuda.synchronize(device)
    gc.collect()

    result: dict[str, Any] = {}
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    _reset_hwm()
    rss_before = _proc_status_bytes("VmRSS")
    start = time.perf_counter()
    train_step(workload)
    if is_cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    hwm = _proc_status_bytes("VmHWM")
    result.update(
        rss_before_bytes=rss_before,
        hwm_bytes=hwm,
        peak_bytes=hwm - rss_before,
        step_seconds=seconds,
    )
    if is_cuda:
        cuda_max = torch.cuda.max_memory_allocated(device)
        result.update(cuda_max_allocated_bytes=cuda_max, cuda_peak_bytes=cuda_max - cuda_before)
    print(_RESULT_MARK + json.dumps(result), flush=True)
    return 0


def child_env(
    threads: int = 2, extra_paths: Sequence[str | os.PathLike[str]] = ()
) -> dict[str, str]:
    """Environment of a measuring child: fixed threads, small mmap threshold, import paths.

    Parameters
    ----------
    threads : int
        Value of ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``.
    extra_paths : sequence of path-like
        Prepended to ``PYTHONPATH``; the directory holding ``fxmomentum`` is appended.

    Returns
    -------
    dict
        A copy of ``os.environ`` with those settings.

    Examples
    --------
    >>> env = child_env(2, ["/my/builders"])
    >>> env["MALLOC_MMAP_THRESHOLD_"], env["PYTHONPATH"].split(os.pathsep)[0]
    ('65536', '/my/builders')
    """
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    paths = [str(p) for p in extra_paths]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    paths.append(str(PACKAGE_ROOT))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def measure_memory(
    config_name: str,
    build_fn_spec: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    device: str = "cpu",
    threads: int = 2,
    warmup: int = 1,
    repeats: int = 1,
    seed: int = 0,
    extra_paths: Sequence[str | os.PathLike[str]] = (),
    timeout: float | None = None,
) -> dict[str, Any]:
    """Activation memory of one training step, each repeat in a fresh process.

    In the child: build the workload, run ``warmup`` training steps (so ``.grad`` buffers
    exist), zero the gradients in place, reset the resident high-water mark
    (``/proc/self/clear_refs``), read ``VmRSS``, run one step and read ``VmHWM``. The figure is
    ``VmHWM - VmRSS`` in bytes. On CUDA, also ``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats`` (and its increase over the memory allocated before the step).

    Parameters
    ----------
    config_name : str
        Label carried into the result.
    build_fn_spec : str
        ``"module:function"``; ``function(**kwargs)`` returns a :class:`Workload`.
    kwargs : mapping, optional
        JSON-serialisable keyword arguments of the builder.
    device : str
        ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
    threads : int
        Torch and OpenMP threads in the child.
    warmup : int
        Training steps before the measured one.
    repeats : int
        Fresh processes; ``peak_bytes`` is their median.
    seed : int
        ``torch.manual_seed`` before building.
    extra_paths : sequence of path-like
        Directories added to the child's ``PYTHONPATH``.
    timeout : float, optional
        Seconds per child.

    Returns
    -------
    dict
        ``config``, ``peak_bytes`` (median), ``peak_bytes_all``, ``device``, ``threads``, and
        the last child's ``rss_before_bytes``, ``hwm_bytes``; on CUDA ``cuda_peak_bytes`` and
        ``cuda_max_allocated_bytes`` (medians).

    Raises
    ------
    RuntimeError
        If a child fails; the message holds the end of its output.

    Examples
    --------
    With a file ``builders.py`` in ``/my/builders`` defining
    ``def mlp(width): return Workload(nn.Linear(width, width), (torch.randn(64, width),))``:

    >>> res = measure_memory("mlp", "builders:mlp", {"width": 1024},
    ...                      extra_paths=["/my/builders"])  # doctest: +SKIP
    >>> res["peak_bytes"] > 0  # doctest: +SKIP
    True
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    payload = json.dumps(
        {
            "builder": build_fn_spec,
            "kwargs": dict(kwargs or {}),
            "device": device,
            "threads": threads,
            "warmup": warmup,
            "seed": seed,
        }
    )
    env = child_env(threads, extra_paths)
    runs: list[dict[str, Any]] = []
    for _ in range(repeats):
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD_CODE, payload],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_RESULT_MARK)]
        if proc.returncode != 0 or not lines:
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(
                f"memory measurement of {config_name!r} failed (exit {proc.returncode}):\n{tail}"
            )
        runs.append(json.loads(lines[-1][len(_RESULT_MARK) :]))

    result: dict[str, Any] = {
        "config": config_name,
        "builder": build_fn_spec,
        "kwargs": dict(kwargs or {}),
        "device": device,
        "threads": threads,
        "peak_bytes": int(statistics.median(r["peak_bytes"] for r in runs)),
        "peak_bytes_all": [r["peak_bytes"] for r in runs],
        "rss_before_bytes": runs[-1]["rss_before_bytes"],
        "hwm_bytes": runs[-1]["hwm_bytes"],
    }
    if device.startswith("cuda"):
        for key in ("cuda_peak_bytes", "cuda_max_allocated_bytes"):
            result[key] = int(statistics.median(r[key] for r in runs))
    return result


# -- time ------------------------------------------------------------------------------------------
class PairedTiming(NamedTuple):
    """Result of :func:`paired_time`: median of the ratios ``b / a`` and the ratios."""

    ratio: float
    ratios: list[float]


def paired_time(
    step_a: Callable[[], object],
    step_b: Callable[[], object],
    repeats: int = 20,
    warmup: int = 2,
    *,
    sync: Callable[[], object] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> PairedTiming:
    """Time ``step_b`` against ``step_a``, interleaved ``A B A B ...``.

    Parameters
    ----------
    step_a, step_b : callable
        Zero-argument callables, each one complete unit of work (say a training step).
    repeats : int
        Timed pairs.
    warmup : int
        Untimed pairs first (compilation, allocator, caches).
    sync : callable, optional
        Called before reading the clock (``torch.cuda.synchronize`` on a GPU).
    clock : callable, optional
        The clock, in seconds: wall time by default; ``time.process_time`` (this process's
        CPU time) on a CPU shared with other work, where wall time counts their share too.

    Returns
    -------
    PairedTiming
        ``ratio``: median over pairs of ``time(b) / time(a)``; ``ratios``: every pair's ratio.

    Examples
    --------
    >>> res = paired_time(lambda: sum(range(10_000)), lambda: sum(range(20_000)), repeats=7)
    >>> len(res.ratios), res.ratio > 0
    (7, True)
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")

    def timed(step: Callable[[], object]) -> float:
        if sync is not None:
            sync()
        start = clock()
        step()
        if sync is not None:
            sync()
        return clock() - start

    for _ in range(warmup):
        step_a()
        step_b()
    ratios: list[float] = []
    for _ in range(repeats):
        ta = timed(step_a)
        tb = timed(step_b)
        ratios.append(tb / ta)
    return PairedTiming(statistics.median(ratios), ratios)
