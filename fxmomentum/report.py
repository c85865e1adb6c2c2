"""ConversionReport: what a conversion found, changed and left alone, and why.

``str(report)`` is a set of tables (tabulate); ``report.as_dict()`` is JSON-ready;
``report.format("table" | "json" | "markdown")`` gives either as a string.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch import fx, nn

from .capture import LeafInfo, no_side_effects
from .engine import GAMMA_DENOM, quantize_gamma
from .match import Block, Chain, SkippedAdd

__all__ = [
    "BlockInfo",
    "ChainInfo",
    "ConversionReport",
    "LeafInfo",
    "SkippedAdd",
    "autograd_saved_bytes",
    "block_info",
    "chain_info",
    "estimate_saved_bytes",
]

FORMATS = ("table", "json", "markdown")

#: Bytes per element of the chain's activation that a reversible chain keeps until backward
#: besides the lost bits (its exact state; see DESIGN.md).
STATE_BYTES_PER_ELEMENT = 12


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


def _numel(node: fx.Node) -> int | None:
    tm = node.meta.get("tensor_meta")
    if not hasattr(tm, "shape"):
        return None
    return math.prod(tm.shape)


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    """``(key, bytes)`` of the storage under ``t``; None for tensors without one."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


@dataclass
class _Measured:
    """What autograd saved while each node ran, by node name (no reference to the graph)."""

    saved: dict[str, dict[int, int]] = field(default_factory=dict)  # storage -> bytes
    outputs: dict[str, set[int]] = field(default_factory=dict)  # storages of the node's output
    fixed: set[int] = field(default_factory=set)  # parameters and buffers
    current: str | None = None

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        # Autograd keeps this hook with each saved tensor: it must not hold the tensors.
        found = _storage(t)
        if self.current is not None and found is not None:
            self.saved.setdefault(self.current, {})[found[0]] = found[1]
        return t


