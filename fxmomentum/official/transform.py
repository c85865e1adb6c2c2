"""transform_to_momentumnet: the official library's conversion, without breaking the parent.

The official library replaces a list of layers by one MomentumNet module, which renames every
``state_dict`` key and breaks parents that call their layers one by one (``nn.TransformerEncoder``
reads ``self.layers[0].self_attn``; its loop passes masks to each layer). Here each layer stays
where it is, under its own name and with its own attributes; only its class is swapped for a
subclass whose ``forward`` advances a momentum chain shared by the layers of the list. Whatever
calls the layers (``nn.Sequential``, a parent's ``for`` loop) keeps working, with its arguments.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..classes import derived_class
from ..engine import (
    BlockArguments,
    ChainRun,
    ChainSpec,
    GammaSetting,
    run_block,
    start_run,
    validate_gamma,
)
from .layers import split_layer

__all__ = ["LayerChain", "transform_to_momentumnet"]


class _OriginalForward:
    """Calls a swapped layer's original ``forward``; exposes its parameters and buffers."""

    def __init__(self, layer: nn.Module, base: type) -> None:
        self.layer, self.base = layer, base

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base.forward(self.layer, *args, **kwargs)

    def parameters(self):
        return self.layer.parameters()

    def buffers(self):
        return self.layer.buffers()


class LayerChain(GammaSetting):
    """The momentum chain formed by a list of layers that their parent calls one by one.

    Layer ``t`` of the chain must be called after layer ``t - 1`` within one forward; calling
    layer 0 starts a new pass. Not an ``nn.Module``: the layers stay registered in their
    parent, so ``state_dict`` keys do not change. :attr:`passes` counts the passes run to the
    last layer.

    Parameters
    ----------
    layers : sequence of nn.Module
        The chain's layers, already swapped to their momentum classes.
    gamma : float
        Momentum in ``[0, 1]``.
    use_backprop : bool
        ``False`` trains through the reversible function.
    is_residual : bool
        ``True``: a layer returns ``f(x)``; ``False``: it returns ``x + f(x)`` (or a function of
        it), and ``f(x) = layer(x) - x``.
    name : str
        Path of the layer list, for messages.
    split_layers : bool
        Layers of a known type (:func:`fxmomentum.official.layers.split_layer`: torch's transformer
        layers) become their two or three residual blocks instead of one block each.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        gamma: float,
        use_backprop: bool,
        is_residual: bool,
        name: str,
        split_layers: bool = False,
    ) -> None:
        self.use_backprop = bool(use_backprop)
        self.gamma = gamma
        self.name = name
        self.splits = [
            split_layer(layer, _base_class(type(layer))) if split_layers else None
            for layer in layers
        ]
        self.blocks: list = []
        self.residual: list[bool] = []
        self.names: list[str] = []
        self.offsets: list[int] = []
        for i, (layer, split) in enumerate(zip(layers, self.splits, strict=True)):
            self.offsets.append(len(self.blocks))
            if split is None:
                self.blocks.append(_OriginalForward(layer, _base_class(type(layer))))
                self.residual.append(bool(is_residual))
                self.names.append(f"{name}.{i}")
            else:
                self.blocks.extend(split.blocks)
                self.residual.extend(b.residual for b in split.blocks)
                self.names.extend(f"{name}.{i} (block {j})" for j in range(len(split.blocks)))
        self.num_layers = len(layers)
        self.passes = 0
        self._reset()

    def _reset(self) -> None:
        self._next = 0
        self._run: ChainRun | None = None
        self._v: torch.Tensor | None = None
        self._out: torch.Tensor | None = None  # the last layer's output, the next one's input

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_next=0, _run=None, _v=None, _out=None)
        return state

    def _check_input(self, i: int, x: torch.Tensor) -> None:
        """Layer ``i > 0`` must get layer ``i - 1``'s output itself: the chain's state ``v``
        (and, reversible, its exact ``x``) continues from that output, not from another value."""
        if x is self._out:
            return
        self._reset()
        raise RuntimeError(
            f"layer {i} of the momentum chain {self.name!r} was not given the output of layer "
            f"{i - 1}: the parent changed x between the layers (as `x = x + layer(x)` does). The "
            f"parent must pass each layer's output to the next unchanged, `x = layer(x, ...)`; "
            f"is_residual only says whether a layer returns f(x) (True) or x + f(x) (False). "
            f"Change the parent's code, or use fxmomentum.convert(model), which converts the "
            f"residual additions written in the parent's code."
        )

    def step(self, i: int, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Advance the chain through layer ``i``."""
        if i == 0:
            self._reset()
        elif i != self._next:
            expected = self._next
            self._reset()
            raise RuntimeError(
                f"layer {i} of the momentum chain {self.name!r} was called after layer "
                f"{expected - 1}: the layers of a momentum chain must run in order, each once "
                f"per forward. Convert only lists whose layers the model calls in sequence."
            )
        else:
            self._check_input(i, x)
        spec = ChainSpec(self.blocks, self.residual, self._gamma_num, self.names)
        if i == 0 and not self.use_backprop and _needs_backward(x, args, kwargs, self.blocks):
            self._run = start_run(spec, x)
        split = self.splits[i]
        per_block = [(args, kwargs)] if split is None else split.arguments(x, *args, **kwargs)
        for j, (a, k) in enumerate(per_block):
            t = self.offsets[i] + j
            if self._run is not None:
                x = run_block(self._run, t, x, None, BlockArguments(a, k))
            else:
                x, self._v = spec.plain_step(t, x, self._v, a, k)
        self._next = i + 1
        self._out = x
        if self._next == self.num_layers:
            self._reset()
            self.passes += 1
        return x


