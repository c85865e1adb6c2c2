"""The one way fxmomentum turns an exception into a line of text.

Reports, notes and the command line all show errors raised by the user's model, by torch.fx or
by torch.export as one line (their messages may hold tracebacks, colour codes and dozens of
lines): :func:`one_line` is that line everywhere.
"""

from __future__ import annotations

import re

__all__ = ["one_line"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` on one line, whitespace collapsed, at most ``limit`` characters.

    Parameters
    ----------
    exc : BaseException
        The exception.
    limit : int
        Longest message kept (the type name comes on top); longer ones end in ``...``.

    Returns
    -------
    str

    Examples
    --------
    >>> one_line(ValueError("bad\\n   value"))
    'ValueError: bad value'
    >>> one_line(RuntimeError("x" * 50), limit=10)
    'RuntimeError: xxxxxxx...'
    >>> one_line(KeyError())
    'KeyError'
    """
    text = " ".join(_ANSI.sub("", str(exc)).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
