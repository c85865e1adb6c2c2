"""Tests of fxmomentum.match: the residual blocks and chains found in real architectures."""

from __future__ import annotations

import time

import archs
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

import fxmomentum
from fxmomentum.capture import capture
from fxmomentum.surgery.match import find_chains, module_path


def image(size: int = 64) -> torch.Tensor:
    return torch.randn(1, 3, size, size)


# -- what each torchvision architecture implies, read from its modules -------------------------
def resnet_chains(m: torchvision.models.ResNet) -> list[int]:
    # A stage's first block has a projection shortcut (downsample) unless shapes already match.
    layers = [m.layer1, m.layer2, m.layer3, m.layer4]
    return [len(layer) - (layer[0].downsample is not None) for layer in layers]


def runs(flags: list[bool]) -> list[int]:
    """Lengths of the runs of consecutive True values."""
    out, n = [], 0
    for f in [*flags, False]:
        if f:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def inverted_residual_chains(m: nn.Module) -> list[int]:
    # MobileNet / EfficientNet: residual only when stride 1 and in == out; consecutive
    # residual blocks chain, any other block ends the chain.
    blocks = [b for b in m.features.modules() if hasattr(b, "use_res_connect")]
    return runs([bool(b.use_res_connect) for b in blocks])


def regnet_chains(m: nn.Module) -> list[int]:
    stages = list(m.trunk_output.children())
    return [n for n in (len(s) - (s[0].proj is not None) for s in stages) if n]


RES = "generalized"
STAGES = ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]  # each stage's block 0 projects
F_ = "features."
ARCHITECTURES = {
    # name: (chains, kind, first block of each chain, projection shortcuts skipped)
    "resnet18": ([2, 1, 1, 1], RES, ["layer1.0", *STAGES[1:]], 3),  # layer1 does not project
    "resnet50": ([2, 3, 5, 2], RES, STAGES, 4),
    "resnet101": ([2, 3, 22, 2], RES, STAGES, 4),
    "resnet152": ([2, 7, 35, 2], RES, STAGES, 4),
    "resnext50_32x4d": ([2, 3, 5, 2], RES, STAGES, 4),
    "wide_resnet50_2": ([2, 3, 5, 2], RES, STAGES, 4),
    "mobilenet_v2": ([1, 2, 3, 2, 2], "pure", [F_ + s for s in ("3", "5", "8", "12", "15")], 0),
    "mobilenet_v3_small": ([1, 2, 1, 2], "pure", [F_ + s for s in ("3", "5", "8", "10")], 0),
    "efficientnet_b0": ([1, 1, 2, 2, 3], "pure", [f"{F_}{i}.1" for i in range(2, 7)], 0),
    "convnext_tiny": ([3, 3, 9, 3], "pure", [f"{F_}{i}.0" for i in (1, 3, 5, 7)], 0),
    "regnet_y_400mf": (
        [2, 5, 5], RES, [f"trunk_output.block{i}.block{i}-1" for i in (2, 3, 4)], 4
    ),
    "vit_b_16": ([24], "pure", ["encoder.layers.encoder_layer_0"], 0),
    "swin_t": ([4, 4, 12, 4], "pure", [f"{F_}{i}.0" for i in (1, 3, 5, 7)], 0),
}  # fmt: skip


def implied_chains(name: str, m: nn.Module) -> list[int]:
    """The chains the architecture implies, worked out from its modules."""
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return resnet_chains(m)
    if name.startswith(("mobilenet", "efficientnet")):
        return inverted_residual_chains(m)
    if name.startswith("regnet"):
        return regnet_chains(m)
    if name.startswith("convnext"):  # stages of CNBlocks, downsampling layers in between
        return [len(s) for s in m.features[1::2]]
    if name.startswith("swin"):  # two pure blocks (attention, MLP) per Swin block
        return [2 * len(s) for s in m.features[1::2]]
    if name.startswith("vit"):  # two pure blocks per encoder layer, then the final LayerNorm
        return [2 * len(m.encoder.layers)]
    raise KeyError(name)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_torchvision_chains(name):
    chains, kind, firsts, projections = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    report = fxmomentum.inspect(model, image(224 if name == "vit_b_16" else 64))
    assert report.shapes_verified
    assert [c.num_blocks for c in report.chains] == chains == implied_chains(name, model)
    assert {c.kind for c in report.chains} == {kind}
    assert [c.first for c in report.chains] == firsts
    assert all(c.converted for c in report.chains)
    assert len(report.skipped) == projections
    for s in report.skipped:  # each stage's projection block stays outside, with its reason
        assert s.reason.startswith("projection shortcut"), s
        assert s.path.endswith((".0", "-0")), s
        assert ("downsample" if "res" in name else "proj") in s.reason
    if name.startswith("resnet"):
        # Each block of a chain is one BasicBlock/Bottleneck module, its final relu included.
        plain = [f"layer1.{i}" for i, b in enumerate(model.layer1) if b.downsample is None]
        assert [b.path for b in report.chains[0].blocks] == plain
        assert all(b.exit.endswith("relu_1" if name == "resnet18" else "relu_2")
                   for b in report.chains[0].blocks)  # fmt: skip
    first = report.chains[0]
    assert first.shape is not None and first.dtype == "float32" and first.num_params > 0


