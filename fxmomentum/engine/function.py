"""The reversible chain as autograd sees it: one node per block, saving nothing.

:func:`reversible_chain` runs a whole chain; :func:`start_run` and :func:`run_block` let a
caller feed the blocks one at a time (``transform_to_momentumnet``'s layers, which their parent
calls one by one). Each block is a ``_ReversibleBlock`` node; the chain's exact state lives
in a :class:`~fxmomentum.engine.run.ChainRun` shared by the nodes.
"""

from __future__ import annotations

import sys

import torch

from .run import ChainRun
from .spec import BlockArguments, ChainSpec

__all__ = ["reversible_chain", "run_block", "start_run"]


class _ReversibleBlock(torch.autograd.Function):
    """One block of a reversible chain: saves nothing (the run holds the chain's output)."""

    @staticmethod
    def forward(
        ctx,
        run: ChainRun,
        t: int,
        arguments: BlockArguments,
        reads: list[int],
        n_params: int,
        x,
        v0,
        *tensors,
    ):  # type: ignore[override]
        if t == 0:
            x = run.start(x, v0)
        y = run.forward_block(t, x, arguments, reads)
        ctx.run, ctx.t = run, t
        ctx.params = tensors[len(tensors) - n_params :]
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "A reversible momentum chain does not support double backward "
                "(create_graph=True). Convert with use_backprop=True for higher-order gradients."
            )
        run: ChainRun = ctx.run
        if ctx.t == len(run.spec.blocks) - 1:
            run.begin_backward()
        # The recomputation replays the forward's RNG states and then restores the caller's.
        grad_x, grad_context, grad_params = run.backward_block(ctx.t, grad_y, ctx.params)
        grad_x = grad_x.to(run.dtype)
        grad_v0 = run.grad_v0().to(run.dtype) if ctx.t == 0 and run.has_v0 else None
        if ctx.t == 0:
            run.release()
        return (None, None, None, None, None, grad_x, grad_v0, *grad_context, *grad_params)


# torch.compile must not trace into a reversible run: the forward would run blocks compiled by
# Inductor while backward recomputes them eagerly (autograd calls it outside the compiled
# region), and the two round differently, so the rebuilt activations would not be the forward's
# bits. Each run is one graph break; the rest of the model is compiled as usual.
_EAGER_ONLY = (
    "a reversible momentum chain runs eagerly: backward recomputes its blocks outside the "
    "compiled graph and must get the forward's bits (use_backprop=True chains compile whole)"
)


@torch.compiler.disable(reason=_EAGER_ONLY)
def reversible_chain(
    spec: ChainSpec,
    x0: torch.Tensor,
    v0: torch.Tensor | None = None,
    args: tuple = (),
    kwargs: dict | None = None,
) -> torch.Tensor:
    """Run a momentum chain whose backward rebuilds activations instead of storing them.

    Each block is one autograd node that saves nothing (the last saves the output, which is
    the exact state); the chain's bit stack is shared between them. Parameter gradients reach
    ``.grad`` block by block, as in plain backprop.

    Parameters
    ----------
    spec : ChainSpec
        Blocks, their kinds and ``gamma``.
    x0 : torch.Tensor
        Chain input.
    v0 : torch.Tensor or None
        Initial velocity (``None`` means zero).
    args, kwargs
        Extra arguments passed to every block; tensors among them (masks, embeddings) get
        gradients.

    Returns
    -------
    torch.Tensor
        ``x_T``.

    Examples
    --------
    >>> blocks = [torch.nn.Linear(4, 4) for _ in range(3)]
    >>> spec = ChainSpec(blocks, [True] * 3, gamma_num=58982)
    >>> y = reversible_chain(spec, torch.randn(2, 4, requires_grad=True))
    >>> y.sum().backward()
    """
    run = start_run(spec, x0)
    arguments = BlockArguments(args, kwargs or {})
    x = x0
    for t in range(len(spec.blocks)):
        x = run_block(run, t, x, v0 if t == 0 else None, arguments)
    return x


def start_run(spec: ChainSpec, x0: torch.Tensor) -> ChainRun:
    """A new run of a reversible chain; feed it blocks in order with :func:`run_block`.

    Examples
    --------
    >>> spec = ChainSpec([torch.nn.Linear(2, 2)], [True], gamma_num=0)
    >>> start_run(spec, torch.zeros(1, 2))
    Traceback (most recent call last):
    ...
    ValueError: gamma = 0 cannot be reversed (the inverse divides by gamma): use gamma > 0, ...
    """
    if spec.gamma_num == 0:
        raise ValueError(
            "gamma = 0 cannot be reversed (the inverse divides by gamma): use gamma > 0, or "
            "use_backprop=True"
        )
    if not x0.is_floating_point():
        raise TypeError(f"a momentum chain needs a floating-point input, got {x0.dtype}")
    if x0.is_meta:
        raise NotImplementedError(
            "a reversible momentum chain cannot run on the meta device: it keeps an exact "
            "integer copy of its state, built from the values, which meta tensors do not have. "
            "Run meta models under torch.no_grad() (the chain then computes shapes as plain "
            "autograd would), or convert with use_backprop=True."
        )
    sharded = _fsdp_module(spec)
    if sharded is not None:
        raise RuntimeError(
            f"{sharded} is sharded by FSDP (fully_shard) inside a reversible momentum chain. "
            f"FSDP gathers a module's parameters around its forward and hooks its backward onto "
            f"the forward's autograd graph; a reversible chain records no graph and recomputes "
            f"the block in backward, so the sharded parameters would get no gradient. Apply "
            f"fully_shard to modules outside the chains and to the root (which keeps its "
            f"parameters gathered from forward to backward), or convert with use_backprop=True."
        )
    return ChainRun(spec)


def _fsdp_module(spec: ChainSpec) -> str | None:
    """The first submodule of a block managed by FSDP's ``fully_shard``, or None."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    kind = getattr(fsdp, "FSDPModule", None)
    if not isinstance(kind, type):
        return None
    for t, block in enumerate(spec.blocks):
        named_modules = getattr(block, "named_modules", None)
        if not callable(named_modules):
            continue
        for name, module in named_modules():
            if isinstance(module, kind):
                return f"{spec.name(t)}" + (f" (module {name!r})" if name else "")
    return None


@torch.compiler.disable(reason=_EAGER_ONLY)
def run_block(
    run: ChainRun, t: int, x: torch.Tensor, v0: torch.Tensor | None, arguments: BlockArguments
) -> torch.Tensor:
    """Apply block ``t`` of ``run`` as its own autograd node; return the next input."""
    spec = run.spec
    params = [p for p in spec.parameters(t) if p.requires_grad]
    reads = arguments.tensor_indices(spec.reads[t] if spec.reads else None)
    taken = [arguments.tensors[i] for i in reads]
    return _ReversibleBlock.apply(run, t, arguments, reads, len(params), x, v0, *taken, *params)
