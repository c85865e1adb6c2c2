"""Which chains to convert: ``include``, ``exclude`` and ``min_blocks``, on full module paths.

A block left out splits its chain: the runs of blocks before and after it are chains of their
own (each may still be converted); the left-out run is kept, not selected, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..paths import join_path, matches
from .match import Block, Chain

__all__ = ["as_patterns", "select_chains"]


def as_patterns(value: str | Iterable[str] | None) -> list[str] | None:
    """A pattern option as a list (one string is one pattern; None stays None).

    Examples
    --------
    >>> as_patterns("layer3"), as_patterns(("a", "b")), as_patterns(None)
    (['layer3'], ['a', 'b'], None)
    """
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def select_chains(
    chains: Sequence[Chain],
    *,
    prefix: str = "",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    min_blocks: int = 1,
) -> list[Chain]:
    """Split and mark ``chains`` by what ``include`` / ``exclude`` / ``min_blocks`` select.

    Parameters
    ----------
    chains : sequence of Chain
        Chains of a graph of the module at ``prefix`` (block paths relative to it).
    prefix : str
        Module path of the graph's module in the whole model.
    include, exclude : str or iterable of str, optional
        Module paths or glob patterns (:func:`fxmomentum.paths.matches`) of the blocks to
        convert / to leave alone.
    min_blocks : int
        Chains with fewer blocks are not selected.

    Returns
    -------
    list of Chain
        In order; ``selected`` and ``reason`` set.

    Examples
    --------
    >>> from torch import fx, nn
    >>> from fxmomentum.surgery.match import find_chains
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fs = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
    ...     def forward(self, x):
    ...         for f in self.fs:
    ...             x = x + f(x)
    ...         return x
    >>> gm = fx.symbolic_trace(Net())
    >>> chains = find_chains(gm.graph, dict(gm.named_modules())).chains
    >>> [(len(c.blocks), c.selected, c.reason) for c in select_chains(chains, exclude="fs.1")]
    [(1, True, ''), (1, False, 'excluded'), (2, True, '')]
    """
    inc, exc = as_patterns(include), as_patterns(exclude)

    def why_left_out(block: Block) -> str:
        path = join_path(prefix, block.path)
        if inc is not None and not matches(path, inc):
            return "not in include"
        if exc is not None and matches(path, exc):
            return "excluded"
        return ""

    out: list[Chain] = []
    for chain in chains:
        run: list[Block] = []
        reason = ""
        for block in chain.blocks:
            why = why_left_out(block)
            if run and why != reason:
                out.append(Chain(run, not reason, reason))
                run = []
            run.append(block)
            reason = why
        if run:
            out.append(Chain(run, not reason, reason))
    for chain in out:
        if chain.selected and len(chain.blocks) < min_blocks:
            chain.selected = False
            chain.reason = f"{len(chain.blocks)} block(s) < min_blocks={min_blocks}"
    return out
