"""Tests of fxmomentum.rewrite: the converted GraphModule, its state_dict, copies and pickles."""

from __future__ import annotations

import copy
import operator
import subprocess
import sys
import textwrap

import archs
import torch
import torchvision
from conftest import max_rel_err
from torch import fx, nn

import fxmomentum
from fxmomentum import MomentumChain
from fxmomentum.surgery.match import find_chains
from fxmomentum.surgery.rewrite import block_graph, rewrite, top_graph


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)


def chains_of(gm: nn.Module) -> list[tuple[str, MomentumChain]]:
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, MomentumChain)]


def test_state_dict_keys_and_strict_loading_both_ways():
    model, x = resnet18()
    gm = fxmomentum.convert(model, 0.9, example_inputs=x)
    assert list(gm.state_dict()) == list(model.state_dict())  # same keys, same order
    other = torchvision.models.resnet18()
    gm.load_state_dict(other.state_dict(), strict=True)
    pairs = zip(gm.state_dict().values(), other.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    fresh = torchvision.models.resnet18()
    fresh.load_state_dict(gm.state_dict(), strict=True)
    assert torch.equal(fresh.layer3[1].conv2.weight, other.layer3[1].conv2.weight)


def test_one_call_per_chain_and_original_submodules():
    model, x = resnet18()
    gm = fxmomentum.convert(model, 0.9, example_inputs=x)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and "momentum_chain" in n.target]
    assert [n.target for n in calls] == [f"momentum_chain_{i}" for i in range(4)]
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert "layer1.0.conv1" not in targets and "layer2.0.conv1" in targets  # projection stays
    assert "momentum_chain_0 = self.momentum_chain_0(maxpool)" in gm.code
    # The blocks call the converted model's own submodules: parameters are shared, not copied.
    params = {id(p) for p in gm.parameters()}
    assert len(params) == len(list(model.parameters()))
    for _, chain in chains_of(gm):
        for block in chain.block_list():
            assert isinstance(block, fx.GraphModule)
            assert {id(p) for p in block.parameters()} <= params
    block = gm.momentum_chain_0.block_list()[1]
    assert block.get_submodule("layer1.1.conv1") is gm.get_submodule("layer1.1.conv1")
    assert gm.momentum_chain_0.names == ["layer1.0", "layer1.1"]
    assert gm.momentum_chain_0.residual == [False, False]  # generalized: relu(x + F(x))
    assert "def forward(self, x):" in block.code
    gm.graph.lint()
    # torch's containers keep their class; modules only traced through become holders.
    assert isinstance(gm.layer1, nn.Sequential) and type(gm.layer1[0]) is nn.Module
    assert isinstance(gm.layer1[0].conv1, nn.Conv2d)
    # The original is untouched.
    assert isinstance(model.layer1[0], torchvision.models.resnet.BasicBlock)
    assert not any(isinstance(m, MomentumChain) for m in model.modules())


def test_context_is_passed_to_the_chain_and_read_by_each_block():
    model = archs.PreNormTransformer(depth=2, use_mask=True).eval()
    x, bias = torch.randn(2, 5, 6), torch.randn(2, 5, 5)
    gm = fxmomentum.convert(model, 0.0, use_backprop=True, example_inputs=(x, bias))
    ((name, chain),) = chains_of(gm)
    call = next(n for n in gm.graph.nodes if n.target == name)
    args = [a.name for a in call.args]
    assert args[0] == "embed" and {"layers_0_layer_scale", "unsqueeze"} <= set(args)
    code = chain.block_list()[0].code
    assert "def forward(self, x, *context):" in code and "layers_0_layer_scale = " in code
    with torch.no_grad():
        assert max_rel_err([gm(x, bias)], [model(x, bias)]) < 1e-6


def test_to_half_and_double_follow_the_shared_modules():
    model = archs.PreNormTransformer(depth=2).eval()
    x, bias = torch.randn(2, 5, 6), torch.randn(2, 5)
    gm = fxmomentum.convert(model, 0.0, use_backprop=True)
    gm.double()
    with torch.no_grad():
        got = gm(x.double(), bias.double())
        ref = copy.deepcopy(model).double()(x.double(), bias.double())
    assert got.dtype == torch.float64 and max_rel_err([got], [ref]) < 1e-12
    chain = gm.momentum_chain_0
    assert all(p.dtype == torch.float64 for b in chain.block_list() for p in b.parameters())
    gm.half()
    assert gm.layers[0].layer_scale.dtype == torch.float16
    assert all(p.dtype == torch.float16 for b in chain.block_list() for p in b.parameters())


