"""The official Momentum ResNets library's API, on top of the engine.

:class:`MomentumNet` (``fxmomentum.MomentumNet``) and :func:`transform_to_momentumnet`
(``fxmomentum.transform_to_momentumnet``) with the official signatures; :func:`split_layer`
gives the residual blocks inside torch's transformer layers, which ``transform_to_momentumnet``
uses with ``split_layers=True``.
"""

from .layers import LayerSplit, SubBlock, split_layer
from .momentum_net import MomentumNet
from .transform import LayerChain, transform_to_momentumnet

__all__ = [
    "LayerChain",
    "LayerSplit",
    "MomentumNet",
    "SubBlock",
    "split_layer",
    "transform_to_momentumnet",
]
