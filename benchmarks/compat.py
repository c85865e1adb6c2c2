"""Compatibility sweep: fxmomentum's converter on many architectures, one fresh process each.

For every model of the zoo (``benchmarks/compat_models.py``: torchvision, torch.nn, timm,
Hugging Face transformers and hand-built stacks, all from small configs with random weights)
a child process checks:

1. **Chains**: the converted chains of ``fxmomentum.convert(model, 0.9, example_inputs=x)``
   against the chains the architecture implies (written down per model in the zoo, with
   where each expectation comes from).
2. **gamma = 0**: ``convert(model, 0.0, example_inputs=x, use_backprop=True)`` computes
   bit for bit what the model computes, in eval mode, in train mode (same seed, same state)
   and at another batch size (and sequence length for token models) in eval mode (where
   only torch's fused inference kernel of ``nn.TransformerEncoderLayer`` rounds otherwise,
   against the original's regular path: :func:`_against_regular_path`).
3. **Gradients**: in float64, in train mode and in eval mode, the reversible conversion's
   gradients (every parameter, and the input where it is floating) against the
   ``use_backprop=True`` conversion's, with the same seed and state; the error is the largest
   over tensors of ``||a - b|| / ||b||``, each norm floored at 1e-9 times the largest gradient
   norm. Above 1e-8 an error still counts as round-off when it is within 10x of how far
   backprop's own gradients move when the weights are perturbed by a relative 1e-13 (the
   model's float64 conditioning: train-mode BatchNorm over a few samples per channel turns
   1e-13 into 1e-8). Whether the reversible model runs on its own example inputs at all is
   recorded separately.
4. **Other batch sizes**: the reversible (float32) model runs forward and backward at another
   batch size (and sequence length for token models).

Random weights: parameters whose values are all equal (layer scales at 1e-6, zero-initialised
norms, ReZero gains, unit norm weights, zero biases) and BatchNorm running statistics are
given random values first (:func:`perturb_constants`), so that no block is the identity and
no two blocks compute the same function.

Run ``python benchmarks/compat.py`` (about 30 minutes on 2 busy CPU cores) to rewrite
``benchmarks/results/compat.json`` and ``docs/compatibility.md``; ``--only SUBSTRING`` and
``--quick`` (three tiny models) write to a temporary folder unless ``--out`` is given, and
``--update`` merges their rows into the existing results instead; ``--render`` rewrites the
page from the JSON. The children run with ``FXMOMENTUM_COMPILE=0`` (the reversible engine's
integer passes eagerly: the same bits, without a torch.compile per process) unless
``--compile`` is given.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # the zoo; this checkout's fxmomentum, as in the children
from compat_models import ModelSpec, select_specs  # noqa: E402

#: Float64 gradient error (relative, see the module docstring) accepted as right.
GRAD_TOLERANCE = 1e-8
#: Gradients whose norm is below this fraction of the largest count as zero-in-exact-arithmetic.
GRAD_FLOOR = 1e-9
#: Standard deviation of the values given to constant parameters: ``clip(0.2 |c|, 0.1, 0.5)``.
PERTURB_SCALE = 0.2
#: Relative perturbation of the weights that measures a model's float64 conditioning.
PERTURB_NOISE = 1e-13
#: A gradient error within this factor of that conditioning counts as round-off.
NOISE_FACTOR = 10.0
#: Modules kept opaque that a row's notes name at most.
MAX_LEAF_NOTES = 2
SEED = 0


# --------------------------------------------------------------------------------------------
# Helpers of the child process
# --------------------------------------------------------------------------------------------


def seed_all(seed: int) -> None:
    """Seed torch, Python's ``random`` and numpy (Hugging Face's SpecAugment draws from it)."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return
    np.random.seed(seed)  # noqa: NPY002 - SpecAugment draws from numpy's global state


def _is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer (torch's, or a library's ``*Norm*`` class)."""
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return True
    return "norm" in type(module).__name__.lower()


@torch.no_grad()
def perturb_constants(model: nn.Module, generator: torch.Generator) -> list[str]:
    """Give random values to every parameter whose values are all equal, and to running stats.

    The rule: a floating parameter whose elements are all equal to ``c`` (one element counts)
    becomes ``c + s * N(0, 1)`` with ``s = clip(0.2 |c|, 0.1, 0.5)``; the weight of a
    normalisation layer (torch's norms, or a class named ``*Norm*``) takes the absolute
    value, so that it stays positive. BatchNorm-style ``running_mean`` becomes ``N(0, 0.1)``
    and ``running_var`` ``U(0.5, 2)``. Other buffers (masks, position tables, rotary
    frequencies) are left as they are.

    Parameters
    ----------
    model : nn.Module
        Changed in place.
    generator : torch.Generator
        Source of the random values (seeded by the caller).

    Returns
    -------
    list of str
        Names of the tensors changed.
    """
    changed = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in module.named_parameters(recurse=False):
            if not param.is_floating_point() or param.numel() == 0:
                continue
            c = param.flatten()[0].item()
            if not bool((param == c).all()):
                continue
            scale = min(0.5, max(0.1, PERTURB_SCALE * abs(c)))
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            value = c + scale * noise
            if name == "weight" and _is_norm(module):
                value = value.abs()
            param.copy_(value.to(param.dtype))
            changed.append(prefix + name)
        for name, buf in module.named_buffers(recurse=False):
            if buf is None or not buf.is_floating_point():
                continue
            if name == "running_mean":
                buf.copy_(0.1 * torch.randn(buf.shape, generator=generator))
            elif name == "running_var":
                buf.copy_(0.5 + 1.5 * torch.rand(buf.shape, generator=generator))
            else:
                continue
            changed.append(prefix + name)
    return changed


def floating_tensors(output: Any) -> list[torch.Tensor]:
    """Every floating-point tensor of ``output`` (nested tuples, lists, dicts), in order."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in floating_tensors(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in floating_tensors(value)]
    return []


def compare(outputs: Iterable[torch.Tensor], references: Iterable[torch.Tensor]) -> dict[str, Any]:
    """Bit-exactness of ``outputs`` against ``references``; errors when they differ.

    Returns
    -------
    dict
        ``exact`` (every tensor ``torch.equal`` to its reference), ``max_abs`` (largest absolute
        difference) and ``max_rel`` (largest ``||a - b|| / ||b||`` over tensors), or
        ``exact: False`` and ``structure`` when the outputs do not pair up.
    """
    outputs, references = list(outputs), list(references)
    shapes = [tuple(t.shape) for t in outputs], [tuple(t.shape) for t in references]
    if shapes[0] != shapes[1]:
        return {"exact": False, "structure": f"outputs {shapes[0]} against {shapes[1]}"}
    exact = all(torch.equal(a, b) for a, b in zip(outputs, references, strict=True))
    max_abs, max_rel = 0.0, 0.0
    for a, b in zip(outputs, references, strict=True):
        diff = (a.detach().double() - b.detach().double()).nan_to_num(nan=math.inf)
        if diff.numel():
            max_abs = max(max_abs, diff.abs().max().item())
            denom = b.detach().double().norm().item()
            max_rel = max(max_rel, diff.norm().item() / (denom if denom > 0 else 1.0))
    return {"exact": exact, "max_abs": max_abs, "max_rel": max_rel}


def weighted_loss(output: Any) -> torch.Tensor:
    """``sum_i <w_i, y_i>`` over the floating outputs ``y_i``, ``w_i`` fixed random weights.

    Like :func:`fxmomentum.measure.output_loss` (the sum of every floating output), but with
    weights drawn from a generator seeded by the output's index: the plain sum of a LayerNorm's
    output has a zero gradient in exact arithmetic, which would leave only round-off to compare.
    """
    total = None
    for i, y in enumerate(floating_tensors(output)):
        if not y.requires_grad:
            continue
        generator = torch.Generator().manual_seed(1000 + i)
        w = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.dtype)
        term = (y * w).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("the output holds no floating-point tensor that requires grad")
    return total


