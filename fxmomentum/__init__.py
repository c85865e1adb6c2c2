"""fxmomentum: reversible Momentum ResNet chains for any PyTorch model, found with torch.fx."""

from .engine import MomentumChain, NumericalError, quantize_gamma
from .momentum_net import MomentumNet
from .transform import transform_to_momentumnet

__all__ = [
    "MomentumChain",
    "MomentumNet",
    "NumericalError",
    "quantize_gamma",
    "transform_to_momentumnet",
]
__version__ = "0.1.0"

# The converter: capture -> match -> rewrite -> report.
from .api import convert, inspect, set_gamma
from .report import ConversionReport

__all__ += ["ConversionReport", "convert", "inspect", "set_gamma"]
