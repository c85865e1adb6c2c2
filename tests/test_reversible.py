"""The reversible engine against plain backprop: gradients, exact reversal, state, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import max_rel_err, rel_err
from torch import nn

from fxmomentum import MomentumChain, MomentumNet, NumericalError
from fxmomentum.engine import kernels


def mlp_blocks(depth: int, width: int = 32, hidden: int = 16, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [
        nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, width))
        for _ in range(depth)
    ]


def grads_of(net: nn.Module, x: torch.Tensor, w: torch.Tensor, *args) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    net.zero_grad(set_to_none=True)
    (net(x, *args) * w).sum().backward()
    return [x.grad] + [p.grad for p in net.parameters()]


def pair(blocks, gamma, dtype=torch.float32, **kw):
    """The same blocks in backprop and reversible mode."""
    bp = MomentumNet(blocks, gamma, use_backprop=True, **kw).to(dtype)
    rev = MomentumNet(blocks, gamma, use_backprop=False, **kw).to(dtype)
    return bp, rev


def inputs(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x.to(dtype), w.to(dtype)


@pytest.mark.parametrize("depth", [10, 100, 1000])
@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_float32_gradients_as_accurate_as_backprop(depth, gamma):
    ref_net = MomentumNet(mlp_blocks(depth), gamma, use_backprop=True).double()
    bp, rev = pair(mlp_blocks(depth), gamma)
    x, w = inputs(16, 32, dtype=torch.float64)
    ref = grads_of(ref_net, x, w)
    err_bp = max_rel_err(grads_of(bp, x.float(), w.float()), ref)
    err_rev = max_rel_err(grads_of(rev, x.float(), w.float()), ref)
    assert err_rev <= 2 * err_bp, (err_rev, err_bp)


def test_float64_gradients_match_backprop():
    bp, rev = pair(mlp_blocks(20), 0.9, dtype=torch.float64)
    x, w = inputs(16, 32, dtype=torch.float64)
    assert max_rel_err(grads_of(rev, x, w), grads_of(bp, x, w)) < 1e-11


class Recorder(nn.Module):
    """Records every input it sees (forward and recomputation)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_rebuilt_activations_are_bitwise_the_forward_ones(gamma):
    blocks = [Recorder(b) for b in mlp_blocks(200)]
    net = MomentumNet(blocks, gamma, use_backprop=False)
    x, w = inputs(8, 32)
    x.requires_grad_(True)
    (net(x * 1000) * w).sum().backward()  # large values: a coarse grid from the start
    for b in blocks:
        forward_input, rebuilt_input = b.seen
        assert torch.equal(forward_input, rebuilt_input)


class _Scale(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x):
        return self.c * x