def test_buffers_read_by_blocks_move_with_the_model():
    # Swin reads its relative position index (a buffer) in the blocks: it is context, read
    # from the converted model at each call, so .double() / .to() reach it.
    torch.manual_seed(0)
    model = torchvision.models.swin_t().eval()
    x = torch.randn(1, 3, 32, 32)
    gm = fxmomentum.convert(model, 0.0, use_backprop=True).double()
    with torch.no_grad():
        got = gm(x.double())
        ref = copy.deepcopy(model).double()(x.double())
    assert max_rel_err([got], [ref]) < 1e-10


def test_deepcopy_keeps_blocks_on_the_copy():
    model, x = resnet18()
    gm = fxmomentum.convert(model, 0.9)
    twin = copy.deepcopy(gm)
    assert list(twin.state_dict()) == list(model.state_dict())
    path = "layer1.1.conv1"
    block = twin.momentum_chain_0.block_list()[1]
    assert block.get_submodule(path) is twin.get_submodule(path)
    assert twin.get_submodule(path) is not gm.get_submodule(path)
    with torch.no_grad():
        twin.get_submodule(path).weight.zero_()
        assert not torch.equal(twin(x), gm(x))
    assert gm.get_submodule(path).weight.abs().sum() > 0


def test_replacing_a_submodule_after_conversion_reaches_the_chain(tmp_path):
    # One module tree: the blocks look their modules up in the converted model when they run,
    # after a copy or a save and load too.
    model, x = resnet18()
    gm = fxmomentum.convert(model, 0.0, use_backprop=True)  # computes what the model does
    twin = copy.deepcopy(gm)
    torch.save(gm, tmp_path / "gm.pt")
    loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
    for converted in (gm, twin, loaded):
        reference = copy.deepcopy(model)
        block = converted.momentum_chain_0.block_list()[1]
        conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        converted.layer1[1].conv1 = conv  # deep in the tree
        reference.layer1[1].conv1 = conv
        assert block.get_submodule("layer1.1.conv1") is conv
        assert {id(p) for p in block.parameters()} >= {id(conv.weight)}
        with torch.no_grad():
            assert max_rel_err([converted(x)], [reference(x)]) < 1e-6
        layer = copy.deepcopy(converted.layer1)
        layer[0].bn1 = nn.BatchNorm2d(64).eval()
        reference.layer1[0].bn1 = layer[0].bn1
        converted.layer1 = layer  # at the top
        assert converted.momentum_chain_0.block_list()[0].layer1 is layer
        with torch.no_grad():
            assert max_rel_err([converted(x)], [reference(x)]) < 1e-6
        assert list(converted.state_dict()) == list(model.state_dict())


def test_tensor_constants_stay_out_of_the_state_dict():
    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(4, 4)
            self.scale = torch.tensor(0.5)  # a plain attribute, not a buffer

        def forward(self, x):
            return x + self.scale * self.f(x)

    model = WithConstant()
    gm = fxmomentum.convert(model, 0.0, use_backprop=True)
    assert list(gm.state_dict()) == ["f.weight", "f.bias"]
    x = torch.randn(3, 4)
    assert max_rel_err([gm(x)], [model(x)]) < 1e-7
    gm.double()
    assert gm(x.double()).dtype == torch.float64


def test_rewrite_functions_directly():
    model = archs.MLPResNet(depth=3)
    graph = fx.Tracer().trace(model)
    chains = find_chains(graph, dict(model.named_modules())).chains
    new = top_graph(graph, chains, ["momentum_chain_0"])
    ops = [(n.op, str(n.target)) for n in new.nodes]
    assert ops == [("placeholder", "x"), ("call_module", "stem"),
                   ("call_module", "momentum_chain_0"), ("call_module", "norm"),
                   ("call_module", "head"), ("output", "output")]  # fmt: skip
    assert len(graph.nodes) > len(new.nodes)  # the traced graph itself is left alone
    g = block_graph(chains[0].blocks[0], chains[0].context)
    assert next(iter(g.nodes)).op == "placeholder" and "add" not in {n.name for n in g.nodes}
    gm = rewrite(model, graph, chains, [0.5], use_backprop=True)
    assert gm.momentum_chain_0.gamma == 0.5 and gm.momentum_chain_0.use_backprop


def test_generalized_block_adds_out_of_place():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.f(x).add_(x))  # adds into F(x), in place

    class AddInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(), Block())

        def forward(self, x):
            return self.blocks(x)

    model = AddInPlace()
    graph = fx.Tracer().trace(model)
    (chain,) = find_chains(graph, dict(model.named_modules())).chains
    assert [b.kind for b in chain.blocks] == ["generalized", "generalized"]
    g = block_graph(chain.blocks[0], chain.context)
    assert any(n.op == "call_method" and n.target == "add" for n in g.nodes)
    x = torch.randn(3, 4)
    gm = fxmomentum.convert(model, 0.0, use_backprop=True)
    assert max_rel_err([gm(x.clone())], [model(x.clone())]) < 1e-7
    gm = fxmomentum.convert(model, 0.5, use_backprop=False)
    gm(x.clone().requires_grad_()).sum().backward()


