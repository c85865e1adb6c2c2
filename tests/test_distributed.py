"""Converted models under torch.distributed on CPU: DDP, cross-process BatchNorm, FSDP (gloo).

Two worker processes on 127.0.0.1 are started once for the module (this file run as a script,
see :func:`main`); they run every scenario of :data:`SCENARIOS` in turn and save what each
produced (or the error it raised). Each test then compares one scenario with a single process
training the same model on the whole batch. All models are float64, so the comparisons are
far below the 1e-5 asked for; only the order of the floating-point sums differs.

Findings pinned here:

* DDP: a reversible chain needs nothing special. Its parameters' gradients reach ``.grad``
  block by block in backward (through AccumulateGrad, where DDP's hooks are), so DDP's bucketed
  all-reduce sees them as for any model.
* ``nn.SyncBatchNorm`` cannot run on CPU at all (torch raises ``ValueError`` in its forward,
  converted or not: the kernels it calls exist for GPUs only). ``convert_sync_batchnorm`` does
  reach the norms inside a converted chain, and a BatchNorm that all-reduces its statistics
  over gloo (:class:`AllReduceBatchNorm`, torch's SyncBatchNorm computed with a differentiable
  all-reduce) gives the running statistics of one process on the whole batch: the collectives
  of the recomputation in backward line up on both ranks, and buffers are updated once.
  With two GPUs the real ``nn.SyncBatchNorm`` is tested the same way (skipped here).
* FSDP2 (``fully_shard``) works when the chains lie inside the root's FSDP unit (modules
  outside the chains may be units of their own), and with the recipe everyone uses,
  ``fully_shard`` on every layer and then on the root, where a chain spans the sharded layers:
  each layer's blocks run (and are recomputed) inside the layer's unit
  (:mod:`fxmomentum.engine.fsdp`), for a pre-norm encoder stack and a Hugging Face Llama, with
  and without dropout, reversible, kept, or recomputed by the memory planner; only one layer is
  gathered at a time, besides FSDP's own prefetch of the next.
* A sharded checkpoint (torch.distributed.checkpoint) of the original model loads into the
  sharded converted one and back: the keys are the original's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fxmomentum
from fxmomentum import MomentumChain

WORLD = 2
STEPS = 3
BATCH = 8  # per step, over all processes
LR = 0.1
TOL = 1e-5


# -- models and data ---------------------------------------------------------------------------
class MLPResNet(nn.Module):
    """Stem, ``depth`` pure blocks ``x + f(x)`` (optionally with BatchNorm in f), norm, head."""

    def __init__(self, dim: int = 8, depth: int = 3, batch_norm: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(5, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Linear(dim, 2 * dim),
                nn.BatchNorm1d(2 * dim) if batch_norm else nn.Identity(),
                nn.Tanh(),
                nn.Linear(2 * dim, dim),
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x))


def build(
    batch_norm: bool = False,
    use_backprop: bool = False,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
    shapes: bool = True,
) -> nn.Module:
    """The converted model every process starts from (same seed, same weights).

    ``prepare`` changes the original model before conversion (swapping its norms, say);
    ``shapes=False`` converts without example inputs.
    """
    torch.manual_seed(0)
    model = MLPResNet(batch_norm=batch_norm).double()
    if prepare is not None:
        model = prepare(model)
    example = torch.randn(4, 5, dtype=torch.float64)
    return fxmomentum.convert(
        model,
        0.9,
        example_inputs=example if shapes else None,
        use_backprop=use_backprop,
        leaf_modules=[AllReduceBatchNorm],
    )


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 5, generator=g, dtype=torch.float64),
            torch.randn(BATCH, 3, generator=g, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


class EncoderStack(nn.Module):
    """An input projection, ``depth`` pre-norm ``nn.TransformerEncoderLayer``, norm, head: one
    chain of two blocks per layer."""

    def __init__(self, depth: int = 4, p: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 16)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(16, 2, 32, dropout=p, batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


def build_encoder(
    use_backprop: bool = False,
    p: float = 0.0,
    gamma: float = 0.9,
    budget: float | None = None,
    frozen_input: bool = False,
) -> nn.Module:
    """The encoder stack, converted; ``frozen_input``: its input projection frozen, so that the
    chain's input does not require grad (only the blocks' parameters do)."""
    torch.manual_seed(0)
    model = EncoderStack(p=p).double()
    example = torch.randn(2, 6, 5, dtype=torch.float64)
    converted = fxmomentum.convert(
        model, gamma, example_inputs=example, use_backprop=use_backprop, memory_budget=budget
    )
    if frozen_input:
        converted.inp.requires_grad_(False)
    return converted


def build_llama(use_backprop: bool = False, p: float = 0.0) -> nn.Module:
    """A Hugging Face Llama from a small config, converted (its blocks read the layers' norm
    weights as context, read before the chain)."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32, use_cache=False,
        attention_dropout=p, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double()
    example = torch.randint(0, 64, (2, 8))
    return fxmomentum.convert(model, 0.9, example_inputs=(example,), use_backprop=use_backprop)


