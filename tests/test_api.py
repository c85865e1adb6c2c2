"""Tests of fxmomentum.convert / inspect / set_gamma on real and hand-written architectures.

Relative errors are ARCHITECTURE.md's: L2 norm of the difference over the L2 norm of the reference,
per tensor, the largest over tensors. Gradients that are zero in exact arithmetic (the bias of
a layer whose output only feeds a train-mode BatchNorm: the norm removes it) are round-off
noise in both runs (about 1e-20); their error is taken relative to the largest gradient of the
model instead (:func:`grad_err`).
"""

from __future__ import annotations

import copy
import json

import archs
import pytest
import torch
import torchvision
from conftest import grad_err, max_rel_err
from torch import fx, nn

import fxmomentum
from fxmomentum import ConversionReport, MomentumChain


def small_vit(p: float = 0.0) -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10, dropout=p, attention_dropout=p,
    )  # fmt: skip


def encoder(norm_first: bool, p: float = 0.0) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        16, 2, 32, dropout=p, batch_first=True, norm_first=norm_first
    )
    return nn.Sequential(
        nn.Linear(6, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    )


def img(batch: int = 2, size: int = 32):
    return (torch.randn(batch, 3, size, size),)


# name: (builder with dropout / stochastic depth on, inputs)
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(), img),
    "resnet50": (lambda: torchvision.models.resnet50(), img),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(dropout=0.2), img),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(dropout=0.2), img),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(stochastic_depth_prob=0.5), img),
    "convnext_tiny": (
        lambda: torchvision.models.convnext_tiny(stochastic_depth_prob=0.5), lambda: img(1)
    ),
    "regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(), img),
    "swin_t": (lambda: torchvision.models.swin_t(dropout=0.1), lambda: img(1)),
    "vit": (lambda: small_vit(0.1), lambda: img(2, 64)),
    "mlp_resnet": (lambda: archs.MLPResNet(p=0.1), lambda: (torch.randn(4, 8),)),
    "pre_norm": (lambda: archs.PreNormTransformer(p=0.1, use_mask=True),
                 lambda: (torch.randn(2, 5, 6), torch.randn(2, 5, 5))),
    "post_norm": (lambda: archs.PostNormTransformer(), lambda: (torch.randn(2, 5, 6),)),
    "torch_encoder_pre": (lambda: encoder(True, 0.1), lambda: (torch.randn(2, 5, 6),)),
    "torch_encoder_post": (lambda: encoder(False, 0.1), lambda: (torch.randn(2, 5, 6),)),
    "unet": (lambda: archs.UNet(), lambda: (torch.randn(2, 3, 16, 16),)),
    "conditioned": (lambda: archs.Conditioned(), lambda: (torch.randn(3, 5), torch.randn(3, 1))),
    "weight_tied": (lambda: archs.WeightTied(), lambda: (torch.randn(3, 4),)),
}  # fmt: skip


def build(name: str):
    make, inputs = MODELS[name]
    torch.manual_seed(0)
    model = make()
    return model, inputs()


def run(model: nn.Module, inputs, seed: int = 1):
    torch.manual_seed(seed)
    return model(*inputs)


# -- gamma = 0 reproduces the original ----------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_gamma_zero_reproduces_the_original(name):
    model, inputs = build(name)
    gm, report = fxmomentum.convert(
        model, 0.0, use_backprop=True, example_inputs=inputs, return_report=True
    )
    assert report.converted, name
    twin = copy.deepcopy(model)  # the original in train mode updates its BatchNorm statistics
    gm.load_state_dict(twin.state_dict())
    for mode in ("eval", "train"):
        getattr(twin, mode)()
        getattr(gm, mode)()
        with torch.no_grad():
            expected, got = run(twin, inputs), run(gm, inputs)
        assert max_rel_err([got], [expected]) <= 1e-5, (name, mode)
    # Same running statistics after the train-mode step.
    assert max_rel_err(gm.state_dict().values(), twin.state_dict().values()) <= 1e-5


def test_vit_b_16_gamma_zero():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    x = torch.randn(1, 3, 224, 224)
    gm = fxmomentum.convert(model, 0.0, use_backprop=True, example_inputs=x)
    with torch.no_grad():
        assert max_rel_err([gm(x)], [model(x)]) <= 1e-5


# -- reversible gradients equal backprop gradients (float64, train mode) -------------------------
GRAD_MODELS = [n for n in MODELS if n not in ("resnet50", "mobilenet_v2")]


