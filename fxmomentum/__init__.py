"""fxmomentum: reversible Momentum ResNet chains for any PyTorch model, found with torch.fx."""

from .chain import MomentumChain
from .exact import quantize_gamma
from .momentum_net import MomentumNet
from .reversible import NumericalError

__all__ = ["MomentumChain", "MomentumNet", "NumericalError", "quantize_gamma"]
__version__ = "0.1.0"
