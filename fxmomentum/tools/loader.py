"""Find the model (and its example inputs) in a command-line target.

A target names a Python file or an importable module, optionally followed by ``:NAME``::

    model.py                 a file, searched with the rules below
    path/to/model.py:Net     attribute ``Net`` of that file
    torchvision.models:resnet50
                             attribute ``resnet50`` of an importable module

``NAME`` picks an attribute: an ``nn.Module`` instance, an ``nn.Module`` class whose constructor
needs no arguments, or a factory function called with no arguments. A class or factory may be
given arguments, Python literals only (read with :func:`ast.literal_eval`, never evaluated)::

    torchvision.models:vit_b_16(image_size=96)
    model.py:Net(depth=4, widths=(16, 32))

Without ``NAME`` the first rule that finds something wins:

1. a module-level ``nn.Module`` instance named ``model``;
2. a factory function named ``build_model``, ``get_model`` or ``create_model``;
3. the only ``nn.Module`` instance at module level;
4. the only ``nn.Module`` subclass defined in the file itself (not imported) that can be built
   with no arguments.

A rule that finds several candidates raises :class:`AmbiguousModelError`, listing them.

Example inputs come from an ``example_inputs`` object in the file (a tensor, a tuple of tensors,
or a function returning one of these), or from shapes given on the command line
(:func:`make_example_inputs`); shapes given explicitly win over the file's.

Loading a file does not write its bytecode (``__pycache__``) next to it.

Every error raised here is a :class:`LoadError` whose message is one line naming the problem and
the fix, and whose ``exit_code`` the command line uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import os
import re
import sys
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import one_line
from .errors import (
    AmbiguousModelError,
    ExampleInputsError,
    LoadError,
    ModelNotFoundError,
    TargetError,
)
from .inputs import check_example_inputs, make_example_inputs
from .targets import parse_target, split_call, with_model_args

__all__ = [
    "FACTORY_NAMES",
    "AmbiguousModelError",
    "ExampleInputsError",
    "LoadError",
    "LoadedModel",
    "ModelNotFoundError",
    "TargetError",
    "find_model",
    "load_module",
    "load_target",
    "parse_target",
    "split_call",
    "with_model_args",
]

#: Factory function names looked for (rule 2), in this order.
FACTORY_NAMES = ("build_model", "get_model", "create_model")

_counter = itertools.count()


# -- result ----------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """What :func:`load_target` found.

    Attributes
    ----------
    model : nn.Module
        The model.
    target : str
        The target as given.
    source : str
        The file path or the module name the model came from.
    name : str
        The attribute that gave the model.
    how : str
        How it was found, in words (``"instance `model`"``, ``"factory build_model()"``, ...).
    module : types.ModuleType
        The imported module.
    example_inputs : tuple of torch.Tensor or None
        Positional example inputs, or ``None`` when there are none.
    inputs_from : str or None
        Where the example inputs came from, in words.
    """

    model: nn.Module
    target: str
    source: str
    name: str
    how: str
    module: types.ModuleType
    example_inputs: tuple[torch.Tensor, ...] | None = None
    inputs_from: str | None = None


@contextlib.contextmanager
def _no_bytecode() -> Iterator[None]:
    """Python does not write ``__pycache__`` next to the user's files while they load."""
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = before


@contextlib.contextmanager
def _on_sys_path(directory: str) -> Iterator[None]:
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(directory)