class _SavedTensors(fx.Interpreter):
    """Runs a graph with grad, recording in ``record`` what autograd saves for each node.

    Values are kept to the end of the run (no storage is freed and reused meanwhile), so a
    storage's address identifies it.
    """

    def __init__(self, gm: fx.GraphModule, record: _Measured) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.record = record

    def placeholder(self, target: Any, args: tuple, kwargs: dict) -> Any:
        # A ``**kwargs`` placeholder takes its dict as one positional input here (torch.fx's
        # Interpreter would hand it the remaining inputs as a list).
        if isinstance(target, str) and target.startswith("**"):
            return next(self.args_iter)
        return super().placeholder(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        self.record.current = n.name
        try:
            result = super().run_node(n)
        finally:
            self.record.current = None
        keys = (_storage(t) for t in torch.utils._pytree.tree_leaves(result)
                if isinstance(t, torch.Tensor))  # fmt: skip
        self.record.outputs[n.name] = {k[0] for k in keys if k is not None}
        return result


#: Per graph: (ids of the example inputs, or () for synthesized ones; the measurement).
_MEASURED: weakref.WeakKeyDictionary[fx.Graph, tuple[tuple[int, ...], _Measured | None]] = (
    weakref.WeakKeyDictionary()
)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _synthesized_inputs(graph: fx.Graph, device: torch.device) -> tuple[Any, ...] | None:
    """Inputs of the shapes and dtypes shape propagation saw: random floats, zero integers."""
    inputs: list[Any] = []
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        tm = n.meta.get("tensor_meta")
        if hasattr(tm, "shape"):
            if tm.dtype.is_floating_point or tm.dtype.is_complex:
                inputs.append(torch.randn(tm.shape, dtype=tm.dtype, device=device))
            else:
                inputs.append(torch.zeros(tm.shape, dtype=tm.dtype, device=device))
        elif n.args:  # a default value
            inputs.append(n.args[0])
        else:
            return None
    return tuple(inputs)


def _measure(graph: fx.Graph, example_inputs: Any) -> _Measured | None:
    """What autograd saves while each node of ``graph`` runs (cached per graph)."""
    if example_inputs is None:
        key: tuple[int, ...] = ()
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
        key = (id(example_inputs[0]),)
    else:
        example_inputs = tuple(example_inputs)
        key = tuple(id(t) for t in example_inputs)
    cached = _MEASURED.get(graph)
    if cached is not None and cached[0] == key:
        return cached[1]
    gm = graph.owning_module
    measured = None
    if gm is not None:
        first = next(iter((*gm.parameters(), *gm.buffers())), None)
        device = first.device if first is not None else torch.device("cpu")
        inputs = _synthesized_inputs(graph, device) if example_inputs is None else example_inputs
        if inputs is not None:
            record = _Measured()
            run = _SavedTensors(gm, record)
            try:
                with (
                    no_side_effects(gm, inputs, grad=True),
                    torch.autograd.graph.saved_tensors_hooks(record.pack, _unpack),
                ):
                    run.run(*inputs)
                measured = record
            except Exception:  # the estimate is unavailable, nothing else is at stake
                pass
            finally:
                run.env.clear()  # the values, and the autograd graph they hold, go now
            record.current = None
            record.fixed = {k[0] for t in (*gm.parameters(), *gm.buffers())
                            if (k := _storage(t)) is not None}  # fmt: skip
    _MEASURED[graph] = (key, measured)
    return measured


def autograd_saved_bytes(chain: Chain, example_inputs: Any = None) -> int | None:
    """Bytes autograd keeps for backward inside ``chain`` during a forward (a measurement).

    The graph the chain was found in is run once with grad (then cached) in the model's
    current train / eval mode, on ``example_inputs`` or, without them, on inputs of the
    shapes and dtypes shape propagation recorded (random floats, zero integers). Every tensor
    autograd saves while a node of the chain runs is counted once per storage; parameters,
    buffers and the chain's input, context and output (which live on outside it) are not.

    Parameters
    ----------
    chain : Chain
        A chain of a graph owned by a GraphModule (as :func:`fxmomentum.capture.capture`
        returns it).
    example_inputs : Tensor or sequence, optional
        The graph's positional inputs.

    Returns
    -------
    int or None
        None when the graph has no shapes (no example inputs) or could not be run.

    Examples
    --------
    >>> from fxmomentum.capture import capture
    >>> from fxmomentum.match import find_chains
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fs = nn.ModuleList(nn.Sequential(nn.Linear(8, 32), nn.Tanh(),
    ...                                               nn.Linear(32, 8)) for _ in range(2))
    ...     def forward(self, x):
    ...         for f in self.fs:
    ...             x = x + f(x)
    ...         return x
    >>> cap = capture(Net(), torch.randn(4, 8))
    >>> chain = find_chains(cap.graph, dict(cap.root.named_modules())).chains[0]
    >>> autograd_saved_bytes(chain)  # per block: tanh's output (4 x 32 float32) and x_1
    1152
    """
    if _numel(chain.entry) is None:
        return None
    measured = _measure(chain.entry.graph, example_inputs)
    if measured is None:
        return None
    outside = set(measured.fixed)
    for n in (chain.entry, *chain.context, chain.exit):
        outside |= measured.outputs.get(n.name, set())
    saved: dict[int, int] = {}
    for n in chain.nodes:
        for key, nbytes in measured.saved.get(n.name, {}).items():
            if key not in outside:
                saved[key] = nbytes
    return sum(saved.values())


def estimate_saved_bytes(
    chain: Chain, gamma: float, use_backprop: bool = False, example_inputs: Any = None
) -> int | None:
    """Activation memory a training step saves by running ``chain`` reversibly (an estimate).

    What plain autograd keeps inside the chain is measured (:func:`autograd_saved_bytes`);
    the reversible chain keeps instead its exact state, about ``12 + T * log2(1 / gamma) / 8``
    bytes per element of ``x`` for ``T`` blocks (the lost bits of ``gamma``, see DESIGN.md).
    The chain's output is kept by the next layer either way; one block's activations while
    backward recomputes it are transient and not counted. A negative value: converting
    costs memory.

    Parameters
    ----------
    chain : Chain
    gamma : float
    use_backprop : bool
        A chain run with plain autograd saves nothing: 0.
    example_inputs : Tensor or sequence, optional
        Inputs of the chain's graph (see :func:`autograd_saved_bytes`).

    Returns
    -------
    int or None
        None when shapes are unknown (no example inputs) or the measurement failed.

    Examples
    --------
    >>> import torchvision
    >>> import fxmomentum
    >>> report = fxmomentum.inspect(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> [c.saved_bytes > 0 for c in report.chains]
    [True, True, True, True]
    >>> fxmomentum.inspect(torchvision.models.resnet18()).chains[0].saved_bytes is None
    True
    """
    numel = _numel(chain.entry)
    if numel is None:
        return None
    if use_backprop:
        return 0
    n = quantize_gamma(gamma)
    if n == 0:
        return None
    saved = autograd_saved_bytes(chain, example_inputs)
    if saved is None:
        return None
    lost_bits = len(chain.blocks) * math.log2(GAMMA_DENOM / n)
    return int(saved - numel * (STATE_BYTES_PER_ELEMENT + lost_bits / 8))


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
        return ""
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

    def _all_notes(self) -> list[str]:
        note = self._estimate_note()
        return [*self.notes, note] if note else list(self.notes)

    def _estimate_note(self) -> str | None:
        if self.use_backprop or not any(c.saved_bytes is None for c in self.converted):
            return None
        why = "example_inputs were not given" if not self.shapes_verified else "it failed"
        return (
            f"saved (est.) unavailable: it measures what autograd saves on example_inputs, "
            f"and {why}"
        )

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
                    "-" if not c.converted else _bytes(c.saved_bytes) or "n/a",
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
            parts.extend(f"note: {n}" for n in self._all_notes())
            return "\n".join(parts)
        if fmt == "markdown":
            parts = [f"## {self.model}", "", self.summary()]
            for title, table in self._tables("github"):
                parts += ["", f"### {title}", "", table]
            if self._all_notes():
                parts += ["", *(f"- note: {n}" for n in self._all_notes())]
            return "\n".join(parts)
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")

    def __str__(self) -> str:
        return self.format("table")
