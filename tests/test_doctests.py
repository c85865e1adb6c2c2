"""The examples in the docstrings of every module of the package run, and give what they say."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import fxmomentum

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(fxmomentum.__path__, prefix="fxmomentum.")
    if info.name != "fxmomentum.__main__"
)

#: Modules whose public functions and classes users call: each must show an example.
WITH_EXAMPLES = {
    "fxmomentum.api",
    "fxmomentum.classes",
    "fxmomentum.errors",
    "fxmomentum.patches",
    "fxmomentum.paths",
    "fxmomentum.schedule",
    "fxmomentum.capture.trace",
    "fxmomentum.capture.descent",
    "fxmomentum.engine.chain",
    "fxmomentum.engine.exact",
    "fxmomentum.engine.function",
    "fxmomentum.official.momentum_net",
    "fxmomentum.official.transform",
    "fxmomentum.surgery.match",
    "fxmomentum.surgery.report",
    "fxmomentum.surgery.rewrite",
    "fxmomentum.surgery.select",
    "fxmomentum.tools.export",
    "fxmomentum.tools.html",
    "fxmomentum.tools.measure",
}


def test_every_module_is_listed():
    assert WITH_EXAMPLES <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, result
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"{name} shows no example"
