"""Shape-aware capture: models whose Python code looks at their tensors.

Plain torch.fx cannot trace ``b, n, d = x.shape`` followed by ``if n > ...``, ``torch.finfo``
of a dtype, or a buffer sliced to a traced length. With example inputs, capture traces such a
model with the example's values (fxmomentum.shaped): the graph keeps shapes symbolic where the
code allows and checks, at run time, every value that steered the code.
"""

from __future__ import annotations

import re

import archs
import pytest
import torch
import torch.nn.functional as F
from conftest import converted_pair, grad_err, max_rel_err, round_trips
from torch import fx, nn

import fxmomentum
from fxmomentum.capture import CaptureError, capture
from fxmomentum.capture.shaped import EXAMPLE, ShapedTracing


class Looks(nn.Module):
    """Blocks x + f(x) behind code that reads the input's shape, dtype and values."""

    def __init__(self, width: int = 8, depth: int = 3, max_len: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.Tanh())
            for _ in range(depth)
        )
        self.register_buffer("pos", torch.randn(1, max_len, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        if n > self.pos.shape[1]:
            raise ValueError("sequence longer than the positions")
        x = x + self.pos[:, :n].expand(b, -1, -1)
        eps = torch.finfo(x.dtype).eps
        for block in self.blocks:
            x = x + block(x)
        if mask is not None:
            x = x * mask
        return x * (1 + eps)


def original_twin(model: nn.Module, shape=(2, 5, 8)):
    """``model`` converted at gamma 0 with backprop (it computes what the original does),
    with an example of ``shape``; and the report."""
    example = (torch.randn(shape),)
    return fxmomentum.convert(model, 0.0, use_backprop=True, example_inputs=example,
                              return_report=True)  # fmt: skip


def test_plain_torch_fx_cannot_trace_it():
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(Looks())


def test_one_chain_and_the_original_outputs_for_other_shapes():
    torch.manual_seed(0)
    model = Looks()
    out, report = original_twin(model)
    assert isinstance(out, fx.GraphModule)
    # The adds are written in the forward that loops: a block is named by its add.
    assert [(c.first, c.num_blocks) for c in report.chains] == [("add_1", 3)]
    assert all(c.converted for c in report.chains)
    (note,) = [n for n in report.notes if "reads its inputs' values in Python" in n]
    assert note.startswith("Looks.forward") and "test_shaped.py:" in note
    # Batch size and length are not baked in: the graph reads them from its input.
    for shape in [(2, 5, 8), (3, 9, 8), (1, 16, 8)]:
        x = torch.randn(shape)
        assert max_rel_err([out(x)], [model(x)]) <= 1e-6, shape


def test_a_call_down_another_path_raises_naming_the_line():
    torch.manual_seed(0)
    model = Looks()
    out = fxmomentum.convert(model, 0.5, example_inputs=(torch.randn(2, 5, 8),))
    line = re.escape("(`if n > self.pos.shape[1]:`)")
    with pytest.raises(AssertionError, match=rf"test_shaped.py:\d+ {line}"):
        out(torch.randn(2, 20, 8))  # the original raises its ValueError on this path
    with pytest.raises(AssertionError, match=r"`dtype` is torch.float32"):
        out(torch.randn(2, 5, 8, dtype=torch.float64))


def test_reversible_gradients_equal_backprop():
    torch.manual_seed(0)
    model = Looks().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    reversible, backprop = converted_pair(model, (x,))
    grads = []
    for net in (reversible, backprop):
        y = torch.randn(3, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        y.requires_grad_(True)
        out = net(y)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([y.grad, *(p.grad for p in net.parameters())])
    assert grad_err(grads[0], grads[1]) <= 1e-8


def test_the_converted_graph_survives_pickling_with_its_checks():
    torch.manual_seed(0)
    model = Looks()
    out = fxmomentum.convert(model, 0.5, example_inputs=(torch.randn(2, 5, 8),))
    x = torch.randn(3, 6, 8)
    for copy in round_trips(out).values():
        assert torch.equal(copy(x), out(x))
        with pytest.raises(AssertionError, match=re.escape("if n > self.pos.shape")):
            copy(torch.randn(2, 20, 8))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class Clamps(nn.Module):
    """Python control flow on tensor values, not only on shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleList([Residual(), Residual()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.abs() > 10).any():
            x = x.clamp(-10, 10)
        for block in self.body:
            x = block(x)
        return x


def test_a_graph_that_checks_tensor_values_is_not_taken():
    # Shape-aware, the blocks would be one chain, but the graph would serve only inputs
    # within [-10, 10]: conversion descends (one chain per Residual) and the model's own
    # forward keeps serving every input.
    torch.manual_seed(0)
    model = Clamps()
    out, report = fxmomentum.convert(
        model, 0.0, use_backprop=True, example_inputs=(torch.zeros(2, 4),), return_report=True
    )
    assert type(out) is Clamps and [c.num_blocks for c in report.chains] == [1, 1]
    (note,) = [n for n in report.notes if "shape-aware trace" in n]
    assert "would find 1 chains of 2 blocks" in note and "test_shaped.py:" in note
    x = torch.full((2, 4), 50.0)
    assert torch.equal(out(x), model(x))


def test_capture_reports_a_check_on_tensor_values_as_such():
    model = Clamps()
    cap = capture(model, torch.zeros(2, 4), shape_aware=True)
    assert [c.data for c in cap.checks] == [True]
    (note,) = [n for n in cap.notes if "reads its inputs' values in Python" in n]
    assert "1 depend on tensor contents" in note
    gm = cap.graph_module
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))
    with pytest.raises(AssertionError, match="it is False"):
        gm(torch.full((2, 4), 50.0))


class _Tracer(ShapedTracing, fx.Tracer):
    pass


def test_without_examples_the_tracer_is_torch_fx_s():
    tracer = _Tracer()
    tracer.set_examples(None)
    with pytest.raises(fx.proxy.TraceError):
        tracer.trace(Looks())
    tracer.set_examples({"x": torch.randn(2, 5, 8), "mask": None})
    graph = tracer.trace(Looks(), {"mask": None})
    asserts = [n for n in graph.nodes if n.target is torch._assert]
    assert len(asserts) == len(tracer.checks) >= 2


class GradSwitch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1 and x.requires_grad:  # the example runs without grad
            x = x * 2
        return x + self.f(x)


def test_a_branch_on_requires_grad_is_not_decided_by_the_example():
    with pytest.raises(CaptureError, match=r"cannot trace GradSwitch\.forward"):
        capture(GradSwitch(), torch.zeros(2, 4), shape_aware=True)


def test_the_graph_keeps_no_example_values():
    # Each would hold an activation of the example's forward for as long as the model lives.
    cap = capture(Looks(), torch.randn(2, 5, 8), shape_aware=True)
    assert cap.checks
    assert not [n for n in cap.graph.nodes if EXAMPLE in n.meta]


class Sizes(nn.Module):
    """Sizes read from the input as separate factory arguments and as Python ints."""

    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = x + torch.ones(b, n, 1)  # separate sizes: torch's parser alone rejects proxies
        for block in self.blocks:
            x = x + block(x)
        # range() wants a true int: the example's, checked at run time.
        return x + sum(range(n))


def test_sizes_given_separately_stay_symbolic_and_a_range_is_checked():
    torch.manual_seed(0)
    model = Sizes()
    out, report = original_twin(model)
    assert [c.num_blocks for c in report.chains] == [3]
    # The batch size is free (torch.ones gets it from the graph); the length is checked.
    for shape in [(2, 5, 8), (4, 5, 8)]:
        x = torch.randn(shape)
        assert max_rel_err([out(x)], [model(x)]) <= 1e-6, shape
    assert any("the graph checks 1 of them" in note for note in report.notes), report.notes
    with pytest.raises(AssertionError, match=re.escape("(`return x + sum(range(n))`)")):
        out(torch.randn(2, 6, 8))


def test_plain_tracing_takes_separate_traced_sizes():
    class Ones(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.zeros(x.shape[0], 1)

    cap = capture(Ones())  # no example inputs: plain torch.fx
    assert not cap.checks
    for rows in (2, 7):
        assert cap.graph_module(torch.ones(rows, 3)).shape == (rows, 3)
    # The factories are torch's own again after tracing.
    with pytest.raises(TypeError):
        torch.zeros(fx.Proxy(fx.Graph().placeholder("n")), 1)


class ValueGate(nn.Module):
    """A root that branches on tensor values (not capturable) around a child that needs the
    example's shapes (``Looks``): the child is captured shape-aware, its loop one chain."""

    def __init__(self, body: nn.Module | None = None) -> None:
        super().__init__()
        self.body = Looks() if body is None else body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 100:
            return x
        return self.body(x)


def test_a_descended_submodule_is_captured_shape_aware():
    torch.manual_seed(0)
    model = ValueGate()
    out, report = original_twin(model)
    assert isinstance(out, ValueGate) and isinstance(out.body, fx.GraphModule)
    assert [(c.first, c.num_blocks) for c in report.chains] == [("body.add_1", 3)]
    assert any(n.startswith("`body`: Looks.forward cannot be traced by torch.fx alone") and
               "traced shape-aware" in n for n in report.notes)  # fmt: skip
    for shape in [(2, 5, 8), (3, 9, 8)]:
        x = torch.randn(shape)
        assert max_rel_err([out(x)], [model(x)]) <= 1e-6, shape
    with pytest.raises(AssertionError, match=re.escape("(`if n > self.pos.shape[1]:`)")):
        out(torch.randn(2, 20, 8))


class Wraps(nn.Module):
    """A forward torch.fx traces around a child it cannot (``Looks``): the child becomes a
    leaf of the graph, then is captured shape-aware on the call the graph makes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Looks()
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_a_leaf_that_failed_to_trace_is_captured_shape_aware():
    torch.manual_seed(0)
    model = Wraps()
    out, report = original_twin(model)
    assert isinstance(out, fx.GraphModule) and isinstance(out.body, fx.GraphModule)
    assert [(c.first, c.num_blocks) for c in report.chains] == [("body.add_1", 3)]
    assert not [leaf for leaf in report.leaves if leaf.path == "body"]
    for shape in [(2, 5, 8), (3, 9, 8)]:
        x = torch.randn(shape)
        assert max_rel_err([out(x)], [model(x)]) <= 1e-6, shape


class DropLooks(Looks):
    """``Looks`` with dropout that reads ``self.training`` as an argument (a flag in the
    graph)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.dropout(super().forward(x, mask), 0.5, self.training)


class Holder(nn.Module):
    """Traces (its child as a leaf) but holds no chain of its own: it stays Python code."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = DropLooks(), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_a_converted_child_keeps_its_mode_flag_when_its_parent_is_left_alone():
    torch.manual_seed(0)
    model = ValueGate(Holder())
    out, report = original_twin(model)
    assert not isinstance(out.body, fx.GraphModule)
    assert isinstance(out.body.body, fx.GraphModule)
    assert [(c.first, c.num_blocks) for c in report.chains] == [("body.body.add_1", 3)]
    x = torch.randn(3, 6, 8)
    for mode in ("train", "eval"):  # the dropout reads the mode through its flag
        getattr(out, mode)()
        getattr(model, mode)()
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        assert max_rel_err([out(x)], [expected]) <= 1e-6, mode


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


class Scales(nn.Module):
    """Needs the example to trace (``int`` of a size), around a child that traces alone."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = Stack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(x) / int(x.shape[1])


def test_a_shape_aware_capture_that_joins_nothing_is_not_taken():
    # Scales' chain lies in one child, which descending captures as well, without the check
    # that would tie Scales' graph to the example's length.
    torch.manual_seed(0)
    model = ValueGate(Scales())
    out, report = original_twin(model)
    assert not isinstance(out.body, fx.GraphModule)
    assert [(c.first, c.num_blocks) for c in report.chains] == [("body.stack.blocks.0", 3)]
    x = torch.randn(2, 7, 8)
    assert max_rel_err([out(x)], [model(x)]) <= 1e-6


class ShapedLayerDrop(nn.Module):
    """A branch on ``x.dim()`` (plain torch.fx fails), and in training a draw per layer."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(archs.mlp(8) for _ in range(3))

    def forward(self, x):
        shape = x.shape
        if x.dim() == 3:
            x = x.flatten(0, 1)
        for block in self.blocks:
            if self.training and torch.rand([]) < 0.5:
                continue
            x = x + block(x)
        return x.reshape(shape)


def test_a_shape_aware_root_with_a_graph_per_mode_keeps_the_mode_that_joins_its_chain():
    torch.manual_seed(0)
    model = ShapedLayerDrop().eval()
    x = torch.randn(2, 5, 8)
    out, report = fxmomentum.convert(
        model, 0.0, use_backprop=True, example_inputs=x, return_report=True
    )
    # Its layers, one by one, hold no chain: the eval graph's loop is the only one.
    assert isinstance(out, fx.GraphModule)
    assert [c.num_blocks for c in report.chains] == [3]
    assert any("serves the mode it was converted in" in n for n in report.notes)
    y = torch.randn(3, 4, 8)
    assert max_rel_err([out(y)], [model(y)]) <= 1e-6
    with pytest.raises(AssertionError, match="captured in eval mode"):
        out.train()(y)


class LengthOfAFlag(nn.Module):
    """Hugging Face's ``selected_hidden_states``: ``list(flag)`` where a list may be given."""

    def forward(self, x: torch.Tensor, selected) -> torch.Tensor:
        return x * len(list(selected))


def test_a_value_taken_for_a_list_is_untraceable_not_a_crash():
    class Tracer(ShapedTracing, fx.Tracer):
        pass

    tracer = Tracer()
    tracer.set_examples({"x": torch.ones(2), "selected": True})
    with pytest.raises(fx.proxy.TraceError, match="example value is a bool"):
        tracer.trace(LengthOfAFlag())