class _CallCheck:
    """Forward hooks on the module that calls a chain's layers: after each of its forwards,
    the chain must have run through all its layers (a parent that reaches its layers some
    other way would leave the chain silently unused, or half run)."""

    def __init__(self, chain: LayerChain, where: str) -> None:
        self.chain, self.where = chain, where
        self.start = 0

    def before(self, module: nn.Module, args: tuple) -> None:
        self.start = self.chain.passes

    def after(self, module: nn.Module, args: tuple, output: Any) -> None:
        chain = self.chain
        ran = chain._next
        if ran:
            chain._reset()
            raise RuntimeError(
                f"{self.where} ran only the first {ran} of the {chain.num_layers} layers of the "
                f"momentum chain {chain.name!r}: the layers of a momentum chain must all run, "
                f"in order, once per forward. Convert only lists whose layers the model calls "
                f"in sequence."
            )
        if chain.passes == self.start:
            raise RuntimeError(
                f"{self.where} ran without calling the layers of the momentum chain "
                f"{chain.name!r}, so the chain did nothing. transform_to_momentumnet needs a "
                f"parent that calls each layer of the list, x = layer(x, ...), in order; this "
                f"one reaches them some other way. fxmomentum.convert(model) finds residual "
                f"blocks in the parent's code instead."
            )


def _needs_backward(x: torch.Tensor, args: tuple, kwargs: dict, blocks) -> bool:
    # Under torch.export (and torch.onnx.export, dynamo=True) the plain chain is traced: the
    # reversible function's state checks depend on the data, which export cannot trace.
    if not torch.is_grad_enabled() or torch.compiler.is_exporting():
        return False
    leaves = [x, *args, *kwargs.values()]
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in leaves):
        return True
    return any(p.requires_grad for b in blocks for p in b.parameters())


class _MomentumLayer:
    """Mixin placed before a layer's own class: routes ``forward`` through its LayerChain."""

    #: The name of the derived class (see fxmomentum.classes.derived_class).
    derived_name = "MomentumLayer[{}]"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        chain: LayerChain = self.__dict__["_momentum_chain"]
        return chain.step(self.__dict__["_momentum_index"], x, args, kwargs)


def _momentum_class(base: type) -> type:
    """The subclass ``(_MomentumLayer, base)``, made once and picklable by name."""
    if issubclass(base, _MomentumLayer):
        return base
    return derived_class(_MomentumLayer, base)


def _base_class(cls: type) -> type:
    return cls.__mro__[2] if issubclass(cls, _MomentumLayer) else cls


def _has_forward(layer: nn.Module) -> bool:
    return _base_class(type(layer)).forward is not nn.Module.forward


def _expression(path: str) -> str:
    """Python for the submodule at ``path`` of ``model``."""
    if not path:
        return "model"
    if all(part.isidentifier() for part in path.split(".")):
        return f"model.{path}"
    return f"model.get_submodule({path!r})"


