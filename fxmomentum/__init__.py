"""fxmomentum: reversible Momentum ResNet chains for any PyTorch model, found with torch.fx.

The package imports torch only when one of its names is first used, so that the command line
answers ``--help`` at once. The layers, lowest first (ARCHITECTURE.md has the diagram):

* :mod:`fxmomentum.engine`: exact reversible chains (``MomentumChain``), knowing nothing of fx;
* :mod:`fxmomentum.capture`: a model as torch.fx graphs, with shapes, whatever the model;
* :mod:`fxmomentum.surgery`: residual chains found, selected, rewritten and reported;
* :mod:`fxmomentum.api`: :func:`convert`, :func:`inspect`, :func:`set_gamma`;
  :mod:`fxmomentum.schedule`: :class:`GammaScheduler` (gamma raised during fine-tuning);
* :mod:`fxmomentum.official`: the official library's API (``MomentumNet``,
  ``transform_to_momentumnet``);
* :mod:`fxmomentum.tools`: the command line, model loading, profiling, export.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public names and the module each comes from.
_EXPORTS = {
    "MomentumChain": "fxmomentum.engine",
    "NumericalError": "fxmomentum.engine",
    "quantize_gamma": "fxmomentum.engine",
    "MomentumNet": "fxmomentum.official",
    "transform_to_momentumnet": "fxmomentum.official",
    "ConversionReport": "fxmomentum.surgery",
    "convert": "fxmomentum.api",
    "inspect": "fxmomentum.api",
    "set_gamma": "fxmomentum.api",
    "GammaScheduler": "fxmomentum.schedule",
    "export_onnx": "fxmomentum.tools.export",
    "export_program": "fxmomentum.tools.export",
}

__all__ = [
    "ConversionReport",
    "GammaScheduler",
    "MomentumChain",
    "MomentumNet",
    "NumericalError",
    "convert",
    "export_onnx",
    "export_program",
    "inspect",
    "quantize_gamma",
    "set_gamma",
    "transform_to_momentumnet",
]

if TYPE_CHECKING:
    from .api import convert, inspect, set_gamma
    from .engine import MomentumChain, NumericalError, quantize_gamma
    from .official import MomentumNet, transform_to_momentumnet
    from .schedule import GammaScheduler
    from .surgery import ConversionReport
    from .tools.export import export_onnx, export_program


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
