"""FSDP2 units whose modules a chain's blocks call, without calling the unit itself.

FSDP2's recipe, ``fully_shard`` on every layer and then on the root, makes ``layers.3`` a unit
of a converted model; but a chain's blocks call ``layers.3.self_attn``, ``layers.3.mlp``...:
the unit's own forward never runs, so FSDP would never gather its parameters, nor scatter
their gradients. Each run of consecutive blocks that use a unit is therefore run as one call
of the unit, with FSDP's own forward hooks (what its public ``register_fsdp_forward_method``
wrapper calls): ``FSDPState._pre_forward`` before the first of those blocks, which gathers the
unit and, with grad, puts FSDP's post-backward node on the chain's state, and
``FSDPState._post_forward`` after the last, which frees the unit and puts FSDP's pre-backward
hook on the state. In backward FSDP itself then gathers the unit before its blocks go backward
(a reversible chain's recomputation included: it runs in that node) and reduce-scatters their
gradients as soon as the first of them has returned its gradients. So only the unit whose
blocks run, or are recomputed, is unsharded. The same holds for a chain recomputed block by
block and for a recomputed segment of the graph (:mod:`fxmomentum.surgery.segments`).

A unit's parameter the converted graph reads before the chain (a ``get_attr``, passed to the
blocks as context) is FSDP's sharded tensor there: once the unit is gathered, the blocks get
the unit's unsharded parameter instead.

This module reads FSDP2's state (``_get_fsdp_state``, ``_pre_forward``, ``_post_forward``,
``_training_state``, ``_fsdp_param_groups``, ``FSDPParam._module_info``): torch 2.14's layout.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["ShardedUnits", "sharded_units"]


def _fsdp_module_class() -> type | None:
    """FSDP2's module class where something may be sharded: FSDP is imported and a process
    group is up (``fully_shard`` needs one); None otherwise, and the chain does not look for
    units (a walk of the whole model, once per chain call)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    kind = getattr(fsdp, "FSDPModule", None)
    if not isinstance(kind, type) or not torch.distributed.is_initialized():
        return None
    return kind


def _trees(blocks: Sequence[object]) -> list[nn.Module]:
    """The module trees the blocks call into (a converted graph's block reads the converted
    model's top-level modules by name; a plain block is its own tree)."""
    found: dict[int, nn.Module] = {}
    for block in blocks:
        namespace = getattr(block, "__dict__", {}).get("_namespace")
        if namespace:
            trees = [m for m in namespace.values() if isinstance(m, nn.Module)]
        else:
            trees = [block] if isinstance(block, nn.Module) else []
        for tree in trees:
            found.setdefault(id(tree), tree)
    return list(found.values())


