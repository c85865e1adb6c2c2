"""Running a model on example inputs as a probe: no side effects.

Capture runs the model (or one of its submodules) on example inputs to record calls, trace
shape-aware and propagate shapes. None of that may change the model or the process: buffers
(BatchNorm running statistics), the global random states and the autograd mode are restored.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["as_tuple", "no_side_effects"]


@contextlib.contextmanager
def no_side_effects(
    owner: nn.Module, inputs: Sequence[Any] = (), *, grad: bool = False
) -> Iterator[None]:
    """Run a probe of ``owner``: grad as asked, the global random states forked (torch's, on
    every CUDA device ``owner`` or ``inputs`` live on too, and Python's) and ``owner``'s buffers
    restored afterwards.

    Examples
    --------
    >>> bn = nn.BatchNorm1d(2)
    >>> with no_side_effects(bn):
    ...     _ = bn(torch.randn(4, 2))
    >>> bn.num_batches_tracked.item()
    0
    """
    saved = [(b, b.detach().clone()) for b in owner.buffers()]
    python_random = random.getstate()
    tensors = [*owner.parameters(), *owner.buffers(), *inputs]
    devices = sorted(
        {t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda}
    )
    try:
        with torch.random.fork_rng(devices=devices), torch.set_grad_enabled(grad):
            yield
    finally:
        random.setstate(python_random)
        with torch.no_grad():
            for b, old in saved:
                if b.shape == old.shape:
                    b.copy_(old)


def as_tuple(example_inputs: torch.Tensor | Sequence[Any]) -> tuple[Any, ...]:
    """Example inputs as a tuple (a single tensor is one input).

    Examples
    --------
    >>> len(as_tuple(torch.zeros(2))), len(as_tuple([torch.zeros(2), None]))
    (1, 2)
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    got = type(example_inputs).__name__
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {got}")
