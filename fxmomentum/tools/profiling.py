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

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate

from .. import api
from ..errors import one_line
from ..surgery import ConversionReport
from . import loader
from .inputs import check_example_inputs, make_example_inputs, parse_dtype
from .measure import Workload, measure_memory, output_loss, paired_time, train_step

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
MIB = 1024 * 1024

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
    kind : {"original", "converted"}
        The model as loaded, or :func:`fxmomentum.convert` of it.
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
    if kind not in CONFIGS:
        raise ValueError(f"kind must be one of {CONFIGS}, got {kind!r}")
    dtype_list = [parse_dtype(d) for d in dtypes] if dtypes else None
    loaded = loader.load_target(target, input_shapes=input_shapes, dtypes=dtype_list)
    inputs = _example_inputs(loaded, input_shapes, dtype_list, batch)
    if inputs is None:
        raise loader.ExampleInputsError(f"no example inputs for {target}")
    model = loaded.model
    if kind == "converted":
        model = api.convert(model, gamma, example_inputs=inputs, **dict(options or {}))
    model.train()
    return Workload(model, inputs, loss=output_loss)


# -- result ----------------------------------------------------------------------------------------
@dataclass
class ChainShare:
    """A converted chain and its estimated share of the saving.

    Attributes
    ----------
    name : str
        Attribute of the converted model (``momentum_chain_0``).
    first, last : str
        Its first and last block.
    num_blocks : int
    state : str
        Shape and dtype of the chain's state.
    saved_bytes : int or None
        The report's estimate of the activation memory it saves.
    share : float or None
        ``saved_bytes`` over the sum of the estimates of all chains.
    """

    name: str
    first: str
    last: str
    num_blocks: int
    state: str
    saved_bytes: int | None
    share: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ProfileResult:
    """What :func:`profile_model` measured.

    Attributes
    ----------
    model : str
        Class name of the model.
    source : str
        Where it came from, in words.
    inputs : list of str
        Shape and dtype of each example input (``"8x3x64x64 float32"``).
    gamma : float
    use_backprop : bool
        Whether the converted chains use plain autograd instead of the reversible backward.
    device : str
    threads : int
    memory : dict of str to int
        Activation memory in bytes of one training step, per configuration.
    time_ratios : list of float
        ``time(converted) / time(original)`` of each interleaved pair.
    chains : list of ChainShare
        The converted chains and their estimated savings.
    report : ConversionReport
        The conversion report.
    """

    model: str
    source: str
    inputs: list[str]
    gamma: float
    use_backprop: bool
    device: str
    threads: int
    memory: dict[str, int]
    time_ratios: list[float]
    chains: list[ChainShare] = field(default_factory=list)
    report: ConversionReport | None = None

    @property
    def memory_ratio(self) -> float:
        """Activation memory of the converted model over the original's."""
        return self.memory["converted"] / max(self.memory["original"], 1)

    @property
    def time_ratio(self) -> float:
        """Median of :attr:`time_ratios`."""
        return float(statistics.median(self.time_ratios))

    @property
    def saved_bytes(self) -> int:
        """Measured saving: original minus converted activation memory."""
        return self.memory["original"] - self.memory["converted"]

    @property
    def estimated_saved_bytes(self) -> int | None:
        """Sum of the per-chain estimates (None if one is unknown)."""
        values = [c.saved_bytes for c in self.chains]
        if not values or any(v is None for v in values):
            return None
        return sum(v for v in values if v is not None)

    @property
    def converted_label(self) -> str:
        return "converted (backprop)" if self.use_backprop else "converted (reversible)"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "model": self.model,
            "source": self.source,
            "inputs": list(self.inputs),
            "gamma": self.gamma,
            "use_backprop": self.use_backprop,
            "device": self.device,
            "threads": self.threads,
            "memory_bytes": dict(self.memory),
            "memory_ratio": self.memory_ratio,
            "time_ratio": self.time_ratio,
            "time_ratios": list(self.time_ratios),
            "steps": len(self.time_ratios),
            "saved_bytes": self.saved_bytes,
            "estimated_saved_bytes": self.estimated_saved_bytes,
            "chains": [c.as_dict() for c in self.chains],
        }

    def tables(self, tablefmt: str = "simple") -> tuple[str, str]:
        """The measurement table and the per-chain table, as text."""
        rows = [
            ["original", _mib(self.memory["original"]), "1.00x", "1.00x"],
            [
                self.converted_label,
                _mib(self.memory["converted"]),
                f"{self.memory_ratio:.2f}x",
                f"{self.time_ratio:.2f}x",
            ],
        ]
        head = ["configuration", "activation memory", "memory ratio", "time ratio"]
        measured = tabulate(rows, head, tablefmt=tablefmt, disable_numparse=True)
        total = self.estimated_saved_bytes
        chain_rows = [
            [
                c.name,
                c.num_blocks,
                c.first,
                c.last,
                c.state,
                _mib(c.saved_bytes),
                "?" if c.share is None else f"{100 * c.share:.0f}%",
            ]
            for c in self.chains
        ]
        chain_rows.append(["total (estimate)", "", "", "", "", _mib(total), ""])
        chain_head = ["chain", "blocks", "first", "last", "state", "saved (est.)", "share"]
        per_chain = tabulate(chain_rows, chain_head, tablefmt=tablefmt, disable_numparse=True)
        return measured, per_chain

    def format(self, fmt: str = "table") -> str:
        """The result as ``"table"`` (plain text), ``"markdown"`` or ``"json"``."""
        if fmt == "json":
            return json.dumps(self.as_dict(), indent=2)
        if fmt not in ("table", "markdown"):
            raise ValueError(f"unknown format {fmt!r}: use table, json or markdown")
        md = fmt == "markdown"
        measured, per_chain = self.tables("github" if md else "simple")
        blocks = sum(c.num_blocks for c in self.chains)
        mode = "plain autograd" if self.use_backprop else "reversible"
        saved = self.saved_bytes
        pct = 100 * saved / max(self.memory["original"], 1)
        est = self.estimated_saved_bytes
        lines = [
            f"**{self.source} ({self.model})**" if md else f"{self.source} ({self.model})",
            f"example inputs: {', '.join(self.inputs)}",
            f"converted: {len(self.chains)} chain(s), {blocks} block(s), gamma {self.gamma:g}, "
            f"{mode}",
            "",
            measured,
            "",
            f"measured saving: {_mib(saved)} ({pct:.0f}% of the original's activation memory)"
            + ("" if est is None else f"; estimated from the chains: {_mib(est)}"),
            *self._verdict(),
            "",
            "Where the saving comes from (the conversion report's per-chain estimates):",
            "",
            per_chain,
            "",
            "The estimates count what plain autograd would keep inside each chain less the "
            "reversible state; they rank the chains, the measured figures above are what the step "
            "uses.",
            "",
            f"activation memory: peak resident memory of one training step (forward, sum of "
            f"the outputs, backward) over the memory before it, in a fresh process per "
            f"configuration, after one warm-up step ({self.device}, {self.threads} thread(s)); "
            f"time ratio: median over {len(self.time_ratios)} interleaved step pairs of "
            f"time(converted) / time(original).",
        ]
        return "\n".join(lines)

    def _verdict(self) -> list[str]:
        if self.memory_ratio >= 1:
            return [
                "no saving on this model: the reversible state and the recomputation in backward "
                "take as much memory as the activations the chains would keep (short chains); "
                "convert only some chains (--min-blocks, --include, --exclude) or keep the original"
            ]
        return []

    def __str__(self) -> str:
        return self.format("table")


