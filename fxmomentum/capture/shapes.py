"""Shapes and dtypes of a captured graph, from torch.fx's own ShapeProp on example inputs.

:func:`propagate_shapes` fills ``node.meta["tensor_meta"]`` without side effects on the model
(:func:`~fxmomentum.capture.probe.no_side_effects`) and names the node that failed.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import one_line
from .probe import as_tuple, no_side_effects

__all__ = ["ShapePropagationError", "clear_shapes", "propagate_shapes"]


def propagate_shapes(
    gm: fx.GraphModule,
    example_inputs: torch.Tensor | Sequence[Any],
    owner: nn.Module | None = None,
    *,
    var_keyword: Mapping[str, Any] | None = None,
) -> Any:
    """Run :class:`~torch.fx.passes.shape_prop.ShapeProp` on ``gm`` without side effects.

    Fills ``node.meta["tensor_meta"]`` and returns the graph's output. Buffers (BatchNorm
    running statistics) are restored and the global random state is left as it was.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The graph to run.
    example_inputs : Tensor or sequence
        Its positional inputs.
    owner : nn.Module, optional
        Module whose buffers to restore (default: ``gm``).
    var_keyword : mapping, optional
        The value of the graph's ``**kwargs`` placeholder, if it has one.

    Raises
    ------
    ShapePropagationError
        Naming the node that failed; the nodes before it keep the metadata they got (see
        :func:`clear_shapes`).

    Examples
    --------
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 5)))
    >>> out = propagate_shapes(gm, torch.randn(2, 3))
    >>> list(gm.graph.nodes)[1].meta["tensor_meta"].shape
    torch.Size([2, 5])
    """
    inputs = as_tuple(example_inputs)
    owner = gm if owner is None else owner
    prop = _ShapeProp(gm, var_keyword)
    try:
        with no_side_effects(owner, inputs):
            # ShapeProp prints the traceback of a failing node itself; the caller reports it.
            with contextlib.redirect_stderr(io.StringIO()):
                return prop.propagate(*inputs)
    except Exception as e:
        node = prop.current
        if node is None:
            raise
        cause = e.__cause__ if e.__cause__ is not None else e
        raise ShapePropagationError(
            f"at node `{node.name}` ({_describe_target(node)}): {one_line(cause, 160)}", node.name
        ) from cause


def clear_shapes(graph: fx.Graph) -> None:
    """Remove what shape propagation wrote (``tensor_meta``, ``type``) from every node.

    Examples
    --------
    >>> gm = fx.symbolic_trace(nn.Linear(2, 2))
    >>> _ = propagate_shapes(gm, torch.randn(1, 2))
    >>> clear_shapes(gm.graph)
    >>> any("tensor_meta" in n.meta for n in gm.graph.nodes)
    False
    """
    for node in graph.nodes:
        node.meta.pop("tensor_meta", None)
        node.meta.pop("type", None)


class ShapePropagationError(RuntimeError):
    """Shape propagation failed at a node of the graph.

    Attributes
    ----------
    node : str
        Name of the node that raised.
    """

    def __init__(self, message: str, node: str) -> None:
        super().__init__(message)
        self.node = node


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running (to name it when it fails), and gives
    a ``**kwargs`` placeholder its dict (torch.fx's Interpreter gives it the leftover
    positional values)."""

    def __init__(self, gm: fx.GraphModule, var_keyword: Mapping[str, Any] | None = None) -> None:
        super().__init__(gm)
        self.current: fx.Node | None = None
        self.var_keyword = dict(var_keyword or {})

    def placeholder(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if str(target).startswith("**"):
            return dict(self.var_keyword)
        return super().placeholder(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        self.current = None
        return result


def _describe_target(node: fx.Node) -> str:
    if node.op in ("call_module", "call_method", "get_attr"):
        return f"{node.op} {node.target}"
    name = getattr(node.target, "__name__", None) or str(node.target)
    return f"{node.op} {name}"
