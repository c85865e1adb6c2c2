"""MomentumNet: the official library's class, on top of :class:`MomentumChain`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..engine import MomentumChain

__all__ = ["MomentumNet"]


class MomentumNet(MomentumChain):
    """A Momentum ResNet over ``functions``, with the official library's signature.

    Iterates ``v <- gamma * v + (1 - gamma) * f_t(x); x <- x + v``: ``gamma = 0`` is the
    ResNet ``x <- x + f_t(x)``. (The official README writes the update with ``gamma`` and
    ``1 - gamma`` swapped; its code, the paper and this class use the convention above.)

    Parameters
    ----------
    functions : sequence of nn.Module
        The residual functions; each is called as ``f(x, *args)``. The same module may appear
        several times (tied weights). An empty list gives the identity, as in the official
        library (its nested-rings example draws the states after 0, 1, ... blocks).
    gamma : float
        Momentum in ``[0, 1]``.
    init_speed : bool
        Start from ``v_0 = init_function(x_0)`` instead of ``v_0 = 0``.
    init_function : nn.Module, optional
        Required when ``init_speed`` is True.
    use_backprop : bool
        ``False`` trains through the reversible function: activations inside the chain are
        rebuilt in backward, not stored. Needs ``gamma > 0``.
    is_residual : bool
        ``True``: ``f_t = functions[t]``. ``False``: ``f_t(x) = functions[t](x) - x``.

    Examples
    --------
    >>> from torch import nn
    >>> function = nn.Sequential(nn.Linear(500, 8), nn.Tanh(), nn.Linear(8, 500))
    >>> mresnet = MomentumNet([function] * 10, gamma=0.9, use_backprop=False)
    >>> mresnet(torch.randn(4, 500)).shape
    torch.Size([4, 500])
    >>> x = torch.randn(2, 500)
    >>> MomentumNet([], gamma=0.9)(x) is x
    True
    """

    def __init__(
        self,
        functions: Sequence[Callable[..., torch.Tensor]],
        gamma: float,
        init_speed: bool = False,
        init_function: Callable[[torch.Tensor], torch.Tensor] | None = None,
        use_backprop: bool = True,
        is_residual: bool = True,
    ) -> None:
        if init_speed and init_function is None:
            raise ValueError("init_speed=True needs an init_function giving v_0 from x_0")
        functions = list(functions)
        if functions:
            super().__init__(functions, gamma, residual=is_residual, use_backprop=use_backprop)
        else:
            # No blocks: the identity. MomentumChain refuses an empty chain; the attributes it
            # would set are set here, gamma validated the same way.
            nn.Module.__init__(self)
            self.use_backprop = bool(use_backprop)
            self.gamma = gamma
            self.residual, self.names, self.reads = [], [], None
            self.blocks = nn.ModuleList()
        self.init_speed = bool(init_speed)
        self.init_function = init_function
        self.is_residual = bool(is_residual)

    @property
    def functions(self) -> nn.ModuleList:
        """The residual functions (the official library's attribute name)."""
        return self.blocks

    def forward(self, x: torch.Tensor, *args: object) -> torch.Tensor:  # type: ignore[override]
        if not self.residual:
            return x  # no blocks: the identity (v_0 is never used)
        v0 = self.init_function(x) if self.init_speed else None
        return super().forward(x, *args, v0=v0)