def test_vit_blocks_and_final_norm():
    model = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    report = fxmomentum.inspect(model, image())
    (chain,) = report.chains
    assert chain.num_blocks == 6 and chain.kind == "pure"
    assert [b.path for b in chain.blocks] == [
        f"encoder.layers.encoder_layer_{i}" for i in range(3) for _ in range(2)
    ]
    assert chain.shape == (1, 17, 32)
    # The encoder's final LayerNorm is not part of the last block.
    assert "encoder_ln" not in {b.exit for b in chain.blocks}


# -- hand-written architectures ----------------------------------------------------------------
def chains_of(model, *inputs, **options):
    return fxmomentum.inspect(model, inputs or None, **options)


def test_mlp_resnet():
    report = chains_of(archs.MLPResNet(depth=5), torch.randn(3, 8))
    (chain,) = report.chains
    assert chain.num_blocks == 5 and chain.kind == "pure"
    assert [b.path for b in chain.blocks] == [f"blocks.{i}" for i in range(5)]
    assert chain.blocks[-1].exit.startswith("add")  # the final norm stays outside
    assert chain.shape == (3, 16) and report.skipped == []


def test_pre_norm_transformer_blocks_read_their_parameters_and_the_mask():
    model = archs.PreNormTransformer(depth=3, p=0.1, use_mask=True)
    report = chains_of(model, torch.randn(2, 5, 6), torch.randn(2, 5, 5))
    (chain,) = report.chains
    assert chain.num_blocks == 6 and chain.kind == "pure"
    assert [b.path for b in chain.blocks] == [f"layers.{i}" for i in range(3) for _ in range(2)]
    attn = chain.blocks[0]
    assert "layers_0_layer_scale" in attn.context  # a parameter read with get_attr
    assert "unsqueeze" in attn.context  # the mask, computed outside the chain
    assert "layers_0__training_flag" in attn.context  # F.dropout(..., self.training)
    assert chain.blocks[1].context == []  # the MLP block reads nothing from outside


def test_post_norm_transformer_blocks_are_generalized():
    report = chains_of(archs.PostNormTransformer(depth=2), torch.randn(2, 5, 6))
    (chain,) = report.chains
    assert chain.num_blocks == 4 and chain.kind == "generalized"
    assert [b.exit for b in chain.blocks] == [
        "layers_0_norm1", "layers_0_norm2", "layers_1_norm1", "layers_1_norm2"
    ]  # fmt: skip


@pytest.mark.parametrize("norm_first", [True, False])
def test_torch_transformer_encoder(norm_first):
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    model = nn.Sequential(nn.Linear(6, 16), encoder)
    report = chains_of(model, torch.randn(2, 5, 6))
    (chain,) = report.chains
    assert chain.num_blocks == 6
    assert chain.kind == ("pure" if norm_first else "generalized")
    assert chain.first == "1.layers.0" and chain.last == "1.layers.2"


def test_unet_taps_end_chains_and_outer_skips_are_skipped():
    report = chains_of(archs.UNet(), torch.randn(1, 3, 16, 16))
    got = [(c.first, c.num_blocks) for c in report.chains]
    assert got == [("enc1.0", 2), ("enc1.2", 1), ("enc2.0", 3), ("mid.1", 1), ("dec1.0", 2)]
    assert len(report.skipped) == 2
    assert all("encloses" in s.reason and "outer skip" in s.reason for s in report.skipped)


def test_blocks_with_a_conditioning_input():
    report = chains_of(archs.Conditioned(depth=3), torch.randn(3, 5), torch.randn(3, 1))
    (chain,) = report.chains
    assert chain.num_blocks == 3 and report.skipped == []
    # What the blocks read of the embedding is computed once, outside the chain.
    for i, block in enumerate(chain.blocks):
        assert f"blocks_{i}_shift" in block.context
    assert "blocks_0_scale" in report.code_after and "blocks_0_mlp_0" not in report.code_after


