"""A conversion from start to end: capture -> match -> choose -> rewrite -> report.

:func:`prepare` captures the model (:func:`fxmomentum.capture.descend`), finds the chains of
each captured graph (:mod:`~fxmomentum.surgery.match`), selects them
(:mod:`~fxmomentum.surgery.select`) and chooses, chain by chain, whether and with which gamma
to convert it. :func:`build` rewrites each captured graph (:mod:`~fxmomentum.surgery.rewrite`)
and puts it in place; :func:`make_report` says what was done.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..capture import (
    Capture,
    Descent,
    Note,
    Unit,
    descend,
    kept_tensors,
    no_side_effects,
    undo_tracing,
)
from ..capture.leaf_outputs import compute_leaf_outputs, leaf_output_of
from ..capture.records import FIXED_TYPES
from ..engine import validate_gamma
from ..errors import one_line
from ..paths import join_path
from .budget import MemoryPlan, plan_memory
from .estimate import estimate_saved_bytes
from .inplace import put_in_place
from .match import Chain, MatchResult, SkippedAdd, find_chains
from .options import ConvertOptions, gamma_for_chain
from .report import ChainInfo, ConversionReport, chain_info
from .rewrite import chain_names, rewrite, top_graph
from .select import select_chains

__all__ = [
    "Conversion",
    "ConversionError",
    "UnitChoice",
    "build",
    "chain_adds",
    "check_model",
    "group_notes",
    "make_report",
    "predicted_graphs",
    "prepare",
]


class ConversionError(RuntimeError):
    """The converted model fails on the example inputs it was converted with."""


@dataclass
class UnitChoice:
    """The chains of one captured graph, and which are converted with which gamma."""

    unit: Unit
    match: MatchResult = field(default_factory=MatchResult)
    #: What the report says of every chain found (converted or not), in order.
    infos: list[ChainInfo] = field(default_factory=list)
    chosen: list[Chain] = field(default_factory=list)
    gammas: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    #: Per chosen chain, its strategy (None: as ``use_backprop`` says); from the planner.
    strategies: list[str] | None = None
    #: Per chosen chain, ``MomentumChain`` options from the planner (``saved_ops``,
    #: ``recompute_span``).
    chain_options: list[dict[str, Any]] | None = None
    #: Runs of nodes of the rewritten graph to recompute in backward; from the planner.
    segments: list[list[str]] = field(default_factory=list)
    #: Per chosen chain, the modes in which it runs with plain autograd (see
    #: :func:`_plain_modes`).
    plain_modes: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def path(self) -> str:
        return self.unit.path

    @property
    def module(self) -> nn.Module:
        return self.unit.module

    @property
    def capture(self) -> Capture:
        return self.unit.capture


@dataclass
class Conversion:
    """What :func:`prepare` decided."""

    root: nn.Module
    descent: Descent
    units: list[UnitChoice]
    options: ConvertOptions
    notes: list[Note] = field(default_factory=list)
    plan: MemoryPlan | None = None
    inputs_given: bool = False

    @property
    def whole(self) -> bool:
        """Whether the model itself was captured as one graph."""
        return self.descent.whole

    @property
    def infos(self) -> list[ChainInfo]:
        return [i for u in self.units for i in u.infos]


def chain_adds(graph: fx.Graph, module: nn.Module) -> list[list[fx.Node]]:
    """For each residual chain of ``graph`` (of ``module``), its blocks' residual adds: what
    the descent needs to know of chains (:data:`fxmomentum.capture.ChainFinder`)."""
    chains = find_chains(graph, dict(module.named_modules())).chains
    return [[b.add for b in c.blocks] for c in chains]


def prepare(
    root: nn.Module, options: ConvertOptions, example_inputs: Any, whole: str | None = None
) -> Conversion:
    """Capture ``root`` (in place: pass a copy) and choose what to convert; ``whole``: why the
    model is not to be captured as one graph (see :func:`fxmomentum.capture.descend`)."""
    check_model(root)
    descent = descend(
        root,
        example_inputs,
        options.leaf_modules,
        options.concrete_args,
        find_chains=chain_adds,
        whole=whole,
    )
    conversion = Conversion(root, descent, [UnitChoice(u) for u in descent.units], options)
    conversion.inputs_given = example_inputs is not None
    conversion.notes = list(descent.notes)
    index = 0
    for unit in conversion.units:
        conversion.notes += _match(unit, options, root, example_inputs)
        index = _choose(conversion, unit, index)
        if unit.path:
            blocks = sum(len(c.blocks) for c in unit.match.chains)
            chains = len(unit.match.chains)
            found = f"{chains} chain(s), {blocks} block(s)" if blocks else "no residual chain"
            what = f"{type(unit.module).__name__}: captured as one graph, {found}"
            conversion.notes.append(Note(unit.path, what))
    if options.memory_budget is not None:
        if example_inputs is None:
            raise ValueError(
                "memory_budget needs example_inputs: every region's costs are measured on them"
            )
        conversion.plan = plan_memory(conversion, float(options.memory_budget))
    return conversion


def check_model(model: object) -> None:
    """Refuse what cannot be converted: not a module, or a model already sharded by FSDP
    (before it is copied: a copy would fail less clearly).

    Examples
    --------
    >>> check_model("resnet")
    Traceback (most recent call last):
    ...
    TypeError: expected an nn.Module, got str
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    kind = getattr(fsdp, "FSDPModule", None)
    if not isinstance(kind, type):
        return
    sharded = next((path for path, m in model.named_modules() if isinstance(m, kind)), None)
    if sharded is not None:
        raise ValueError(
            f"{sharded or type(model).__name__} is sharded by FSDP (fully_shard): convert the "
            f"model first, then shard the converted model (its module paths are the original's, "
            f"so the same fully_shard calls apply)"
        )


