"""The conversion report as text: plain tables (tabulate), markdown, or JSON."""

from __future__ import annotations

import json

from tabulate import tabulate

from .budget import MemoryPlan
from .report import ConversionReport

__all__ = ["FORMATS", "KIND_LEGEND", "format_bytes", "format_report", "gamma_note"]

#: The formats :func:`format_report` writes.
FORMATS = ("table", "json", "markdown")


def format_bytes(n: int | None) -> str:
    """Bytes in B / KiB / MiB / GiB ("" for None).

    Examples
    --------
    >>> format_bytes(512), format_bytes(3 * 2**20), format_bytes(-2048)
    ('512 B', '3.0 MiB', '-2.0 KiB')
    """
    if n is None:
        return ""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return "?"  # pragma: no cover


def _count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


#: The legend of the chain table's ``kind`` column.
KIND_LEGEND = (
    "kind: pure = each block ends at its add, x + F(x), and f = F; generalized = "
    "shape-preserving operations follow the add (relu(x + F(x)), a post-norm), the block's "
    "output y is the next state and f(x) = y - x; mixed = both in one chain"
)


def _all_notes(report: ConversionReport) -> list[str]:
    extra = [_estimate_note(report), gamma_note(report)]
    return [*report.notes, *(n for n in extra if n)]


def _estimate_note(report: ConversionReport) -> str | None:
    if report.use_backprop or not any(c.saved_bytes is None for c in report.converted):
        return None
    if not report.inputs_given:
        why = "example_inputs were not given"
    elif not report.shapes_verified:
        why = "shape propagation failed on them (see the note above)"
    else:
        why = "it failed"
    return f"saved (est.) unavailable: it measures what autograd saves on example_inputs, and {why}"


def gamma_note(report: ConversionReport) -> str | None:
    """What a gamma above 0 means for the converted model's outputs, or None.

    Examples
    --------
    >>> from fxmomentum.surgery.report import ChainInfo
    >>> chain = ChainInfo("momentum_chain_0", [], "pure", "a", "b", None, None, 0, True,
    ...                   gamma=0.9)
    >>> print(gamma_note(ConversionReport("Net", chains=[chain])))
    gamma > 0: the converted model computes a different function of the same weights ...
    """
    if not any(c.gamma for c in report.converted):
        return None
    return (
        "gamma > 0: the converted model computes a different function of the same weights "
        "(gamma 0 is the original), so pretrained weights need fine-tuning: train it as it is, "
        "or start from a small gamma and raise it during training with "
        "fxmomentum.GammaScheduler(model, start=0.1, end=0.9, steps=N)"
    )


def _tables(report: ConversionReport, tablefmt: str) -> list[tuple[str, str]]:
    rows = []
    for i, c in enumerate(report.chains):
        shape = "x".join(map(str, c.shape)) if c.shape is not None else "?"
        status = "converted" if c.converted else f"not converted: {c.reason}"
        rows.append(
            [
                i,
                c.name or "-",
                c.num_blocks,
                c.kind,
                c.first,
                c.last,
                f"{shape} {c.dtype or ''}".strip(),
                _count(c.num_params),
                "-" if c.gamma is None else f"{c.gamma:g}",
                "-" if not c.converted else format_bytes(c.saved_bytes) or "n/a",
                status,
            ]
        )
    head = ["#", "module", "blocks", "kind", "first", "last", "state", "params", "gamma",
            "saved (est.)", "status"]  # fmt: skip
    table = tabulate(rows, head, tablefmt=tablefmt) if rows else "none"
    if rows:
        table += f"\n\n{KIND_LEGEND}" if tablefmt == "github" else f"\n{KIND_LEGEND}"
    out = [("Residual chains", table)]
    if report.skipped:
        # One line each (`str(item)`): the reasons are sentences, too wide for a table.
        bullet = "- " if tablefmt == "github" else "  "
        out.append(("Residual adds skipped", "\n".join(f"{bullet}{s}" for s in report.skipped)))
    if report.leaves:
        rows = [[m.path or "-", m.type, m.reason] for m in report.leaves]
        out.append(("Opaque modules", tabulate(rows, ["module", "type", "reason"],
                                               tablefmt=tablefmt)))  # fmt: skip
    if report.plan is not None:
        out.append(("Memory plan", _plan_table(report.plan, tablefmt)))
    return out


def _plan_table(plan: MemoryPlan, tablefmt: str) -> str:
    """Every region of a memory plan, its strategy and costs, and the totals."""
    rows = []
    for r in plan.regions:
        shown = ", ".join(r.modules[:2]) + (
            f", ... ({len(r.modules)})" if len(r.modules) > 2 else ""
        )
        strategy = r.strategy
        if r.saved_outputs:  # operator outputs kept so that the recomputation skips them
            strategy += f" (keeps {r.saved_outputs} op outputs)"
        if r.span > 1:
            strategy += f" ({r.span} blocks a segment)"
        rows.append([r.name, r.kind, strategy, format_bytes(r.kept_bytes),
                     f"{1000 * r.time_added:.1f} ms", shown])  # fmt: skip
    head = ["region", "kind", "strategy", "kept (est.)", "time added (est.)", "modules"]
    totals = (
        f"budget {plan.budget:g}: estimated activation memory {plan.memory_ratio:.2f}x the "
        f"original's ({format_bytes(plan.peak_bytes)} of {format_bytes(plan.original_bytes)}; "
        f"the least reachable {plan.least_bytes / max(plan.original_bytes, 1):.2f}x), "
        f"estimated step time {plan.time_ratio:.2f}x"
    )
    notes = "".join(f"\nnote: {n}" for n in plan.notes)
    return f"{tabulate(rows, head, tablefmt=tablefmt, disable_numparse=True)}\n{totals}{notes}"


def format_report(report: ConversionReport, fmt: str = "table") -> str:
    """The report as ``"table"`` (plain text), ``"json"`` or ``"markdown"``.

    Examples
    --------
    >>> report = ConversionReport("Net")
    >>> print(format_report(report, "markdown"))
    ## Net
    <BLANKLINE>
    Net: 0 residual chain(s), 0 converted (0 blocks); 0 residual add(s) skipped; ...
    <BLANKLINE>
    ### Residual chains
    <BLANKLINE>
    none
    """
    if fmt == "json":
        return json.dumps(report.as_dict(), indent=2)
    if fmt == "table":
        parts = [report.summary()]
        for title, table in _tables(report, "simple"):
            parts.append(f"\n{title}\n{table}")
        parts.extend(f"note: {n}" for n in _all_notes(report))
        return "\n".join(parts)
    if fmt == "markdown":
        parts = [f"## {report.model}", "", report.summary()]
        for title, table in _tables(report, "github"):
            parts += ["", f"### {title}", "", table]
        if _all_notes(report):
            parts += ["", *(f"- note: {n}" for n in _all_notes(report))]
        return "\n".join(parts)
    raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