class ShardedUnits:
    """The FSDP units each block uses, entered and left around the blocks (module doc).

    Parameters
    ----------
    states : list
        The FSDP states of the units below the blocks.
    blocks : sequence
        The blocks, in order.
    context : sequence
        The tensors passed to the blocks (``BlockArguments.tensors``).
    reads : sequence of sequences of int
        Per block, the positions in ``context`` it reads.
    """

    def __init__(
        self,
        states: list[Any],
        blocks: Sequence[object],
        context: Sequence[object],
        reads: Sequence[Sequence[int]],
    ) -> None:
        by_slot: dict[tuple[int, str], Any] = {}
        by_tensor: dict[int, tuple[Any, Any]] = {}
        for state in states:
            for group in state._fsdp_param_groups:
                for param in group.fsdp_params:
                    info = param._module_info
                    slots = [
                        (info.module, info.param_name),
                        *zip(info.shared_modules, info.shared_param_names, strict=True),
                    ]
                    for module, name in slots:  # fmt: skip
                        by_slot[(id(module), name)] = state
                    views = ("sharded_param", "_unsharded_param", "_sharded_post_forward_param")
                    for attr in views:
                        tensor = getattr(param, attr, None)
                        if tensor is not None:
                            by_tensor[id(tensor)] = (state, param)
        #: Per unit, the context positions holding one of its parameters.
        self.context: dict[Any, list[tuple[int, Any]]] = {}
        for i, value in enumerate(context):
            hit = by_tensor.get(id(value)) if isinstance(value, torch.Tensor) else None
            if hit is not None:
                self.context.setdefault(hit[0], []).append((i, hit[1]))
        #: Per block, the units it uses, in order.
        self.units: list[list[Any]] = []
        for t, block in enumerate(blocks):
            found: dict[Any, None] = {}
            modules = getattr(block, "modules", None)
            for m in modules() if callable(modules) else ():
                for name in m._parameters:
                    state = by_slot.get((id(m), name))
                    if state is not None:
                        found[state] = None
            for state, slots in self.context.items():
                if any(i in reads[t] for i, _ in slots):
                    found[state] = None
            self.units.append(list(found))
        self.entered: list[Any] = []

    def enter(self, t: int, tensors: tuple, context: list[Any]) -> tuple:
        """Gather the units block ``t`` uses; returns ``tensors`` as FSDP wrapped them, and
        puts the units' unsharded parameters in ``context``."""
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

        for state in self.units[t]:
            # A unit whose own forward is running (the root, or a unit above the chain) is
            # FSDP's business: entering it again would free it in the middle of its forward.
            if state in self.entered or state._training_state == TrainingState.FORWARD:
                continue
            if state._is_root is None:
                raise RuntimeError(
                    "a momentum chain calls into an FSDP unit before FSDP has initialised: call "
                    "the root module (the one fully_shard'ed last), not a submodule"
                )
            policy = state._mp_policy
            if policy.param_dtype is not None and any(
                isinstance(x, torch.Tensor) and x.dtype != policy.param_dtype for x in tensors
            ):
                raise NotImplementedError(
                    "FSDP's MixedPrecisionPolicy casts a unit's inputs to its param_dtype, which "
                    "would cast a momentum chain's state: shard the layers inside chains without "
                    "param_dtype, or convert with use_backprop=True and cast inside the layers"
                )
            args, _ = state._pre_forward(state._modules[0], tensors, {})
            tensors = tuple(args)
            self.entered.append(state)
            for i, param in self.context.get(state, ()):
                context[i] = param._unsharded_param
        return tensors

    def leave(self, t: int, tensors: tuple) -> tuple:
        """Free the units block ``t + 1`` does not use; returns ``tensors`` with FSDP's
        pre-backward hook on them."""
        upcoming = self.units[t + 1] if t + 1 < len(self.units) else []
        for state in [s for s in self.entered if s not in upcoming]:
            tensors = tuple(state._post_forward(state._modules[0], tensors, tensors))
            self.entered.remove(state)
        return tensors


def sharded_units(
    blocks: Sequence[object], context: Sequence[object], reads: Sequence[Sequence[int]]
) -> ShardedUnits | None:
    """The FSDP units the blocks use, or None (no FSDP, or no unit below the blocks)."""
    kind = _fsdp_module_class()
    if kind is None:
        return None
    states: dict[Any, None] = {}
    for tree in _trees(blocks):
        for m in tree.modules():
            if isinstance(m, kind):
                states[m._get_fsdp_state()] = None
    if not states:
        return None
    units = ShardedUnits(list(states), blocks, context, reads)
    return units if any(units.units) else None


def in_units(
    blocks: Sequence[object],
    context: list[Any],
    reads: Sequence[Sequence[int]],
    state: tuple,
    step: Callable[[int, tuple], tuple],
) -> tuple:
    """``state = step(t, state)`` for each block ``t``, inside the FSDP units it uses.

    ``state`` holds the tensors carried from block to block (None entries are left out of
    FSDP's hooks); ``context`` is the blocks' tensors, whose unit parameters are replaced by
    the unsharded ones while their unit is gathered.
    """
    units = sharded_units(blocks, context, reads)
    for t in range(len(blocks)):
        if units is not None:
            state = _mapped(state, lambda tensors, t=t: units.enter(t, tensors, context))
        state = step(t, state)
        if units is not None:
            state = _mapped(state, lambda tensors, t=t: units.leave(t, tensors))
    return state


def _mapped(state: tuple, fn: Callable[[tuple], tuple]) -> tuple:
    """``fn`` on the tensors of ``state``, Nones kept in place."""
    present = [i for i, s in enumerate(state) if s is not None]
    out = list(state)
    for i, value in zip(present, fn(tuple(state[i] for i in present)), strict=True):
        out[i] = value
    return tuple(out)