def test_weight_tied_blocks():
    model = archs.WeightTied(times=4)
    report = chains_of(model, torch.randn(3, 4))
    (chain,) = report.chains
    assert chain.num_blocks == 4 and [b.path for b in chain.blocks] == ["block"] * 4
    assert chain.num_params == sum(p.numel() for p in model.block.parameters())


# -- the rules, one small module each ------------------------------------------------------------
class Identity(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)
        self.shortcut = nn.Identity()

    def forward(self, x):
        return self.shortcut(x) + self.f(x)


class Alpha(nn.Module):
    def __init__(self, skip_scaled: bool = False):
        super().__init__()
        self.f = nn.Linear(4, 4)
        self.skip_scaled = skip_scaled

    def forward(self, x):
        if self.skip_scaled:
            return torch.add(self.f(x), x, alpha=0.5)
        return torch.add(x, self.f(x), alpha=0.5)


class Escaping(nn.Module):
    def __init__(self):
        super().__init__()
        self.f1, self.f2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.f1(x)
        y = x + self.f2(h)
        return y * h


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.f(x).mean(dim=1, keepdim=True)


class Elementwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        x = self.f(x)
        return x + 0.044715 * x**3


class InPlaceInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        y = self.f(F.relu(x, inplace=True))
        return x + y


class Tapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.fs = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        x = x + self.fs[0](x)
        x = x + self.fs[1](x)
        tap = x
        x = x + self.fs[2](x)
        x = x + self.fs[3](x)
        return x, tap


class InPlaceAdd(nn.Module):
    def __init__(self, rebind: bool = True):
        super().__init__()
        self.fs = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.rebind = rebind

    def forward(self, x):
        x = x.clone()
        for f in self.fs:
            if self.rebind:
                x = x.add_(f(x))
            else:
                x.add_(f(x))  # later reads of x rely on the mutation
        return torch.relu(x)


class ShapeOnce(nn.Module):
    """Reads the sequence length once, before the blocks, from the chain's input."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.fs = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        x = self.embed(x)
        b, n, d = x.shape
        for f in self.fs:
            x = x + f(x).reshape(b, n, d)
        return x


def test_shape_read_before_the_blocks_stays_outside():
    model = ShapeOnce()
    x = torch.randn(2, 5, 3)
    gm, report = fxmomentum.convert(model, 0.0, use_backprop=True, example_inputs=x,
                                    return_report=True)  # fmt: skip
    (chain,) = report.chains
    assert chain.num_blocks == 3 and report.skipped == []
    assert all("getitem_1" in b.context for b in chain.blocks)
    assert "getattr_1 = embed.shape" in gm.code
    assert torch.equal(gm(x), model(x))


class MaskOnce(ShapeOnce):
    """Builds a mask from the chain input's batch size, before the blocks, for all of them."""

    def forward(self, x):
        x = self.embed(x)
        keep = torch.ones((x.shape[0], 1, 1), dtype=x.dtype).cumsum(0)
        for f in self.fs:
            x = x + f(x) * keep
        return x


def test_a_value_built_from_the_input_shape_alone_stays_outside():
    # ``ones`` and ``cumsum`` read nothing of x but its shape: context of every block, not
    # part of the first one (whose later readers would otherwise break the chain there).
    model = MaskOnce()
    x = torch.randn(4, 8, 3)
    gm, report = fxmomentum.convert(model, 0.0, use_backprop=True, example_inputs=x,
                                    return_report=True)  # fmt: skip
    (chain,) = report.chains
    assert chain.num_blocks == 3 and report.skipped == []
    assert all("cumsum" in b.context for b in chain.blocks)
    assert torch.equal(gm(x), model(x))


class Positions(ShapeOnce):
    """Adds a position embedding sized from the embedded input (as BART does, through a slice
    of it read for its shape only), then residual blocks."""

    def __init__(self, sliced: bool):
        super().__init__()
        self.positions, self.sliced = nn.Embedding(16, 8), sliced

    def forward(self, x):
        x = self.embed(x)
        sized = x[:, :, -1] if self.sliced else x
        b, n = sized.shape[:2]
        x = x + self.positions(torch.arange(n)).expand(b, -1, -1)
        for f in self.fs:
            x = x + f(x)
        return x


