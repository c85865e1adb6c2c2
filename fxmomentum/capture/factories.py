"""Tensor factories while tracing: traced sizes, and random draws made at run time.

Two things torch.fx gets wrong about factories called in a traced forward:

* ``torch.zeros(b, n)`` with traced sizes fails: torch's argument parser rejects a proxy among
  separate size arguments (it reads the first as the whole size) before torch.fx sees it. The
  same sizes as one tuple are traced, so the factories below pass them so.
* ``torch.rand([])`` (no traced argument) runs once, at trace time, and its value is frozen into
  the graph: Hugging Face's layer drop (``if torch.rand([]) < self.layerdrop: skip the
  layer``) would drop the same layers on every call, silently, and the random stream would
  drift from the model's. Random draws are recorded as graph nodes instead, drawn at run
  time; a branch on one then cannot be traced (or, traced with examples, is a check on data),
  so the Python code that branches stays Python code.

:func:`traced_factories` installs both for one trace.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx

from ..patches import replaced

__all__ = ["is_random_draw", "python_random", "traced_factories"]

#: Factories whose size may be given as separate arguments (``torch.zeros(b, n)``).
SIZE_FACTORIES = ("empty", "ones", "rand", "randn", "zeros")

#: Random functions of torch drawn at run time when traced.
TORCH_RANDOM = (
    "bernoulli", "multinomial", "normal", "poisson", "rand", "rand_like", "randint",
    "randint_like", "randn", "randn_like", "randperm",
)  # fmt: skip
TORCH_NAMES = tuple(dict.fromkeys((*TORCH_RANDOM, *SIZE_FACTORIES)))
#: The same for Python's random module.
PYTHON_RANDOM = ("random", "uniform", "randint", "choice", "gauss")


def python_random(name: str, *args: Any, **kwargs: Any) -> Any:
    """``random.<name>(*args, **kwargs)``, a draw of Python's random module as a graph node
    (its functions are methods of a hidden instance, which a graph's code cannot name).

    Examples
    --------
    >>> random.seed(0)
    >>> first = python_random("uniform", 2.0, 3.0)
    >>> random.seed(0)
    >>> first == random.uniform(2.0, 3.0)
    True
    """
    return getattr(random, name)(*args, **kwargs)


#: The random functions as traced graph nodes call them (torch's own, before any patching).
_DRAWS = frozenset(getattr(torch, name) for name in TORCH_RANDOM) | {python_random}


def is_random_draw(node: fx.Node) -> bool:
    """Whether ``node`` is a random draw made at run time (see :func:`traced_factories`).

    Examples
    --------
    >>> tracer = fx.Tracer()
    >>> with traced_factories(tracer):
    ...     graph = tracer.trace(lambda x: x + torch.rand([]))
    >>> [is_random_draw(n) for n in graph.nodes]
    [False, True, False, False]
    """
    return node.op == "call_function" and node.target in _DRAWS


def _sized(factory: Any) -> Any:
    def call(*size: Any, **kwargs: Any) -> Any:
        if len(size) > 1 and any(isinstance(s, fx.Proxy) for s in size):
            return factory(size, **kwargs)
        return factory(*size, **kwargs)

    return call


def _drawn_at_run_time(tracer: fx.Tracer, draw: Any, python: str | None = None) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        if not getattr(tracer, "recording", True):  # an example or a leaf running for real
            return draw(*args, **kwargs)
        target, args = (draw, args) if python is None else (python_random, (python, *args))
        return tracer.create_proxy("call_function", target, args, kwargs)

    return call


@contextlib.contextmanager
def traced_factories(tracer: fx.Tracer) -> Iterator[None]:
    """While ``tracer`` traces: factories take traced sizes, random draws become graph nodes.

    The draws call ``tracer.create_proxy`` unless ``tracer.recording`` is False (while real
    code runs in the middle of a trace: a leaf module on an example, say).

    Examples
    --------
    >>> def noisy(x):
    ...     return x + torch.randn(x.shape[0], 1)
    >>> tracer = fx.Tracer()
    >>> with traced_factories(tracer):
    ...     gm = fx.GraphModule({}, tracer.trace(noisy))
    >>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"][-2:]
    ['<built-in method randn of type object at ...>', '<built-in function add>']
    >>> bool((gm(torch.zeros(3, 2)) != gm(torch.zeros(3, 2))).all())  # drawn per call
    True
    """
    replacements: dict[Any, dict[str, Any]] = {torch: {}, random: {}}
    for name in TORCH_NAMES:
        fn = getattr(torch, name)
        if name in TORCH_RANDOM:
            fn = _drawn_at_run_time(tracer, fn)
        if name in SIZE_FACTORIES:
            fn = _sized(fn)  # torch.rand(b, n) is both
        replacements[torch][name] = fn
    for name in PYTHON_RANDOM:
        replacements[random][name] = _drawn_at_run_time(tracer, getattr(random, name), name)
    with replaced(torch, replacements[torch]), replaced(random, replacements[random]):
        yield
