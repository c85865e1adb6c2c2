"""Segments of a converted graph recomputed in backward instead of kept.

The memory planner may give a run of nodes outside the chains (a stem, a projection block, a
head) the strategy *recompute*: :func:`cut_segment` moves those nodes into a
:class:`~fxmomentum.surgery.blocks.ChainBlock` (which calls the model's own modules, by path)
and replaces them by one call of a :class:`RecomputedSegment`, which runs the block through
:func:`fxmomentum.engine.recompute.recomputed` when autograd will differentiate through it
(only its inputs are kept; RNG states replayed, buffers left as the forward left them), and
plainly otherwise (evaluation, export).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from ..engine.fsdp import in_units
from ..engine.recompute import needs_backward, recomputed
from .blocks import ChainBlock, named

__all__ = ["SEGMENT_PREFIX", "RecomputedSegment", "cut_segment"]

#: Attribute names of the recomputed segments of a converted module.
SEGMENT_PREFIX = "recomputed_segment_"


class RecomputedSegment(nn.Module):
    """Runs a segment of a converted graph, recomputed in backward.

    The segment's block is not registered as a submodule (the modules it calls are registered
    at their own paths), so ``state_dict`` keys do not change.

    Parameters
    ----------
    block : ChainBlock
        The segment: ``(*inputs) -> tuple of outputs``.
    modules : sequence of str
        The module paths it calls (for the report and ``repr``).
    """

    def __init__(self, block: ChainBlock, modules: Sequence[str] = ()) -> None:
        super().__init__()
        self.__dict__["_segment"] = block
        self.modules_called = list(modules)

    @property
    def block(self) -> ChainBlock:
        return self.__dict__["_segment"]

    def extra_repr(self) -> str:
        shown = ", ".join(self.modules_called[:3])
        more = f", ... ({len(self.modules_called)})" if len(self.modules_called) > 3 else ""
        return f"modules=[{shown}{more}]"

    def forward(self, *inputs: Any) -> Any:
        block = self.block
        context = list(inputs)

        def step(t: int, state: tuple) -> tuple:
            # The inputs as FSDP passed them on, but a unit's parameter as its unsharded one.
            args = [c if c is not i else s for c, i, s in zip(context, inputs, state, strict=True)]
            if torch.compiler.is_compiling() or not needs_backward(args, block.parameters()):
                return block(*args)
            return recomputed(block, [block], *args)

        # Inside the FSDP units whose modules it calls (fxmomentum.engine.fsdp).
        every = [list(range(len(context)))]
        return in_units([block], context, every, tuple(context), step)


def cut_segment(
    graph: fx.Graph, nodes: Sequence[str], name: str, namespace: dict[str, Any]
) -> tuple[RecomputedSegment, fx.Graph]:
    """Move the nodes named ``nodes`` (consecutive computations) of ``graph`` into a
    :class:`RecomputedSegment` called ``name``, in place.

    Returns the segment module (for the caller to register on the graph's owner under
    ``name``) and its block's graph.
    """
    by_name = {n.name: n for n in graph.nodes}
    inside = [by_name[n] for n in nodes]
    members = set(inside)
    inputs: dict[fx.Node, None] = {}
    for node in inside:
        for i in node.all_input_nodes:
            if i not in members:
                inputs.setdefault(i, None)
    outputs = [n for n in inside if any(u not in members for u in n.users)]

    sub = fx.Graph()
    env = {i: sub.placeholder(f"input_{k}") for k, i in enumerate(inputs)}
    for node in inside:
        env[node] = sub.node_copy(node, env.__getitem__)
        env[node].meta = dict(node.meta)
    sub.output(tuple(env[o] for o in outputs))
    block = named(ChainBlock(namespace, sub))
    modules = sorted({str(n.target) for n in inside if n.op == "call_module"})

    with graph.inserting_after(inside[-1]):
        call = graph.create_node("call_module", name, tuple(inputs), {}, name=name)
    last = call
    for k, out in enumerate(outputs):
        with graph.inserting_after(last):
            last = graph.create_node("call_function", operator.getitem, (call, k), {})
        last.meta = dict(out.meta)
        out.replace_all_uses_with(last, delete_user_cb=lambda user: user not in members)
    for node in reversed(inside):
        graph.erase_node(node)
    return RecomputedSegment(block, modules), sub
