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


def block_counts(model: torch.nn.Module, inputs) -> list[int]:
    """Block counts of the chains ``fxmomentum.inspect`` finds, in order."""
    import fxmomentum

    return [c.num_blocks for c in fxmomentum.inspect(model, inputs).chains]


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    return out.last_hidden_state


def assert_gamma_zero_exact(model: torch.nn.Module, inputs, seed: int = 1) -> None:
    """``convert(model, 0.0, use_backprop=True)`` computes bit for bit what ``model`` does,
    in eval and in train mode (same seed: the same dropout draws).

    Without grad and in eval mode, torch's ``nn.TransformerEncoderLayer`` computes a whole
    layer with one fused inference kernel (its "fast path"), which rounds otherwise than
    the regular path that a converted layer's blocks take (as they do with grad, and as the
    original does in train mode): the comparison turns the fast path off.
    """
    import fxmomentum
    from fxmomentum.patches import attention_fastpath_off

    converted = fxmomentum.convert(model, 0.0, use_backprop=True, example_inputs=inputs)
    for mode in ("eval", "train"):
        for net in (model, converted):
            getattr(net, mode)()
        outs = []
        for net in (model, converted):
            torch.manual_seed(seed)
            with torch.no_grad(), attention_fastpath_off():
                outs.append(_first_tensor(net(*inputs)))
        assert torch.equal(outs[0], outs[1]), (mode, rel_err(outs[1], outs[0]))


def assert_reversible_gradients(
    model: torch.nn.Module, inputs, mode: str = "train", tolerance: float = 1e-8
) -> None:
    """In float64, the reversible conversion's outputs and gradients (parameters and floating
    inputs) equal those of ``use_backprop=True`` (same seed)."""
    model = getattr(copy.deepcopy(model).double(), mode)()
    inputs = tuple(
        t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs
    )
    reversible, backprop = converted_pair(model, inputs)
    results = []
    for net in (reversible, backprop):
        getattr(net, mode)()
        xs = tuple(
            t.clone().requires_grad_(True)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 2
            else t
            for t in inputs
        )
        torch.manual_seed(1)
        out = _first_tensor(net(*xs))
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        (out.square().mean() + (out * weights).sum()).backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        grads += [x.grad for x in xs if isinstance(x, torch.Tensor) and x.grad is not None]
        names = [n for n, p in net.named_parameters() if p.grad is not None]
        results.append((out.detach(), grads, names))
    (out_r, grads_r, names_r), (out_b, grads_b, names_b) = results
    assert names_r == names_b and grads_r
    assert max_rel_err([out_r], [out_b]) <= tolerance
    assert grad_err(grads_r, grads_b) <= tolerance


def seeded_step(model, x: torch.Tensor) -> list[torch.Tensor]:
    """One training step with a fixed seed and a loss weighting the outputs' last dimension
    unevenly: the output and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    out = model(x.clone().requires_grad_(True))
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