@pytest.mark.parametrize("name", GRAD_MODELS)
def test_reversible_gradients_equal_backprop(name):
    model, inputs = build(name)
    if len(inputs) == 1 and inputs[0].dim() == 4 and inputs[0].shape[1] == 3:
        # 64 x 64 images, so that the last train-mode BatchNorms normalise more than two
        # values (over two values they amplify round-off by orders of magnitude).
        inputs = (torch.randn(1, 3, 64, 64),)
    model = model.double().train()
    inputs = tuple(t.double() for t in inputs)
    reversible = fxmomentum.convert(model, 0.9, example_inputs=inputs)
    backprop = fxmomentum.convert(model, 0.9, example_inputs=inputs, use_backprop=True)
    assert any(not c.use_backprop for c in reversible.modules() if isinstance(c, MomentumChain))
    results = []
    for gm in (reversible, backprop):
        gm.train()
        xs = tuple(t.clone().requires_grad_() for t in inputs)
        out = run(gm, xs)  # same seed: the same dropout and stochastic depth draws
        (out.square().mean() + out.mean()).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in gm.parameters()]
        grads += [x.grad for x in xs]
        results.append((out.detach(), grads, gm.state_dict()))
    (out_r, grads_r, state_r), (out_b, grads_b, state_b) = results
    assert max_rel_err([out_r], [out_b]) <= 1e-8, name
    assert grad_err(grads_r, grads_b) <= 1e-5, name
    # BatchNorm statistics updated once, to the same values (a running mean that is zero in
    # exact arithmetic differs by round-off: hence the absolute tolerance).
    for key, value in state_b.items():
        assert torch.allclose(state_r[key], value, rtol=1e-8, atol=1e-10), (name, key)
        if key.endswith("num_batches_tracked"):
            assert value.item() == 1, (name, key)


# -- API ----------------------------------------------------------------------------------------
def test_convert_leaves_the_model_untouched():
    model, inputs = build("convnext_tiny")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: type(m) for n, m in model.named_modules()}
    gm = fxmomentum.convert(model, 0.9, example_inputs=inputs)
    assert isinstance(gm, fx.GraphModule) and gm is not model
    assert {n: type(m) for n, m in model.named_modules()} == modules
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())
    assert all(p is not q for p, q in zip(gm.parameters(), model.parameters(), strict=True))


def test_report_contents_and_formats():
    model, inputs = build("resnet50")
    gm, report = fxmomentum.convert(model, 0.9, example_inputs=inputs, return_report=True)
    assert isinstance(report, ConversionReport)
    assert [c.name for c in report.chains] == [f"momentum_chain_{i}" for i in range(4)]
    c = report.chains[2]
    assert (c.num_blocks, c.kind, c.first, c.last) == (5, "generalized", "layer3.1", "layer3.5")
    assert c.shape == (2, 1024, 2, 2) and c.dtype == "float32" and c.gamma == 0.9
    assert c.num_params == sum(p.numel() for i in range(1, 6) for p in model.layer3[i].parameters())
    assert c.saved_bytes > 0 and report.saved_bytes == sum(x.saved_bytes for x in report.chains)
    assert report.nodes_after == len(gm.graph.nodes) < report.nodes_before
    assert "momentum_chain_0" in report.code_after and "momentum_chain" not in report.code_before
    data = json.loads(report.format("json"))
    assert data == json.loads(json.dumps(report.as_dict()))
    assert [ch["num_blocks"] for ch in data["chains"]] == [2, 3, 5, 2]
    assert (
        data["skipped"][0]["module"] == "layer1.0" and "projection" in data["skipped"][0]["reason"]
    )
    assert data["shapes_verified"] is True
    text = str(report)
    assert text == report.format("table") and "layer3.1" in text and "projection shortcut" in text
    md = report.format("markdown")
    assert md.startswith("## ResNet") and "| momentum_chain_2 |" in md
    with pytest.raises(ValueError, match="unknown format"):
        report.format("yaml")
    # inspect predicts what convert does.
    predicted = fxmomentum.inspect(model, inputs)
    assert predicted.as_dict() == report.as_dict()
    assert predicted.code_after == report.code_after


def test_gamma_per_chain_and_set_gamma():
    model, inputs = build("resnet18")
    gm, report = fxmomentum.convert(
        model, {"layer1": 0.5, 2: 0.8, "momentum_chain_3": 0.7}, return_report=True
    )
    got = [(c.name, c.gamma) for c in report.chains]
    assert got == [("momentum_chain_0", 0.5), (None, None),
                   ("momentum_chain_2", 0.8), ("momentum_chain_3", 0.7)]  # fmt: skip
    assert report.chains[1].reason == "no gamma given for this chain"
    gm = fxmomentum.convert(model, lambda c: 0.25 * c.num_blocks)
    assert [m.gamma for _, m in sorted(gm.named_children()) if isinstance(m, MomentumChain)] == [
        0.5, 0.25, 0.25, 0.25
    ]  # fmt: skip
    assert fxmomentum.set_gamma(gm, 0.6) == {f"momentum_chain_{i}": 0.6 for i in range(4)}
    assert fxmomentum.set_gamma(gm, {"layer4": 0.1}) == {"momentum_chain_3": 0.1}
    assert gm.momentum_chain_3.gamma == 0.1 and gm.momentum_chain_0.gamma == 0.6
    assert fxmomentum.set_gamma(gm, lambda name, chain: 0.3 if len(chain.names) > 1 else None) == {
        "momentum_chain_0": 0.3
    }
    with pytest.raises(ValueError, match="use_backprop"):
        fxmomentum.set_gamma(gm, 0.0)
    gm.train()
    out = gm(*inputs)  # still trains after the change
    out.sum().backward()
    assert gm.layer1[1].conv1.weight.grad is not None