def describe_error(error: BaseException) -> dict[str, str]:
    """Type, first line of the message, and where it was raised (innermost and fxmomentum's)."""
    frames = traceback.extract_tb(error.__traceback__)
    message = str(error).strip().splitlines()
    described = {"type": type(error).__name__, "message": message[0] if message else ""}
    if frames:
        last = frames[-1]
        described["where"] = f"{_short_path(last.filename)}:{last.lineno} in {last.name}"
        ours = [f for f in frames if f"{os.sep}fxmomentum{os.sep}" in f.filename]
        if ours and ours[-1] is not last:
            mine = ours[-1]
            described["fxmomentum"] = f"{_short_path(mine.filename)}:{mine.lineno} in {mine.name}"
    return described


def _short_path(filename: str) -> str:
    """``.../site-packages/transformers/x.py`` -> ``transformers/x.py``; repo files relative."""
    path = Path(filename)
    for marker in ("site-packages", "dist-packages"):
        if marker in path.parts:
            return "/".join(path.parts[path.parts.index(marker) + 1 :])
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return filename


def _fresh_inputs(inputs: tuple[Any, ...], grad: bool) -> tuple[Any, ...]:
    """Copies of ``inputs``; floating tensors become leaves that require grad when ``grad``."""
    return tuple(
        t.detach().clone().requires_grad_(grad and t.is_floating_point())
        if isinstance(t, torch.Tensor)
        else t
        for t in inputs
    )


def _to_double(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs
    )


def run_seeded(
    net: nn.Module, state: Mapping[str, torch.Tensor], inputs: tuple[Any, ...], seed: int = 1
) -> Any:
    """``net(*inputs)`` from the weights and buffers ``state`` with the RNGs seeded."""
    net.load_state_dict(state)
    seed_all(seed)
    return net(*inputs)


def chain_summary(report: Any) -> dict[str, Any]:
    """What a ConversionReport says about chains, skipped adds, opaque modules and notes."""
    return {
        "chains": [c.num_blocks for c in report.chains if c.converted],
        "all_chains": [
            {
                "blocks": c.num_blocks,
                "first": c.first,
                "last": c.last,
                "kind": c.kind,
                "converted": c.converted,
                "reason": c.reason,
            }
            for c in report.chains
        ],
        "skipped": [{"node": s.node, "module": s.path, "reason": s.reason} for s in report.skipped],
        "leaves": [{"module": m.path, "type": m.type, "reason": m.reason} for m in report.leaves],
        "notes": list(report.notes),
        "graph_module": None,
    }


# --------------------------------------------------------------------------------------------
# The four checks
# --------------------------------------------------------------------------------------------


class Context:
    """A model under test, its example inputs and its saved state, shared by the checks."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        seed_all(SEED)
        self.model = spec.build()
        generator = torch.Generator().manual_seed(SEED)
        self.perturbed = perturb_constants(self.model, generator)
        self.model.train()
        seed_all(SEED + 1)
        self.inputs = spec.make_inputs(spec.batch, spec.length)
        self.other = spec.make_inputs(spec.other_batch, spec.other_length or spec.length)
        self.state = copy.deepcopy(self.model.state_dict())
        self.reversible: nn.Module | None = None
        self.input_grad = self._takes_input_grad()

    def _takes_input_grad(self) -> str | None:
        """None when the model trains with inputs that require grad, else why it cannot.

        Hugging Face's Wav2Vec2 sets ``requires_grad`` on a view of its input in training,
        which raises when the input itself requires grad: such models get plain inputs.
        """
        try:
            self.model.train()
            weighted_loss(run_seeded(self.model, self.state, _fresh_inputs(self.inputs, True)))
        except RuntimeError as error:
            self.model.zero_grad(set_to_none=True)
            return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
        finally:
            self.model.load_state_dict(self.state)
        return None

    def leaves(self, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """Fresh copies of ``inputs``, floating ones requiring grad where the model allows."""
        return _fresh_inputs(inputs, self.input_grad is None)


def check_chains(ctx: Context) -> dict[str, Any]:
    """Convert (gamma 0.9, reversible, train mode): the chains found, skipped adds, notes."""
    seed_all(SEED)
    start = time.perf_counter()
    net, report = fxmomentum_convert(ctx.model, 0.9, ctx.inputs, use_backprop=False)
    summary = chain_summary(report)
    summary["convert_s"] = round(time.perf_counter() - start, 2)
    summary["graph_module"] = isinstance(net, torch.fx.GraphModule)
    ctx.reversible = net
    return summary


def fxmomentum_convert(
    model: nn.Module, gamma: float, inputs: tuple[Any, ...], *, use_backprop: bool
) -> tuple[nn.Module, Any]:
    """``fxmomentum.convert`` with a report, the model's RNG draws not disturbing the caller."""
    import fxmomentum

    with torch.random.fork_rng():
        return fxmomentum.convert(
            model, gamma, example_inputs=inputs, use_backprop=use_backprop, return_report=True
        )