def sequence_batches(kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    if kind == "llama":
        return [
            (torch.randint(0, 64, (4, 8), generator=g), torch.randint(0, 64, (4, 8), generator=g))
            for _ in range(STEPS)
        ]
    return [
        (torch.randn(4, 6, 5, generator=g, dtype=torch.float64),
         torch.randn(4, 6, 3, generator=g, dtype=torch.float64))
        for _ in range(STEPS)
    ]  # fmt: skip


def shard_layers(model: nn.Module) -> nn.Module:
    """FSDP2's recipe: every layer (by the original's module paths), then the root."""
    from torch.distributed.fsdp import fully_shard

    layers = model.model.layers if hasattr(model, "model") else model.layers
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def train(
    model: nn.Module,
    rank: int = 0,
    world: int = 1,
    data: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss: Callable | None = None,
    seed: int | None = None,
) -> list[str]:
    """SGD steps on this process's share of each batch; returns the chains' grad_fn names."""
    kinds: list[str] = []
    chains = [m for m in model.modules() if isinstance(m, MomentumChain)]
    hooks = [
        c.register_forward_hook(lambda _m, _i, out: kinds.append(type(out.grad_fn).__name__))
        for c in chains
    ]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = batches() if data is None else data
    if seed is not None:
        torch.manual_seed(seed)
    for x, y in data:
        share = x.shape[0] // world
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        opt.zero_grad()
        out = model(x)
        if loss is None:
            value = ((out - y) ** 2).mean()
        else:
            value = loss(out, y)
        value.backward()
        opt.step()
    for h in hooks:
        h.remove()
    return kinds


def llama_loss(out, y: torch.Tensor) -> torch.Tensor:
    logits = out.logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with FSDP's sharded DTensors gathered."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = v.detach().clone()
    return out


class AllReduceBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d with statistics over the whole batch of every process (training mode).

    What ``nn.SyncBatchNorm`` computes, written with a differentiable all-reduce that gloo runs
    on CPU (SyncBatchNorm needs a GPU). Outside a process group it is a plain BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        count = torch.tensor([x.numel() // c], dtype=x.dtype)
        total = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        n = total[-1]
        mean = total[:c] / n
        var = total[c : 2 * c] / n - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
            unbiased = var * (n / (n - 1))
            self.running_var.mul_(1 - self.momentum).add_(unbiased, alpha=self.momentum)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


def all_reduce_batch_norms(model: nn.Module) -> nn.Module:
    """Swap every BatchNorm1d of ``model`` for an :class:`AllReduceBatchNorm` with the same
    state, in place, as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm1d:
                new = AllReduceBatchNorm(child.num_features, child.eps, child.momentum).double()
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)
    return model


def modules_called_by_chains(model: nn.Module) -> list[nn.Module]:
    """The submodules the blocks of the converted model's chains hold (and call)."""
    return [
        m
        for chain in model.modules()
        if isinstance(chain, MomentumChain)
        for block in chain.block_list()
        for m in block.modules()
    ]


# -- scenarios (run in each worker) ------------------------------------------------------------
def scenario_ddp(rank: int) -> dict:
    model = build()
    ddp = nn.parallel.DistributedDataParallel(model)
    kinds = train(ddp, rank, WORLD)
    return {"state": full_state(model), "kinds": kinds}


def scenario_all_reduce_batch_norm(rank: int) -> dict:
    model = build(batch_norm=True, prepare=all_reduce_batch_norms)
    called = modules_called_by_chains(model)
    assert sum(isinstance(m, AllReduceBatchNorm) for m in called) == 3
    ddp = nn.parallel.DistributedDataParallel(model)
    kinds = train(ddp, rank, WORLD)
    return {"state": full_state(model), "kinds": kinds}


def scenario_sync_batch_norm_on_cpu(rank: int) -> dict:
    """torch's SyncBatchNorm in a process group on CPU: the original and the converted model."""
    errors = {}
    torch.manual_seed(0)
    original = nn.SyncBatchNorm.convert_sync_batchnorm(MLPResNet(batch_norm=True).double())
    # Without example inputs: SyncBatchNorm refuses to run them on CPU in a process group.
    converted = build(
        batch_norm=True, prepare=nn.SyncBatchNorm.convert_sync_batchnorm, shapes=False
    )
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in modules_called_by_chains(converted)) == 3
    for name, model in (("original", original), ("converted", converted)):
        try:
            model(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
            errors[name] = None
        except ValueError as err:
            errors[name] = str(err)
    return errors


def scenario_fsdp(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = build()
    fully_shard(model.stem)
    fully_shard(model.head)
    fully_shard(model)
    kinds = train(model, rank, WORLD)
    return {"state": full_state(model), "kinds": kinds}


def scenario_fsdp_inside_chain(rank: int) -> dict:
    """A unit the chain's blocks call directly (one block's first Linear)."""
    from torch.distributed.fsdp import fully_shard

    model = build()
    fully_shard(model.blocks[1][0])
    fully_shard(model)
    kinds = train(model, rank, WORLD)
    return {"state": full_state(model), "kinds": kinds}


def _gathered_layers(model: nn.Module) -> int:
    """How many of the layer units have their parameters gathered right now."""
    from torch.distributed.fsdp import FSDPModule

    root = model
    units = [m for m in root.modules() if isinstance(m, FSDPModule) and m is not root]
    return sum(
        1
        for unit in units
        for group in unit._get_fsdp_state()._fsdp_param_groups
        if not group.is_sharded
    )


def _sharded_run(kind: str, rank: int, *, seed: int | None = None, **options) -> dict:
    """Train a converted model sharded by the recipe; report the state, the chains' autograd
    nodes, and how many layers were gathered at most while any block ran or was recomputed."""
    model = shard_layers(build_llama(**options) if kind == "llama" else build_encoder(**options))
    layers = model.model.layers if kind == "llama" else model.layers
    most = [0]

    def count(module: nn.Module, args: tuple) -> None:
        most[0] = max(most[0], _gathered_layers(model))

    probes = [layer.self_attn.register_forward_pre_hook(count) for layer in layers]
    loss = llama_loss if kind == "llama" else None
    kinds = train(model, rank, WORLD, sequence_batches(kind), loss, seed=seed)
    for probe in probes:
        probe.remove()
    shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    return {
        "state": full_state(model),
        "kinds": kinds,
        "most_gathered": most[0],
        "shard_bytes": shard,
    }


def scenario_fsdp_recipe_encoder(rank: int) -> dict:
    return _sharded_run("encoder", rank)


def scenario_fsdp_recipe_encoder_backprop(rank: int) -> dict:
    return _sharded_run("encoder", rank, use_backprop=True)


def scenario_fsdp_recipe_encoder_dropout(rank: int) -> dict:
    return _sharded_run("encoder", rank, p=0.1, seed=100 + rank)


def scenario_fsdp_recipe_encoder_dropout_backprop(rank: int) -> dict:
    return _sharded_run("encoder", rank, p=0.1, seed=100 + rank, use_backprop=True)


def scenario_fsdp_recipe_encoder_frozen_input(rank: int) -> dict:
    return _sharded_run("encoder", rank, frozen_input=True)


def scenario_fsdp_recipe_llama(rank: int) -> dict:
    return _sharded_run("llama", rank)


def scenario_fsdp_recipe_planned(rank: int) -> dict:
    """The memory planner's least-memory plan at gamma 0 (chains recomputed block by block,
    segments recomputed) inside the layers' units."""
    return _sharded_run("encoder", rank, gamma=0.0, budget=0.0)


def scenario_distributed_checkpoint(rank: int) -> dict:
    """A sharded checkpoint of the original loads into the sharded converted model and back."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    torch.manual_seed(1)
    original = shard_layers(EncoderStack().double())
    converted = shard_layers(build_encoder())
    path = Path(tempfile.gettempdir()) / f"fxmomentum-dcp-{os.getppid()}"
    dcp.save(get_model_state_dict(original), checkpoint_id=str(path / "original"))
    state = get_model_state_dict(converted)
    dcp.load(state, checkpoint_id=str(path / "original"))
    set_model_state_dict(converted, state)
    into = full_state(converted)
    dcp.save(get_model_state_dict(converted), checkpoint_id=str(path / "converted"))
    torch.manual_seed(2)
    back = shard_layers(EncoderStack().double())
    state = get_model_state_dict(back)
    dcp.load(state, checkpoint_id=str(path / "converted"))
    set_model_state_dict(back, state)
    return {"original": full_state(original), "converted": into, "back": full_state(back)}


def scenario_convert_a_sharded_model(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = EncoderStack().double()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    try:
        fxmomentum.convert(model, 0.9, example_inputs=torch.randn(2, 6, 5, dtype=torch.float64))
    except ValueError as err:
        return {"error": str(err)}
    return {"error": None}


def scenario_fsdp_inside_backprop_chain(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = build(use_backprop=True)
    for block in model.blocks:
        fully_shard(block[0])
        fully_shard(block[3])
    fully_shard(model)
    kinds = train(model, rank, WORLD)
    return {"state": full_state(model), "kinds": kinds}


def scenario_sync_batch_norm_cuda(rank: int) -> dict:
    """The real nn.SyncBatchNorm (NCCL, one GPU per process)."""
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    model = build(
        batch_norm=True, prepare=nn.SyncBatchNorm.convert_sync_batchnorm, shapes=False
    ).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    share = BATCH // WORLD
    for x, y in batches():
        x, y = (t[rank * share : (rank + 1) * share].to(device) for t in (x, y))
        opt.zero_grad()
        ((ddp(x) - y) ** 2).mean().backward()
        opt.step()
    return {"state": {k: v.cpu() for k, v in full_state(model).items()}}


SCENARIOS: dict[str, Callable[[int], dict]] = {
    "ddp": scenario_ddp,
    "all_reduce_batch_norm": scenario_all_reduce_batch_norm,
    "sync_batch_norm_on_cpu": scenario_sync_batch_norm_on_cpu,
    "fsdp": scenario_fsdp,
    "fsdp_inside_backprop_chain": scenario_fsdp_inside_backprop_chain,
    "fsdp_inside_chain": scenario_fsdp_inside_chain,
    "fsdp_recipe_encoder": scenario_fsdp_recipe_encoder,
    "fsdp_recipe_encoder_backprop": scenario_fsdp_recipe_encoder_backprop,
    "fsdp_recipe_encoder_dropout": scenario_fsdp_recipe_encoder_dropout,
    "fsdp_recipe_encoder_dropout_backprop": scenario_fsdp_recipe_encoder_dropout_backprop,
    "fsdp_recipe_encoder_frozen_input": scenario_fsdp_recipe_encoder_frozen_input,
    "fsdp_recipe_llama": scenario_fsdp_recipe_llama,
    "fsdp_recipe_planned": scenario_fsdp_recipe_planned,
    "distributed_checkpoint": scenario_distributed_checkpoint,
    "convert_a_sharded_model": scenario_convert_a_sharded_model,
}
CUDA_SCENARIOS: dict[str, Callable[[int], dict]] = {
    "sync_batch_norm": scenario_sync_batch_norm_cuda,
}


def main(argv: list[str]) -> None:
    """Worker entry point: ``python test_distributed.py RANK PORT OUT_DIR BACKEND``."""
    rank, port, out, backend = int(argv[0]), int(argv[1]), Path(argv[2]), argv[3]
    torch.set_num_threads(1)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    results: dict[str, dict] = {}
    try:
        for name, scenario in (SCENARIOS if backend == "gloo" else CUDA_SCENARIOS).items():
            try:
                results[name] = {"value": scenario(rank)}
            except Exception as err:  # reported by the test that reads this scenario
                results[name] = {"error": f"{type(err).__name__}: {err}"}
            dist.barrier()
    finally:
        torch.save(results, out / f"rank{rank}.pt")
        dist.destroy_process_group()


# -- the parent side ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(backend: str, timeout: float = 240.0) -> list[dict[str, dict]]:
    """Start the worker processes, wait for them, return each rank's results."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if any(name == "lo" for _, name in socket.if_nameindex()):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections on loopback too
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, str(rank), str(port), tmp, backend],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in range(WORLD)
        ]
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=timeout)[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        codes = [p.returncode for p in procs]
        assert codes == [0] * WORLD, f"workers exited with {codes}:\n" + "\n".join(logs)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def runs() -> list[dict[str, dict]]:
    return run_workers("gloo")


def value(runs: list[dict[str, dict]], name: str) -> list[dict]:
    """The scenario's result on every rank (failing the test with its error if it raised)."""
    out = []
    for rank, results in enumerate(runs):
        result = results[name]
        assert "error" not in result, f"rank {rank}: {result['error']}"
        out.append(result["value"])
    return out


def reference(**kwargs) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """(initial state, state after training, grad_fn kinds) of one process, whole batch."""
    model = build(**kwargs)
    before = full_state(model)
    kinds = train(model)
    return before, full_state(model), kinds


def assert_same_training(got: dict[str, torch.Tensor], before, after) -> None:
    """Every tensor, and every parameter's change over the steps, equal within TOL.

    A change that is zero in exact arithmetic (the bias of a layer feeding a BatchNorm) is
    round-off noise in both runs: changes are compared relative to the largest one, floored.
    """
    assert got.keys() == after.keys()
    floats = [k for k in after if after[k].is_floating_point()]
    floor = 1e-9 * max((after[k] - before[k]).norm().item() for k in floats)
    for k, ref in after.items():
        if not ref.is_floating_point():
            assert torch.equal(got[k], ref), k  # num_batches_tracked
            continue
        err = (got[k] - ref).norm() / ref.norm()
        assert err < TOL, (k, err.item())
        step, ref_step = got[k] - before[k], ref - before[k]
        assert (step - ref_step).norm() / max(ref_step.norm(), floor) < TOL, (k, "update")


# -- tests -------------------------------------------------------------------------------------
def test_ddp_equals_one_process_on_the_whole_batch(runs):
    before, after, kinds = reference()
    assert set(kinds) == {"_ReversibleBlockBackward"}  # the reversible engine ran
    for result in value(runs, "ddp"):
        assert result["kinds"] == kinds
        assert_same_training(result["state"], before, after)


def test_cross_process_batch_norm_running_stats_equal_one_process(runs):
    before, after, _ = reference(batch_norm=True)
    assert after["blocks.0.1.num_batches_tracked"].item() == STEPS  # once per step
    for result in value(runs, "all_reduce_batch_norm"):
        assert set(result["kinds"]) == {"_ReversibleBlockBackward"}
        assert_same_training(result["state"], before, after)  # running stats included


def test_convert_sync_batchnorm_before_conversion_reaches_the_chains():
    model = build(batch_norm=True, prepare=nn.SyncBatchNorm.convert_sync_batchnorm)
    reference_model = build(batch_norm=True)
    called = modules_called_by_chains(model)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in called) == 3
    assert not any(type(m) is nn.BatchNorm1d for m in called)
    # Outside a process group SyncBatchNorm is BatchNorm: one training step, same results.
    x = torch.randn(4, 5, dtype=torch.float64)
    model(x).sum().backward()
    reference_model(x).sum().backward()
    state, ref = model.state_dict(), reference_model.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)


