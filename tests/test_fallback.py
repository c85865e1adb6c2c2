"""Models whose own forward torch.fx cannot trace: conversion descends into their submodules.

The model's code stays as it is; each child is captured as a graph if it can be (as the
recorded run of the whole model called it), else its own children, and so on. Errors are
ARCHITECTURE.md's relative errors; reversible gradients are compared with backprop's in float64.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools

import archs
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import converted_pair, grad_err, max_rel_err, round_trips
from torch import fx, nn

import fxmomentum
from fxmomentum.capture import CallRecord, CaptureError, record_calls, specialise


class Resized(nn.Module):
    """A torchvision resnet18 behind a forward that resizes inputs of another size.

    ``if x.shape[-1] != self.size`` is control flow on a traced value: not traceable. The
    trunk is: its chains are resnet18's, ``[2, 1, 1, 1]`` blocks (the first block of layers
    2 to 4 has a projection shortcut).
    """

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.size = size
        self.trunk = torchvision.models.resnet18(num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear")
        return self.trunk(x)


class Residual(nn.Module):
    """``x + f(x)`` as a module of its own."""

    def __init__(self, dim: int, p: float = 0.0) -> None:
        super().__init__()
        self.f = archs.mlp(dim, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class Normalised(nn.Module):
    """Residual blocks in an ``nn.Sequential`` behind data-dependent control flow.

    Chains: ``body`` is one chain of ``depth`` pure blocks (``body.0`` ... ``body.<depth-1>``).
    """

    def __init__(self, dim: int = 16, depth: int = 4, p: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Linear(8, dim)
        self.body = nn.Sequential(*(Residual(dim, p) for _ in range(depth)))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax()
        if scale > 10:  # data-dependent: not traceable
            x = x / scale
        return self.head(self.body(self.stem(x)))


class Encoder(nn.Module):
    """Pre-norm layers with an optional additive mask and padding mask, an optional norm.

    Traced as its parent calls it (``mask=<tensor>, padding=None, final_norm=True``): one
    chain of ``2 * depth`` pure blocks, every attention block reading the mask.
    """

    def __init__(self, dim: int = 16, depth: int = 3, p: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(archs.PreNormBlock(dim, 2, p) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
        final_norm: bool = False,
    ) -> torch.Tensor:
        if padding is not None:  # (batch, n), True at padded positions
            pad = torch.zeros_like(padding, dtype=x.dtype).masked_fill(padding, float("-inf"))
            mask = pad[:, None, None, :] if mask is None else mask + pad[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x) if final_norm else x


class Tagger(nn.Module):
    """Checks its input (data-dependent: not traceable), then embeds, encodes with a causal
    mask, classifies each position."""

    def __init__(self, dim: int = 16, depth: int = 3, p: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.encoder = Encoder(dim, depth, p)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.isnan(x).any():
            raise ValueError("NaN in the input")
        n = x.shape[1]
        causal = torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        h = self.embed(x)
        assert h.shape[-1] == self.encoder.dim  # reads an attribute of the child
        return self.head(self.encoder(h, mask=causal, final_norm=True))


class Odd(nn.Module):
    """Data-dependent, so a leaf of its traced parent; holds a chain of 3 blocks."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(*(Residual(dim) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) if x.mean() > -100 else x


