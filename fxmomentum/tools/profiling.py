"""profile: how much activation memory converting a model saves, and what it costs in time.

``fxmomentum profile TARGET`` (and :func:`profile_model`) runs one training step (forward, the
sum of the floating-point outputs as loss, backward) of the original model and of its converted
version, measured as ARCHITECTURE.md says ("How things are measured"):

- activation memory: one fresh process per configuration
  (:func:`fxmomentum.tools.measure.measure_memory`), which loads the target again with
  :mod:`fxmomentum.tools.loader` (:func:`build_workload` is its builder): one warm-up step, then the
  peak resident memory of one step over the memory before it;
- time: the two steps interleaved in this process
  (:func:`fxmomentum.tools.measure.paired_time`), the median of the per-pair ratios over
  ``steps`` pairs.

The per-chain estimates of the conversion report (:attr:`ChainInfo.saved_bytes
<fxmomentum.surgery.report.ChainInfo.saved_bytes>`) say which chains the saving comes from.

Examples
--------
>>> from fxmomentum.tools.profiling import profile
>>> result = profile("torchvision.models:resnet18", input_shapes=[(8, 3, 64, 64)],
...                  steps=5)  # doctest: +SKIP
>>> print(result.format())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .. import api
from ..engine import MomentumChain
from ..errors import one_line
from ..surgery import ConversionReport
from ..surgery.budget import MemoryPlanner
from ..surgery.conversion import prepare
from ..surgery.options import ConvertOptions
from . import loader
from .inputs import check_example_inputs, make_example_inputs, parse_dtype
from .measure import Workload, measure_memory, output_loss, paired_time, train_step
from .profile_report import (
    ChainShare,
    ProfileResult,
    chain_shares,
    mib,
    plot_profile,
    shape_text,
)

__all__ = [
    "BUILDER",
    "ChainShare",
    "ProfileError",
    "ProfileResult",
    "build_workload",
    "profile",
    "profile_model",
    "resize_batch",
]

#: The builder the measuring child runs (``"module:function"``, see :func:`build_workload`).
BUILDER = "fxmomentum.tools.profiling:build_workload"
#: The two configurations, in the order of the table.
CONFIGS = ("original", "converted")
#: What ``--plot`` measures besides: every chain reversible (no budget), and checkpoint per
#: residual block of the original (gamma 0, each chain recomputed block by block).
REFERENCES = ("reversible", "checkpoint")

#: ``progress(message, transient)``: ``transient`` messages may be overwritten by the next one.
Progress = Callable[[str, bool], None]


class ProfileError(RuntimeError):
    """A stage of the profile failed.

    Attributes
    ----------
    stage : str
        ``"convert"`` (the converter raised or converted nothing), ``"original"`` (the
        original's training step raised), ``"converted"`` (the converted model's step raised)
        or ``"measure"`` (a measuring child process failed).
    """

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


# -- inputs and workloads --------------------------------------------------------------------------
def resize_batch(inputs: Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """Example inputs with their first dimension made ``batch`` (rows repeated or dropped).

    Every input with at least one dimension is resized; 0-d inputs are kept. Rows are taken
    cyclically (``row i`` of the result is ``row i % n`` of the input), so integer inputs stay
    valid token ids.

    Parameters
    ----------
    inputs : sequence of torch.Tensor
        The example inputs.
    batch : int
        The new first dimension (>= 1).

    Returns
    -------
    tuple of torch.Tensor

    Examples
    --------
    >>> x = torch.arange(6).reshape(3, 2)
    >>> resize_batch([x], 5)[0][:, 0].tolist()
    [0, 2, 4, 0, 2]
    >>> resize_batch([x, torch.tensor(1.0)], 2)[1].shape
    torch.Size([])
    """
    if batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    out = []
    for t in inputs:
        if t.dim() == 0 or t.shape[0] == batch:
            out.append(t)
        else:
            index = torch.arange(batch, device=t.device) % t.shape[0]
            out.append(t.index_select(0, index).contiguous())
    return tuple(out)


def _example_inputs(
    loaded: loader.LoadedModel,
    input_shapes: Sequence[Sequence[int]] | None,
    dtypes: Sequence[torch.dtype] | None,
    batch: int | None,
) -> tuple[torch.Tensor, ...] | None:
    """The example inputs of the step: the loaded ones, with the batch changed."""
    if input_shapes:
        shapes = [tuple(s) for s in input_shapes]
        if batch is not None:
            shapes = [(batch, *s[1:]) if s else s for s in shapes]
        return make_example_inputs(shapes, list(dtypes) if dtypes else None)
    if loaded.example_inputs is None:
        return None
    if batch is None:
        return loaded.example_inputs
    return resize_batch(loaded.example_inputs, batch)


def _dtype_names(dtypes: Sequence[torch.dtype] | None) -> list[str] | None:
    return None if not dtypes else [str(d).removeprefix("torch.") for d in dtypes]


def build_workload(
    target: str,
    kind: str,
    input_shapes: Sequence[Sequence[int]] | None = None,
    dtypes: Sequence[str] | None = None,
    batch: int | None = None,
    gamma: float = 0.9,
    options: Mapping[str, Any] | None = None,
) -> Workload:
    """Load ``target`` and return the training step of one configuration.

    The builder of the measuring child process (:data:`BUILDER`): the target is loaded with
    the same rules (and the same example inputs) as in the command line.

    Parameters
    ----------
    target : str
        ``FILE.py[:NAME]`` or ``package.module:NAME``.
    kind : {"original", "converted", "reversible", "checkpoint"}
        The model as loaded, :func:`fxmomentum.convert` of it, or a reference of ``--plot``
        (see :data:`REFERENCES`).
    input_shapes : sequence of shapes, optional
        Shapes of random example inputs (``--input-shape``); else the file's ``example_inputs``.
    dtypes : sequence of str, optional
        Their dtype names.
    batch : int, optional
        New first dimension of the inputs (see :func:`resize_batch`).
    gamma : float
        Momentum of the converted chains.
    options : mapping, optional
        Keyword arguments of :func:`fxmomentum.convert` (``use_backprop``, ``include``, ...).

    Returns
    -------
    Workload
        The model in training mode, the inputs, and :func:`~fxmomentum.tools.measure.output_loss`.

    Examples
    --------
    >>> w = build_workload("torchvision.models:resnet18", "converted",
    ...                    input_shapes=[(2, 3, 32, 32)])  # doctest: +SKIP
    >>> type(w.model).__name__  # doctest: +SKIP
    'GraphModule'
    """
    if kind not in (*CONFIGS, *REFERENCES):
        raise ValueError(f"kind must be one of {(*CONFIGS, *REFERENCES)}, got {kind!r}")
    dtype_list = [parse_dtype(d) for d in dtypes] if dtypes else None
    loaded = loader.load_target(target, input_shapes=input_shapes, dtypes=dtype_list)
    inputs = _example_inputs(loaded, input_shapes, dtype_list, batch)
    if inputs is None:
        raise loader.ExampleInputsError(f"no example inputs for {target}")
    model = configured(loaded.model, kind, gamma, inputs, options)
    model.train()
    return Workload(model, inputs, loss=output_loss)


def configured(
    model: torch.nn.Module,
    kind: str,
    gamma: float,
    inputs: Sequence[torch.Tensor],
    options: Mapping[str, Any] | None,
) -> torch.nn.Module:
    """``model`` as configuration ``kind`` runs it (see :func:`build_workload`)."""
    options = dict(options or {})
    if kind == "original":
        return model
    if kind == "converted":
        return api.convert(model, gamma, example_inputs=inputs, **options)
    options.pop("memory_budget", None)
    if kind == "reversible":
        return api.convert(model, gamma, example_inputs=inputs, **options)
    options["use_backprop"] = True
    checkpointed = api.convert(model, 0.0, example_inputs=inputs, **options)
    for m in checkpointed.modules():
        if isinstance(m, MomentumChain):
            m.strategy = "recompute"
    return checkpointed


# -- profiling -------------------------------------------------------------------------------------
def profile_model(
    loaded: loader.LoadedModel,
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    batch: int | None = None,
    steps: int = 10,
    warmup: int = 1,
    gamma: float = 0.9,
    options: Mapping[str, Any] | None = None,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
    plot: str | os.PathLike[str] | None = None,
) -> ProfileResult:
    """Measure one training step of a loaded model, original against converted.

    Parameters
    ----------
    loaded : LoadedModel
        From :func:`fxmomentum.tools.loader.load_target`; the measuring children load
        ``loaded.target`` again, so it must be loadable from the current directory.
    input_shapes, dtypes : optional
        The ``input_shapes`` and ``dtypes`` ``loaded`` was loaded with (``--input-shape``,
        ``--dtype``); without them the target's own ``example_inputs`` are used.
    batch : int, optional
        New first dimension of the example inputs.
    steps : int
        Interleaved step pairs timed (the time ratio is their median).
    warmup : int
        Untimed pairs before them (and warm-up steps of each memory child).
    gamma : float
        Momentum of the converted chains.
    options : mapping, optional
        Other keyword arguments of :func:`fxmomentum.convert`.
    threads : int, optional
        Torch threads (default: ``torch.get_num_threads()``).
    device : str
        ``"cpu"``, ``"cuda"`` or ``"auto"``.
    seed : int
        Seed of the weights in the measuring children (load the target after
        ``torch.manual_seed(seed)`` for the timed models to hold the same weights).
    progress : callable, optional
        ``progress(message, transient)`` receives what is being done.
    plot : str or os.PathLike, optional
        Also measure the references (every chain reversible; checkpoint per residual block)
        and write a PNG of activation memory against step time: the planner's estimated
        curve over budgets 0 .. 1 and the measured points. Needs matplotlib.

    Returns
    -------
    ProfileResult

    Raises
    ------
    fxmomentum.tools.loader.ExampleInputsError
        No example inputs, or the model fails on the resized ones.
    ProfileError
        Conversion, a training step or a measuring child failed (``.stage`` says which).

    Examples
    --------
    >>> loaded = loader.load_target("model.py", input_shapes=[(8, 64)])  # doctest: +SKIP
    >>> result = profile_model(loaded, input_shapes=[(8, 64)], steps=5)  # doctest: +SKIP
    >>> result.memory_ratio < 1  # doctest: +SKIP
    True
    """
    say: Progress = progress or (lambda message, transient=False: None)
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch.cuda.is_available() is False")
    threads = int(threads or torch.get_num_threads())
    options = dict(options or {})
    inputs = _profile_inputs(loaded, input_shapes, dtypes, batch)
    gm, report = _convert(loaded, gamma, inputs, options, say)
    kinds = (*CONFIGS, *(REFERENCES if plot else ()))
    models = {"converted": gm}
    for kind in kinds[2:]:
        models[kind] = configured(loaded.model, kind, gamma, inputs, options)
    times = _check_and_time(loaded.model, models, inputs, steps, warmup, threads, device, say)
    del models, gm
    measure = dict(
        target=loaded.target,
        input_shapes=[list(s) for s in input_shapes] if input_shapes else None,
        dtypes=_dtype_names(dtypes),
        batch=batch,
        gamma=gamma,
        options=options,
    )
    memory = {kind: _memory_of(kind, measure, device, threads, warmup, seed, say) for kind in kinds}
    result = ProfileResult(
        model=type(loaded.model).__name__,
        source=f"{loaded.source}: {loaded.how}",
        inputs=[shape_text(t) for t in inputs],
        gamma=float(gamma),
        use_backprop=bool(options.get("use_backprop", False)),
        device=device,
        threads=threads,
        memory={k: memory[k] for k in CONFIGS},
        time_ratios=times["converted"],
        chains=chain_shares(report),
        report=report,
        references={
            k: {"memory": memory[k], "time_ratio": statistics.median(times[k])} for k in kinds[2:]
        },
    )
    if plot:
        say("estimating the memory / time curve over budgets 0 .. 1", False)
        result.curve = _budget_curve(loaded.model, gamma, inputs, options)
        plot_profile(result, plot)
        result.plot = os.fspath(plot)
    return result


def _profile_inputs(
    loaded: loader.LoadedModel,
    input_shapes: Sequence[Sequence[int]] | None,
    dtypes: Sequence[torch.dtype] | None,
    batch: int | None,
) -> tuple[torch.Tensor, ...]:
    inputs = _example_inputs(loaded, input_shapes, dtypes, batch)
    if inputs is None:
        raise loader.ExampleInputsError(
            f"profile needs example inputs for {loaded.source}; add --input-shape (e.g. "
            f"--input-shape 8,3,224,224) or define example_inputs in the model file"
        )
    if batch is not None:
        what = f"{loaded.inputs_from or 'the example inputs'}, batch {batch}"
        check_example_inputs(loaded.model, inputs, source=what)
    return inputs


def _convert(
    loaded: loader.LoadedModel,
    gamma: float,
    inputs: tuple[torch.Tensor, ...],
    options: Mapping[str, Any],
    say: Progress,
) -> tuple[torch.nn.Module, ConversionReport]:
    say(f"converting {type(loaded.model).__name__} (gamma {gamma:g})", False)
    try:
        gm, report = api.convert(
            loaded.model, gamma, example_inputs=inputs, return_report=True, **options
        )
    except Exception as exc:
        raise ProfileError(
            f"converting the model from {loaded.source} failed ({one_line(exc)})", "convert"
        ) from exc
    planned = report.plan is not None and any(r.strategy != "keep" for r in report.plan.regions)
    if not report.converted and not planned:
        raise ProfileError(
            f"no residual chain of {loaded.source} was converted ({report.summary()}), so there "
            f"is nothing to save; see why with `fxmomentum inspect {loaded.target} "
            f"--show-skipped`",
            "convert",
        )
    return gm, report


def _check_and_time(
    original: torch.nn.Module,
    models: Mapping[str, torch.nn.Module],
    inputs: tuple[torch.Tensor, ...],
    steps: int,
    warmup: int,
    threads: int,
    device: str,
    say: Progress,
) -> dict[str, list[float]]:
    """Each model's step checked, then timed against the original's: the per-pair ratios."""
    base = Workload(original.train(), inputs, loss=output_loss)
    others = {k: Workload(m.train(), inputs, loss=output_loss) for k, m in models.items()}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base.to(device)
        for name, workload in (("original", base), *others.items()):
            workload.to(device)
            say(f"checking a training step of the {name} model", False)
            try:
                train_step(workload)
            except Exception as exc:
                raise ProfileError(
                    f"a training step of the {name} model fails ({one_line(exc)})",
                    "converted" if name != "original" else "original",
                ) from exc
        return {
            name: _time_steps(base, workload, steps, warmup, device, say)
            for name, workload in others.items()
        }
    finally:
        torch.set_num_threads(old_threads)


def _memory_of(
    kind: str,
    measure: Mapping[str, Any],
    device: str,
    threads: int,
    warmup: int,
    seed: int,
    say: Progress,
) -> int:
    """The activation memory of configuration ``kind``, in a fresh process."""
    say(f"measuring the activation memory of the {kind} model (fresh process)", False)
    start = time.perf_counter()
    try:
        res = measure_memory(
            kind,
            BUILDER,
            {**measure, "kind": kind},
            device=device,
            threads=threads,
            warmup=max(1, warmup),
            seed=seed,
        )
    except Exception as exc:
        tail = str(exc).strip().splitlines()
        last = tail[-1] if tail else type(exc).__name__
        raise ProfileError(
            f"the memory measurement of the {kind} model failed in its child process "
            f"({last[:300]})",
            "measure",
        ) from exc
    found = int(res["cuda_peak_bytes" if device.startswith("cuda") else "peak_bytes"])
    say(f"{kind}: {mib(found)} of activation memory ({time.perf_counter() - start:.0f} s)", False)
    return found


def _budget_curve(
    model: torch.nn.Module,
    gamma: float,
    inputs: tuple[torch.Tensor, ...],
    options: Mapping[str, Any],
) -> list[tuple[float, float, float]]:
    """The planner's estimated memory and time ratios over budgets 0, 0.05, ..., 1."""
    settings = {k: v for k, v in options.items() if k != "memory_budget"}
    conversion = prepare(copy.deepcopy(model), ConvertOptions(gamma=gamma, **settings), inputs)
    planner = MemoryPlanner(conversion)
    budgets = [i / 20 for i in range(21)]
    return [(b, *planner.ratios(planner.solve(b).choices)) for b in budgets]