def test_invalid_arguments():
    model = archs.MLPResNet()
    with pytest.raises(ValueError, match="use_backprop=True"):
        fxmomentum.convert(model, 0.0)
    with pytest.raises(ValueError):
        fxmomentum.convert(model, 1.5)
    with pytest.raises(ValueError, match="min_blocks"):
        fxmomentum.convert(model, min_blocks=0)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fxmomentum.convert(lambda x: x)
    with pytest.raises(ValueError, match="chain 0"):
        fxmomentum.convert(model, {0: 0.0})


def test_cost_model_skips_chains_that_save_nothing():
    class TwoStages(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(4, 64)
            self.wide = nn.ModuleList(
                nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)) for _ in range(4)
            )
            self.down = nn.Linear(64, 4)
            self.tiny = nn.Linear(4, 4)

        def forward(self, x):
            x = self.up(x)
            for f in self.wide:
                x = x + f(x)
            x = self.down(x)
            return x + self.tiny(x)  # one cheap block: its state costs more than it saves

    x = torch.randn(8, 4)
    _, report = fxmomentum.convert(TwoStages(), example_inputs=x, cost_model=True,
                                   return_report=True)  # fmt: skip
    assert [c.converted for c in report.chains] == [True, False]
    assert report.chains[0].saved_bytes > 0 >= report.chains[1].saved_bytes
    assert report.chains[1].reason.startswith("cost model")


def test_converting_a_converted_model_changes_nothing():
    model, inputs = build("resnet18")
    model.eval()
    gm = fxmomentum.convert(model, 0.5)
    again, report = fxmomentum.convert(gm, 0.9, example_inputs=inputs, return_report=True)
    assert report.chains == [] and len(report.leaves) == 4
    assert list(again.state_dict()) == list(model.state_dict())
    assert again.momentum_chain_0.gamma == 0.5
    with torch.no_grad():
        assert max_rel_err([again(*inputs)], [gm(*inputs)]) == 0.0


def test_untraceable_parts_are_reported_and_the_rest_converted():
    class Gate(nn.Module):
        def forward(self, x):
            return x if x.mean() > 0 else -x  # data-dependent: not traceable

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = Gate()
            self.body = archs.MLPResNet(depth=3)

        def forward(self, x):
            return self.body(self.gate(x))

    model = Net()
    x = torch.randn(3, 8)
    gm, report = fxmomentum.convert(model, 0.9, example_inputs=x, return_report=True)
    assert [(leaf.path, leaf.type) for leaf in report.leaves] == [("gate", "Gate")]
    assert [c.num_blocks for c in report.chains] == [3]
    assert "gate" in str(report)
    gm(x).sum().backward()


def test_two_thousand_block_chain_converts():
    # How long it takes is measured by benchmarks/bench_convert.py, not asserted here.
    model = archs.Synthetic(2000)
    gm, report = fxmomentum.convert(model, 0.9, example_inputs=torch.randn(4, 8),
                                    return_report=True)  # fmt: skip
    assert [c.num_blocks for c in report.chains] == [2000] and report.shapes_verified
    with torch.no_grad():
        assert torch.isfinite(gm(torch.randn(4, 8))).all()


def _gamma_one(where: str, value: object) -> str:
    return (
        f"gamma{where} is {value!r}: at gamma = 1 the velocity never changes, so no block has an "
        f"effect and no block's parameters get a gradient. Use a gamma below 1 (0.9 is the usual "
        f"momentum; the largest is 0.999985)."
    )


@pytest.mark.parametrize("use_backprop", [False, True])
def test_gamma_one_is_refused_everywhere(use_backprop):
    model = archs.MLPResNet()
    for value in (1, 1.0, 1 - 1e-9):  # the last rounds to 1 on the 2**-16 grid
        with pytest.raises(ValueError) as err:
            fxmomentum.convert(model, value, use_backprop=use_backprop)
        assert str(err.value) == _gamma_one("", value)
    with pytest.raises(ValueError) as err:
        fxmomentum.convert(model, {0: 1.0}, use_backprop=use_backprop)
    assert str(err.value) == _gamma_one(" for chain 0 (blocks.0)", 1.0)
    with pytest.raises(ValueError) as err:
        fxmomentum.inspect(model, gamma=1.0, use_backprop=use_backprop)
    assert str(err.value) == _gamma_one("", 1.0)
    gm = fxmomentum.convert(model, 0.9, use_backprop=use_backprop)
    with pytest.raises(ValueError) as err:
        fxmomentum.set_gamma(gm, 1)
    assert str(err.value) == _gamma_one(" for momentum_chain_0", 1)
    with pytest.raises(ValueError) as err:
        gm.momentum_chain_0.gamma = 1.0
    assert str(err.value) == _gamma_one("", 1.0)
    assert gm.momentum_chain_0.gamma == 0.9  # unchanged
