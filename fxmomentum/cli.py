"""The ``fxmomentum`` command line: a thin argparse layer over :mod:`fxmomentum`.

Commands (``fxmomentum COMMAND --help`` for each)::

    fxmomentum inspect TARGET    list the residual chains the converter finds
    fxmomentum convert TARGET    convert and save (torch.save, torch.export, ONNX)
    fxmomentum profile TARGET    measure the memory and time of a training step, original
                                 against converted

``TARGET`` is ``model.py``, ``model.py:NAME`` or ``package.module:NAME``
(see :mod:`fxmomentum.loader` for how the model is found).

Errors print one line on stderr (``fxmomentum: error: <problem>; <fix>``) and exit with a code
of :data:`EXIT_CODES`; ``--debug`` shows the traceback instead. To add a command, write a
``_add_<name>(subparsers)`` that registers a subparser with ``set_defaults(run=...)`` and call
it from :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import api, loader
from . import profile as profiling
from .engine import quantize_gamma
from .export import ExportError, atomic_output, export_onnx, export_program, save_program
from .report import ConversionReport

__all__ = ["EXIT_CODES", "CLIError", "build_parser", "main"]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_TARGET = 3
EXIT_MODEL = 4
EXIT_CONVERT = 5
EXIT_INPUTS = 6
EXIT_OUTPUT = 7
EXIT_EXPORT = 8

#: Exit codes of the command line and what they mean.
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: rerun with --debug and report the traceback)",
    EXIT_USAGE: "bad command-line usage (unknown option, bad value, gamma outside [0, 1], ...)",
    EXIT_TARGET: "target not found, or its file/module failed to import or raised",
    EXIT_MODEL: "no model found in the target, or several candidates (pick one with :NAME)",
    EXIT_CONVERT: "the model could not be captured or converted",
    EXIT_INPUTS: "bad example inputs (wrong kind, or the model fails on them)",
    EXIT_OUTPUT: "an output path is not writable",
    EXIT_EXPORT: "saving, torch.export or ONNX export failed, or ONNX outputs differ",
}

_EXIT_TEXT = "exit codes:\n" + "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())

_TARGET_TEXT = """\
TARGET is model.py, model.py:NAME or package.module:NAME. NAME is an nn.Module instance,
an nn.Module class built without arguments, or a function returning the model. Without NAME:
a module-level `model`, else a function build_model/get_model/create_model, else the only
nn.Module instance, else the only nn.Module class of the file that builds without arguments.
Example inputs: `example_inputs` in the file (a tensor, a tuple of tensors, or a function
returning one), or --input-shape (repeat it for several inputs). Without them, chains are found
from the graph's structure only and shapes are not verified."""