def _user_frame(exc: BaseException, path: str | None) -> str:
    """``file:line`` of the innermost traceback frame in ``path`` (or the innermost overall)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    chosen = frames[-1]
    if path is not None:
        real = os.path.realpath(path)
        inside = [f for f in frames if os.path.realpath(f.filename) == real]
        if inside:
            chosen = inside[-1]
    return f"{os.path.basename(chosen.filename)}:{chosen.lineno}"


def _raised(where: str, exc: BaseException, path: str | None, fix: str) -> TargetError:
    at = _user_frame(exc, path)
    at = f" at {at}" if at else ""
    return TargetError(f"{where} raised {one_line(exc)}{at}; {fix}")


def load_module(kind: str, location: str) -> types.ModuleType:
    """Import a file (by path, under a unique module name) or an importable module.

    A file is imported with :mod:`importlib` under a fresh name (``fxmomentum_target_<stem>_<n>``,
    registered in ``sys.modules``), with its directory at the front of ``sys.path`` while it runs,
    so that it can import its neighbours.

    Parameters
    ----------
    kind : {"file", "module"}
        As returned by :func:`parse_target`.
    location : str
        The file path or the dotted module name.

    Returns
    -------
    types.ModuleType

    Raises
    ------
    TargetError
        The file does not exist, does not parse, or raised while running; or the module cannot
        be imported.

    Examples
    --------
    >>> mod = load_module("module", "torchvision.models")
    >>> hasattr(mod, "resnet18")
    True
    """
    if kind == "module":
        try:
            return importlib.import_module(location)
        except ModuleNotFoundError as exc:
            missing = exc.name or location
            if location == missing or location.startswith(missing + "."):
                raise TargetError(
                    f"cannot import module {location!r} (no module named {missing!r}); check the "
                    f"spelling, install the package, or give a file path ending in .py"
                ) from exc
            raise _raised(
                f"importing {location}", exc, None, f"install {missing!r} or fix the module"
            ) from exc
        except SyntaxError as exc:
            raise TargetError(
                f"syntax error in {exc.filename}:{exc.lineno}: {exc.msg}; fix the module"
            ) from exc
        except Exception as exc:
            raise _raised(f"importing {location}", exc, None, "fix the module") from exc

    path = location
    if not os.path.exists(path):
        raise TargetError(f"file not found: {path}; check the path (the target is FILE.py[:NAME])")
    if os.path.isdir(path):
        raise TargetError(f"{path} is a directory; give the Python file that defines the model")
    real = os.path.realpath(path)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(real))[0]) or "model"
    digest = hashlib.sha1(real.encode()).hexdigest()[:8]
    module_name = f"fxmomentum_target_{stem}_{digest}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(module_name, real)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load {path} as Python source; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        with _on_sys_path(os.path.dirname(real)), _no_bytecode():
            spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        where = f"{path}:{exc.lineno}" if exc.lineno else path
        raise TargetError(f"syntax error in {where}: {exc.msg}; fix the file") from exc
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        sys.modules.pop(module_name, None)
        if os.path.realpath(getattr(exc, "filename", "") or "") == real:
            raise TargetError(f"cannot read {path}: {exc.strerror}; check the path") from exc
        raise _raised(f"running {path}", exc, real, "fix the model file") from exc
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise _raised(f"running {path}", exc, real, "fix the model file") from exc
    return module


# -- finding the model -----------------------------------------------------------------------------
def _required_params(obj: Callable[..., object]) -> list[str] | None:
    """Names of the parameters a no-argument call would miss (``None``: unknown)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [
        p.name
        for p in sig.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def _is_module_class(obj: object) -> bool:
    return inspect.isclass(obj) and issubclass(obj, nn.Module)


def _call_text(name: str, args: tuple, kwargs: dict[str, object]) -> str:
    shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(shown)})"


def _call(
    obj: Callable[..., object],
    label: str,
    source: str,
    path: str | None,
    what: str,
    args: tuple = (),
    kwargs: dict[str, object] | None = None,
) -> object:
    kwargs = kwargs or {}
    missing = _required_params(obj)
    if missing and not args and not kwargs:
        names = ", ".join(missing)
        attr = label.partition("(")[0]
        example = ", ".join(f"{n}=..." for n in missing)
        raise ModelNotFoundError(
            f"{label} in {source} needs arguments ({names}); pass them as "
            f"{source}:{attr}({example}) (or --model-args '{example}'), give them defaults, or "
            f"write a function without arguments that returns the model"
        )
    if args or kwargs:
        try:
            inspect.signature(obj).bind(*args, **kwargs)
        except TypeError as exc:
            raise ModelNotFoundError(f"{label} in {source}: {exc}; check the arguments") from None
        except ValueError:
            pass  # no signature to check against
    try:
        return obj(*args, **kwargs)
    except Exception as exc:
        raise _raised(label, exc, path, f"fix {what} in {source}") from exc


def _build(
    obj: object,
    name: str,
    source: str,
    path: str | None,
    args: tuple = (),
    kwargs: dict[str, object] | None = None,
) -> tuple[nn.Module, str]:
    """Turn the attribute ``name`` into a model: instance, class or factory (called with
    ``args`` and ``kwargs``)."""
    kwargs = kwargs or {}
    label = _call_text(name, args, kwargs)
    if isinstance(obj, nn.Module):
        if args or kwargs:
            raise ModelNotFoundError(
                f"{source}:{name} is an nn.Module instance, which takes no arguments; drop "
                f"them, or name its class or a factory"
            )
        return obj, f"instance `{name}`"
    if _is_module_class(obj):
        built = _call(obj, label, source, path, f"class {name}", args, kwargs)
        return built, f"class {label}"  # type: ignore[return-value]
    if inspect.isclass(obj):
        raise ModelNotFoundError(
            f"{source}:{name} is the class {obj.__name__}, which is not an nn.Module subclass; "
            f"pass an nn.Module instance, subclass or factory function"
        )
    if callable(obj):
        built = _call(obj, label, source, path, f"function {name}", args, kwargs)
        if not isinstance(built, nn.Module):
            raise ModelNotFoundError(
                f"{label} in {source} returned {type(built).__name__}, not an nn.Module; "
                f"make it return the model"
            )
        return built, f"factory {label}"
    raise ModelNotFoundError(
        f"{source}:{name} is {_a(type(obj).__name__)}, not a model; pass an nn.Module instance, "
        f"an nn.Module subclass or a factory function"
    )


