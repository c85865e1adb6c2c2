"""transform_to_momentumnet: the official library's API and its README examples."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from conftest import max_rel_err, rel_err
from torch import nn
from torchvision.models import resnet18, resnet101

from fxmomentum import transform_to_momentumnet


def weighted_loss(out: torch.Tensor) -> torch.Tensor:
    # Not out.sum(): the sum of a LayerNorm's output has zero gradient.
    w = torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    return (out * w).sum()


def grads(model: nn.Module, *inputs, seed: int = 3, **kwargs) -> tuple[torch.Tensor, list]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(*inputs, **kwargs)
    weighted_loss(out).backward()
    return out, [p.grad for p in model.parameters()]


def test_seed_readme_examples_run_as_written():
    from fxmomentum import MomentumNet

    hidden = 8
    d = 500
    function = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))
    mresnet = MomentumNet([function] * 10, gamma=0.9)
    assert mresnet(torch.randn(2, d)).shape == (2, d)

    resnet = resnet101()
    mresnet101 = transform_to_momentumnet(resnet, gamma=0.9, use_backprop=False)
    out = mresnet101(torch.randn(1, 3, 64, 64))
    out.sum().backward()
    assert mresnet101.layer3[5].conv1.weight.grad is not None

    transformer = torch.nn.Transformer(
        num_encoder_layers=6, num_decoder_layers=6, d_model=64, nhead=4, dim_feedforward=128
    )
    mtransformer = transform_to_momentumnet(
        transformer,
        sub_layers=["encoder.layers", "decoder.layers"],
        gamma=0.9,
        use_backprop=False,
        keep_first_layer=False,
    )
    out = mtransformer(torch.randn(5, 2, 64), torch.randn(4, 2, 64))
    weighted_loss(out).backward()
    assert mtransformer.encoder.layers[0].linear1.weight.grad is not None


@pytest.fixture
def transformer():
    torch.manual_seed(0)
    return nn.Transformer(
        d_model=32,
        nhead=4,
        num_encoder_layers=3,
        num_decoder_layers=2,
        dim_feedforward=64,
        dropout=0.1,
    ).double()


def test_transformer_masks_memory_and_dropout(transformer):
    src = torch.randn(10, 2, 32, dtype=torch.float64)
    tgt = torch.randn(7, 2, 32, dtype=torch.float64)
    tgt_mask = transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 7:] = True
    kwargs = dict(tgt_mask=tgt_mask, src_key_padding_mask=pad, memory_key_padding_mask=pad)
    converted = {
        (ub, gamma): transform_to_momentumnet(
            transformer,
            sub_layers=["encoder.layers", "decoder.layers"],
            gamma=gamma,
            use_backprop=ub,
            keep_first_layer=False,
        ).train()
        for ub, gamma in [(True, 0.0), (True, 0.9), (False, 0.9)]
    }
    transformer.train()
    out, _ = grads(transformer, src, tgt, **kwargs)
    out0, _ = grads(converted[True, 0.0], src, tgt, **kwargs)
    assert rel_err(out0, out) <= 1e-12
    out_bp, g_bp = grads(converted[True, 0.9], src, tgt, **kwargs)
    out_rev, g_rev = grads(converted[False, 0.9], src, tgt, **kwargs)
    assert rel_err(out_bp, out) > 1e-3  # gamma = 0.9 is a different function
    assert rel_err(out_rev, out_bp) < 1e-10
    assert max_rel_err(g_rev, g_bp) < 1e-9


def test_state_dict_keys_and_attributes_stay(transformer):
    m = transform_to_momentumnet(transformer, sub_layers=["encoder.layers"], gamma=0.5)
    assert list(m.state_dict()) == list(transformer.state_dict())
    m.load_state_dict(transformer.state_dict(), strict=True)
    transformer.load_state_dict(m.state_dict(), strict=True)
    # What nn.TransformerEncoder reads from its first layer is still there.
    assert m.encoder.layers[0].self_attn.batch_first is False
    assert isinstance(m.encoder.layers[1], nn.TransformerEncoderLayer)
    # The original is untouched.
    assert type(transformer.encoder.layers[1]) is nn.TransformerEncoderLayer


def test_resnet_sequential_chains_match_backprop():
    torch.manual_seed(0)
    model = resnet18().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    bp = transform_to_momentumnet(model, gamma=0.9, use_backprop=True)
    rev = transform_to_momentumnet(model, gamma=0.9, use_backprop=False)
    _, g_bp = grads(bp, x)
    _, g_rev = grads(rev, x)
    assert max_rel_err(g_rev, g_bp) < 1e-8
    # BatchNorm statistics were updated once per forward in both.
    assert rev.layer1[1].bn1.num_batches_tracked.item() == 1
    assert rel_err(rev.layer1[1].bn1.running_var, bp.layer1[1].bn1.running_var) < 1e-12
    gamma0 = transform_to_momentumnet(model, gamma=0.0, use_backprop=True).eval()
    assert rel_err(gamma0(x), model.eval()(x)) == 0.0


def test_layers_called_out_of_order_raise():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])

    class Skipper(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = model

        def forward(self, x):
            return self.layers[2](self.layers[0](x))

    m = transform_to_momentumnet(
        Skipper(), sub_layers=["layers"], keep_first_layer=False, use_backprop=True
    )
    with pytest.raises(RuntimeError, match="must run in order"):
        m(torch.randn(2, 4))


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="no submodule 'layer9'"):
        transform_to_momentumnet(resnet18(), sub_layers=["layer9"])
    with pytest.raises(TypeError, match=r"nn\.Sequential or nn\.ModuleList"):
        transform_to_momentumnet(resnet18(), sub_layers=["layer1.0"])
    with pytest.raises(ValueError, match="divides by gamma"):
        transform_to_momentumnet(resnet18(), gamma=0.0, use_backprop=False)


def test_pickled_model_loads_and_trains_in_a_fresh_process(tmp_path):
    m = transform_to_momentumnet(resnet18(), gamma=0.9, use_backprop=False)
    path = tmp_path / "m.pt"
    torch.save(m, path)
    code = (
        "import torch\n"
        f"m = torch.load({str(path)!r}, weights_only=False)\n"
        "m(torch.randn(1, 3, 64, 64)).sum().backward()\n"
        "print(type(m.layer1[1]).__name__, m.layer1[1].conv1.weight.grad is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "BasicBlock] True" in out.stdout


def test_vit_pytorch_layers_without_forward_are_refused():
    from vit_pytorch import ViT

    v = ViT(image_size=32, patch_size=16, num_classes=4, dim=16, depth=2, heads=2, mlp_dim=32)
    # Each entry of v.transformer.layers is nn.ModuleList([attn, ff]): the parent unpacks it
    # and adds the residuals itself, so the list is never called.
    with pytest.raises(ValueError) as err:
        transform_to_momentumnet(v, sub_layers=["transformer.layers"])
    message = str(err.value)
    assert message.startswith("sub_layers: transformer.layers.1 is a ModuleList, which has no ")
    assert "fxmomentum.convert(model.transformer)" in message
    with pytest.raises(ValueError, match=r"transformer\.layers\.0 is a ModuleList"):
        transform_to_momentumnet(v, sub_layers=["transformer.layers"], keep_first_layer=False)


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(x)


class Owner(nn.Module):
    """Owns a list of layers; ``how`` says how its forward reaches them."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Inner() for _ in range(3))
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "inside":  # the layers' own code, not the layers
            for layer in self.layers:
                x = x + layer.lin(x)
        elif self.how == "some":
            for layer in self.layers[:2]:
                x = layer(x)
        else:
            for layer in self.layers:
                x = layer(x)
        return x