def check_runs(ctx: Context) -> dict[str, Any]:
    """The reversible model's train step (forward, backward) on its own example inputs."""
    assert ctx.reversible is not None
    net = ctx.reversible.train()
    net.zero_grad(set_to_none=True)
    out = run_seeded(net, ctx.state, ctx.leaves(ctx.inputs))
    weighted_loss(out).backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    return {"ok": finite, "params_with_grad": len(grads), "finite": finite}


def check_gamma_zero(ctx: Context) -> dict[str, Any]:
    """gamma = 0 with use_backprop=True against the original: eval, train, another batch."""
    net, report = fxmomentum_convert(ctx.model, 0.0, ctx.inputs, use_backprop=True)
    result: dict[str, Any] = {"chains": [c.num_blocks for c in report.chains if c.converted]}
    model = ctx.model
    cases: list[tuple[str, str, tuple[Any, ...]]] = [
        ("eval", "eval", ctx.inputs),
        ("train", "train", ctx.inputs),
        ("other", "eval", ctx.other),
    ]
    for key, mode, inputs in cases:
        try:
            getattr(model, mode)()
            getattr(net, mode)()
            with torch.set_grad_enabled(mode == "train"):
                ref = floating_tensors(run_seeded(model, ctx.state, inputs))
                out = floating_tensors(run_seeded(net, ctx.state, inputs))
                result[key] = compare(out, ref)
                if mode == "eval" and not result[key]["exact"]:
                    result[key] = _against_regular_path(model, net, ctx, inputs, result[key])
        except Exception as error:
            result[key] = {"exact": False, "error": describe_error(error)}
    model.train()
    model.load_state_dict(ctx.state)
    return result


def _against_regular_path(
    model: nn.Module,
    net: nn.Module,
    ctx: Context,
    inputs: tuple[Any, ...],
    fast: dict[str, Any],
) -> dict[str, Any]:
    """An eval-mode comparison without grad, again with torch's inference fast path off.

    Without grad, ``nn.TransformerEncoderLayer`` computes a whole layer with one fused kernel
    that rounds otherwise than its regular path; a converted layer is two residual blocks,
    which take the regular path (as every call with grad and in train mode does). Where the
    outputs are bit for bit the original's with the fast path off, the entry is exact and
    says so (``fast_path``: the comparison with it on).
    """
    from fxmomentum.patches import attention_fastpath_off

    with attention_fastpath_off():
        ref = floating_tensors(run_seeded(model, ctx.state, inputs))
        out = floating_tensors(run_seeded(net, ctx.state, inputs))
    regular = compare(out, ref)
    if not regular["exact"]:
        return fast
    return {**regular, "fast_path": fast}


def _grads(net: nn.Module, inputs: tuple[Any, ...]) -> dict[str, torch.Tensor | None]:
    grads: dict[str, torch.Tensor | None] = {name: p.grad for name, p in net.named_parameters()}
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            grads[f"input{i}"] = t.grad
    return grads


def gradient_error(
    grads: Mapping[str, torch.Tensor | None], refs: Mapping[str, torch.Tensor | None]
) -> dict[str, Any]:
    """Largest per-tensor relative error, norms floored at ``GRAD_FLOOR`` x the largest.

    A gradient that is None on one side counts as zeros (and its name is listed in
    ``one_sided`` when the other side is not zero); names present on one side only are
    listed in ``unpaired``.
    """
    unpaired = sorted(set(grads) ^ set(refs))
    one_sided = [
        n
        for n in refs
        if n in grads
        and (grads[n] is None) != (refs[n] is None)
        and bool(((grads[n] if grads[n] is not None else refs[n]) != 0).any())
    ]
    names = [n for n in refs if n in grads]
    norms = [refs[n].double().norm().item() for n in names if refs[n] is not None]
    floor = max(norms, default=0.0) * GRAD_FLOOR
    worst, worst_name = 0.0, None
    for name in names:
        a, b = grads[name], refs[name]
        if a is None and b is None:
            continue
        like = a if a is not None else b
        a = a.double() if a is not None else torch.zeros_like(like, dtype=torch.float64)
        b = b.double() if b is not None else torch.zeros_like(like, dtype=torch.float64)
        err = (a - b).norm().item() / max(b.norm().item(), floor, 1e-300)
        if not err <= worst:  # NaN counts as the worst
            worst, worst_name = err, name
    return {
        "grad_error": worst,
        "worst_tensor": worst_name,
        "unpaired": unpaired,
        "one_sided": one_sided,
        "tensors": len(names),
    }


Step = tuple[list[torch.Tensor], dict[str, torch.Tensor | None]]


