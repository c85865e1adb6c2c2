"""The reversible engine: exact momentum chains, knowing nothing of torch.fx.

Layers, lowest first (each imports only those before it):

* :mod:`~fxmomentum.engine.exact`: gamma as an integer fraction, :func:`validate_gamma`, the
  per-element bit stack of lost bits;
* :mod:`~fxmomentum.engine.kernels`: the fused integer passes of a step (eager reference;
  native C kernels on CPU, :mod:`~fxmomentum.engine.native`; ``torch.compile`` on CUDA);
* :mod:`~fxmomentum.engine.grid`: the state's power-of-two grid (:class:`~.grid.Grid`),
  integers shifted between grids and packed;
* :mod:`~fxmomentum.engine.spec`: a chain's blocks, kinds and arguments (:class:`ChainSpec`);
* :mod:`~fxmomentum.engine.state`: tensors modules keep in Python attributes between calls;
* :mod:`~fxmomentum.engine.replay` and :mod:`~fxmomentum.engine.attention`: recomputing a
  block as its forward ran it;
* :mod:`~fxmomentum.engine.run`: the exact state of one run (:class:`ChainRun`);
* :mod:`~fxmomentum.engine.fsdp`: blocks run inside the FSDP2 units they call;
* :mod:`~fxmomentum.engine.function`: the autograd Function, one node per block;
* :mod:`~fxmomentum.engine.recompute`: the recompute strategy (checkpointing, buffers
  restored);
* :mod:`~fxmomentum.engine.chain`: :class:`MomentumChain`, the ``nn.Module`` a converted graph
  calls (reversible, recomputed or plain autograd).
"""

from .chain import GammaSetting, MomentumChain
from .exact import GAMMA_BITS, GAMMA_DENOM, BitStack, quantize_gamma, validate_gamma
from .function import reversible_chain, run_block, start_run
from .replay import StatefulBlockError
from .run import ChainRun, NumericalError
from .spec import BlockArguments, ChainSpec
from .state import PythonState

__all__ = [
    "GAMMA_BITS",
    "GAMMA_DENOM",
    "BitStack",
    "BlockArguments",
    "ChainRun",
    "ChainSpec",
    "GammaSetting",
    "MomentumChain",
    "NumericalError",
    "PythonState",
    "StatefulBlockError",
    "quantize_gamma",
    "reversible_chain",
    "run_block",
    "start_run",
    "validate_gamma",
]
