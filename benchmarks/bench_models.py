"""Benchmark of whole models: activation memory and time of a training step, converted or not.

Four models, random weights, one training step (forward, ``output.sum()``, backward):

- torchvision ResNet-101 (batch 8, 3x96x96; time also at 3x64x64): the original; fxmomentum.convert
  (reversible, and with ``use_backprop=True``); ``torch.utils.checkpoint`` around each Bottleneck
  of layer1..4; the official library ``momentumnet`` (``transform_to_momentumnet``), when
  installed;
- a stack of pre-norm ``nn.TransformerEncoderLayer`` (d=256, 8 heads, ff 1024, seq 256, batch 8,
  dropout 0.1) at 12 and 48 layers: the original, reversible (fxmomentum.convert when it captures
  the chain, else fxmomentum.transform_to_momentumnet with ``split_layers=True``), checkpoint
  per layer;
- torchvision vit_b_16 at 96x96 (batch 8): the original and fxmomentum.convert (reversible);
- Hugging Face ``GPT2Model`` from a ``GPT2Config`` (d=256, 8 heads, inner 1024, 256 positions,
  vocabulary 1000, default dropouts, ``use_cache=False``), input ids batch 8 x seq 256, loss
  ``last_hidden_state.sum()``, at 12 and 48 layers: the original, fxmomentum.convert (one chain
  across the layers) and the model's own ``gradient_checkpointing_enable()``. It needs
  ``transformers`` (skipped, with the reason logged, without it) and is not in the default run
  (about 4 minutes on 2 threads): ``--only gpt2 --out DIR``, whose ``models.md`` and
  ``models.json`` are kept as ``benchmarks/results/models_gpt2.*``.

Run ``python benchmarks/bench_models.py`` to regenerate ``benchmarks/results/models.md``,
``models.json`` and the ``models_*.png`` bar plots; ``--quick`` runs tiny sizes in seconds (a smoke
test, written to a temporary folder unless ``--out`` is given). Methods follow "How things are
measured" in DESIGN.md (``harness.measure_memory``: one fresh process per configuration;
``harness.paired_time``: interleaved steps, median of the per-pair ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from harness import Workload, measure_memory, paired_time, train_step, zero_grads
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import Bottleneck, ResNet

import fxmomentum

HERE = Path(__file__).resolve().parent
BUILDER = "bench_models:build"
GAMMA = 0.9
MIB = 1024 * 1024

#: How the tables name each configuration.
LABELS = {
    "original": "original",
    "reversible": "fxmomentum.convert (reversible)",
    "backprop": "fxmomentum.convert (use_backprop=True)",
    "checkpoint": "torch.utils.checkpoint per block",
    "checkpoint_reentrant": "torch.utils.checkpoint per block (use_reentrant=True)",
    "checkpoint_chained": "torch.utils.checkpoint on the blocks the chains hold",
    "official": "momentumnet.transform_to_momentumnet",
    "recompute": "recomputation floor: each chain block run once more (time only)",
}
SHORT = {
    "original": "original",
    "reversible": "reversible",
    "backprop": "convert backprop",
    "checkpoint": "checkpoint",
    "checkpoint_reentrant": "reentrant ckpt",
    "checkpoint_chained": "ckpt chained blocks",
    "official": "momentumnet",
    "recompute": "recompute floor",
}
#: Configurations that are timed but not measured for memory.
TIME_ONLY = {"recompute"}

#: Targets and references (DESIGN.md; CPU, 2 threads).
RESNET_TARGETS = {"memory": 0.55, "time": 1.25}
RESNET_REFERENCES = {
    "official": {"memory": 1.04, "time": 1.87},
    "checkpoint": {"memory": 0.42, "time": 1.18},
    "floor": {"memory": 0.40},
}
TRANSFORMER_TARGETS = {"memory": 0.19, "growth": 1.15, "time": 1.3}


# -- sizes -----------------------------------------------------------------------------------------
@dataclass
class Sizes:
    """Sizes of one run (full or quick)."""

    resnet_layers: list[int]
    resnet_batch: int
    resnet_memory_size: int
    resnet_time_sizes: list[int]
    tf_width: int
    tf_heads: int
    tf_ff: int
    tf_seq: int
    tf_batch: int
    tf_memory_layers: list[int]
    tf_time_layers: int
    vit_full: bool
    vit_image: int
    vit_patch: int
    vit_layers: int
    vit_heads: int
    vit_hidden: int
    vit_mlp: int
    vit_batch: int
    gpt2_width: int
    gpt2_heads: int
    gpt2_inner: int
    gpt2_seq: int
    gpt2_batch: int
    gpt2_vocab: int
    gpt2_memory_layers: list[int]
    gpt2_time_layers: int
    time_repeats: int
    time_warmup: int
    #: Steps of the reversible configuration alone before its interleaved pairs.
    solo_warmup: int = 2
    memory_jobs: int = 1
    #: Threads of every step (None: ``--threads``).
    threads: int | None = None
    #: Memory jobs run, by name, per benchmark (None: all); the quick mode keeps two.
    memory_only: dict[str, list[str]] | None = None
    #: Time steps by this process's CPU time (``time.process_time``) rather than wall time.
    cpu_time: bool = False


FULL = Sizes(
    resnet_layers=[3, 4, 23, 3],  # ResNet-101
    resnet_batch=8,
    resnet_memory_size=96,
    resnet_time_sizes=[96, 64],
    tf_width=256,
    tf_heads=8,
    tf_ff=1024,
    tf_seq=256,
    tf_batch=8,
    tf_memory_layers=[12, 48],
    tf_time_layers=12,
    vit_full=True,  # torchvision vit_b_16(image_size=96)
    vit_image=96,
    vit_patch=16,
    vit_layers=12,
    vit_heads=12,
    vit_hidden=768,
    vit_mlp=3072,
    vit_batch=8,
    gpt2_width=256,
    gpt2_heads=8,
    gpt2_inner=1024,
    gpt2_seq=256,
    gpt2_batch=8,
    gpt2_vocab=1000,
    gpt2_memory_layers=[12, 48],
    gpt2_time_layers=12,
    time_repeats=3,
    time_warmup=1,
)

# Tiny sizes: a smoke test of every path (the figures mean little). Every configuration is built
# and timed; only the ResNet's original and reversible ones are measured for memory (a fresh
# process each costs seconds of imports), on one thread.
QUICK = Sizes(
    resnet_layers=[2, 2, 2, 2],
    resnet_batch=2,
    resnet_memory_size=32,
    resnet_time_sizes=[32],
    tf_width=32,
    tf_heads=4,
    tf_ff=64,
    tf_seq=16,
    tf_batch=2,
    tf_memory_layers=[2, 4],
    tf_time_layers=2,
    vit_full=False,
    vit_image=32,
    vit_patch=16,
    vit_layers=2,
    vit_heads=2,
    vit_hidden=32,
    vit_mlp=64,
    vit_batch=2,
    gpt2_width=32,
    gpt2_heads=4,
    gpt2_inner=64,
    gpt2_seq=16,
    gpt2_batch=2,
    gpt2_vocab=100,
    gpt2_memory_layers=[2, 4],
    gpt2_time_layers=2,
    time_repeats=2,
    time_warmup=1,
    solo_warmup=0,
    memory_jobs=2,
    threads=1,
    memory_only={"resnet": ["original", "reversible"], "transformer": [], "vit": [], "gpt2": []},
)


# -- models ----------------------------------------------------------------------------------------
def official_status() -> tuple[bool, str]:
    """Whether the official library ``momentumnet`` imports, and its version or the error."""
    try:
        import momentumnet
    except Exception as exc:  # any import failure means "skip it"
        return False, f"{type(exc).__name__}: {exc}"
    return True, str(getattr(momentumnet, "__version__", "unknown version"))


def transformers_status() -> tuple[bool, str]:
    """Whether Hugging Face ``transformers`` imports, and its version or the error."""
    try:
        import transformers
    except Exception as exc:  # any import failure means "skip the GPT-2 benchmark"
        return False, f"{type(exc).__name__}: {exc}"
    return True, str(transformers.__version__)


class Checkpointed(nn.Module):
    """``module`` under ``torch.utils.checkpoint``: only its inputs are kept.

    Non-reentrant by default, as torch recommends. The reentrant variant runs the forward
    without grad and recomputes in backward, as a reversible chain does, so it is the cost of
    recomputation alone; it gives no gradient to a module whose inputs do not require grad,
    so it is only used where every wrapped module's input does (ResNet's blocks).
    """

    def __init__(self, module: nn.Module, reentrant: bool = False) -> None:
        super().__init__()
        self.module = module
        self.reentrant = reentrant

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.module, *args, use_reentrant=self.reentrant, **kwargs)


class RunTwice(nn.Module):
    """``module`` run once more, with grad, after its forward; the second result is dropped.

    A step of a model whose chain blocks are wrapped so costs what any method that recomputes
    each block once in backward must pay at least (checkpointing, a reversible chain): the
    recomputation floor of the time ratio, without any of those methods' own bookkeeping.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        with torch.enable_grad():
            self.module(*args, **kwargs)
        return out


