"""Example inputs: shapes and dtypes from the command line, random tensors of them, and the
check that the model runs on them."""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import one_line
from .errors import ExampleInputsError

__all__ = [
    "check_example_inputs",
    "input_shape_hint",
    "make_example_inputs",
    "parse_dtype",
    "parse_shape",
    "shape_text",
]


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"2,3,224,224"`` (or ``"2x3x224x224"``) into a shape.

    Raises
    ------
    ValueError
        If a dimension is not a positive integer (an empty string gives a 0-d scalar shape ``()``
        only when written as ``"()"``).

    Examples
    --------
    >>> parse_shape("2,3,224,224")
    (2, 3, 224, 224)
    """
    text = text.strip()
    if text in ("()", "[]", "scalar"):
        return ()
    parts = [p.strip() for p in re.split(r"[,x]", text.strip("()[] "))]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"bad shape {text!r}: write the dimensions separated by commas, as in 2,3,224,224"
        ) from None
    if any(d <= 0 for d in dims):
        raise ValueError(f"bad shape {text!r}: every dimension must be a positive integer")
    return dims


def parse_dtype(text: str) -> torch.dtype:
    """Parse a dtype name (``float32``, ``torch.float16``, ``int64``, ...).

    Examples
    --------
    >>> parse_dtype("float64")
    torch.float64
    """
    name = text.strip().removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"unknown dtype {text!r}: use a torch dtype name such as float32, float64, "
            f"bfloat16 or int64"
        )
    return dtype


def make_example_inputs(
    shapes: Sequence[Sequence[int]],
    dtypes: torch.dtype | Sequence[torch.dtype] | None = None,
    *,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Random example inputs of the given shapes.

    Floating dtypes get standard normal values; integer and boolean dtypes get zeros (valid
    indices for embeddings).

    Parameters
    ----------
    shapes : sequence of shapes
        One shape per positional input.
    dtypes : torch.dtype or sequence of torch.dtype, optional
        One dtype for all inputs, or one per input (default ``torch.float32``).
    seed : int
        Seed of a private generator, so that the same shapes give the same values.

    Examples
    --------
    >>> [t.shape for t in make_example_inputs([(2, 3), (4,)])]
    [torch.Size([2, 3]), torch.Size([4])]
    """
    if dtypes is None:
        dtypes = torch.float32
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    dtypes = list(dtypes)
    if len(dtypes) == 1 and len(shapes) > 1:
        dtypes = dtypes * len(shapes)
    if len(dtypes) != len(shapes):
        raise ExampleInputsError(
            f"{len(dtypes)} dtypes for {len(shapes)} input shapes; give one --dtype for all "
            f"inputs or one per --input-shape"
        )
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for shape, dtype in zip(shapes, dtypes, strict=True):
        if dtype.is_floating_point or dtype.is_complex:
            inputs.append(torch.randn(tuple(shape), generator=gen).to(dtype))
        else:
            inputs.append(torch.zeros(tuple(shape), dtype=dtype))
    return tuple(inputs)


def shape_text(inputs: Sequence[torch.Tensor]) -> str:
    return ", ".join(
        f"{'x'.join(map(str, t.shape)) or 'scalar'} {str(t.dtype).removeprefix('torch.')}"
        for t in inputs
    )


def input_shape_hint(model: nn.Module) -> str:
    """An ``--input-shape`` (and ``--dtype``) that fits the model's first module.

    The first module with parameters of its own decides: an embedding takes token ids, a
    convolution its channels, a linear layer its features.

    Examples
    --------
    >>> input_shape_hint(nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 2)))
    '--input-shape 1,16 --dtype int64'
    >>> input_shape_hint(nn.Sequential(nn.Conv2d(1, 4, 3)))
    '--input-shape 1,1,224,224'
    """
    for m in model.modules():
        if not any(True for _ in m.parameters(recurse=False)):
            continue
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            return "--input-shape 1,16 --dtype int64"
        if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
            return f"--input-shape 1,{m.in_channels},128"
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            return f"--input-shape 1,{m.in_channels},224,224"
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            return f"--input-shape 1,{m.in_channels},16,112,112"
        if isinstance(m, nn.Linear):
            return f"--input-shape 1,{m.in_features}"
        if isinstance(m, nn.MultiheadAttention):
            return f"--input-shape 1,16,{m.embed_dim}"
        break
    return "--input-shape 1,3,224,224"


def _raised_at(exc: BaseException) -> str:
    """`` at file:line`` of the innermost frame of the model's own code: not torch's, not
    fxmomentum's (``""`` if there is none)."""
    import fxmomentum

    skip = [os.path.dirname(torch.__file__), os.path.dirname(fxmomentum.__file__)]
    skip = [os.path.realpath(d) + os.sep for d in skip]
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        real = os.path.realpath(frame.filename)
        if not any(real.startswith(d) for d in skip) and not frame.filename.startswith("<"):
            return f" at {os.path.basename(frame.filename)}:{frame.lineno}"
    return ""


def check_example_inputs(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], *, source: str = "the inputs"
) -> None:
    """Run ``model`` once on the example inputs (eval mode, no grad) to check that they fit.

    The training flags of all submodules are restored afterwards, and no state changes (eval
    mode keeps BatchNorm statistics as they are).

    Raises
    ------
    ExampleInputsError
        If the model raises on them.

    Examples
    --------
    >>> check_example_inputs(nn.Linear(3, 2), (torch.randn(4, 3),))
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    except Exception as exc:
        raise ExampleInputsError(
            f"the model fails on example inputs of shape {shape_text(example_inputs)} "
            f"(from {source}): {one_line(exc)}{_raised_at(exc)}; give inputs the model "
            f"accepts, e.g. {input_shape_hint(model)}"
        ) from exc
    finally:
        for m, training in flags:
            m.training = training
