"""FSDP2 on a converted model: the parameter memory each rank holds during a training step.

Two processes (gloo on 127.0.0.1, CPU, spawned by this script with ``torch.multiprocessing``)
train a stack of pre-norm ``nn.TransformerEncoderLayer`` (8 layers, d_model 256, 4 heads,
ff 1024, float32, dropout 0, batch first; a final LayerNorm and a small linear head) for one
step each (forward, backward, SGD step) on half of the batch, in three configurations:

- ``fxmomentum.convert(model, 0.9, example_inputs=x)`` sharded with FSDP2's recipe:
  ``fully_shard`` on every ``layers.i`` of the converted model (the original's paths), then
  on the root. The chain spans all the layers; :mod:`fxmomentum.engine.fsdp` enters a
  layer's unit around its blocks (forward and the reversible recomputation in backward);
- the same converted model without FSDP (DDP: the whole model on each rank);
- the original (unconverted) model with the same FSDP recipe.

Per rank and configuration it reports

- the bytes of the rank's own parameter shards: the distinct storages behind the local
  tensors of ``model.parameters()`` after the step (FSDP's padded shards; the whole model
  without FSDP);
- the largest total bytes of unsharded (gathered) parameters alive at any moment of the
  measured step: the distinct non-empty storages of every ``FSDPParam.all_gather_outputs``
  (what the unsharded parameters are views of; FSDP frees them with ``storage.resize_(0)``,
  so their ``nbytes`` is what is allocated), summed over all units. It is sampled before
  and after every call of ``FSDPParamGroup.unshard``, ``wait_for_unshard``, ``reshard``,
  ``pre_backward`` and ``post_backward``, after FSDP's all-gather copy-out, and before and
  after the forward of every module that holds parameters (so at every block call, the
  backward recomputation of a reversible chain included). Sampled alongside: FSDP's flat
  all-gather buffers still alive (a pending prefetch's, and the one FSDP keeps for one more
  layer in forward to overlap copy-out with the next all-gather), the unsharded gradients
  not yet reduce-scattered, and how many layer units are unsharded at once;
- the whole model's parameter bytes and one layer's.

The step measured is the second (the first initialises FSDP and the optimizer). Before the
memory runs, a small float64 model (3 layers, d_model 32) sharded the same way takes one
2-rank step that is checked against one process taking the same step on the whole batch
(parameters within 1e-6).

Run ``python benchmarks/bench_fsdp.py`` (about 1-2 minutes on 2 loaded cores); results in
``benchmarks/results/fsdp.md`` and ``fsdp.json``. ``--quick``: 4 small layers, written to a
temporary folder unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxmomentum
from fxmomentum import MomentumChain

HERE = Path(__file__).resolve().parent
WORLD = 2
GAMMA = 0.9
LR = 0.01
MIB = 1024 * 1024
TOL = 1e-6

FULL = {"layers": 8, "width": 256, "heads": 4, "ff": 1024, "seq": 64, "batch": 8, "out": 8}
QUICK = {"layers": 4, "width": 64, "heads": 4, "ff": 256, "seq": 16, "batch": 4, "out": 8}
#: The float64 equality check (one 2-rank step against one process on the whole batch).
CHECK = {"layers": 3, "width": 32, "heads": 4, "ff": 64, "seq": 8, "batch": 4, "out": 8}

CONFIGS = {
    "converted_fsdp": "converted, FSDP per layer + root",
    "converted_whole": "converted, no FSDP (DDP, whole model per rank)",
    "original_fsdp": "original, FSDP per layer + root",
}


# -- model, data, step -------------------------------------------------------------------------
class EncoderStack(nn.Module):
    """``layers`` pre-norm ``nn.TransformerEncoderLayer`` (dropout 0), a LayerNorm, a head.

    Parameters
    ----------
    layers, width, heads, ff, out : int
        Depth, d_model, attention heads, feed-forward width, head outputs.
    """

    def __init__(self, layers: int, width: int, heads: int, ff: int, out: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, ff, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def batch(sizes: dict[str, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch (input, target), the same on every rank."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sizes["batch"], sizes["seq"], sizes["width"], generator=g, dtype=dtype)
    y = torch.randn(sizes["batch"], sizes["seq"], sizes["out"], generator=g, dtype=dtype)
    return x, y


def build(sizes: dict[str, int], converted: bool, dtype: torch.dtype) -> nn.Module:
    """The model every rank starts from (seeded: the same weights everywhere).

    Parameters
    ----------
    sizes : dict
        ``layers``, ``width``, ``heads``, ``ff``, ``out``, ``seq``, ``batch``.
    converted : bool
        Whether to return ``fxmomentum.convert(model, GAMMA, example_inputs=x)``.
    dtype : torch.dtype
        The parameters' dtype.

    Returns
    -------
    nn.Module
        The (converted) model, in training mode.
    """
    torch.manual_seed(0)
    keys = ("layers", "width", "heads", "ff", "out")
    model = EncoderStack(**{k: sizes[k] for k in keys}).to(dtype)
    if converted:
        example = torch.randn(2, min(sizes["seq"], 8), sizes["width"], dtype=dtype)
        model = fxmomentum.convert(model, GAMMA, example_inputs=example)
    return model.train()


def shard_layers(model: nn.Module) -> nn.Module:
    """FSDP2's recipe: ``fully_shard`` on every ``layers.i`` (by path), then on the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_submodule("layers"):
        fully_shard(layer)
    fully_shard(model)
    return model


