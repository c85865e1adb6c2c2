"""The package's layers (ARCHITECTURE.md) hold: each imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fxmomentum"

#: Layer of each top-level module or folder, and the layers it may import.
LAYERS = {
    "errors": "base",
    "patches": "base",
    "paths": "base",
    "classes": "base",
    "engine": "engine",
    "capture": "capture",
    "official": "official",
    "surgery": "surgery",
    "api": "api",
    "schedule": "api",
    "tools": "tools",
}
ALLOWED = {
    "base": set(),
    "engine": {"base"},
    "capture": {"base", "engine"},
    "official": {"base", "engine"},
    "surgery": {"base", "engine", "capture"},
    "api": {"base", "engine", "capture", "surgery"},
    "tools": {"base", "engine", "capture", "surgery", "official", "api"},
}


def _layer_of(parts: tuple[str, ...]) -> str | None:
    return LAYERS.get(parts[0].removesuffix(".py")) if parts else None


def _imported(path: Path) -> list[tuple[int, tuple[str, ...]]]:
    """The fxmomentum modules a file imports, as paths inside the package."""
    here = path.relative_to(PACKAGE).parent.parts
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = (*base, *(node.module or "").split(".")) if node.module else base
                names = [(*target, a.name) for a in node.names] if not node.module else [target]
            elif node.module and node.module.split(".")[0] == "fxmomentum":
                names = [tuple(node.module.split(".")[1:])]
            else:
                continue
            found += [(node.lineno, tuple(p for p in n if p)) for n in names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fxmomentum":
                    found.append((node.lineno, tuple(alias.name.split(".")[1:])))
    return found


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")
               or p.parent != PACKAGE)  # fmt: skip


def test_every_module_has_a_layer():
    for path in FILES:
        assert _layer_of(path.relative_to(PACKAGE).parts) is not None, path


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_layers_below(path):
    own = _layer_of(path.relative_to(PACKAGE).parts)
    for line, target in _imported(path):
        layer = _layer_of(target)
        if layer is None or layer == own:
            continue
        assert layer in ALLOWED[own], f"{path.name}:{line} ({own}) imports {'.'.join(target)}"
