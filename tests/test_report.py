"""Tests of fxmomentum.surgery.estimate: the memory estimate against what autograd really saves."""

from __future__ import annotations

import archs
import pytest
import torch
from torch import nn

import fxmomentum
from fxmomentum.capture import capture
from fxmomentum.surgery.estimate import (
    STATE_BYTES_PER_ELEMENT,
    autograd_saved_bytes,
    estimate_saved_bytes,
)
from fxmomentum.surgery.match import find_chains


def saved_tensor_bytes(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during a forward of ``model`` (per storage, not
    counting parameters and buffers); the model's buffers are left as they were."""
    fixed = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in fixed:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    del out
    model.load_state_dict(state)
    return sum(seen.values())


def wide_mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return archs.MLPResNet(dim=32, depth=4), torch.randn(64, 8)


def test_estimate_is_close_to_the_measured_saving():
    model, x = wide_mlp()
    gm, report = fxmomentum.convert(model, 0.9, example_inputs=x, return_report=True)
    (chain,) = report.chains
    measured = saved_tensor_bytes(model, x) - saved_tensor_bytes(gm, x)
    assert measured > 0
    # The exact state the reversible chain keeps is no saved tensor: the difference of saved
    # tensors sees the activations freed, not the state kept in their place.
    state = STATE_BYTES_PER_ELEMENT * x.shape[0] * 32
    assert 0.5 < (chain.saved_bytes + state) / measured < 1.25
    assert 0.5 < chain.saved_bytes / measured < 2


def test_autograd_saved_bytes_of_a_resnet_chain():
    import torchvision

    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)
    cap = capture(model, x)
    chains = find_chains(cap.graph, dict(cap.root.named_modules())).chains
    measured = autograd_saved_bytes(chains[0], x)  # layer1.0 and layer1.1
    # Measured on the chain alone: the original minus a converted model with only layer1
    # converted (the chain's input x_0 is freed too, which the estimate does not count).
    gm = fxmomentum.convert(model, 0.9, example_inputs=x, include="layer1")
    freed = saved_tensor_bytes(model, x) - saved_tensor_bytes(gm, x)
    x0 = 64 * 16 * 16 * 4
    assert 0.8 < measured / (freed - x0) < 1.25
    assert autograd_saved_bytes(chains[0]) == measured  # synthesized inputs, same shapes
    # Cached per graph: the buffers of the model are left as they were.
    assert torch.equal(cap.root.bn1.running_mean, model.bn1.running_mean)


def test_a_tiny_block_costs_more_than_it_saves():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(16, 16)

        def forward(self, x):
            return x + self.f(x)  # Linear saves only x, the chain's input

    x = torch.randn(8, 16)
    cap = capture(Tiny(), x)
    (chain,) = find_chains(cap.graph, dict(cap.root.named_modules())).chains
    assert autograd_saved_bytes(chain) == 0
    estimate = estimate_saved_bytes(chain, 0.9)
    assert estimate is not None and estimate < 0
    assert estimate == pytest.approx(-x.numel() * (STATE_BYTES_PER_ELEMENT + 0.152 / 8), rel=0.01)
    assert estimate_saved_bytes(chain, 0.9, use_backprop=True) == 0


def test_without_example_inputs_the_estimate_is_unavailable():
    model, _ = wide_mlp()
    report = fxmomentum.inspect(model)
    assert report.chains[0].saved_bytes is None and report.saved_bytes is None
    text = str(report)
    assert "n/a" in text and "saved (est.) unavailable" in text
    assert "example_inputs were not given" in report.format("markdown")
    assert report.as_dict()["chains"][0]["saved_bytes"] is None
    backprop = fxmomentum.inspect(model, use_backprop=True)
    assert "unavailable" not in str(backprop)


def test_failed_shape_propagation_is_not_called_missing_inputs():
    """At 1x3x2x2 a ResNet's train-mode BatchNorm fails on a 1x1 map: shape propagation fails
    on inputs that were given."""
    import torchvision

    report = fxmomentum.inspect(torchvision.models.resnet18(), torch.randn(1, 3, 2, 2))
    assert report.inputs_given and not report.shapes_verified
    notes = [line for line in str(report).splitlines() if line.startswith("note: saved")]
    assert notes == [
        "note: saved (est.) unavailable: it measures what autograd saves on example_inputs, and "
        "shape propagation failed on them (see the note above)"
    ]
    assert "example_inputs were not given" not in str(report)
    assert not fxmomentum.inspect(torchvision.models.resnet18()).inputs_given


def test_kind_legend_and_gamma_note():
    model, x = wide_mlp()
    text = str(fxmomentum.inspect(model, x))
    legend = (
        "kind: pure = each block ends at its add, x + F(x), and f = F; generalized = "
        "shape-preserving operations follow the add (relu(x + F(x)), a post-norm), the block's "
        "output y is the next state and f(x) = y - x; mixed = both in one chain"
    )
    lines = text.splitlines()
    assert lines[lines.index(legend) - 1].split()[-1] == "converted"  # right under the table
    note = (
        "note: gamma > 0: the converted model computes a different function of the same weights "
        "(gamma 0 is the original), so pretrained weights need fine-tuning: train it as it is, "
        "or start from a small gamma and raise it during training with "
        "fxmomentum.GammaScheduler(model, start=0.1, end=0.9, steps=N)"
    )
    assert note in lines
    assert f"- {note}" in fxmomentum.inspect(model, x).format("markdown").splitlines()
    same = str(fxmomentum.inspect(model, x, gamma=0.0, use_backprop=True))
    assert "gamma > 0" not in same and legend in same
    # True: at 0.9 the converted model computes another function of the same weights.
    gm = fxmomentum.convert(model, 0.9).eval()
    with torch.no_grad():
        assert (gm(x) - model.eval()(x)).norm() > 0.05 * model(x).norm()
