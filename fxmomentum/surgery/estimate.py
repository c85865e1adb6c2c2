"""Estimates of what converting a chain saves: autograd's saved tensors, measured.

The graph a chain was found in is run once with grad on the example inputs (or inputs of the
recorded shapes), recording, per node, every tensor autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``); a chain's cost in plain autograd is what its
nodes saved, and its reversible state replaces that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode

from ..capture import no_side_effects
from ..engine import GAMMA_DENOM, quantize_gamma
from ..engine.saved_ops import op_key
from .match import Chain

__all__ = [
    "STATE_BYTES_PER_ELEMENT",
    "GraphMeasurement",
    "HeavyOp",
    "autograd_saved_bytes",
    "estimate_saved_bytes",
    "measure_graph",
]

#: Bytes per element of the chain's activation that a reversible chain keeps until backward
#: besides the lost bits (its exact state; see ARCHITECTURE.md, "The engine").
STATE_BYTES_PER_ELEMENT = 12


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


@dataclass(frozen=True)
class HeavyOp:
    """One call of a heavy operator: its name, the bytes of its outputs, its CPU time,
    whether the graph writes its output in place later (then keeping it saves nothing), and
    the nodes that saved, for backward, a tensor computed from its output (a checkpointed
    region's recomputation stops before an operator none of its saved tensors needs)."""

    op: str
    nbytes: int
    seconds: float
    written_later: bool = False
    needed_by: frozenset[str] = frozenset()


class _OperatorCalls(TorchDispatchMode):
    """Notes, per node of ``record``, every operator dispatched and the heavy ones' costs, and
    which storages hold values computed from each heavy output (:meth:`saved` is told what
    autograd saves; :meth:`finish` once the run is over)."""

    def __init__(self, record: GraphMeasurement) -> None:
        super().__init__()
        self.record = record
        self.outputs: list[tuple[str, int, list[tuple[torch.Tensor, int]]]] = []
        self.derived: dict[int, frozenset[int]] = {}  # storage: heavy calls it comes from
        self.needed: dict[int, set[str]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        node = self.record.current
        name = op_key(func)
        start = time.process_time()
        out = func(*args, **(kwargs or {}))
        if node is None:
            return out
        seconds = time.process_time() - start
        counts = self.record.op_counts
        counts[node] = counts.get(node, 0) + 1
        sources = frozenset().union(*(self.derived.get(k, ()) for k in _storages((args, kwargs))))
        if name is not None:
            tensors = [t for t in torch.utils._pytree.tree_leaves(out)
                       if isinstance(t, torch.Tensor)]  # fmt: skip
            calls = self.record.heavy_ops.setdefault(node, [])
            sources |= {len(self.outputs)}
            self.outputs.append((node, len(calls), [(t, t._version) for t in tensors]))
            calls.append(HeavyOp(name, sum(t.nbytes for t in tensors), seconds))
        if sources:
            for key in _storages(out):
                self.derived[key] = self.derived.get(key, frozenset()) | sources
        return out

    def saved(self, t: torch.Tensor, node: str) -> None:
        """Autograd saved ``t`` while ``node`` ran."""
        found = _storage(t)
        for call in self.derived.get(found[0], ()) if found is not None else ():
            self.needed.setdefault(call, set()).add(node)

    def finish(self) -> None:
        for call, (node, index, tensors) in enumerate(self.outputs):
            written = any(t._version != version for t, version in tensors)
            calls = self.record.heavy_ops[node]
            calls[index] = dataclasses.replace(
                calls[index], written_later=written, needed_by=frozenset(self.needed.get(call, ()))
            )
        self.outputs.clear()


@dataclass
class GraphMeasurement:
    """One run of a graph with grad on its example inputs, node by node (by node name; no
    reference to the graph or its values is kept).

    Attributes
    ----------
    saved : dict of str to dict of int to int
        Per node, what autograd saved while it ran: storage key to bytes.
    outputs : dict of str to dict of int to int
        Per node, the storages of its output and their bytes.
    seconds : dict of str to float
        Per node, the CPU time of its forward (with ``timed``, the less of two runs): its
        cost relative to the others, whatever else the machine runs.
    fixed : set of int
        Storages of parameters and buffers (never activation memory).
    inputs : set of int
        Storages of the graph's inputs (held by the caller, not by the step).
    heavy_ops : dict of str to list of HeavyOp
        Per node, the calls of operators whose outputs a recomputation may take from the
        forward (:data:`fxmomentum.engine.saved_ops.HEAVY_OPS`), in call order.
    op_counts : dict of str to int
        Per node, how many operators it dispatched.
    device : str
        Where the graph ran.
    """

    saved: dict[str, dict[int, int]] = field(default_factory=dict)
    outputs: dict[str, dict[int, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    fixed: set[int] = field(default_factory=set)
    inputs: set[int] = field(default_factory=set)
    heavy_ops: dict[str, list[HeavyOp]] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    timed: bool = False
    current: str | None = None
    #: The run's operator notes while it runs (None otherwise).
    operators: Any = field(default=None, repr=False)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        # Autograd keeps this hook with each saved tensor: it must not hold the tensors.
        found = _storage(t)
        if self.current is not None and found is not None:
            self.saved.setdefault(self.current, {})[found[0]] = found[1]
            if self.operators is not None:
                self.operators.saved(t, self.current)
        return t


class _SavedTensors(fx.Interpreter):
    """Runs a graph with grad, recording in ``record`` what autograd saves for each node.

    Values are kept to the end of the run (no storage is freed and reused meanwhile), so a
    storage's address identifies it.
    """

    def __init__(self, gm: fx.GraphModule, record: GraphMeasurement, what: str = "saved") -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.record = record
        self.what = what

    def placeholder(self, target: Any, args: tuple, kwargs: dict) -> Any:
        # A ``**kwargs`` placeholder takes its dict as one positional input here (torch.fx's
        # Interpreter would hand it the remaining inputs as a list).
        if isinstance(target, str) and target.startswith("**"):
            value = next(self.args_iter)
        else:
            value = super().placeholder(target, args, kwargs)
        self.record.inputs |= set(_storages(value))
        return value

    def run_node(self, n: fx.Node) -> Any:
        self.record.current = n.name
        # CPU time of the process: what a node costs, whatever else the machine runs.
        start = time.process_time()
        try:
            result = super().run_node(n)
        finally:
            self.record.current = None
        seconds = time.process_time() - start
        self.record.seconds[n.name] = min(seconds, self.record.seconds.get(n.name, seconds))
        if self.what == "saved":
            self.record.outputs[n.name] = _storages(result)
        return result


def _storages(value: Any) -> dict[int, int]:
    """The storages of the tensors in a (nested) value, with their bytes."""
    found = (_storage(t) for t in torch.utils._pytree.tree_leaves(value)
             if isinstance(t, torch.Tensor))  # fmt: skip
    return dict(k for k in found if k is not None)


#: Per graph: (ids of the example inputs, or () for synthesized ones; the measurement).
_MEASURED: weakref.WeakKeyDictionary[fx.Graph, tuple[tuple[Any, ...], GraphMeasurement | None]] = (
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


def measure_graph(
    graph: fx.Graph, example_inputs: Any, timed: bool = False
) -> GraphMeasurement | None:
    """What autograd saves while each node of ``graph`` runs, and (``timed``) how long each
    takes; cached per graph. None where the graph cannot be run.

    The graph's owning module runs with grad on ``example_inputs`` (or, without them, on
    inputs of the shapes shape propagation recorded), without side effects, noting each
    node's operators. With ``timed``, it runs once more and each node's time is the faster
    of the two.
    """
    if example_inputs is None:
        key: tuple[Any, ...] = ()
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
        key = (id(example_inputs[0]),)
    else:
        example_inputs = tuple(example_inputs)
        key = tuple(id(t) for t in example_inputs)
    cached = _MEASURED.get(graph)
    if cached is not None and cached[0] == key:
        found = cached[1]
        if found is None or not timed or found.timed:
            return found
        if graph.owning_module is not None and example_inputs is not None:
            # Measured already: one more run for the times.
            if _run_once(graph.owning_module, example_inputs, found, "times"):
                found.timed = True
            return found
    gm = graph.owning_module
    measured = None
    if gm is not None:
        first = next(iter((*gm.parameters(), *gm.buffers())), None)
        device = first.device if first is not None else torch.device("cpu")
        inputs = _synthesized_inputs(graph, device) if example_inputs is None else example_inputs
        if inputs is not None:
            measured = _run(gm, inputs, timed)
            if measured is not None:
                measured.device = str(device)
    _MEASURED[graph] = (key, measured)
    return measured


def _run(gm: fx.GraphModule, inputs: tuple[Any, ...], timed: bool) -> GraphMeasurement | None:
    """One run recording saved tensors, outputs, operators and times, and with ``timed`` one
    more recording times only: each node's time is the less of the two."""
    record = GraphMeasurement()
    if not _run_once(gm, inputs, record, "saved"):
        return None
    if timed:
        if not _run_once(gm, inputs, record, "times"):
            return None
        record.timed = True
    record.fixed = {k[0] for t in (*gm.parameters(), *gm.buffers())
                    if (k := _storage(t)) is not None}  # fmt: skip
    return record


def _run_once(
    gm: fx.GraphModule,
    inputs: tuple[Any, ...],
    record: GraphMeasurement,
    what: str,
    operators: bool = True,
) -> bool:
    """One run of ``gm`` recording ``what``: ``"saved"`` (what autograd saves, the outputs,
    each node's operators, the times) or ``"times"`` (the times only). Where noting the
    operators makes the run fail, it runs again without (no operator output is then offered
    for saving)."""
    run = _SavedTensors(gm, record, what)
    calls = _OperatorCalls(record) if what == "saved" and operators else None
    record.operators = calls
    try:
        with no_side_effects(gm, inputs, grad=True), contextlib.ExitStack() as stack:
            if what == "saved":
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(record.pack, _unpack))
            if calls is not None:
                stack.enter_context(calls)
            run.run(*inputs)
        if calls is not None:
            calls.finish()
    except Exception:  # the estimate is unavailable, nothing else is at stake
        if calls is not None:
            record.heavy_ops.clear()
            record.op_counts.clear()
            record.saved.clear()
            return _run_once(gm, inputs, record, "saved", operators=False)
        return False
    finally:
        run.env.clear()  # the values, and the autograd graph they hold, go now
        record.current = None
        record.operators = None
        if calls is not None:
            calls.outputs.clear()
    return True


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
    >>> from torch import nn
    >>> from fxmomentum.capture import capture
    >>> from fxmomentum.surgery.match import find_chains
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
    measured = measure_graph(chain.entry.graph, example_inputs)
    if measured is None:
        return None
    outside = set(measured.fixed)
    for n in (chain.entry, *chain.context, chain.exit):
        outside |= set(measured.outputs.get(n.name, {}))
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
    bytes per element of ``x`` for ``T`` blocks (the lost bits of ``gamma``, see
    ARCHITECTURE.md).
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