def share(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of the batch."""
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    phase: Callable[[str], None] = lambda _name: None,
) -> None:
    """One step: forward, mean squared error, backward, SGD step; ``phase`` is told each part."""
    opt.zero_grad(set_to_none=True)
    phase("forward")
    out = model(x)
    loss = ((out - y) ** 2).mean()
    phase("backward")
    loss.backward()
    phase("optimizer")
    opt.step()
    phase("idle")


def param_bytes(params: Iterator[nn.Parameter]) -> int:
    """Bytes of the distinct storages behind the parameters' local tensors."""
    storages: dict[int, int] = {}
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        s = local.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def full_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters at their full (unsharded) shapes."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


# -- measuring FSDP's gathered parameters -----------------------------------------------------
class GatherTracker:
    """Samples, at every FSDP transition and every parameter-holding module call, what FSDP
    holds unsharded on this rank; keeps the largest of each figure per phase of the step.

    Parameters
    ----------
    model : nn.Module
        The root of the sharded model (no FSDP: nothing is ever gathered).

    Notes
    -----
    Figures of a sample (bytes of distinct storages, so views are counted once):
    ``params``: the unsharded parameters (``FSDPParam.all_gather_outputs``, non-empty);
    ``buffers``: FSDP's flat all-gather buffers alive (pending or kept for overlap);
    ``grads``: unsharded gradients not yet reduce-scattered;
    ``units``: layer units in the unsharded state; ``holding``: layer units with any of
    their gathered memory alive (unsharded, or a prefetch pending).
    """

    METHODS = ("unshard", "wait_for_unshard", "reshard", "pre_backward", "post_backward")

    def __init__(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule

        self.groups: list[Any] = []
        self.layer_groups: set[int] = set()
        for module in model.modules():
            if not isinstance(module, FSDPModule):
                continue
            for group in module._get_fsdp_state()._fsdp_param_groups:
                if all(g is not group for g in self.groups):
                    self.groups.append(group)
                if module is not model:
                    self.layer_groups.add(id(group))
        self.modules = [m for m in model.modules() if m._parameters]
        self.phase = "idle"
        self.peaks: dict[str, dict[str, int]] = {}
        self.samples = 0

    def set_phase(self, name: str) -> None:
        """Attribute the following samples to ``name`` (forward, backward, optimizer)."""
        self.sample()
        self.phase = name
        self.sample()

    def sample(self) -> None:
        """Take one sample and update the phase's peaks."""
        if not self.groups:
            return
        params: dict[int, int] = {}
        buffers: dict[int, int] = {}
        grads: dict[int, int] = {}
        units = holding = 0

        def add(into: dict[int, int], tensor: torch.Tensor | None) -> bool:
            if tensor is None:
                return False
            s = tensor.untyped_storage()
            if s.nbytes() == 0:
                return False
            into[s.data_ptr()] = s.nbytes()
            return True

        contexts: dict[int, Any] = {}
        for group in self.groups:
            held = False
            for fp in group.fsdp_params:
                for t in (*fp.all_gather_outputs, *getattr(fp, "_unsharded_inner_tensors", ())):
                    held |= add(params, t)
                unsharded = getattr(fp, "_unsharded_param", None)
                if unsharded is not None:
                    add(grads, unsharded.grad)
            result = group._all_gather_result
            if result is not None:
                held |= add(buffers, result.all_gather_output)
            contexts[id(group.comm_ctx)] = group.comm_ctx
            if id(group) in self.layer_groups:
                units += bool(group.is_unsharded)
                holding += held
        for ctx in contexts.values():
            kept = getattr(ctx, "all_gather_state", None)
            if kept is not None:
                add(buffers, kept.all_gather_result.all_gather_output)
        total = {**params, **buffers}
        figures = {
            "params": sum(params.values()),
            "buffers": sum(buffers.values()),
            "total": sum(total.values()),
            "grads": sum(grads.values()),
            "units": units,
            "holding": holding,
        }
        peaks = self.peaks.setdefault(self.phase, dict.fromkeys(figures, 0))
        for key, value in figures.items():
            peaks[key] = max(peaks[key], value)
        self.samples += 1

    @contextmanager
    def active(self) -> Iterator[GatherTracker]:
        """Install the sampling hooks and patches for the duration of the block."""
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fpg

        originals: dict[str, Any] = {
            name: getattr(fpg.FSDPParamGroup, name) for name in self.METHODS
        }

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                self.sample()
                out = fn(*args, **kwargs)
                self.sample()
                return out

            return wrapper

        copy_out = fpg.foreach_all_gather_copy_out
        handles = [m.register_forward_pre_hook(lambda *_: self.sample()) for m in self.modules]
        handles += [m.register_forward_hook(lambda *_: self.sample()) for m in self.modules]
        try:
            for name, fn in originals.items():
                setattr(fpg.FSDPParamGroup, name, wrap(fn))
            fpg.foreach_all_gather_copy_out = wrap(copy_out)
            yield self
        finally:
            for name, fn in originals.items():
                setattr(fpg.FSDPParamGroup, name, fn)
            fpg.foreach_all_gather_copy_out = copy_out
            for handle in handles:
                handle.remove()

    def overall(self) -> dict[str, int]:
        """The largest of each figure over all phases."""
        keys = ("params", "buffers", "total", "grads", "units", "holding")
        return {k: max((p[k] for p in self.peaks.values()), default=0) for k in keys}


# -- the runs (in each worker) -----------------------------------------------------------------
def measure(config: str, sizes: dict[str, int], rank: int) -> dict[str, Any]:
    """One configuration's parameter memory over one training step on this rank.

    Parameters
    ----------
    config : str
        A key of :data:`CONFIGS`.
    sizes : dict
        The model's and batch's sizes.
    rank : int
        This process's rank.

    Returns
    -------
    dict
        Model, layer and shard bytes, the tracker's peaks per phase and overall, and the
        autograd node names of the chains' outputs.
    """
    model = build(sizes, converted=config.startswith("converted"), dtype=torch.float32)
    model_bytes = full_bytes(model)
    layer_bytes = full_bytes(model.get_submodule("layers.0"))
    kinds: list[str] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: kinds.append(type(out.grad_fn).__name__))
        for m in model.modules()
        if isinstance(m, MomentumChain)
    ]
    wrapped = (
        shard_layers(model)
        if config.endswith("fsdp")
        else nn.parallel.DistributedDataParallel(model)
    )
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = (share(t, rank, WORLD) for t in batch(sizes, torch.float32))
    train_step(wrapped, opt, x, y)  # FSDP's lazy init, the optimizer's state
    tracker = GatherTracker(model)
    kinds.clear()
    with tracker.active():
        train_step(wrapped, opt, x, y, tracker.set_phase)
    for h in hooks:
        h.remove()
    return {
        "model_bytes": model_bytes,
        "layer_bytes": layer_bytes,
        "root_bytes": model_bytes - full_bytes(model.get_submodule("layers")),
        "shard_bytes": param_bytes(model.parameters()),
        "peaks": tracker.peaks,
        "overall": tracker.overall(),
        "samples": tracker.samples,
        "units": len(tracker.groups),
        "chain_nodes": sorted(set(kinds)),
    }


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters, FSDP's shards gathered (a collective: every rank calls it)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().clone()
    return out


