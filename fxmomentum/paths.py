"""Module paths (``"layer1.0.conv1"``): joining them and matching them against patterns.

Every option that names modules (``include``, ``exclude``, a gamma per chain, ``--leaf``)
matches a path the same way: :func:`matches`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

__all__ = ["join_path", "matches", "within"]


def join_path(prefix: str, path: str) -> str:
    """``prefix.path``, either part possibly empty.

    Examples
    --------
    >>> join_path("encoder", "layers.0"), join_path("", "head"), join_path("body", "")
    ('encoder.layers.0', 'head', 'body')
    """
    return f"{prefix}.{path}" if prefix and path else prefix or path


def within(path: str, scope: str) -> bool:
    """Whether ``path`` is ``scope`` or a module under it.

    Examples
    --------
    >>> within("layer1.0.conv1", "layer1"), within("layer10", "layer1")
    (True, False)
    """
    return path == scope or path.startswith(scope + ".")


def matches(path: str, patterns: Iterable[str]) -> bool:
    """Whether ``path`` matches one of ``patterns``: a glob pattern (``"features.*"``), or a
    module path that holds it (``"layer3"`` selects ``"layer3.1.conv2"``).

    Examples
    --------
    >>> matches("features.3", ["features.*"]), matches("layer3.1", ["layer3"])
    (True, True)
    >>> matches("layer3.1", ["layer1"])
    False
    """
    return any(fnmatch.fnmatchcase(path, p) or within(path, p) for p in patterns)
