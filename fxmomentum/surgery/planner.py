"""The memory planner: the fastest choice of strategies within a memory budget, exactly.

The regions of a model (:mod:`fxmomentum.surgery.regions`) form a sequence. A training step
runs them forward, keeping what each strategy keeps, then backward in reverse: while region
``r`` goes backward, everything kept by the regions up to ``r`` is live, plus ``r``'s own
transient bytes. The step's peak is the largest of these sums over ``r``; its added time is the
sum of the regions' added times. :func:`solve` finds, by dynamic programming over the sequence
(Pareto fronts of kept bytes and time, the previous region's choice in the state so that a
tensor two neighbours both keep counts once), the plan of least added time whose peak is
within the budget, or, for a budget below the least reachable, the plan of least peak. The
cost model is the only approximation: within it the plan is optimal.

Examples
--------
>>> keep, again = Cost(100, 10, 0.0), Cost(10, 50, 1.0)
>>> steps = [[Choice("a", "keep", keep, 1), Choice("a", "recompute", again, 1)]]
>>> [(c.strategy, s.peak) for s in [solve(steps, budget=80)] for c in s.choices]
[('recompute', 60)]
>>> [(c.strategy, s.peak) for s in [solve(steps, budget=200)] for c in s.choices]
[('keep', 110)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .regions import Cost

__all__ = ["Choice", "Solution", "evaluate", "solve"]


@dataclass(frozen=True)
class Choice:
    """One way to cover the sequence from a position: a region, its strategy, its cost, and
    the position after it."""

    region: str
    strategy: str
    cost: Cost
    next: int


@dataclass
class Solution:
    """A plan: the choices in order, its estimated peak bytes and added seconds."""

    choices: list[Choice]
    peak: int
    seconds: float


@dataclass
class _State:
    kept: int
    peak: int
    seconds: float
    last: Choice | None
    parent: _State | None


def _overlap(a: Choice | None, b: Choice, sizes: Mapping[int, int]) -> int:
    if a is None:
        return 0
    return sum(sizes.get(k, 0) for k in a.cost.storages & b.cost.storages)


def _step(state: _State, choice: Choice, sizes: Mapping[int, int]) -> _State:
    kept = state.kept + choice.cost.kept - _overlap(state.last, choice, sizes)
    peak = max(state.peak, kept + choice.cost.transient)
    return _State(kept, peak, state.seconds + choice.cost.seconds, choice, state)


def evaluate(choices: Sequence[Choice], sizes: Mapping[int, int] | None = None) -> Solution:
    """The estimated peak and added time of a given sequence of choices.

    Examples
    --------
    >>> a = Choice("a", "keep", Cost(100, 10, 0.0, frozenset({1})), 1)
    >>> b = Choice("b", "keep", Cost(50, 5, 0.0, frozenset({1})), 2)
    >>> evaluate([a, b], sizes={1: 30}).peak  # the shared 30 bytes count once
    125
    """
    state = _State(0, 0, 0.0, None, None)
    for choice in choices:
        state = _step(state, choice, sizes or {})
    return Solution(list(choices), state.peak, state.seconds)


def _dominated(a: _State, b: _State, with_peak: bool) -> bool:
    """Whether ``b`` is no better than ``a`` for every future (same last choice)."""
    if a.kept > b.kept or a.seconds > b.seconds:
        return False
    return not with_peak or a.peak <= b.peak


def _front(states: list[_State], with_peak: bool) -> list[_State]:
    out: list[_State] = []
    for s in sorted(states, key=lambda s: (s.kept, s.seconds, s.peak)):
        if not any(_dominated(t, s, with_peak) for t in out):
            out.append(s)
    return out


def solve(
    steps: Sequence[Sequence[Choice]],
    budget: int | None,
    sizes: Mapping[int, int] | None = None,
) -> Solution:
    """The plan of least added time whose peak is at most ``budget`` bytes; where none is
    (or ``budget`` is None), the plan of least peak (then least time).

    Parameters
    ----------
    steps : sequence of sequences of Choice
        ``steps[p]``: the choices that start at position ``p``; each jumps to ``choice.next``
        (> ``p``). The plan covers positions ``0 .. len(steps)``.
    budget : int or None
        Bytes the step's peak may reach.
    sizes : mapping of int to int, optional
        Bytes of each storage key that choices share.
    """
    sizes = sizes or {}
    if budget is not None:
        found = _dynamic_program(steps, budget, sizes)
        if found is not None:
            return found
    least = _dynamic_program(steps, None, sizes)
    assert least is not None  # every position has a choice
    return least


def _dynamic_program(
    steps: Sequence[Sequence[Choice]], budget: int | None, sizes: Mapping[int, int]
) -> Solution | None:
    end = len(steps)
    with_peak = budget is None
    fronts: list[dict[int, list[_State]]] = [{} for _ in range(end + 1)]
    fronts[0][0] = [_State(0, 0, 0.0, None, None)]
    for position in range(end):
        for states in fronts[position].values():
            for state in states:
                for choice in steps[position]:
                    new = _step(state, choice, sizes)
                    if budget is not None and new.peak > budget:
                        continue
                    fronts[choice.next].setdefault(id(choice), []).append(new)
        for key, states in fronts[position + 1].items():
            fronts[position + 1][key] = _front(states, with_peak)
        fronts[position] = {}  # no longer needed (backpointers keep what is)
    finals = [s for states in fronts[end].values() for s in states]
    if not finals:
        return None
    best = min(finals, key=lambda s: (s.seconds, s.peak) if budget is not None
               else (s.peak, s.seconds))  # fmt: skip
    choices = []
    state: _State | None = best
    while state is not None and state.last is not None:
        choices.append(state.last)
        state = state.parent
    return Solution(choices[::-1], best.peak, best.seconds)
