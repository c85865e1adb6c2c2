"""convert, inspect, set_gamma: the library's entry points.

Each builds a :class:`~fxmomentum.surgery.ConvertOptions` and runs the pipeline of
:mod:`fxmomentum.surgery.conversion` (capture -> match -> choose -> rewrite -> report) on a
deep copy of the model.

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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .engine import MomentumChain, validate_gamma
from .paths import join_path
from .surgery import ConversionReport, ConvertOptions, GammaSpec
from .surgery.conversion import (
    ConversionError,
    Note,
    build,
    check_model,
    failure_on,
    make_report,
    predicted_graphs,
    prepare,
)
from .surgery.options import lookup

__all__ = ["convert", "inspect", "set_gamma"]


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
    memory_budget: float | None = None,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Turn the residual chains of ``model`` into momentum chains.

    Each chain ``x <- x + f_t(x)`` becomes ``v <- gamma * v + (1 - gamma) * f_t(x);
    x <- x + v`` (a :class:`~fxmomentum.MomentumChain`). ``model`` is left untouched: the
    result works on a deep copy, keeps its module tree and ``state_dict`` keys, and loads the
    original's weights (``gm.load_state_dict(model.state_dict())``) and vice versa.

    When torch.fx cannot trace ``model.forward`` itself (shape unpacking, data-dependent
    control flow, einops), its code stays as it is and conversion descends: each child is
    captured as a graph if it can be, else its own children, and so on; the same happens
    inside submodules that a captured graph keeps opaque. The result is then a copy of
    ``model``'s own class with converted GraphModules in place of the submodules whose graphs
    hold chains. With ``example_inputs``, the whole model runs once first and each submodule
    is traced as its parent called it: arguments that were None, flags or numbers are fixed
    (the graph checks them at run time), and the graph must return what the module returned.

    Parameters
    ----------
    model : nn.Module
        Any module; the parts torch.fx cannot trace are kept whole (see above).
    gamma : float, dict or callable
        Momentum in ``[0, 1)``. A dict gives it per chain, keyed by chain index, attribute
        name (``"momentum_chain_0"``) or module path / glob pattern (``"layer3"``); chains it
        does not name are not converted. A callable receives the chain's
        :class:`~fxmomentum.surgery.ChainInfo` and returns a gamma, or None to skip the chain.
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
        Also return the :class:`~fxmomentum.surgery.ConversionReport`.
    leaf_modules : iterable of str or type, optional
        Submodule paths or classes to keep whole (not traced into).
    concrete_args : dict, optional
        For torch.fx: values of ``forward`` arguments that steer control flow.
    memory_budget : float, optional
        Plan every region's execution for the fastest training step whose activation memory
        is at most this fraction of the original model's (0: the least memory the model can
        reach; 1: the fastest that uses no more than the original; as torch.compile's
        ``activation_memory_budget``). Chains are
        run reversibly, recomputed block by block or kept; the rest of the graph is
        recomputed or kept, by segments. The outputs and gradients are those of the
        conversion with this gamma whatever the plan (to rounding); with ``gamma = 0`` or
        ``use_backprop=True`` only recompute and keep are used, so the model stays exactly the
        original. Needs ``example_inputs``: the costs are measured on them. The report's
        ``plan`` shows each region's strategy and the estimates. None (the default): every
        chosen chain reversible (or as ``use_backprop`` says), the rest kept.

    Returns
    -------
    torch.fx.GraphModule, or a copy of ``model``'s class when its ``forward`` cannot be
    traced; with ``return_report=True``, a tuple (module, ConversionReport). The report's
    chains and opaque modules carry full module paths of ``model``; its notes say which
    submodules were captured as graphs.

    Raises
    ------
    fxmomentum.capture.CaptureError
        If neither ``model.forward`` nor any submodule that may hold a chain can be traced.
    fxmomentum.surgery.conversion.ConversionError
        If the converted model fails on ``example_inputs`` although every captured graph that
        failed was left as it was (never returned: such a model would fail when called).

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

    A model whose own ``forward`` torch.fx cannot trace:

    >>> class Wrapper(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body = MLP()
    ...     def forward(self, x):
    ...         if x.dim() == 3:  # control flow on a traced value
    ...             x = x.flatten(0, 1)
    ...         return self.body(x)
    >>> net, report = convert(Wrapper(), gamma=0.9, example_inputs=torch.randn(2, 8),
    ...                       return_report=True)
    >>> type(net).__name__, type(net.body).__name__, report.chains[0].name
    ('Wrapper', 'MLP', 'body.momentum_chain_0')
    """
    options = ConvertOptions(
        gamma=gamma,
        use_backprop=use_backprop,
        min_blocks=min_blocks,
        include=include,
        exclude=exclude,
        cost_model=cost_model,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
        memory_budget=memory_budget,
    )
    check_model(model)
    conversion = prepare(copy.deepcopy(model), options, example_inputs)
    result, graphs = build(conversion)
    failure = failure_on(result, _arguments(example_inputs))
    if failure:
        original = failure_on(model, _arguments(example_inputs))
        if original:
            # Inputs the original itself refuses say nothing about the conversion.
            failure = None
            conversion.notes.append(
                Note("", f"example_inputs fail on the original model too ({original}): the "
                     "converted model could not be checked on them")
            )  # fmt: skip
    if failure and conversion.whole:
        # The model's own graph fails: its Python code stays, its submodules are converted.
        whole = f"its converted graph fails on example_inputs: {failure}"
        conversion = prepare(copy.deepcopy(model), options, example_inputs, whole=whole)
        result, graphs = build(conversion)
        failure = failure_on(result, _arguments(example_inputs))
    if failure:
        raise ConversionError(
            f"the converted {type(model).__name__} fails on the example inputs it was converted "
            f"with ({failure}); fxmomentum returns no such model. Leave the failing part out "
            f"with exclude=... or leaf_modules=..., and report the model"
        )
    if not return_report:
        return result
    return result, make_report(conversion, graphs)


def _arguments(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


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
    memory_budget: float | None = None,
) -> ConversionReport:
    """What :func:`convert` would do with the same options, without building the result.

    Examples
    --------
    >>> import torchvision
    >>> report = inspect(torchvision.models.resnet50())
    >>> [c.num_blocks for c in report.chains], len(report.skipped)
    ([2, 3, 5, 2], 4)
    """
    options = ConvertOptions(
        gamma=gamma,
        use_backprop=use_backprop,
        min_blocks=min_blocks,
        include=include,
        exclude=exclude,
        cost_model=cost_model,
        leaf_modules=leaf_modules,
        concrete_args=concrete_args,
        memory_budget=memory_budget,
    )
    check_model(model)
    conversion = prepare(copy.deepcopy(model), options, example_inputs)
    return make_report(conversion, predicted_graphs(conversion))


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
            owner = name.rpartition(".")[0]  # block names are relative to the chain's owner
            paths = [join_path(owner, p.split("#")[0]) for p in chain.names]
            value = lookup(gamma, k, name, paths)
        elif callable(gamma):
            value = gamma(name, chain)
        else:
            value = gamma
        if value is None:
            continue
        validate_gamma(value, reversible=not chain.use_backprop, where=f" for {name}")
        chain.gamma = float(value)
        changed[name] = float(value)
    return changed
