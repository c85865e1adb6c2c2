"""How to convert: one options object for ``convert``, ``inspect``, the CLI and ``profile``.

Every entry point builds a :class:`ConvertOptions`, which checks its values once; the gamma of
each chain is looked up with :func:`gamma_for_chain`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..engine import validate_gamma
from ..paths import matches
from .select import as_patterns

__all__ = ["ConvertOptions", "GammaSpec", "gamma_for_chain", "lookup"]

#: A momentum for all chains; per chain, a dict keyed by chain index, attribute name, or module
#: path / glob pattern matched against the chain's block paths; or a function of the chain.
GammaSpec = float | Mapping[Any, Any] | Callable[..., Any]


@dataclass
class ConvertOptions:
    """What :func:`fxmomentum.convert` and :func:`fxmomentum.inspect` take besides the model
    and its example inputs (their parameters document each field).

    Raises
    ------
    TypeError, ValueError
        For a value out of range, naming the option and what it takes.

    Examples
    --------
    >>> ConvertOptions(gamma=0.5, include="layer3").include
    ['layer3']
    >>> ConvertOptions(min_blocks=0)
    Traceback (most recent call last):
    ...
    ValueError: min_blocks must be an integer >= 1, got 0
    """

    gamma: GammaSpec = 0.9
    use_backprop: bool = False
    min_blocks: int = 1
    include: str | Iterable[str] | None = None
    exclude: str | Iterable[str] | None = None
    cost_model: bool = False
    leaf_modules: Iterable[str | type] | None = None
    concrete_args: dict[str, Any] | None = field(default=None)
    memory_budget: float | None = None

    def __post_init__(self) -> None:
        min_blocks = self.min_blocks
        if isinstance(min_blocks, bool) or not isinstance(min_blocks, int) or min_blocks < 1:
            raise ValueError(f"min_blocks must be an integer >= 1, got {min_blocks!r}")
        budget = self.memory_budget
        if budget is not None and (
            isinstance(budget, bool)
            or not isinstance(budget, (int, float))
            or not 0.0 <= budget <= 1.0
        ):
            raise ValueError(
                f"memory_budget must be a number in [0, 1] (the fraction of the original's "
                f"activation memory: 0 = least memory, 1 = fastest) or None, got {budget!r}"
            )
        gamma = self.gamma
        if isinstance(gamma, (int, float)):
            validate_gamma(gamma, reversible=self.reversible)
        elif not (isinstance(gamma, Mapping) or callable(gamma)):
            raise TypeError(
                f"gamma must be a number, a dict or a callable, got {type(gamma).__name__}"
            )
        self.use_backprop = bool(self.use_backprop)
        self.include = as_patterns(self.include)
        self.exclude = as_patterns(self.exclude)
        if self.leaf_modules is not None:
            self.leaf_modules = list(self.leaf_modules)

    @property
    def reversible(self) -> bool:
        """Whether chains must run reversibly (no budget, ``use_backprop=False``): then
        gamma = 0 is refused. With a budget, a chain whose gamma is 0 is recomputed or kept."""
        return not self.use_backprop and self.memory_budget is None

    def changed(self) -> dict[str, Any]:
        """The options that differ from the defaults, as keyword arguments (JSON-ready when
        they hold no classes or callables): what a measuring child process is told.

        Examples
        --------
        >>> ConvertOptions(use_backprop=True, exclude=["head"]).changed()
        {'use_backprop': True, 'exclude': ['head']}
        """
        default = asdict(ConvertOptions())
        return {k: v for k, v in asdict(self).items() if v != default[k]}


def lookup(table: Mapping[Any, Any], index: int, name: str, paths: Sequence[str]) -> Any:
    """The entry of a per-chain dict for a chain: by index, attribute name, then module path
    or glob pattern (:func:`fxmomentum.paths.matches` on any of its blocks' paths).

    Examples
    --------
    >>> lookup({"layer3": 0.5}, 2, "momentum_chain_2", ["layer3.1", "layer3.2"])
    0.5
    >>> lookup({0: 0.5}, 1, "momentum_chain_1", ["layer2.1"]) is None
    True
    """
    if index in table:
        return table[index]
    if name in table:
        return table[name]
    for key, value in table.items():
        if isinstance(key, str) and any(matches(p, [key]) for p in paths):
            return value
    return None


def gamma_for_chain(
    spec: GammaSpec, index: int, name: str, paths: Sequence[str], chain: Any
) -> float | None:
    """The gamma ``spec`` gives a chain (None: leave the chain as it is).

    Parameters
    ----------
    spec : float, dict or callable
        See :data:`GammaSpec`; a callable receives ``chain``.
    index : int
        The chain's position among the chains to convert.
    name : str
        Its attribute name (``"momentum_chain_0"``, with the path of the module holding it).
    paths : sequence of str
        The module paths of its blocks.
    chain : object
        What a callable ``spec`` receives.
    """
    if isinstance(spec, Mapping):
        return lookup(spec, index, name, paths)
    if callable(spec) and not isinstance(spec, (int, float)):
        return spec(chain)
    return spec