def _ambiguous(source: str, what: str, names: Sequence[str]) -> AmbiguousModelError:
    listed = ", ".join(names)
    return AmbiguousModelError(
        f"several {what} in {source}: {listed}; pick one with {source}:NAME", names
    )


def find_model(
    module: types.ModuleType, name: str | None = None, *, source: str | None = None
) -> tuple[nn.Module, str, str]:
    """Find the model in an imported module, by ``name`` or by the rules of this module.

    Parameters
    ----------
    module : types.ModuleType
        The imported file or module.
    name : str, optional
        The attribute to use (dotted names reach into sub-objects). Without it, the rules in the
        module docstring apply.
    source : str, optional
        How to name the module in messages (default: its ``__file__`` or ``__name__``).

    Returns
    -------
    model : nn.Module
    name : str
        The attribute that gave the model.
    how : str
        How it was found, in words.

    Raises
    ------
    ModelNotFoundError
        Nothing found, or ``name`` does not give an ``nn.Module``.
    AmbiguousModelError
        A rule found several candidates.
    TargetError
        Building the model raised.

    Examples
    --------
    >>> import types
    >>> mod = types.ModuleType("m")
    >>> mod.model = nn.Linear(2, 2)
    >>> find_model(mod)[1:]
    ('model', 'instance `model`')
    """
    path = getattr(module, "__file__", None)
    if source is None:
        source = path or module.__name__
    namespace = vars(module)

    if name is not None:
        name, args, kwargs = split_call(name)
        obj: object = module
        for part in name.split("."):
            if not hasattr(obj, part):
                hint = _candidates_hint(module)
                raise ModelNotFoundError(
                    f"{source} has no attribute {name!r}; check the name after ':'{hint}"
                )
            obj = getattr(obj, part)
        model, how = _build(obj, name, source, path, args, kwargs)
        return model, name, how

    # Rule 1: an instance named `model`.
    if isinstance(namespace.get("model"), nn.Module):
        return namespace["model"], "model", "instance `model`"

    # Rule 2: a factory function.
    factories = [
        n for n in FACTORY_NAMES if callable(namespace.get(n)) and not inspect.isclass(namespace[n])
    ]
    if len(factories) > 1:
        raise _ambiguous(source, "factory functions", factories)
    if factories:
        model, how = _build(namespace[factories[0]], factories[0], source, path)
        return model, factories[0], how

    # Rule 3: the only module-level instance.
    instances = _module_instances(namespace)
    if len(instances) > 1:
        raise _ambiguous(source, "nn.Module instances", list(instances))
    if instances:
        ((inst_name, inst),) = instances.items()
        return inst, inst_name, f"instance `{inst_name}`"

    # Rule 4: the only nn.Module subclass defined here that builds without arguments.
    classes = _buildable_classes(module)
    if len(classes) > 1:
        raise _ambiguous(
            source, "nn.Module classes that build without arguments", [c for c, _ in classes]
        )
    if classes:
        cls_name, cls = classes[0]
        model, how = _build(cls, cls_name, source, path)
        return model, cls_name, how

    needing = _classes_needing_arguments(module)
    if needing:
        cls_name, missing = needing[0]
        example = ", ".join(f"{n}=..." for n in missing)
        others = f" (also: {', '.join(c for c, _ in needing[1:])})" if needing[1:] else ""
        raise ModelNotFoundError(
            f"no model found in {source} that builds without arguments: class {cls_name} needs "
            f"arguments ({', '.join(missing)}){others}; pass them as "
            f"{source}:{cls_name}({example}) (or --model-args '{example}'), give them defaults, "
            f"or define `model = {cls_name}(...)`"
        )
    raise ModelNotFoundError(
        f"no model found in {source}; define `model = ...`, a function build_model() returning "
        f"the model, or pass {source}:NAME"
    )


def _own_classes(module: types.ModuleType) -> list[tuple[str, type, list[str]]]:
    """The concrete ``nn.Module`` classes the file defines, each with the constructor
    arguments it needs (an unknown signature needs none)."""
    found = []
    for key, value in vars(module).items():
        if not _is_module_class(value) or value.__module__ != module.__name__:
            continue
        if not inspect.isabstract(value):
            found.append((key, value, _required_params(value)))
    return found


def _classes_needing_arguments(module: types.ModuleType) -> list[tuple[str, list[str]]]:
    """The ``nn.Module`` classes defined in the file whose constructor needs arguments."""
    return [(key, missing) for key, _, missing in _own_classes(module) if missing]


