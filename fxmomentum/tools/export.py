"""Export converted models: ``torch.export``, ONNX, and files written atomically.

What export captures
--------------------
A converted model's momentum chains (:class:`fxmomentum.MomentumChain`) run one of two paths.
When autograd has something to differentiate (grad enabled and a parameter or input that
requires grad) and the chain is in reversible mode, they call the reversible autograd function,
which works on exact integer states and rebuilds activations in backward. Otherwise, in
particular in eval mode under ``torch.no_grad()``, they run the plain chain
``v <- gamma * v + (1 - gamma) * f(x); x <- x + v`` with ordinary tensor operations.
:func:`export_program` and :func:`export_onnx` export in eval mode under ``torch.no_grad()``,
so the exported graph is that plain chain: ordinary ATen operations, the same function of the
same weights (``gamma`` rounded to a multiple of ``2**-16`` as in every mode), with inference
semantics (BatchNorm uses its running statistics, dropout is off). An exported program is for
inference; train the converted GraphModule itself.

Under export tracing the chains take the plain path whatever the grad mode
(``torch.compiler.is_exporting()``), so ``torch.export.export(gm, (x,))`` and
``torch.onnx.export(gm, (x,), path, dynamo=True)`` on a converted model in eval mode work as on
any model. These helpers add eval mode, the batch dimension made dynamic, torch's own output
kept off the terminal, and (ONNX) the check against onnxruntime.

The batch dimension
-------------------
Both helpers export with the batch dimension (the first dimension of every input whose first
dimension equals the first input's) dynamic, so that the program runs at any batch size. An
example batch of 1 is repeated to 2 for tracing (torch.export fixes a dimension of size 1). If
the model fixes the batch size (a reshape to a constant, a check in its code), the export falls
back to the example's static shapes with a :class:`StaticBatchWarning` naming the exporter's
reason.

Saving and loading
------------------
``torch.save(gm, path)`` pickles the whole GraphModule (its generated code included); loading it
needs ``torch.load(path, weights_only=False)`` and fxmomentum installed, and **unpickling runs
code**: only load files you trust. The safe route is to save weights only and rebuild::

    torch.save(gm.state_dict(), "weights.pt")            # keys equal the original model's
    ...
    gm = fxmomentum.convert(build_model(), gamma=0.9)     # same architecture, same conversion
    gm.load_state_dict(torch.load("weights.pt", weights_only=True))

Because conversion keeps the state_dict keys of the original model, the same file also loads
into the original (unconverted) model.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import one_line

__all__ = [
    "ExportError",
    "OnnxResult",
    "StaticBatchWarning",
    "atomic_output",
    "batch_dynamic_shapes",
    "captured_output",
    "eval_no_grad",
    "export_onnx",
    "export_program",
    "output_leaves",
    "relative_error",
    "save_program",
]

#: Largest relative error (L2 norm of the difference over that of PyTorch's output, per output)
#: accepted between onnxruntime and PyTorch.
ONNX_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """Exporting failed, or the exported model does not compute what the model computes.

    ``output`` holds what torch printed while exporting (kept off the terminal; the command
    line shows it with ``--debug``).
    """

    output: str = ""


class StaticBatchWarning(UserWarning):
    """The model fixes its batch size: the export falls back to the example's static shapes."""


# -- helpers ---------------------------------------------------------------------------------------
def _as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