def _match(
    unit: UnitChoice, options: ConvertOptions, root: nn.Module, example_inputs: Any
) -> list[Note]:
    """The unit's chains, selected, with their report entries (full module paths); returns
    what the report should say of how they were found."""
    modules = dict(unit.module.named_modules())
    result = find_chains(unit.capture.graph, modules)
    result, notes = _with_leaf_outputs(unit, result, modules, root, example_inputs)
    result.chains = select_chains(
        result.chains,
        prefix=unit.path,
        include=options.include,
        exclude=options.exclude,
        min_blocks=options.min_blocks,
    )
    if unit.path:
        result.skipped = [
            SkippedAdd(s.node, join_path(unit.path, s.path), s.reason) for s in result.skipped
        ]
    unit.match = result
    unit.infos = [_prefixed(chain_info(c, modules), unit.path) for c in result.chains]
    return notes


def _with_leaf_outputs(
    unit: UnitChoice,
    result: MatchResult,
    modules: dict[str, nn.Module],
    root: nn.Module,
    example_inputs: Any,
) -> tuple[MatchResult, list[Note]]:
    """Where blocks are refused because later code reads an output of an opaque submodule
    they call, have the graph compute that output itself where it can
    (:mod:`fxmomentum.capture.leaf_outputs`), and keep that graph if it chains more blocks
    (or the same in fewer chains). An output that only the graph returns is left: that
    would convert a single block at most, for a run of the whole model."""
    outputs = [
        n
        for n in result.escaping
        if leaf_output_of(n) is not None and any(u.op != "output" for u in n.users)
    ]
    if not outputs or example_inputs is None:
        return result, []
    found = compute_leaf_outputs(unit.capture, root, example_inputs, outputs)
    notes = [Note(join_path(unit.path, path), text) for path, text in found.notes]
    if not found.computed:
        return result, notes
    trial = find_chains(found.graph, modules)
    before = [len(c.blocks) for c in result.chains]
    after = [len(c.blocks) for c in trial.chains]
    if sum(after) < sum(before) or (sum(after) == sum(before) and len(after) >= len(before)):
        return result, []
    cap = unit.capture
    cap.graph = found.graph
    cap.graph_module = fx.GraphModule(cap.root, found.graph, class_name=type(cap.root).__name__)
    return trial, notes


def _prefixed(info: ChainInfo, prefix: str) -> ChainInfo:
    """``info`` with module paths of the whole model (the unit at ``prefix``)."""
    if not prefix:
        return info
    for b in info.blocks:
        b.name = join_path(prefix, b.name)
        b.path = join_path(prefix, b.path)
    info.first = info.blocks[0].name
    info.last = info.blocks[-1].name
    return info


