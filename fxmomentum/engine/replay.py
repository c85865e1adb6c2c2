"""Recomputing a block as its forward ran it.

A reversible chain runs each block without grad in forward and runs it again with grad in
backward; both runs must give the same bits. What can differ, and what is done about it:

* random draws (dropout, stochastic depth): the forward's RNG states (CPU and the block's CUDA
  device) are kept when the block drew, and set again for the recomputation (not even noted
  for a block whose modules and code cannot draw: :func:`may_draw`);
* autocast: the forward's autocast state is entered again;
* buffers (BatchNorm running statistics): those the recomputation changed are restored after
  it, so a step counts once;
* torch's attention inference fast path (taken without grad in eval mode): kept off in the
  forward (:func:`fxmomentum.patches.attention_fastpath_off`), as the recomputation has grad;
* ``scaled_dot_product_attention``'s kernel choice: see :mod:`fxmomentum.engine.attention`;
* tensors a module keeps in its Python attributes between calls (a cache): the recomputation
  would read what the forward stored, without grad, instead of computing it again
  (:mod:`fxmomentum.engine.state`). The attributes the forward stored a tensor in are noted;
  a recomputation that does not store one there again (it found the forward's) is refused
  with :class:`StatefulBlockError`, the module's attributes put back as before the forward.
  A module that stores a tensor at every call (a record of what it saw) is not refused.
  Conversion finds such caches on the example inputs and runs their chains with plain
  autograd in the modes where modules keep them.

Examples
--------
>>> drop = torch.nn.Dropout(0.5)
>>> x = torch.ones(8)
>>> with ForwardRun(drop, x) as run:
...     first = drop(x)
>>> with run.replay(torch.device("cpu")):
...     again = drop(x)
>>> torch.equal(first, again)
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..patches import attention_fastpath_off
from .spec import block_buffers
from .state import KEEP_NOTHING, PythonState, may_keep_tensors, runs_own_forward

__all__ = [
    "AutocastState",
    "ForwardRun",
    "StatefulBlockError",
    "autocast_state",
    "may_draw",
    "restoring_buffers",
]

#: torch.nn modules whose own forward draws no random number: a block made of them alone (and
#: of graph blocks that say ``draws_nothing``) has no RNG state to note (two copies of the
#: generator's 5 KB state and a comparison, per block and call).
_NEVER_DRAWS = KEEP_NOTHING - {torch.nn.Dropout}


def may_draw(module: torch.nn.Module) -> bool:
    """Whether a call of ``module`` (not its submodules) may draw random numbers.

    Examples
    --------
    >>> may_draw(torch.nn.Linear(2, 2)), may_draw(torch.nn.Dropout(0.1))
    (False, True)
    """
    if type(module) not in _NEVER_DRAWS and module.__dict__.get("draws_nothing") is not True:
        return True
    return not runs_own_forward(module)


@contextlib.contextmanager
def restoring_buffers(
    buffers: Sequence[torch.Tensor], inner: contextlib.AbstractContextManager | None = None
) -> Iterator[None]:
    """Run a recomputation (inside ``inner``, if given), then put back the buffers it changed,
    so that a step updates them once (BatchNorm's running statistics).

    Kernels such as batch_norm update running statistics without bumping the version counter,
    so values are compared; only changed buffers are written back (a write bumps the version,
    which autograd checks where a buffer is saved).

    Examples
    --------
    >>> bn = torch.nn.BatchNorm1d(2)
    >>> with restoring_buffers(list(bn.buffers())):
    ...     _ = bn(torch.randn(4, 2))
    >>> bn.running_mean.tolist(), bn.num_batches_tracked.item()
    ([0.0, 0.0], 0)
    """
    saved = [b.clone() for b in buffers]
    try:
        with inner or contextlib.nullcontext():
            yield
    finally:
        if buffers:
            with torch.no_grad():
                for b, old in zip(buffers, saved, strict=True):
                    if not torch.equal(b, old):
                        b.copy_(old)


class StatefulBlockError(RuntimeError):
    """A block stored a tensor in a module's Python attributes during its reversible forward."""


#: ``(device type, enabled, dtype)`` of autocast, or None on other devices.
AutocastState = tuple[str, bool, torch.dtype] | None


def autocast_state(device_type: str) -> AutocastState:
    """The autocast state of ``device_type`` now (None where autocast does not apply)."""
    if device_type not in ("cpu", "cuda"):
        return None
    return (
        device_type,
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
    )


@dataclass
class ForwardRun:
    """What a block's forward did that its recomputation must do again.

    Used as a context manager around the block's forward: it notes the RNG states before (kept
    only if the block drew) and keeps the attention fast path off. :meth:`replay` then
    recomputes the block as it ran. Nothing of the block's buffers is copied in forward: the
    recomputation, with grad, is what changes them a second time, so :meth:`replay` keeps and
    restores what it changes.

    Parameters
    ----------
    block : object
        The block (its buffers are listed from it unless ``buffers`` is given).
    x : torch.Tensor
        Its input (for the CUDA device whose RNG it may draw from).
    autocast : AutocastState
        The forward's autocast state.
    buffers : list of torch.Tensor, optional
        The block's buffers, if the caller has listed them already.
    modules : list of (str, nn.Module), optional
        The block's modules by path, if the caller has listed them already.
    """

    block: object
    x: torch.Tensor
    autocast: AutocastState = None
    buffers: list[torch.Tensor] | None = None
    modules: list[tuple[str, torch.nn.Module]] | None = None
    cpu_rng: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None
    #: ``(module path, attribute)`` where the forward stored a tensor, and the modules'
    #: attributes before it (kept only where it stored one).
    stored: list[tuple[str, str]] = field(default_factory=list)
    before_forward: PythonState | None = None
    #: Whether the block is made of modules (and graph code) that keep nothing, draw nothing
    #: and call no attention kernel: its recomputation needs none of the replay's care.
    plain: bool = False

    def __enter__(self) -> ForwardRun:
        if self.buffers is None:
            self.buffers = block_buffers(self.block)
        block = self.block
        self._state, draws, keeps_nothing = None, True, False
        if isinstance(block, torch.nn.Module):
            modules = self.modules if self.modules is not None else list(block.named_modules())
            watched = [(p, m) for p, m in modules if may_keep_tensors(m)]
            self._state = PythonState.of(watched) if watched else None
            draws = any(may_draw(m) for _, m in modules)
            # Modules that keep nothing take no attention fast path either (those that do,
            # MultiheadAttention and the transformer layers, are watched).
            keeps_nothing = not watched
        self.modules = None
        self.cpu_rng = torch.get_rng_state() if draws else None
        self.cuda_rng = (
            torch.cuda.get_rng_state(self.x.device) if draws and self.x.is_cuda else None
        )
        self.plain = keeps_nothing and not draws
        self._fastpath = contextlib.nullcontext() if keeps_nothing else attention_fastpath_off()
        self._fastpath.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fastpath.__exit__(*exc)
        if exc[0] is not None:
            return
        self.stored = self._state.stored() if self._state is not None else []
        self.before_forward = self._state if self.stored else None
        if self.cpu_rng is not None and torch.equal(self.cpu_rng, torch.get_rng_state()):
            self.cpu_rng = None
        if self.cuda_rng is not None and torch.equal(
            self.cuda_rng, torch.cuda.get_rng_state(self.x.device)
        ):
            self.cuda_rng = None
        del self._fastpath, self._state
        self.x = None

    @contextlib.contextmanager
    def replay(self, device: torch.device) -> Iterator[None]:
        """Run the block again as the forward ran it: its RNG and autocast states (the RNG
        states of the caller are restored afterwards); buffers the recomputation changed are
        restored afterwards (the block's backward may still read them)."""
        outer_cpu = outer_cuda = None
        if self.cpu_rng is not None:
            outer_cpu = torch.get_rng_state()
            torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            outer_cuda = torch.cuda.get_rng_state(device)
            torch.cuda.set_rng_state(self.cuda_rng, device)
        before = self.before_forward
        state = PythonState.of(before.modules) if before is not None else None
        autocast = contextlib.nullcontext()
        if self.autocast is not None and autocast_state(self.autocast[0]) != self.autocast:
            autocast = torch.autocast(
                self.autocast[0], dtype=self.autocast[2], enabled=self.autocast[1]
            )
        try:
            with restoring_buffers(self.buffers or (), autocast):
                yield
            if state is not None:
                self._check_recomputed(state)
        finally:
            if outer_cpu is not None:
                torch.set_rng_state(outer_cpu)
            if outer_cuda is not None:
                torch.cuda.set_rng_state(outer_cuda, device)

    def _check_recomputed(self, state: PythonState) -> None:
        """Raise where the recomputation stored no tensor where the forward stored one: it
        read the forward's (a cache), computed without grad."""
        again = set(state.stored())
        reused = [where for where in self.stored if where not in again]
        if not reused:
            return
        assert self.before_forward is not None
        self.before_forward.restore()
        path, attribute = reused[0]
        kind = type(self.block.get_submodule(path)).__name__  # type: ignore[attr-defined]
        raise StatefulBlockError(
            f"`{path}` ({kind}) keeps a tensor between calls in `{attribute}`: the block's "
            f"forward stored it, computed without grad, and its recomputation in backward read "
            f"it instead of computing it, so the parameters it came from would get no "
            f"gradient. Convert with example_inputs (conversion then runs such chains with "
            f"plain autograd in the modes where their modules keep tensors), or with "
            f"use_backprop=True"
        )