@contextlib.contextmanager
def eval_no_grad(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode under ``torch.no_grad()``; restore every training flag after.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    >>> with eval_no_grad(net):
    ...     net.training
    False
    >>> net.training
    True
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for m, training in flags:
            m.training = training


def output_leaves(output: object) -> list[torch.Tensor]:
    """The tensors in a (possibly nested) model output, in order.

    Examples
    --------
    >>> [t.shape for t in output_leaves({"a": torch.zeros(2), "b": (torch.ones(1),)})]
    [torch.Size([2]), torch.Size([1])]
    """
    leaves = torch.utils._pytree.tree_leaves(output)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """L2 norm of ``actual - reference`` over the L2 norm of ``reference`` (float64).

    Examples
    --------
    >>> relative_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
    0.0
    """
    a = actual.detach().to(torch.float64)
    b = reference.detach().to(torch.float64)
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


class _Captured:
    text = ""


@contextlib.contextmanager
def captured_output() -> Iterator[_Captured]:
    """Keep what is printed inside the block (Python's and C++'s stdout and stderr, torch's
    log records, warnings) off the terminal; ``.text`` holds it afterwards.

    Examples
    --------
    >>> with captured_output() as out:
    ...     print("compiling...")
    >>> out.text.strip()
    'compiling...'
    """
    captured = _Captured()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        saved: list[tuple[int, int]] = []
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
        text = io.StringIO()
        try:
            with (
                contextlib.redirect_stdout(text),
                contextlib.redirect_stderr(text),
                warnings.catch_warnings(record=True) as caught,
            ):
                warnings.simplefilter("default")
                yield captured
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            raw = sink.read().decode(errors="replace")
            shown = "".join(
                warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught
            )
            captured.text = text.getvalue() + raw + shown


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory (so :func:`os.replace` is atomic); on an
    exception it is removed and ``path`` is left as it was.

    Raises
    ------
    OSError
        If the directory does not exist or is not writable.

    Examples
    --------
    >>> import os, tempfile
    >>> out = os.path.join(tempfile.mkdtemp(), "weights.pt")
    >>> with atomic_output(out) as tmp:
    ...     torch.save({"w": torch.zeros(1)}, tmp)
    >>> os.path.exists(out)
    True
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    stem, ext = os.path.splitext(os.path.basename(path))
    # Keep the extension: some writers (torch.export.save) look at it.
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{ext}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _new_file_mode(path: str) -> int:
    """The mode a plain ``open(path, "w")`` would give (mkstemp makes files 0600)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


# -- torch.export ----------------------------------------------------------------------------------
def batch_dynamic_shapes(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple:
    """``dynamic_shapes`` that make the batch dimension dynamic, one ``Dim`` for every input.

    The batch dimension is the first dimension of every input whose first dimension equals the
    first input's; other inputs (and non-tensors) stay static.

    Examples
    --------
    >>> batch_dynamic_shapes((torch.zeros(2, 3), torch.zeros(2), torch.zeros(7, 2)))
    ({0: Dim('batch', min=1)}, {0: Dim('batch', min=1)}, None)
    """
    args = _as_tuple(example_inputs)
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0]
    if not tensors:
        return tuple(None for _ in args)
    batch = tensors[0].shape[0]
    dim = torch.export.Dim("batch", min=1)
    return tuple(
        {0: dim} if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch else None
        for a in args
    )


def _batch_of_two(args: tuple) -> tuple:
    """``args`` with a batch of 1 repeated to 2: torch.export fixes a dimension of size 1."""
    shapes = batch_dynamic_shapes(args)
    return tuple(
        a.expand(2, *a.shape[1:]).clone() if spec is not None and a.shape[0] == 1 else a
        for a, spec in zip(args, shapes, strict=True)
    )


def _with_dynamic_batch(
    export: Callable[[tuple, object], object], args: tuple
) -> tuple[object, str]:
    """``export(args, dynamic_shapes)`` with a dynamic batch, else with static shapes.

    Returns the result and, when it is static, why (one line; ``""`` when dynamic)."""
    if all(d is None for d in batch_dynamic_shapes(args)):
        return export(args, None), "the inputs have no batch dimension"
    try:
        wide = _batch_of_two(args)
        return export(wide, batch_dynamic_shapes(wide)), ""
    except Exception as exc:
        reason = _constraint_reason(exc)
    return export(args, None), reason


def _warn_static(what: str, args: tuple, reason: str) -> None:
    if not reason:
        return
    batch = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() else 0
    warnings.warn(
        f"{what}: the batch dimension is static (the exported model takes a batch of {batch} "
        f"only): {reason}",
        StaticBatchWarning,
        stacklevel=3,
    )


def _constraint_reason(exc: BaseException) -> str:
    """The exporter's reason for a static batch, one line."""
    if type(exc).__name__ == "_StaticBatch":
        return str(exc)
    lines = [ln.strip(" -") for ln in str(exc).splitlines() if ln.strip(" -")]
    useful = [ln for ln in lines if "specialized" in ln or "Guard" in ln or "guard" in ln]
    text = (useful or lines or [type(exc).__name__])[0]
    return one_line(RuntimeError(text), 200).removeprefix("RuntimeError: ")


def export_program(
    gm: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    strict: bool = False,
    dynamic_shapes: object = None,
    dynamic_batch: bool = True,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a converted model in eval mode, for any batch size.

    The model is exported in eval mode under ``torch.no_grad()``, where its momentum chains run
    the plain chain (no autograd Function; see the module docstring); its training flags are
    restored afterwards. What torch prints while exporting is kept off the terminal.

    Parameters
    ----------
    gm : nn.Module
        The converted model (any module works).
    example_inputs : tensor or sequence of tensors
        Positional inputs to trace with.
    strict : bool
        Passed to :func:`torch.export.export` (default non-strict).
    dynamic_shapes : optional
        Passed to :func:`torch.export.export`; overrides ``dynamic_batch``.
    dynamic_batch : bool
        Make the batch dimension dynamic (:func:`batch_dynamic_shapes`); where the model fixes
        it, export static shapes with a :class:`StaticBatchWarning` saying why.

    Returns
    -------
    torch.export.ExportedProgram

    Raises
    ------
    ExportError
        If ``torch.export`` fails; the message says why.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    >>> ep = export_program(model, (torch.randn(2, 4),))
    >>> ep.module()(torch.ones(5, 4)).shape
    torch.Size([5, 4])
    """
    args = _as_tuple(example_inputs)

    def export(inputs: tuple, shapes: object) -> torch.export.ExportedProgram:
        return torch.export.export(gm, inputs, strict=strict, dynamic_shapes=shapes)

    failure: Exception | None = None
    with captured_output() as printed:
        try:
            with eval_no_grad(gm):
                if dynamic_shapes is not None or not dynamic_batch:
                    program, static = export(args, dynamic_shapes), ""
                else:
                    program, static = _with_dynamic_batch(export, args)
        except Exception as exc:
            failure = exc
    if failure is not None:
        error = ExportError(f"torch.export failed: {one_line(failure, 400)}")
        error.output = printed.text
        raise error from failure
    if dynamic_batch and dynamic_shapes is None:
        _warn_static("torch.export", args, static)
    return program  # type: ignore[return-value]


def save_program(program: torch.export.ExportedProgram, path: str | os.PathLike) -> None:
    """``torch.export.save`` to ``path`` through a temporary file (no partial file on failure).

    Load it back with ``torch.export.load(path)``.

    Examples
    --------
    >>> import os, tempfile
    >>> ep = export_program(nn.Linear(2, 2), (torch.randn(1, 2),))
    >>> save_program(ep, os.path.join(tempfile.mkdtemp(), "model.pt2"))
    """
    with atomic_output(path) as tmp:
        torch.export.save(program, tmp)


# -- ONNX ------------------------------------------------------------------------------------------
@dataclass
class OnnxResult:
    """What :func:`export_onnx` wrote and checked.

    Attributes
    ----------
    path : str
        The ONNX file.
    checked : bool
        Whether onnxruntime ran it and its outputs were compared with PyTorch's.
    max_relative_error : float or None
        The largest relative error over the outputs and the inputs checked, when checked.
    reason : str
        Why it was not checked (onnxruntime not installed, ``check=False``), or ``""``.
    static_batch : str
        Why the batch dimension is static (the model fixes it), or ``""`` when it is dynamic.
    weak : str
        Why the check proves little (the outputs do not change with the inputs, so a wrong
        graph could give them too), or ``""``.
    batches : list of int
        The batch sizes the check ran at.
    """

    path: str
    checked: bool
    max_relative_error: float | None = None
    reason: str = ""
    static_batch: str = ""
    weak: str = ""
    batches: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        batch = (
            f"batch dimension static: {self.static_batch}"
            if self.static_batch
            else "batch dimension dynamic"
        )
        if not self.checked:
            return f"wrote {self.path} ({batch}); outputs not checked ({self.reason})"
        at = ", ".join(map(str, self.batches))
        text = (
            f"wrote {self.path} ({batch}); onnxruntime outputs match PyTorch's at batch {at} "
            f"(max relative error {self.max_relative_error:.1e} <= {ONNX_TOLERANCE:.0e})"
        )
        if self.weak:
            text += f"; the check is weak: {self.weak}"
        return text


def export_onnx(
    gm: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike,
    check: bool = True,
    *,
    opset_version: int | None = None,
    tolerance: float = ONNX_TOLERANCE,
    dynamic_batch: bool = True,
) -> OnnxResult:
    """Write ONNX with ``torch.onnx.export(..., dynamo=True)`` and check it with onnxruntime.

    The model is exported in eval mode under ``torch.no_grad()`` (the plain chain path, see the
    module docstring), with the batch dimension dynamic (see the module docstring); what torch
    prints meanwhile is kept off the terminal. The file is written to a temporary name in the
    same directory and moved onto ``path`` only once it is complete and, if checked, correct.
    Needs the ``onnx`` and ``onnxscript`` packages; the check needs ``onnxruntime`` and is
    skipped (``checked=False``) without it.

    The check compares onnxruntime with PyTorch on the example inputs, on random inputs of the
    same shapes (floating inputs drawn anew at 4 times the examples' scale) and, when the batch
    is dynamic, on random inputs of another batch size. If the outputs do not change with the
    inputs (a random model whose last layer is initialised to zero gives zeros), matching them
    proves little: ``weak`` says so.

    Parameters
    ----------
    gm : nn.Module
        The converted model.
    example_inputs : tensor or sequence of tensors
        Positional inputs to trace with and to check on.
    path : str or os.PathLike
        Where to write the ``.onnx`` file. Models over 2 GB also get an external-data file
        next to it, named after ``path``.
    check : bool
        Run the file with onnxruntime (when installed) and compare with PyTorch's outputs.
    opset_version : int, optional
        ONNX opset (default: the exporter's).
    tolerance : float
        Largest accepted relative error per output (default ``1e-4``).
    dynamic_batch : bool
        Make the batch dimension dynamic where the model allows it.

    Returns
    -------
    OnnxResult

    Raises
    ------
    ExportError
        ``onnx``/``onnxscript`` missing, the export failed, or onnxruntime's outputs differ from
        PyTorch's by more than ``tolerance`` (nothing is written then).

    Examples
    --------
    >>> import os, tempfile
    >>> out = os.path.join(tempfile.mkdtemp(), "model.onnx")
    >>> result = export_onnx(nn.Linear(3, 2), (torch.randn(1, 3),), out)  # doctest: +SKIP
    >>> result.checked, result.batches  # doctest: +SKIP
    (True, [1, 1, 4])
    """
    args = _as_tuple(example_inputs)
    path = os.fspath(path)
    missing = [m for m in ("onnx", "onnxscript") if not _importable(m)]
    if missing:
        raise ExportError(
            f"ONNX export needs {' and '.join(missing)}: pip install onnx onnxscript "
            f"(and onnxruntime to check the outputs)"
        )
    directory = os.path.dirname(os.path.abspath(path))
    workdir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        tmp = os.path.join(workdir, os.path.basename(path))

        def export(inputs: tuple, shapes: object) -> object:
            program = torch.onnx.export(
                gm,
                inputs,
                dynamo=True,
                verbose=False,
                opset_version=opset_version,
                dynamic_shapes=shapes,
            )
            if shapes is not None and _onnx_batch_is_static(program, inputs, shapes):
                # The ONNX exporter relaxes the batch Dim to "static where the model fixes it"
                # without a word: ask torch.export why.
                raise _StaticBatch(_static_reason(gm, inputs, shapes))
            program.save(tmp)
            return program

        failure: Exception | None = None
        static = ""
        with captured_output() as printed:
            try:
                with eval_no_grad(gm):
                    if dynamic_batch:
                        static = _with_dynamic_batch(export, args)[1]
                    else:
                        export(args, None)
            except Exception as exc:
                failure = exc
        if failure is not None:
            error = ExportError(f"ONNX export failed: {one_line(failure, 400)}")
            error.output = printed.text
            raise error from failure
        if dynamic_batch:
            _warn_static("ONNX export", args, static)

        result = OnnxResult(path=path, checked=False, static_batch=static)
        if not check:
            result.reason = "check=False"
        elif not _importable("onnxruntime"):
            result.reason = "onnxruntime is not installed"
        else:
            sets = _check_inputs(args, dynamic=dynamic_batch and not static)
            result.max_relative_error, result.weak = _check_onnx(gm, sets, tmp, tolerance)
            result.batches = [_batch_size(s) for s in sets]
            result.checked = True
        # Move the file (and external data, if any) into place.
        for name in os.listdir(workdir):
            os.replace(os.path.join(workdir, name), os.path.join(directory, name))
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class _StaticBatch(Exception):
    """The ONNX exporter made the batch dimension static; the message says why."""


def _onnx_batch_is_static(program: object, args: tuple, shapes: object) -> bool:
    """Whether an input meant to have a dynamic batch has a fixed first dimension."""
    values = program.model.graph.inputs  # type: ignore[attr-defined]
    meant = [spec is not None for a, spec in zip(args, shapes, strict=True)  # type: ignore[call-overload]
             if isinstance(a, torch.Tensor)]  # fmt: skip
    return any(
        dynamic and v.shape is not None and len(v.shape) and isinstance(v.shape[0], int)
        for v, dynamic in zip(values, meant, strict=False)
    )


def _static_reason(gm: nn.Module, inputs: tuple, shapes: object) -> str:
    try:
        torch.export.export(gm, inputs, dynamic_shapes=shapes)
    except Exception as exc:
        return _constraint_reason(exc)
    return "the ONNX exporter fixed it"


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _batch_size(args: tuple) -> int:
    first = args[0] if args else None
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 0


def _check_inputs(args: tuple, dynamic: bool) -> list[tuple]:
    """The input sets the ONNX check runs: the examples, random ones of the same shapes, and
    (``dynamic``) random ones of another batch size. Integer inputs (token ids) are kept: their
    valid range is the model's business."""
    gen = torch.Generator().manual_seed(1234)
    shapes = batch_dynamic_shapes(args)

    def fresh(batch: int | None) -> tuple:
        out = []
        for a, spec in zip(args, shapes, strict=True):
            if not isinstance(a, torch.Tensor):
                out.append(a)
                continue
            shape = list(a.shape)
            if batch is not None and spec is not None:
                shape[0] = batch
            if a.is_floating_point():
                scale = 4 * max(a.detach().float().std().item() if a.numel() > 1 else 0.0, 1.0)
                out.append((torch.randn(shape, generator=gen) * scale).to(a.dtype))
            else:
                reps = [shape[0] // max(a.shape[0], 1) + 1] + [1] * (a.dim() - 1) if a.dim() else []
                out.append(a.repeat(*reps)[: shape[0]] if a.dim() else a)
        return tuple(out)

    sets = [args, fresh(None)]
    if dynamic and any(spec is not None for spec in shapes):
        sets.append(fresh(_batch_size(args) + 3))
    return sets


def _run_onnx(session: object, args: tuple) -> list:
    tensors = [a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]  # type: ignore[attr-defined]
    if len(names) != len(tensors):
        raise ExportError(
            f"the ONNX model takes {len(names)} inputs, the example inputs are {len(tensors)}"
        )
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
    return session.run(None, feed)  # type: ignore[attr-defined]


def _check_onnx(
    gm: nn.Module, sets: Sequence[tuple], onnx_path: str, tolerance: float
) -> tuple[float, str]:
    """The largest relative error over ``sets``, and why the check is weak (or ``""``)."""
    import onnxruntime

    with eval_no_grad(gm):
        expected = [output_leaves(gm(*args)) for args in sets]
    try:
        session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        got = [_run_onnx(session, args) for args in sets]
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"onnxruntime could not run the exported model: {one_line(exc, 400)}"
        ) from exc
    worst = 0.0
    for args, outs, refs in zip(sets, got, expected, strict=True):
        if len(outs) != len(refs):
            raise ExportError(
                f"the ONNX model gives {len(outs)} outputs, PyTorch gives {len(refs)}; "
                f"nothing was written"
            )
        for i, (g, e) in enumerate(zip(outs, refs, strict=True)):
            g = torch.from_numpy(g)
            if tuple(g.shape) != tuple(e.shape):
                raise ExportError(
                    f"ONNX output {i} has shape {tuple(g.shape)}, PyTorch's {tuple(e.shape)} "
                    f"(batch {_batch_size(args)}); nothing was written"
                )
            worst = max(worst, relative_error(g, e))
    if not worst <= tolerance:
        raise ExportError(
            f"onnxruntime's outputs differ from PyTorch's (relative error {worst:.1e} > "
            f"{tolerance:.0e}); nothing was written"
        )
    return worst, _weakness(sets, expected)


def _weakness(sets: Sequence[tuple], expected: Sequence[list[torch.Tensor]]) -> str:
    """Why matching these outputs proves little, or ``""``."""
    first, second = expected[0], expected[1]
    inputs_differ = any(
        isinstance(a, torch.Tensor) and not torch.equal(a, b)
        for a, b in zip(sets[0], sets[1], strict=True)
    )
    if inputs_differ:
        if all(torch.equal(a, b) for a, b in zip(first, second, strict=True)):
            return (
                "the outputs do not change with the inputs (the same for two different "
                "inputs), so a wrong graph could match them"
            )
        return ""
    # Integer inputs only (kept as given): look at the outputs themselves.
    if all(t.numel() > 1 and bool((t == t.flatten()[0]).all()) for t in first):
        return "the outputs are constant (every element the same), so a wrong graph could match"
    return ""
