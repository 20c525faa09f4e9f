"""The offline explorer page, without a browser: one embedded ledger, nothing fetched, inert text."""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner

from kimi_jax.explorer import page as explorer
from kimi_jax.explorer.page import ExplorerError, explore_command, json_for_script, render_explorer
from kimi_jax.ledger.ledger import (
    LEDGER_SCHEMA_ID,
    LEDGER_VERSION,
    derive_routing_weights,
    provenance_map,
    validate_ledger,
)

HEX = "0123456789abcdef" * 4
HOSTILE = [
    "<script>window.__pwned=1</script>",
    "</script><script>window.__pwned=2</script>",
    "</SCRIPT ><img src=x onerror=window.__pwned=3>",
    "<!--<script>",
    "line\u2028separator\u2029& &amp; \"quoted\" 'single' \\ back",
    "ünïcödé 漢字 🙂",
]


def small_ledger(token_texts: list[str] | None = None, steps: int = 3, layers: int = 3) -> dict:
    """A schema-valid ledger shaped like a real one (layer 0 dense, the rest MoE, top-2 of 8)."""
    out, context = [], [7, 300]
    for i in range(steps):
        entries = []
        for L in range(layers):
            entry = {"layer": L, "kind": "dense" if L == 0 else "moe", "norm_in": 1.5 + L + i / 8,
                     "norm_out": 2.25 + L + i / 8}  # fmt: skip
            if L:
                scores = [[0.75, 0.5 - p / 16] for p in range(len(context))]
                experts = [[(L + p) % 8, (L + p + 3) % 8] for p in range(len(context))]
                entry.update(experts=experts, router_scores=scores, routing_weights=derive_routing_weights(scores))
            entry["bytes_read"] = 1000 * (L + 1) + i
            entries.append(entry)
        step = {"index": i, "context": list(context), "token": 40 + i, "logit": 10.5 - i, "probability": 0.5, "rank": 0,
                "top_k": [[40 + i, 10.5 - i],
                [3, 9.25 - i]], "entropy": 1.25, "margin": 1.25, "hidden_digest": HEX, "logits_digest": HEX,
                "bytes_read": 10_000 + i, "wall_s": 0.5, "layers": entries}  # fmt: skip
        if token_texts is not None:
            step["token_text"] = token_texts[i % len(token_texts)]
        out.append(step)
        context.append(40 + i)
    ledger = {
        "schema": LEDGER_SCHEMA_ID, "ledger_version": LEDGER_VERSION, "software": {"kimi-jax": "test"},
        "manifest_digest": HEX,
        "checkpoint": {"layout": "kimi-k2.5-int4", "path": "/ckpt", "config_digest": HEX, "tensor_list_digest": HEX,
                       "tokenizer": None},
        "platform": {"backend": "cpu"}, "platform_digest": HEX,
        "run": {"prompt": [7, 300], "prompt_input": {"tokens": [7, 300]}, "sampling": None,
                "stop": {"tokens": [], "strings": []}, "max_new_tokens": steps, "kv_cache": False, "dtype": "float32",
                "dequant": "exact",
                "capture": ["norms", "routing", "logits"], "page_cache_evicted": False, "page_cache_resident_bytes": 0,
                "shard_bytes": 1},
        "steps": out, "stopped": {"reason": "max_new_tokens"}, "text": None,
        "totals": {"bytes_read": sum(s["bytes_read"] for s in out), "wall_s": 1.5},
        "anchor": None, "non_perturbation": None,
    }  # fmt: skip
    validate_ledger(ledger)
    return ledger