def test_convert_sync_batchnorm_after_conversion_reaches_the_chains():
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(build(batch_norm=True))
    assert isinstance(synced.blocks[0][1], nn.SyncBatchNorm)  # the converted model's tree
    called = modules_called_by_chains(synced)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in called) == 3  # what the chain calls
    assert not any(type(m) is nn.BatchNorm1d for m in called)
    # Outside a process group SyncBatchNorm is BatchNorm: one training step, same results.
    reference_model = build(batch_norm=True)
    x = torch.randn(4, 5, dtype=torch.float64)
    synced(x).sum().backward()
    reference_model(x).sum().backward()
    state, ref = synced.state_dict(), reference_model.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)


def test_sync_batch_norm_is_refused_on_cpu_by_torch_converted_or_not(runs):
    for errors in value(runs, "sync_batch_norm_on_cpu"):
        assert errors["original"] is not None
        assert errors["original"].startswith("SyncBatchNorm expected input tensor to be on GPU")
        assert errors["converted"] == errors["original"]


@pytest.mark.skipif(
    torch.cuda.device_count() < WORLD or not dist.is_nccl_available(),
    reason="nn.SyncBatchNorm needs one GPU per process",
)
def test_sync_batch_norm_on_gpus_equals_one_process():
    before, after, _ = reference(batch_norm=True)
    for results in run_workers("nccl"):
        assert "error" not in results["sync_batch_norm"], results["sync_batch_norm"]["error"]
        state = results["sync_batch_norm"]["value"]["state"]
        assert_same_training(state, before, after)


