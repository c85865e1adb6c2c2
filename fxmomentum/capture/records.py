"""Recorded calls: how the whole model, run on example inputs, calls each submodule.

Conversion descends into a model whose own ``forward`` cannot be traced; each submodule is then
traced as its parent called it. :func:`record_calls` records the calls and :func:`specialise`
turns one into what torch.fx needs (``concrete_args`` for the arguments that were None, flags,
numbers or strings, which the graph checks at run time).
"""

from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import one_line
from .probe import as_tuple, no_side_effects
from .results import CaptureError

__all__ = [
    "FIXED_TYPES",
    "RECORD_SEEDS",
    "CallRecord",
    "Specialised",
    "describe_structure",
    "record_calls",
    "specialise",
    "structure",
]

#: Argument types a graph is specialised to (fixed, and checked at run time).
FIXED_TYPES = (bool, int, float, str)
_UNSET = object()


@dataclass(eq=False)
class CallRecord:
    """A module's first call while the whole model ran on example inputs.

    Attributes
    ----------
    args : tuple
        Positional arguments of the first call (the tensors themselves, not copies).
    kwargs : dict
        Keyword arguments of the first call.
    output : tuple
        What it returned: types, and shapes and dtypes of tensors (see :func:`record_calls`).
    calls : int
        How many times it was called.
    differing : bool
        Whether a later call, or a call in the other mode (train / eval), passed other
        non-tensor values (None, flags, numbers, strings), or arguments of other kinds.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = _UNSET
    calls: int = 1
    differing: bool = False
    key: tuple[Any, ...] = ()


def structure(value: Any) -> Any:
    """Types, and shapes and dtypes of tensors, of a (nested) value.

    Examples
    --------
    >>> structure((torch.zeros(2, 3), None))
    (<class 'tuple'>, (('Tensor', (2, 3), torch.float32), (<class 'NoneType'>,)))
    """
    if isinstance(value, torch.Tensor):
        return ("Tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(structure(v) for v in value))
    if isinstance(value, dict):
        return (type(value), tuple((k, structure(v)) for k, v in value.items()))
    return (type(value),)


def describe_structure(struct: Any) -> str:
    """:func:`structure` in words.

    Examples
    --------
    >>> describe_structure(structure((torch.zeros(2, 3), None)))
    'tuple(a 2x3 tensor, NoneType)'
    """
    if struct is _UNSET:
        return "nothing (it did not return)"
    kind = struct[0]
    if kind == "Tensor":
        return f"a {'x'.join(map(str, struct[1])) or 'scalar'} tensor"
    if len(struct) == 1:
        return kind.__name__
    if kind in (tuple, list) or issubclass(kind, (tuple, list)):
        inner = ", ".join(describe_structure(s) for s in struct[1])
    else:
        inner = ", ".join(f"{k}: {describe_structure(s)}" for k, s in struct[1])
    return f"{kind.__name__}({inner})"


def _argument_kind(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return "Tensor"
    if value is None or type(value) in FIXED_TYPES:
        return (type(value), value)
    return type(value)


def _call_key(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        tuple(_argument_kind(a) for a in args),
        tuple(sorted((k, _argument_kind(v)) for k, v in kwargs.items())),
    )


#: At most this many more runs of :func:`record_calls` for modules its first run skipped.
RECORD_SEEDS = 16


def _dropped_layers(
    model: nn.Module, wanted: Mapping[int, nn.Module], records: Mapping[int, CallRecord]
) -> list[int]:
    """The ``wanted`` modules not recorded while a module of their class in the same
    ``nn.ModuleList`` (or ``ModuleDict``) was: the layers a random layer drop skipped."""
    kind = {
        id(child): (id(m), type(child))
        for m in model.modules()
        if isinstance(m, (nn.ModuleList, nn.ModuleDict))
        for child in m.children()
    }
    ran = {kind.get(i) for i in records} - {None}
    return [i for i in wanted if i not in records and kind.get(i) in ran]


def record_calls(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[Any],
    modules: Iterable[nn.Module],
) -> dict[int, CallRecord]:
    """Run ``model`` on ``example_inputs`` and record how ``modules`` are called.

    Hooks record each module's first call (arguments and output structure) in the model's
    current mode, and whether later calls differ, also in a second run in the other mode
    (train / eval): a parent that passes ``0.0 if not self.training else p`` calls its child
    differently in each mode. Where the first run drew random numbers and skipped layers of an
    ``nn.ModuleList`` whose other layers of that class ran (a random layer drop), up to
    :data:`RECORD_SEEDS` more runs, seeded 0, 1, ..., record the skipped ones, so that which
    layers are recorded does not hang on one draw. The runs have no side effects: no grad,
    the global random states (torch's and Python's) forked, the buffers and modes restored.

    Parameters
    ----------
    model : nn.Module
        The whole model.
    example_inputs : Tensor or sequence
        Its positional inputs.
    modules : iterable of nn.Module
        Submodules of ``model`` to record.

    Returns
    -------
    dict
        ``id(module)`` to :class:`CallRecord`, for the modules that were called.

    Raises
    ------
    Exception
        Whatever ``model`` raises on ``example_inputs``.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    >>> records = record_calls(model, torch.randn(2, 3), [model[1]])
    >>> record = records[id(model[1])]
    >>> tuple(record.args[0].shape), record.calls
    ((2, 4), 1)
    """
    inputs = as_tuple(example_inputs)
    records: dict[int, CallRecord] = {}
    wanted = {id(m): m for m in modules}
    # The run a module's record comes from, whose calls it counts; -1: the other mode's run.
    run, made_in = 0, {}

    def before(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        key = _call_key(args, kwargs)
        record = records.get(id(m))
        if record is None and run >= 0:
            records[id(m)] = CallRecord(tuple(args), dict(kwargs), key=key)
            made_in[id(m)] = run
        elif record is not None:
            record.calls += made_in[id(m)] == run
            record.differing = record.differing or key != record.key

    def after(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        record = records[id(m)]
        if record.output is _UNSET:
            record.output = structure(out)

    handles = []
    modes = [(m, m.training) for m in model.modules()]
    try:
        for m in wanted.values():
            handles.append(m.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(m.register_forward_hook(after, with_kwargs=True))
        with no_side_effects(model, inputs):
            states = torch.get_rng_state(), random.getstate()
            model(*inputs)
            drew = not torch.equal(states[0], torch.get_rng_state()) or (
                states[1] != random.getstate()
            )
            for seed in range(RECORD_SEEDS if drew else 0):
                if not _dropped_layers(model, wanted, records):
                    break
                run = seed + 1
                torch.manual_seed(seed)
                random.seed(seed)
                model(*inputs)
            run = -1
            model.train(not model.training)
            # The other mode may refuse these inputs (train-mode BatchNorm on a batch of
            # one); then a graph fixed to this mode's values still checks them at run time.
            with contextlib.suppress(Exception):
                model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return records


class Specialised(NamedTuple):
    """How to trace and run a module as a recorded call did (see :func:`specialise`)."""

    #: Arguments fixed for tracing (torch.fx's ``concrete_args``).
    concrete_args: dict[str, Any]
    #: Positional values of the graph's placeholders, ``**kwargs`` excepted.
    inputs: tuple[Any, ...]
    #: What ``**kwargs`` held (None when ``forward`` has no ``**kwargs``).
    var_keyword: dict[str, Any] | None


def specialise(module: nn.Module, call: CallRecord) -> Specialised:
    """``concrete_args``, inputs and ``**kwargs`` that trace and run ``module`` as ``call`` did.

    Arguments that were None, a bool, a number or a string are fixed (``concrete_args``);
    tensors and other values stay graph inputs. The inputs list every named argument of
    ``forward`` in the order of the graph's placeholders, defaults filled in. ``**kwargs``
    may hold tensors and values of the fixed kinds (see :class:`CaptureTracer`).

    Raises
    ------
    CaptureError
        If the module was called in several ways, with values through ``*args``, or with
        other kinds of values through ``**kwargs``.

    Examples
    --------
    >>> class Masked(nn.Module):
    ...     def forward(self, x, mask=None, scale=1.0):
    ...         return x * scale if mask is None else x.masked_fill(mask, 0.0) * scale
    >>> call = CallRecord((torch.ones(2),), {})
    >>> concrete, inputs, var_keyword = specialise(Masked(), call)
    >>> concrete, len(inputs), var_keyword
    ({'mask': None, 'scale': 1.0}, 3, None)
    """
    name = type(module).__name__
    if call.differing:
        raise CaptureError(
            f"{name} is called with different non-tensor arguments (in several calls, or in "
            f"train and eval mode): one graph cannot serve every call"
        )
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*call.args, **call.kwargs)
    except (TypeError, ValueError) as e:
        raise CaptureError(f"cannot match the recorded call of {name} ({one_line(e, 160)})") from e
    bound.apply_defaults()
    concrete: dict[str, Any] = {}
    positional: list[Any] = []
    keyword_only: list[Any] = []
    var_keyword: dict[str, Any] | None = None
    for pname, param in sig.parameters.items():
        value = bound.arguments.get(pname)
        if param.kind is param.VAR_POSITIONAL:
            if value:
                raise CaptureError(
                    f"{name} is called with arguments through *{pname}, which torch.fx "
                    f"cannot fix to the recorded values"
                )
            continue
        if param.kind is param.VAR_KEYWORD:
            var_keyword = dict(value or {})
            odd = [k for k, v in var_keyword.items() if _argument_kind(v) is type(v)]
            if odd:
                kinds = ", ".join(f"{k}: {type(var_keyword[k]).__name__}" for k in odd)
                raise CaptureError(
                    f"{name} is called with values through **{pname} that are neither tensors "
                    f"nor None, flags, numbers or strings ({kinds})"
                )
            continue
        if value is None or type(value) in FIXED_TYPES:
            concrete[pname] = value
        (keyword_only if param.kind is param.KEYWORD_ONLY else positional).append(value)
    return Specialised(concrete, tuple(positional + keyword_only), var_keyword)
