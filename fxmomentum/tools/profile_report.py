"""What ``fxmomentum profile`` measured, as data, text and a plot.

:class:`ProfileResult` holds the measurements of :func:`fxmomentum.tools.profiling.profile_model`
(activation memory per configuration, paired time ratios, the conversion report and, with a
memory budget, its plan's estimates); :func:`plot_profile` draws activation memory against step
time: the planner's estimated curve over budgets 0 .. 1 and the measured configurations.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate

from ..surgery import ConversionReport

__all__ = [
    "MIB",
    "ChainShare",
    "ProfileResult",
    "chain_shares",
    "mib",
    "plot_profile",
    "shape_text",
]

MIB = 1024 * 1024


@dataclass
class ChainShare:
    """A converted chain and its estimated share of the saving.

    Attributes
    ----------
    name : str
        Attribute of the converted model (``momentum_chain_0``).
    first, last : str
        Its first and last block.
    num_blocks : int
    state : str
        Shape and dtype of the chain's state.
    saved_bytes : int or None
        The report's estimate of the activation memory it saves.
    share : float or None
        ``saved_bytes`` over the sum of the estimates of all chains.
    """

    name: str
    first: str
    last: str
    num_blocks: int
    state: str
    saved_bytes: int | None
    share: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ProfileResult:
    """What :func:`profile_model` measured.

    Attributes
    ----------
    model : str
        Class name of the model.
    source : str
        Where it came from, in words.
    inputs : list of str
        Shape and dtype of each example input (``"8x3x64x64 float32"``).
    gamma : float
    use_backprop : bool
        Whether the converted chains use plain autograd instead of the reversible backward.
    device : str
    threads : int
    memory : dict of str to int
        Activation memory in bytes of one training step, per configuration.
    time_ratios : list of float
        ``time(converted) / time(original)`` of each interleaved pair.
    chains : list of ChainShare
        The converted chains and their estimated savings.
    report : ConversionReport
        The conversion report (with ``memory_budget``, its ``plan``).
    references : dict of str to dict
        With ``plot``: each reference configuration (:data:`REFERENCES`) measured the same
        way: ``{"memory": bytes, "time_ratio": float}``.
    curve : list of tuple
        With ``plot``: the planner's estimates over budgets 0 .. 1, ``(budget, memory ratio,
        time ratio)``.
    plot : str or None
        Where the plot was written.
    """

    model: str
    source: str
    inputs: list[str]
    gamma: float
    use_backprop: bool
    device: str
    threads: int
    memory: dict[str, int]
    time_ratios: list[float]
    chains: list[ChainShare] = field(default_factory=list)
    report: ConversionReport | None = None
    references: dict[str, dict[str, float]] = field(default_factory=dict)
    curve: list[tuple[float, float, float]] = field(default_factory=list)
    plot: str | None = None

    @property
    def memory_ratio(self) -> float:
        """Activation memory of the converted model over the original's."""
        return self.memory["converted"] / max(self.memory["original"], 1)

    @property
    def time_ratio(self) -> float:
        """Median of :attr:`time_ratios`."""
        return float(statistics.median(self.time_ratios))

    @property
    def saved_bytes(self) -> int:
        """Measured saving: original minus converted activation memory."""
        return self.memory["original"] - self.memory["converted"]

    @property
    def estimated_saved_bytes(self) -> int | None:
        """Sum of the per-chain estimates (None if one is unknown)."""
        values = [c.saved_bytes for c in self.chains]
        if not values or any(v is None for v in values):
            return None
        return sum(v for v in values if v is not None)

    @property
    def converted_label(self) -> str:
        return "converted (backprop)" if self.use_backprop else "converted (reversible)"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        plan = self.report.plan if self.report is not None else None
        return {
            "plan": None if plan is None else plan.as_dict(),
            "references": dict(self.references),
            "curve": [list(point) for point in self.curve],
            "model": self.model,
            "source": self.source,
            "inputs": list(self.inputs),
            "gamma": self.gamma,
            "use_backprop": self.use_backprop,
            "device": self.device,
            "threads": self.threads,
            "memory_bytes": dict(self.memory),
            "memory_ratio": self.memory_ratio,
            "time_ratio": self.time_ratio,
            "time_ratios": list(self.time_ratios),
            "steps": len(self.time_ratios),
            "saved_bytes": self.saved_bytes,
            "estimated_saved_bytes": self.estimated_saved_bytes,
            "chains": [c.as_dict() for c in self.chains],
        }

    def tables(self, tablefmt: str = "simple") -> tuple[str, str]:
        """The measurement table and the per-chain table, as text."""
        rows = [
            ["original", mib(self.memory["original"]), "1.00x", "1.00x"],
            [
                self.converted_label,
                mib(self.memory["converted"]),
                f"{self.memory_ratio:.2f}x",
                f"{self.time_ratio:.2f}x",
            ],
        ]
        head = ["configuration", "activation memory", "memory ratio", "time ratio"]
        measured = tabulate(rows, head, tablefmt=tablefmt, disable_numparse=True)
        total = self.estimated_saved_bytes
        chain_rows = [
            [
                c.name,
                c.num_blocks,
                c.first,
                c.last,
                c.state,
                mib(c.saved_bytes),
                "?" if c.share is None else f"{100 * c.share:.0f}%",
            ]
            for c in self.chains
        ]
        chain_rows.append(["total (estimate)", "", "", "", "", mib(total), ""])
        chain_head = ["chain", "blocks", "first", "last", "state", "saved (est.)", "share"]
        per_chain = tabulate(chain_rows, chain_head, tablefmt=tablefmt, disable_numparse=True)
        return measured, per_chain

    def format(self, fmt: str = "table") -> str:
        """The result as ``"table"`` (plain text), ``"markdown"`` or ``"json"``."""
        if fmt == "json":
            return json.dumps(self.as_dict(), indent=2)
        if fmt not in ("table", "markdown"):
            raise ValueError(f"unknown format {fmt!r}: use table, json or markdown")
        md = fmt == "markdown"
        measured, per_chain = self.tables("github" if md else "simple")
        blocks = sum(c.num_blocks for c in self.chains)
        plan = self.report.plan if self.report is not None else None
        if plan is not None:
            mode = f"memory budget {plan.budget:g} (each region's strategy planned)"
        else:
            mode = "plain autograd" if self.use_backprop else "reversible"
        saved = self.saved_bytes
        pct = 100 * saved / max(self.memory["original"], 1)
        est = self.estimated_saved_bytes
        lines = [
            f"**{self.source} ({self.model})**" if md else f"{self.source} ({self.model})",
            f"example inputs: {', '.join(self.inputs)}",
            f"converted: {len(self.chains)} chain(s), {blocks} block(s), gamma {self.gamma:g}, "
            f"{mode}",
            "",
            measured,
            "",
            f"measured saving: {mib(saved)} ({pct:.0f}% of the original's activation memory)"
            + ("" if est is None else f"; estimated from the chains: {mib(est)}"),
            *self._plan_lines(),
            *self._verdict(),
            "",
            "Where the saving comes from (the conversion report's per-chain estimates):",
            "",
            per_chain,
            "",
            "The estimates count what plain autograd would keep inside each chain less the "
            "reversible state; they rank the chains, the measured figures above are what the step "
            "uses.",
            "",
            f"activation memory: peak resident memory of one training step (forward, sum of "
            f"the outputs, backward) over the memory before it, in a fresh process per "
            f"configuration, after one warm-up step ({self.device}, {self.threads} thread(s)); "
            f"time ratio: median over {len(self.time_ratios)} interleaved step pairs of "
            f"time(converted) / time(original).",
        ]
        return "\n".join(lines)

    def _plan_lines(self) -> list[str]:
        """The memory plan's estimates next to the measurements, and the references."""
        plan = self.report.plan if self.report is not None else None
        lines = []
        if plan is not None:
            error = plan.memory_ratio / max(self.memory_ratio, 1e-12) - 1
            lines.append(
                f"memory budget {plan.budget:g}: the plan estimated {plan.memory_ratio:.2f}x "
                f"memory and {plan.time_ratio:.2f}x time; measured {self.memory_ratio:.2f}x "
                f"and {self.time_ratio:.2f}x (memory estimate off by {100 * error:+.0f}%)"
            )
        original = max(self.memory["original"], 1)
        for kind, found in self.references.items():
            lines.append(
                f"{_REFERENCE_NAMES[kind]}: {found['memory'] / original:.2f}x memory, "
                f"{found['time_ratio']:.2f}x time"
            )
        if self.plot:
            lines.append(f"wrote the memory / time plot to {self.plot}")
        return lines

    def _verdict(self) -> list[str]:
        if self.memory_ratio >= 1:
            return [
                "no saving on this model: the reversible state and the recomputation in backward "
                "take as much memory as the activations the chains would keep (short chains); "
                "convert only some chains (--min-blocks, --include, --exclude) or keep the original"
            ]
        return []

    def __str__(self) -> str:
        return self.format("table")


