"""ConversionReport: what a conversion found, changed and left alone, and why.

``str(report)`` is a set of tables (tabulate); ``report.as_dict()`` is JSON-ready;
``report.format("table" | "json" | "markdown")`` gives either as a string.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch import fx, nn

from .capture import LeafInfo
from .exact import GAMMA_DENOM, quantize_gamma
from .match import Block, Chain, SkippedAdd

__all__ = [
    "BlockInfo",
    "ChainInfo",
    "ConversionReport",
    "LeafInfo",
    "SkippedAdd",
    "block_info",
    "chain_info",
    "estimate_saved_bytes",
]

FORMATS = ("table", "json", "markdown")

# Ops whose output is a view of their input (no activation memory of their own).
_VIEW_METHODS = frozenset(
    {"view", "view_as", "reshape", "reshape_as", "permute", "transpose", "flatten", "unflatten",
     "squeeze", "unsqueeze", "expand", "expand_as", "chunk", "split", "unbind", "narrow",
     "select", "t", "size", "dim", "detach"}
)  # fmt: skip
_VIEW_FUNCTIONS = frozenset(
    {torch.permute, torch.reshape, torch.flatten, torch.transpose, torch.squeeze,
     torch.unsqueeze, torch.chunk, torch.split, torch.unbind, torch.narrow, torch.select,
     operator.getitem, getattr}
)  # fmt: skip


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


def _tensor_bytes(node: fx.Node) -> int | None:
    tm = node.meta.get("tensor_meta")
    if not hasattr(tm, "shape"):
        return None
    size = torch.empty((), dtype=tm.dtype).element_size()
    return math.prod(tm.shape) * size


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    return False


def estimate_saved_bytes(chain: Chain, gamma: float, use_backprop: bool = False) -> int | None:
    """Activation memory a training step saves by running ``chain`` reversibly (an estimate).

    Plain autograd keeps, roughly, the output of every op inside the chain (views excluded)
    until backward; the chain's output is kept by the next layer either way. The reversible
    chain keeps instead its final exact state, about ``8 + T * log2(1 / gamma) / 8`` bytes per
    element of ``x`` for ``T`` blocks (the lost bits of ``gamma``, see DESIGN.md).

    Returns None when shapes are unknown, 0 with ``use_backprop=True``.
    """
    x_bytes = _tensor_bytes(chain.entry)
    if x_bytes is None:
        return None
    if use_backprop:
        return 0
    stored = 0
    for n in chain.nodes:
        if n is chain.exit or _is_view(n):
            continue
        stored += _tensor_bytes(n) or 0
    tm = chain.entry.meta["tensor_meta"]
    numel = math.prod(tm.shape)
    n = quantize_gamma(gamma)
    lost_bits = len(chain.blocks) * math.log2(GAMMA_DENOM / n) if n > 0 else math.inf
    cost = numel * (8 + lost_bits / 8)
    return int(stored - cost) if math.isfinite(cost) else None


def block_info(block: Block) -> BlockInfo:
    """Describe a :class:`~fxmomentum.match.Block`."""
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
    """Describe a :class:`~fxmomentum.match.Chain` (not yet converted)."""
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


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return "?"  # pragma: no cover


def _count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


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
        if code:
            d["code_before"] = self.code_before
            d["code_after"] = self.code_after
        return d

    def _tables(self, tablefmt: str) -> list[tuple[str, str]]:
        rows = []
        for i, c in enumerate(self.chains):
            shape = "x".join(map(str, c.shape)) if c.shape is not None else "?"
            status = "converted" if c.converted else f"not converted: {c.reason}"
            rows.append(
                [
                    i,
                    c.name or "-",
                    c.num_blocks,
                    c.kind,
                    c.first,
                    c.last,
                    f"{shape} {c.dtype or ''}".strip(),
                    _count(c.num_params),
                    "-" if c.gamma is None else f"{c.gamma:g}",
                    _bytes(c.saved_bytes) if c.converted else "-",
                    status,
                ]
            )
        head = ["#", "module", "blocks", "kind", "first", "last", "state", "params", "gamma",
                "saved (est.)", "status"]  # fmt: skip
        out = [("Residual chains", tabulate(rows, head, tablefmt=tablefmt) if rows else "none")]
        if self.skipped:
            # One line each (`str(item)`): the reasons are sentences, too wide for a table.
            bullet = "- " if tablefmt == "github" else "  "
            out.append(("Residual adds skipped", "\n".join(f"{bullet}{s}" for s in self.skipped)))
        if self.leaves:
            rows = [[m.path or "-", m.type, m.reason] for m in self.leaves]
            out.append(("Opaque modules", tabulate(rows, ["module", "type", "reason"],
                                                   tablefmt=tablefmt)))  # fmt: skip
        return out

    def format(self, fmt: str = "table") -> str:
        """The report as ``"table"`` (plain text), ``"json"`` or ``"markdown"``."""
        if fmt == "json":
            return json.dumps(self.as_dict(), indent=2)
        if fmt == "table":
            parts = [self.summary()]
            for title, table in self._tables("simple"):
                parts.append(f"\n{title}\n{table}")
            parts.extend(f"note: {n}" for n in self.notes)
            return "\n".join(parts)
        if fmt == "markdown":
            parts = [f"## {self.model}", "", self.summary()]
            for title, table in self._tables("github"):
                parts += ["", f"### {title}", "", table]
            if self.notes:
                parts += ["", *(f"- note: {n}" for n in self.notes)]
            return "\n".join(parts)
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")

    def __str__(self) -> str:
        return self.format("table")
