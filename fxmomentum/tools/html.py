"""A picture of the model: one self-contained HTML page of a conversion report.

``fxmomentum inspect TARGET --html out.html`` writes it. The page is made from
``report.as_dict()`` and the model's module list only (no internals), and holds everything it
shows: inline CSS, an inline script, no network access, no external link or font. It shows

* the model's modules in order, indented by depth, each chain's blocks (and what they hold)
  highlighted in the chain's colour, the residual adds left alone and the opaque modules marked
  with their reason;
* per chain: blocks, kind, state, the activation memory it frees (the report's estimate) and that
  estimate's share of the activations one training forward of the original keeps, and its time
  cost, which is one more forward of its blocks per training step (the reversible backward
  recomputes each block once): measured once on the example inputs as a share of the model's
  forward when :func:`measure_costs` ran, else not given;
* with a memory budget (the report's ``"plan"``), each region's strategy (reversible, recompute,
  keep), as a table and as the colour of its modules;
* the report's notes.

Clicking a chain in the table marks its modules; "only chains" hides the rest.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..surgery.format import KIND_LEGEND, format_bytes
from .export import atomic_output

__all__ = ["measure_costs", "model_modules", "render_html", "write_html"]

#: What a strategy of the memory plan means, for the page's legend.
STRATEGIES = {
    "reversible": "a reversible momentum chain: activations rebuilt in backward",
    "recompute": "activations recomputed in backward (checkpointing)",
    "keep": "activations kept, as in the original",
}


def model_modules(model: nn.Module) -> list[tuple[str, str]]:
    """The model's submodules in order, as ``(path, class name)``; the model itself left out.

    Examples
    --------
    >>> model_modules(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    [('0', 'Linear'), ('1', 'ReLU')]
    """
    return [(name, type(m).__name__) for name, m in model.named_modules() if name]


# -- measuring -------------------------------------------------------------------------------------
def _block_paths(chain: Mapping[str, Any]) -> list[str]:
    paths: list[str] = []
    for block in chain.get("blocks", []):
        path = block.get("path") or ""
        if path not in paths:
            paths.append(path)
    return paths


@contextlib.contextmanager
def _unchanged(model: nn.Module) -> Iterator[None]:
    """Training flags and buffers (BatchNorm statistics) as they were, after the block."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def measure_costs(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], report: Mapping[str, Any]
) -> dict[str, Any]:
    """Measure, once, what the page shows as each chain's share of memory and time.

    * ``activation_bytes``: what autograd saves for backward in one training-mode forward of
      the original model (distinct storages, parameters and buffers left out);
    * ``forward_seconds``: one forward (eval mode, no grad, after a warm-up forward);
    * ``chains[i]``: ``time_share``, the forward time of chain ``i``'s blocks over the whole
      forward's (the time one more forward of them adds to a training step, in units of a
      forward), or None if a block is not a module that can be timed.

    The model's training flags and buffers are restored. Timings are single runs: a guide,
    not a benchmark.

    Examples
    --------
    >>> import fxmomentum
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fs = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
    ...     def forward(self, x):
    ...         for f in self.fs:
    ...             x = x + f(x)
    ...         return x
    >>> x = torch.randn(4, 8)
    >>> costs = measure_costs(Net(), (x,), fxmomentum.inspect(Net(), x).as_dict())
    >>> costs["activation_bytes"] > 0, 0 < costs["chains"][0]["time_share"] <= 1
    (True, True)
    """
    inputs = tuple(example_inputs)
    fixed = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in fixed:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with _unchanged(model):
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*inputs)
        del out
        model.eval()
        modules = dict(model.named_modules())
        spans: dict[str, float] = {}
        starts: dict[str, float] = {}
        handles = []
        timed = {p for c in report.get("chains", []) for p in _block_paths(c) if p in modules}
        for path in timed:

            def before(_m: nn.Module, _a: Any, path: str = path) -> None:
                starts[path] = time.perf_counter()

            def after(_m: nn.Module, _a: Any, _o: Any, path: str = path) -> None:
                spans[path] = spans.get(path, 0.0) + time.perf_counter() - starts[path]

            handles.append(modules[path].register_forward_pre_hook(before))
            handles.append(modules[path].register_forward_hook(after))
        try:
            with torch.no_grad():
                model(*inputs)  # warm-up
                spans.clear()
                begin = time.perf_counter()
                model(*inputs)
                total = time.perf_counter() - begin
        finally:
            for h in handles:
                h.remove()
    chains = []
    for chain in report.get("chains", []):
        paths = _block_paths(chain)
        share = None
        if paths and all(p in spans for p in paths) and total > 0:
            share = sum(spans[p] for p in paths) / total
        chains.append({"time_share": share})
    return {
        "activation_bytes": sum(saved.values()),
        "forward_seconds": total,
        "chains": chains,
    }


