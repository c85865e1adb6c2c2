"""The commands of the command line: load the target, run the library, write and print.

Each ``run_<command>(args)`` takes the parsed arguments of :mod:`fxmomentum.tools.cli` and
returns the exit code, or raises :class:`~fxmomentum.tools.cli.CLIError` (one line, an exit
code). This module imports torch; :mod:`~fxmomentum.tools.cli` imports it only to run a command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import os
import shlex
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import api
from ..engine import validate_gamma
from ..errors import one_line
from ..surgery import ConversionReport
from . import loader, profiling
from .cli import (
    EXIT_CONVERT,
    EXIT_EXPORT,
    EXIT_INPUTS,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_USAGE,
    CLIError,
)
from .export import (
    ExportError,
    StaticBatchWarning,
    atomic_output,
    export_onnx,
    export_program,
    save_program,
)
from .inputs import input_shape_hint

__all__ = ["run_convert", "run_inspect", "run_profile"]


def _load(args: argparse.Namespace) -> loader.LoadedModel:
    if args.dtype and not args.input_shape:
        raise CLIError(
            "--dtype applies to --input-shape inputs; add --input-shape (the file's "
            "example_inputs keep their own dtypes)",
            EXIT_USAGE,
        )
    target = args.target
    try:
        if getattr(args, "model_args", None):
            target = loader.with_model_args(target, args.model_args)
        return loader.load_target(
            target,
            input_shapes=args.input_shape,
            dtypes=args.dtype,
            check_inputs=True,
        )
    except loader.LoadError as exc:
        raise CLIError(str(exc), exc.exit_code) from exc


def _check_gamma(args: argparse.Namespace) -> None:
    reversible = not args.use_backprop and args.memory_budget is None
    try:
        validate_gamma(args.gamma, reversible=reversible)
    except ValueError:
        raise CLIError(
            f"--gamma {args.gamma:g} cannot be reversed (the inverse divides by gamma); add "
            f"--use-backprop or --memory-budget, or use a gamma of at least 1.5e-5",
            EXIT_USAGE,
        ) from None


def _check_leaves(args: argparse.Namespace, loaded: loader.LoadedModel) -> None:
    if not args.leaf:
        return
    paths = {name for name, _ in loaded.model.named_modules() if name}
    for path in args.leaf:
        if path not in paths:
            close = difflib.get_close_matches(path, sorted(paths), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise CLIError(
                f"--leaf {path}: {type(loaded.model).__name__} has no submodule {path!r}{hint}; "
                f"give a module path such as those in the report's first/last columns",
                EXIT_USAGE,
            )


def _converter_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"use_backprop": args.use_backprop}
    if args.min_blocks != 1:
        options["min_blocks"] = args.min_blocks
    if args.include:
        options["include"] = list(args.include)
    if args.exclude:
        options["exclude"] = list(args.exclude)
    if args.leaf:
        options["leaf_modules"] = list(args.leaf)
    if args.cost_model:
        options["cost_model"] = True
    if args.memory_budget is not None:
        options["memory_budget"] = args.memory_budget
    return options


def _conversion_failed(loaded: loader.LoadedModel, exc: BaseException) -> CLIError:
    what = one_line(exc, 400)
    if type(exc).__name__ == "CaptureError":
        # The capture error says what cannot be traced and what to do about it.
        text = what.removeprefix("CaptureError: ")
        return CLIError(f"cannot capture the model from {loaded.source}: {text}", EXIT_CONVERT)
    return CLIError(
        f"converting the model from {loaded.source} failed ({what}); leave the failing chain "
        f"out with --exclude PATTERN, or rerun with --debug for the traceback",
        EXIT_CONVERT,
    )


def _inputs_text(loaded: loader.LoadedModel) -> str:
    if loaded.example_inputs is None:
        return "none"
    shapes = ", ".join(
        f"{'x'.join(map(str, t.shape)) or 'scalar'} {str(t.dtype).removeprefix('torch.')}"
        for t in loaded.example_inputs
    )
    return f"{shapes} (from {loaded.inputs_from})"


def _target_info(loaded: loader.LoadedModel) -> dict[str, Any]:
    return {
        "spec": loaded.target,
        "source": loaded.source,
        "found": loaded.how,
        "model_class": type(loaded.model).__name__,
        "example_inputs": None
        if loaded.example_inputs is None
        else [
            {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for t in loaded.example_inputs
        ],
    }


def _diff_text(report: ConversionReport) -> str:
    lines = difflib.unified_diff(
        report.code_before.strip("\n").splitlines(),
        report.code_after.strip("\n").splitlines(),
        fromfile="before (original graph)",
        tofile="after (converted graph)",
        lineterm="",
    )
    return "\n".join(lines) or "(no change: nothing was converted)"


def _format_report(
    report: ConversionReport, loaded: loader.LoadedModel, args: argparse.Namespace
) -> str:
    """The text printed on stdout for a report, in the chosen format."""
    show_diff = bool(getattr(args, "diff", False))
    if args.format == "json":
        data = {"target": _target_info(loaded), **report.as_dict()}
        if show_diff:
            data["diff"] = _diff_text(report)
        return json.dumps(data, indent=2, default=str)

    md = args.format == "markdown"
    lines = []
    header = f"{loaded.source}: {loaded.how} ({type(loaded.model).__name__})"
    lines.append(f"**{header}**" if md else header)
    lines.append(f"example inputs: {_inputs_text(loaded)}")
    if loaded.example_inputs is None:
        lines.append(
            "shapes not verified: no example inputs, chains were found from the graph's "
            "structure only (give --input-shape or example_inputs to verify them)"
        )
    elif not report.shapes_verified:
        lines.append("shapes not verified: shape propagation failed (see the notes below)")
    lines.append("")
    lines.append(_report_body(report, args.format, args.show_skipped))
    if show_diff:
        diff = _diff_text(report)
        lines += ["", "```diff" if md else "graph code, before -> after:", diff]
        if md:
            lines.append("```")
    return "\n".join(lines).rstrip("\n")


def _report_body(report: ConversionReport, fmt: str, show_skipped: bool) -> str:
    """The report in ``fmt``; the skipped residual adds listed only with ``show_skipped``."""
    if show_skipped or not report.skipped:
        return report.format(fmt).rstrip("\n")
    shown = dataclasses.replace(report, skipped=[])
    # Keep the true count in the summary line.
    body = shown.format(fmt).replace(shown.summary(), report.summary(), 1).rstrip("\n")
    return (
        f"{body}\n\n{len(report.skipped)} residual add(s) not converted are not listed: "
        f"add --show-skipped to see them and why"
    )


# -- output paths ----------------------------------------------------------------------------------
def _check_writable(option: str, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise CLIError(
            f"cannot write {option} {path}: it is a directory; choose a file name", EXIT_OUTPUT
        )
    if not os.path.isdir(directory):
        raise CLIError(
            f"cannot write {option} {path}: directory {directory} does not exist; create it "
            f"or choose another path",
            EXIT_OUTPUT,
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".fxmomentum-probe-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise CLIError(
            f"cannot write {option} {path}: {exc.strerror or exc}; choose a writable path",
            EXIT_OUTPUT,
        ) from exc


def _write_failed(option: str, path: str, exc: OSError) -> CLIError:
    return CLIError(
        f"cannot write {option} {path}: {exc.strerror or exc}; choose a writable path",
        EXIT_OUTPUT,
    )


@contextlib.contextmanager
def _importable_as_file_module(
    gm: torch.nn.Module, loaded: loader.LoadedModel
) -> Iterator[str | None]:
    """While saving, name the target file's classes after the file (``model.Block``).

    A file target is imported under a unique module name that no other process knows. If the
    converted model still holds objects whose classes (or functions) the file defines, pickle
    would refer to that name; for the duration of the save they are attributed to a module named
    after the file instead, so that ``torch.load`` works wherever that file is importable.
    Yields that module name, or ``None`` when nothing in ``gm`` comes from the file.
    """
    module = loaded.module
    name = module.__name__
    if not name.startswith("fxmomentum_target_") or not _uses_module(gm, name):
        yield None
        return
    stem = os.path.splitext(os.path.basename(loaded.source))[0]
    if not stem.isidentifier() or sys.modules.get(stem, module) is not module:
        yield name
        return
    changed = [
        obj
        for obj in vars(module).values()
        if (isinstance(obj, type) or callable(obj)) and getattr(obj, "__module__", None) == name
    ]
    had = stem in sys.modules
    sys.modules[stem] = module
    try:
        for obj in changed:
            with contextlib.suppress(AttributeError, TypeError):
                obj.__module__ = stem
        yield stem
    finally:
        for obj in changed:
            with contextlib.suppress(AttributeError, TypeError):
                obj.__module__ = name
        if not had:
            sys.modules.pop(stem, None)


def _uses_module(gm: torch.nn.Module, module_name: str) -> bool:
    for m in gm.modules():
        if type(m).__module__ == module_name:
            return True
        graph = getattr(m, "graph", None)
        for node in getattr(graph, "nodes", ()):
            if getattr(node.target, "__module__", None) == module_name:
                return True
    return False


# -- commands --------------------------------------------------------------------------------------
def run_inspect(args: argparse.Namespace) -> int:
    """``fxmomentum inspect``: print the report of what convert would do."""
    _check_gamma(args)
    html_path = getattr(args, "html", None)
    if html_path:
        _check_writable("--html", html_path)
    loaded = _load(args)
    _check_leaves(args, loaded)
    options = _converter_options(args)
    try:
        report = api.inspect(loaded.model, loaded.example_inputs, gamma=args.gamma, **options)
    except Exception as exc:
        raise _conversion_failed(loaded, exc) from exc
    print(_format_report(report, loaded, args), flush=True)
    if html_path:
        _write_html_page(html_path, report, loaded)
    return EXIT_OK


def _write_html_page(path: str, report: ConversionReport, loaded: loader.LoadedModel) -> None:
    """``inspect --html``: the page of :mod:`fxmomentum.tools.html`, costs measured when there
    are example inputs."""
    from . import html

    progress = _StderrProgress(quiet=False)
    costs = None
    if loaded.example_inputs is not None and report.chains:
        progress("measuring each chain's share of memory and time (one forward)", transient=True)
        try:
            costs = html.measure_costs(loaded.model, loaded.example_inputs, report.as_dict())
        except Exception as exc:  # the page is still worth writing without them
            what = one_line(exc)
            warnings.warn(f"--html: the costs could not be measured ({what})", stacklevel=1)
    subtitle = f"{loaded.source}: {loaded.how}; example inputs: {_inputs_text(loaded)}"
    try:
        html.write_html(
            path,
            report.as_dict(),
            html.model_modules(loaded.model),
            costs=costs,
            title=type(loaded.model).__name__,
            subtitle=subtitle,
        )
    except OSError as exc:
        progress.clear()
        raise _write_failed("--html", path, exc) from exc
    progress.clear()
    print(f"wrote {path} (one self-contained page; open it in a browser)", file=sys.stderr)


def run_convert(args: argparse.Namespace) -> int:
    """``fxmomentum convert``: convert, then write the -o / --export / --onnx outputs."""
    outputs = [("-o", args.output), ("--export", args.export), ("--onnx", args.onnx)]
    outputs = [(opt, path) for opt, path in outputs if path]
    if not outputs:
        raise CLIError(
            "nothing to write: give -o OUT.pt (and/or --export OUT.pt2, --onnx OUT.onnx)",
            EXIT_USAGE,
        )
    paths = [os.path.abspath(p) for _, p in outputs]
    if len(set(paths)) != len(paths):
        raise CLIError("-o, --export and --onnx must be different files", EXIT_USAGE)
    _check_gamma(args)
    for option, path in outputs:
        _check_writable(option, path)
    loaded = _load(args)
    if (args.export or args.onnx) and loaded.example_inputs is None:
        option = "--export" if args.export else "--onnx"
        raise CLIError(
            f"{option} needs example inputs; add --input-shape (e.g. "
            f"{input_shape_hint(loaded.model)}) or define example_inputs in the model file",
            EXIT_INPUTS,
        )

    _check_leaves(args, loaded)
    options = _converter_options(args)
    try:
        gm, report = api.convert(
            loaded.model,
            args.gamma,
            example_inputs=loaded.example_inputs,
            return_report=True,
            **options,
        )
    except Exception as exc:
        raise _conversion_failed(loaded, exc) from exc
    if not report.converted:
        raise _nothing_to_convert(loaded, report)
    # The report first: if an output then fails, the table is already there.
    print(_format_report(report, loaded, args), flush=True)
    _write_outputs(gm, loaded, args, outputs)
    return EXIT_OK


def _nothing_to_convert(loaded: loader.LoadedModel, report: ConversionReport) -> CLIError:
    return CLIError(
        f"nothing to convert: no residual chain of {loaded.source} was converted "
        f"({report.summary()}); nothing was written; see why with `fxmomentum inspect "
        f"{shlex.quote(loaded.target)} --show-skipped`",
        EXIT_CONVERT,
    )


def _write_outputs(
    gm: torch.nn.Module,
    loaded: loader.LoadedModel,
    args: argparse.Namespace,
    outputs: list[tuple[str, str]],
) -> None:
    """Write ``-o``, ``--export``, ``--onnx`` in that order; on a failure, the one error line
    says exactly which outputs were written and which were not attempted."""
    progress = _StderrProgress(quiet=False)
    written: list[tuple[str, str]] = []  # (path, line)
    for k, (option, path) in enumerate(outputs):
        try:
            written.append((path, _write_output(option, path, gm, loaded, progress)))
        except CLIError as exc:
            progress.clear()
            output = getattr(exc.__cause__, "output", "")
            if args.debug and output:
                sys.stderr.write(output.rstrip("\n") + "\n")
            status = _outputs_status(path, [p for p, _ in written], outputs[k + 1 :])
            fix = ""
            if isinstance(exc.__cause__, ExportError):
                fix = f"; try without {option}, or rerun with --debug to see torch's output"
            raise CLIError(f"{exc}; {status}{fix}", exc.code) from exc.__cause__
    progress.clear()
    for _, line in written:
        print(line, file=sys.stderr)


def _outputs_status(failed: str, written: list[str], rest: list[tuple[str, str]]) -> str:
    """Which outputs exist after a failure, in words.

    Examples
    --------
    >>> _outputs_status("m.pt2", ["m.pt"], [("--onnx", "m.onnx")])
    'm.pt2 was not written; wrote m.pt; --onnx m.onnx not attempted'
    """
    parts = [f"{failed} was not written"]
    parts.append(f"wrote {' and '.join(written)}" if written else "nothing else was written")
    if rest:
        parts.append(" and ".join(f"{opt} {path}" for opt, path in rest) + " not attempted")
    return "; ".join(parts)


def _write_output(
    option: str,
    path: str,
    gm: torch.nn.Module,
    loaded: loader.LoadedModel,
    progress: _StderrProgress,
) -> str:
    """Write one output; returns the line that says what was written."""
    if option == "-o":
        progress(f"saving {path} (torch.save)", transient=True)
        return _save_graph_module(gm, loaded, path)
    inputs = loaded.example_inputs
    assert inputs is not None
    if option == "--export":
        progress(f"exporting {path} (torch.export)", transient=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StaticBatchWarning)
            try:
                program = export_program(gm, inputs)
            except ExportError as exc:
                raise CLIError(str(exc), EXIT_EXPORT) from exc
        batch = _batch_text(caught)
        try:
            save_program(program, path)
        except OSError as exc:
            raise _write_failed("--export", path, exc) from exc
        return (
            f"wrote {path} (torch.export ExportedProgram, eval mode, {batch}; "
            f"torch.export.load to read it)"
        )
    progress(f"exporting {path} (torch.onnx.export, dynamo=True; then onnxruntime)", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StaticBatchWarning)  # OnnxResult says it
        try:
            result = export_onnx(gm, inputs, path)
        except ExportError as exc:
            raise CLIError(str(exc), EXIT_EXPORT) from exc
        except OSError as exc:
            raise _write_failed("--onnx", path, exc) from exc
    return str(result)


def _batch_text(caught: list[warnings.WarningMessage]) -> str:
    """ "batch dimension dynamic", or static and why (from a :class:`StaticBatchWarning`);
    other warnings are given again."""
    reasons = []
    for w in caught:
        if issubclass(w.category, StaticBatchWarning):
            reasons.append(str(w.message).partition(": ")[2])
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if reasons:
        return reasons[0].replace("the batch dimension is static", "batch dimension static", 1)
    return "batch dimension dynamic"


class _StderrProgress:
    """Progress lines on stderr; transient ones overwrite each other on a terminal."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.open_line = False

    def __call__(self, message: str, transient: bool = False) -> None:
        if self.quiet or (transient and not self.tty):
            return
        if transient:
            sys.stderr.write(f"\rfxmomentum: {message}\033[K")
            self.open_line = True
        else:
            self.close()
            sys.stderr.write(f"fxmomentum: {message}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.open_line:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.open_line = False

    def clear(self) -> None:
        """Erase an open transient line (nothing is left of it on the terminal)."""
        if self.open_line:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.open_line = False


def run_profile(args: argparse.Namespace) -> int:
    """``fxmomentum profile``: measure original against converted and print the result."""
    _check_gamma(args)
    if args.warmup < 0:
        raise CLIError(f"--warmup {args.warmup}: give 0 or more step pairs", EXIT_USAGE)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError(
            "--device cuda: torch.cuda.is_available() is False; use --device cpu", EXIT_USAGE
        )
    torch.manual_seed(0)  # the measuring children load the target after the same seed
    loaded = _load(args)
    _check_leaves(args, loaded)
    progress = _StderrProgress(args.quiet)
    restore_compile_hook = _show_compile_progress(progress)
    try:
        result = profiling.profile_model(
            loaded,
            input_shapes=args.input_shape,
            dtypes=args.dtype,
            batch=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            gamma=args.gamma,
            options=_converter_options(args),
            threads=args.threads,
            device=args.device,
            seed=0,
            progress=progress,
            plot=args.plot,
        )
    except loader.LoadError as exc:
        raise CLIError(str(exc), exc.exit_code) from exc
    except profiling.ProfileError as exc:
        raise _profile_failed(loaded, exc) from exc
    finally:
        progress.close()
        restore_compile_hook()
    if args.format == "json":
        print(json.dumps({"target": _target_info(loaded), **result.as_dict()}, indent=2))
        return EXIT_OK
    print(result.format(args.format))
    report = result.report
    if report is not None and report.skipped:
        if args.show_skipped:
            bullet = "- " if args.format == "markdown" else "  "
            print("\nResidual adds not converted:")
            print("\n".join(f"{bullet}{s}" for s in report.skipped))
        else:
            print(
                f"\n{len(report.skipped)} residual add(s) were not converted: add "
                f"--show-skipped to see them and why"
            )
    return EXIT_OK


def _show_compile_progress(progress: _StderrProgress) -> Callable[[], None]:
    """A progress line when the reversible engine first compiles its kernels (seconds to a
    minute); returns the function that removes it."""
    from ..engine import kernels

    before = kernels.on_first_compile

    def say() -> None:
        progress(
            "compiling the reversible engine's kernels (torch.compile, once per process; "
            "this takes a while)"
        )

    kernels.on_first_compile = say

    def restore() -> None:
        kernels.on_first_compile = before

    return restore


def _profile_failed(loaded: loader.LoadedModel, exc: profiling.ProfileError) -> CLIError:
    cause = exc.__cause__
    if exc.stage == "convert" and cause is not None:
        return _conversion_failed(loaded, cause)
    if exc.stage == "convert":
        return CLIError(str(exc), EXIT_CONVERT)
    if exc.stage == "original":
        return CLIError(
            f"{exc} on the example inputs ({_inputs_text(loaded)}); give inputs the model "
            f"trains on (--input-shape), or make its output a tensor that depends on the "
            f"parameters",
            EXIT_INPUTS,
        )
    if exc.stage == "converted":
        return CLIError(
            f"{exc}; leave the failing chain out with --exclude PATTERN, or rerun with --debug",
            EXIT_CONVERT,
        )
    return CLIError(
        f"{exc}; the machine may be out of memory: try a smaller --batch, or rerun with --debug",
        EXIT_INTERNAL,
    )


def _save_graph_module(gm: torch.nn.Module, loaded: loader.LoadedModel, path: str) -> str:
    try:
        with _importable_as_file_module(gm, loaded) as module_name, atomic_output(path) as tmp:
            torch.save(gm, tmp)
    except OSError as exc:
        raise _write_failed("-o", path, exc) from exc
    except Exception as exc:  # pickling errors: lambdas, local classes, open handles, ...
        raise CLIError(
            f"cannot save the converted model with torch.save ({one_line(exc)}); "
            f"save gm.state_dict() instead and rebuild with fxmomentum.convert",
            EXIT_EXPORT,
        ) from exc
    line = f"wrote {path} (torch.load(path, weights_only=False) with fxmomentum installed)"
    if module_name is not None:
        line += (
            f"; it uses classes from {loaded.source}, so loading needs that file importable as "
            f"`{module_name}` (run from its directory or put it on PYTHONPATH)"
        )
    return line
