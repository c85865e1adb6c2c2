"""``fxmomentum inspect --html``: the page's content, a memory plan, and the page as a real
browser shows it (headless Chromium; skipped only where no Chromium is installed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch
from torch import nn

import fxmomentum
from fxmomentum.tools import cli
from fxmomentum.tools.html import measure_costs, model_modules, render_html, write_html

CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
    None,
)


class Elements(HTMLParser):
    """Every element's tag, attributes and the text right inside it."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        el = {"tag": tag, **{k: v or "" for k, v in attrs}, "text": ""}
        self.elements.append(el)
        if tag not in ("meta", "input", "br", "link"):
            self._open.append(el)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data: str) -> None:
        for el in self._open:
            el["text"] += data

    def find(self, tag: str, cls: str | None = None) -> list[dict]:
        return [
            e
            for e in self.elements
            if e["tag"] == tag and (cls is None or cls in e.get("class", "").split())
        ]


def dump_dom(path: str, tmp_path) -> str:
    """The DOM after the page's scripts ran, from headless Chromium."""
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", "--dump-dom", f"file://{path}"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


# -- the page from a report dict -------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


PLAN = {
    "budget": 0.5,
    "estimated_memory_ratio": 0.42,
    "estimated_time_ratio": 1.31,
    "regions": [
        {"name": "momentum_chain_0", "kind": "chain", "strategy": "reversible",
         "modules": ["blocks.0", "blocks.1", "blocks.2"], "kept_bytes": 4096,
         "time_added": 0.0123},
        {"name": "segment_0", "kind": "segment", "strategy": "recompute", "modules": ["stem"],
         "kept_bytes": 512, "time_added": 0.002},
        {"name": "segment_1", "kind": "segment", "strategy": "keep", "modules": ["head"],
         "kept_bytes": 2048, "time_added": 0.0},
    ],
}  # fmt: skip


def test_page_from_a_report_dict_with_a_plan():
    model = Net()
    x = torch.randn(2, 4)
    report = fxmomentum.inspect(model, x).as_dict()
    report["plan"] = PLAN  # the memory planner's section, when it is there
    page = render_html(report, model_modules(model), costs=measure_costs(model, (x,), report))
    doc = Elements(page)
    # Self-contained: no link, script or font from elsewhere.
    assert not re.search(r"https?://|//[a-z]|@import|url\(", page)
    assert not any(e.get("src") or e.get("href") for e in doc.elements)
    rows = doc.find("tr", "chain-row")
    assert len(rows) == 1 and "momentum_chain_0" in rows[0]["text"]
    assert "blocks.0" in rows[0]["text"] and "blocks.2" in rows[0]["text"]
    assert "% of a forward" in rows[0]["text"]
    mods = {e["data-path"]: e for e in doc.find("li", "mod")}
    assert list(mods) == [p for p, _ in model_modules(model)]
    in_chain = {p for p, e in mods.items() if "in-chain" in e["class"].split()}
    assert in_chain == {f"blocks.{i}{s}" for i in range(3) for s in ("", ".0", ".1")}
    assert {e["data-strategy"] for p, e in mods.items() if p.startswith("blocks.")} == {
        "reversible"
    }
    assert mods["stem"]["data-strategy"] == "recompute" and "plan-keep" in mods["head"]["class"]
    assert "data-strategy" not in mods["blocks"]
    regions = doc.find("tr", "region")
    assert [r["data-region"] for r in regions] == ["momentum_chain_0", "segment_0", "segment_1"]
    assert "reversible" in regions[0]["text"] and "12.3 ms" in regions[0]["text"]
    assert "4.0 KiB" in regions[0]["text"]
    assert "budget 0.5; estimated memory 0.42x and time 1.31x" in page
    without = render_html(fxmomentum.inspect(model, x).as_dict(), model_modules(model))
    assert 'id="plan"' not in without and "data-strategy" not in without