@pytest.mark.parametrize("sliced", [False, True], ids=["shape", "slice-shape"])
def test_an_embedding_sized_from_the_input_is_no_block(sliced):
    model = Positions(sliced)
    x = torch.randn(2, 5, 3)
    gm, report = fxmomentum.convert(model, 0.0, use_backprop=True, example_inputs=x,
                                    return_report=True)  # fmt: skip
    (chain,) = report.chains
    assert (chain.first, chain.num_blocks) == ("fs.0", 3)
    (skipped,) = report.skipped
    assert "F reads only the shape of `embed`, not its values" in skipped.reason
    assert torch.equal(gm(x), model(x))


def test_identity_shortcut_is_seen_through():
    (chain,) = chains_of(Identity(), torch.randn(2, 4)).chains
    assert chain.num_blocks == 1 and chain.blocks[0].entry == "x"


def test_scaled_branch_and_scaled_skip():
    (chain,) = chains_of(Alpha(), torch.randn(2, 4)).chains
    assert chain.num_blocks == 1
    report = chains_of(Alpha(skip_scaled=True), torch.randn(2, 4))
    assert report.chains == [] and "skip is scaled" in report.skipped[0].reason


def test_rejections_carry_reasons():
    x = torch.randn(2, 4)
    reasons = {
        Escaping: "read by `mul` outside",
        Broadcast: "shape or dtype changes",
        Elementwise: "no parameters",
        InPlaceInput: "modifies the block input in place",
    }
    for cls, text in reasons.items():
        report = chains_of(cls(), x.clone())
        assert report.skipped, cls.__name__
        assert text in report.skipped[0].reason, (cls.__name__, report.skipped)
        assert report.skipped[0].node.startswith("add")
        if cls is not Escaping:
            assert report.chains == []


def test_a_tap_ends_the_chain():
    report = chains_of(Tapped(), torch.randn(2, 4))
    assert [(c.first, c.num_blocks) for c in report.chains] == [("fs.0", 2), ("fs.2", 2)]


def test_in_place_add_method():
    (chain,) = chains_of(InPlaceAdd(), torch.randn(2, 4)).chains
    assert chain.num_blocks == 2 and chain.kind == "pure"  # the relu is not in a block's module
    report = chains_of(InPlaceAdd(rebind=False), torch.randn(2, 4))
    assert report.chains == [] and len(report.skipped) == 2
    assert all("adds in place into `clone`" in s.reason for s in report.skipped)


def test_structure_without_shapes():
    report = fxmomentum.inspect(torchvision.models.resnet50())
    assert not report.shapes_verified
    assert [c.num_blocks for c in report.chains] == [2, 3, 5, 2]
    assert all(c.shape is None and c.saved_bytes is None for c in report.chains)


def test_include_exclude_min_blocks():
    model = torchvision.models.resnet50()
    report = fxmomentum.inspect(model, include="layer3")
    assert [(c.num_blocks, c.converted) for c in report.chains] == [
        (2, False), (3, False), (5, True), (2, False)
    ]  # fmt: skip
    assert report.chains[0].reason == "not in include"
    report = fxmomentum.inspect(model, exclude=["layer1", "layer4.2"])
    got = [(c.first, c.num_blocks, c.converted, c.reason) for c in report.chains]
    assert got == [
        ("layer1.1", 2, False, "excluded"),
        ("layer2.1", 3, True, ""),
        ("layer3.1", 5, True, ""),
        ("layer4.1", 1, True, ""),
        ("layer4.2", 1, False, "excluded"),
    ]
    report = fxmomentum.inspect(model, min_blocks=3)
    assert [c.converted for c in report.chains] == [False, True, True, False]
    assert report.chains[0].reason == "2 block(s) < min_blocks=3"
    names = [c.name for c in report.chains if c.converted]
    assert names == ["momentum_chain_0", "momentum_chain_1"]


def test_find_chains_directly_and_module_path():
    model = archs.MLPResNet(depth=3)
    graph = fx.Tracer().trace(model)
    result = find_chains(graph, dict(model.named_modules()))
    (chain,) = result.chains
    assert [b.kind for b in chain.blocks] == ["pure"] * 3
    assert [module_path(b.add) for b in chain.blocks] == ["", "", ""]
    assert [b.name for b in chain.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert chain.entry.name == "stem" and chain.exit is chain.blocks[-1].add


def test_matching_is_linear_in_depth():
    times = {}
    for depth in (250, 2000):
        model = archs.Synthetic(depth)
        cap = capture(model)
        start = time.perf_counter()
        result = find_chains(cap.graph, dict(model.named_modules()))
        times[depth] = time.perf_counter() - start
        assert [len(c.blocks) for c in result.chains] == [depth]
    # 8x the blocks: well under 64x the time (quadratic); allow noise on a shared machine.
    assert times[2000] < 30 * times[250] + 0.5, times
