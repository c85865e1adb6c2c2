"""Graph modules that share one module tree: a chain's blocks and the converted model.

A :class:`ChainBlock` runs one block (or one recomputed segment) of a converted graph and owns
no modules: it looks up the modules it calls, by path, in the converted model's own
``_modules`` dict, so there is one tree and ``state_dict`` keys stay the original's. The
:class:`ConvertedModule` keeps that dict the blocks read through ``copy.deepcopy`` and
pickling.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

__all__ = ["ChainBlock", "ConvertedModule", "named"]


class ChainBlock(fx.GraphModule):
    """One block of a chain: a graph that calls the modules of the model it was cut from.

    The block owns no submodules. Each module its graph calls is looked up by path in
    ``namespace`` (the ``_modules`` dict of the converted model) when the block runs, so
    replacing a submodule of the model changes what the block runs. :meth:`named_modules`,
    and so ``parameters()`` and ``buffers()``, list the modules the graph calls (with their
    submodules) under their paths in the model; the modules only traced through are not
    listed. Move or cast the model, not the block: ``.to()`` and ``.train()`` on the block
    reach none of the modules. Copying or pickling a block alone copies the whole model it
    reads from.

    Parameters
    ----------
    namespace : dict of str to nn.Module
        The top-level modules of the model, by name: the model's own ``_modules`` dict, so
        that assignments to the model are seen.
    graph : torch.fx.Graph
        The block's graph; it reads parameters and buffers as context (``get_attr`` nodes
        are refused).

    Examples
    --------
    >>> import torch
    >>> from torch import fx, nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    >>> g = fx.Graph()
    >>> g.output(g.call_module("1", (g.call_module("0", (g.placeholder("x"),)),)))
    output
    >>> block = ChainBlock(net._modules, g)
    >>> net[0] = nn.Identity()
    >>> [name for name, _ in block.named_modules()]
    ['', '0', '1']
    >>> block(torch.zeros(1, 4)).abs().sum().item()
    0.0
    """

    #: Its generated code only calls functions and the model's modules (which are watched on
    #: their own): a reversible chain need not snapshot the block's attributes before each call.
    keeps_no_tensors = True

    def __init__(self, namespace: dict[str, nn.Module], graph: fx.Graph) -> None:
        # GraphModule gets an empty graph (it would copy the called modules into holders),
        # not compiled: code is generated once, for the block's graph.
        self.__dict__["_placeholder_graph"] = True
        super().__init__(nn.Module(), fx.Graph(), class_name="Block")
        del self.__dict__["_placeholder_graph"]
        self.__dict__["_namespace"] = namespace
        self.graph = graph

    def recompile(self) -> Any:
        """Regenerate the code, and the paths of the modules it calls, from the graph."""
        if self.__dict__.get("_placeholder_graph"):
            return None
        paths: dict[str, None] = {}
        for n in self.graph.nodes:
            if n.op == "get_attr":
                raise ValueError(
                    f"a chain block reads parameters and buffers as context, not by get_attr "
                    f"({n.target!r})"
                )
            if n.op == "call_module":
                paths.setdefault(str(n.target), None)
        self.__dict__["_paths"] = tuple(paths)
        self.__dict__["_path_atoms"] = tuple(tuple(p.split(".")) for p in paths)
        self.__dict__["_roots"] = frozenset(p.split(".")[0] for p in paths)
        self.__dict__["draws_nothing"] = all(_draws_nothing(n) for n in self.graph.nodes)
        return super().recompile()

    def __getattr__(self, name: str) -> Any:
        # Only names the graph starts a call path with resolve to the model's modules.
        if name in self.__dict__.get("_roots", ()):
            module = self.__dict__["_namespace"].get(name)
            if module is not None:
                return module
        return super().__getattr__(name)

    def named_modules(
        self,
        memo: set[nn.Module] | None = None,
        prefix: str = "",
        remove_duplicate: bool = True,
    ) -> Iterator[tuple[str, nn.Module]]:
        """The block, then each module its graph calls (and their submodules), by path.

        Parameters and buffers of the block are those of these modules.
        """
        if memo is None:
            memo = set()
        if self in memo:
            return
        if remove_duplicate:
            memo.add(self)
        yield prefix, self
        for path, atoms in zip(self.__dict__["_paths"], self.__dict__["_path_atoms"], strict=True):
            module = self._called(path, atoms)
            full = f"{prefix}.{path}" if prefix else path
            yield from module.named_modules(memo, full, remove_duplicate)

    def _called(self, path: str, atoms: tuple[str, ...]) -> nn.Module:
        """The module at ``path``, looked up in the modules' own dicts (a reversible chain lists
        its blocks' modules at every call; ``get_submodule`` goes through ``__getattr__``)."""
        module = self.__dict__["_namespace"].get(atoms[0])
        for atom in atoms[1:]:
            module = module._modules.get(atom) if isinstance(module, nn.Module) else None
        if not isinstance(module, nn.Module):
            return self.get_submodule(path)  # its error says what is missing
        return module

    def __deepcopy__(self, memo: dict[int, Any]) -> ChainBlock:
        res = type(self).__new__(type(self))
        memo[id(self)] = res  # before the namespace: the model holds this block
        namespace = copy.deepcopy(self.__dict__["_namespace"], memo)
        ChainBlock.__init__(res, namespace, copy.deepcopy(self.graph, memo))
        res.training = self.training
        res.meta = copy.deepcopy(self.meta, memo)
        return named(res)

    def __reduce__(self) -> tuple[Any, ...]:
        # GraphModule's pickle (code, re-traced on load) with the namespace kept by reference.
        # Unpickling may build the block before the namespace dict is filled, so the code is
        # re-traced against the top-level modules it reads, saved alongside.
        _, (body, import_block) = super().__reduce__()
        namespace = body.pop("_namespace")
        body["_modules"] = {name: namespace[name] for name in self._roots if name in namespace}
        return (_restore_block, (namespace, body, import_block))


