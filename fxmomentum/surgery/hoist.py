"""Values a block computes that code after it reads, moved ahead of the chain.

A block may compute a value that later code reads and that does not depend on the values of
the block's input: T5's first attention layer computes the relative position bias that every
later layer reads, from its own parameter and the sequence length. Such a value is computed
before the chain instead, and the blocks that read it take it as context; the block keeps
computing everything that depends on its input's values. A value that does depend on them
cannot leave a chain, whose intermediate states are not kept: the block is refused.

What the moved nodes read of the input is its shape, dtype or device, or those of a value the
block computes from it (``q.device``, ``norm(x).shape``). Every block of a chain sees a state of
the same shape, dtype and device, so such a read is taken from the chain's input:

* a read of the block's input is that read of the chain's input;
* a read of a value computed from the input is taken from the input where the example shows
  the same shape (dtype) on both, and the block checks at run time that they agree (the
  device, which the example does not record, too), raising a clear error where not.

Nodes that draw random numbers, change a tensor in place or update a module's state are not
moved (that would change what runs in which order); the block is refused then.

Examples
--------
>>> import torch
>>> from torch import fx, nn
>>> from fxmomentum.surgery.match import find_chains
>>> from torch.fx.passes.shape_prop import ShapeProp
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.table = nn.Parameter(torch.randn(16, 4))
...         self.norms = nn.ModuleList(nn.LayerNorm(4) for _ in range(3))
...         self.fs = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
...     def forward(self, x):
...         bias = None
...         for norm, f in zip(self.norms, self.fs):
...             h = norm(x)
...             if bias is None:  # the first block computes it, from the length of h
...                 bias = self.table[: h.shape[1]]
...             x = x + f(h) * bias
...         return x
>>> gm = fx.symbolic_trace(Net())
>>> ShapeProp(gm).propagate(torch.randn(2, 5, 4)).shape
torch.Size([2, 5, 4])
>>> chains = find_chains(gm.graph, dict(gm.named_modules())).chains
>>> [len(c.blocks) for c in chains], [n.name for n in chains[0].blocks[0].hoisted]
([3], ['getattr_1', 'getitem', 'getitem_1'])
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import fx

from ..capture.effects import side_effect
from .dataflow import DataFlow, format_meta, is_metadata_read, tensor_meta

__all__ = ["Hoist", "check_reads", "hoist", "valued"]


@dataclass
class Hoist:
    """What a block computes that is moved ahead of its chain.

    Attributes
    ----------
    nodes : set of torch.fx.Node
        The moved nodes (they leave the block; the blocks that read them take them as
        context).
    reads : dict of torch.fx.Node to torch.fx.Node
        Each moved read of a shape, dtype or device (``getattr(v, "shape")``, ``v.size(1)``)
        whose value ``v`` is the block's input, or a value computed from it: ahead of the chain
        it reads the chain's input instead.
    """

    nodes: set[fx.Node] = field(default_factory=set)
    reads: dict[fx.Node, fx.Node] = field(default_factory=dict)


def valued(g: DataFlow, inputs: Iterable[fx.Node], inner: Iterable[fx.Node]) -> set[fx.Node]:
    """The block's input and the nodes of ``inner`` computed from its values (a read of a
    shape, dtype or device stops that: ``x.shape[1]`` is not computed from ``x``'s values)."""
    found = set(inputs)
    for n in sorted(inner, key=g.index.__getitem__):
        if not is_metadata_read(n) and any(i in found for i in n.all_input_nodes):
            found.add(n)
    return found


def hoist(
    g: DataFlow,
    inner: set[fx.Node],
    entry: fx.Node,
    escaping: Iterable[fx.Node],
    computed: set[fx.Node],
) -> Hoist | str:
    """The nodes of a block to compute ahead of its chain, or why they cannot be.

    Parameters
    ----------
    g : DataFlow
        The graph.
    inner : set of torch.fx.Node
        The block's nodes before its add.
    entry : torch.fx.Node
        The block's input.
    escaping : iterable of torch.fx.Node
        Nodes of ``inner`` that code outside the block reads, none of them in ``computed``.
    computed : set of torch.fx.Node
        What :func:`valued` gives for the block.

    Returns
    -------
    Hoist or str
        The escaping nodes and what they are computed from inside the block, or the reason
        one of them cannot be moved.
    """
    found = Hoist()
    todo = sorted(escaping, key=g.index.__getitem__, reverse=True)
    while todo:
        n = todo.pop()
        if n in found.nodes:
            continue
        why = side_effect(n, g.modules)
        if why is not None:
            return (
                f"`{n.name}` is computed inside the block and read outside it; it does not "
                f"depend on the block input's values, but it {why}, so it cannot be computed "
                f"before the chain"
            )
        found.nodes.add(n)
        if is_metadata_read(n) and n.args[0] in computed:
            value = n.args[0]
            why = None if value is entry else _same_metadata(n, value, entry)
            if why is not None:
                return f"`{n.name}` is read outside the block: {why}"
            found.reads[n] = value
            continue
        todo.extend(i for i in n.all_input_nodes if i in inner and i not in found.nodes)
    return found


def _attribute(read: fx.Node) -> str:
    """``shape``, ``dtype``, ``device`` or ``ndim`` for a read of a value's metadata."""
    if read.op == "call_function":
        return str(read.args[1])
    return "ndim" if read.target == "dim" else "shape"


def _same_metadata(read: fx.Node, value: fx.Node, entry: fx.Node) -> str | None:
    """Why ``read`` of ``value`` cannot be taken from the block's input ``entry``, or None
    (the device is checked at run time only: the example does not record it)."""
    what = _attribute(read)
    a, b = tensor_meta(value), tensor_meta(entry)
    if a is None or b is None:
        return (
            f"it reads the {what} of `{value.name}`, computed from the block input's values, "
            f"and without shapes (example_inputs) that cannot be taken from the input"
        )
    if what == "dtype" and a.dtype != b.dtype:
        same = False
    elif what in ("shape", "ndim"):
        same = tuple(a.shape) == tuple(b.shape) if what == "shape" else len(a.shape) == len(b.shape)
    else:
        same = True
    if same:
        return None
    return (
        f"it reads the {what} of `{value.name}` ({format_meta(a)}), computed from the block "
        f"input's values, which is not the input's ({format_meta(b)})"
    )


def check_reads(
    g: fx.Graph,
    reads: Mapping[fx.Node, fx.Node],
    value: fx.Node,
    env: Mapping[fx.Node, fx.Node],
    entry: fx.Node,
) -> None:
    """Add to ``g`` (a block's graph) the checks that each read of ``value`` taken ahead of the
    chain from its input gives what the block reads there (``reads`` as :attr:`Hoist.reads`,
    ``entry`` the block's input, ``env`` maps both to ``g``)."""
    for read, read_of in reads.items():
        if read_of is not value or value is entry:
            continue
        mine = g.node_copy(read, lambda a: env[a])
        theirs = g.node_copy(read, lambda a, e=env[entry], v=read_of: e if a is v else env[a])
        same = g.call_function(operator.eq, (mine, theirs))
        message = (
            f"`{value.name}` has another {_attribute(read)} than the chain's input: "
            f"fxmomentum computed `{read.name}` ahead of the chain from the input's (they were "
            f"the same on the example inputs). Convert the model with example inputs like "
            f"these, or exclude this chain"
        )
        g.call_function(torch._assert, (same, message))