def test_grid_changes_both_ways_rebuild_exactly():
    # Values that grow block after block, then shrink: the grid is coarsened and refined. The
    # activation is large enough for the compiled kernels (kernels.COMPILE_MIN_NUMEL).
    torch.manual_seed(0)
    scales = [3.0] * 12 + [-1.0] * 30
    blocks = [Recorder(_Scale(c)) for c in scales]
    rev = MomentumNet(blocks, 0.5, use_backprop=False)
    bp = MomentumNet([b.inner for b in blocks], 0.5, use_backprop=True)
    x = torch.randn(64, kernels.COMPILE_MIN_NUMEL // 64)
    w = torch.randn_like(x)
    xr = x.clone().requires_grad_(True)
    y = rev(xr)
    shifts = {rec.shift for rec in y.grad_fn.run.records}
    assert min(shifts) < 0 < max(shifts), shifts
    (y * w).sum().backward()
    for b in blocks:
        forward_input, rebuilt_input = b.seen
        assert torch.equal(forward_input, rebuilt_input)
    g_rev = [xr.grad, *(b.inner.c.grad.clone() for b in blocks)]
    rev.zero_grad()
    xb = x.clone().requires_grad_(True)
    (bp(xb) * w).sum().backward()
    g_bp = [xb.grad, *(b.inner.c.grad for b in blocks)]
    assert max_rel_err(g_rev, g_bp) < 1e-4


def test_a_step_on_too_fine_a_grid_is_reversed_and_taken_again(monkeypatch):
    # A step is taken before f is measured, on the grid x and v chose. A block whose f is
    # far larger than x needs a coarser grid: that step is reversed exactly (the kernels
    # clamp f to a bound within which they are exact) and taken again.
    from fxmomentum.engine.run import ChainRun

    reversed_at = []
    unstep = ChainRun._unstep_forward

    def spy(self, *args):
        reversed_at.append(len(self.records))
        return unstep(self, *args)

    monkeypatch.setattr(ChainRun, "_unstep_forward", spy)
    scales = [0.5, 1e9, 0.5, -1e-9, 0.5]  # block 1: f on the first grid beyond the clamp
    blocks = [Recorder(_Scale(c)) for c in scales]
    rev = MomentumNet(blocks, 0.9, use_backprop=False)
    bp = MomentumNet([b.inner for b in blocks], 0.9, use_backprop=True)
    x, w = inputs(64, 1024)
    g_rev = grads_of(rev, x, w)
    assert reversed_at == [1], reversed_at
    for b in blocks:
        forward_input, rebuilt_input = b.seen[-2:]
        assert torch.equal(forward_input, rebuilt_input)
    assert max_rel_err(g_rev, grads_of(bp, x, w)) < 1e-4


def test_gradient_reaching_a_block_output_used_twice(monkeypatch):
    # Each block's backward computes the previous block's grad_f for the input gradient it
    # returns; where the output of a block is used outside the chain too, the gradient
    # autograd hands on is another tensor, and grad_f is computed from that one.
    from fxmomentum.engine import ChainSpec, run_block, start_run

    blocks = mlp_blocks(4)
    spec = ChainSpec(blocks, [True] * 4, gamma_num=58982)
    x, w = inputs(8, 32)

    def loss(reversible: bool) -> list[torch.Tensor]:
        xx = x.clone().requires_grad_(True)
        for b in blocks:
            b.zero_grad(set_to_none=True)
        if reversible:
            run = start_run(spec, xx)
            h, taps = xx, []
            for t in range(4):
                h = run_block(run, t, h, None, spec_arguments)
                taps.append(h)
        else:
            h, v, taps = xx, None, []
            for t in range(4):
                h, v = spec.plain_step(t, h, v, (), {})
                taps.append(h)
        ((h * w).sum() + (taps[1] ** 2).sum()).backward()
        return [xx.grad] + [p.grad for b in blocks for p in b.parameters()]

    from fxmomentum.engine import BlockArguments
    from fxmomentum.engine import run as run_module

    computed_here = []
    next_grad_f = run_module.next_grad_f_

    def spy(*args):
        computed_here.append(1)
        return next_grad_f(*args)

    monkeypatch.setattr(run_module, "next_grad_f_", spy)
    spec_arguments = BlockArguments((), {})
    assert max_rel_err(loss(True), loss(False)) < 1e-4
    # Block 1 only (its output is used twice); the last block's grad_f is (1 - gamma) times
    # the gradient from outside.
    assert len(computed_here) == 1


def test_state_kept_until_backward_is_compact():
    net = MomentumNet(mlp_blocks(16, width=64), 0.9, use_backprop=False)
    x, _ = inputs(256, 64)
    y = net(x.requires_grad_(True))
    per_element = y.grad_fn.run.kept_nbytes / y.numel()
    assert per_element <= 12, per_element
    # The output is held, not copied: the exact x costs nothing beyond it.
    assert y.grad_fn.run.output.data_ptr() == y.data_ptr()


def test_output_modified_in_place_after_the_chain_raises():
    net = MomentumNet(mlp_blocks(3), 0.9, use_backprop=False)
    x, _ = inputs(4, 32)
    y = net(x.requires_grad_(True))
    z = y.mul_(2)  # in place on the chain's output, which the chain rebuilds its state from
    with pytest.raises(RuntimeError, match="modified by an in-place operation"):
        z.sum().backward()


def test_gradient_handed_to_two_inputs_is_not_overwritten():
    # autograd gives x and a full-shape bias of ``x + bias`` one gradient tensor; adding the
    # chain's own terms into x's gradient in place must not change the bias's.
    class AddBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            return torch.tanh(x) + self.bias

    torch.manual_seed(0)
    blocks = [AddBias() for _ in range(3)]
    bp = MomentumNet(blocks, 0.9, use_backprop=True, is_residual=False).double()
    rev = MomentumNet(blocks, 0.9, use_backprop=False, is_residual=False).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    w = torch.randn(4, 8, dtype=torch.float64)
    grads = []
    for net in (bp, rev):
        xx = x.clone().requires_grad_(True)
        net.zero_grad()
        (net(xx) * w).sum().backward()
        grads.append([xx.grad, *(b.bias.grad.clone() for b in blocks)])
    assert max_rel_err(grads[1], grads[0]) < 1e-10


def test_lost_bits_grow_as_log2_of_inverse_gamma():
    net = MomentumNet(mlp_blocks(512), 0.5, use_backprop=False)
    x, _ = inputs(16, 32)
    y = net(x.requires_grad_(True))
    per_element = y.grad_fn.run.kept_nbytes / y.numel()
    assert per_element <= 12 + 512 / 8, per_element


def test_extra_arguments_with_and_without_grad():
    class Cond(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)

        def forward(self, x, emb, mask, scale: float):
            return torch.tanh(self.lin(x) + emb) * mask * scale

    torch.manual_seed(0)
    blocks = [Cond() for _ in range(6)]
    bp, rev = pair(blocks, 0.9, dtype=torch.float64)
    x, w = inputs(4, 32, dtype=torch.float64)
    emb = torch.randn(4, 32, dtype=torch.float64)
    mask = (torch.rand(4, 32) > 0.3).double()
    results = []
    for net in (bp, rev):
        e = emb.clone().requires_grad_(True)
        grads = grads_of(net, x, w, e, mask, 0.5)
        results.append([*grads, e.grad])
    assert results[1][-1] is not None
    assert max_rel_err(results[1], results[0]) < 1e-8


def test_init_function_and_is_residual_false():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(5)]
    init = nn.Linear(32, 32)
    bp, rev = pair(
        blocks, 0.8, dtype=torch.float64, init_speed=True, init_function=init, is_residual=False
    )
    x, w = inputs(4, 32, dtype=torch.float64)
    g_bp, g_rev = grads_of(bp, x, w), grads_of(rev, x, w)
    assert init.weight.grad is not None
    assert max_rel_err(g_rev, g_bp) < 1e-8


