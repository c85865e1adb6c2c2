"""ConversionReport: what a conversion found, changed and left alone, and why.

The report is data (:class:`ConversionReport`, :class:`ChainInfo`, :class:`BlockInfo`);
``report.as_dict()`` is JSON-ready, and :mod:`fxmomentum.surgery.format` writes it as tables
(``str(report)``, ``report.format("table" | "json" | "markdown")``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..capture import LeafInfo
from .budget import MemoryPlan
from .match import Block, Chain, SkippedAdd

__all__ = [
    "BlockInfo",
    "ChainInfo",
    "ConversionReport",
    "LeafInfo",
    "SkippedAdd",
    "block_info",
    "chain_info",
]


@dataclass
class BlockInfo:
    """One block of a chain.

    Attributes
    ----------
    name : str
        Module path, or the add's node name for a block written in the root's ``forward``.
    path : str
        Module path (may be ``""``).
    kind : str
        ``"pure"`` (returns ``F(x)``) or ``"generalized"`` (returns ``y``, ``f = y - x``).
    entry, exit : str
        Node names of the block's input and last node.
    num_nodes : int
        Nodes in the block.
    context : list of str
        Node names of the values it reads from outside.
    """

    name: str
    path: str
    kind: str
    entry: str
    exit: str
    num_nodes: int
    context: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ChainInfo:
    """A chain of consecutive residual blocks.

    Attributes
    ----------
    name : str or None
        Attribute of the converted module (``momentum_chain_0``); None when not converted.
    blocks : list of BlockInfo
    kind : str
        ``"pure"``, ``"generalized"`` or ``"mixed"``.
    first, last : str
        Names (module paths) of the first and last block.
    shape : tuple of int or None
        Shape of the state ``x`` (None when shapes are unverified).
    dtype : str or None
    num_params : int
        Elements of the distinct parameters its blocks use.
    converted : bool
    reason : str
        Why it is not converted (empty when it is).
    saved_bytes : int or None
        Estimated activation memory a training step saves (see :func:`estimate_saved_bytes`).
    gamma : float or None
        Momentum of the converted chain.
    """

    name: str | None
    blocks: list[BlockInfo]
    kind: str
    first: str
    last: str
    shape: tuple[int, ...] | None
    dtype: str | None
    num_params: int
    converted: bool = False
    reason: str = ""
    saved_bytes: int | None = None
    gamma: float | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_blocks": self.num_blocks,
            "kind": self.kind,
            "first": self.first,
            "last": self.last,
            "shape": list(self.shape) if self.shape is not None else None,
            "dtype": self.dtype,
            "num_params": self.num_params,
            "converted": self.converted,
            "reason": self.reason,
            "saved_bytes": self.saved_bytes,
            "gamma": self.gamma,
            "blocks": [b.as_dict() for b in self.blocks],
        }


def block_info(block: Block) -> BlockInfo:
    """Describe a :class:`~fxmomentum.surgery.match.Block`."""
    return BlockInfo(
        block.name,
        block.path,
        block.kind,
        block.entry.name,
        block.exit.name,
        len(block.nodes),
        [c.name for c in block.context],
    )


def chain_info(chain: Chain, modules: Mapping[str, nn.Module]) -> ChainInfo:
    """Describe a :class:`~fxmomentum.surgery.match.Chain` (not yet converted)."""
    params: dict[int, int] = {}
    for n in chain.nodes:
        if n.op == "call_module" and str(n.target) in modules:
            for p in modules[str(n.target)].parameters():
                params[id(p)] = p.numel()
    for c in chain.context:
        if c.op == "get_attr":
            owner, _, attr = str(c.target).rpartition(".")
            value = getattr(modules.get(owner), attr, None)
            if isinstance(value, nn.Parameter):
                params[id(value)] = value.numel()
    tm = chain.entry.meta.get("tensor_meta")
    shape = tuple(int(s) for s in tm.shape) if hasattr(tm, "shape") else None
    dtype = str(tm.dtype).replace("torch.", "") if hasattr(tm, "dtype") else None
    return ChainInfo(
        name=None,
        blocks=[block_info(b) for b in chain.blocks],
        kind=chain.kind,
        first=chain.blocks[0].name,
        last=chain.blocks[-1].name,
        shape=shape,
        dtype=dtype,
        num_params=sum(params.values()),
        converted=False,
        reason=chain.reason,
    )


@dataclass
class ConversionReport:
    """What :func:`fxmomentum.convert` / :func:`fxmomentum.inspect` found and did.

    Attributes
    ----------
    model : str
        Class name of the model.
    chains : list of ChainInfo
        Every chain found, converted or not.
    skipped : list of SkippedAdd
        Residual adds that are not part of any chain: ``.node``, ``.path``, ``.reason``.
    leaves : list of LeafInfo
        Submodules kept opaque: ``.path``, ``.type``, ``.reason``.
    nodes_before, nodes_after : int
        Nodes of the top-level graph before and after the rewrite (predicted by ``inspect``).
    shapes_verified : bool
        Whether shapes and dtypes were checked on example inputs.
    code_before, code_after : str
        Python code of the top-level graph before and after.
    use_backprop : bool
    notes : list of str
    plan : MemoryPlan or None
        With ``memory_budget``: every region's strategy and the estimates behind it.
    inputs_given : bool
        Whether example inputs were given (shapes may still be unverified: shape propagation
        can fail on them).

    Examples
    --------
    >>> import fxmomentum, torchvision
    >>> report = fxmomentum.inspect(torchvision.models.resnet18())
    >>> [c.num_blocks for c in report.chains]
    [2, 1, 1, 1]
    >>> report.as_dict()["chains"][0]["num_blocks"]
    2
    """

    model: str
    chains: list[ChainInfo] = field(default_factory=list)
    skipped: list[SkippedAdd] = field(default_factory=list)
    leaves: list[LeafInfo] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    shapes_verified: bool = False
    code_before: str = ""
    code_after: str = ""
    use_backprop: bool = False
    notes: list[str] = field(default_factory=list)
    plan: MemoryPlan | None = None
    inputs_given: bool = False

    @property
    def converted(self) -> list[ChainInfo]:
        """The chains that are converted."""
        return [c for c in self.chains if c.converted]

    @property
    def saved_bytes(self) -> int | None:
        """Estimated saving over the converted chains (None if shapes are unverified)."""
        values = [c.saved_bytes for c in self.converted]
        if any(v is None for v in values):
            return None
        return sum(v for v in values if v is not None)

    def summary(self) -> str:
        """One line: chains, blocks, skipped adds, graph size, shape status."""
        blocks = sum(c.num_blocks for c in self.converted)
        shapes = "shapes verified" if self.shapes_verified else "shapes unverified"
        return (
            f"{self.model}: {len(self.chains)} residual chain(s), {len(self.converted)} converted "
            f"({blocks} blocks); {len(self.skipped)} residual add(s) skipped; "
            f"{len(self.leaves)} opaque module(s); graph {self.nodes_before} -> "
            f"{self.nodes_after} nodes; {shapes}"
        )

    def as_dict(self, code: bool = False) -> dict[str, Any]:
        """JSON-ready dictionary (``code=True`` adds the code before and after)."""
        d: dict[str, Any] = {
            "model": self.model,
            "num_chains": len(self.chains),
            "num_converted": len(self.converted),
            "num_blocks_converted": sum(c.num_blocks for c in self.converted),
            "chains": [c.as_dict() for c in self.chains],
            "skipped": [
                {"node": s.node, "module": s.path, "reason": s.reason} for s in self.skipped
            ],
            "leaves": [{"module": m.path, "type": m.type, "reason": m.reason} for m in self.leaves],
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "shapes_verified": self.shapes_verified,
            "saved_bytes": self.saved_bytes,
            "use_backprop": self.use_backprop,
            "notes": list(self.notes),
        }
        if self.plan is not None:
            d["plan"] = self.plan.as_dict()
        if code:
            d["code_before"] = self.code_before
            d["code_after"] = self.code_after
        return d

    def format(self, fmt: str = "table") -> str:
        """The report as ``"table"`` (plain text), ``"json"`` or ``"markdown"``."""
        from .format import format_report

        return format_report(self, fmt)

    def __str__(self) -> str:
        return self.format("table")