def train_step(
    net: nn.Module,
    inputs: tuple[Any, ...],
    state: Mapping[str, torch.Tensor],
    mode: str = "train",
    input_grad: bool = True,
) -> Step:
    """One seeded step of ``net`` from ``state``: the floating outputs and every gradient."""
    getattr(net, mode)()
    net.zero_grad(set_to_none=True)
    leaves = _fresh_inputs(inputs, input_grad)
    out = run_seeded(net, state, leaves)
    weighted_loss(out).backward()
    return [t.detach() for t in floating_tensors(out)], _grads(net, leaves)


def perturbed(net: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every parameter multiplied by ``1 + PERTURB_NOISE * N(0, 1)``."""
    generator = torch.Generator().manual_seed(SEED + 2)
    names = {name for name, _ in net.named_parameters()}
    return {
        k: v * (1 + PERTURB_NOISE * torch.randn(v.shape, generator=generator, dtype=v.dtype))
        if k in names and v.is_floating_point()
        else v
        for k, v in state.items()
    }


def check_gradients(ctx: Context) -> dict[str, Any]:
    """Float64: reversible gradients against backprop's (same seed and state).

    In train mode (``grad_error``), in eval mode (``eval_grad_error``), and, as the yardstick
    of the model's own conditioning, backprop's gradients against backprop's with the
    parameters perturbed by a relative ``PERTURB_NOISE`` (``noise``): train-mode BatchNorm
    over few samples turns a 1e-13 change into 1e-8 in the gradients. ``runs_on_example``
    is False when the reversible model, once converted, raises on the very inputs it was
    converted with.
    """
    model = copy.deepcopy(ctx.model).double().train()
    inputs = _to_double(ctx.inputs)
    state = model.state_dict()
    grad = ctx.input_grad is None
    result: dict[str, Any] = {}
    try:
        train_step(model, inputs, state, input_grad=grad)
    except Exception as error:  # the model itself does not run in float64
        result["float64_unsupported"] = describe_error(error)
        return result
    steps: dict[str, Step] = {}
    nets: dict[str, nn.Module] = {}
    try:
        for kind in ("reversible", "backprop"):
            result["during"] = f"{kind} conversion"
            backprop = kind == "backprop"
            nets[kind], _ = fxmomentum_convert(model, 0.9, inputs, use_backprop=backprop)
            result["during"] = f"{kind} step"
            steps[kind] = train_step(nets[kind], inputs, state, input_grad=grad)
            result["runs_on_example"] = True
        del result["during"]
    except Exception as error:
        result["error"] = describe_error(error)
        if result.get("during") == "reversible step":
            result["runs_on_example"] = False
        return result
    (out_r, grads_r), (out_b, grads_b) = steps["reversible"], steps["backprop"]
    result["output"] = compare(out_r, out_b)
    result.update(gradient_error(grads_r, grads_b))
    noisy = perturbed(nets["backprop"], state)
    _, grads_p = train_step(nets["backprop"], inputs, noisy, input_grad=grad)
    result["noise"] = gradient_error(grads_p, grads_b)["grad_error"]
    try:
        _, grads_re = train_step(nets["reversible"], inputs, state, "eval", input_grad=grad)
        _, grads_be = train_step(nets["backprop"], inputs, state, "eval", input_grad=grad)
        in_eval = gradient_error(grads_re, grads_be)
        result["eval_grad_error"] = in_eval["grad_error"]
        result["eval_worst_tensor"] = in_eval["worst_tensor"]
        result["eval_one_sided"] = in_eval["one_sided"]
    except Exception as error:
        result["eval_error"] = describe_error(error)
    return result


def check_other_batch(ctx: Context) -> dict[str, Any]:
    """The reversible model's train step at another batch size (and length)."""
    assert ctx.reversible is not None
    net = ctx.reversible.train()
    net.zero_grad(set_to_none=True)
    out = run_seeded(net, ctx.state, ctx.leaves(ctx.other))
    weighted_loss(out).backward()
    return {"ok": True, "shape": [list(t.shape) for t in floating_tensors(out)][:1]}


CHECKS: tuple[tuple[str, Callable[[Context], dict[str, Any]]], ...] = (
    ("chains", check_chains),
    ("runs", check_runs),
    ("gamma0", check_gamma_zero),
    ("grad64", check_gradients),
    ("other_batch", check_other_batch),
)


def run_child(name: str, result_path: Path, threads: int) -> int:
    """Run every check on model ``name``, writing the results after each one."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    result: dict[str, Any] = {"name": name}

    def dump() -> None:
        result_path.write_text(json.dumps(result, indent=1, default=str))

    (spec,) = select_specs(exact=name)
    result["step"] = "build"
    dump()
    start = time.perf_counter()
    try:
        ctx = Context(spec)
    except Exception as error:
        result["build"] = {"error": describe_error(error)}
        result["step"] = "done"
        dump()
        return 0
    result["build"] = {
        "ok": True,
        "params": sum(p.numel() for p in ctx.model.parameters()),
        "perturbed": len(ctx.perturbed),
        "input_shapes": [list(t.shape) for t in ctx.inputs if isinstance(t, torch.Tensor)],
        "other_shapes": [list(t.shape) for t in ctx.other if isinstance(t, torch.Tensor)],
        "input_grad": ctx.input_grad or "yes",
    }
    for key, check in CHECKS:
        result["step"] = key
        dump()
        if key in ("runs", "other_batch") and ctx.reversible is None:
            result[key] = {"skipped": "the conversion failed"}
            continue
        try:
            result[key] = check(ctx)
        except Exception as error:
            result[key] = {"error": describe_error(error)}
    result["step"] = "done"
    result["seconds"] = round(time.perf_counter() - start, 1)
    dump()
    return 0


# --------------------------------------------------------------------------------------------
# The parent: one child per model, then the JSON and the Markdown table
# --------------------------------------------------------------------------------------------


def child_env(threads: int, compile_engine: bool = False) -> dict[str, str]:
    """The environment of a child: this checkout first on ``PYTHONPATH``, fixed threads.

    Without ``compile_engine``, ``FXMOMENTUM_COMPILE=0``: the reversible engine's integer
    passes run eagerly (the same bits; torch.compile would cost a compilation per process).
    """
    env = dict(os.environ)
    if not compile_engine:
        env["FXMOMENTUM_COMPILE"] = "0"
    paths = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_one(spec: ModelSpec, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Run the checks on ``spec`` in a fresh process; a crash or a timeout becomes a row."""
    timeout, threads = args.timeout, args.threads
    result_path = scratch / f"{spec.name.replace('/', '_')}.json"
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", spec.name,
        "--result", str(result_path), "--threads", str(threads),
    ]  # fmt: skip
    start = time.perf_counter()
    failure = None
    try:
        proc = subprocess.run(
            command,
            env=child_env(threads, args.compile),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            failure = f"process exited with code {proc.returncode}: " + " / ".join(tail)
    except subprocess.TimeoutExpired:
        failure = f"timeout after {timeout:g} s"
    row: dict[str, Any] = {"name": spec.name}
    if result_path.exists():
        row = json.loads(result_path.read_text())
    if failure is not None or row.get("step") != "done":
        row["failure"] = f"{failure or 'no result'} during step `{row.get('step', 'start')}`"
    row["wall_s"] = round(time.perf_counter() - start, 1)
    return judge(row, spec)


def judge(row: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """``row`` with the spec's expectation and the verdicts (status, fully right) added."""
    row.update(spec.describe())
    row["status"] = chain_status(row)
    row["fully_right"] = fully_right(row)
    return row


def render(json_path: Path, md_path: Path) -> int:
    """Rewrite the Markdown (and the verdicts in the JSON) from existing results, running nothing.

    Rows whose model is still in the zoo take its current expectation and description.
    """
    results = json.loads(json_path.read_text())
    specs = {spec.name: spec for spec in select_specs()}
    rows = [judge(r, specs[r["name"]]) if r["name"] in specs else r for r in results["models"]]
    json_path.write_text(json.dumps({**results, "models": rows}, indent=1) + "\n")
    md_path.write_text(markdown(rows, results["environment"]))
    print(f"wrote {json_path} and {md_path}")
    return 0


def chain_status(row: Mapping[str, Any]) -> str:
    """``match``, ``split``, ``partial``, ``missing``, ``extra``, ``different`` or ``error``.

    ``split``: as many blocks as expected, in more chains; ``partial``: fewer blocks (some
    found); ``missing``: none of the expected blocks; ``extra``: more blocks than expected;
    ``different``: as many blocks in fewer chains, or residuals inside blocks' branches found
    in place of the blocks (the report skips the outer add: "encloses ... residual block");
    ``error``: the model could not be built or converted.
    """
    chains = row.get("chains", {})
    if "chains" not in chains:
        return "error"
    found, expected = list(chains["chains"]), list(row["expected"])
    nested = any("encloses" in skip["reason"] for skip in chains.get("skipped", []))
    if nested and found:
        return "different"  # residuals inside a block's branch stand in for the block
    if sorted(found) == sorted(expected):
        return "match"
    if sum(found) == sum(expected):
        return "split" if len(found) > len(expected) else "different"
    if sum(found) > sum(expected):
        return "extra"
    return "missing" if not found else "partial"


def _gamma0_exact(row: Mapping[str, Any]) -> bool:
    gamma0 = row.get("gamma0", {})
    return all(gamma0.get(key, {}).get("exact") for key in ("eval", "train", "other"))


def _within(error: Any, grad: Mapping[str, Any]) -> bool:
    """``error`` within ``GRAD_TOLERANCE`` or within ``NOISE_FACTOR`` x the model's noise."""
    if not isinstance(error, float):
        return False
    return error <= GRAD_TOLERANCE or error <= NOISE_FACTOR * grad.get("noise", 0.0)


def _grad_ok(row: Mapping[str, Any]) -> bool:
    """Train- and eval-mode gradient errors within the tolerance or the model's conditioning."""
    grad = row.get("grad64", {})
    return _within(grad.get("grad_error"), grad) and _within(grad.get("eval_grad_error"), grad)


def fully_right(row: Mapping[str, Any]) -> bool:
    """Chains as expected, gamma 0 exact three ways, gradients right, every run fine."""
    return (
        row["status"] == "match"
        and "failure" not in row
        and _gamma0_exact(row)
        and _grad_ok(row)
        and bool(row.get("runs", {}).get("ok"))
        and bool(row.get("other_batch", {}).get("ok"))
    )


def environment(command: list[str]) -> dict[str, Any]:
    """Versions, machine and the command line."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "timm", "transformers", "vit-pytorch"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    fxmomentum = importlib.import_module("fxmomentum")
    versions["fxmomentum"] = f"{fxmomentum.__version__} ({_short_path(fxmomentum.__file__)})"
    return {
        "versions": versions,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", "benchmarks/compat.py", *command]),
    }


def _error_text(error: Mapping[str, str]) -> str:
    where = error.get("fxmomentum") or error.get("where", "")
    return f"{error['type']}: {error['message'][:160]}" + (f" ({where})" if where else "")


def _exactness(entry: Mapping[str, Any]) -> str:
    """A cell of the gamma-0 column: ``exact``, the relative error, or ``error``."""
    if "error" in entry:
        return "error"
    if "structure" in entry:
        return "other outputs"
    if entry.get("exact"):
        return "exact"
    return f"{entry.get('max_rel', math.nan):.1e}" if "max_rel" in entry else "-"


def blocking_leaves(chains: Mapping[str, Any]) -> list[dict[str, str]]:
    """The opaque modules a chain may have been cut at.

    Submodules whose forward stays Python code, and untraceable submodules that contain a
    chain's block or such a module (the root's forward stays Python code for every Hugging
    Face model, and attention modules are often opaque inside their blocks: neither cuts a
    chain, so neither is named).
    """
    leaves = [leaf for leaf in chains.get("leaves", []) if leaf["module"]]
    python = [leaf for leaf in leaves if "kept as Python code" in leaf["reason"]]
    anchors = [c[end] for c in chains.get("all_chains", []) for end in ("first", "last")]
    anchors += [leaf["module"] for leaf in python]
    outer = [
        leaf
        for leaf in leaves
        if leaf not in python
        and "traceable" in leaf["reason"]
        and any(a.startswith(leaf["module"] + ".") for a in anchors)
    ]
    return outer + python


def chain_notes(row: Mapping[str, Any]) -> list[str]:
    """Why chains differ from the expectation: unconverted chains and skipped adds."""
    chains = row.get("chains", {})
    notes = []
    for chain in chains.get("all_chains", []):
        if not chain["converted"]:
            where = f"{chain['first']}..{chain['last']}"
            notes.append(f"chain {where} not converted: {chain['reason']}")
    reasons = {}
    for skip in chains.get("skipped", []):
        reasons.setdefault(skip["reason"], []).append(skip["module"] or skip["node"])
    for reason, where in reasons.items():
        if reason.startswith("projection shortcut"):
            continue  # what the expectations leave out too
        more = f" (+{len(where) - 1} more)" if len(where) > 1 else ""
        notes.append(f"skipped `{where[0]}`{more}: {reason}")
    opaque = blocking_leaves(chains)
    for leaf in opaque[:MAX_LEAF_NOTES]:
        notes.append(f"`{leaf['module']}` ({leaf['type']}) {leaf['reason'][:140]}")
    if len(opaque) > MAX_LEAF_NOTES:
        notes.append(f"{len(opaque) - MAX_LEAF_NOTES} more modules kept as Python code")
    if not notes:
        notes.append("the report names no skipped add and no opaque module")
    return notes


def gamma_zero_notes(row: Mapping[str, Any]) -> list[str]:
    """What went wrong with the gamma-0 conversion, one sentence per failed comparison."""
    gamma0 = row.get("gamma0", {})
    if "error" in gamma0:
        return [f"gamma 0 conversion: {_error_text(gamma0['error'])}"]
    notes = []
    found = row.get("chains", {}).get("chains")
    if "chains" in gamma0 and found is not None and gamma0["chains"] != found:
        notes.append(f"use_backprop=True finds chains {gamma0['chains']}")
    for key in ("eval", "train", "other"):
        entry = gamma0.get(key, {})
        if "error" in entry:
            notes.append(f"gamma 0 {key}: {_error_text(entry['error'])}")
        elif entry and not entry.get("exact"):
            detail = entry.get("structure") or (
                f"max abs {entry['max_abs']:.1e}, relative {entry['max_rel']:.1e}"
            )
            notes.append(f"gamma 0 {key} not exact: {detail}")
        elif entry.get("fast_path"):
            fast = entry["fast_path"]
            notes.append(
                f"gamma 0 {key}: exact against the original's regular path (relative "
                f"{fast.get('max_rel', math.nan):.1e} against its fused inference kernel)"
            )
    return notes


def fails_on_own_inputs(row: Mapping[str, Any]) -> bool:
    """Whether the reversible model raises on the example inputs it was converted with."""
    if "error" in row.get("chains", {}):
        return False  # not converted at all
    runs, grad = row.get("runs", {}), row.get("grad64", {})
    return "error" in runs or grad.get("runs_on_example") is False


def row_notes(row: Mapping[str, Any]) -> list[str]:
    """Everything not right about a row, one short sentence each, the worst first."""
    notes = []
    if "failure" in row:
        notes.append(row["failure"])
    for key in ("build", "chains"):
        if "error" in row.get(key, {}):
            notes.append(f"{key}: {_error_text(row[key]['error'])}")
    runs = row.get("runs", {})
    grad = row.get("grad64", {})
    if fails_on_own_inputs(row):
        error = runs.get("error") or grad.get("error")
        notes.append(f"**CONVERTED MODEL FAILS ON ITS OWN EXAMPLE INPUTS**: {_error_text(error)}")
    if row["status"] != "match":
        notes.extend(chain_notes(row))
    notes.extend(gamma_zero_notes(row))
    if "error" in grad and grad.get("runs_on_example", True):
        notes.append(f"float64 {grad.get('during', 'gradients')}: {_error_text(grad['error'])}")
    else:
        notes.extend(gradient_notes(grad))
    if "float64_unsupported" in grad:
        error = _error_text(grad["float64_unsupported"])
        notes.append(f"no float64 gradient check: the model itself fails in float64: {error}")
    if "eval_error" in grad:
        notes.append(f"float64 eval-mode step: {_error_text(grad['eval_error'])}")
    if grad.get("unpaired"):
        notes.append(f"gradients on one side only: {', '.join(grad['unpaired'][:3])}")
    other = row.get("other_batch", {})
    if "error" in other:
        notes.append(f"other batch: {_error_text(other['error'])}")
    return notes


def gradient_notes(grad: Mapping[str, Any]) -> list[str]:
    """Gradient errors above the tolerance: round-off (the model's conditioning) or not."""
    notes = []
    yardstick = (
        f"weights perturbed by {PERTURB_NOISE:g} move backprop's own gradients by "
        f"{grad.get('noise', math.nan):.1e}"
    )
    for mode, key, worst in (
        ("train", "grad_error", "worst_tensor"),
        ("eval", "eval_grad_error", "eval_worst_tensor"),
    ):
        error = grad.get(key)
        if not isinstance(error, float) or error <= GRAD_TOLERANCE:
            continue
        if _within(error, grad):
            notes.append(
                f"float64 {mode}-mode gradient error {error:.1e} is round-off ({yardstick})"
            )
        else:
            notes.append(
                f"**float64 {mode}-mode gradients wrong**: error {error:.1e} in "
                f"`{grad.get(worst)}` ({yardstick})"
            )
    for key, mode in (("one_sided", "train"), ("eval_one_sided", "eval")):
        if grad.get(key):
            names = ", ".join(f"`{n}`" for n in grad[key][:3])
            more = f" and {len(grad[key]) - 3} more" if len(grad[key]) > 3 else ""
            notes.append(
                f"{mode} mode: a gradient on one side only (None on the other): {names}{more}"
            )
    return notes


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _grad_cell(grad: Mapping[str, Any], key: str) -> str:
    """``1.2e-12``, ``3.0e-08 (noise)`` when within the model's conditioning, or ``error``."""
    error = grad.get(key)
    if not isinstance(error, float):
        return "error"
    if error > GRAD_TOLERANCE and _within(error, grad):
        return f"{error:.1e} (noise)"
    return f"{error:.1e}"


def table_row(row: Mapping[str, Any]) -> str:
    """One Markdown table line."""
    chains = row.get("chains", {})
    found = ",".join(map(str, chains["chains"])) if "chains" in chains else "-"
    gamma0 = row.get("gamma0", {})
    exact = "/".join(_exactness(gamma0.get(k, {})) for k in ("eval", "train", "other"))
    grad = row.get("grad64", {})
    grad_cell = " / ".join(_grad_cell(grad, key) for key in ("grad_error", "eval_grad_error"))
    if "float64_unsupported" in grad:
        grad_cell = "n/a"
    other = row.get("other_batch", {})
    other_cell = "yes" if other.get("ok") else ("no" if "error" in other else "-")
    status = row["status"] if row["fully_right"] or row["status"] != "match" else "match*"
    cells = [
        row["family"], f"`{row['name']}`", found or "0",
        ",".join(map(str, row["expected"])) or "0", status,
        exact if gamma0 else "-", grad_cell if grad else "-", other_cell,
        "; ".join(row_notes(row)),
    ]  # fmt: skip
    return "| " + " | ".join(_cell(str(c)) for c in cells) + " |"


def _worst_error(grad: Mapping[str, Any]) -> float:
    """The larger of the train- and eval-mode gradient errors (inf when one is missing)."""
    return max(grad.get("grad_error", math.inf), grad.get("eval_grad_error", math.inf))


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The bullet points at the top of the page."""
    built = [r for r in rows if r.get("build", {}).get("ok")]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    checked = [r for r in rows if "grad_error" in r.get("grad64", {})]
    errors = [(_worst_error(r["grad64"]), r["name"]) for r in checked]
    worst = max(errors, default=(math.nan, "-"))
    above = [r for r in checked if _worst_error(r["grad64"]) > GRAD_TOLERANCE]
    wrong = [r["name"] for r in above if not _grad_ok(r)]
    failing = [r["name"] for r in rows if fails_on_own_inputs(r)]
    lines = [
        f"- **{len(rows)} models**, {len(built)} built; **{sum(r['fully_right'] for r in rows)} "
        "fully right** (chains as expected, gamma 0 exact in eval, train and at another batch "
        f"size, float64 gradients within {GRAD_TOLERANCE:g} or round-off in train and eval "
        "mode, every run fine).",
        "- Chains: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".",
        f"- gamma 0 exact in all three checks: {sum(_gamma0_exact(r) for r in rows)} of "
        f"{len(built)}.",
        f"- Float64 gradients (train and eval mode): worst {worst[0]:.1e} (`{worst[1]}`); "
        f"{len(above)} of {len(checked)} models above {GRAD_TOLERANCE:g}, of which "
        f"{len(above) - len(wrong)} within {NOISE_FACTOR:g}x the model's own float64 sensitivity "
        f"(marked `noise`) and **{len(wrong)} wrong**" + (f" ({', '.join(wrong)})" if wrong else "")
        + f"; {len(built) - len(checked)} without a value.",
        f"- Converted model raises on its own example inputs: {len(failing)}"
        + (f" ({', '.join(failing)})" if failing else "") + ".",
        "- Another batch size (and length) forward and backward: "
        f"{sum(bool(r.get('other_batch', {}).get('ok')) for r in rows)} of {len(built)}.",
    ]  # fmt: skip
    return lines


def spec_cell(row: Mapping[str, Any]) -> str:
    """How a model was built or called, and its input shapes (converted with; other)."""
    build = row.get("build", {})
    shapes = " ".join("x".join(map(str, s)) for s in build.get("input_shapes", []))
    other = " ".join("x".join(map(str, s)) for s in build.get("other_shapes", []))
    text = f"{shapes}; other: {other}" if shapes else ""
    if build.get("input_grad", "yes") != "yes":
        text += f"; inputs without grad ({build['input_grad']})"
    return f"{row['note']}; {text}" if row.get("note") else text


def markdown(rows: list[dict[str, Any]], env: Mapping[str, Any]) -> str:
    """The compatibility page: summary, environment, the table, where expectations come from."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    header = [
        "| family | model | chains found | expected | status | gamma 0 exact (eval/train/other) "
        "| float64 grad error (train / eval) | other batch | notes |",
        "|---|---|---|---|---|---|---:|---|---|",
    ]
    expectations = [
        "| model | expected | where it comes from | built or called as, inputs |",
        "|---|---|---|---|",
    ]
    expectations += [
        f"| `{r['name']}` | {','.join(map(str, r['expected'])) or '0'} | {_cell(r['source'])} "
        f"| {_cell(spec_cell(r))} |"
        for r in rows
    ]
    parts = [
        "# Compatibility",
        "",
        PAGE_INTRO.strip(),
        "",
        "## Summary",
        "",
        *summary_lines(rows),
        "",
        f"Generated by `{env['command']}` on {env['date']} ({versions}; {env['platform']}, "
        f"{env['cpus']} CPUs; {env['total_s']:.0f} s in all; the reversible engine "
        f"{'compiled' if env.get('compiled_engine') else 'eager (FXMOMENTUM_COMPILE=0)'}).",
        "",
        "## Models",
        "",
        *header,
        *(table_row(r) for r in rows),
        "",
        "## Where each expectation comes from",
        "",
        *expectations,
        "",
    ]
    return "\n".join(parts)


PAGE_INTRO = """
Every model below was converted by `fxmomentum` in a fresh process (`benchmarks/compat.py`),
with random weights from a small configuration, and checked four ways:

- **chains found**: block counts of the converted chains of `fxmomentum.convert(model, 0.9,
  example_inputs=x)`, against the chains the architecture implies (**expected**, written down
  per model from the architecture, last section). **status**: `match`; `split` (all the
  expected blocks, in more chains); `partial` (fewer blocks); `missing` (none); `extra` (more
  blocks than expected); `different` (residuals inside a block's branch converted in place of
  the block, or as many blocks arranged otherwise); `error` (not built or not converted).
  `match*`: the chains match but another check failed (see notes).
- **gamma 0 exact**: `convert(model, 0.0, example_inputs=x, use_backprop=True)` against the
  original, bit for bit (`torch.equal`; otherwise the largest relative error), in eval mode,
  in train mode (same seed, same state: dropout and drop-path draw the same) and in eval mode
  at another batch size (and sequence length for token models). Eval mode runs without grad,
  where torch's `nn.TransformerEncoderLayer` computes a whole layer with one fused inference
  kernel (its fast path) that rounds otherwise; a converted layer is two blocks on the
  regular path (the one every call with grad takes): where the outputs are the original's
  bit for bit with the fast path off, the cell says `exact` and the notes say so.
- **float64 grad error (train / eval)**: float64, same seed and state, in train mode and in
  eval mode: the reversible conversion's gradients (every parameter, and the input when
  floating) against `use_backprop=True`'s, the largest over tensors of `||a - b|| / ||b||`
  with norms floored at 1e-9 x the largest.
  The loss is a fixed random weighting of every floating output. `(noise)`: above 1e-8 but
  within 10x of how far backprop's own gradients move when every weight is multiplied by
  `1 + 1e-13 N(0, 1)` (train-mode BatchNorm over a few samples per channel turns round-off
  of 1e-13 into 1e-8).
- **other batch**: the reversible float32 model's forward and backward at another batch size
  (and sequence length).

Parameters whose values are all equal (layer scales, zero-initialised gains, unit norm weights,
zero biases) and BatchNorm running statistics get random values first, so that no block is the
identity (`perturb_constants` in `benchmarks/compat.py`).
"""


def main(argv: list[str] | None = None) -> int:
    """Command line: run the sweep (or, with ``--child``, one model's checks)."""
    args = parse_args(argv)
    if args.child:
        return run_child(args.child, Path(args.result), args.threads)
    if args.render:
        return render(*output_paths(args))
    specs = select_specs(only=args.only, quick=args.quick)
    if not specs:
        print(f"no model matches {args.only!r}", file=sys.stderr)
        return 2
    json_path, md_path = output_paths(args)
    old = json.loads(json_path.read_text())["models"] if args.update and json_path.exists() else []
    env = environment(sys.argv[1:] if argv is None else argv)
    env["compiled_engine"] = args.compile
    start = time.perf_counter()

    def write(rows: list[dict[str, Any]]) -> None:
        env["total_s"] = round(time.perf_counter() - start, 1)
        merged = merge_rows(old, rows)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"environment": env, "models": merged}, indent=1) + "\n")
        md_path.write_text(markdown(merged, env))

    run_all(specs, args, write)
    print(f"wrote {json_path} and {md_path}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the models whose name or family contains this")
    parser.add_argument("--quick", action="store_true", help="three tiny models, a smoke test")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    parser.add_argument(
        "--out", type=Path, help="folder for compat.json and compatibility.md (default: "
        "benchmarks/results/ and docs/ for a full run, a temporary folder otherwise)",
    )  # fmt: skip
    parser.add_argument(
        "--update", action="store_true", help="merge these rows into the existing results"
    )
    parser.add_argument(
        "--compile", action="store_true",
        help="leave the reversible engine's torch.compile on (slower: one compilation per model)",
    )  # fmt: skip
    parser.add_argument(
        "--render", action="store_true",
        help="rewrite the Markdown from the existing JSON (same --out), running no model",
    )  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """Where the JSON and the Markdown go."""
    if args.out is not None:
        return args.out / "compat.json", args.out / "compatibility.md"
    if args.only or args.quick:
        if not args.update:
            folder = Path(tempfile.mkdtemp(prefix="compat-"))
            return folder / "compat.json", folder / "compatibility.md"
    return HERE / "results" / "compat.json", ROOT / "docs" / "compatibility.md"


