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

Eval mode alone is not enough: with grad enabled and trainable parameters, a reversible chain
still takes the autograd-Function path, and calling ``torch.export.export`` (or
``torch.onnx.export``) on it directly fails on a data-dependent guard inside the exact engine.
Use these helpers, or wrap such calls in ``torch.no_grad()``.

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
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import one_line

__all__ = [
    "ExportError",
    "OnnxResult",
    "atomic_output",
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
    """Exporting failed, or the exported model does not compute what the model computes."""


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
def export_program(
    gm: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    strict: bool = False,
    dynamic_shapes: object = None,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a converted model in eval mode.

    The model is exported in eval mode under ``torch.no_grad()``, where its momentum chains run
    the plain chain (no autograd Function; see the module docstring); its training flags are
    restored afterwards.

    Parameters
    ----------
    gm : nn.Module
        The converted model (any module works).
    example_inputs : tensor or sequence of tensors
        Positional inputs to trace with.
    strict : bool
        Passed to :func:`torch.export.export` (default non-strict).
    dynamic_shapes : optional
        Passed to :func:`torch.export.export`.

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
    >>> ep.module()(torch.ones(2, 4)).shape
    torch.Size([2, 4])
    """
    args = _as_tuple(example_inputs)
    try:
        with eval_no_grad(gm):
            return torch.export.export(gm, args, strict=strict, dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        raise ExportError(f"torch.export failed: {one_line(exc, 400)}") from exc


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
        The largest relative error over the outputs, when checked.
    reason : str
        Why it was not checked (onnxruntime not installed, ``check=False``), or ``""``.
    """

    path: str
    checked: bool
    max_relative_error: float | None = None
    reason: str = ""

    def __str__(self) -> str:
        if self.checked:
            return (
                f"wrote {self.path}; onnxruntime outputs match PyTorch's (max relative error "
                f"{self.max_relative_error:.1e} <= {ONNX_TOLERANCE:.0e})"
            )
        return f"wrote {self.path}; outputs not checked ({self.reason})"


def export_onnx(
    gm: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike,
    check: bool = True,
    *,
    opset_version: int | None = None,
    tolerance: float = ONNX_TOLERANCE,
) -> OnnxResult:
    """Write ONNX with ``torch.onnx.export(..., dynamo=True)`` and check it with onnxruntime.

    The model is exported in eval mode under ``torch.no_grad()`` (the plain chain path, see the
    module docstring). The file is written to a temporary name in the same directory and moved
    onto ``path`` only once it is complete and, if checked, correct. Needs the ``onnx`` and
    ``onnxscript`` packages; the check needs ``onnxruntime`` and is skipped (``checked=False``)
    without it.

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
    >>> result.checked  # doctest: +SKIP
    True
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
        try:
            with eval_no_grad(gm), contextlib.redirect_stdout(io.StringIO()):
                program = torch.onnx.export(
                    gm, args, dynamo=True, verbose=False, opset_version=opset_version
                )
                program.save(tmp)
        except Exception as exc:
            raise ExportError(f"ONNX export failed: {one_line(exc, 400)}") from exc

        result = OnnxResult(path=path, checked=False)
        if not check:
            result.reason = "check=False"
        elif not _importable("onnxruntime"):
            result.reason = "onnxruntime is not installed"
        else:
            result.max_relative_error = _check_onnx(gm, args, tmp, tolerance)
            result.checked = True
        # Move the file (and external data, if any) into place.
        for name in os.listdir(workdir):
            os.replace(os.path.join(workdir, name), os.path.join(directory, name))
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _check_onnx(gm: nn.Module, args: tuple, onnx_path: str, tolerance: float) -> float:
    import onnxruntime

    with eval_no_grad(gm):
        expected = output_leaves(gm(*args))
    try:
        session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        tensors = [a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(tensors):
            raise ExportError(
                f"the ONNX model takes {len(names)} inputs, the example inputs are {len(tensors)}"
            )
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
        got = session.run(None, feed)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"onnxruntime could not run the exported model: {one_line(exc, 400)}"
        ) from exc
    if len(got) != len(expected):
        raise ExportError(
            f"the ONNX model gives {len(got)} outputs, PyTorch gives {len(expected)}; "
            f"nothing was written"
        )
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        g = torch.from_numpy(g)
        if tuple(g.shape) != tuple(e.shape):
            raise ExportError(
                f"ONNX output {i} has shape {tuple(g.shape)}, PyTorch's {tuple(e.shape)}; "
                f"nothing was written"
            )
        worst = max(worst, relative_error(g, e))
    if not worst <= tolerance:
        raise ExportError(
            f"onnxruntime's outputs differ from PyTorch's (relative error {worst:.1e} > "
            f"{tolerance:.0e}); nothing was written"
        )
    return worst
