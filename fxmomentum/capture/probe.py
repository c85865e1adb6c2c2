"""Running a model on example inputs as a probe: no side effects.

Capture runs the model (or one of its submodules) on example inputs to record calls, trace
shape-aware and propagate shapes. None of that may change the model or the process: buffers
(BatchNorm running statistics), the global random states and the autograd mode are restored,
and, where asked, the tensors modules keep in Python attributes (a cache filled without grad
would serve every later call). :func:`kept_tensors` finds the modules that keep tensors
between calls.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..engine import PythonState

__all__ = ["as_tuple", "kept_tensors", "no_side_effects"]


@contextlib.contextmanager
def no_side_effects(
    owner: nn.Module, inputs: Sequence[Any] = (), *, grad: bool = False, keep_added: bool = False
) -> Iterator[None]:
    """Run a probe of ``owner``: grad as asked, the global random states forked (torch's, on
    every CUDA device ``owner`` or ``inputs`` live on too, and Python's), and ``owner``'s
    buffers and its modules' plain attributes (a cache a module fills) restored afterwards.
    With ``keep_added``, attributes added meanwhile stay (while tracing: torch.fx keeps the
    graph's constants there).

    Examples
    --------
    >>> bn = nn.BatchNorm1d(2)
    >>> with no_side_effects(bn):
    ...     _ = bn(torch.randn(4, 2))
    >>> bn.num_batches_tracked.item()
    0
    """
    saved = [(b, b.detach().clone()) for b in owner.buffers()]
    state = PythonState.of(owner)
    python_random = random.getstate()
    tensors = [*owner.parameters(), *owner.buffers(), *inputs]
    devices = sorted(
        {t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda}
    )
    try:
        with torch.random.fork_rng(devices=devices), torch.set_grad_enabled(grad):
            yield
    finally:
        random.setstate(python_random)
        state.restore(keep_added=keep_added)
        with torch.no_grad():
            for b, old in saved:
                if b.shape == old.shape:
                    b.copy_(old)


def kept_tensors(
    module: nn.Module, run: Callable[[], Any], inputs: Sequence[Any] = ()
) -> dict[str, tuple[frozenset[str], str]]:
    """The submodules of ``module`` that keep a tensor between calls (a cache) when ``run()``
    calls it, in train mode and in eval mode: by path, the modes (``"train"``, ``"eval"``)
    and the attribute.

    A module keeps a tensor when the first run stores one in a plain attribute and a second
    run stores none there again (it read the first one's). A module that stores a tensor at
    every call (a record of what it saw) does not. The runs are probes
    (:func:`no_side_effects`, attributes restored); a run that raises finds nothing; the
    modes are left as they were.

    Examples
    --------
    >>> class Cached(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.scale = nn.Parameter(torch.ones(1))
    ...         self.cache = {}
    ...     def forward(self, x):
    ...         if not self.training:
    ...             self.cache.setdefault("s", self.scale * 2)
    ...             return x * self.cache["s"]
    ...         return x * self.scale * 2
    >>> model = nn.Sequential(nn.Linear(2, 2), Cached())
    >>> kept_tensors(model, lambda: model(torch.ones(1, 2)))
    {'1': (frozenset({'eval'}), 'cache')}
    >>> model[1].cache
    {}
    """
    modes = {m: m.training for m in module.modules()}
    found: dict[str, tuple[set[str], str]] = {}
    try:
        for training in (True, False):
            module.train(training)
            state = PythonState.of(module)
            try:
                with no_side_effects(module, inputs):
                    run()
                    stored = state.stored()
                    if stored:
                        again = PythonState.of(state.modules)
                        run()
                        stored = [where for where in stored if where not in again.stored()]
            except Exception:
                continue
            for path, attribute in stored:
                found.setdefault(path, (set(), attribute))[0].add("train" if training else "eval")
    finally:
        for m, training in modes.items():
            m.training = training
    return {path: (frozenset(m), attribute) for path, (m, attribute) in found.items()}


def as_tuple(example_inputs: torch.Tensor | Sequence[Any]) -> tuple[Any, ...]:
    """Example inputs as a tuple (a single tensor is one input).

    Examples
    --------
    >>> len(as_tuple(torch.zeros(2))), len(as_tuple([torch.zeros(2), None]))
    (1, 2)
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    got = type(example_inputs).__name__
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {got}")