class CLIError(Exception):
    """An error reported as one line on stderr, with an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (and a :class:`CLIError`)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CLIError(f"{message} (see `{self.prog} --help`)", EXIT_USAGE)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


# -- argument types --------------------------------------------------------------------------------
def _shape(text: str) -> tuple[int, ...]:
    try:
        return loader.parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dtype(text: str) -> torch.dtype:
    try:
        return loader.parse_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gamma(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number; use e.g. --gamma 0.9"
        ) from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"{text} is outside [0, 1]; use e.g. --gamma 0.9 (0 is the original ResNet)"
        )
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


# -- parser ----------------------------------------------------------------------------------------
def _common_options() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("target", metavar="TARGET", help="model.py[:NAME] or package.module:NAME")
    inputs = common.add_argument_group("example inputs")
    inputs.add_argument(
        "--input-shape",
        metavar="SHAPE",
        type=_shape,
        action="append",
        help="shape of a random example input, e.g. 2,3,224,224; repeat for several inputs "
        "(replaces the file's example_inputs)",
    )
    inputs.add_argument(
        "--dtype",
        type=_dtype,
        action="append",
        help="dtype of the --input-shape inputs: one for all, or one per input "
        "(default float32; int64 gives zero token ids)",
    )
    conv = common.add_argument_group("conversion")
    conv.add_argument(
        "--gamma",
        type=_gamma,
        default=0.9,
        help="momentum in [0, 1] (default 0.9; 0 is the original ResNet)",
    )
    conv.add_argument(
        "--use-backprop",
        action="store_true",
        help="train the chains with plain autograd (stores activations) instead of the "
        "reversible backward; needed for --gamma 0",
    )
    conv.add_argument(
        "--min-blocks",
        type=_positive_int,
        default=1,
        metavar="N",
        help="convert only chains of at least N blocks (default 1)",
    )
    conv.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="convert only chains whose module path matches PATTERN (repeatable)",
    )
    conv.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="do not convert chains whose module path matches PATTERN (repeatable)",
    )
    conv.add_argument(
        "--leaf",
        action="append",
        metavar="MODULE",
        help="keep the submodule at this path whole (not traced into); repeatable",
    )
    conv.add_argument(
        "--cost-model",
        action="store_true",
        help="convert a chain only if its estimated memory saving is positive "
        "(needs example inputs)",
    )
    out = common.add_argument_group("output")
    out.add_argument(
        "--format",
        choices=("table", "json", "markdown"),
        default="table",
        help="report format (default table)",
    )
    out.add_argument(
        "--show-skipped",
        action="store_true",
        help="list the residual additions that were not converted, and why "
        "(JSON always lists them)",
    )
    out.add_argument(
        "--debug", action="store_true", help="show Python tracebacks and warnings on errors"
    )
    return common


def _add_inspect(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "inspect",
        parents=[common],
        formatter_class=_Formatter,
        help="list the residual chains of a model (nothing is written)",
        description="Find the residual chains of a model and report what convert would do.\n\n"
        + _TARGET_TEXT,
        epilog="examples:\n"
        "  fxmomentum inspect model.py\n"
        "  fxmomentum inspect torchvision.models:resnet50 --input-shape 1,3,224,224\n"
        "  fxmomentum inspect model.py:Net --format json --show-skipped\n"
        "  fxmomentum inspect model.py --diff          # graph code before/after\n\n" + _EXIT_TEXT,
    )
    p.add_argument(
        "--diff",
        action="store_true",
        help="show the top-level graph code before and after conversion (unified diff)",
    )
    p.set_defaults(run=_run_inspect)


def _add_convert(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "convert",
        parents=[common],
        formatter_class=_Formatter,
        help="convert a model and save it (torch.save, torch.export, ONNX)",
        description="Convert the residual chains of a model into momentum chains and save the "
        "converted GraphModule.\n\n"
        + _TARGET_TEXT
        + "\n\nThe -o file is a pickled GraphModule: load it with torch.load(path, "
        "weights_only=False)\nwhere fxmomentum is installed, and only if you trust it "
        "(unpickling runs code). Its\nstate_dict keys equal the original model's. --export and "
        "--onnx export the model in\neval mode (the plain chain, no autograd Function) and need "
        "example inputs.",
        epilog="examples:\n"
        "  fxmomentum convert model.py --gamma 0.9 -o converted.pt\n"
        "  fxmomentum convert torchvision.models:resnet18 --input-shape 1,3,224,224 \\\n"
        "      -o resnet18_momentum.pt --export resnet18.pt2 --onnx resnet18.onnx\n"
        "  fxmomentum convert model.py --gamma 0 --use-backprop -o same_function.pt\n\n"
        + _EXIT_TEXT,
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT.pt",
        help="write the converted GraphModule here with torch.save",
    )
    p.add_argument(
        "--export",
        metavar="OUT.pt2",
        help="also write a torch.export ExportedProgram of the converted model (eval mode)",
    )
    p.add_argument(
        "--onnx",
        metavar="OUT.onnx",
        help="also write ONNX (torch.onnx.export, dynamo=True); checked with onnxruntime "
        "when it is installed",
    )
    p.set_defaults(run=_run_convert)


def _add_profile(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "profile",
        parents=[common],
        formatter_class=_Formatter,
        help="measure the activation memory and time of a training step, original vs converted",
        description="How much would converting save on this model? Runs one training step "
        "(forward, the sum of\nthe outputs as loss, backward) of the original and of the "
        "converted model and reports their\nactivation memory (peak resident memory of the step "
        "over the memory before it, one fresh\nprocess per configuration that loads TARGET "
        "again, after a warm-up step) and their time\nratio (the two steps interleaved, the "
        "median of --steps per-pair ratios), with each\nconverted chain's estimated share of "
        "the saving.\n\n" + _TARGET_TEXT + "\n\nProfile needs example inputs. Progress goes "
        "to stderr, the result to stdout.",
        epilog="examples:\n"
        "  fxmomentum profile model.py --input-shape 8,3,224,224\n"
        "  fxmomentum profile torchvision.models:resnet50 --input-shape 1,3,128,128 --batch 16\n"
        "  fxmomentum profile model.py --steps 20 --format json\n\n" + _EXIT_TEXT,
    )
    p.add_argument(
        "--batch",
        type=_positive_int,
        metavar="N",
        help="replace the first dimension of every example input by N",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=10,
        metavar="K",
        help="interleaved step pairs timed; the time ratio is their median (default 10)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        metavar="W",
        help="untimed step pairs first; also the warm-up steps of the memory runs (default 1)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="torch threads for the measured steps (default: torch's current setting)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="where to run the steps (default cpu; on cuda memory is "
        "torch.cuda.max_memory_allocated)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    p.set_defaults(run=_run_profile)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fxmomentum`` command.

    Examples
    --------
    >>> args = build_parser().parse_args(["inspect", "model.py", "--format", "json"])
    >>> args.command, args.target, args.format
    ('inspect', 'model.py', 'json')
    """
    from . import __version__

    parser = _Parser(
        prog="fxmomentum",
        formatter_class=_Formatter,
        description="Find the residual chains of a PyTorch model with torch.fx and turn them "
        "into reversible\nMomentum ResNet chains (activations rebuilt in backward instead of "
        "stored).",
        epilog="examples:\n"
        "  fxmomentum inspect model.py\n"
        "  fxmomentum inspect torchvision.models:resnet50 --input-shape 1,3,224,224\n"
        "  fxmomentum convert model.py --gamma 0.9 -o converted.pt\n"
        "  python -m fxmomentum convert model.py:Net -o net.pt --onnx net.onnx\n\n"
        "Run `fxmomentum COMMAND --help` for the options of a command.\n\n" + _EXIT_TEXT,
    )
    parser.add_argument("--version", action="version", version=f"fxmomentum {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    common = _common_options()
    _add_inspect(subparsers, common)
    _add_convert(subparsers, common)
    _add_profile(subparsers, common)
    return parser


# -- running ---------------------------------------------------------------------------------------
def _load(args: argparse.Namespace) -> loader.LoadedModel:
    if args.dtype and not args.input_shape:
        raise CLIError(
            "--dtype applies to --input-shape inputs; add --input-shape (the file's "
            "example_inputs keep their own dtypes)",
            EXIT_USAGE,
        )
    try:
        return loader.load_target(
            args.target,
            input_shapes=args.input_shape,
            dtypes=args.dtype,
            check_inputs=True,
        )
    except loader.LoadError as exc:
        raise CLIError(str(exc), exc.exit_code) from exc


def _check_gamma(args: argparse.Namespace) -> None:
    if not args.use_backprop and quantize_gamma(args.gamma) == 0:
        raise CLIError(
            f"--gamma {args.gamma:g} cannot be reversed (the inverse divides by gamma); add "
            f"--use-backprop, or use a gamma of at least 1e-5",
            EXIT_USAGE,
        )


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
    return options


def _conversion_failed(loaded: loader.LoadedModel, exc: BaseException) -> CLIError:
    text = " ".join(str(exc).split())
    if len(text) > 400:
        text = text[:397] + "..."
    if type(exc).__name__ == "CaptureError":
        # The capture error says what cannot be traced and what to do about it.
        return CLIError(f"cannot capture the model from {loaded.source}: {text}", EXIT_CONVERT)
    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
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
def _run_inspect(args: argparse.Namespace) -> int:
    _check_gamma(args)
    loaded = _load(args)
    _check_leaves(args, loaded)
    options = _converter_options(args)
    try:
        report = api.inspect(loaded.model, loaded.example_inputs, gamma=args.gamma, **options)
    except Exception as exc:
        raise _conversion_failed(loaded, exc) from exc
    print(_format_report(report, loaded, args))
    return EXIT_OK


def _run_convert(args: argparse.Namespace) -> int:
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
            f"{option} needs example inputs; add --input-shape (e.g. --input-shape 1,3,224,224) "
            f"or define example_inputs in the model file",
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

    written: list[str] = []
    if args.output:
        _save_graph_module(gm, loaded, args.output, written)
    if args.export:
        try:
            program = export_program(gm, loaded.example_inputs)
        except ExportError as exc:
            raise CLIError(
                f"{exc}; the other outputs were written; try without --export or rerun with "
                f"--debug",
                EXIT_EXPORT,
            ) from exc
        try:
            save_program(program, args.export)
        except OSError as exc:
            raise _write_failed("--export", args.export, exc) from exc
        written.append(
            f"wrote {args.export} (torch.export ExportedProgram, eval mode; "
            f"torch.export.load to read it)"
        )
    if args.onnx:
        try:
            result = export_onnx(gm, loaded.example_inputs, args.onnx)
        except ExportError as exc:
            raise CLIError(f"{exc}; {args.onnx} was not written", EXIT_EXPORT) from exc
        except OSError as exc:
            raise _write_failed("--onnx", args.onnx, exc) from exc
        written.append(str(result))

    print(_format_report(report, loaded, args))
    for line in written:
        print(line, file=sys.stderr)
    return EXIT_OK


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


def _run_profile(args: argparse.Namespace) -> int:
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
        )
    except loader.LoadError as exc:
        raise CLIError(str(exc), exc.exit_code) from exc
    except profiling.ProfileError as exc:
        raise _profile_failed(loaded, exc) from exc
    finally:
        progress.close()
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