# -- rendering -------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;
background:#f7f8fa}
header{background:#1d2330;color:#fff;padding:14px 24px}
header h1{font-size:20px;margin:0 0 4px}header p{margin:0;color:#c8cdd8}
main{padding:8px 24px 40px;max-width:1400px}
h2{font-size:16px;margin:24px 0 8px}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #dde1e8;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef0f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.chain-row{cursor:pointer}tr.chain-row td:first-child{border-left:8px solid var(--c)}
tr.chain-row.not-converted td:first-child{border-left-style:dashed}
tr.chain-row.focus{outline:2px solid #1d2330}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;background:var(--c);
vertical-align:-1px;margin-right:4px}
ol.modules{list-style:none;padding:0;margin:0;background:#fff;border:1px solid #dde1e8;
font:12px/1.5 ui-monospace,SFMono-Regular,Menlo,monospace}
li.mod{padding:1px 8px 1px calc(8px + var(--depth) * 16px);border-left:6px solid transparent;
white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
li.mod .type{color:#6b7385}
li.in-chain{background:var(--c);border-left-color:var(--c)}
li.block-root{font-weight:600}
li.block-root .badge{font-weight:400}
.badge{display:inline-block;font:11px system-ui,sans-serif;border-radius:3px;padding:0 5px;
margin-left:6px;background:#1d2330;color:#fff}
.badge.skip{background:#b54708}.badge.opaque{background:#6b7385}
li.plan-reversible{box-shadow:inset -6px 0 0 #2e7d32}
li.plan-recompute{box-shadow:inset -6px 0 0 #1565c0}
li.plan-keep{box-shadow:inset -6px 0 0 #9e9e9e}
.strategy-reversible{color:#2e7d32;font-weight:600}.strategy-recompute{color:#1565c0;
font-weight:600}.strategy-keep{color:#616161;font-weight:600}
body.only-chains li.mod:not(.in-chain){display:none}
body.focusing li.in-chain:not(.focus){opacity:.35}
.note{color:#4a5160;margin:2px 0}
.legend{color:#4a5160;font-size:12px;margin:6px 0;max-width:1100px}
label{font-size:13px}
"""

_JS = """
(function () {
  var rows = document.querySelectorAll("tr.chain-row");
  rows.forEach(function (row) {
    row.addEventListener("click", function () {
      var key = row.dataset.chain, on = !row.classList.contains("focus");
      document.querySelectorAll(".focus").forEach(function (el) { el.classList.remove("focus"); });
      document.body.classList.toggle("focusing", on);
      if (on) {
        document.querySelectorAll('[data-chain="' + key + '"]').forEach(function (el) {
          el.classList.add("focus");
        });
      }
    });
  });
  var only = document.getElementById("only-chains");
  if (only) {
    only.addEventListener("change", function () {
      document.body.classList.toggle("only-chains", only.checked);
    });
  }
  var count = document.getElementById("highlighted-count");
  if (count) { count.textContent = String(document.querySelectorAll("li.in-chain").length); }
  document.body.dataset.ready = "1";
})();
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _hue(index: int) -> str:
    return f"hsl({(index * 137.508) % 360:.0f} 70% 84%)"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _shape(chain: Mapping[str, Any]) -> str:
    shape = chain.get("shape")
    text = "x".join(map(str, shape)) if shape else "?"
    return f"{text} {chain.get('dtype') or ''}".strip()


def _owner(path: str, roots: Mapping[str, Any]) -> Any:
    """The value of the longest key of ``roots`` that is ``path`` or a prefix of it."""
    while True:
        if path in roots:
            return roots[path]
        if "." not in path:
            return None
        path = path.rpartition(".")[0]


def _chain_table(report: Mapping[str, Any], costs: Mapping[str, Any] | None) -> str:
    chains = report.get("chains", [])
    if not chains:
        return "<p>No residual chain was found.</p>"
    total = costs.get("activation_bytes") if costs else None
    head = (
        "<tr><th>#</th><th>chain</th><th>blocks</th><th>kind</th><th>first</th><th>last</th>"
        "<th>state</th><th>gamma</th><th>frees (est.)</th><th>share of activations</th>"
        "<th>time cost</th><th>status</th></tr>"
    )
    rows = []
    for i, c in enumerate(chains):
        saved = c.get("saved_bytes")
        share = saved / total if saved is not None and total else None
        t = costs["chains"][i]["time_share"] if costs and i < len(costs["chains"]) else None
        time_text = "n/a" if t is None else f"+{100 * t:.1f}% of a forward"
        converted = bool(c.get("converted"))
        status = "converted" if converted else f"not converted: {c.get('reason', '')}"
        gamma = c.get("gamma")
        rows.append(
            f'<tr class="chain-row{"" if converted else " not-converted"}" data-chain="{i}" '
            f'style="--c:{_hue(i)}" title="click: mark its modules">'
            f'<td class="num"><span class="swatch"></span>{i}</td>'
            f'<td>{_e(c.get("name") or "-")}</td><td class="num">{_e(c.get("num_blocks"))}</td>'
            f"<td>{_e(c.get('kind'))}</td><td>{_e(c.get('first'))}</td>"
            f"<td>{_e(c.get('last'))}</td><td>{_e(_shape(c))}</td>"
            f'<td class="num">{"-" if gamma is None else _e(f"{gamma:g}")}</td>'
            f'<td class="num">{_e(format_bytes(saved) or "n/a")}</td>'
            f'<td class="num">{_percent(share)}</td><td class="num">{_e(time_text)}</td>'
            f"<td>{_e(status)}</td></tr>"
        )
    if costs:
        measured = (
            f"Measured once on the example inputs: the original keeps "
            f"{_e(format_bytes(total))} of activations for backward in one training forward "
            f"(the share column is each chain's estimated saving over that); one forward took "
            f"{1000 * costs['forward_seconds']:.1f} ms. "
        )
    else:
        measured = "Shares and time costs need example inputs (--input-shape). "
    legend = (
        f'<p class="legend">{measured}Time cost: the reversible backward runs each block of '
        f"a chain forward once more, so a training step takes about that much longer (a "
        f"step is about three forwards). {_e(KIND_LEGEND)}.</p>"
    )
    return f"<table>{head}{''.join(rows)}</table>{legend}"


def _plan_section(plan: Mapping[str, Any]) -> str:
    regions = plan.get("regions", [])
    head = (
        "<tr><th>region</th><th>kind</th><th>strategy</th><th>modules</th><th>kept</th>"
        "<th>time added (est.)</th></tr>"
    )
    rows = []
    for r in regions:
        modules = list(r.get("modules", []))
        shown = ", ".join(modules[:3]) + (f", ... ({len(modules)})" if len(modules) > 3 else "")
        strategy = str(r.get("strategy", ""))
        saved = r.get("saved_outputs") or 0
        shown_options = f" (keeps {saved} op outputs)" if saved else ""
        if (r.get("span") or 1) > 1:
            shown_options += f" ({r['span']} blocks a segment)"
        added = r.get("time_added")
        rows.append(
            f'<tr class="region" data-region="{_e(r.get("name"))}"><td>{_e(r.get("name"))}</td>'
            f"<td>{_e(r.get('kind'))}</td>"
            f'<td class="strategy-{_e(strategy)}">{_e(strategy)}{_e(shown_options)}</td>'
            f"<td>{_e(shown)}</td>"
            f'<td class="num">{_e(format_bytes(r.get("kept_bytes")) or "n/a")}</td>'
            f'<td class="num">{"n/a" if added is None else _e(f"{1000 * added:.1f} ms")}</td>'
            f"</tr>"
        )
    ratios = (
        f"budget {_e(plan.get('budget'))}; estimated memory "
        f"{_e(_ratio(plan.get('estimated_memory_ratio')))} and time "
        f"{_e(_ratio(plan.get('estimated_time_ratio')))} of the original's training step"
    )
    legend = "; ".join(
        f'<span class="strategy-{k}">{k}</span>: {_e(v)}' for k, v in STRATEGIES.items()
    )
    return (
        f'<h2 id="plan">Memory plan</h2><p>{ratios}</p>'
        f'<table class="plan">{head}{"".join(rows)}</table><p class="legend">{legend}; the '
        f"strategy of each module shows as the bar on the right of the module list.</p>"
    )


def _ratio(x: object) -> str:
    return f"{x:.2f}x" if isinstance(x, (int, float)) else "n/a"


def _module_list(report: Mapping[str, Any], modules: Sequence[tuple[str, str]]) -> str:
    blocks: dict[str, tuple[int, int]] = {}
    for i, c in enumerate(report.get("chains", [])):
        for j, path in enumerate(_block_paths(c)):
            if path:
                blocks.setdefault(path, (i, j))
    skipped: dict[str, list[str]] = {}
    for s in report.get("skipped", []):
        skipped.setdefault(s.get("module") or "", []).append(str(s.get("reason", "")))
    opaque = {m.get("module"): m.get("reason", "") for m in report.get("leaves", [])}
    strategy: dict[str, tuple[str, str]] = {}
    for r in (report.get("plan") or {}).get("regions", []):
        for path in r.get("modules", []):
            strategy[path] = (str(r.get("strategy", "")), str(r.get("name", "")))
    items = []
    for path, type_name in modules:
        classes = ["mod"]
        attrs = [f'data-path="{_e(path)}"', f'style="--depth:{path.count(".")}']
        badges = []
        owner = _owner(path, blocks)
        if owner is not None:
            i, j = owner
            classes.append("in-chain")
            attrs.append(f'data-chain="{i}"')
            attrs[1] += f";--c:{_hue(i)}"
            if path in blocks:
                classes.append("block-root")
                badges.append(f'<span class="badge">chain {i}, block {j}</span>')
        attrs[1] += '"'
        if path in skipped:
            reasons = "; ".join(skipped[path])
            classes.append("skipped")
            badges.append(f'<span class="badge skip" title="{_e(reasons)}">add skipped: '
                          f"{_e(reasons)}</span>")  # fmt: skip
        if path in opaque:
            classes.append("opaque")
            badges.append(f'<span class="badge opaque">opaque: {_e(opaque[path])}</span>')
        planned = _owner(path, strategy)
        if planned is not None:
            classes.append(f"plan-{_e(planned[0])}")
            attrs.append(f'data-strategy="{_e(planned[0])}" data-region="{_e(planned[1])}"')
        items.append(
            f'<li class="{" ".join(classes)}" {" ".join(attrs)}>{_e(path)} '
            f'<span class="type">{_e(type_name)}</span>{"".join(badges)}</li>'
        )
    return f'<ol class="modules">{"".join(items)}</ol>'


def render_html(
    report: Mapping[str, Any],
    modules: Sequence[tuple[str, str]],
    *,
    costs: Mapping[str, Any] | None = None,
    title: str | None = None,
    subtitle: str = "",
) -> str:
    """The page, as a string: see the module docstring.

    Parameters
    ----------
    report : mapping
        ``report.as_dict()`` of :func:`fxmomentum.inspect` / :func:`fxmomentum.convert`; a
        ``"plan"`` key (the memory planner's) is shown when present.
    modules : sequence of (str, str)
        The model's modules in order, ``(path, class name)`` (:func:`model_modules`).
    costs : mapping, optional
        :func:`measure_costs` of the model on its example inputs.
    title, subtitle : str
        The page's heading (default: the model's class) and a line under it.

    Examples
    --------
    >>> import fxmomentum
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    >>> page = render_html(fxmomentum.inspect(model).as_dict(), model_modules(model))
    >>> page.startswith("<!DOCTYPE html>"), "http" in page
    (True, False)
    """
    name = str(report.get("model", "model"))
    title = title or name
    notes = "".join(f'<p class="note">note: {_e(n)}</p>' for n in report.get("notes", []))
    summary = (
        f"{report.get('num_chains', 0)} residual chain(s), {report.get('num_converted', 0)} "
        f"converted ({report.get('num_blocks_converted', 0)} blocks); "
        f"{len(report.get('skipped', []))} residual add(s) skipped; "
        f"{len(report.get('leaves', []))} opaque module(s); shapes "
        f"{'verified' if report.get('shapes_verified') else 'unverified'}"
    )
    skipped = "".join(
        f"<li><code>{_e(s.get('module') or s.get('node'))}</code>: {_e(s.get('reason'))}</li>"
        for s in report.get("skipped", [])
    )
    leaves = "".join(
        f"<li><code>{_e(m.get('module'))}</code> ({_e(m.get('type'))}): {_e(m.get('reason'))}</li>"
        for m in report.get("leaves", [])
    )
    plan = report.get("plan")
    data = json.dumps({"chains": len(report.get("chains", [])), "plan": bool(plan)})
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}: residual chains (fxmomentum)</title>",
        f"<style>{_CSS}</style></head>",
        f"<body data-report='{_e(data)}'>",
        f"<header><h1>{_e(title)}</h1><p>{_e(subtitle or summary)}</p></header><main>",
        f"<p>{_e(summary)}</p>" if subtitle else "",
        '<h2 id="chains">Residual chains</h2>',
        _chain_table(report, costs),
        _plan_section(plan) if plan else "",
        '<h2 id="modules">Modules</h2>',
        '<p><label><input type="checkbox" id="only-chains"> only chains</label> '
        '&middot; <span id="highlighted-count">?</span> modules in chains</p>',
        _module_list(report, modules),
    ]
    if skipped:
        parts += ['<h2 id="skipped">Residual adds not converted</h2>', f"<ul>{skipped}</ul>"]
    if leaves:
        parts += ['<h2 id="opaque">Opaque modules</h2>', f"<ul>{leaves}</ul>"]
    if notes:
        parts += ['<h2 id="notes">Notes</h2>', notes]
    parts += ["</main>", f"<script>{_JS}</script>", "</body></html>"]
    return "\n".join(p for p in parts if p) + "\n"


def write_html(
    path: str | os.PathLike,
    report: Mapping[str, Any],
    modules: Sequence[tuple[str, str]],
    **options: Any,
) -> None:
    """:func:`render_html` written to ``path`` atomically (nothing half-written on failure).

    Examples
    --------
    >>> import fxmomentum, os, tempfile
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> out = os.path.join(tempfile.mkdtemp(), "model.html")
    >>> write_html(out, fxmomentum.inspect(model).as_dict(), model_modules(model))
    >>> os.path.getsize(out) > 1000
    True
    """
    text = render_html(report, modules, **options)
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