def transform_to_momentumnet(
    model: nn.Module,
    sub_layers: Sequence[str] = ("layer1", "layer2", "layer3", "layer4"),
    keep_first_layer: bool = True,
    gamma: float = 0.9,
    use_backprop: bool = False,
    is_residual: bool = False,
    *,
    split_layers: bool = False,
) -> nn.Module:
    """Turn lists of layers into Momentum ResNet chains (the official library's API).

    Each module of each named list is one block: ``f = layer(x) - x`` when ``is_residual`` is
    False (the layer computes ``x + f(x)`` itself, as a torchvision block or a transformer layer
    does), ``f = layer(x)`` when True. ``keep_first_layer`` leaves each list's first module out
    of the chain (a stage's first ResNet block changes the shape). Everything else of the model
    keeps working: its forward, the arguments it passes to each layer (masks, memory), its
    attributes and its ``state_dict`` keys. The model itself is not modified.

    The model must call each layer of a list, ``x = layer(x, ...)``, in order, once per
    forward. An entry with no ``forward`` of its own (an ``nn.ModuleList`` of sub-layers, as in
    vit_pytorch's ``ViT``) is refused here; a module that owns a list and then, in a forward,
    calls its layers out of order, only some of them, or none (reaching them some other way)
    raises a ``RuntimeError`` at the end of that forward, instead of leaving the chain silently
    unused or half run. :func:`fxmomentum.convert` finds residual blocks written in a parent's
    own code instead.

    Parameters
    ----------
    model : nn.Module
        The model.
    sub_layers : sequence of str
        Paths of ``nn.Sequential`` / ``nn.ModuleList`` containers whose entries are layers
        (modules with a ``forward``).
    keep_first_layer : bool
        Leave each container's first layer outside its chain.
    gamma : float
        Momentum in ``[0, 1]``.
    use_backprop : bool
        ``False`` trains through the reversible function (needs ``gamma > 0``).
    is_residual : bool
        See above.
    split_layers : bool
        Make torch's transformer layers two (encoder) or three (decoder) residual blocks each
        rather than one, so that backward recomputes less at a time. Not in the official API.

    Returns
    -------
    nn.Module
        A converted copy of ``model``.

    Raises
    ------
    ValueError
        A path is not a submodule, or an entry of a list cannot be a layer of a chain.

    Examples
    --------
    >>> from torchvision.models import resnet18
    >>> mresnet = transform_to_momentumnet(resnet18(), gamma=0.9, use_backprop=False)
    >>> mresnet(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 1000])
    """
    validate_gamma(gamma, reversible=not use_backprop)
    if isinstance(sub_layers, str):
        sub_layers = [sub_layers]
    model = copy.deepcopy(model)
    for path in sub_layers:
        try:
            container = model.get_submodule(path)
        except AttributeError as err:
            raise ValueError(f"sub_layers: the model has no submodule {path!r}") from err
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            raise TypeError(
                f"sub_layers: {path!r} is a {type(container).__name__}; name an nn.Sequential or "
                f"nn.ModuleList whose layers form the chain"
            )
        entries = list(container._modules.items())[1 if keep_first_layer else 0 :]
        layers = [layer for _, layer in entries]
        if not layers:
            continue
        owner = path.rpartition(".")[0]
        for name, layer in entries:
            if not isinstance(layer, nn.Module):
                raise TypeError(f"{path!r} holds a {type(layer).__name__}, not a module")
            if not _has_forward(layer):
                raise ValueError(
                    f"sub_layers: {path}.{name} is a {type(layer).__name__}, which has no "
                    f"forward of its own: the model never calls it (it iterates over it, or "
                    f"calls what it holds), so a momentum chain over {path!r} would never run. "
                    f"Each entry of {path!r} must be a layer the model calls as "
                    f"x = layer(x). To convert residual blocks written in the parent's code "
                    f"(x = attn(x) + x; x = ff(x) + x), use "
                    f"fxmomentum.convert({_expression(owner)}); or name in sub_layers a list "
                    f"whose entries are such layers."
                )
        if len({id(layer) for layer in layers}) != len(layers):
            raise ValueError(
                f"{path!r} holds the same module object twice; give each position its own "
                f"module, or use fxmomentum.MomentumNet, which supports tied blocks"
            )
        for layer in layers:
            layer.__class__ = _momentum_class(type(layer))
        chain = LayerChain(layers, gamma, use_backprop, is_residual, path, split_layers)
        for i, layer in enumerate(layers):
            layer.__dict__["_momentum_chain"] = chain
            layer.__dict__["_momentum_index"] = i
        parent = model.get_submodule(owner)
        where = f"{type(parent).__name__}.forward" + (f" ({owner!r})" if owner else "")
        check = _CallCheck(chain, where)
        parent.register_forward_pre_hook(check.before)
        parent.register_forward_hook(check.after)
    return model