class Model(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.owner = Owner(how)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.owner(self.stem(x))


@pytest.mark.parametrize("use_backprop", [True, False])
def test_layers_not_all_called_raise_after_the_forward(use_backprop: bool):
    x = torch.randn(2, 4)
    kw = dict(sub_layers=["owner.layers"], keep_first_layer=False, use_backprop=use_backprop)
    m = transform_to_momentumnet(Model("inside"), **kw)
    with pytest.raises(RuntimeError, match=r"^Owner\.forward \('owner'\) ran without calling "):
        m(x)
    m = transform_to_momentumnet(Model("some"), **kw)
    with pytest.raises(RuntimeError, match=r"ran only the first 2 of the 3 layers of the momentum"):
        m(x)
    m.owner.how = "all"  # the chain was reset: a full pass works
    m(x).sum().backward()
    assert m.owner.layers[2].lin.weight.grad is not None
    # The check goes with copies of the model.
    twin = copy.deepcopy(m)
    twin.owner.how = "inside"
    with pytest.raises(RuntimeError, match="ran without calling"):
        twin(x)
    m(x)
    # The model's own forward checks a list it owns.
    top = transform_to_momentumnet(Owner("inside"), **{**kw, "sub_layers": ["layers"]})
    with pytest.raises(RuntimeError, match=r"^Owner\.forward ran without calling"):
        top(x)


class AddsAgain(nn.Module):
    """A parent that adds the residual itself, `x = x + layer(x)`, around converted layers."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


ADDS_AGAIN = (
    "layer 1 of the momentum chain 'layers' was not given the output of layer 0: the parent "
    "changed x between the layers (as `x = x + layer(x)` does). The parent must pass each "
    "layer's output to the next unchanged, `x = layer(x, ...)`; is_residual only says whether a "
    "layer returns f(x) (True) or x + f(x) (False). Change the parent's code, or use "
    "fxmomentum.convert(model), which converts the residual additions written in the parent's "
    "code."
)


@pytest.mark.parametrize("use_backprop", [True, False])
@pytest.mark.parametrize("is_residual", [True, False])
def test_parent_that_changes_x_between_layers_is_named(use_backprop, is_residual):
    m = transform_to_momentumnet(
        AddsAgain(), sub_layers=["layers"], keep_first_layer=False, gamma=0.9,
        use_backprop=use_backprop, is_residual=is_residual,
    )  # fmt: skip
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError) as err:
        m(x)
    assert str(err.value) == ADDS_AGAIN
    # The chain was reset: the same layers called in sequence work, and match MomentumNet.
    from fxmomentum import MomentumNet

    seq = nn.Sequential(*m.layers)
    ref = MomentumNet(list(AddsAgain().layers), 0.9, is_residual=is_residual)
    ref.load_state_dict({f"blocks.{k}": v for k, v in m.layers.state_dict().items()})
    torch.testing.assert_close(seq(x), ref(x), rtol=1e-6, atol=1e-6)


def test_fxmomentum_convert_takes_the_parent_that_adds():
    x = torch.randn(2, 4)
    model = AddsAgain()
    gm, report = fxmomentum_convert(model)
    assert [c.num_blocks for c in report.chains] == [3]
    torch.testing.assert_close(
        fxmomentum_convert(model, gamma=0.0, use_backprop=True)[0](x), model(x)
    )
    assert gm(x).shape == (2, 4)


def fxmomentum_convert(model, **kwargs):
    import fxmomentum

    kwargs.setdefault("gamma", 0.9)
    return fxmomentum.convert(model, return_report=True, **kwargs)


GAMMA_ONE = (
    "gamma is 1: at gamma = 1 the velocity never changes, so no block has an effect and no "
    "block's parameters get a gradient. Use a gamma below 1 (0.9 is the usual momentum; the "
    "largest is 0.999985)."
)


@pytest.mark.parametrize("use_backprop", [True, False])
def test_transform_refuses_gamma_one(use_backprop):
    with pytest.raises(ValueError) as err:
        transform_to_momentumnet(resnet18(), gamma=1, use_backprop=use_backprop)
    assert str(err.value) == GAMMA_ONE
