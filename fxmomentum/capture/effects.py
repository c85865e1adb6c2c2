"""What a graph node does besides computing its value: writes in place, draws random numbers,
updates a module's state. Such a node cannot run twice, or at another point, without changing
what the model computes.

Examples
--------
>>> import torch
>>> from torch import fx, nn
>>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
>>> [side_effect(n, dict(gm.named_modules())) for n in gm.graph.nodes][1:3]
[None, 'calls `1`, which draws random numbers or updates its state']
"""

from __future__ import annotations

import operator
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from .factories import python_random

__all__ = ["is_inplace", "side_effect"]

#: torch functions that draw random numbers.
_RANDOM_FUNCTIONS = frozenset(
    {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like,
     torch.randint_like, torch.randperm, torch.bernoulli, torch.multinomial, torch.normal,
     torch.poisson, torch.dropout, torch.alpha_dropout, torch.feature_alpha_dropout,
     F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
     F.feature_alpha_dropout, F.rrelu, python_random}
)  # fmt: skip
#: Tensor methods that draw random numbers (and do not end in ``_``).
_RANDOM_METHODS = frozenset({"bernoulli", "multinomial"})
#: Modules that draw random numbers or update their state when called.
_STATEFUL_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd, nn.RReLU, nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)  # fmt: skip


def is_inplace(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node`` writes into one of its arguments (``x.add_(y)``, ``x += y``,
    ``F.relu(x, inplace=True)``, a module built with ``inplace=True``)."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.kwargs.get("inplace") is True or (name.endswith("_") and not name.startswith("_")):
            return True
        return node.target in (operator.iadd, operator.imul, operator.isub, operator.itruediv)
    if node.op == "call_module":
        return getattr(modules.get(str(node.target)), "inplace", False) is True
    return False


def side_effect(node: fx.Node, modules: Mapping[str, nn.Module]) -> str | None:
    """What ``node`` does besides computing its value, in words (``"draws random numbers"``),
    or None.

    Parameters
    ----------
    node : torch.fx.Node
    modules : mapping of str to nn.Module
        The graph owner's modules by path.
    """
    if is_inplace(node, modules):
        return "changes a tensor in place"
    if node.op == "call_function" and node.target in _RANDOM_FUNCTIONS:
        return "draws random numbers"
    if node.op == "call_method" and node.target in _RANDOM_METHODS:
        return "draws random numbers"
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if module is not None and any(isinstance(m, _STATEFUL_MODULES) for m in module.modules()):
            return f"calls `{node.target}`, which draws random numbers or updates its state"
    return None
