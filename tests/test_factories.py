"""Factories called in a traced forward: random draws happen at run time, sizes stay traced.

torch.fx runs ``torch.rand([])`` (no traced argument) once, while it traces, and freezes the
value into the graph. Hugging Face's layer drop (``if torch.rand([]) < self.layerdrop``) would
then skip the same layers on every call, silently.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import max_rel_err, round_trips
from torch import fx, nn

import fxmomentum
from fxmomentum.capture import capture


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.dropout = nn.Linear(8, 8), nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dropout(self.linear(x)))


class LayerDrop(nn.Module):
    """Residual blocks, each skipped in training with probability ``layerdrop`` (drawn with
    torch or with Python's random), then noise drawn without a traced argument."""

    def __init__(self, layerdrop: float, python: bool = False, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.layerdrop, self.python = layerdrop, python

    def drops(self) -> bool:
        """Whether to skip the next layer (a draw only in training)."""
        if not self.training:
            return False
        draw = random.random() if self.python else torch.rand([])
        return draw < self.layerdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if not self.drops():
                x = x + block(x)
        return x + 0.01 * torch.randn(8)


def outputs(model: nn.Module, x: torch.Tensor, seeds=range(6)) -> list[torch.Tensor]:
    result = []
    for seed in seeds:
        torch.manual_seed(seed)
        random.seed(seed)
        with torch.no_grad():
            result.append(model(x))
    return result


@pytest.mark.parametrize("python", [False, True], ids=["torch.rand", "random.random"])
def test_layer_drop_is_drawn_at_every_call(python):
    torch.manual_seed(0)
    model = LayerDrop(0.5, python=python).train()
    x = torch.randn(3, 8)
    out, report = fxmomentum.convert(
        model, 0.0, use_backprop=True, example_inputs=(x,), return_report=True
    )
    out.train()
    # Which layers run is decided at run time: the forward that decides stays Python code,
    # so the converted model skips what the original skips, seed by seed.
    assert not isinstance(out, fx.GraphModule) and not report.chains
    expected = outputs(model, x)
    assert max_rel_err(outputs(out, x), expected) <= 1e-6
    assert len({tuple(e.flatten().tolist()) for e in expected}) > 1


@pytest.mark.parametrize("python", [False, True], ids=["torch.rand", "random.random"])
def test_the_report_says_why_a_loop_with_layer_drop_stays_python_code(python):
    report = fxmomentum.inspect(LayerDrop(0.5, python=python).train(), (torch.randn(3, 8),))
    (root,) = [leaf for leaf in report.leaves if leaf.path == ""]
    assert "branches on a random draw at test_factories.py:" in root.reason
    assert "(`return draw < self.layerdrop`)" not in root.reason  # the branch, not the draw
    assert "(`if not self.drops():`)" in root.reason
    (note,) = [n for n in report.notes if "a layer drop skips a layer so" in n]
    assert "config.layerdrop = 0.0" in note and "at gamma > 0 the velocity still moves x" in note


def test_in_eval_mode_the_layers_form_one_chain():
    # The draw is made only in training: converted in eval mode, the loop is one chain (the
    # graph checks the mode it was specialised to).
    torch.manual_seed(0)
    model = LayerDrop(0.5).eval()
    x = torch.randn(3, 8)
    out, report = fxmomentum.convert(
        model, 0.0, use_backprop=True, example_inputs=(x,), return_report=True
    )
    assert [c.num_blocks for c in report.chains] == [4]
    assert max_rel_err(outputs(out, x), outputs(model, x)) <= 1e-6


class Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn(3) + torch.zeros(x.shape[0], 1)


def test_noise_without_traced_arguments_is_not_frozen():
    model = Noisy()
    gm = capture(model).graph_module
    x = torch.zeros(2, 3)
    assert not torch.equal(gm(x), gm(x))
    torch.manual_seed(1)
    first = gm(x)
    torch.manual_seed(1)
    assert torch.equal(first, model(x))
    for copy in round_trips(gm).values():  # the graph's code names the draws
        torch.manual_seed(1)
        assert torch.equal(copy(x), first)
    # Only while tracing: afterwards the factories are torch's and Python's own.
    assert torch.randn is torch._C._VariableFunctions.randn
    assert torch.zeros is torch._C._VariableFunctions.zeros
    assert random.random.__self__ is random._inst


def test_a_draw_from_the_model_s_generator_is_made_at_run_time():
    class WithGenerator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.generator = torch.Generator().manual_seed(0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand(3, generator=self.generator)

    model = WithGenerator()
    gm = capture(model, torch.zeros(2, 3)).graph_module
    model.generator.manual_seed(5)
    expected = [model(torch.zeros(1, 3)) for _ in range(2)]
    model.generator.manual_seed(5)
    assert torch.equal(torch.cat([gm(torch.zeros(1, 3)) for _ in range(2)]), torch.cat(expected))


class Layer(nn.Module):
    """A residual block of its own: each layer is a chain when captured one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class LayerDropOfLayers(LayerDrop):
    def __init__(self, layerdrop: float, python: bool = False, depth: int = 6) -> None:
        super().__init__(layerdrop, python, depth)
        self.blocks = nn.ModuleList(Layer() for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if not self.drops():
                x = block(x)
        return x


@pytest.mark.parametrize("python", [False, True])
def test_which_layers_convert_does_not_hang_on_the_example_run_s_draws(python):
    # Each layer is captured as its parent called it on the example; a layer the example run
    # dropped is recorded from a run with another seed, so every seed at conversion converts
    # all six.
    x = torch.randn(3, 8)
    for seed in range(4):
        torch.manual_seed(seed)
        random.seed(seed)
        model = LayerDropOfLayers(0.5, python=python).train()
        states = torch.get_rng_state(), random.getstate()
        out, report = fxmomentum.convert(
            model, 0.0, use_backprop=True, example_inputs=(x,), return_report=True
        )
        # The random states are as they were, and the layers drop as the original's do.
        assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
        assert sorted(c.first for c in report.chains) == [f"blocks.{i}.block" for i in range(6)]
        assert max_rel_err(outputs(out, x), outputs(model, x)) <= 1e-6
