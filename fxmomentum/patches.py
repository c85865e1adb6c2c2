"""Every change fxmomentum makes to process-wide state, in one place.

fxmomentum leaves the user's process as it found it. A few things can only be done by changing
global state for a short while; each is listed here with the module that does it, when, and
how it is undone (always in a ``finally``: an exception restores it too).

While torch.fx traces a model (``fxmomentum.capture``):

* ``torch.zeros`` / ``ones`` / ``empty`` / ``rand`` / ``randn`` and torch's other random
  functions, and ``random.random`` / ``uniform`` / ``randint`` / ``choice`` / ``gauss``:
  replaced so that sizes may be traced and random draws become graph nodes
  (:mod:`fxmomentum.capture.factories`);
* ``torch.Tensor.__getitem__``: a buffer indexed with a traced size records a graph node
  (shape-aware tracing only, :mod:`fxmomentum.capture.shaped`);
* ``range`` in the module globals of the traced ``forward`` functions (a name added to the
  user's module for the length of one trace, never one it had): ``range(n)`` over a traced
  size (shape-aware tracing only);
* torch's attention inference fast path turned off; ``torch.nn.modules.transformer.
  _get_seq_len`` answering None for a traced input, ``_detect_is_causal_mask`` answering
  for a traced mask from its example (checked in the graph), and
  ``torch.nn.functional._none_or_dtype`` taking a traced mask
  (:mod:`fxmomentum.capture.tracer`).

While a reversible chain runs (``fxmomentum.engine``):

* torch's attention inference fast path turned off during a block's forward, so that it takes
  the path its recomputation takes (:mod:`fxmomentum.engine.replay`);
* ``torch.nn.functional.scaled_dot_product_attention`` (and the same function under the name
  graph code calls it by, ``torch._C._nn.scaled_dot_product_attention``) replaced while a
  block is recomputed in backward, so that attention takes the forward's kernel
  (:mod:`fxmomentum.engine.attention`).

Both are process-wide while active: another thread's calls in that window see them.

Settings read from the environment, each time they are needed (not once at import):

* ``FXMOMENTUM_COMPILE=0`` turns off ``torch.compile`` of the engine's fused kernels
  (:mod:`fxmomentum.engine.kernels`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["GlobalNames", "attention_fastpath_off", "replaced"]


@contextlib.contextmanager
def replaced(owner: object, values: Mapping[str, Any]) -> Iterator[None]:
    """Set attributes of ``owner`` to ``values`` for the duration of the block.

    Examples
    --------
    >>> import math
    >>> with replaced(math, {"pi": 3.0}):
    ...     math.pi
    3.0
    >>> math.pi
    3.141592653589793
    """
    saved = {name: getattr(owner, name) for name in values}
    try:
        for name, value in values.items():
            setattr(owner, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


@contextlib.contextmanager
def attention_fastpath_off() -> Iterator[None]:
    """Keep torch's attention inference fast path off for the duration of the block.

    ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` take a fused kernel in eval
    mode without grad; it tests its inputs in Python (which torch.fx cannot trace) and rounds
    differently from the regular path (which a reversible block's recomputation takes).

    Examples
    --------
    >>> with attention_fastpath_off():
    ...     torch.backends.mha.get_fastpath_enabled()
    False
    """
    mha = torch.backends.mha
    enabled = mha.get_fastpath_enabled()
    if not enabled:
        yield
        return
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(True)


class GlobalNames:
    """Names added to module globals for a while (``range`` in a traced ``forward``'s module).

    Only names a module does not define are added, and :meth:`remove` takes away exactly those
    still holding the value added.

    Examples
    --------
    >>> namespace = {}
    >>> names = GlobalNames()
    >>> names.add(namespace, "range", len)
    >>> namespace["range"] is len
    True
    >>> names.remove()
    >>> namespace
    {}
    """

    def __init__(self) -> None:
        self._added: list[tuple[dict[str, Any], str, Any]] = []

    def add(self, namespace: dict[str, Any], name: str, value: Any) -> None:
        """Set ``namespace[name] = value`` unless the namespace defines ``name`` itself."""
        if name not in namespace:
            namespace[name] = value
            self._added.append((namespace, name, value))

    def remove(self) -> None:
        """Take away every name added."""
        for namespace, name, value in self._added:
            if namespace.get(name) is value:
                del namespace[name]
        self._added = []