def test_tied_weights_accumulate_gradients():
    block = mlp_blocks(1)[0]
    bp, rev = pair([block] * 8, 0.9, dtype=torch.float64)
    assert len(list(rev.parameters())) == 4
    x, w = inputs(16, 32, dtype=torch.float64)
    assert max_rel_err(grads_of(rev, x, w), grads_of(bp, x, w)) < 1e-8


def test_dropout_replays_the_forward_random_numbers():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(32, 32), nn.Dropout(0.3), nn.Tanh()) for _ in range(6)]
    blocks.insert(3, nn.Sequential(nn.Linear(32, 32), nn.Tanh()))  # draws no random numbers
    bp, rev = pair(blocks, 0.9, dtype=torch.float64)
    x, w = inputs(8, 32, dtype=torch.float64)
    torch.manual_seed(123)
    g_bp = grads_of(bp, x, w)
    after_bp = torch.rand(3)
    torch.manual_seed(123)
    g_rev = grads_of(rev, x, w)
    after_rev = torch.rand(3)
    assert max_rel_err(g_rev, g_bp) < 1e-8
    # The recomputation leaves the global generator where the forward left it.
    assert torch.equal(after_bp, after_rev)


def test_batchnorm_buffers_updated_once_per_step():
    def make():
        torch.manual_seed(0)
        return [nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Tanh()) for _ in range(4)]

    states = []
    for use_backprop in (True, False):
        net = MomentumNet(make(), 0.9, use_backprop=use_backprop).double()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(3):
            x, w = inputs(32, 16, dtype=torch.float64, seed=step)
            opt.zero_grad()
            (net(x.requires_grad_(True)) * w).sum().backward()
            opt.step()
        states.append(net.state_dict())
    bp_state, rev_state = states
    assert rev_state["blocks.0.1.num_batches_tracked"].item() == 3
    for key in bp_state:
        assert rel_err(rev_state[key], bp_state[key]) < 1e-8, key