def test_alpha_becomes_part_of_f():
    class Alpha(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(4, 4)

        def forward(self, x):
            return torch.add(x, self.f(x), alpha=0.25)

    model = Alpha()
    gm = fxmomentum.convert(model, 0.0, use_backprop=True)
    g = gm.momentum_chain_0.block_list()[0].graph
    assert any(n.target is operator.mul and n.args[1] == 0.25 for n in g.nodes)
    x = torch.randn(3, 4)
    assert max_rel_err([gm(x)], [model(x)]) < 1e-7


SUBPROCESS = textwrap.dedent(
    """
    import sys, torch
    from fxmomentum import MomentumChain
    saved = torch.load(sys.argv[1], weights_only=False)
    for name, (gm, inputs, expected, keys) in saved.items():
        assert list(gm.state_dict()) == keys, name
        gm.eval()
        with torch.no_grad():
            out = gm(*inputs)
        err = ((out - expected).norm() / expected.norm()).item()
        assert err < 1e-6, (name, err)
        for chain in [m for m in gm.modules() if isinstance(m, MomentumChain)]:
            for block, path in zip(chain.block_list(), chain.names):
                path = path.split("#")[0]
                for sub, mod in block.named_modules():
                    if sub and not list(mod.children()):
                        assert mod is gm.get_submodule(sub), (name, sub)
        gm.train()
        out = gm(*inputs)
        out.square().mean().backward()
        grads = [p.grad for p in gm.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        print("OK", name, type(gm).__name__)
    """
)


def test_save_and_load_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    resnet, _ = resnet18()
    x = torch.randn(1, 3, 64, 64)  # BatchNorm in train mode needs 2 x 2 at the end
    transformer = archs.PreNormTransformer(depth=2, p=0.1).eval()
    inputs = {"resnet18": (x,), "transformer": (torch.randn(2, 5, 6), torch.randn(2, 5))}
    saved = {}
    for name, model in {"resnet18": resnet, "transformer": transformer}.items():
        gm = fxmomentum.convert(model, 0.9, example_inputs=inputs[name]).eval()
        with torch.no_grad():
            expected = gm(*inputs[name])
        saved[name] = (gm, inputs[name], expected, list(model.state_dict()))
    path = tmp_path / "converted.pt"
    torch.save(saved, path)
    # A fresh process, elsewhere: the tests' own classes (archs) cannot be imported there.
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK resnet18 ResNet" in proc.stdout and "OK transformer" in proc.stdout


def test_train_eval_mode_reaches_stochastic_depth():
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(stochastic_depth_prob=0.5).train()
    x = torch.randn(2, 3, 32, 32)
    gm = fxmomentum.convert(model, 0.9)  # converted in train mode
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), gm(x))
    gm.train()
    with torch.no_grad():
        assert not torch.equal(gm(x), gm(x))


class WeightsAsContext(nn.Module):
    """Blocks that read their weights by attribute (``F.linear(x, self.w[i])``, as Hugging
    Face's Conv1D does): in the graph, each weight is a ``get_attr`` the block takes as
    context."""

    def __init__(self, depth: int = 3, width: int = 6) -> None:
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(torch.randn(width, width) / 4) for _ in range(depth))

    def forward(self, x):
        for w in self.w:
            x = x + torch.tanh(nn.functional.linear(x, w))
        return x


def test_each_block_node_takes_only_the_context_it_reads():
    # A weight handed to every block's autograd node would have its gradient held until the
    # whole chain had gone backward (autograd waits for every node that takes it): memory
    # growing with depth by the size of the weights.
    torch.manual_seed(0)
    model = WeightsAsContext().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    gm = fxmomentum.convert(model, 0.9, example_inputs=(x,))
    (chain,) = [m for m in gm.modules() if isinstance(m, MomentumChain)]
    assert chain.reads == [(0,), (1,), (2,)]
    out = gm(x.clone().requires_grad_(True))
    taken, todo, seen = [], [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nexts = [f for f, _ in node.next_functions]
        if "ReversibleBlock" in node.name():
            variables = [f.variable for f in nexts if f is not None and hasattr(f, "variable")]
            taken.append(sorted(i for i, w in enumerate(gm.w) for v in variables if v is w))
        todo.extend(nexts)
    assert sorted(taken) == [[0], [1], [2]]
    out.sum().backward()
    backprop = fxmomentum.convert(model, 0.9, example_inputs=(x,), use_backprop=True)
    backprop(x).sum().backward()
    assert max_rel_err([w.grad for w in gm.w], [w.grad for w in backprop.w]) <= 1e-10
