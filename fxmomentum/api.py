"""convert, inspect, set_gamma: capture -> match -> rewrite -> report.

Examples
--------
>>> import torch, torchvision, fxmomentum
>>> model = torchvision.models.resnet18()
>>> gm, report = fxmomentum.convert(model, gamma=0.9, example_inputs=torch.randn(1, 3, 64, 64),
...                                 return_report=True)
>>> [c.num_blocks for c in report.chains]
[2, 1, 1, 1]
>>> gm.state_dict().keys() == model.state_dict().keys()
True
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .capture import Capture, capture
from .chain import MomentumChain
from .exact import quantize_gamma
from .match import Chain, MatchResult, find_chains
from .report import ChainInfo, ConversionReport, chain_info, estimate_saved_bytes
from .rewrite import chain_names, rewrite, top_graph

__all__ = ["convert", "inspect", "set_gamma"]

#: A momentum for all chains, per chain (keys: chain index, attribute name, or module path /
#: glob pattern matched against the chain's block paths), or a function of the chain.
GammaSpec = float | Mapping[Any, Any] | Callable[..., Any]


def _check_gamma(value: Any, use_backprop: bool, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"gamma {where} must be a number, got {value!r}")
    n = quantize_gamma(float(value))  # raises for values outside [0, 1]
    if n == 0 and not use_backprop:
        raise ValueError(
            f"gamma {where} is {value!r}: a reversible chain (use_backprop=False) cannot be run "
            f"backwards at gamma = 0, since the inverse divides by gamma. Use "
            f"use_backprop=True (gamma = 0 is the original model), or a gamma > 0."
        )
    return float(value)


def _matches(key: str, paths: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(p, key) or p == key or p.startswith(key + ".") for p in paths)


def _lookup(table: Mapping[Any, Any], index: int, name: str, paths: Sequence[str]) -> Any:
    """The dict entry for a chain: by index, attribute name, then module path / pattern."""
    if index in table:
        return table[index]
    if name in table:
        return table[name]
    for key, value in table.items():
        if isinstance(key, str) and _matches(key, paths):
            return value
    return None


@dataclass
class _Plan:
    capture: Capture
    match: MatchResult
    infos: list[ChainInfo]
    chosen: list[Chain]
    gammas: list[float]
    names: list[str]


def _plan(
    root: nn.Module,
    gamma: GammaSpec,
    *,
    example_inputs: Any,
    use_backprop: bool,
    min_blocks: int,
    include: Any,
    exclude: Any,
    cost_model: bool,
    leaf_modules: Iterable[str | type] | None,
    concrete_args: dict[str, Any] | None,
) -> _Plan:
    if not isinstance(root, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(root).__name__}")
    if isinstance(min_blocks, bool) or not isinstance(min_blocks, int) or min_blocks < 1:
        raise ValueError(f"min_blocks must be an integer >= 1, got {min_blocks!r}")
    if isinstance(gamma, (int, float)):
        _check_gamma(gamma, use_backprop, "")
    elif not (isinstance(gamma, Mapping) or callable(gamma)):
        raise TypeError(f"gamma must be a number, a dict or a callable, got {type(gamma).__name__}")

    cap = capture(root, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args)
    modules = dict(root.named_modules())
    result = find_chains(
        cap.graph, modules, include=include, exclude=exclude, min_blocks=min_blocks
    )
    infos = [chain_info(c, modules) for c in result.chains]
    selected = [(c, i) for c, i in zip(result.chains, infos, strict=True) if c.selected]
    names = chain_names(root, len(selected))
    chosen, gammas, chosen_names = [], [], []
    if cost_model and not cap.shapes_verified:
        cap.notes.append("cost_model needs shapes (example_inputs): every chain is converted")
    for k, (chain, info) in enumerate(selected):
        name = names[k]
        paths = [b.path for b in info.blocks]
        if isinstance(gamma, Mapping):
            value = _lookup(gamma, k, name, paths)
        elif callable(gamma) and not isinstance(gamma, (int, float)):
            value = gamma(info)
        else:
            value = gamma
        if value is None:
            info.reason = "no gamma given for this chain"
            continue
        value = _check_gamma(value, use_backprop, f"for chain {k} ({info.first})")
        saved = estimate_saved_bytes(chain, value, use_backprop)
        info.saved_bytes = saved
        if cost_model and saved is not None and saved <= 0 and not use_backprop:
            info.reason = "cost model: the reversible state would not be smaller than what it saves"
            continue
        info.name = name
        info.converted = True
        info.gamma = value
        chosen.append(chain)
        gammas.append(value)
        chosen_names.append(info.name)
    return _Plan(cap, result, infos, chosen, gammas, chosen_names)


def _report(plan: _Plan, use_backprop: bool, nodes_after: int, code_after: str) -> ConversionReport:
    cap = plan.capture
    return ConversionReport(
        model=type(cap.root).__name__,
        chains=plan.infos,
        skipped=list(plan.match.skipped),
        leaves=list(cap.leaves),
        nodes_before=len(cap.graph.nodes),
        nodes_after=nodes_after,
        shapes_verified=cap.shapes_verified,
        code_before=cap.graph_module.code,
        code_after=code_after,
        use_backprop=use_backprop,
        notes=list(cap.notes),
    )


def convert(
    model: nn.Module,
    gamma: GammaSpec = 0.9,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    use_backprop: bool = False,
    min_blocks: int = 1,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    cost_model: bool = False,
    return_report: bool = False,
    leaf_modules: Iterable[str | type] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule | tuple[fx.GraphModule, ConversionReport]:
    """Turn the residual chains of ``model`` into momentum chains.

    Each chain ``x <- x + f_t(x)`` becomes ``v <- gamma * v + (1 - gamma) * f_t(x);
    x <- x + v`` (a :class:`~fxmomentum.MomentumChain`). ``model`` is left untouched: the
    result works on a deep copy, keeps its module tree and ``state_dict`` keys, and loads the
    original's weights (``gm.load_state_dict(model.state_dict())``) and vice versa.

    Parameters
    ----------
    model : nn.Module
        Any module torch.fx can trace; untraceable submodules are kept whole.
    gamma : float, dict or callable
        Momentum in ``[0, 1]``. A dict gives it per chain, keyed by chain index, attribute
        name (``"momentum_chain_0"``) or module path / glob pattern (``"layer3"``); chains it
        does not name are not converted. A callable receives the chain's
        :class:`~fxmomentum.report.ChainInfo` and returns a gamma, or None to skip the chain.
    example_inputs : Tensor or tuple of Tensor, optional
        Inputs to check shapes and dtypes on (and to estimate memory). Without them the
        structure is still found; the report says shapes are unverified.
    use_backprop : bool
        ``False``: the reversible function (activations rebuilt in backward, not stored).
        ``True``: plain autograd; with ``gamma = 0`` it computes exactly what ``model`` does.
    min_blocks : int
        Leave chains with fewer blocks as they are.
    include, exclude : str or iterable of str, optional
        Module paths or glob patterns of the blocks to convert / to leave alone.
    cost_model : bool
        Convert a chain only if its estimated memory saving is positive.
    return_report : bool
        Also return the :class:`~fxmomentum.report.ConversionReport`.
    leaf_modules : iterable of str or type, optional
        Submodule paths or classes to keep whole (not traced into).
    concrete_args : dict, optional
        For torch.fx: values of ``forward`` arguments that steer control flow.

    Returns
    -------
    torch.fx.GraphModule, or (GraphModule, ConversionReport) with ``return_report=True``.

    Examples
    --------
    >>> from torch import nn
    >>> class MLP(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fs = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4))
    ...     def forward(self, x):
    ...         for f in self.fs:
    ...             x = x + f(x)
    ...         return x
    >>> gm = convert(MLP(), gamma=0.9)
    >>> print(gm.code.strip().splitlines()[-2].strip())
    momentum_chain_0 = self.momentum_chain_0(x);  x = None
    """
    root = copy.deepcopy(model)
    plan = _plan(
        root,
        gamma,
        example_inputs=example_inputs,
        use_backprop=use_backprop,
        min_blocks=min_blocks,
        include=include,
        exclude=exclude,
        cost_model=cost_model,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
    )
    gm = rewrite(root, plan.capture.graph, plan.chosen, plan.gammas, use_backprop=use_backprop)
    if not return_report:
        return gm
    report = _report(plan, use_backprop, len(gm.graph.nodes), gm.code)
    return gm, report


def inspect(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    gamma: GammaSpec = 0.9,
    use_backprop: bool = False,
    min_blocks: int = 1,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    cost_model: bool = False,
    leaf_modules: Iterable[str | type] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> ConversionReport:
    """What :func:`convert` would do with the same options, without building the result.

    Examples
    --------
    >>> import torchvision
    >>> report = inspect(torchvision.models.resnet50())
    >>> [c.num_blocks for c in report.chains], len(report.skipped)
    ([2, 3, 5, 2], 4)
    """
    root = copy.deepcopy(model)
    plan = _plan(
        root,
        gamma,
        example_inputs=example_inputs,
        use_backprop=use_backprop,
        min_blocks=min_blocks,
        include=include,
        exclude=exclude,
        cost_model=cost_model,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
    )
    graph = top_graph(plan.capture.graph, plan.chosen, plan.names)
    code = graph.python_code(root_module="self").src
    return _report(plan, use_backprop, len(graph.nodes), code)


def set_gamma(model: nn.Module, gamma: GammaSpec) -> dict[str, float]:
    """Change the momentum of the chains of a converted model, without converting again.

    Parameters
    ----------
    model : nn.Module
        A model returned by :func:`convert` (any module holding
        :class:`~fxmomentum.MomentumChain` submodules).
    gamma : float, dict or callable
        One value for every chain; a dict keyed by chain index (order of ``named_modules``),
        attribute name or block path / glob pattern (chains it does not name keep their
        gamma); or a callable ``gamma(name, chain) -> float | None``.

    Returns
    -------
    dict of str to float
        The chains changed and their new gamma.

    Examples
    --------
    >>> from torch import nn
    >>> class Res(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.f = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return x + self.f(x)
    >>> gm = convert(Res(), gamma=0.9)
    >>> set_gamma(gm, 0.5)
    {'momentum_chain_0': 0.5}
    """
    chains = [(n, m) for n, m in model.named_modules() if isinstance(m, MomentumChain)]
    changed: dict[str, float] = {}
    for k, (name, chain) in enumerate(chains):
        if isinstance(gamma, Mapping):
            value = _lookup(gamma, k, name, [p.split("#")[0] for p in chain.names])
        elif callable(gamma):
            value = gamma(name, chain)
        else:
            value = gamma
        if value is None:
            continue
        value = _check_gamma(value, chain.use_backprop, f"for {name}")
        chain.gamma = value
        changed[name] = value
    return changed