class _Page(HTMLParser):
    """Every element with its attributes, and the text of every script element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._in_script: dict[str, str | None] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script, self._text = dict(attrs), []

    def handle_data(self, data):
        if self._in_script is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "script" and self._in_script is not None:
            self.scripts.append((self._in_script, "".join(self._text)))
            self._in_script = None


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def _own_code() -> str:
    base = resources.files("kimi_jax").joinpath("assets", "explorer")
    names = ("explorer.html", "explorer.js", "explorer.css", "verify.js")
    return "\n".join(base.joinpath(n).read_text(encoding="utf-8") for n in names)


def test_the_ledger_is_embedded_once_and_equals_the_input():
    ledger = small_ledger(HOSTILE, steps=6)
    page = render_explorer(ledger)
    parsed = parse(page)
    json_blocks = [(a, t) for a, t in parsed.scripts if a.get("type") == "application/json"]
    assert len(json_blocks) == 1 and page.count("application/json") == 1
    attrs, text = json_blocks[0]
    assert attrs.get("id") == "ledger-data"
    assert json.loads(text) == ledger
    # everything else is classic inline script, none with a src
    others = [a for a, _ in parsed.scripts if a.get("type") != "application/json"]
    assert others and all(set(a) == set() for a in others)


def test_markup_in_token_text_cannot_close_the_script_block():
    ledger = small_ledger(HOSTILE, steps=6)
    page = render_explorer(ledger)
    data = page.split('id="ledger-data">', 1)[1].split("</script>", 1)[0]
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in data
    assert json.loads(data) == ledger
    # the only script end tags are the four real ones (ledger data, libraries, explorer, verifier), and no
    # hostile text appears raw anywhere
    assert len(re.findall(r"</script", page, re.IGNORECASE)) == 4
    for text in HOSTILE[:4]:
        assert text not in page
    assert "window.__pwned" in data  # it is there, as inert JSON string content
    assert len(parse(page).scripts) == 4


def test_json_for_script_round_trips_awkward_strings():
    value = {"a": "</script>\u2028\u2029<!--&", "lone": "\ud800x", "n": [1.5, -0.0, 3], "k<": None}
    text = json_for_script(value)
    assert json.loads(text) == value
    text.encode("utf-8")  # a lone surrogate is escaped, so the page is valid UTF-8
    assert not set("<>&\u2028\u2029") & set(text)


def test_nothing_is_fetched_from_anywhere():
    page = render_explorer(small_ledger(HOSTILE))
    parsed = parse(page)
    url_attrs = {"src", "href", "action", "formaction", "srcset", "poster", "data", "background", "ping", "manifest",
                 "xlink:href", "codebase", "cite", "longdesc"}  # fmt: skip
    for tag, attrs in parsed.elements:
        assert tag not in {"link", "img", "iframe", "object", "embed", "base", "video", "audio", "source", "form"}, tag
        for name, value in attrs.items():
            if tag == "a" and name == "href" and value in ("note.pdf", "#verify"):
                continue  # links the reader may follow (the bundle's note beside the page, a section), never fetched
            assert name not in url_attrs, (tag, name, value)
            if not (tag == "meta" and name == "content"):
                assert not re.search(r"(https?:)?//", value or ""), (tag, name, value)
    # our own code never fetches, imports, or opens connections, and refers to no URL
    code = _own_code()
    for forbidden in ("fetch(", "XMLHttpRequest", "import(", "importScripts", "WebSocket", "EventSource",
                      "sendBeacon", "http://", "https://", "url(", "@import", "window.open", "location."):  # fmt: skip
        assert forbidden not in code, forbidden
    # the vendored libraries' source-map comments (the only references that could cause a fetch) are dropped
    assert "sourceMappingURL" not in page


def test_content_security_policy_forbids_every_fetch():
    page = render_explorer(small_ledger())
    metas = [a for t, a in parse(page).elements if t == "meta" and (a.get("http-equiv") or "").lower() ==
             "content-security-policy"]  # fmt: skip
    assert len(metas) == 1
    policy = {d.split()[0]: d.split()[1:] for d in metas[0]["content"].split(";") if d.strip()}
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'unsafe-inline'"] and policy["style-src"] == ["'unsafe-inline'"]
    assert policy["img-src"] == ["data:"]
    assert not {"connect-src", "font-src", "frame-src", "child-src", "worker-src"} & policy.keys()
    # the policy is the first thing in <head> after the charset, before any script or style
    assert page.index("Content-Security-Policy") < page.index("<style") < page.index("<script")


def test_ledger_text_is_never_parsed_as_html():
    code = resources.files("kimi_jax").joinpath("assets", "explorer", "explorer.js").read_text(encoding="utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "DOMParser",
                 "createContextualFragment", "eval(", "new Function", "setTimeout(\"", "srcdoc"):  # fmt: skip
        assert sink not in code, sink
    assert "textContent" in code and "createTextNode" in code


def test_provenance_comes_from_the_schema():
    page = render_explorer(small_ledger())
    inlined = re.search(r"const PROVENANCE = (\{.*?\});", page).group(1)
    assert json.loads(inlined) == provenance_map()
    assert provenance_map()["steps[].token_text"] == "derived"
    code = resources.files("kimi_jax").joinpath("assets", "explorer", "explorer.js").read_text(encoding="utf-8")
    # no field is labelled in the page's code: classes are only ever built from a provOf(path) lookup
    assert not re.search(r"prov-(measured|derived)", code)
    for label in ("measured", "derived"):
        assert f'"{label}"' not in code and f"'{label}'" not in code


def test_title_libraries_and_no_interpretation():
    page = render_explorer(small_ledger(), title="<b>Ledger & co</b>")
    assert "<title>&lt;b&gt;Ledger &amp; co&lt;/b&gt;</title>" in page and "<b>Ledger" not in page
    default = render_explorer(small_ledger())
    assert "<title>Kimi K2.5 Output Formation Ledger</title>" in default
    assert "Chart.js v4" in default and "chartjs-chart-matrix" in default
    assert default.count("Chart.js v4") == 1
    for word in ("phase", "plateau", "ascent", "decay", "spike", "reasoning"):
        assert word not in _own_code().lower(), word


def test_render_rejects_a_ledger_without_steps():
    with pytest.raises(ExplorerError, match="no steps"):
        render_explorer({"steps": []})


# -- kimi-jax explore -----------------------------------------------------------------------------


def _bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "ledger.json").write_text(json.dumps(small_ledger(["a", "b"])))
    return bundle


def test_explore_renders_a_missing_page_and_prints_its_url(tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(explorer.webbrowser, "open", lambda url: opened.append(url) or True)
    bundle = _bundle(tmp_path)
    result = CliRunner().invoke(explore_command, [str(bundle)])
    assert result.exit_code == 0, result.output
    page = bundle / "explorer.html"
    assert page.is_file()
    assert result.stdout.strip() == page.resolve().as_uri()
    assert opened == [page.resolve().as_uri()]
    embedded = page.read_text(encoding="utf-8").split('id="ledger-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(embedded) == json.loads((bundle / "ledger.json").read_text())

    # an existing page is opened as it is, not rendered again
    page.write_text("kept")
    again = CliRunner().invoke(explore_command, [str(bundle), "--no-browser"])
    assert again.exit_code == 0 and page.read_text() == "kept" and len(opened) == 1


def test_explore_refuses_a_directory_that_is_not_a_bundle(tmp_path):
    result = CliRunner().invoke(explore_command, [str(tmp_path), "--no-browser"])
    assert result.exit_code == 2 and "ledger.json" in result.output


def test_explore_serve_binds_loopback_only(tmp_path, monkeypatch):
    bundle = _bundle(tmp_path)
    seen = {}

    def run_briefly(server):
        seen["address"] = server.server_address
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/explorer.html", timeout=10) as r:
                seen["body"], seen["csp"] = r.read().decode(), r.headers["Content-Security-Policy"]
        finally:
            server.shutdown()
            thread.join(10)

    monkeypatch.setattr(explorer, "_run_server", run_briefly)
    result = CliRunner().invoke(explore_command, [str(bundle), "--serve", "--port", "0", "--no-browser"])
    assert result.exit_code == 0, result.output
    host, port = seen["address"]
    assert host == "127.0.0.1" and port > 0
    assert result.stdout.strip() == f"http://127.0.0.1:{port}/explorer.html"
    assert seen["body"] == (bundle / "explorer.html").read_text(encoding="utf-8")
    assert "default-src 'none'" in seen["csp"]


def test_a_bundle_written_with_its_page_passes_the_verifier(tiny_checkpoints, tmp_path):
    """What ``write_bundle(..., explorer_html=render_explorer(ledger))`` gives: a page the verifier accepts."""
    verify = pytest.importorskip("kimi_jax.verify.checklist")
    from kimi_jax.ledger.bundle import write_bundle
    from kimi_jax.manifest import parse_manifest_dict
    from kimi_jax.run.plan import prepare_run
    from kimi_jax.run.runner import execute

    data = {"version": 1, "model": {"checkpoint": str(tiny_checkpoints["kimi-k2.5"])}, "prompt": {"tokens": [7, 300]},
            "generate": {"max_new_tokens": 2}, "output": {"dir": str(tmp_path / "out")}}  # fmt: skip
    plan = prepare_run(parse_manifest_dict(data, source=str(tmp_path / "m.yaml")))
    outcome = execute(plan, prove=False, echo=lambda *_: None, progress=False)
    out = write_bundle(tmp_path / "with-page", plan.manifest, outcome.ledger, outcome.steps, None,
                       explorer_html=render_explorer(outcome.ledger))  # fmt: skip
    checks = {c.name: c for c in verify.verify_bundle(out).checks}
    assert checks["explorer"].status == "OK", checks["explorer"].reason
    assert checks["checksums"].status == "OK", checks["checksums"].reason


def test_exploring_a_read_only_bundle_without_a_page_is_a_named_error(small_bundle, tmp_path, monkeypatch):
    """Main ended in an internal error (PermissionError/EROFS) rendering the page into the bundle."""
    import errno
    import os
    import shutil

    from kimi_jax.cli import main

    bundle = Path(shutil.copytree(small_bundle, tmp_path / "bundle"))
    (bundle / "explorer.html").unlink()

    def read_only(path, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr("kimi_jax.fileio.write_bytes_atomic", read_only)
    result = CliRunner().invoke(main, ["explore", str(bundle), "--no-browser"])
    assert result.exit_code == 2, result.output
    assert f"error: {bundle}: the bundle has no explorer.html, and rendering one into it failed: read-only file " \
           "system [EROFS]" in result.output and "internal error" not in result.output  # fmt: skip
