"""The tracer: a :class:`torch.fx.Tracer` for conversion.

:class:`CaptureTracer`

* keeps :class:`~fxmomentum.MomentumChain` modules whole, so a converted model can be captured
  (and converted) again;
* traces into torch's transformer layers (``nn.Transformer``, ``nn.TransformerEncoderLayer``
  and friends, which contain the residual connections), with torch's attention fast path
  turned off while tracing, masks given as traced values, and the causal-mask hint that
  torch derives from a mask's values taken from the example and checked (see
  :func:`is_causal_mask`);
* does not bake ``self.training`` into the graph: a traced module that passes ``self.training``
  to a function (``F.dropout(x, p, self.training)``, torchvision's stochastic depth) reads it
  at run time through a small :class:`TrainingFlag` submodule, so ``.train()`` and ``.eval()``
  keep working; one that branches on ``self.training`` is reported (``training_reads``) and
  its caller makes it a leaf;
* records where tracing failed (``failure``), so that the caller can make the failing
  submodule a leaf and trace again (:mod:`fxmomentum.capture.trace`);
* traces shape-aware when given example values (:mod:`fxmomentum.capture.shaped`), with
  factories and random draws as graph nodes (:mod:`fxmomentum.capture.factories`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..engine import MomentumChain, PythonState
from ..patches import attention_fastpath_off, replaced
from .factories import traced_factories
from .probe import no_side_effects
from .shaped import ShapedTracing, Untraceable, caller

__all__ = [
    "FLAG_NAME",
    "MODE_CHECK",
    "MODE_CHECK_OF",
    "TRACE_INTO",
    "CaptureTracer",
    "GraphCodeTracer",
    "TrainingFlag",
    "check_keywords",
    "check_none",
    "is_causal_mask",
]

#: torch.nn modules that hold residual connections: traced into rather than kept whole.
TRACE_INTO: tuple[type[nn.Module], ...] = (
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoder,
    nn.TransformerDecoderLayer,
)

#: Attribute name of the :class:`TrainingFlag` added to a module that passes ``self.training``.
FLAG_NAME = "_training_flag"
#: Marks the nodes that check a graph's train / eval mode (see CaptureTracer.branch_on_training).
MODE_CHECK = "fxmomentum_mode_check"
#: On those nodes: the path of the module whose ``forward`` branched.
MODE_CHECK_OF = "fxmomentum_mode_check_of"


class TrainingFlag(nn.Module):
    """Reads the train / eval mode at run time, for a traced module that passes it on.

    It is registered as a child of the module whose ``self.training`` it stands for, so
    ``.train()`` and ``.eval()`` set it together with that module. It has no parameters and no
    buffers (``state_dict`` keys do not change).

    Examples
    --------
    >>> flag = TrainingFlag()
    >>> flag.eval()()
    False
    """

    def forward(self) -> bool:
        return self.training


class _TrainingRead:
    """Stands in for ``module.training`` while the module's ``forward`` is traced."""

    __slots__ = ("module", "path", "tracer", "value")

    def __init__(self, tracer: CaptureTracer, module: nn.Module, path: str, value: bool):
        self.tracer, self.module, self.path, self.value = tracer, module, path, value

    def _branch(self) -> bool:
        self.tracer.branch_on_training(self)
        return self.value

    def __bool__(self) -> bool:
        return self._branch()

    def __index__(self) -> int:
        return int(self._branch())

    def __eq__(self, other: object) -> bool:
        return self._branch() == other

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return repr(self.value)