def _save_graph_module(
    gm: torch.nn.Module, loaded: loader.LoadedModel, path: str, written: list[str]
) -> None:
    try:
        with _importable_as_file_module(gm, loaded) as module_name, atomic_output(path) as tmp:
            torch.save(gm, tmp)
    except OSError as exc:
        raise _write_failed("-o", path, exc) from exc
    except Exception as exc:  # pickling errors: lambdas, local classes, open handles, ...
        text = " ".join(str(exc).split())[:300]
        raise CLIError(
            f"cannot save the converted model with torch.save ({type(exc).__name__}: {text}); "
            f"save gm.state_dict() instead and rebuild with fxmomentum.convert",
            EXIT_EXPORT,
        ) from exc
    line = f"wrote {path} (torch.load(path, weights_only=False) with fxmomentum installed)"
    if module_name is not None:
        line += (
            f"; it uses classes from {loaded.source}, so loading needs that file importable as "
            f"`{module_name}` (run from its directory or put it on PYTHONPATH)"
        )
    written.append(line)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Examples
    --------
    >>> main(["inspect", "torchvision.models:resnet18", "--input-shape", "1,3,64,64"])
    ... # doctest: +SKIP
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        run: Callable[[argparse.Namespace], int] = args.run
        if debug:
            return run(args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            code = run(args)
        _print_warnings(caught)
        return code
    except CLIError as exc:
        if debug and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)
        print(f"fxmomentum: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("fxmomentum: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        text = " ".join(str(exc).split())[:300]
        print(
            f"fxmomentum: internal error ({type(exc).__name__}: {text}); rerun with --debug and "
            f"report the traceback",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _print_warnings(caught: Sequence[warnings.WarningMessage]) -> None:
    seen: set[str] = set()
    for w in caught:
        text = " ".join(str(w.message).split())
        if text in seen:
            continue
        seen.add(text)
        print(f"fxmomentum: warning: {text}", file=sys.stderr)
