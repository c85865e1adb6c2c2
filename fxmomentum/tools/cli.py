"""The ``fxmomentum`` command line: a thin argparse layer over :mod:`fxmomentum`.

Commands (``fxmomentum COMMAND --help`` for each)::

    fxmomentum inspect TARGET    list the residual chains the converter finds
    fxmomentum convert TARGET    convert and save (torch.save, torch.export, ONNX)
    fxmomentum profile TARGET    measure the memory and time of a training step, original
                                 against converted

``TARGET`` is ``model.py``, ``model.py:NAME`` or ``package.module:NAME``
(see :mod:`fxmomentum.tools.loader` for how the model is found).

Errors print one line on stderr (``fxmomentum: error: <problem>; <fix>``) and exit with a code
of :data:`EXIT_CODES`; ``--debug`` shows the traceback instead. To add a command, write a
``_add_<name>(subparsers)`` that registers a subparser with ``set_defaults(run=...)`` and call
it from :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import one_line

if TYPE_CHECKING:
    import torch

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
an nn.Module class built without arguments, or a function returning the model; a class or
function takes arguments as NAME(ARGS) or --model-args ARGS, Python literals only, e.g.
torchvision.models:vit_b_16(image_size=96). Without NAME:
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
# They import torch (through the loader and the engine) only when an argument is parsed.
def _shape(text: str) -> tuple[int, ...]:
    from . import inputs

    try:
        return inputs.parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _dtype(text: str) -> torch.dtype:
    from . import inputs

    try:
        return inputs.parse_dtype(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gamma(text: str) -> float:
    from ..engine.exact import validate_gamma

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number; use e.g. --gamma 0.9"
        ) from None
    try:
        validate_gamma(value, reversible=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text} is outside [0, 1); use e.g. --gamma 0.9 (0 is the original model; at 1 no "
            f"block would have an effect)"
        ) from None
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; use e.g. 0.5") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"{text} is outside [0, 1]: the budget is a fraction of the original's activation "
            f"memory (0 = least memory, 1 = fastest)"
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
    common.add_argument(
        "target", metavar="TARGET", help="model.py[:NAME] or package.module:NAME[(ARGS)]"
    )
    common.add_argument(
        "--model-args",
        metavar="ARGS",
        help="arguments of the class or factory NAME, Python literals, e.g. "
        "'image_size=96, num_classes=10' (the same as TARGET:NAME(ARGS))",
    )
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
    conv.add_argument(
        "--memory-budget",
        type=_fraction,
        metavar="B",
        help="plan every region (reversible, recompute or keep) for the fastest training step "
        "within B times the original's activation memory (0 = least memory, 1 = fastest; needs "
        "example inputs)",
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
        "  fxmomentum inspect model.py --diff          # graph code before/after\n"
        "  fxmomentum inspect model.py --input-shape 1,3,64,64 --html model.html\n\n" + _EXIT_TEXT,
    )
    p.add_argument(
        "--diff",
        action="store_true",
        help="show the top-level graph code before and after conversion (unified diff)",
    )
    p.add_argument(
        "--html",
        metavar="OUT.html",
        help="also write one self-contained page: the modules in order with every chain "
        "highlighted, what was skipped and why, each chain's memory and time cost",
    )
    p.set_defaults(run="run_inspect")


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
    p.set_defaults(run="run_convert")


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
    p.add_argument(
        "--plot",
        metavar="OUT.png",
        help="also measure every chain reversible and checkpoint per block, and plot memory "
        "against time with the memory budget's curve (needs matplotlib)",
    )
    p.set_defaults(run="run_profile")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fxmomentum`` command.

    Examples
    --------
    >>> args = build_parser().parse_args(["inspect", "model.py", "--format", "json"])
    >>> args.command, args.target, args.format
    ('inspect', 'model.py', 'json')
    """
    from .. import __version__

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
        from . import commands  # imports torch: only once a command runs

        run: Callable[[argparse.Namespace], int] = getattr(commands, args.run)
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
    except BrokenPipeError:
        # The reader of stdout went away (`fxmomentum inspect ... | head`): nothing to report.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if debug:
            raise
        print(
            f"fxmomentum: internal error ({one_line(exc)}); rerun with --debug and "
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