def test_fsdp_with_chains_inside_the_root_unit_equals_one_process(runs):
    before, after, kinds = reference()
    for result in value(runs, "fsdp"):
        assert result["kinds"] == kinds
        assert_same_training(result["state"], before, after)


def test_fsdp_unit_inside_a_reversible_chain_trains(runs):
    before, after, kinds = reference()
    for result in value(runs, "fsdp_inside_chain"):
        assert result["kinds"] == kinds
        assert_same_training(result["state"], before, after)


def _one_process(kind: str, seed: int | None = None, **options) -> tuple[dict, dict, list[str]]:
    model = build_llama(**options) if kind == "llama" else build_encoder(**options)
    before = full_state(model)
    loss = llama_loss if kind == "llama" else None
    kinds = train(model, data=sequence_batches(kind), loss=loss, seed=seed)
    return before, full_state(model), kinds


@pytest.mark.parametrize(
    ("scenario", "kind", "options"),
    [
        ("fsdp_recipe_encoder", "encoder", {}),
        ("fsdp_recipe_encoder_backprop", "encoder", {"use_backprop": True}),
        # The chain's input needs no grad, its blocks' parameters do: their parameters are the
        # unsharded ones the blocks compute with, listed inside the layers' units.
        ("fsdp_recipe_encoder_frozen_input", "encoder", {"frozen_input": True}),
        ("fsdp_recipe_llama", "llama", {}),
        ("fsdp_recipe_planned", "encoder", {"gamma": 0.0, "budget": 0.0}),
    ],
)
def test_fsdp_recipe_on_every_layer_equals_one_process(runs, scenario, kind, options):
    before, after, kinds = _one_process(kind, **options)
    if not options or options == {"frozen_input": True}:
        assert set(kinds) == {"_ReversibleBlockBackward"}  # the chain spans the sharded layers
    for result in value(runs, scenario):
        assert result["kinds"] == kinds
        assert_same_training(result["state"], before, after)