def _choose(conversion: Conversion, unit: UnitChoice, index: int) -> int:
    """Decide, for each selected chain of ``unit``, whether to convert it and with which
    gamma; ``index`` counts the selected chains of the whole model. Returns the next index."""
    options = conversion.options
    selected = [(c, i) for c, i in zip(unit.match.chains, unit.infos, strict=True) if c.selected]
    names = chain_names(unit.module, len(selected))
    objects = _python_objects(unit.capture)
    if options.cost_model and not unit.capture.shapes_verified and selected:
        conversion.notes.append(
            Note(unit.path, "cost_model needs shapes (example_inputs): every chain is converted")
        )
    recorded = unit.capture.graph_inputs()
    kept = _kept_tensors(unit) if selected and not options.use_backprop else {}
    for local, (chain, info) in enumerate(selected):
        name = join_path(unit.path, names[local])
        paths = [b.path for b in info.blocks]
        value = gamma_for_chain(options.gamma, index, name, paths, info)
        index += 1
        if value is None:
            info.reason = "no gamma given for this chain"
            continue
        validate_gamma(
            value,
            reversible=options.reversible,
            where=f" for chain {index - 1} ({info.first})",
        )
        passed = [c for c in chain.context if c in objects]
        if passed and not options.use_backprop:
            info.reason = (
                f"its blocks receive `{passed[0].target}` (a {objects[passed[0]]}), a "
                f"Python object they may change (a key/value cache grows at every call): "
                f"recomputing them in backward would change it again. Pass None instead "
                f"(use_cache=False), or convert with use_backprop=True"
            )
            continue
        saved = estimate_saved_bytes(chain, value, options.use_backprop, example_inputs=recorded)
        if saved is None and recorded is not None:
            saved = estimate_saved_bytes(chain, value, options.use_backprop)
        info.saved_bytes = saved
        if options.cost_model and saved is not None and saved <= 0 and not options.use_backprop:
            info.reason = "cost model: the reversible state would not be smaller than what it saves"
            continue
        info.name, info.converted, info.gamma = name, True, float(value)
        unit.chosen.append(chain)
        unit.gammas.append(float(value))
        unit.names.append(names[local])
        plain, why = _plain_modes(chain, kept)
        unit.plain_modes.append(plain)
        if plain:
            conversion.notes.append(Note(name, why))
    return index


def _kept_tensors(unit: UnitChoice) -> dict[str, tuple[frozenset[str], str]]:
    """The unit's modules that keep tensors between calls, found on its recorded call."""
    arguments = unit.capture.call_arguments()
    if arguments is None:
        return {}
    args, kwargs = arguments
    gm = unit.capture.graph_module
    return kept_tensors(unit.module, lambda: gm(*args, **kwargs), args)


def _plain_modes(
    chain: Chain, kept: dict[str, tuple[frozenset[str], str]]
) -> tuple[tuple[str, ...], str]:
    """The modes in which ``chain`` must run with plain autograd, and why: a module its blocks
    call stores a tensor between calls in those modes (a cache, as timm's LeViT keeps its
    attention biases in eval mode). The reversible forward would fill it without grad and the
    recomputation in backward would read it, so its parameters would get no gradient."""
    called = {str(n.target) for n in chain.nodes if n.op == "call_module"}
    modes: set[str] = set()
    where = ""
    for path, (found, attribute) in kept.items():
        if any(path == c or path.startswith(c + ".") for c in called):
            modes |= found
            where = where or f"`{path}` keeps a tensor between calls (`{attribute}`)"
    if not modes:
        return (), ""
    ordered = tuple(sorted(modes))
    text = " and ".join(ordered)
    return ordered, (
        f"{where} in {text} mode: the chain runs with plain autograd in {text} mode (a "
        f"recomputation in backward would read the tensor its forward stored without grad)"
    )


def _python_objects(cap: Capture) -> dict[fx.Node, str]:
    """Placeholders that received a Python object (not a tensor, None, flag, number or
    string) in the recorded call, and its class name."""
    if cap.inputs is None:
        return {}
    placeholders = [n for n in cap.graph.nodes if n.op == "placeholder"]
    named = [n for n in placeholders if not str(n.target).startswith("*")]
    out = {}
    for node, value in zip(named, cap.inputs, strict=False):
        if not isinstance(value, (torch.Tensor, *FIXED_TYPES)) and value is not None:
            out[node] = type(value).__name__
    return out


