"""Shared helpers for the tests."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """L2 norm of the difference over the L2 norm of the reference ``b`` (ARCHITECTURE.md)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def max_rel_err(xs, refs) -> float:
    """Largest :func:`rel_err` over matching tensors."""
    xs, refs = list(xs), list(refs)
    assert len(xs) == len(refs)
    return max(rel_err(a, b) for a, b in zip(xs, refs, strict=True))


def grad_err(xs, refs, floor: float = 1e-9) -> float:
    """Largest per-tensor relative error, a tensor's norm floored at ``floor`` x the largest one.

    Gradients that are zero in exact arithmetic (the bias of a layer before a BatchNorm) come
    out as float64 round-off in both runs: the floor turns that into an absolute tolerance.
    """
    xs, refs = [a.double() for a in xs], [b.double() for b in refs]
    assert len(xs) == len(refs) and refs
    least = max(r.norm().item() for r in refs) * floor
    return max(
        (a - b).norm().item() / max(b.norm().item(), least, 1e-300)
        for a, b in zip(xs, refs, strict=True)
    )


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: more threads only spin (10x the CPU time on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def converted_pair(model: torch.nn.Module, inputs, gamma: float = 0.9):
    """``model`` converted reversible and with use_backprop=True; the reversible one must
    hold reversible chains."""
    import fxmomentum
    from fxmomentum import MomentumChain

    reversible = fxmomentum.convert(model, gamma, example_inputs=inputs)
    backprop = fxmomentum.convert(model, gamma, example_inputs=inputs, use_backprop=True)
    chains = [m for m in reversible.modules() if isinstance(m, MomentumChain)]
    assert chains and not any(c.use_backprop for c in chains)
    return reversible, backprop


def round_trips(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``module`` through pickle, copy.deepcopy and torch.save / torch.load (in this process)."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return {
        "pickle": pickle.loads(pickle.dumps(module)),
        "deepcopy": copy.deepcopy(module),
        "torch.save": torch.load(buffer, weights_only=False),
    }