def test_page_marks_skipped_adds_opaque_modules_and_escapes():
    report = {
        "model": "M<x>",
        "chains": [],
        "skipped": [{"node": "add", "module": "a", "reason": "projection <shortcut>"}],
        "leaves": [{"module": "b", "type": "Gate", "reason": "not traceable: if x > 0"}],
        "notes": ["a note & more"],
    }
    page = render_html(report, [("a", "Block"), ("b", "Gate")])
    doc = Elements(page)
    a, b = doc.find("li", "mod")
    assert "skipped" in a["class"] and "projection <shortcut>" in a["text"]
    assert "opaque" in b["class"] and "not traceable: if x > 0" in b["text"]
    assert "<shortcut>" not in page and "M&lt;x&gt;" in page
    assert "No residual chain was found." in page and "note: a note &amp; more" in page


def test_write_html_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "page.html"
    write_html(out, {"model": "M", "chains": []}, [])
    assert os.listdir(tmp_path) == ["page.html"]

    def broken(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr("fxmomentum.tools.html.render_html", broken)
    with pytest.raises(RuntimeError):
        write_html(tmp_path / "other.html", {}, [])
    assert os.listdir(tmp_path) == ["page.html"]


def test_inspect_html_option(capsys, tmp_path):
    out = tmp_path / "nested" / "net.html"
    code = cli.main(["inspect", "torchvision.models:resnet18", "--html", str(out)])
    _, err = capsys.readouterr()
    assert code == 7 and "cannot write --html" in err and not out.parent.exists()
    out = tmp_path / "net.html"
    code = cli.main(["inspect", "torchvision.models:resnet18", "--html", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert err.strip() == f"wrote {out} (one self-contained page; open it in a browser)"
    page = out.read_text()
    assert "Shares and time costs need example inputs" in page  # no inputs: nothing measured
    assert os.listdir(tmp_path) == ["net.html"]


# -- in a browser ----------------------------------------------------------------------------------
def _encoder_file(tmp_path) -> str:
    path = tmp_path / "encoder.py"
    path.write_text(
        "import torch\nfrom torch import nn\n"
        "layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)\n"
        "model = nn.Sequential(nn.Linear(6, 16),\n"
        "                      nn.TransformerEncoder(layer, 3, enable_nested_tensor=False))\n"
        "example_inputs = torch.randn(2, 5, 6)\n"
    )
    return str(path)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (CI installs it)")
@pytest.mark.parametrize("which", ["resnet18", "transformer"])
def test_page_in_a_browser_shows_every_chain(tmp_path, which):
    if which == "resnet18":
        argv = ["torchvision.models:resnet18", "--input-shape", "1,3,64,64"]
    else:
        argv = [_encoder_file(tmp_path)]
    page = tmp_path / f"{which}.html"
    proc = subprocess.run(
        [sys.executable, "-m", "fxmomentum", "inspect", *argv, "--format", "json",
         "--html", str(page)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import json

    report = json.loads(proc.stdout)
    assert report["chains"]
    dom = Elements(dump_dom(str(page), tmp_path))
    (body,) = dom.find("body")
    assert body.get("data-ready") == "1"  # the page's script ran
    rows = dom.find("tr", "chain-row")
    assert len(rows) == len(report["chains"])
    for i, (row, chain) in enumerate(zip(rows, report["chains"], strict=True)):
        assert row["data-chain"] == str(i)
        for key in ("name", "first", "last"):
            assert chain[key] in row["text"], (key, chain[key], row["text"])
        assert "% of a forward" in row["text"]  # measured on the example inputs
        roots = {b["path"] for b in chain["blocks"]}
        marked = [e for e in dom.find("li", "in-chain") if e["data-chain"] == str(i)]
        assert {e["data-path"] for e in marked if "block-root" in e["class"].split()} == roots
        assert all(any(e["data-path"] == r or e["data-path"].startswith(r + ".") for r in roots)
                   for e in marked)  # fmt: skip
    (count,) = [e for e in dom.elements if e.get("id") == "highlighted-count"]
    assert count["text"] == str(len(dom.find("li", "in-chain"))) != "0"
    for skipped in report["skipped"]:
        assert any(skipped["reason"] in e["text"] for e in dom.find("li", "skipped"))
