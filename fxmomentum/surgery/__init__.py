"""Surgery: residual chains found on captured graphs, selected, rewritten and reported.

Modules, in the order a conversion runs them:

* :mod:`~fxmomentum.surgery.match`: residual blocks and chains on a graph's data flow;
* :mod:`~fxmomentum.surgery.select`: ``include`` / ``exclude`` / ``min_blocks``;
* :mod:`~fxmomentum.surgery.options`: :class:`ConvertOptions`, the gamma of each chain;
* :mod:`~fxmomentum.surgery.estimate`: what converting a chain saves, measured;
* :mod:`~fxmomentum.surgery.rewrite`: each chain becomes one ``MomentumChain`` call;
* :mod:`~fxmomentum.surgery.inplace`: a converted submodule in place, keeping its class;
* :mod:`~fxmomentum.surgery.conversion`: the whole pipeline (prepare, build, report);
* :mod:`~fxmomentum.surgery.report`, :mod:`~fxmomentum.surgery.format`: the report as data,
  and as tables.
"""

from .conversion import Conversion, build, make_report, predicted_graphs, prepare
from .match import Block, Chain, MatchResult, SkippedAdd, find_chains
from .options import ConvertOptions, GammaSpec
from .report import BlockInfo, ChainInfo, ConversionReport

__all__ = [
    "Block",
    "BlockInfo",
    "Chain",
    "ChainInfo",
    "Conversion",
    "ConversionReport",
    "ConvertOptions",
    "GammaSpec",
    "MatchResult",
    "SkippedAdd",
    "build",
    "find_chains",
    "make_report",
    "predicted_graphs",
    "prepare",
]