def encoder_stack(layers: int, width: int, heads: int, ff: int) -> nn.Sequential:
    """``layers`` pre-norm ``nn.TransformerEncoderLayer`` (batch first, dropout 0.1) in a row."""
    return nn.Sequential(
        *[
            nn.TransformerEncoderLayer(
                width, heads, ff, dropout=0.1, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        ]
    )


def convert_captures_stack(width: int = 32, heads: int = 4, ff: int = 64) -> bool:
    """Whether fxmomentum.convert finds a 2-layer encoder stack's 4 residual blocks as one chain."""
    stack = encoder_stack(2, width, heads, ff)
    try:
        report = fxmomentum.inspect(stack, (torch.randn(2, 8, width),))
    except Exception:
        return False
    return [c.num_blocks for c in report.converted] == [4]


def gpt2_model(layers: int, width: int, heads: int, inner: int, seq: int, vocab: int) -> nn.Module:
    """A Hugging Face ``GPT2Model`` with random weights (default dropouts, ``use_cache=False``)."""
    from transformers import GPT2Config, GPT2Model
    from transformers.utils import logging

    # The default bos/eos token ids (50256) lie outside the small vocabulary: a warning per
    # build that would hide a failing child's own error.
    logging.set_verbosity_error()
    config = GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        n_inner=inner,
        n_positions=seq,
        vocab_size=vocab,
        use_cache=False,
    )
    return GPT2Model(config)


def _hf_checkpointing(model: nn.Module) -> None:
    # Deprecated in favour of activation_checkpointing_enable in transformers 5, same behaviour
    # (non-reentrant torch.utils.checkpoint around each GPT2Block).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()


def gpt2_checkpoint_method() -> str:
    """``"hf"`` when a tiny GPT2Model takes ``gradient_checkpointing_enable()`` and trains, else
    ``"wrap"`` (each block of ``model.h`` under :class:`Checkpointed`)."""
    try:
        model = gpt2_model(1, 16, 2, 32, 8, 50)
        _hf_checkpointing(model)
        model.train()(torch.randint(0, 50, (2, 8))).last_hidden_state.sum().backward()
    except Exception:
        return "wrap"
    return "hf"


def last_hidden_sum(output: Any) -> torch.Tensor:
    """The loss of the GPT-2 benchmark: ``output.last_hidden_state.sum()``."""
    return output.last_hidden_state.sum()


