"""Modules that keep a tensor between calls (a cache), inside reversible chains.

timm's LeViT and EfficientFormer keep ``attention_biases[:, idxs]`` in ``attention_bias_cache``
in eval mode. A reversible block runs its forward without grad and is recomputed with grad in
backward: the recomputation would read the tensor the forward stored, and the biases would get
no gradient. Conversion finds such modules on the example inputs and runs their chains with
plain autograd in the modes where they keep tensors; without example inputs, the reversible
forward refuses a block that stores one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import grad_err
from torch import nn

import fxmomentum
from fxmomentum.engine import StatefulBlockError


class CachedScale(nn.Module):
    """LeViT's pattern: in eval mode, a tensor computed from a parameter is kept."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.biases = nn.Parameter(torch.randn(dim))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            bias = self.biases * 2
        else:
            key = str(x.device)
            if key not in self.cache:
                self.cache[key] = self.biases * 2
            bias = self.cache[key]
        return torch.tanh(x + bias)


class Net(nn.Module):
    def __init__(self, depth: int = 3, dim: int = 6) -> None:
        super().__init__()
        self.fs = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), CachedScale(dim))
                                for _ in range(depth))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for f in self.fs:
            x = x + f(x)
        return x


def grads(net: nn.Module, x: torch.Tensor, mode: str) -> dict[str, torch.Tensor | None]:
    getattr(net, mode)()
    net.zero_grad(set_to_none=True)
    net(x).sin().sum().backward()
    return {name: p.grad for name, p in net.named_parameters()}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradients_equal_backprop_s_in_both_modes(mode):
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    reversible, report = fxmomentum.convert(model, 0.9, example_inputs=(x,), return_report=True)
    backprop = fxmomentum.convert(model, 0.9, example_inputs=(x,), use_backprop=True)
    assert [c.num_blocks for c in report.chains] == [3]
    (note,) = [n for n in report.notes if "keeps a tensor between calls" in n]
    assert "`fs.0.1`" in note and "`cache`" in note and "in eval mode" in note
    chain = reversible.momentum_chain_0
    assert chain.plain_modes == ("eval",) and chain.strategy == "reversible"
    # (A second eval-mode step would read the first one's graph, freed: the model's own
    # backprop raises there, and so does the chain.)
    got, want = grads(reversible, x, mode), grads(backprop, x, mode)
    assert all(g is not None for g in want.values())
    assert [n for n, g in got.items() if g is None] == []
    assert grad_err([got[n] for n in want], list(want.values())) <= 1e-12


def test_conversion_leaves_no_cache_behind():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 6)
    converted = fxmomentum.convert(model, 0.9, example_inputs=(x,))
    assert all(not m.cache for m in converted.modules() if isinstance(m, CachedScale))


def test_without_example_inputs_a_block_that_stores_a_tensor_is_refused():
    torch.manual_seed(0)
    converted = fxmomentum.convert(Net(), 0.9)
    converted.eval()
    # Backward goes from the last block: its recomputation finds the forward's tensor.
    with pytest.raises(StatefulBlockError, match=r"`fs\.2\.1` \(CachedScale\) keeps a tensor"):
        converted(torch.randn(4, 6)).sum().backward()
    assert not converted.fs[2][1].cache  # put back as before the forward
    converted.train()
    converted(torch.randn(4, 6)).sum().backward()


class Recorder(nn.Module):
    """Stores what it saw at every call: a record, read by nobody, not a cache."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.f = nn.Linear(dim, dim)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach())
        return self.f(x)


def test_a_module_that_records_every_call_stays_reversible():
    torch.manual_seed(0)
    model = nn.Sequential(*[Recorder(6) for _ in range(3)])

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = model

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x

    x = torch.randn(4, 6)
    converted = fxmomentum.convert(Net(), 0.9, example_inputs=(x,), leaf_modules=[Recorder])
    assert converted.momentum_chain_0.plain_modes == ()
    assert all(not m.seen for m in converted.modules() if isinstance(m, Recorder))
    converted(x).sum().backward()
    # The forward's input, then the recomputation's, bit for bit.
    first, again = converted.layers[0].seen
    assert torch.equal(first, again)


def test_levit_eval_mode_gradients():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "levit_128s", pretrained=False, img_size=32, num_classes=4, depth=(1, 1, 1)
    ).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reversible = fxmomentum.convert(model, 0.9, example_inputs=(x,))
    backprop = fxmomentum.convert(model, 0.9, example_inputs=(x,), use_backprop=True)
    got, want = grads(reversible, x, "eval"), grads(backprop, x, "eval")
    biases = [n for n in want if n.endswith("attention_biases")]
    assert biases and all(got[n] is not None for n in biases)
    assert grad_err([got[n] for n in want], list(want.values())) <= 1e-10


def _cache_on_first_call(linear: nn.Linear) -> None:
    # A tensor computed without grad on the first call and read after: a cache, kept by a
    # forward pre-hook on a module whose own forward keeps nothing.
    if "doubled" not in linear.__dict__:
        linear.doubled = linear.weight * 2


@pytest.mark.parametrize("how", ["hook", "instance forward"])
def test_a_torch_module_made_to_keep_a_tensor_is_still_watched(how):
    # The snapshot before each block skips torch.nn modules whose forward keeps nothing; one
    # given a hook or a forward of its own is watched again.
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3)]
    linear = blocks[1][0]
    if how == "hook":
        linear.register_forward_pre_hook(lambda module, args: _cache_on_first_call(module))
    else:
        plain = linear.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            _cache_on_first_call(linear)
            return plain(x)

        linear.forward = forward
    net = fxmomentum.MomentumNet(blocks, 0.9, use_backprop=False)
    with pytest.raises(StatefulBlockError, match=r"keeps a tensor between calls in `doubled`"):
        net(torch.randn(4, 6)).sum().backward()
    assert "doubled" not in linear.__dict__  # put back as before the forward
