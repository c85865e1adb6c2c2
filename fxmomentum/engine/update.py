"""The momentum update in floating point, as one autograd node per block.

``v <- gamma v + (1 - gamma) f`` and ``x <- x + v``, where ``f`` is the block's residual
(``y - x`` for a block that returns ``y = x + f(x)`` whole). Written with torch's operators,
autograd records four nodes per block and runs about seven elementwise passes over the state
in backward, each with a fresh tensor; on CPU, where a ResNet's early blocks cost little more
than a few passes over their activations, that was as much as 40% of a block's step. As one
:class:`torch.autograd.Function` it is one pass forward and one backward (a native C kernel on
the CPU, :mod:`.native`; the eager operators below, with the same bits, elsewhere), and it
keeps nothing for backward (gamma is a constant), so the plain, kept and recomputed chains
keep what the original blocks keep.

Every floating-point path of a chain (``use_backprop=True``, the *keep* and *recompute*
strategies, the official ``MomentumNet``) goes through :func:`momentum_update`, so they give
the same bits; the reversible engine's exact arithmetic is its own (:mod:`.kernels`).

Examples
--------
>>> x, y = torch.zeros(3), torch.ones(3)
>>> x1, v1 = momentum_update(x, y, None, 0.5, subtract=True)
>>> x1.tolist(), v1.tolist()
([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
>>> x2, v2 = momentum_update(x1, torch.full((3,), 2.5), v1, 0.5, subtract=True)
>>> v2.tolist()
[1.25, 1.25, 1.25]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from . import native
from .kernels import _Kernel as Kernel

__all__ = ["momentum_update", "needs_grad"]


def _momentum_update(
    x: torch.Tensor, y: torch.Tensor, v: torch.Tensor | None, gamma: float, subtract: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + v', v')``: the eager reference (the native kernel gives its bits)."""
    f = y - x if subtract else y
    v_new = f * (1 - gamma) if v is None else v * gamma + f * (1 - gamma)
    return x + v_new, v_new


def _momentum_update_grad(
    ref: torch.Tensor,
    grad_x_new: torch.Tensor | None,
    grad_v_new: torch.Tensor | None,
    gamma: float,
    has_v: bool,
    subtract: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The gradients of ``x``, ``y`` and ``v`` (``ref``: one of the incoming gradients, for
    the device)."""
    if grad_x_new is None:
        total = grad_v_new
    elif grad_v_new is None:
        total = grad_x_new
    else:
        total = grad_x_new + grad_v_new
    grad_y = total * (1 - gamma)
    grad_v = total * gamma if has_v else None
    grad_x = grad_x_new
    if subtract:
        grad_x = -grad_y if grad_x_new is None else grad_x_new - grad_y
    return grad_x, grad_y, grad_v


_kernel = Kernel(_momentum_update, native.momentum_update)
_grad_kernel = Kernel(_momentum_update_grad, native.momentum_update_grad)


def _traced() -> bool:
    """Whether torch.compile or torch.export is tracing: it sees the operators, not the
    native kernel (whose pointers fake tensors do not have)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _update(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return _momentum_update(*args) if _traced() else _kernel(*args)


def _update_grad(*args: Any) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    return _momentum_update_grad(*args) if _traced() else _grad_kernel(*args)


class _MomentumUpdate(torch.autograd.Function):
    """``(x, y, v) -> (x + v', v')`` with ``v' = gamma v + (1 - gamma) f``, ``f = y - x``
    (``subtract``) or ``f = y``; ``v`` may be None (the first block: ``v' = (1 - gamma) f``)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        y: torch.Tensor,
        v: torch.Tensor | None,
        gamma: float,
        subtract: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.gamma, ctx.subtract, ctx.has_v = gamma, subtract, v is not None
        ctx.set_materialize_grads(False)
        return _update(x, y, v, gamma, subtract)

    @staticmethod
    def backward(
        ctx: Any, grad_x_new: torch.Tensor | None, grad_v_new: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        ref = grad_x_new if grad_x_new is not None else grad_v_new
        if ref is None:
            return None, None, None, None, None
        grads = _update_grad(ref, grad_x_new, grad_v_new, ctx.gamma, ctx.has_v, ctx.subtract)
        return (*grads, None, None)


def momentum_update(
    x: torch.Tensor, y: torch.Tensor, v: torch.Tensor | None, gamma: float, subtract: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's momentum update: ``(x + v', v')``, ``v' = gamma v + (1 - gamma) f``.

    Parameters
    ----------
    x : Tensor
        The block's input.
    y : Tensor
        The block's output: ``f`` itself, or ``x + f`` with ``subtract``.
    v : Tensor or None
        The velocity before the block (None before the first).
    gamma : float
        The momentum, in ``(0, 1)``.
    subtract : bool
        ``f = y - x`` (a block that returns its whole output) rather than ``f = y``.

    Returns
    -------
    tuple of Tensor
        The next state ``x + v'`` and the velocity ``v'``.
    """
    if needs_grad((x, y, v)):
        return _MomentumUpdate.apply(x, y, v, gamma, subtract)
    return _update(x, y, v, gamma, subtract)


def needs_grad(tensors: Iterable[object]) -> bool:
    """Whether autograd records an operation on ``tensors`` (non-tensors aside): grad is
    enabled and one of them requires grad.

    Under ``torch.export`` (and ``torch.onnx.export(dynamo=True)``) it is never: the exported
    program is for inference, and the engine's state checks depend on the data, which export
    cannot trace.
    """
    if not torch.is_grad_enabled() or torch.compiler.is_exporting():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