def test_fsdp_recipe_gathers_one_layer_at_a_time(runs):
    # The running layer, and at most one more: FSDP's own prefetch of the next layer.
    _, after, _ = _one_process("encoder")
    total = sum(v.numel() * v.element_size() for v in after.values() if v.is_floating_point())
    for result in value(runs, "fsdp_recipe_encoder") + value(runs, "fsdp_recipe_llama"):
        assert 1 <= result["most_gathered"] <= 2
    for result in value(runs, "fsdp_recipe_encoder"):
        assert result["shard_bytes"] <= total / WORLD + 1024  # each rank holds its shard


def test_fsdp_with_dropout_reversible_equals_backprop_same_seed(runs):
    rev = value(runs, "fsdp_recipe_encoder_dropout")
    backprop = value(runs, "fsdp_recipe_encoder_dropout_backprop")
    before, _, _ = _one_process("encoder", p=0.1)
    for a, b in zip(rev, backprop, strict=True):
        assert set(a["kinds"]) == {"_ReversibleBlockBackward"}
        assert_same_training(a["state"], before, b["state"])


def test_a_sharded_checkpoint_of_the_original_loads_into_the_converted_model_and_back(runs):
    for result in value(runs, "distributed_checkpoint"):
        original, converted, back = result["original"], result["converted"], result["back"]
        assert original.keys() == converted.keys() == back.keys()
        for key in original:
            assert torch.equal(original[key], converted[key]), key
            assert torch.equal(original[key], back[key]), key


def test_converting_a_sharded_model_says_to_convert_first(runs):
    for result in value(runs, "convert_a_sharded_model"):
        assert result["error"] is not None
        assert "sharded by FSDP" in result["error"] and "convert the model first" in result["error"]


def test_fsdp_units_inside_a_backprop_chain_train_correctly(runs):
    before, after, kinds = reference(use_backprop=True)
    for result in value(runs, "fsdp_inside_backprop_chain"):
        assert result["kinds"] == kinds
        assert_same_training(result["state"], before, after)


if __name__ == "__main__":
    main(sys.argv[1:])