def check_keywords(
    kwargs: Mapping[str, Any], fixed: Mapping[str, Any], tensors: Sequence[str], name: str
) -> None:
    """Check at run time the ``**kwargs`` a graph was traced with (see :class:`CaptureTracer`).

    Raises
    ------
    AssertionError
        If ``kwargs`` has other keys than ``fixed`` and ``tensors``, or another value than
        ``fixed`` gives (the message names the difference, as torch.fx's own checks do).

    Examples
    --------
    >>> check_keywords({"mask": None}, {"mask": None}, (), "kwargs")
    >>> check_keywords({}, {"mask": None}, (), "kwargs")
    Traceback (most recent call last):
    ...
    AssertionError: **kwargs has been specialized to have keys ['mask'] but got []
    """
    keys = sorted([*fixed, *tensors])
    if sorted(kwargs) != keys:
        raise AssertionError(
            f"**{name} has been specialized to have keys {keys} but got {sorted(kwargs)}"
        )
    for key, value in fixed.items():
        got = kwargs[key]
        if type(got) is not type(value) or got != value:
            raise AssertionError(
                f"**{name} has been specialized to have {key}={value!r} but got {key}={got!r}"
            )


def check_none(value: Any, message: str) -> None:
    """Check at run time an argument a graph was traced with as None.

    Stands in for torch.fx's own ``_assert_is_none``: a graph module that calls that one
    cannot be pickled safely (once unpickled and compiled again, it registers a name that
    makes every later torch.fx trace in the process fail with a KeyError).

    Examples
    --------
    >>> check_none(None, "mask is fixed to None")
    >>> check_none(1, "mask is fixed to None")
    Traceback (most recent call last):
    ...
    AssertionError: mask is fixed to None
    """
    if value is not None:
        raise AssertionError(message)


def is_causal_mask(mask: torch.Tensor, size: int | None = None) -> bool:
    """Whether ``mask`` is the causal mask torch's transformer layers detect (a graph's check).

    ``nn.TransformerEncoder`` and ``nn.TransformerDecoder`` called without ``is_causal`` test
    the mask's values (``torch.nn.modules.transformer._detect_is_causal_mask``): a causal one
    makes attention take the causal kernel and leave the mask aside. A graph captured with
    a causal example mask takes that path and checks with this at run time that the mask is
    still causal.

    Examples
    --------
    >>> is_causal_mask(nn.Transformer.generate_square_subsequent_mask(3))
    True
    >>> is_causal_mask(torch.zeros(3, 3))
    False
    """
    from torch.nn.modules import transformer

    return bool(transformer._detect_is_causal_mask(mask, None, size))