#: What a block's graph may call besides modules without drawing a random number (anything
#: else may: the block's forward then notes the RNG state for its recomputation).
_PLAIN_FUNCTIONS = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.neg,
        operator.getitem,
        getattr,
        torch.add,
        torch.mul,
        torch.cat,
        torch.flatten,
        torch.relu,
        torch.tanh,
        torch.nn.functional.relu,
    }
)
_PLAIN_METHODS = frozenset(
    {"add", "mul", "view", "reshape", "flatten", "permute", "transpose", "contiguous", "size"}
)


def _draws_nothing(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _PLAIN_FUNCTIONS
    if node.op == "call_method":
        return node.target in _PLAIN_METHODS
    return True  # placeholders, outputs, and modules (listed, and judged, on their own)


def _restore_block(namespace: dict[str, nn.Module], body: dict[str, Any], import_block: str):
    traced = fx.graph_module.reduce_graph_module(body, import_block)
    block = ChainBlock(namespace, traced.graph)
    block.training = bool(body.get("training", True))
    return named(block)


class ConvertedModule(fx.GraphModule):
    """The converted model: a GraphModule whose chains' blocks read its own module tree.

    Its ``_modules`` dict is the namespace of every :class:`ChainBlock` of its chains;
    ``copy.deepcopy`` and pickling keep it so (GraphModule alone would rebuild the dict).
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> ConvertedModule:
        res = super().__deepcopy__(memo)
        # GraphModule rebuilt ``_modules`` with the same children; the copied blocks read the
        # copy of the original dict: make it the model's.
        res.__dict__["_modules"] = memo[id(self.__dict__["_modules"])]
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        _, (body, import_block) = super().__reduce__()
        return (_restore_converted, (body, import_block))


_TREE = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set")


def _restore_converted(body: dict[str, Any], import_block: str) -> ConvertedModule:
    plain = fx.graph_module.reduce_graph_module(body, import_block)
    gm = ConvertedModule(plain, plain.graph, class_name=type(plain).__name__)
    for key in _TREE:
        gm.__dict__[key] = body[key]  # the dicts the blocks read, not copies
    for key, value in plain.__dict__.items():
        gm.__dict__.setdefault(key, value)
    return named(gm)


def named(gm: fx.GraphModule) -> fx.GraphModule:
    # torch.load rebuilds a GraphModule under this class name (torch.fx reads it from the
    # module's __dict__; only torch.package writes it otherwise).
    gm.__dict__["_graphmodule_cls_name"] = type(gm).__name__
    return gm