def _module_instances(namespace: dict[str, object]) -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for key, value in namespace.items():
        if key.startswith("__") or not isinstance(value, nn.Module) or id(value) in seen:
            continue
        seen.add(id(value))
        found[key] = value
    return found


def _buildable_classes(module: types.ModuleType) -> list[tuple[str, type]]:
    return [(key, value) for key, value, missing in _own_classes(module) if not missing]


def _candidates_hint(module: types.ModuleType) -> str:
    names = [
        k
        for k, v in vars(module).items()
        if not k.startswith("_")
        and (isinstance(v, nn.Module) or (_is_module_class(v) and v.__module__ == module.__name__))
    ]
    names += [n for n in FACTORY_NAMES if callable(vars(module).get(n))]
    if not names:
        return ""
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f" (models found: {shown})"


# -- example inputs --------------------------------------------------------------------------------
def _as_input_tuple(value: object, source: str) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor):
        return (value,)
    if (
        isinstance(value, (tuple, list))
        and value
        and all(isinstance(v, torch.Tensor) for v in value)
    ):
        return tuple(value)
    raise ExampleInputsError(
        f"example_inputs in {source} is {_kind(value)}; make it a tensor, a tuple of tensors, "
        f"or a function returning one"
    )


def _a(noun: str) -> str:
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def _kind(value: object) -> str:
    if isinstance(value, (tuple, list)):
        inner = sorted({type(v).__name__ for v in value}, key=str.lower)
        return f"{_a(type(value).__name__)} of {', '.join(inner) or 'nothing'}"
    return _a(type(value).__name__)


def _file_example_inputs(
    module: types.ModuleType, source: str, path: str | None
) -> tuple[torch.Tensor, ...] | None:
    if "example_inputs" not in vars(module):
        return None
    value = vars(module)["example_inputs"]
    if callable(value) and not isinstance(value, torch.Tensor):
        missing = _required_params(value)
        if missing:
            raise ExampleInputsError(
                f"example_inputs() in {source} needs arguments ({', '.join(missing)}); make it "
                f"a function without arguments"
            )
        try:
            value = value()
        except Exception as exc:
            err = _raised("example_inputs()", exc, path, f"fix example_inputs in {source}")
            raise ExampleInputsError(str(err)) from exc
    return _as_input_tuple(value, source)


# -- everything together ---------------------------------------------------------------------------
def load_target(
    target: str,
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
    dtypes: torch.dtype | Sequence[torch.dtype] | None = None,
    check_inputs: bool = False,
) -> LoadedModel:
    """Load the model of a target and its example inputs.

    Parameters
    ----------
    target : str
        ``FILE.py[:NAME]`` or ``package.module[:NAME]`` (see the module docstring for the rules).
    input_shapes : sequence of shapes, optional
        Shapes of random example inputs; they replace the file's ``example_inputs``.
    dtypes : torch.dtype or sequence of torch.dtype, optional
        Dtypes of those inputs (one for all, or one per shape; default float32).
    check_inputs : bool
        Run the model once on the example inputs (:func:`check_example_inputs`).

    Returns
    -------
    LoadedModel

    Raises
    ------
    LoadError
        A :class:`TargetError`, :class:`ModelNotFoundError`, :class:`AmbiguousModelError` or
        :class:`ExampleInputsError`, with a one-line message.

    Examples
    --------
    >>> loaded = load_target("torchvision.models:resnet18", input_shapes=[(1, 3, 64, 64)])
    >>> type(loaded.model).__name__, loaded.example_inputs[0].shape
    ('ResNet', torch.Size([1, 3, 64, 64]))
    """
    kind, location, name = parse_target(target)
    if name is not None:
        split_call(name)  # a bad argument list is reported before anything is imported
    module = load_module(kind, location)
    source = location
    path = getattr(module, "__file__", None) if kind == "file" else None
    directory = os.path.dirname(os.path.realpath(location)) if kind == "file" else None
    with (
        _on_sys_path(directory) if directory else contextlib.nullcontext(),
        _no_bytecode() if directory else contextlib.nullcontext(),
    ):
        model, attr, how = find_model(module, name, source=source)
        if input_shapes:
            example_inputs = make_example_inputs(input_shapes, dtypes)
            inputs_from = "--input-shape"
        else:
            example_inputs = _file_example_inputs(module, source, path)
            inputs_from = f"example_inputs in {source}" if example_inputs is not None else None
        if example_inputs is not None and check_inputs:
            check_example_inputs(model, example_inputs, source=inputs_from or "the inputs")
    return LoadedModel(
        model=model,
        target=target,
        source=source,
        name=attr,
        how=how,
        module=module,
        example_inputs=example_inputs,
        inputs_from=inputs_from,
    )