def _time_steps(
    original: Workload,
    converted: Workload,
    steps: int,
    warmup: int,
    device: str,
    say: Progress,
) -> list[float]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    done = [0]
    total = steps + warmup
    say(f"timing {steps} interleaved step pairs (after {warmup} warm-up pair(s))", False)

    def step_converted() -> None:
        train_step(converted)
        done[0] += 1
        say(f"timing: pair {done[0]}/{total}", True)

    timing = paired_time(lambda: train_step(original), step_converted, steps, warmup, sync=sync)
    say(f"time ratio {timing.ratio:.2f}x (median of {steps})", False)
    return [float(r) for r in timing.ratios]


def profile(
    target: str,
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> ProfileResult:
    """Load ``target`` (:func:`fxmomentum.tools.loader.load_target`) and :func:`profile_model` it.

    Parameters
    ----------
    target : str
        ``FILE.py[:NAME]`` or ``package.module:NAME``.
    input_shapes, dtypes : optional
        Random example inputs of these shapes (else the file's ``example_inputs``).
    seed : int
        ``torch.manual_seed`` before loading, here and in the measuring children.
    **kwargs
        The other arguments of :func:`profile_model`.

    Examples
    --------
    >>> r = profile("examples/finetune_digits.py:SmallResNet", input_shapes=[(256, 1, 8, 8)],
    ...             steps=5)  # doctest: +SKIP
    >>> f"{r.memory_ratio:.2f}x memory, {r.time_ratio:.2f}x time"  # doctest: +SKIP
    '0.73x memory, 1.68x time'
    """
    torch.manual_seed(seed)
    loaded = loader.load_target(target, input_shapes=input_shapes, dtypes=dtypes, check_inputs=True)
    return profile_model(loaded, input_shapes=input_shapes, dtypes=dtypes, seed=seed, **kwargs)