def test_large_activations_are_exact_not_overflowed():
    # The official library's int64 state overflows here and its outputs are 26% off.
    ref = MomentumNet(mlp_blocks(10), 0.9, use_backprop=True).double()
    bp, rev = pair(mlp_blocks(10), 0.9)
    x, w = inputs(16, 32, dtype=torch.float64)
    x = x * 1e4
    y_ref = ref(x)
    assert rel_err(rev(x.float().requires_grad_(True)), y_ref) <= 2 * rel_err(bp(x.float()), y_ref)
    g_ref = grads_of(ref, x, w)
    err_rev = max_rel_err(grads_of(rev, x.float(), w.float()), g_ref)
    err_bp = max_rel_err(grads_of(bp, x.float(), w.float()), g_ref)
    assert err_rev <= 2 * err_bp, (err_rev, err_bp)


def test_non_finite_values_raise_naming_the_block():
    class Explode(nn.Module):
        def forward(self, x):
            return x * float("inf")

    blocks = [*mlp_blocks(3), Explode()]
    net = MomentumNet(blocks, 0.9, use_backprop=False)
    x, _ = inputs(4, 32)
    with pytest.raises(NumericalError, match="block 3"):
        net(x.requires_grad_(True))


def test_values_beyond_float_range_raise():
    x, _ = inputs(4, 32)
    net = MomentumNet(mlp_blocks(2), 0.9, use_backprop=False)
    with pytest.raises(NumericalError, match="not finite"):
        net((x * float("nan")).requires_grad_(True))


@pytest.mark.parametrize("gamma", [-0.5, 1.01, float("nan")])
def test_gamma_outside_unit_interval_is_refused(gamma):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MomentumNet(mlp_blocks(2), gamma)


def test_gamma_zero_reversible_is_refused_at_construction_and_in_setter():
    with pytest.raises(ValueError, match="divides by gamma"):
        MomentumNet(mlp_blocks(2), 0.0, use_backprop=False)
    net = MomentumNet(mlp_blocks(2), 0.5, use_backprop=False)
    with pytest.raises(ValueError, match="divides by gamma"):
        net.gamma = 0.0
    assert net.gamma == 0.5


def test_gamma_zero_backprop_is_the_plain_resnet():
    blocks = mlp_blocks(5)
    net = MomentumNet(blocks, 0.0, use_backprop=True)
    x, _ = inputs(4, 32)
    expected = x
    for b in blocks:
        expected = expected + b(expected)
    assert torch.equal(net(x), expected)


def test_double_backward_raises_clearly():
    net = MomentumNet(mlp_blocks(3), 0.9, use_backprop=False)
    x, _ = inputs(4, 32)
    x.requires_grad_(True)
    y = net(x).pow(2).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y, x, create_graph=True)


def test_nondeterministic_block_is_detected():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.lin(x) * (1.0 + 1e-3 * self.calls)

    net = MomentumNet([*mlp_blocks(2), Noisy(), *mlp_blocks(2, seed=1)], 0.9, use_backprop=False)
    x, _ = inputs(4, 32)
    with pytest.raises(RuntimeError, match="not deterministic"):
        net(x.requires_grad_(True)).sum().backward()


@pytest.mark.parametrize(
    ("position", "message"),
    [(2, "rebuild the input of block 1 .* not deterministic"), (0, "rebuild the chain's input")],
)
@pytest.mark.parametrize("delta", [1e-3, 1e-7])
def test_nondeterminism_in_one_element_is_detected(delta, position, message):
    # Elementwise blocks keep the difference in element 5. A block's check covers the whole
    # velocity it rebuilt; the first block's rebuilt state meets the check of the chain's start.
    class OneElement(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.5))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = torch.tanh(x) * self.scale
            if self.calls > 1:
                out = out.clone()
                out[0, 5] += delta
            return out

    blocks = [nn.Tanh() for _ in range(4)]
    blocks.insert(position, OneElement())
    net = MomentumNet(blocks, 0.9)
    net.use_backprop = False
    x, _ = inputs(4, 32)
    with pytest.raises(RuntimeError, match=message):
        net(x.requires_grad_(True)).sum().backward()


def test_no_grad_takes_the_plain_path(monkeypatch):
    import fxmomentum.engine.chain as chain_module

    net = MomentumNet(mlp_blocks(4), 0.9, use_backprop=False)
    x, _ = inputs(4, 32)
    y_rev = net(x.requires_grad_(True))

    def forbidden(*args, **kwargs):
        raise AssertionError("the reversible function ran under no_grad")

    monkeypatch.setattr(chain_module, "reversible_chain", forbidden)
    with torch.no_grad():
        y_plain = net(x)
    assert rel_err(y_plain, y_rev) < 1e-6