class CaptureTracer(ShapedTracing, fx.Tracer):
    """A :class:`torch.fx.Tracer` for conversion.

    Parameters
    ----------
    leaves : collection of str, optional
        Module paths to keep as leaves.
    leaf_types : tuple of type
        Module classes to keep as leaves.
    autowrap_modules, autowrap_functions
        As for :class:`torch.fx.Tracer`. :func:`check_keywords`, :func:`check_none` and
        :func:`is_causal_mask` stay calls in the graph (also when torch.fx traces the graph's
        code again, as unpickling does).
    var_keyword : mapping, optional
        What the traced ``forward``'s ``**kwargs`` holds (torch.fx's ``concrete_args``
        cannot fix it): None, flags, numbers and strings are fixed and checked at run time,
        tensors stay graph inputs (read from the ``**kwargs`` placeholder).
    examples : mapping, optional
        Example values of the root's arguments, by name: trace shape-aware (see
        :mod:`fxmomentum.capture.shaped`), with the checks that makes in ``checks``.

    Attributes
    ----------
    failure : tuple or None
        After a failed :meth:`trace`: the module paths being traced when the error was raised
        (outermost first) and the exception.
    training_reads : dict of str to str
        Module paths whose ``forward`` read ``self.training``: ``"argument"`` (read at run time
        through a :class:`TrainingFlag`) or ``"control flow"`` (baked into the graph).
    branch_sites : dict of str to str
        For the ``"control flow"`` paths: where the ``forward`` branched first
        (``"file.py:12 (`if self.training:`)"``).
    spans : dict of str to list of (int, int)
        For each traced (not leaf) submodule path, the positions in the graph of the nodes
        each of its calls made (start included, end excluded), in call order.
    unwrapped : list of str
        Names of the decorator wrappers of the root's ``forward`` that were not traced (see
        :meth:`create_args_for_root`).

    Examples
    --------
    >>> tracer = CaptureTracer()
    >>> graph = tracer.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    >>> [n.op for n in graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """

    def __init__(
        self,
        leaves: Iterable[str] = (),
        leaf_types: tuple[type, ...] = (),
        autowrap_modules: tuple[Any, ...] = (math,),
        autowrap_functions: tuple[Any, ...] = (check_keywords, check_none, is_causal_mask),
        var_keyword: Mapping[str, Any] | None = None,
        examples: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(autowrap_modules=autowrap_modules, autowrap_functions=autowrap_functions)
        self.set_examples(examples)
        self.var_keyword = None if var_keyword is None else dict(var_keyword)
        self.leaves = set(leaves)
        self.leaf_types = tuple(leaf_types)
        self.failure: tuple[tuple[str, ...], BaseException] | None = None
        self.training_reads: dict[str, str] = {}
        self.branch_sites: dict[str, str] = {}
        self.unwrapped: list[str] = []
        self.spans: dict[str, list[tuple[int, int]]] = {}
        self._stack: list[str] = []
        self._param_names: dict[int, str] = {}
        self._buffer_names: dict[int, str] = {}

    # -- leaves -------------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (MomentumChain, TrainingFlag)):
            return True
        if module_qualified_name in self.leaves or isinstance(m, self.leaf_types):
            return True
        if isinstance(m, TRACE_INTO):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    # -- tracing ------------------------------------------------------------------------------
    def create_args_for_root(
        self, root_fn: Any, is_module: bool, concrete_args: Any = None
    ) -> tuple[Any, list[Any]]:
        inner = inspect.unwrap(root_fn)
        code = inner.__code__
        if inner is not root_fn and (
            code.co_kwonlyargcount or code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS)
        ):
            # A decorator's ``(*args, **kwargs)`` wrapper around a forward with keyword-only
            # arguments or ``*args`` / ``**kwargs``: torch.fx rewrites the wrapper's code to
            # the wrapped function's signature, which breaks it (``co_varnames is too
            # small``). The wrapped function is traced instead.
            self.unwrapped.append(getattr(getattr(root_fn, "__code__", None), "co_name", "?"))
            root_fn = inner
        self.patch_range(getattr(root_fn, "__globals__", {}))
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if self.var_keyword is None or not code.co_flags & inspect.CO_VARKEYWORDS:
            return fn, args
        # torch.fx passes ``**kwargs`` as the last positional argument of the patched
        # function: a proxy, which cannot be unpacked into another call. Give it the dict.
        proxy = args[-1]
        name = str(proxy.node.target).lstrip("*")
        fixed = {k: v for k, v in self.var_keyword.items() if not isinstance(v, torch.Tensor)}
        tensors = tuple(k for k in self.var_keyword if k not in fixed)
        self.create_proxy("call_function", check_keywords, (proxy, fixed, tensors, name), {})
        values = {k: proxy[k] if k in tensors else v for k, v in self.var_keyword.items()}
        return fn, [*args[:-1], values]

    def trace(self, root: nn.Module | Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self.failure = None
        self.training_reads = {}
        self.branch_sites = {}
        self.unwrapped = []
        self.spans = {}
        self._stack = []
        self.set_examples(self._examples)  # a new trace makes its own checks
        if isinstance(root, nn.Module):
            self._param_names, self._buffer_names = {}, {}
            for name, p in root.named_parameters():
                self._param_names.setdefault(id(p), name)
            for name, b in root.named_buffers():
                self._buffer_names.setdefault(id(b), name)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_transformers_traceable())
            stack.enter_context(traced_factories(self))
            stack.callback(self.unpatch_range)
            if isinstance(root, nn.Module):
                stack.enter_context(_no_proxies_left(root))
                if self.shaped:
                    # The example runs as it is traced: buffers and the random state stay.
                    stack.enter_context(
                        no_side_effects(root, grad=torch.is_grad_enabled(), keep_added=True)
                    )
                    stack.enter_context(self.symbolic_indexing())
                stack.enter_context(self._training_read(root, ""))
            try:
                return super().trace(root, concrete_args)
            except Exception as e:
                if self.failure is None:
                    self.failure = ((), e)
                raise
            finally:
                self.forget_examples()

    def call_module(
        self,
        m: nn.Module,
        forward: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        path = self.path_of_module(m)
        self._stack.append(path)
        try:
            if self.is_leaf_module(m, path):
                return super().call_module(m, forward, args, kwargs)
            self.patch_range(getattr(getattr(m, "forward", None), "__globals__", {}))
            start = len(self.graph.nodes)
            with self._training_read(m, path):
                result = super().call_module(m, forward, args, kwargs)
            self.spans.setdefault(path, []).append((start, len(self.graph.nodes)))
            return result
        except Exception as e:
            if self.failure is None:
                self.failure = (tuple(self._stack), e)
            raise
        finally:
            self._stack.pop()

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        # torch.fx searches all parameters for every access; a dictionary keeps tracing
        # linear in the size of the model.
        if isinstance(attr_val, nn.Parameter) and not self.param_shapes_constant:
            name = self._param_names.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def concrete_value(self, a: Any) -> Any:
        if isinstance(a, _TrainingRead):
            return a.value
        return super().concrete_value(a)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, _TrainingRead):
            return self._flag_node(a)
        if isinstance(a, torch.Tensor):
            names = self._param_names if isinstance(a, nn.Parameter) else self._buffer_names
            name = names.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        if (
            isinstance(a, dict)
            and type(a) is not dict
            and dataclasses.is_dataclass(a)
            and all(isinstance(k, str) for k in a)
        ):
            # A dataclass that is also a dict (Hugging Face's ModelOutput): torch.fx would
            # return a plain dict, which the caller cannot read by attribute or position.
            # Build the same class from its fields at run time.
            fields = {k: self.create_arg(v) for k, v in a.items()}
            return self.create_node("call_function", type(a), (), fields)
        return super().create_arg(a)

    def causal_hint(self, mask: fx.Proxy, size: Any) -> bool:
        """torch's causal-mask detection on a traced mask: the example's answer. Where it is
        True the graph takes the causal kernel without the mask, and checks at run time that
        the mask is causal (:func:`is_causal_mask`); where it is False the graph applies the
        mask as given, which is right for every mask, and checks nothing.

        Raises
        ------
        Untraceable
            Without the mask's example value (a plain trace): the answer depends on it.
        """
        value = self._known(mask)
        if not isinstance(value, torch.Tensor):
            raise Untraceable(
                f"torch detects whether the mask {mask.node.name} is causal from its values"
            )
        if isinstance(size, fx.Proxy):
            size = self.concrete_value(size)
        if not is_causal_mask(value, size):
            return False

        def cond() -> fx.Proxy:
            return self.create_proxy("call_function", is_causal_mask, (mask,), {})

        what = f"the mask `{mask.node.name}` is causal (torch's is_causal hint)"
        self._check((mask.node, "causal"), cond, what, True, hint=True)
        return True

    # -- self.training ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _training_read(self, m: nn.Module, path: str) -> Iterator[None]:
        value = m.__dict__.get("training")
        if not isinstance(value, bool):  # already stood in for (a module calling itself)
            yield
            return
        m.__dict__["training"] = _TrainingRead(self, m, path, value)
        try:
            yield
        finally:
            m.__dict__["training"] = value

    def branch_on_training(self, read: _TrainingRead) -> None:
        """``read.module.training`` steers Python control flow: the graph takes the current
        mode's path and checks the mode at run time (a submodule that branches is made a leaf
        and traced again, so this check stays in the root's graph only)."""
        if self.training_reads.get(read.path) == "control flow":
            return
        self.training_reads[read.path] = "control flow"
        where, line = caller()
        self.branch_sites[read.path] = f"{where}{f' (`{line}`)' if line else ''}"
        mode, other = ("train", "eval") if read.value else ("eval", "train")
        message = (
            f"{type(read.module).__name__}.forward branches on self.training at "
            f"{self.branch_sites[read.path]}, and its graph was captured in {mode} mode; "
            f"this call is in {other} mode. Convert the model in the mode it runs in "
            f"(model.{other}() before fxmomentum.convert)"
        )
        flag = self._flag_node(read)
        same = self.create_node("call_function", operator.eq, (flag, read.value), {})
        check = self.create_node("call_function", torch._assert, (same, message), {})
        same.meta[MODE_CHECK] = check.meta[MODE_CHECK] = True
        same.meta[MODE_CHECK_OF] = check.meta[MODE_CHECK_OF] = read.path

    def _flag_node(self, read: _TrainingRead) -> fx.Node:
        self.training_reads.setdefault(read.path, "argument")
        flag = read.module._modules.get(FLAG_NAME)
        if not isinstance(flag, TrainingFlag):
            flag = TrainingFlag()
            read.module.add_module(FLAG_NAME, flag)
        flag.training = read.value
        target = f"{read.path}.{FLAG_NAME}" if read.path else FLAG_NAME
        return self.create_node("call_module", target, (), {})


