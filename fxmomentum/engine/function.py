"""The reversible chain as autograd sees it: one node per block, saving nothing.

:func:`reversible_chain` runs a whole chain; :func:`start_run` and :func:`run_block` let a
caller feed the blocks one at a time (``transform_to_momentumnet``'s layers, which their parent
calls one by one). Each block is a ``_ReversibleBlock`` node; the chain's exact state lives
in a :class:`~fxmomentum.engine.run.ChainRun` shared by the nodes. Blocks that call into FSDP
units run inside them (:mod:`fxmomentum.engine.fsdp`).
"""

from __future__ import annotations

import torch

from .fsdp import in_units
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

    def step(t: int, state: tuple) -> tuple:
        return (run_block(run, t, state[0], v0 if t == 0 else None, arguments),)

    reads = spec.tensor_reads(arguments)
    return in_units(spec.blocks, arguments.tensors, reads, (x0,), step)[0]


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
    return ChainRun(spec)


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
