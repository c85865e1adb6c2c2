"""Command-line targets: ``LOCATION[:NAME]`` and ``NAME(arguments)`` read, never evaluated.

A target names a Python file or an importable module, optionally followed by ``:NAME``; a class
or factory ``NAME`` may carry arguments, Python literals only (:func:`ast.literal_eval`). What
the name then finds is :mod:`fxmomentum.tools.loader`'s business.
"""

from __future__ import annotations

import ast
import os
import re

from .errors import TargetError

__all__ = ["parse_target", "split_call", "with_model_args"]

_NAME_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: ``location:NAME(arguments)``: the location is the shortest prefix that leaves a name.
_CALL_TARGET_RE = re.compile(r"^(?P<location>.+?):(?P<name>[A-Za-z_][\w.]*\(.*\))$", re.S)


def parse_target(target: str) -> tuple[str, str, str | None]:
    """Split a target into its kind, location and attribute name.

    Parameters
    ----------
    target : str
        ``FILE.py``, ``FILE.py:NAME``, ``package.module`` or ``package.module:NAME``.

    Returns
    -------
    kind : {"file", "module"}
    location : str
        The file path or the dotted module name.
    name : str or None
        The attribute after the last ``:``, if any.

    Raises
    ------
    TargetError
        If the target is neither a file path nor a dotted module name.

    Examples
    --------
    >>> parse_target("model.py:Net")
    ('file', 'model.py', 'Net')
    >>> parse_target("torchvision.models:resnet50")
    ('module', 'torchvision.models', 'resnet50')
    >>> parse_target("torchvision.models:vit_b_16(image_size=96)")
    ('module', 'torchvision.models', 'vit_b_16(image_size=96)')
    """
    if not target or not target.strip():
        raise TargetError(
            "empty target; give a model file (model.py[:NAME]) or package.module:NAME"
        )
    call = _CALL_TARGET_RE.match(target)
    if call:  # NAME(arguments), split by split_call
        location, name = call["location"], call["name"]
    else:
        location, sep, name = target.rpartition(":")
        if not sep or not location or not _NAME_RE.match(name):
            # No ``:NAME`` (or a colon that belongs to the path, as in ``C:\\model.py``).
            location, name = target, None
    is_file = (
        location.endswith(".py")
        or os.sep in location
        or "/" in location
        or os.path.isfile(location)
        or os.path.isdir(location)
    )
    if is_file:
        return "file", location, name
    if _NAME_RE.match(location):
        return "module", location, name
    raise TargetError(
        f"target {target!r} is neither a Python file nor a module name; "
        f"give model.py[:NAME] or package.module[:NAME]"
    )


def split_call(name: str) -> tuple[str, tuple, dict[str, object]]:
    """Split ``NAME(arguments)`` into the name and its arguments, Python literals only.

    The arguments are read with :func:`ast.literal_eval` (numbers, strings, tuples, lists,
    dicts, ``True``/``False``/``None``); nothing is evaluated.

    Raises
    ------
    TargetError
        If the arguments are not literals, or not a call's argument list.

    Examples
    --------
    >>> split_call("vit_b_16(image_size=96, num_classes=10)")
    ('vit_b_16', (), {'image_size': 96, 'num_classes': 10})
    >>> split_call("Net")
    ('Net', (), {})
    """
    attr, paren, rest = name.partition("(")
    if not paren:
        return name, (), {}
    text = f"{attr}({rest}"
    try:
        call = ast.parse(text, mode="eval").body
    except SyntaxError:
        call = None
    if not isinstance(call, ast.Call) or not isinstance(call.func, (ast.Name, ast.Attribute)):
        raise TargetError(
            f"cannot read the arguments of {text!r}; write NAME(key=value, ...) with Python "
            f"literals, e.g. torchvision.models:vit_b_16(image_size=96)"
        )
    try:
        args = tuple(_literal(a) for a in call.args)
        kwargs = {_keyword(k): _literal(k.value) for k in call.keywords}
    except ValueError as exc:
        raise TargetError(
            f"in {text!r}: {exc}; arguments must be Python literals (numbers, strings, tuples, "
            f"lists, dicts, True/False/None)"
        ) from None
    return attr, args, kwargs


def _literal(node: ast.AST) -> object:
    if isinstance(node, ast.Starred):
        raise ValueError("*args cannot be given")
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"{ast.unparse(node)} is not a literal") from None


def _keyword(node: ast.keyword) -> str:
    if node.arg is None:
        raise ValueError("**kwargs cannot be given")
    return node.arg


def with_model_args(target: str, model_args: str) -> str:
    """``target`` with ``model_args`` (``"image_size=96, num_classes=10"``) as the arguments
    of its ``:NAME`` (the command line's ``--model-args``).

    Raises
    ------
    TargetError
        If the target has no ``:NAME``, already has arguments, or ``model_args`` is not a
        literal argument list.

    Examples
    --------
    >>> with_model_args("torchvision.models:vit_b_16", "image_size=96")
    'torchvision.models:vit_b_16(image_size=96)'
    """
    _, _, name = parse_target(target)
    if name is None:
        raise TargetError(
            f"--model-args needs the class or factory named in TARGET: give "
            f"{target}:NAME --model-args {model_args!r}"
        )
    if "(" in name:
        raise TargetError(f"{target} already has arguments; drop --model-args or those")
    combined = f"{target}({model_args})"
    split_call(parse_target(combined)[2] or "")  # check them now
    return combined