def run_all(
    specs: list[ModelSpec],
    args: argparse.Namespace,
    on_row: Callable[[list[dict[str, Any]]], None],
) -> list[dict[str, Any]]:
    """Every model in a fresh process, ``args.jobs`` at a time, printing one line each.

    ``on_row`` gets the rows done so far, in zoo order, after each model (the results are
    written as the sweep goes).
    """
    done: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="compat-") as scratch:

        def one(spec: ModelSpec) -> dict[str, Any]:
            row = run_one(spec, args, Path(scratch))
            print(progress_line(row), flush=True)
            with lock:
                done[spec.name] = row
                on_row([done[s.name] for s in specs if s.name in done])
            return row

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            return list(pool.map(one, specs))


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with the rows of ``new`` replacing those of the same name (new ones appended)."""
    fresh = {r["name"]: r for r in new}
    merged = [fresh.pop(r["name"], r) for r in old]
    return merged + list(fresh.values())


def progress_line(row: Mapping[str, Any]) -> str:
    """``name  status  chains / expected  seconds``."""
    found = row.get("chains", {}).get("chains", "-")
    flag = "ok" if row["fully_right"] else "NOT RIGHT"
    return (
        f"{row['name']:<40} {row['status']:<9} {flag:<9} found {found} expected "
        f"{row['expected']}  {row['wall_s']} s"
    )


if __name__ == "__main__":
    sys.exit(main())