def test_autocast_recomputes_under_the_forward_autocast_state():
    blocks = [Recorder(b) for b in mlp_blocks(6)]
    net = MomentumNet(blocks, 0.9, use_backprop=False)
    x, w = inputs(8, 32)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    (y * w).sum().backward()  # backward outside autocast: the recomputation must restore it
    assert y.dtype == torch.float32
    # Recorder stores the float input; bitwise equality of the rebuilt inputs means the
    # recomputed f (in bfloat16) matched the forward's.
    for b in blocks:
        assert torch.equal(b.seen[0], b.seen[1])
    bp = MomentumNet([b.inner for b in blocks], 0.9, use_backprop=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g_bp = grads_of(bp, x, w)
    assert rel_err(x.grad, g_bp[0]) < 3e-2


def test_half_precision_chain_trains():
    bp, rev = pair(mlp_blocks(6), 0.9, dtype=torch.bfloat16)
    x, w = inputs(8, 32, dtype=torch.bfloat16)
    g_rev, g_bp = grads_of(rev, x, w), grads_of(bp, x, w)
    assert all(g.dtype == torch.bfloat16 for g in g_rev)
    assert max_rel_err(g_rev, g_bp) < 5e-2


def test_second_backward_raises():
    net = MomentumNet(mlp_blocks(2), 0.9, use_backprop=False)
    x, _ = inputs(4, 32)
    y = net(x.requires_grad_(True)).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()


def test_gamma_one_is_refused_in_both_modes():
    # gamma = 1: f never reaches v, so no block has an effect or gets a gradient.
    for use_backprop in (True, False):
        with pytest.raises(ValueError, match="gamma = 1"):
            MomentumChain(mlp_blocks(2), 1.0, use_backprop=use_backprop)
        chain = MomentumChain(mlp_blocks(2), 0.5, use_backprop=use_backprop)
        with pytest.raises(ValueError, match="below 1"):
            chain.gamma = 0.999999
        assert chain.gamma == 0.5


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_momentum_chain_context_and_v0(gamma):
    torch.manual_seed(0)
    blocks = mlp_blocks(4)
    bp = MomentumChain(blocks, gamma, use_backprop=True).double()
    rev = MomentumChain(blocks, gamma, use_backprop=False).double()
    x, w = inputs(4, 32, dtype=torch.float64)
    outs = []
    for chain in (bp, rev):
        v0 = (0.1 * x).clone().requires_grad_(True)
        xx = x.clone().requires_grad_(True)
        (chain(xx, v0=v0) * w).sum().backward()
        outs.append([xx.grad, v0.grad])
    assert max_rel_err(outs[1], outs[0]) < 1e-8


@pytest.mark.parametrize("norm_first", [False, True])
def test_eval_mode_attention_with_grad_rebuilds_exactly(norm_first):
    # In eval mode torch's attention takes a fused fast path whenever grad is off, which it is
    # inside the chain's forward but not in the recomputation: the engine must keep both on
    # the same path, or the rebuilt inputs differ from the forward's bits.
    torch.manual_seed(0)
    layers = [
        nn.TransformerEncoderLayer(
            32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first
        ).double()
        for _ in range(3)
    ]
    bp, rev = pair(layers, 0.9, torch.float64, is_residual=False)
    bp.eval(), rev.eval()
    x, w = inputs(2, 5, 32, dtype=torch.float64)
    assert torch.backends.mha.get_fastpath_enabled()
    g_rev, g_bp = grads_of(rev, x, w), grads_of(bp, x, w)
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting is left as it was
    assert max_rel_err(g_rev, g_bp) < 1e-9


def test_parameter_gradients_go_into_grad_as_they_are_made():
    blocks = mlp_blocks(6)
    bp, rev = pair(blocks, 0.9, dtype=torch.float64)
    x, w = inputs(16, 32, dtype=torch.float64)
    returned = []
    y = rev(x.clone().requires_grad_(True))
    y.grad_fn.register_hook(lambda grad_inputs, _: returned.append(grad_inputs))
    rev.zero_grad(set_to_none=True)
    (y * w).sum().backward()
    # The last block's node hands back x's gradient only: its parameters' are in .grad already.
    n_params = len(list(blocks[-1].parameters()))
    assert returned[0][-n_params:] == (None,) * n_params
    got = [p.grad for p in rev.parameters()]
    assert max_rel_err(got, grads_of(bp, x, w)[1:]) < 1e-11
    # torch.autograd.grad wants them returned, and leaves .grad alone.
    rev.zero_grad(set_to_none=True)
    grads = torch.autograd.grad((rev(x) * w).sum(), list(rev.parameters()))
    assert all(p.grad is None for p in rev.parameters())
    assert max_rel_err(list(grads), grads_of(bp, x, w)[1:]) < 1e-11


def test_parameter_gradients_are_not_all_held_at_once():
    # In a fresh process: each block holds 4 MiB of weights. Accumulated as made, about one
    # 1 MiB gradient is alive at a time; returned from the block's node, all four are.
    from fxmomentum.tools.measure import measure_memory

    here = Path(__file__).resolve().parent
    peak = {
        hooked: measure_memory(
            str(hooked), "archs:wide_weight_chain", {"hooked": hooked}, extra_paths=[here]
        )["peak_bytes"]
        for hooked in (False, True)
    }
    assert peak[True] >= 3 * 2**20, peak  # about 4 MiB, less what RSS pages round away
    assert peak[False] <= 0.5 * peak[True], peak


def test_state_is_dropped_once_the_chain_has_gone_backward():
    net = MomentumNet(mlp_blocks(4), 0.9, use_backprop=False)
    x, _ = inputs(16, 32)
    y = net(x)
    y.sum().backward()
    # y still holds the graph, and the graph the run: chains before this one in a model go
    # backward after it, and its state would be alive during their recomputation.
    run = y.grad_fn.run
    assert run.velocity is None and run.x_residual is None and run.grad_f is None
    assert run.bit_stack is None
    assert not run.records


def test_a_chain_whose_input_holds_negative_zeros_trains():
    # Dropout's zeros of negative inputs are -0.0: the input put on the grid must count them
    # as the rebuilt input does (+0), or backward reports it could not rebuild the input.
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(4)]
    chain = MomentumChain(blocks, 0.9)
    x = torch.nn.functional.dropout(torch.randn(8, 16), 0.5).requires_grad_()
    x.data[0, :4] = -0.0
    assert torch.signbit(x[x == 0]).any()
    grads = torch.autograd.grad(chain(x).square().sum(), [x, *chain.parameters()])
    reference = MomentumChain(blocks, 0.9, use_backprop=True)
    expected = torch.autograd.grad(reference(x).square().sum(), [x, *chain.parameters()])
    assert max(rel_err(a, b) for a, b in zip(grads, expected, strict=True)) < 1e-4