def build(bench: str, kind: str, method: str = "convert", **sizes: Any) -> Workload:
    """One configuration's workload: the builder ``harness.measure_memory`` runs in the child.

    Parameters
    ----------
    bench : {"resnet", "transformer", "vit", "gpt2"}
    kind : str
        A key of :data:`LABELS`.
    method : {"convert", "transform", "hf", "wrap"}
        For the transformer's ``reversible``: fxmomentum.convert, or
        fxmomentum.transform_to_momentumnet (``split_layers=True``). For GPT-2's
        ``checkpoint``: the model's ``gradient_checkpointing_enable()`` (``"hf"``), or each block
        of ``model.h`` under :class:`Checkpointed` (``"wrap"``).
    **sizes
        ``batch`` and the sizes of the model (see the ``_build_*`` functions).

    Returns
    -------
    Workload
        The model in training mode and its input (which does not require grad); GPT-2's loss
        is :func:`last_hidden_sum`.

    Examples
    --------
    >>> w = build("resnet", "checkpoint", layers=[1, 1, 1, 1], batch=2, size=32)
    >>> train_step(w)
    """
    if bench == "resnet":
        model, x = _build_resnet(kind, **sizes)
    elif bench == "transformer":
        model, x = _build_transformer(kind, method, **sizes)
    elif bench == "vit":
        model, x = _build_vit(kind, **sizes)
    elif bench == "gpt2":
        model, x = _build_gpt2(kind, method, **sizes)
        return Workload(model.train(), (x,), loss=last_hidden_sum)
    else:
        raise ValueError(f"unknown benchmark {bench!r}")
    return Workload(model.train(), (x,))


def _convert(model: nn.Module, kind: str, x: torch.Tensor) -> nn.Module:
    return fxmomentum.convert(model, GAMMA, example_inputs=(x,), use_backprop=kind == "backprop")


def _build_resnet(
    kind: str, layers: list[int], batch: int, size: int
) -> tuple[nn.Module, torch.Tensor]:
    model = ResNet(Bottleneck, list(layers))
    x = torch.randn(batch, 3, size, size)
    if kind == "original":
        return model, x
    if kind in ("reversible", "backprop"):
        return _convert(model, kind, x), x
    if kind in ("checkpoint", "checkpoint_reentrant"):
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            for i in range(len(stage)):
                stage[i] = Checkpointed(stage[i], reentrant=kind == "checkpoint_reentrant")
        return model, x
    if kind in ("recompute", "checkpoint_chained"):
        # The blocks fxmomentum chains: all but each stage's first (its projection shortcut).
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            for i in range(1, len(stage)):
                stage[i] = RunTwice(stage[i]) if kind == "recompute" else Checkpointed(stage[i])
        return model, x
    if kind == "official":
        from momentumnet import transform_to_momentumnet

        return transform_to_momentumnet(model, gamma=GAMMA, use_backprop=False), x
    raise ValueError(f"unknown kind {kind!r} for resnet")


def _build_transformer(
    kind: str, method: str, layers: int, width: int, heads: int, ff: int, seq: int, batch: int
) -> tuple[nn.Module, torch.Tensor]:
    stack = encoder_stack(layers, width, heads, ff)
    x = torch.randn(batch, seq, width)
    if kind == "original":
        return stack, x
    if kind in ("reversible", "backprop") and method == "convert":
        return _convert(stack, kind, x), x
    if kind in ("reversible", "backprop") and method == "transform":
        model = fxmomentum.transform_to_momentumnet(
            nn.Sequential(stack),
            sub_layers=["0"],
            keep_first_layer=False,
            gamma=GAMMA,
            use_backprop=kind == "backprop",
            split_layers=True,
        )
        return model, x
    if kind == "checkpoint":
        return nn.Sequential(*[Checkpointed(layer) for layer in stack]), x
    if kind == "recompute":
        return nn.Sequential(*[RunTwice(layer) for layer in stack]), x
    raise ValueError(f"unknown kind {kind!r} / method {method!r} for transformer")


def _build_vit(
    kind: str,
    full: bool,
    image: int,
    patch: int,
    layers: int,
    heads: int,
    hidden: int,
    mlp: int,
    batch: int,
) -> tuple[nn.Module, torch.Tensor]:
    if full:
        model = torchvision.models.vit_b_16(image_size=image)
    else:
        model = torchvision.models.VisionTransformer(
            image_size=image,
            patch_size=patch,
            num_layers=layers,
            num_heads=heads,
            hidden_dim=hidden,
            mlp_dim=mlp,
        )
    x = torch.randn(batch, 3, image, image)
    if kind == "original":
        return model, x
    if kind in ("reversible", "backprop"):
        return _convert(model, kind, x), x
    raise ValueError(f"unknown kind {kind!r} for vit")


def _build_gpt2(
    kind: str,
    method: str,
    layers: int,
    width: int,
    heads: int,
    inner: int,
    seq: int,
    vocab: int,
    batch: int,
) -> tuple[nn.Module, torch.Tensor]:
    model = gpt2_model(layers, width, heads, inner, seq, vocab)
    ids = torch.randint(0, vocab, (batch, seq))
    if kind == "original":
        return model, ids
    if kind in ("reversible", "backprop"):
        # Converted on a small example: the shape-aware graph reads batch size and length
        # from its input (a batch of two, as GPT-2's mask code takes another path for one).
        return _convert(model, kind, ids[:2, :32]), ids
    if kind == "checkpoint" and method == "hf":
        _hf_checkpointing(model)
        return model, ids
    if kind == "checkpoint" and method == "wrap":
        for i in range(len(model.h)):
            model.h[i] = Checkpointed(model.h[i])
        return model, ids
    raise ValueError(f"unknown kind {kind!r} / method {method!r} for gpt2")


# -- measuring -------------------------------------------------------------------------------------
Log = Callable[[str], None]