def check_float64(rank: int) -> dict[str, Any]:
    """One float64 2-rank FSDP step of the converted model against one process, whole batch.

    Returns
    -------
    dict
        The largest absolute and relative parameter difference, the largest parameter update,
        and the chains' autograd node names (the reversible engine's, if it ran).
    """
    x, y = batch(CHECK, torch.float64)
    model = build(CHECK, converted=True, dtype=torch.float64)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    kinds: list[str] = []
    for m in model.modules():
        if isinstance(m, MomentumChain):
            m.register_forward_hook(lambda _m, _i, out: kinds.append(type(out.grad_fn).__name__))
    shard_layers(model)
    train_step(
        model, torch.optim.SGD(model.parameters(), lr=0.1), *(share(t, rank, WORLD) for t in (x, y))
    )
    got = full_state(model)
    reference = build(CHECK, converted=True, dtype=torch.float64)
    train_step(reference, torch.optim.SGD(reference.parameters(), lr=0.1), x, y)
    ref = dict(reference.named_parameters())
    abs_err = max((got[k] - ref[k]).abs().max().item() for k in ref)
    rel_err = max(((got[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)
    update = max((ref[k] - before[k]).abs().max().item() for k in ref)
    return {
        "max_abs_diff": abs_err,
        "max_rel_diff": rel_err,
        "max_update": update,
        "chain_nodes": sorted(set(kinds)),
        "passed": abs_err < TOL and update > 0,
    }


def worker(rank: int, port: int, out: str, sizes: dict[str, int]) -> None:
    """One rank: join the gloo group, run the check and every configuration, save the results."""
    torch.set_num_threads(1)
    # The root returns its head's output, a view; nothing here changes it in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=300),
    )
    try:
        results: dict[str, Any] = {"check": check_float64(rank)}
        dist.barrier()
        for config in CONFIGS:
            results[config] = measure(config, sizes, rank)
            dist.barrier()
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


# -- the parent side ---------------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(sizes: dict[str, int]) -> list[dict[str, Any]]:
    """Spawn the ranks, wait for them, return each one's results."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if any(name == "lo" for _, name in socket.if_nameindex()):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections on loopback too
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(free_port(), tmp, sizes), nprocs=WORLD, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD)]


def summary(ranks: list[dict[str, Any]], config: str) -> dict[str, Any]:
    """A configuration's figures: the largest over the ranks (they hold equal halves)."""
    first = ranks[0][config]
    model, layer = first["model_bytes"], first["layer_bytes"]
    shard = max(r[config]["shard_bytes"] for r in ranks)
    over = {k: max(r[config]["overall"][k] for r in ranks) for k in first["overall"]}
    phases: dict[str, dict[str, int]] = {}
    for r in ranks:
        for phase, peaks in r[config]["peaks"].items():
            into = phases.setdefault(phase, dict.fromkeys(peaks, 0))
            for k, v in peaks.items():
                into[k] = max(into[k], v)
    return {
        "model_bytes": model,
        "layer_bytes": layer,
        "root_bytes": first["root_bytes"],
        "shard_bytes": shard,
        "peak_gathered_bytes": over["params"],
        "peak_gathered_layers": over["params"] / layer,
        "peak_with_buffers_bytes": over["total"],
        "peak_with_buffers_layers": over["total"] / layer,
        "peak_unsharded_grad_layers": over["grads"] / layer,
        "most_units_unsharded": over["units"],
        "most_units_holding": over["holding"],
        "fraction": (shard + over["params"]) / model,
        "fraction_with_buffers": (shard + over["total"]) / model,
        "phases": phases,
        "chain_nodes": first["chain_nodes"],
        "per_rank": [r[config] for r in ranks],
    }


def report(results: dict[str, Any], sizes: dict[str, int], quick: bool, seconds: float) -> str:
    """The markdown page."""
    conv = results["configs"]["converted_fsdp"]
    check = results["check"]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
    ).stdout.strip()
    env = (
        f"fxmomentum commit {commit or '?'} (working tree), torch {torch.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"gloo on 127.0.0.1, {WORLD} ranks x 1 thread"
    )
    lines = [
        "# FSDP2 on a converted model: parameter memory per rank",
        "",
        f"Generated by `python benchmarks/bench_fsdp.py{' --quick' if quick else ''}` "
        f"({time.strftime('%Y-%m-%d')}, {seconds:.0f} s). Method: the module docstring of "
        "`benchmarks/bench_fsdp.py` (FSDP's unsharded parameter storages sampled at every "
        "FSDP transition and every parameter-holding module call of the second training step).",
        "",
        f"- {env}",
        f"- Model: {sizes['layers']} pre-norm `nn.TransformerEncoderLayer` (d_model "
        f"{sizes['width']}, {sizes['heads']} heads, ff {sizes['ff']}, dropout 0, batch first, "
        f"float32), final LayerNorm, Linear({sizes['width']}, {sizes['out']}); batch "
        f"{sizes['batch']} x seq {sizes['seq']} ({sizes['batch'] // WORLD} per rank); "
        f"`fxmomentum.convert(model, {GAMMA}, example_inputs=x)`: one chain of "
        f"{2 * sizes['layers']} blocks; SGD.",
        f"- Whole model {conv['model_bytes'] / MIB:.2f} MiB of parameters; one layer "
        f"{conv['layer_bytes'] / MIB:.3f} MiB; outside the layers (root unit) "
        f"{conv['root_bytes'] / 1024:.1f} KiB.",
        "",
        "| configuration | per-rank shard (MiB) | peak gathered (MiB) | in layers | "
        "per-rank params / model |",
        "|---|---:|---:|---:|---:|",
    ]
    for config, label in CONFIGS.items():
        r = results["configs"][config]
        lines.append(
            f"| {label} | {r['shard_bytes'] / MIB:.2f} | {r['peak_gathered_bytes'] / MIB:.2f} | "
            f"{r['peak_gathered_layers']:.2f} | {r['fraction']:.3f} |"
        )
    lines += [
        "",
        "'peak gathered': the unsharded parameters alive at once (largest over the step and the "
        "ranks); 'per-rank params / model': (shard + peak gathered) / whole model.",
        "",
        "## Detail: forward and backward, FSDP's buffers, gradients",
        "",
        "Peaks in layers (bytes / one layer's bytes). 'units': layer units unsharded at once; "
        "'+ buffers': unsharded parameters plus FSDP's flat all-gather buffers alive (a pending "
        "prefetch, the one kept for overlap in forward); 'grads': unsharded gradients not yet "
        "reduce-scattered.",
        "",
        "| configuration | phase | gathered | units | + buffers | grads |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for config, label in CONFIGS.items():
        r = results["configs"][config]
        if not config.endswith("fsdp"):
            continue
        layer = r["layer_bytes"]
        for phase in ("forward", "backward", "optimizer"):
            p = r["phases"].get(phase)
            if p is None:
                continue
            lines.append(
                f"| {label} | {phase} | {p['params'] / layer:.2f} | {p['units']} | "
                f"{p['total'] / layer:.2f} | {p['grads'] / layer:.2f} |"
            )
    lines += [
        "",
        "## Checks",
        "",
        f"- float64, {CHECK['layers']} layers d_model {CHECK['width']}, batch {CHECK['batch']}: "
        f"one 2-rank FSDP step against one process on the whole batch: largest parameter "
        f"difference {check['max_abs_diff']:.2e} (relative {check['max_rel_diff']:.2e}; largest "
        f"update {check['max_update']:.2e}); tolerance {TOL:g}: "
        f"{'passed' if check['passed'] else 'FAILED'}. Chain's autograd node: "
        f"{', '.join(check['chain_nodes']) or '-'}.",
        f"- Chain's autograd node in the measured step, converted + FSDP: "
        f"{', '.join(conv['chain_nodes']) or '-'} (the reversible engine ran).",
        f"- Expected per rank: half the model ({conv['model_bytes'] / WORLD / MIB:.2f} MiB) plus "
        "the running layer and at most FSDP's prefetch of the next (1-2 layers gathered). The "
        "prefetch is a pending all-gather: its flat buffer is in '+ buffers'; its unsharded "
        "parameters are allocated only at copy-out, when the previous layer is already freed.",
        "",
    ]
    for message in results["findings"]:
        lines.append(f"- {message}")
    return "\n".join(lines) + "\n"


def findings(results: dict[str, Any]) -> list[str]:
    """What the figures say against the expectations (one line each)."""
    out = []
    conv = results["configs"]["converted_fsdp"]
    orig = results["configs"]["original_fsdp"]
    whole = results["configs"]["converted_whole"]
    half = conv["model_bytes"] / WORLD
    out.append(
        f"Shard: {conv['shard_bytes'] / half:.3f} x half the model (FSDP pads each "
        "parameter's dim 0 to a multiple of the world size)."
    )
    verdict = "as expected" if 1 <= conv["most_units_unsharded"] <= 2 else "MORE THAN EXPECTED"
    out.append(
        f"Converted + FSDP: at most {conv['most_units_unsharded']} layer unit(s) unsharded at "
        f"once ({verdict}); original + FSDP: {orig['most_units_unsharded']}."
    )
    out.append(
        f"Per-rank parameter memory: converted + FSDP {conv['fraction']:.3f} of the model, "
        f"original + FSDP {orig['fraction']:.3f}, without FSDP {whole['fraction']:.3f}."
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 small layers, a smoke test")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ranks = run_ranks(sizes)
    seconds = time.perf_counter() - start
    results: dict[str, Any] = {
        "sizes": sizes,
        "world": WORLD,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "check": ranks[0]["check"] | {"per_rank": [r["check"] for r in ranks]},
        "configs": {config: summary(ranks, config) for config in CONFIGS},
    }
    results["check"]["passed"] = all(r["check"]["passed"] for r in ranks)
    results["findings"] = findings(results)
    text = report(results, sizes, args.quick, seconds)
    (out / "fsdp.md").write_text(text)
    (out / "fsdp.json").write_text(json.dumps(results, indent=2))
    print(text)
    print(f"[bench_fsdp] written to {out}", file=sys.stderr)
    return 0 if results["check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