class GraphCodeTracer(CaptureTracer):
    """Traces a captured graph's own code again, as unpickling a GraphModule does.

    That code has no control flow, so buffers may be proxies: a buffer sliced to a traced
    length (``pos[:, :n]``, from a shape-aware capture) then traces as it did.
    """

    proxy_buffer_attributes = True


def _holds_proxy(value: Any) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if isinstance(value, (list, tuple, set)):
        return any(_holds_proxy(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_proxy(v) for v in value.values())
    return False


@contextlib.contextmanager
def _no_proxies_left(root: nn.Module) -> Iterator[None]:
    """Undo what the traced code stored into its modules' attributes during the trace: a
    proxy left in an attribute (Hugging Face's Swin sets its window size from a traced
    resolution) or in a dict (a cache filled in ``forward``) breaks the module's Python code,
    and every later call. Attributes torch.fx adds (the graph's constants) stay."""
    before = PythonState.of(root)
    try:
        yield
    finally:
        before.restore(keep_added=True)
        for m in root.modules():
            for key, value in list(m.__dict__.items()):
                if _holds_proxy(value):
                    del m.__dict__[key]


@contextlib.contextmanager
def _transformers_traceable() -> Iterator[None]:
    """Make torch's transformer layers traceable while tracing.

    Their inference fast path (taken in eval mode without grad) tests the input in Python; it
    is turned off, so the graph holds the regular path, which computes the same function.
    ``nn.TransformerEncoder`` measures the sequence length only to test a mask for causality,
    which reads the mask's size itself where the length is None (a proxy cannot be
    measured). That test reads the mask's values: :meth:`CaptureTracer.causal_hint` answers
    it for a traced mask. ``F._none_or_dtype`` (the dtype of a mask, for a warning on masks
    of two types) takes a traced mask as the tensor it stands for.
    """
    from torch.nn import functional
    from torch.nn.modules import transformer

    seq_len = transformer._get_seq_len
    detect = transformer._detect_is_causal_mask
    none_or_dtype = functional._none_or_dtype

    def _seq_len(src: Any, batch_first: bool) -> int | None:
        if isinstance(src, fx.Proxy):
            return None
        return seq_len(src, batch_first)

    def _detect(mask: Any, is_causal: bool | None = None, size: Any = None) -> bool:
        if is_causal is None and isinstance(mask, fx.Proxy):
            tracer = mask.tracer
            if not isinstance(tracer, CaptureTracer):
                raise Untraceable(f"torch tests the values of the mask {mask.node.name}")
            return tracer.causal_hint(mask, size)
        return detect(mask, is_causal, size)

    def _dtype(mask: Any) -> Any:
        return mask.dtype if isinstance(mask, fx.Proxy) else none_or_dtype(mask)

    with contextlib.ExitStack() as stack:
        stack.enter_context(attention_fastpath_off())
        stack.enter_context(
            replaced(transformer, {"_get_seq_len": _seq_len, "_detect_is_causal_mask": _detect})
        )
        stack.enter_context(replaced(functional, {"_none_or_dtype": _dtype}))
        yield