class Outer(nn.Module):
    """Traceable, with an opaque :class:`Odd` inside and a chain of its own in ``fs``."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Linear(8, dim)
        self.odd = Odd(dim)
        self.fs = nn.ModuleList(archs.mlp(dim) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.odd(self.stem(x))
        for f in self.fs:
            x = x + f(x)
        return x


def vit(p: float = 0.0) -> nn.Module:
    from vit_pytorch import ViT

    return ViT(image_size=32, patch_size=8, num_classes=10, dim=32, depth=3, heads=2,
               mlp_dim=64, dropout=p, emb_dropout=p)  # fmt: skip


# name: (builder with dropout on, inputs, expected (first block, blocks) per chain)
MODELS = {
    "resnet18_resized": (
        lambda p: Resized(),
        lambda: (torch.randn(2, 3, 32, 32),),
        [("trunk.layer1.0", 2), ("trunk.layer2.1", 1), ("trunk.layer3.1", 1),
         ("trunk.layer4.1", 1)],
    ),
    "residual_stack": (
        lambda p: Normalised(p=p),
        lambda: (torch.randn(4, 8) * 20,),
        [("body.0", 4)],
    ),
    "masked_encoder": (
        lambda p: Tagger(p=p),
        lambda: (torch.randn(2, 5, 6),),
        [("encoder.layers.0", 6)],
    ),
    # vit_pytorch: ViT.forward uses einops on a proxy; its Transformer traces with each
    # Attention (einops) kept whole: depth 3 is one chain of 6 pure blocks.
    "vit_pytorch": (
        vit,
        lambda: (torch.randn(2, 3, 32, 32),),
        [("transformer.layers.0.0", 6)],
    ),
}  # fmt: skip


def build(name: str, p: float = 0.1):
    make, inputs, expected = MODELS[name]
    if name == "vit_pytorch":
        pytest.importorskip("vit_pytorch")
    torch.manual_seed(0)
    return make(p), inputs(), expected


def run(model: nn.Module, inputs, seed: int = 1):
    torch.manual_seed(seed)
    return model(*inputs)


def chains_of(report) -> list[tuple[str, int]]:
    return [(c.first, c.num_blocks) for c in report.chains]


@pytest.mark.parametrize("name", list(MODELS))
def test_descends_and_reproduces_the_original(name):
    model, inputs, expected = build(name)
    with pytest.raises(CaptureError):
        fxmomentum.capture.capture(copy.deepcopy(model))  # plain capture stops at the root
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tree = {n: type(m) for n, m in model.named_modules()}
    out, report = fxmomentum.convert(
        model, 0.0, use_backprop=True, example_inputs=inputs, return_report=True
    )
    assert type(out) is type(model) and out is not model
    assert chains_of(report) == expected and all(c.converted for c in report.chains)
    assert report.shapes_verified
    # The original is untouched.
    assert {n: type(m) for n, m in model.named_modules()} == tree
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Same state_dict keys, loadable both ways.
    assert list(out.state_dict()) == list(model.state_dict())
    twin = copy.deepcopy(model)
    out.load_state_dict(twin.state_dict(), strict=True)
    twin.load_state_dict(out.state_dict(), strict=True)
    for mode in ("eval", "train"):
        getattr(twin, mode)()
        getattr(out, mode)()
        with torch.no_grad():
            expected_out, got = run(twin, inputs), run(out, inputs)
        assert max_rel_err([got], [expected_out]) <= 1e-5, (name, mode)
    assert max_rel_err(out.state_dict().values(), twin.state_dict().values()) <= 1e-5


@pytest.mark.parametrize("name", list(MODELS))
def test_reversible_gradients_equal_backprop(name):
    model, inputs, _ = build(name)
    if name == "resnet18_resized":
        # One image resized to 48 x 48 by the model's own code: the last train-mode
        # BatchNorms then normalise 4 values (over two they amplify round-off).
        model.size = 48
        inputs = (torch.randn(1, 3, 32, 32),)
    model = model.double().train()
    inputs = tuple(t.double() for t in inputs)
    reversible, backprop = converted_pair(model, inputs)
    results = []
    for net in (reversible, backprop):
        xs = tuple(t.clone().requires_grad_() for t in inputs)
        out = run(net, xs)  # same seed: the same dropout draws
        (out.square().mean() + out.mean()).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]
        results.append((out.detach(), grads + [x.grad for x in xs]))
    (out_r, grads_r), (out_b, grads_b) = results
    assert max_rel_err([out_r], [out_b]) <= 1e-8, name
    assert grad_err(grads_r, grads_b) <= 1e-5, name


def test_report_says_how_each_module_was_captured():
    model, inputs, _ = build("masked_encoder")
    out, report = fxmomentum.convert(model, 0.9, example_inputs=inputs, return_report=True)
    assert isinstance(out.encoder, fx.GraphModule) and not isinstance(out, fx.GraphModule)
    assert type(out.embed) is nn.Linear and out.head is not model.head  # a copy, not converted
    (root,) = [leaf for leaf in report.leaves if leaf.path == ""]
    assert root.type == "Tagger" and "forward not traceable" in root.reason
    assert "control flow" in root.reason
    assert "`encoder`: Encoder: captured as one graph, 1 chain(s), 6 block(s)" in report.notes
    assert any("convert returns a Tagger" in n for n in report.notes)
    chain = report.chains[0]
    assert chain.name == "encoder.momentum_chain_0" and chain.last == "encoder.layers.2"
    assert chain.shape == (2, 5, 16)
    assert all(len(b.context) >= 1 for b in chain.blocks[::2])  # the mask
    assert "Tagger" in str(report) and "encoder.layers.0" in str(report)
    # inspect predicts convert.
    assert fxmomentum.inspect(model, inputs).as_dict() == report.as_dict()
    # Per-chain gamma and set_gamma take full module paths.
    assert fxmomentum.set_gamma(out, {"encoder.layers": 0.5}) == {"encoder.momentum_chain_0": 0.5}
    _, report = fxmomentum.convert(
        model, {"encoder.layers.1": 0.7}, example_inputs=inputs, return_report=True
    )
    assert report.chains[0].gamma == 0.7


def test_arguments_fixed_from_the_recorded_call_are_checked():
    model, inputs, _ = build("masked_encoder", p=0.0)
    out = fxmomentum.convert(model, 0.0, use_backprop=True, example_inputs=inputs).eval()
    model.eval()
    h, mask = torch.randn(2, 5, 16), torch.randn(5, 5)
    with torch.no_grad():
        # Keyword arguments, as the parent passes them.
        assert max_rel_err([out.encoder(h, mask=mask, final_norm=True)],
                           [model.encoder(h, mask=mask, final_norm=True)]) <= 1e-6  # fmt: skip
        # Another sequence length and batch size: nothing of the example is baked in.
        h, mask = torch.randn(3, 7, 16), torch.randn(7, 7)
        assert max_rel_err([out.encoder(h, mask, None, True)],
                           [model.encoder(h, mask, None, True)]) <= 1e-6  # fmt: skip
        with pytest.raises(AssertionError, match="final_norm has been specialized to have value"):
            out.encoder(h, mask, final_norm=False)
        padding = torch.zeros(3, 7, dtype=torch.bool)
        with pytest.raises(AssertionError, match="padding has been specialized to have value None"):
            out.encoder(h, mask, padding, final_norm=True)


def test_without_example_inputs_the_structure_is_converted():
    for name in ("residual_stack", "vit_pytorch"):
        model, inputs, expected = build(name, p=0.0)
        out, report = fxmomentum.convert(model, 0.0, use_backprop=True, return_report=True)
        assert chains_of(report) == expected and not report.shapes_verified
        assert any("without example_inputs" in n for n in report.notes)
        model.eval()
        out.eval()
        with torch.no_grad():
            assert max_rel_err([out(*inputs)], [model(*inputs)]) <= 1e-5


def test_opaque_submodules_of_a_captured_graph_are_descended_into():
    model = Outer()
    x = torch.randn(3, 8)
    out, report = fxmomentum.convert(
        model, 0.0, use_backprop=True, example_inputs=x, return_report=True
    )
    assert isinstance(out, fx.GraphModule)  # the model itself was captured
    assert isinstance(out.odd, Odd) and isinstance(out.odd.body, fx.GraphModule)
    # The model's own graph first, then the submodules captured inside its opaque modules.
    assert chains_of(report) == [("fs.0", 2), ("odd.body.0", 3)]
    assert [c.name for c in report.chains] == ["momentum_chain_0", "odd.body.momentum_chain_0"]
    assert [(leaf.path, leaf.automatic) for leaf in report.leaves] == [("odd", True)]
    assert list(out.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert max_rel_err([out(x)], [model(x)]) <= 1e-6
    # Without chains inside, an opaque module is left exactly as it was.
    _, report = fxmomentum.convert(archs.MLPResNet(), example_inputs=torch.randn(2, 8),
                                   return_report=True)  # fmt: skip
    assert report.notes == []


class Child(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return x + F.dropout(self.f(x), p)


class Parent(nn.Module):
    """Passes a mode-dependent probability to its children; not traceable itself."""

    def __init__(self) -> None:
        super().__init__()
        self.children_ = nn.ModuleList(Child() for _ in range(2))
        self.tail = nn.Sequential(Residual(4), Residual(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            return x
        for child in self.children_:
            x = child(x, 0.3 if self.training else 0.0)
        return self.tail(x)


def test_calls_that_differ_between_modes_are_not_fixed():
    model = Parent().train()
    x = torch.randn(2, 4)
    records = record_calls(model, x, list(model.children_))
    record = records[id(model.children_[0])]
    assert record.differing and record.calls == 1 and model.training
    with pytest.raises(CaptureError, match="train and eval mode"):
        specialise(model.children_[0], record)
    _, report = fxmomentum.convert(model, 0.9, example_inputs=x, return_report=True)
    assert chains_of(report) == [("tail.0", 2)]
    reasons = {leaf.path: leaf.reason for leaf in report.leaves}
    assert "train and eval mode" in reasons["children_.0"]


def test_specialise_fills_defaults_and_refuses_var_arguments():
    class Star(nn.Module):
        def forward(self, x, *rest, scale=2.0):
            return x * scale

    concrete, inputs, var_keyword = specialise(Star(), CallRecord((torch.ones(1),), {}))
    assert concrete == {"scale": 2.0} and len(inputs) == 2 and var_keyword is None
    with pytest.raises(CaptureError, match=r"\*rest"):
        specialise(Star(), CallRecord((torch.ones(1), torch.ones(1)), {}))


def test_a_model_with_nothing_capturable_still_raises():
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.f(x) if x.sum() > 0 else x

    with pytest.raises(CaptureError, match=r"Gate\.forward.*No submodule of it"):
        fxmomentum.convert(Gate(), example_inputs=torch.randn(2, 4))


# -- what Hugging Face layers do, written small ------------------------------------------------
def passes_through(forward):
    """A decorator with an ``(*args, **kwargs)`` wrapper, like Hugging Face's on every layer."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    return wrapper