class _Stack(nn.Module):
    """Residual layers whose branch is a linear layer, then ``then`` (a function)."""

    def __init__(self, then, depth: int = 4, width: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.then = then

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + self.then(layer(x), self.training)
        return x


@pytest.mark.parametrize(
    ("then", "draws"),
    [
        (lambda y, training: torch.relu(y), False),
        (lambda y, training: torch.nn.functional.dropout(y, 0.3, training), True),
    ],
    ids=["relu", "functional dropout"],
)
def test_only_blocks_that_may_draw_note_the_random_state(then, draws, monkeypatch):
    # Noting the generator's state costs two copies of it and a comparison per block and call:
    # a block made of torch modules and functions that draw nothing skips it; a graph block
    # calling anything else (here functional dropout) notes it, and replays its draws.
    import fxmomentum

    torch.manual_seed(0)
    model = _Stack(then).double()
    x = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    rev = fxmomentum.convert(model, 0.9)
    plain = fxmomentum.convert(model, 0.9, use_backprop=True)
    noted = []
    real = torch.get_rng_state
    monkeypatch.setattr(torch, "get_rng_state", lambda: noted.append(1) or real())
    grads = []
    for net in (rev, plain):
        torch.manual_seed(5)
        net.zero_grad()
        x.grad = None
        (net(x) * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
        grads.append([x.grad.clone(), *(p.grad.clone() for p in net.parameters())])
        if net is rev:
            assert bool(noted) == draws
    assert max_rel_err(grads[0], grads[1]) < 1e-8