def _memory(
    jobs: list[tuple[str, dict[str, Any]]], s: Sizes, threads: int, log: Log, bench: str
) -> dict[str, dict[str, Any]]:
    """Activation memory of each ``(name, builder kwargs)``, one fresh process each.

    ``s.memory_jobs`` children may run at once: each measures its own resident set, so this
    changes the time taken, not the figures.
    """
    if s.memory_only is not None:
        jobs = [(name, kw) for name, kw in jobs if name in s.memory_only.get(bench, [])]

    def one(job: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        name, kwargs = job
        start = time.perf_counter()
        try:
            res = measure_memory(name, BUILDER, kwargs, threads=threads)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            # The first line holds the child's exit status (-9: killed, e.g. out of memory).
            lines = str(exc).strip().splitlines()
            last = lines[-1][:300] if len(lines) < 2 else f"{lines[0][:200]} {lines[-1][:300]}"
            log(f"  memory {name}: FAILED ({last})")
            return name, {"error": last}
        log(
            f"  memory {name:<28} {res['peak_bytes'] / MIB:9.1f} MiB"
            f"  ({time.perf_counter() - start:.0f} s)"
        )
        return name, {"peak_bytes": res["peak_bytes"]}

    if s.memory_jobs <= 1:
        return dict(one(j) for j in jobs)
    with ThreadPoolExecutor(s.memory_jobs) as pool:
        return dict(pool.map(one, jobs))


def _time(
    configs: dict[str, dict[str, Any]], s: Sizes, log: Log, label: str
) -> dict[str, dict[str, Any]]:
    """Paired time ratio of each configuration against ``original`` (built here)."""
    workloads: dict[str, Workload] = {}
    out: dict[str, dict[str, Any]] = {}
    for kind, kwargs in configs.items():
        torch.manual_seed(0)
        try:
            workloads[kind] = build(**kwargs)
        except Exception as exc:
            out[kind] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            log(f"  time {label} {kind}: FAILED to build ({out[kind]['error']})")

    def step_of(w: Workload) -> Callable[[], None]:
        def step() -> None:
            zero_grads(w)
            train_step(w)

        return step

    base = step_of(workloads["original"])
    for kind, w in workloads.items():
        if kind == "original":
            continue
        start = time.perf_counter()
        try:
            # Solo steps first for the reversible chains: their kernels compile (torch.compile)
            # on the first steps, once per process and shape, and would spoil the first pairs.
            for _ in range(s.solo_warmup if kind == "reversible" else 0):
                step_of(w)()
            clock = time.process_time if s.cpu_time else time.perf_counter
            res = paired_time(base, step_of(w), s.time_repeats, s.time_warmup, clock=clock)
        except Exception as exc:
            out[kind] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            log(f"  time {label} {kind}: FAILED ({out[kind]['error']})")
            continue
        out[kind] = {"ratio": res.ratio, "ratios": res.ratios}
        log(
            f"  time {label} {kind:<12} {res.ratio:5.2f}x  {_ratios_text(res.ratios)}"
            f"  ({time.perf_counter() - start:.0f} s)"
        )
    return out


def _ratios_text(ratios: list[float]) -> str:
    return "[" + " ".join(f"{r:.2f}" for r in ratios) + "]"


def run_resnet(s: Sizes, official: bool, threads: int, log: Log) -> dict[str, Any]:
    """ResNet: memory at ``resnet_memory_size``, time at each of ``resnet_time_sizes``."""
    kinds = ["original", "reversible", "backprop", "checkpoint", "checkpoint_reentrant"]
    kinds += ["checkpoint_chained"] + (["official"] if official else [])
    kinds.append("recompute")
    base = {"bench": "resnet", "layers": s.resnet_layers, "batch": s.resnet_batch}
    log(f"ResNet {s.resnet_layers}: memory at {s.resnet_memory_size}x{s.resnet_memory_size}")
    jobs = [
        (k, {**base, "kind": k, "size": s.resnet_memory_size}) for k in kinds if k not in TIME_ONLY
    ]
    memory = _memory(jobs, s, threads, log, "resnet")
    times = {}
    for size in s.resnet_time_sizes:
        log(f"ResNet: time at {size}x{size}")
        configs = {k: {**base, "kind": k, "size": size} for k in kinds}
        times[str(size)] = _time(configs, s, log, f"{size}px")
    return {"kinds": kinds, "memory": memory, "time": times}


def run_transformer(s: Sizes, threads: int, log: Log) -> dict[str, Any]:
    """Encoder stack: memory at each of ``tf_memory_layers``, time at ``tf_time_layers``."""
    method = "convert" if convert_captures_stack() else "transform"
    log(f"Transformer stack: reversible through {method}")
    kinds = ["original", "reversible", "checkpoint", "recompute"]
    base = {
        "bench": "transformer",
        "method": method,
        "width": s.tf_width,
        "heads": s.tf_heads,
        "ff": s.tf_ff,
        "seq": s.tf_seq,
        "batch": s.tf_batch,
    }
    memory, times = _by_depth(
        base, kinds, s.tf_memory_layers, s.tf_time_layers, s, threads, log, "Transformer stack"
    )
    return {"kinds": kinds, "method": method, "memory": memory, "time": times}


def _by_depth(
    base: dict[str, Any],
    kinds: list[str],
    memory_layers: list[int],
    time_layers: int,
    s: Sizes,
    threads: int,
    log: Log,
    label: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Memory of each kind at each of ``memory_layers`` (``"<kind>-<layers>"``), and time at
    ``time_layers``."""
    jobs = [
        (f"{k}-{n}", {**base, "kind": k, "layers": n})
        for n in memory_layers
        for k in kinds
        if k not in TIME_ONLY
    ]
    memory = _memory(jobs, s, threads, log, base["bench"])
    log(f"{label}: time at {time_layers} layers")
    configs = {k: {**base, "kind": k, "layers": time_layers} for k in kinds}
    return memory, _time(configs, s, log, f"{time_layers} layers")


def run_vit(s: Sizes, threads: int, log: Log) -> dict[str, Any]:
    """ViT: memory and time, converted against original."""
    kinds = ["original", "reversible"]
    base = {
        "bench": "vit",
        "full": s.vit_full,
        "image": s.vit_image,
        "patch": s.vit_patch,
        "layers": s.vit_layers,
        "heads": s.vit_heads,
        "hidden": s.vit_hidden,
        "mlp": s.vit_mlp,
        "batch": s.vit_batch,
    }
    log(f"ViT: memory and time at {s.vit_image}x{s.vit_image}")
    memory = _memory([(k, {**base, "kind": k}) for k in kinds], s, threads, log, "vit")
    times = _time({k: {**base, "kind": k} for k in kinds}, s, log, "vit")
    torch.manual_seed(0)
    report = fxmomentum.inspect(
        build("vit", "original", **{k: v for k, v in base.items() if k != "bench"}).model,
        (torch.randn(1, 3, s.vit_image, s.vit_image),),
    )
    chains = [c.num_blocks for c in report.converted]
    return {"kinds": kinds, "memory": memory, "time": times, "chains": chains}


def run_gpt2(s: Sizes, threads: int, log: Log) -> dict[str, Any]:
    """GPT-2: memory at each of ``gpt2_memory_layers``, time and chains at ``gpt2_time_layers``.

    Returns ``{"skipped": reason}`` when ``transformers`` does not import.
    """
    available, version = transformers_status()
    if not available:
        log(f"GPT-2: skipped, transformers is not available ({version})")
        return {"skipped": f"transformers is not available ({version})"}
    method = gpt2_checkpoint_method()
    log(
        f"GPT-2 (transformers {version}): checkpoint through "
        + ("gradient_checkpointing_enable()" if method == "hf" else "Checkpointed per block")
    )
    kinds = ["original", "reversible", "checkpoint"]
    base = {
        "bench": "gpt2",
        "method": method,
        "width": s.gpt2_width,
        "heads": s.gpt2_heads,
        "inner": s.gpt2_inner,
        "seq": s.gpt2_seq,
        "vocab": s.gpt2_vocab,
        "batch": s.gpt2_batch,
    }
    n = s.gpt2_time_layers
    memory, times = _by_depth(base, kinds, s.gpt2_memory_layers, n, s, threads, log, "GPT-2")
    # The chains fxmomentum.convert finds on the example it converts with (a batch of one
    # would also take the position embedding's add, then of equal shapes, for a 1-block chain).
    torch.manual_seed(0)
    start = time.perf_counter()
    w = build("gpt2", "original", layers=n, **{k: v for k, v in base.items() if k != "bench"})
    report = fxmomentum.inspect(w.model, (w.inputs[0][:2, :32],))
    chains = [c.num_blocks for c in report.converted]
    log(f"GPT-2: chains at {n} layers {chains} ({time.perf_counter() - start:.0f} s)")
    return {
        "kinds": kinds,
        "method": method,
        "transformers": version,
        "memory": memory,
        "time": times,
        "chains": {str(n): chains},
    }


# -- output ----------------------------------------------------------------------------------------
def _peak(memory: dict[str, Any], name: str) -> int | None:
    return memory.get(name, {}).get("peak_bytes")


def _ratio(value: int | None, base: int | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def _x(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / MIB:.1f}"


def _time_cell(times: dict[str, Any], kind: str) -> str:
    if kind == "original":
        return "1.00x"
    entry = times.get(kind)
    if entry is None:
        return "-"
    if "error" in entry:
        return "failed"
    return _x(entry["ratio"])


def _check(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def resnet_section(r: dict[str, Any], s: Sizes) -> tuple[list[str], dict[str, Any]]:
    mem = r["memory"]
    base = _peak(mem, "original")
    size = s.resnet_memory_size
    head = [
        "configuration",
        f"activation memory {size}x{size} (MiB)",
        "memory ratio",
        *[f"time ratio {t}x{t}" for t in s.resnet_time_sizes],
    ]
    rows, ratios = [], {}
    for kind in r["kinds"]:
        peak = _peak(mem, kind)
        ratio = _ratio(peak, base)
        ratios[kind] = {"memory": ratio}
        mem_cell = "failed" if "error" in mem.get(kind, {}) else _mib(peak)
        time_cells = [_time_cell(r["time"][str(t)], kind) for t in s.resnet_time_sizes]
        for t in s.resnet_time_sizes:
            ratios[kind][f"time_{t}"] = r["time"][str(t)].get(kind, {}).get("ratio")
        rows.append([LABELS[kind], mem_cell, _x(ratio), *time_cells])
    layers = "-".join(map(str, s.resnet_layers))
    name = "ResNet-101" if s.resnet_layers == [3, 4, 23, 3] else f"ResNet (Bottleneck {layers})"
    rev = ratios.get("reversible", {})
    t0 = f"time_{s.resnet_time_sizes[0]}"
    mem_ok = None if rev.get("memory") is None else rev["memory"] <= RESNET_TARGETS["memory"]
    time_ok = None if rev.get(t0) is None else rev[t0] <= RESNET_TARGETS["time"]
    lines = [
        f"## {name}: torchvision, random weights, batch {s.resnet_batch}",
        "",
        *_table(head, rows),
        "",
        f"- Target, reversible: <= {RESNET_TARGETS['memory']:.2f}x memory: "
        f"{_x(rev.get('memory'), 3)}, {_check(mem_ok)}; <= {RESNET_TARGETS['time']:.2f}x time "
        f"({s.resnet_time_sizes[0]}x{s.resnet_time_sizes[0]}): {_x(rev.get(t0))}, "
        f"{_check(time_ok)}.",
        "- References (DESIGN.md, same machine class): momentumnet 1.04x memory / 1.87x time; "
        "checkpoint per block 0.42x / 1.18x; floor (nothing inside the chains kept) 0.40x.",
        "- checkpoint wraps each Bottleneck of layer1..4 (non-reentrant, and reentrant: "
        "forward without grad, recomputation in backward, what a reversible chain does besides "
        "its exact arithmetic); on the blocks the chains hold: each stage's Bottlenecks but the "
        "first (non-reentrant), what the chains recompute; momentumnet is "
        "`transform_to_momentumnet(model, gamma=0.9, use_backprop=False)`.",
        *_floor_note(ratios, t0, RESNET_TARGETS["time"], "the blocks the chains hold"),
        "",
    ]
    return lines, ratios


def _floor_note(ratios: dict[str, Any], key: str, target: float, blocks: str) -> list[str]:
    """A line on the recomputation floor of the time ratio, when it was measured."""
    floor = ratios.get("recompute", {}).get(key)
    if floor is None:
        return []
    rev = ratios.get("reversible", {}).get(key)
    above = "" if rev is None else f"; reversible is {rev / floor:.2f}x the floor"
    where = "below" if target < floor else "above"
    return [
        f"- Recomputation floor: {_x(floor)}, the original's step with {blocks} run once more "
        f"(with grad, result dropped), which any method that recomputes each block in "
        f"backward pays at least. The time target {target:.2f}x lies {where} it{above}."
    ]


def _depth_rows(
    r: dict[str, Any], layers: list[int], labels: dict[str, str], growth: bool
) -> tuple[list[list[str]], dict[str, Any]]:
    """A row per kind: MiB and ratio to the original at each depth, then (with ``growth``)
    the last depth's MiB over the first's, then the time ratio; and those ratios."""
    mem = r["memory"]
    rows, ratios = [], {}
    for kind in r["kinds"]:
        row = [labels[kind]]
        ratios[kind] = {}
        for n in layers:
            peak = _peak(mem, f"{kind}-{n}")
            ratio = _ratio(peak, _peak(mem, f"original-{n}"))
            ratios[kind][f"memory_{n}"] = ratio
            failed = "error" in mem.get(f"{kind}-{n}", {})
            row += ["failed" if failed else _mib(peak), _x(ratio)]
        if growth:
            grew = _ratio(_peak(mem, f"{kind}-{layers[-1]}"), _peak(mem, f"{kind}-{layers[0]}"))
            ratios[kind]["growth"] = grew
            row.append(_x(grew))
        row.append(_time_cell(r["time"], kind))
        ratios[kind]["time"] = r["time"].get(kind, {}).get("ratio")
        rows.append(row)
    return rows, ratios


def transformer_section(r: dict[str, Any], s: Sizes) -> tuple[list[str], dict[str, Any]]:
    mem = r["memory"]
    n0, n1 = s.tf_memory_layers[0], s.tf_memory_layers[-1]
    head = ["configuration"]
    for n in s.tf_memory_layers:
        head += [f"activation memory {n} layers (MiB)", f"memory ratio {n}"]
    head.append(f"time ratio {s.tf_time_layers} layers")
    labels = dict(LABELS)
    if r["method"] != "convert":
        labels["reversible"] = "fxmomentum.transform_to_momentumnet (split_layers=True)"
    rows, ratios = _depth_rows(r, s.tf_memory_layers, labels, growth=False)
    rev0, rev1 = _peak(mem, f"reversible-{n0}"), _peak(mem, f"reversible-{n1}")
    growth = _ratio(rev1, rev0)
    ratios["reversible"]["growth"] = growth
    rv = ratios["reversible"]
    mem_ok = (
        None
        if rv.get(f"memory_{n0}") is None
        else max(v for k, v in rv.items() if k.startswith("memory_") and v is not None)
        <= TRANSFORMER_TARGETS["memory"]
    )
    growth_ok = None if growth is None else growth <= TRANSFORMER_TARGETS["growth"]
    time_ok = None if rv.get("time") is None else rv["time"] <= TRANSFORMER_TARGETS["time"]
    how = (
        "`fxmomentum.convert(stack, 0.9)`: the converter captures the stack, "
        "one chain of two residual blocks per layer"
        if r["method"] == "convert"
        else "`fxmomentum.transform_to_momentumnet(nn.Sequential(stack), sub_layers=['0'], "
        "keep_first_layer=False, split_layers=True)`: fxmomentum.convert did not capture the stack"
    )
    lines = [
        f"## Pre-norm nn.TransformerEncoderLayer stack: d={s.tf_width}, {s.tf_heads} heads, "
        f"ff {s.tf_ff}, seq {s.tf_seq}, batch {s.tf_batch}, dropout 0.1",
        "",
        *_table(head, rows),
        "",
        f"- Reversible through {how}.",
        f"- Reversible activation memory at {n1} layers over {n0} layers: {_x(growth)} "
        f"(target: within 15%, {_check(growth_ok)}).",
        f"- Target, reversible: <= {TRANSFORMER_TARGETS['memory']:.2f}x memory: "
        f"{_check(mem_ok)}; <= {TRANSFORMER_TARGETS['time']:.2f}x time: {_x(rv.get('time'))}, "
        f"{_check(time_ok)}. References (DESIGN.md): checkpoint per layer 0.20x at 12 layers, "
        "growing with depth; floor 0.07x plus one block's activations.",
        *_floor_note(ratios, "time", TRANSFORMER_TARGETS["time"], "every layer"),
        "",
    ]
    return lines, ratios


def vit_section(r: dict[str, Any], s: Sizes) -> tuple[list[str], dict[str, Any]]:
    mem = r["memory"]
    base = _peak(mem, "original")
    head = ["configuration", "activation memory (MiB)", "memory ratio", "time ratio"]
    rows, ratios = [], {}
    for kind in r["kinds"]:
        peak = _peak(mem, kind)
        ratio = _ratio(peak, base)
        ratios[kind] = {"memory": ratio, "time": r["time"].get(kind, {}).get("ratio")}
        failed = "error" in mem.get(kind, {})
        rows.append(
            [
                LABELS[kind],
                "failed" if failed else _mib(peak),
                _x(ratio),
                _time_cell(r["time"], kind),
            ]
        )
    if s.vit_full:
        what = f"torchvision vit_b_16(image_size={s.vit_image})"
    else:
        what = (
            f"torchvision VisionTransformer(image {s.vit_image}, patch {s.vit_patch}, "
            f"{s.vit_layers} layers, width {s.vit_hidden})"
        )
    tokens = (s.vit_image // s.vit_patch) ** 2 + 1
    lines = [
        f"## {what}: random weights, batch {s.vit_batch}, {tokens} tokens",
        "",
        *_table(head, rows),
        "",
        f"- fxmomentum.convert finds chain(s) of {r.get('chains')} residual blocks "
        "(attention and MLP of each encoder block).",
        "",
    ]
    return lines, ratios


def gpt2_section(r: dict[str, Any], s: Sizes) -> tuple[list[str], dict[str, Any]]:
    title = (
        f"## Hugging Face GPT2Model: d={s.gpt2_width}, {s.gpt2_heads} heads, inner "
        f"{s.gpt2_inner}, vocabulary {s.gpt2_vocab}, seq {s.gpt2_seq}, batch {s.gpt2_batch}, "
        "default dropouts, random weights"
    )
    if "skipped" in r:
        return [title, "", f"Skipped: {r['skipped']}.", ""], {}
    mem = r["memory"]
    ns = s.gpt2_memory_layers
    n0, n1 = ns[0], ns[-1]
    head = ["configuration"]
    for n in ns:
        head += [f"activation memory {n} layers (MiB)", f"memory ratio {n}"]
    head += [f"memory {n1} / {n0} layers", f"time ratio {s.gpt2_time_layers} layers"]
    labels = {
        "original": "original",
        "reversible": "fxmomentum.convert (reversible)",
        "checkpoint": "gradient_checkpointing_enable() (per layer)"
        if r["method"] == "hf"
        else "torch.utils.checkpoint per layer (Checkpointed)",
    }
    rows, ratios = _depth_rows(r, ns, labels, growth=True)
    failures = [
        f"- {name}: the measurement failed ({entry['error']})."
        for name, entry in mem.items()
        if "error" in entry
    ]
    chains = "; ".join(
        (f"1 chain of {c[0]} blocks" if len(c) == 1 else f"{len(c)} chains of {c} blocks")
        + f" at {n} layers"
        for n, c in r["chains"].items()
    )
    how = (
        "`model.gradient_checkpointing_enable()` (non-reentrant torch.utils.checkpoint around "
        "each GPT2Block)"
        if r["method"] == "hf"
        else "each block of `model.h` under torch.utils.checkpoint (non-reentrant): "
        "`gradient_checkpointing_enable()` failed on a GPT2Config-built model"
    )
    lines = [
        title,
        "",
        *_table(head, rows),
        "",
        f"- transformers {r['transformers']}; `GPT2Config(n_embd={s.gpt2_width}, "
        f"n_head={s.gpt2_heads}, n_inner={s.gpt2_inner}, n_positions={s.gpt2_seq}, "
        f"vocab_size={s.gpt2_vocab}, use_cache=False)`, random input ids; loss "
        "`last_hidden_state.sum()`.",
        f"- Reversible: `fxmomentum.convert(model, 0.9, example_inputs=(ids[:2, :32],))`, which "
        f"traces GPT2Model.forward shape-aware (the graph reads batch size and length from its "
        f"input); `fxmomentum.inspect` finds {chains} (attention and MLP of each layer).",
        f"- Checkpoint: {how}.",
        f"- `memory {n1} / {n0} layers`: each configuration's activation memory at {n1} layers "
        f"over its own at {n0}.",
        *failures,
        "",
    ]
    return lines, ratios


def _env(threads: int, official: tuple[bool, str], quick: bool) -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "momentumnet": official[1] if official[0] else f"not available ({official[1]})",
        "commit": commit,
        "quick": quick,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_markdown(path: Path, results: dict[str, Any], s: Sizes, argv: list[str]) -> dict:
    """Write ``models.md``; returns the ratios of every section."""
    env = results["env"]
    lines = [
        "# Whole models: activation memory and time of a training step",
        "",
        f"Generated by `python benchmarks/bench_models.py{' ' + ' '.join(argv) if argv else ''}` "
        f"(torch {env['torch']}, torchvision {env['torchvision']}, CPU, {env['threads']} "
        f"thread(s), momentumnet {env['momentumnet']}, commit {env['commit']}, {env['date']}).",
        "",
        'Measured as in "How things are measured" (DESIGN.md). Activation memory: one fresh '
        "process per configuration, `MALLOC_MMAP_THRESHOLD_=65536`, one warm-up step, then "
        "`VmHWM` of one step (forward, `output.sum()`, backward) minus `VmRSS` before it; "
        "weights and gradients are not in it. Time ratio: the configuration's training step "
        f"against the original's, interleaved after {s.time_warmup} warm-up pair(s) (and "
        f"{s.solo_warmup} solo warm-up step(s) of the reversible configuration, whose kernels "
        f"compile on first use), the median "
        f"of {s.time_repeats} per-pair ratios (every ratio is in `models.json`); no absolute "
        "times, the machine is shared. Random weights; gamma = 0.9."
        + (
            " Clock: the process's CPU time (`time.process_time`, `--cpu-time`), which other "
            "processes on a loaded machine do not add to."
            if s.cpu_time
            else ""
        ),
        "",
    ]
    if env["quick"]:
        lines += [
            "**Quick mode: tiny sizes, a smoke test; the figures mean little. Memory is measured "
            "only for the ResNet's original and reversible configurations.**",
            "",
        ]
    ratios: dict[str, Any] = {}
    for key, section in (
        ("resnet", resnet_section),
        ("transformer", transformer_section),
        ("vit", vit_section),
        ("gpt2", gpt2_section),
    ):
        if key in results:
            text, ratios[key] = section(results[key], s)
            lines += text
    path.write_text("\n".join(lines).rstrip() + "\n")
    return ratios


def write_plots(out: Path, results: dict[str, Any], ratios: dict[str, Any], s: Sizes) -> list[Path]:
    """Bar plots of the memory and time ratios, one PNG per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = {
        "original": "#888888",
        "reversible": "#1f77b4",
        "backprop": "#aec7e8",
        "checkpoint": "#ff7f0e",
        "checkpoint_reentrant": "#ffbb78",
        "checkpoint_chained": "#c49c94",
        "official": "#2ca02c",
        "recompute": "#d62728",
    }

    def bars(ax, kinds, values, title, target=None, refs=()):
        xs = range(len(kinds))
        vals = [v if v is not None else 0.0 for v in values]
        ax.bar(xs, vals, color=[colors[k] for k in kinds])
        for x, v in zip(xs, values, strict=True):
            ax.text(x, (v or 0) + 0.02, "-" if v is None else f"{v:.2f}x", ha="center",
                    va="bottom", fontsize=8)  # fmt: skip
        ax.set_xticks(list(xs), [SHORT[k] for k in kinds], rotation=20, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.axhline(1.0, color="black", lw=0.6)
        if target is not None:
            ax.axhline(target, color="red", ls="--", lw=0.8, label=f"target {target:.2f}x")
        for value, label in refs:
            ax.axhline(value, color="gray", ls=":", lw=0.8, label=label)
        if target is not None or refs:
            ax.legend(fontsize=7, loc="upper right", framealpha=0.9)
        ax.set_ylim(0, max([*vals, 1.0]) * 1.25)

    if "resnet" in ratios:
        kinds = results["resnet"]["kinds"]
        r = ratios["resnet"]
        panels = 1 + len(s.resnet_time_sizes)
        fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6))
        size = s.resnet_memory_size
        mem_kinds = [k for k in kinds if k not in TIME_ONLY]
        bars(axes[0], mem_kinds, [r[k]["memory"] for k in mem_kinds],
             f"activation memory ratio ({size}x{size})", RESNET_TARGETS["memory"],
             [(0.40, "floor 0.40x")])  # fmt: skip
        for ax, t in zip(axes[1:], s.resnet_time_sizes, strict=True):
            bars(ax, kinds, [r[k][f"time_{t}"] if k != "original" else 1.0 for k in kinds],
                 f"time ratio ({t}x{t})", RESNET_TARGETS["time"])  # fmt: skip
        name = "ResNet-101" if s.resnet_layers == [3, 4, 23, 3] else "ResNet"
        fig.suptitle(f"{name} ({'-'.join(map(str, s.resnet_layers))}), batch {s.resnet_batch}")
        fig.tight_layout()
        written.append(out / "models_resnet101.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    if "transformer" in ratios:
        kinds = results["transformer"]["kinds"]
        r = ratios["transformer"]
        ns = s.tf_memory_layers
        fig, axes = plt.subplots(1, len(ns) + 1, figsize=(4.2 * (len(ns) + 1), 3.6))
        mem_kinds = [k for k in kinds if k not in TIME_ONLY]
        for ax, n in zip(axes, ns, strict=False):
            vals = [1.0 if k == "original" else r[k][f"memory_{n}"] for k in mem_kinds]
            bars(ax, mem_kinds, vals, f"activation memory ratio ({n} layers)",
                 TRANSFORMER_TARGETS["memory"])  # fmt: skip
        bars(axes[-1], kinds, [1.0 if k == "original" else r[k]["time"] for k in kinds],
             f"time ratio ({s.tf_time_layers} layers)", TRANSFORMER_TARGETS["time"])  # fmt: skip
        fig.suptitle(f"pre-norm TransformerEncoderLayer stack, d={s.tf_width}, seq {s.tf_seq}")
        fig.tight_layout()
        written.append(out / "models_transformer.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    if "vit" in ratios:
        kinds = results["vit"]["kinds"]
        r = ratios["vit"]
        fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.6))
        bars(axes[0], kinds, [r[k]["memory"] for k in kinds], "activation memory ratio")
        bars(axes[1], kinds, [1.0 if k == "original" else r[k]["time"] for k in kinds],
             "time ratio")  # fmt: skip
        fig.suptitle(f"ViT, {s.vit_image}x{s.vit_image}, batch {s.vit_batch}")
        fig.tight_layout()
        written.append(out / "models_vit.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    if ratios.get("gpt2"):
        kinds = results["gpt2"]["kinds"]
        r = ratios["gpt2"]
        ns = s.gpt2_memory_layers
        fig, axes = plt.subplots(1, len(ns) + 1, figsize=(4.2 * (len(ns) + 1), 3.6))
        for ax, n in zip(axes, ns, strict=False):
            vals = [1.0 if k == "original" else r[k][f"memory_{n}"] for k in kinds]
            bars(ax, kinds, vals, f"activation memory ratio ({n} layers)")
        bars(axes[-1], kinds, [1.0 if k == "original" else r[k]["time"] for k in kinds],
             f"time ratio ({s.gpt2_time_layers} layers)")  # fmt: skip
        fig.suptitle(f"Hugging Face GPT2Model, d={s.gpt2_width}, seq {s.gpt2_seq}")
        fig.tight_layout()
        written.append(out / "models_gpt2.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results)")
    parser.add_argument(
        "--only",
        default="resnet,transformer,vit",
        help="comma-separated: resnet,transformer,vit,gpt2 (default: all but gpt2, which takes "
        "about 20 minutes; run it with --only gpt2)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-official", action="store_true", help="leave momentumnet out")
    parser.add_argument("--threads", type=int, help="torch threads (default 2; 1 with --quick)")
    parser.add_argument("--time-repeats", type=int, help="timed pairs per configuration")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by the process's CPU time (a loaded machine; best with --threads 1)",
    )
    parser.add_argument("--no-memory", action="store_true", help="time only")
    args = parser.parse_args(argv)

    s = QUICK if args.quick else FULL
    if args.time_repeats:
        s = Sizes(**{**asdict(s), "time_repeats": args.time_repeats})
    if args.cpu_time:
        s = Sizes(**{**asdict(s), "cpu_time": True})
    if args.no_memory:
        s = Sizes(**{**asdict(s), "memory_only": {}})
    threads = args.threads or s.threads or 2
    out = args.out
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="bench_models_")) if args.quick else HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - {"resnet", "transformer", "vit", "gpt2"}
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    torch.set_num_threads(threads)
    official = (False, "left out (--no-official)") if args.no_official else official_status()
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    if not official[0]:
        log(f"momentumnet: skipped ({official[1]})")
    results: dict[str, Any] = {"env": _env(threads, official, args.quick), "sizes": asdict(s)}
    if "resnet" in only:
        results["resnet"] = run_resnet(s, official[0], threads, log)
    if "transformer" in only:
        results["transformer"] = run_transformer(s, threads, log)
    if "vit" in only:
        results["vit"] = run_vit(s, threads, log)
    if "gpt2" in only:
        results["gpt2"] = run_gpt2(s, threads, log)
    results["seconds"] = round(time.perf_counter() - start, 1)

    ratios = write_markdown(out / "models.md", results, s, argv)
    results["ratios"] = ratios
    (out / "models.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    written = [out / "models.md", out / "models.json"]
    if not args.no_plots:
        try:
            written += write_plots(out, results, ratios, s)
        except ImportError as exc:
            log(f"plots skipped: {exc} (pip install matplotlib)")
    log("wrote " + ", ".join(str(p) for p in written))
    print((out / "models.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
