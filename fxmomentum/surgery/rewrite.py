"""Rewrite: each chain of residual blocks becomes one call of a :class:`MomentumChain`.

The top-level graph keeps every node outside the chains; a chain's nodes are replaced by a
single ``call_module`` node (``momentum_chain_0(x, *context)``). Each block becomes a small
:class:`ChainBlock` (a :class:`torch.fx.GraphModule`) built from its region of the graph, taking
``(x, *context)``.

The converted module (a :class:`ConvertedModule`) keeps every path of the original module tree
(the blocks are not registered under the chain): the modules it calls are the original objects,
the modules it traced through are plain holders of the same parameters and buffers, as in any
GraphModule. So its ``state_dict`` has exactly the original keys. The blocks own no modules: they
look up the modules they call by path in the converted module's tree at each call, so there is
one tree, and replacing a submodule of the converted module (``gm.layer1[0].conv1 = conv``,
``nn.SyncBatchNorm.convert_sync_batchnorm(gm)``) changes what the chains run. ``.to()``,
``.half()``, ``copy.deepcopy``, pickling and ``torch.save`` keep that sharing.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..engine import MomentumChain
from .blocks import ChainBlock, ConvertedModule, named
from .hoist import check_reads
from .layout import map_back, replay
from .match import Block, Chain
from .segments import SEGMENT_PREFIX, cut_segment

__all__ = [
    "CHAIN_PREFIX",
    "block_graph",
    "block_module",
    "block_reads",
    "chain_names",
    "rewrite",
    "top_graph",
]

#: Attribute names of the chains in a converted module: ``momentum_chain_0``, ...
CHAIN_PREFIX = "momentum_chain_"


def _free_name(root: nn.Module, name: str) -> str:
    while hasattr(root, name):
        name += "_"
    return name


def chain_names(root: nn.Module, count: int) -> list[str]:
    """``count`` free attribute names ``momentum_chain_<k>`` on ``root``.

    Examples
    --------
    >>> chain_names(nn.Module(), 2)
    ['momentum_chain_0', 'momentum_chain_1']
    """
    names, k = [], 0
    while len(names) < count:
        name = f"{CHAIN_PREFIX}{k}"
        if not hasattr(root, name):
            names.append(name)
        k += 1
    return names


def block_graph(block: Block, context: Sequence[fx.Node] | Mapping[fx.Node, int]) -> fx.Graph:
    """The graph of one block: ``(x, *context) -> f(x)`` (pure) or ``-> y`` (generalized).

    Parameters
    ----------
    block : Block
        The block, from :func:`fxmomentum.surgery.match.find_chains`.
    context : sequence of torch.fx.Node, or mapping of torch.fx.Node to int
        The whole chain's context (every block takes all of it, in this order), or each
        context node's position in it.

    Returns
    -------
    torch.fx.Graph
    """
    g = fx.Graph()
    state = g.placeholder("x")
    env: dict[fx.Node, fx.Node] = {}
    if context:
        # Every block receives the chain's whole context and reads its own part of it.
        pack = g.placeholder("*context")
        position = context if isinstance(context, Mapping) else _positions(context)
        for c in block_reads(block):
            if c in position:
                env[c] = g.create_node(
                    "call_function", operator.getitem, (pack, position[c]), {}, name=c.name
                )
    # The state is in the chain's first layout: this block's input is it, laid out again.
    env[block.entry] = replay(g, state, block.layout, env)
    if block.source is not None:
        # The skip widened h; F reads h, which the (wider) state gives back bit for bit.
        env[block.source] = g.call_method("to", (env[block.entry], _dtype(block.source)))
        check_reads(g, block.reads, block.source, env, block.entry)
    for n in block.nodes:
        if n is block.add:
            if block.kind == "pure":
                continue
            env[n] = _out_of_place_add(g, n, env)
            continue
        env[n] = g.node_copy(n, env.__getitem__)
        env[n].meta = dict(n.meta)
        check_reads(g, block.reads, n, env, block.entry)
    if block.kind == "pure":
        out = env[block.branch]
        if _dtype(block.branch) != _dtype(block.entry):
            # A narrower F(x), which the add promotes to x's dtype (exactly) first.
            out = g.call_method("to", (out, _dtype(block.entry)))
        if block.alpha is not None:
            out = g.call_function(operator.mul, (out, block.alpha))
    else:
        out = env[block.exit]
    g.output(map_back(g, out, block.layout, env))
    return g


def block_reads(block: Block) -> list[fx.Node]:
    """What ``block`` reads from outside itself: its context, and what the layout changes
    before it read (sizes); those computed in the chain are among them."""
    seen: dict[fx.Node, None] = {}
    for link in block.layout:
        for n in link.nodes:
            for i in n.all_input_nodes:
                seen.setdefault(i, None)
    for c in block.context:
        seen.setdefault(c, None)
    return list(seen)


def _dtype(node: fx.Node) -> torch.dtype | None:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)


def _positions(context: Sequence[fx.Node]) -> dict[fx.Node, int]:
    return {c: i for i, c in enumerate(context)}


def _out_of_place_add(g: fx.Graph, add: fx.Node, env: Mapping[fx.Node, fx.Node]) -> fx.Node:
    # The block must not change its input in place: the chain still needs x after the block.
    args = fx.map_arg(add.args, env.__getitem__)
    kwargs = fx.map_arg(add.kwargs, env.__getitem__)
    if add.op == "call_method" and add.target == "add_":
        node = g.call_method("add", args, kwargs)
    elif add.op == "call_function" and add.target is operator.iadd:
        node = g.call_function(operator.add, args, kwargs)
    else:
        node = g.node_copy(add, env.__getitem__)
    node.meta = dict(add.meta)
    return node


def block_module(
    root: nn.Module, block: Block, context: Sequence[fx.Node] | Mapping[fx.Node, int]
) -> ChainBlock:
    """A :class:`ChainBlock` running ``block`` on the submodules of ``root`` (not copies).

    It looks them up in ``root`` when it runs: replacing one in ``root`` replaces it in the
    block.

    Examples
    --------
    >>> from fxmomentum.surgery.match import find_chains
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.f = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return x + self.f(x)
    >>> net = Net()
    >>> gm = fx.symbolic_trace(net)
    >>> chain = find_chains(gm.graph, dict(gm.named_modules())).chains[0]
    >>> block = block_module(gm, chain.blocks[0], chain.context)
    >>> block.f is gm.f
    True
    >>> gm.f = nn.Linear(4, 4)
    >>> block.f is gm.f
    True
    """
    return named(ChainBlock(root.__dict__["_modules"], block_graph(block, context)))


def top_graph(graph: fx.Graph, chains: Sequence[Chain], names: Sequence[str]) -> fx.Graph:
    """A copy of ``graph`` with each chain replaced by a ``call_module`` node ``names[i]``.

    The node is placed where the chain's last block ended; it takes ``(x_0, *context)``.
    """
    removed = {n for c in chains for n in c.nodes}
    at_exit = {c.exit: (c, name) for c, name in zip(chains, names, strict=True)}
    # Shape reads a chain's blocks moved ahead of it read the chain's input.
    moved = {r: (v, c.entry) for c in chains for r, v in c.reads.items()}
    new = fx.Graph(tracer_cls=graph._tracer_cls, tracer_extras=graph._tracer_extras)
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n in at_exit:
            chain, name = at_exit[n]
            args = (env[chain.entry], *(env[c] for c in chain.context))
            node = new.create_node("call_module", name, args, {}, name=name)
            layout = chain.blocks[-1].layout
            for key in ("tensor_meta", "type"):
                meta = (chain.entry if layout else n).meta
                if key in meta:
                    node.meta[key] = meta[key]
            # The state, in the chain's first layout, as the last block left it.
            env[n] = replay(new, node, layout, env)
        elif n in moved:
            value, entry = moved[n]
            env[n] = new.node_copy(n, lambda a, v=value, e=entry: env[e] if a is v else env[a])
        elif n not in removed:
            env[n] = new.node_copy(n, env.__getitem__)
    return new


def _adopt_tree(
    gm: fx.GraphModule, root: nn.Module, graphs: Sequence[fx.Graph], namespace: dict[str, Any]
) -> None:
    """Give ``gm`` the whole module tree of ``root``, path for path, in the dict ``namespace``.

    GraphModule keeps only the modules its graph names. Here every path of ``root`` stays, so
    that ``state_dict`` keys, their order and buffer persistence are the original's: modules
    the graphs call are the original objects; the others (modules traced through, or unused)
    become holders of the same parameters, buffers and children (plain ``nn.Module``, or a
    shallow copy for torch's containers such as ``nn.Sequential``), as in any GraphModule,
    so that loading a saved model needs only the classes of called modules.
    """
    called = {id(root.get_submodule(str(n.target)))
              for g in graphs for n in g.nodes if n.op == "call_module"}  # fmt: skip
    memo: dict[int, nn.Module] = {}
    namespace.clear()
    namespace.update(
        (name, None if child is None else _plain_tree(child, called, memo))
        for name, child in root._modules.items()
    )
    gm.__dict__["_modules"] = namespace
    gm.__dict__["_parameters"] = dict(root._parameters)
    gm.__dict__["_buffers"] = dict(root._buffers)
    gm.__dict__["_non_persistent_buffers_set"] = set(root._non_persistent_buffers_set)
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            _resolve(gm, str(node.target))
        except AttributeError:
            # A tensor constant the tracer stored on the root: keep it, out of state_dict.
            value = _resolve(root, str(node.target))
            owner, _, field = str(node.target).rpartition(".")
            module = gm.get_submodule(owner)
            if isinstance(value, torch.Tensor):
                module.register_buffer(field, value, persistent=False)
            else:
                setattr(module, field, value)


def _plain_tree(module: nn.Module, called: set[int], memo: dict[int, nn.Module]) -> nn.Module:
    key = id(module)
    if key in memo:  # a module registered at several paths stays one object
        return memo[key]
    if key in called or (type(module).__module__.startswith("torch.") and not module._modules):
        memo[key] = module
        return module
    if type(module).__module__.startswith("torch."):
        # torch's own containers keep their class (``gm.layer1[0]`` still works).
        holder = copy.copy(module)
    else:
        holder = nn.Module()
        holder.training = module.training
    memo[key] = holder
    holder.__dict__["_parameters"] = dict(module._parameters)
    holder.__dict__["_buffers"] = dict(module._buffers)
    holder.__dict__["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    holder.__dict__["_modules"] = {
        name: None if child is None else _plain_tree(child, called, memo)
        for name, child in module._modules.items()
    }
    return holder


def _resolve(module: nn.Module, target: str) -> object:
    obj: object = module
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def rewrite(
    root: nn.Module,
    graph: fx.Graph,
    chains: Sequence[Chain],
    gammas: Sequence[float],
    *,
    use_backprop: bool = False,
    strategies: Sequence[str] | None = None,
    segments: Sequence[Sequence[str]] = (),
    plain_modes: Sequence[Sequence[str]] = (),
    chain_options: Sequence[Mapping[str, Any]] | None = None,
) -> fx.GraphModule:
    """Build the converted GraphModule.

    Parameters
    ----------
    root : nn.Module
        The traced module (its submodules become the converted module's, not copies).
        The chains are added to it as ``momentum_chain_<k>``.
    graph : torch.fx.Graph
        Its graph (left unchanged).
    chains : sequence of Chain
        The chains to convert.
    gammas : sequence of float
        One momentum per chain.
    use_backprop : bool
        ``False``: reversible chains; ``True``: plain autograd.
    strategies : sequence of str, optional
        Per chain, its strategy (``MomentumChain``'s ``strategy``), from the memory planner;
        by default as ``use_backprop`` says.
    segments : sequence of sequences of str
        Runs of nodes of the rewritten graph (by name) to recompute in backward
        (:mod:`fxmomentum.surgery.segments`), from the memory planner.
    plain_modes : sequence of sequences of str
        Per chain, the modes in which it runs with plain autograd (``MomentumChain``'s
        ``plain_modes``); by default none.
    chain_options : sequence of mappings, optional
        Per chain, more ``MomentumChain`` arguments from the memory planner (``saved_ops``,
        ``recompute_span``); by default none.

    Returns
    -------
    ConvertedModule
        A :class:`torch.fx.GraphModule` with the state_dict keys of ``root``.

    Examples
    --------
    >>> from fxmomentum.surgery.match import find_chains
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fs = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    ...     def forward(self, x):
    ...         for f in self.fs:
    ...             x = x + f(x)
    ...         return x
    >>> net = Net()
    >>> graph = fx.Tracer().trace(net)
    >>> chains = find_chains(graph, dict(net.named_modules())).chains
    >>> gm = rewrite(net, graph, chains, [0.9])
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'output']
    """
    if len(gammas) != len(chains):
        raise ValueError(f"{len(gammas)} gammas for {len(chains)} chains")
    names = chain_names(root, len(chains))
    strategies = list(strategies or [None] * len(chains))
    modes = list(plain_modes or [()] * len(chains))
    options = list(chain_options or [{}] * len(chains))
    # The converted module's ``_modules``: the blocks look their modules up in it.
    namespace: dict[str, Any] = {}
    block_graphs: list[fx.Graph] = []
    for chain, name, gamma, strategy, plain, more in zip(
        chains, names, gammas, strategies, modes, options, strict=True
    ):
        positions = _positions(chain.context)
        blocks = [named(ChainBlock(namespace, block_graph(b, positions))) for b in chain.blocks]
        block_graphs += [b.graph for b in blocks]
        module = MomentumChain(
            blocks,
            gamma,
            residual=[b.kind == "pure" for b in chain.blocks],
            use_backprop=use_backprop,
            strategy=strategy,
            register_blocks=False,
            names=_block_names(chain.blocks),
            reads=[[positions[c] for c in block_reads(b) if c in positions] for b in chain.blocks],
            plain_modes=plain,
            **more,
        )
        root.add_module(name, module)
    new = top_graph(graph, chains, names)
    for index, nodes in enumerate(segments):
        name = _free_name(root, f"{SEGMENT_PREFIX}{index}")
        segment, segment_graph = cut_segment(new, nodes, name, namespace)
        root.add_module(name, segment)
        block_graphs.append(segment_graph)
    gm = ConvertedModule(root, new, class_name=type(root).__name__)
    _adopt_tree(gm, root, [new, *block_graphs], namespace)
    gm.graph.lint()
    gm.recompile()
    return named(gm)


def _block_names(blocks: Sequence[Block]) -> list[str]:
    counts: dict[str, int] = {}
    for b in blocks:
        counts[b.name] = counts.get(b.name, 0) + 1
    seen: dict[str, int] = {}
    names = []
    for b in blocks:
        if counts[b.name] == 1:
            names.append(b.name)
        else:
            k = seen.get(b.name, 0)
            seen[b.name] = k + 1
            names.append(f"{b.name}#{k}")
    return names