@dataclasses.dataclass
class Output(collections.OrderedDict):
    """A dataclass that is also a dict, like Hugging Face's ModelOutput."""

    hidden: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self["hidden"] = self.hidden


class KwLayer(nn.Module):
    """A pre-norm block reading ``**kwargs``; appends its input to a cache when given one."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.f = archs.mlp(dim)

    @passes_through
    def forward(self, x, mask=None, **kwargs):
        cache = kwargs.get("cache")
        if cache is not None:
            cache.append(x)  # what a key/value cache does: it grows at every call
        scale = kwargs.get("scale")
        y = self.f(self.norm(x))
        if scale is not None:
            y = y * scale
        if kwargs.get("bias") is not None:
            y = y + kwargs["bias"]
        return x + y


class KwStack(nn.Module):
    """Loops over :class:`KwLayer` with keyword arguments, returns an :class:`Output`."""

    def __init__(self, dim: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(KwLayer(dim) for _ in range(depth))

    @passes_through
    def forward(self, x, cache=None, **kwargs):
        for layer in self.layers:
            x = layer(x, None, cache=cache, **kwargs)
        return Output(hidden=x)


class KwModel(nn.Module):
    """Not traceable itself; calls :class:`KwStack` with a tensor and a number in ``**kwargs``
    and, with ``cache=True``, a Python object every layer receives (like a key/value cache)."""

    def __init__(self, cache: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.stack = KwStack()
        self.cache = cache

    def forward(self, x):
        if x.isnan().any():
            raise ValueError("NaN in the input")
        h = self.embed(x)
        cache = [] if self.cache else None
        return self.stack(h, cache=cache, scale=0.5, bias=h.mean(0)).hidden


def test_keyword_arguments_decorators_and_dict_outputs():
    model = KwModel()
    x = torch.randn(3, 6)
    out, report = fxmomentum.convert(
        model, 0.0, use_backprop=True, example_inputs=x, return_report=True
    )
    assert chains_of(report) == [("stack.layers.0", 3)]
    assert isinstance(out.stack, fx.GraphModule)
    assert "check_keywords" in out.stack.code  # what **kwargs held is checked at run time
    assert any("without its decorator wrapper (wrapper)" in n for n in report.notes)
    with torch.no_grad():
        assert max_rel_err([out(x)], [model(x)]) <= 1e-6
        assert isinstance(out.stack(out.embed(x), scale=0.5, bias=x[0, :1]), Output)
        with pytest.raises(AssertionError, match=r"\*\*kwargs has been specialized to have scale"):
            out.stack(out.embed(x), scale=2.0, bias=x[0, :1])
        with pytest.raises(AssertionError, match="to have keys"):
            out.stack(out.embed(x), scale=0.5)
    reversible = fxmomentum.convert(model.double(), 0.9, example_inputs=x.double())
    backprop = fxmomentum.convert(model, 0.9, example_inputs=x.double(), use_backprop=True)
    grads = []
    for net in (reversible, backprop):
        net(x.double()).square().sum().backward()
        grads.append([p.grad for p in net.parameters()])
    assert grad_err(*grads) <= 1e-10


def test_chains_whose_blocks_receive_a_python_object_stay_unconverted_when_reversible():
    model = KwModel(cache=True)
    x = torch.randn(3, 6)
    report = fxmomentum.inspect(model, x)
    (chain,) = report.chains
    assert not chain.converted
    assert chain.reason.startswith("its blocks receive `cache` (a list), a Python object")
    assert "use_cache=False" in chain.reason
    # Plain autograd recomputes nothing: converting is safe.
    assert fxmomentum.inspect(model, x, gamma=0.0, use_backprop=True).chains[0].converted


def test_converted_submodules_round_trip_and_tracing_keeps_working():
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    for model, inputs in ((Tagger().eval(), (torch.randn(2, 5, 6),)), (KwModel().eval(), (x,))):
        out = fxmomentum.convert(model, 0.5, example_inputs=inputs).eval()
        with torch.no_grad():
            expected = out(*inputs)
        for how, other in round_trips(out).items():
            with torch.no_grad():
                assert torch.equal(other(*inputs), expected), how
    # torch.fx's own None check would have broken every later trace once unpickled.
    assert fxmomentum.convert(archs.MLPResNet(), 0.5) is not None


def test_leaf_modules_include_and_exclude_take_full_paths():
    model = Normalised()
    x = torch.randn(4, 8)
    report = fxmomentum.inspect(model, x, leaf_modules=["body.1"])
    assert chains_of(report) == [("body.0", 1), ("body.2", 2)]
    assert ("body.1", "requested (leaf_modules)") in [(f.path, f.reason) for f in report.leaves]
    report = fxmomentum.inspect(model, x, exclude="body.1")
    assert [(c.first, c.num_blocks, c.converted, c.reason) for c in report.chains] == [
        ("body.0", 1, True, ""), ("body.1", 1, False, "excluded"), ("body.2", 2, True, "")
    ]  # fmt: skip
    report = fxmomentum.inspect(model, x, include=["body.2", "body.3"], min_blocks=2)
    assert [(c.first, c.num_blocks, c.converted) for c in report.chains] == [
        ("body.0", 2, False), ("body.2", 2, True)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        fxmomentum.inspect(model, x, leaf_modules=["nope"])


class Trunk(nn.Module):
    """A residual stack with a helper method and a property its parent uses."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)) for _ in range(3)
        )
        self.head = nn.Linear(8, 2)

    @property
    def width(self) -> int:
        return self.head.in_features

    def classify(self, x):
        return self.head(x) / self.width

    def train(self, mode: bool = True) -> Trunk:
        # The head stays in eval mode, as a frozen layer would: an override calling super().
        super().train(mode)
        self.head.train(False)
        return self

    def forward(self, x):
        for f in self.blocks:
            x = x + f(x)
        return x