def _mib(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / MIB:.1f} MiB"


def _shape_text(t: torch.Tensor) -> str:
    return f"{'x'.join(map(str, t.shape)) or 'scalar'} {str(t.dtype).removeprefix('torch.')}"


def _chain_shares(report: ConversionReport) -> list[ChainShare]:
    converted = report.converted
    values = [c.saved_bytes for c in converted]
    known = [v for v in values if v is not None]
    total = sum(known) if len(known) == len(values) else None
    shares = []
    for c in converted:
        state = "?" if c.shape is None else f"{'x'.join(map(str, c.shape))} {c.dtype or ''}"
        share = None
        if total and c.saved_bytes is not None:
            share = c.saved_bytes / total
        shares.append(
            ChainShare(
                name=c.name or "-",
                first=c.first,
                last=c.last,
                num_blocks=c.num_blocks,
                state=state.strip(),
                saved_bytes=c.saved_bytes,
                share=share,
            )
        )
    return shares


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
    use_backprop = bool(options.get("use_backprop", False))

    inputs = _example_inputs(loaded, input_shapes, dtypes, batch)
    if inputs is None:
        raise loader.ExampleInputsError(
            f"profile needs example inputs for {loaded.source}; add --input-shape (e.g. "
            f"--input-shape 8,3,224,224) or define example_inputs in the model file"
        )
    if batch is not None:
        what = f"{loaded.inputs_from or 'the example inputs'}, batch {batch}"
        check_example_inputs(loaded.model, inputs, source=what)

    say(f"converting {type(loaded.model).__name__} (gamma {gamma:g})", False)
    try:
        gm, report = api.convert(
            loaded.model, gamma, example_inputs=inputs, return_report=True, **options
        )
    except Exception as exc:
        raise ProfileError(
            f"converting the model from {loaded.source} failed ({one_line(exc)})", "convert"
        ) from exc
    if not report.converted:
        raise ProfileError(
            f"no residual chain of {loaded.source} was converted ({report.summary()}), so there "
            f"is nothing to save; see why with `fxmomentum inspect {loaded.target} "
            f"--show-skipped`",
            "convert",
        )

    original = Workload(loaded.model.train(), inputs, loss=output_loss)
    converted = Workload(gm.train(), inputs, loss=output_loss)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        original.to(device)
        converted.to(device)
        for name, workload in (("original", original), ("converted", converted)):
            say(f"checking a training step of the {name} model", False)
            try:
                train_step(workload)
            except Exception as exc:
                raise ProfileError(
                    f"a training step of the {name} model fails ({one_line(exc)})", name
                ) from exc
        ratios = _time_steps(original, converted, steps, warmup, device, say)
    finally:
        torch.set_num_threads(old_threads)
    del original, converted, gm

    memory: dict[str, int] = {}
    kwargs = {
        "target": loaded.target,
        "input_shapes": [list(s) for s in input_shapes] if input_shapes else None,
        "dtypes": _dtype_names(dtypes),
        "batch": batch,
        "gamma": gamma,
        "options": options,
    }
    for kind in CONFIGS:
        say(f"measuring the activation memory of the {kind} model (fresh process)", False)
        start = time.perf_counter()
        try:
            res = measure_memory(
                kind,
                BUILDER,
                {**kwargs, "kind": kind},
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
        key = "cuda_peak_bytes" if device.startswith("cuda") else "peak_bytes"
        memory[kind] = int(res[key])
        say(
            f"{kind}: {_mib(memory[kind])} of activation memory "
            f"({time.perf_counter() - start:.0f} s)",
            False,
        )

    return ProfileResult(
        model=type(loaded.model).__name__,
        source=f"{loaded.source}: {loaded.how}",
        inputs=[_shape_text(t) for t in inputs],
        gamma=float(gamma),
        use_backprop=use_backprop,
        device=device,
        threads=threads,
        memory=memory,
        time_ratios=ratios,
        chains=_chain_shares(report),
        report=report,
    )


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
