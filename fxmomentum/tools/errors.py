"""The errors of loading a model from the command line: one line each, with an exit code."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AmbiguousModelError",
    "ExampleInputsError",
    "LoadError",
    "ModelNotFoundError",
    "TargetError",
]


class LoadError(Exception):
    """A target that cannot be turned into a model; ``str(err)`` is one line."""

    #: Exit code of the command line for this kind of error.
    exit_code = 1


class TargetError(LoadError):
    """The file or module cannot be found or imported, or its code raised."""

    exit_code = 3


class ModelNotFoundError(LoadError):
    """Nothing model-like in the target, or ``NAME`` does not give an ``nn.Module``."""

    exit_code = 4


class AmbiguousModelError(ModelNotFoundError):
    """A rule found several candidates; ``candidates`` lists them."""

    def __init__(self, message: str, candidates: Sequence[str]) -> None:
        super().__init__(message)
        self.candidates = list(candidates)


class ExampleInputsError(LoadError):
    """Example inputs of the wrong kind, or ones the model cannot run on."""

    exit_code = 6
