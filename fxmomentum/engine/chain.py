"""MomentumChain: the module a converted graph calls for each residual chain."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .exact import GAMMA_DENOM, validate_gamma
from .fsdp import in_units
from .function import reversible_chain
from .recompute import needs_backward, recomputed_chain
from .saved_ops import SavedOps
from .spec import BlockArguments, ChainSpec

__all__ = ["STRATEGIES", "GammaSetting", "MomentumChain"]

#: How a chain runs in training: ``"reversible"`` (nothing kept inside the chain, its
#: activations rebuilt in closed form), ``"recompute"`` (each block keeps its input ``x``, as
#: checkpointing the original block does, and is recomputed in backward) or ``"keep"`` (plain
#: autograd). The three compute the same function (to rounding).
STRATEGIES = ("reversible", "recompute", "keep")


class GammaSetting:
    """``gamma`` as given, validated for the strategy, and the numerator every strategy
    computes with.

    Needs ``use_backprop`` set before ``gamma`` is.
    """

    _gamma: float
    _gamma_num: int

    @property
    def use_backprop(self) -> bool:
        """Whether the chain runs without the reversible backward."""
        return self.strategy != "reversible"

    @use_backprop.setter
    def use_backprop(self, value: bool) -> None:
        self.strategy = "keep" if value else "reversible"

    @property
    def gamma(self) -> float:
        """The momentum term as given; the chain computes with :attr:`effective_gamma`."""
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self._gamma_num = validate_gamma(value, reversible=not self.use_backprop)
        self._gamma = float(value)


class MomentumChain(GammaSetting, nn.Module):
    """Blocks ``f_t`` run as a momentum chain.

    ``v <- gamma * v + (1 - gamma) * f_t(x); x <- x + v``, with ``v`` starting at ``v0``
    (zero by default). ``gamma = 0`` is the plain residual chain ``x <- x + f_t(x)``.

    Parameters
    ----------
    blocks : sequence of callables
        ``blocks[t](x, *args)`` gives ``f_t(x)`` (``residual=True``) or the block's whole
        output ``y`` with ``f_t(x) = y - x`` (``residual=False``).
    gamma : float
        Momentum in ``[0, 1]``; used as the nearest multiple of ``2**-16``, in every mode.
    residual : bool or sequence of bool
        Per block, or one value for all.
    use_backprop : bool
        ``True``: plain autograd (stores activations). ``False``: the reversible function,
        which rebuilds activations in backward instead of storing them.
    strategy : {"reversible", "recompute", "keep"}, optional
        How the chain runs in training (see :data:`STRATEGIES`); ``use_backprop`` is
        ``strategy != "reversible"``. By default ``"keep"`` with ``use_backprop`` and
        ``"reversible"`` without.
    register_blocks : bool
        Register the blocks as submodules (``blocks.0...``). A converted graph passes
        ``False``: it keeps the blocks at their original paths so that ``state_dict`` keys stay.
    names : sequence of str, optional
        Block names used in error messages.
    reads : sequence of sequence of int, optional
        Per block, the positions of ``args`` it reads (a converted graph knows them); by
        default every block may read every argument. Only the tensors a block reads get their
        gradients from its node, so a parameter passed in ``args`` has its gradient
        accumulated as soon as its block has gone backward.
    plain_modes : sequence of {"train", "eval"}
        Modes in which the chain runs with plain autograd whatever its strategy: its blocks'
        modules keep tensors between calls in those modes (timm's LeViT caches its attention
        biases in eval mode), which a recomputation in backward would read instead of
        computing them again (:mod:`fxmomentum.engine.state`).
    saved_ops : sequence of (SavedOps or None), optional
        Per block, outputs of its heavy operators that its forward keeps so that its
        recomputation (``"reversible"`` and ``"recompute"``) skips those operators
        (:mod:`fxmomentum.engine.saved_ops`; the memory planner chooses them). The chain
        computes the same bits with or without them.
    recompute_span : int
        With ``strategy="recompute"``: blocks recomputed as one segment, which keeps its input
        ``x`` (and ``v`` at gamma > 0) where each block on its own keeps its ``x``; the memory
        planner chooses it (2 for a transformer layer's two residual blocks checkpointed as
        one). Not with ``saved_ops``.

    Examples
    --------
    >>> blocks = [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4)]
    >>> chain = MomentumChain(blocks, gamma=0.9)
    >>> chain(torch.randn(2, 8)).shape
    torch.Size([2, 8])
    """

    def __init__(
        self,
        blocks: Sequence[Callable[..., torch.Tensor]],
        gamma: float = 0.9,
        *,
        residual: bool | Sequence[bool] = True,
        use_backprop: bool = False,
        strategy: str | None = None,
        register_blocks: bool = True,
        names: Sequence[str] | None = None,
        reads: Sequence[Sequence[int]] | None = None,
        plain_modes: Sequence[str] = (),
        saved_ops: Sequence[SavedOps | None] | None = None,
        recompute_span: int = 1,
    ) -> None:
        super().__init__()
        blocks = list(blocks)
        if not blocks:
            raise ValueError("a momentum chain needs at least one block")
        if isinstance(residual, bool):
            residual = [residual] * len(blocks)
        if len(residual) != len(blocks):
            raise ValueError(f"{len(residual)} residual flags for {len(blocks)} blocks")
        strategy = strategy or ("keep" if use_backprop else "reversible")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.strategy = strategy
        self.gamma = gamma
        self.residual = [bool(r) for r in residual]
        default_names = [f"block {t}" for t in range(len(blocks))]
        self.names = list(names) if names is not None else default_names
        if reads is not None and len(reads) != len(blocks):
            raise ValueError(f"{len(reads)} reads for {len(blocks)} blocks")
        self.reads = [tuple(r) for r in reads] if reads is not None else None
        unknown = set(plain_modes) - {"train", "eval"}
        if unknown:
            raise ValueError(f"plain_modes are 'train' and 'eval', got {sorted(unknown)}")
        self.plain_modes = tuple(sorted(plain_modes))
        if saved_ops is not None and len(saved_ops) != len(blocks):
            raise ValueError(f"{len(saved_ops)} saved_ops for {len(blocks)} blocks")
        self.saved_ops = list(saved_ops) if saved_ops is not None and any(saved_ops) else None
        if int(recompute_span) < 1 or (recompute_span > 1 and self.saved_ops):
            raise ValueError(
                f"recompute_span must be a positive int, and 1 with saved_ops; got "
                f"{recompute_span!r}"
            )
        self.recompute_span = int(recompute_span)
        if register_blocks:
            self.blocks = nn.ModuleList(blocks)
        else:
            # A plain list: the owner of the blocks registers them under their own names.
            self.__dict__["_unregistered_blocks"] = blocks

    @property
    def effective_gamma(self) -> float:
        """``gamma`` rounded to the multiple of ``2**-16`` that every mode computes with."""
        return self._gamma_num / GAMMA_DENOM

    def block_list(self) -> list[Callable[..., torch.Tensor]]:
        """The blocks, registered or not."""
        if "blocks" in self._modules:
            return list(self.blocks)
        return self.__dict__["_unregistered_blocks"]

    def extra_repr(self) -> str:
        text = f"num_blocks={len(self.residual)}, gamma={self._gamma}, strategy={self.strategy}"
        if self.__dict__.get("plain_modes"):
            text += f", plain_modes={self.plain_modes}"
        saved = self.__dict__.get("saved_ops")
        if saved:
            text += f", saved_ops={sum(len(s) for s in saved if s)}"
        if self.__dict__.get("recompute_span", 1) > 1:
            text += f", recompute_span={self.recompute_span}"
        return text

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, *args: object, v0: torch.Tensor | None = None
    ) -> torch.Tensor:
        reads = self.reads or ()
        saved = self.__dict__.get("saved_ops") or ()
        spec = ChainSpec(
            self.block_list(), self.residual, self._gamma_num, self.names, reads, saved
        )
        plain = ("train" if self.training else "eval") in self.__dict__.get("plain_modes", ())
        if self.strategy == "keep" or plain or not self._needs_backward(x, v0, args):
            return self._forward_plain(spec, x, v0, args)
        if self.strategy == "recompute":
            return recomputed_chain(spec, x, v0, args, self.__dict__.get("recompute_span", 1))
        return reversible_chain(spec, x, v0, args)

    def _needs_backward(self, x: torch.Tensor, v0: torch.Tensor | None, args: tuple) -> bool:
        # Not spec.parameters: that list is kept for the call, and FSDP swaps a unit's
        # parameters for the unsharded ones only once the chain enters the unit.
        parameters = (
            p for block in self.block_list() if isinstance(block, nn.Module)
            for p in block.parameters()
        )  # fmt: skip
        return needs_backward([x, v0, *args], parameters)

    def _forward_plain(
        self, spec: ChainSpec, x: torch.Tensor, v: torch.Tensor | None, args: tuple
    ) -> torch.Tensor:
        arguments = BlockArguments(args, {})

        def step(t: int, state: tuple) -> tuple:
            return spec.plain_step(t, *state, *arguments.build(arguments.tensors))

        reads = spec.tensor_reads(arguments)
        return in_units(spec.blocks, arguments.tensors, reads, (x, v), step)[0]