class CallsChildMethods(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = Trunk()

    def forward(self, x):
        if bool(x.sum() > 0):  # data-dependent: this forward cannot be traced
            x = x.flip(0)
        return self.trunk.classify(self.trunk(x))


def test_a_parent_calling_its_converted_childs_methods_keeps_working():
    torch.manual_seed(0)
    model = CallsChildMethods()
    x = torch.randn(4, 8)
    out, report = fxmomentum.convert(
        model, 0.0, example_inputs=(x,), use_backprop=True, return_report=True
    )
    assert chains_of(report) == [("trunk.blocks.0", 3)]
    assert isinstance(out.trunk, fx.GraphModule) and out.trunk.width == 8
    expected = model(x)
    for how, other in {"converted": out, **round_trips(out)}.items():
        assert max_rel_err([other(x)], [expected]) < 1e-6, how
        # The child is an instance of its class: its train() override, which calls super(),
        # runs as the original's would.
        assert isinstance(other.trunk, Trunk), how
        other.eval().train()
        assert other.trunk.training and not other.trunk.head.training, how


# -- a converted model never fails on the inputs it was converted with -------------------------
class MaskedBody(nn.Module):
    """A root whose forward takes an optional mask (timm's hiera): left at None by the example."""

    def __init__(self) -> None:
        super().__init__()
        self.body = archs.MLPResNet(depth=3)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask
        return self.body(x)


def test_an_argument_the_example_leaves_at_none_is_none_in_the_graph():
    model = MaskedBody()
    x = torch.randn(3, 8)
    gm, report = fxmomentum.convert(model, 0.0, example_inputs=x, use_backprop=True,
                                    return_report=True)  # fmt: skip
    assert [c.num_blocks for c in report.chains] == [3]
    assert torch.equal(gm(x), model(x))
    with pytest.raises(AssertionError, match="mask"):
        gm(x, torch.ones(3, 8))


class StoresSize(nn.Module):
    """Stores a size read from its input on itself (Hugging Face's Swin sets its window size
    so): traced, that would leave a tracing object in the attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 8
        self.fs = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        self.size = x.shape[-1]
        for f in self.fs:
            x = x + f(x)
        return x


def test_what_tracing_stores_on_a_module_is_undone():
    model = nn.Sequential(StoresSize(), nn.Linear(8, 2))
    model[0].size = 5
    gm = fxmomentum.convert(model, 0.9, example_inputs=torch.randn(2, 8))
    # The trace stored a proxy there; what the module held before is back.
    assert model[0].size == 5 and isinstance(model[0].size, int)
    gm(torch.randn(2, 8)).sum().backward()
    model(torch.randn(2, 8))
    assert model[0].size == 8


def test_a_graph_that_fails_when_called_is_not_returned(monkeypatch):
    from fxmomentum.surgery import conversion

    model, x = archs.MLPResNet(depth=3), torch.randn(3, 8)
    calls = []

    def fails_once(module, arguments):
        if module is model:
            return None  # the original runs
        calls.append(type(module).__name__)
        return "RuntimeError: broken" if len(calls) == 1 else None

    # The model's own graph fails the first time: its Python forward stays, submodules convert.
    monkeypatch.setattr(conversion, "failure_on", fails_once)
    monkeypatch.setattr(fxmomentum.api, "failure_on", fails_once)
    net, report = fxmomentum.convert(model, 0.9, example_inputs=x, return_report=True)
    assert type(net) is archs.MLPResNet and not isinstance(net, torch.fx.GraphModule)
    assert any("converted graph fails" in leaf.reason for leaf in report.leaves)

    # Failing every time: no model is returned.
    def fails(module, arguments):
        return None if module is model else "RuntimeError: broken"

    monkeypatch.setattr(conversion, "failure_on", fails)
    monkeypatch.setattr(fxmomentum.api, "failure_on", fails)
    with pytest.raises(conversion.ConversionError, match="fails on the example inputs"):
        fxmomentum.convert(model, 0.9, example_inputs=x)


def test_inputs_the_original_refuses_are_no_verdict_on_the_conversion():
    model = archs.MLPResNet(depth=3)
    # The wrong width: the original fails as the converted model does; that is no reason to
    # refuse the conversion, and the report says the check could not be made.
    net, report = fxmomentum.convert(
        model, 0.9, example_inputs=torch.randn(3, 5), return_report=True
    )
    assert any("fail on the original model too" in note for note in report.notes)
    x = torch.randn(3, 8)
    ref = fxmomentum.convert(model, 0.9, example_inputs=x)
    assert [c.num_blocks for c in report.chains] == [3]
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))