_REFERENCE_NAMES = {
    "reversible": "every chain reversible (no budget)",
    "checkpoint": "checkpoint per residual block (gamma 0, chains recomputed block by block)",
}


def mib(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / MIB:.1f} MiB"


def shape_text(t: torch.Tensor) -> str:
    return f"{'x'.join(map(str, t.shape)) or 'scalar'} {str(t.dtype).removeprefix('torch.')}"


def chain_shares(report: ConversionReport) -> list[ChainShare]:
    converted = report.converted
    values = [c.saved_bytes for c in converted]
    known = [v for v in values if v is not None]
    total = sum(known) if len(known) == len(values) else None
    shares = []
    for c in converted:
        state = "?" if c.shape is None else f"{'x'.join(map(str, c.shape))} {c.dtype or ''}"
        share = None
        if total and c.saved_bytes is not None:
            share = c.saved_bytes / total
        shares.append(
            ChainShare(
                name=c.name or "-",
                first=c.first,
                last=c.last,
                num_blocks=c.num_blocks,
                state=state.strip(),
                saved_bytes=c.saved_bytes,
                share=share,
            )
        )
    return shares


def plot_profile(result: ProfileResult, path: str | os.PathLike[str]) -> None:
    """Write a PNG of activation memory against step time, both over the original's.

    The planner's estimated curve over budgets 0 .. 1 (``result.curve``), and the measured
    points: the original, the converted model, and the references (``result.references``).

    Raises
    ------
    ImportError
        If matplotlib is not installed (``pip install matplotlib``).
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .export import atomic_output

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if result.curve:
        _, memory, times = zip(*result.curve, strict=True)
        ax.plot(memory, times, ".-", color="tab:blue", alpha=0.6,
                label="memory budget 0 .. 1 (estimated)")  # fmt: skip
    original = max(result.memory["original"], 1)
    points = [("original", 1.0, 1.0, "s")]
    plan = result.report.plan if result.report is not None else None
    label = f"converted, budget {plan.budget:g}" if plan is not None else "converted"
    points.append((label, result.memory_ratio, result.time_ratio, "o"))
    for kind, marker in (("reversible", "D"), ("checkpoint", "^")):
        if kind in result.references:
            found = result.references[kind]
            name = {"reversible": "every chain reversible",
                    "checkpoint": "checkpoint per block"}[kind]  # fmt: skip
            points.append((name, found["memory"] / original, found["time_ratio"], marker))
    for name, memory, time_ratio, marker in points:
        ax.plot([memory], [time_ratio], marker, markersize=9, label=f"{name} (measured)")
    ax.set_xlabel("activation memory / original's")
    ax.set_ylabel("training step time / original's")
    ax.set_title(f"{result.model}: memory against time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
