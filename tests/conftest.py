"""Shared helpers for the tests."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """L2 norm of the difference over the L2 norm of the reference ``b`` (DESIGN.md)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def max_rel_err(xs, refs) -> float:
    """Largest :func:`rel_err` over matching tensors."""
    xs, refs = list(xs), list(refs)
    assert len(xs) == len(refs)
    return max(rel_err(a, b) for a, b in zip(xs, refs, strict=True))