def build(conversion: Conversion) -> tuple[nn.Module, list[fx.Graph]]:
    """Rewrite every unit with chains to convert and put it in place.

    Returns the converted model (a GraphModule when the model was captured whole, else the
    model's own class with converted submodules) and the graphs after the rewrite, in the
    order of the units.
    """
    result: nn.Module = conversion.root
    graphs: list[fx.Graph] = []
    use_backprop = conversion.options.use_backprop
    # Innermost first: a unit inside an opaque module of another is replaced in that module,
    # which the outer graph calls as it is.
    for unit in reversed(conversion.units):
        if unit.path and not unit.chosen and not unit.segments:
            if unit.unit.before is not None:
                undo_tracing(unit.module, unit.unit.before)
            graphs.append(unit.capture.graph)
            continue
        gm = rewrite(
            unit.module,
            unit.capture.graph,
            unit.chosen,
            unit.gammas,
            use_backprop=use_backprop,
            strategies=unit.strategies,
            chain_options=unit.chain_options,
            segments=unit.segments,
            plain_modes=unit.plain_modes,
        )
        failure = unit.path and failure_on(gm, unit.capture.call_arguments())
        if failure:
            # Never put in place a graph that fails where the model calls it.
            _leave_as_it_was(conversion, unit, failure)
            graphs.append(unit.capture.graph)
            continue
        graphs.append(gm.graph)
        if unit.path:
            put_in_place(conversion.root, unit.module, gm)
        else:
            result = gm
    graphs.reverse()
    return result, graphs


def failure_on(
    module: nn.Module, arguments: tuple[tuple[Any, ...], dict[str, Any]] | None
) -> str | None:
    """Why ``module(*args, **kwargs)`` fails (one line), or None when it runs (or there are no
    arguments to run it on). Run as in training, grad enabled, without side effects; on the
    meta device without grad (reversible training cannot run there, shapes can)."""
    if arguments is None:
        return None
    args, kwargs = arguments
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    on_meta = any(t.is_meta for t in tensors)
    try:
        with no_side_effects(module, args, grad=not on_meta):
            module(*args, **kwargs)
    except Exception as exc:
        return one_line(exc, 200)
    return None


def _leave_as_it_was(conversion: Conversion, unit: UnitChoice, failure: str) -> None:
    """A unit whose converted graph fails stays Python code: the report says why."""
    if unit.unit.before is not None:
        undo_tracing(unit.module, unit.unit.before)
    reason = (
        f"the converted graph of `{unit.path}` fails on the arguments the model calls it with "
        f"({failure}): left as it was"
    )
    for info in unit.infos:
        if info.converted:
            info.converted, info.name, info.gamma, info.reason = False, None, None, reason
    conversion.notes.append(Note(unit.path, f"converted graph fails ({failure}): left as it was"))
    unit.chosen, unit.segments = [], []


def predicted_graphs(conversion: Conversion) -> list[fx.Graph]:
    """The graphs :func:`build` would give, without building anything (for ``inspect``)."""
    return [top_graph(u.capture.graph, u.chosen, u.names) for u in conversion.units]


def _code(conversion: Conversion, codes: Sequence[str]) -> str:
    if conversion.whole and len(conversion.units) == 1:
        return codes[0]
    parts = []
    for unit, code in zip(conversion.units, codes, strict=True):
        parts.append(f"# {unit.path or '(model)'} ({type(unit.module).__name__})\n{code}")
    return "\n".join(parts)


def make_report(conversion: Conversion, graphs: Sequence[fx.Graph]) -> ConversionReport:
    """The report of ``conversion``, whose graphs after the rewrite are ``graphs``."""
    units = conversion.units
    codes_after = [g.python_code(root_module="self").src for g in graphs]
    return ConversionReport(
        model=type(conversion.root).__name__,
        chains=conversion.infos,
        skipped=[s for u in units for s in u.match.skipped],
        leaves=list(conversion.descent.leaves),
        nodes_before=sum(len(u.capture.graph.nodes) for u in units),
        nodes_after=sum(len(g.nodes) for g in graphs),
        shapes_verified=bool(units) and all(u.capture.shapes_verified for u in units),
        code_before=_code(conversion, [u.capture.graph_module.code for u in units]),
        code_after=_code(conversion, codes_after),
        use_backprop=conversion.options.use_backprop,
        notes=group_notes(conversion.notes),
        plan=conversion.plan,
        inputs_given=conversion.inputs_given,
    )


def group_notes(notes: Sequence[Note], most: int = 4) -> list[str]:
    """One line per text: "`h.0`, `h.1`, ... (12 modules): text", in order of appearance.

    Examples
    --------
    >>> group_notes([Note("h.0", "traced"), Note("h.1", "traced"), Note("", "done")])
    ['`h.0`, `h.1`: traced', 'done']
    """
    paths: dict[str, list[str]] = {}
    for note in notes:
        paths.setdefault(note.text, []).append(note.path)
    out = []
    for text, where in paths.items():
        named = [f"`{p}`" for p in where if p]
        if not named:
            out.append(text)
            continue
        head = ", ".join(named[:most])
        if len(named) > most:
            head += f", ... ({len(named)} modules)"
        out.append(f"{head}: {text}")
    return out
