"""The explorer page of a real bundle, in headless Chromium (Playwright), opened from file://.

Needs the Debian package ``chromium`` (``/usr/bin/chromium``; another binary via
``KIMI_JAX_CHROMIUM``) and the ``playwright`` Python package (its own browser download,
``playwright install``, is never used). Without them every test here is skipped, with the
reason. Screenshots go to a temporary directory (printed; ``KIMI_JAX_SCREENSHOTS=DIR`` keeps
them in DIR).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from kimi_jax.cli import main
from kimi_jax.explorer.page import explore_command, render_explorer
from kimi_jax.ledger.ledger import provenance_map
from kimi_jax.manifest import parse_manifest_dict
from kimi_jax.run.plan import prepare_run
from kimi_jax.run.runner import execute

CHROMIUM = os.environ.get("KIMI_JAX_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip
# Recorded before any page script runs: every CSP violation (a blocked fetch, style or script).
WATCH = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));
"""


@pytest.fixture(scope="module")
def browser():
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set KIMI_JAX_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install playwright; no 'playwright install' needed)")
    manager = sync_playwright().start()
    try:
        try:
            chromium = manager.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        except Exception as e:  # a binary Playwright cannot drive
            pytest.skip(f"Playwright cannot launch {CHROMIUM}: {str(e).splitlines()[0]}")
        yield chromium
        chromium.close()
    finally:
        manager.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    where = os.environ.get("KIMI_JAX_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("explorer-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"\nexplorer screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def bundle(tiny_checkpoints, tmp_path_factory):
    """A real run bundle of the tiny Kimi K2.5-layout checkpoint, with its page rendered by the CLI."""
    tmp = tmp_path_factory.mktemp("explorer-bundle")
    data = {"version": 1, "model": {"checkpoint": str(tiny_checkpoints["kimi-k2.5"])},
            "prompt": {"tokens": [7, 300, 7]}, "generate": {"max_new_tokens": 5}, "output": {"dir": str(tmp / "out")}}
    outcome = execute(prepare_run(parse_manifest_dict(data, source=str(tmp / "m.yaml"))), echo=lambda *_: None,
                      progress=False)  # fmt: skip
    out = outcome.ledger_path.parent
    result = CliRunner().invoke(explore_command, [str(out), "--no-browser"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def ledger(bundle):
    return json.loads((bundle / "ledger.json").read_text())


class Opened:
    def __init__(self, page, url, requests, errors):
        self.page, self.url, self.requests, self.errors = page, url, requests, errors

    def text(self, selector: str) -> str:
        return self.page.locator(selector).text_content()

    def texts(self, selector: str) -> list[str]:
        return self.page.locator(selector).all_text_contents()

    def check_clean(self) -> None:
        assert self.requests == [self.url], f"network requests besides the page itself: {self.requests}"
        assert self.errors == [], self.errors
        assert self.page.evaluate("window.__cspViolations") == []


@pytest.fixture
def open_page(browser):
    contexts = []

    def opener(path: Path, width: int = 1400) -> Opened:
        context = browser.new_context(viewport={"width": width, "height": 900}, service_workers="block")
        contexts.append(context)
        url = path.resolve().as_uri()
        requests: list[str] = []
        errors: list[str] = []
        # record every request; let only the page itself through
        context.route("**/*", lambda route: route.continue_() if route.request.url == url else route.abort())
        page = context.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
                else None)  # fmt: skip
        page.add_init_script(WATCH)
        page.goto(url)
        page.wait_for_function("window.__explorerReady !== undefined", timeout=30_000)
        return Opened(page, url, requests, errors)

    yield opener
    for context in contexts:
        context.close()


def _shot(o: Opened, path: Path, full_page: bool = True) -> None:
    o.page.evaluate("window.scrollTo(0, 0)")
    o.page.screenshot(path=str(path), full_page=full_page)


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def test_page_loads_with_no_network_and_shows_the_ledger(open_page, bundle, ledger, shots):
    o = open_page(bundle / "explorer.html")
    _shot(o, shots / "explorer_full.png")
    o.check_clean()
    assert o.page.title() == "Kimi K2.5 Output Formation Ledger"
    assert o.text("#page-title") == "Kimi K2.5 Output Formation Ledger"
    assert o.page.evaluate("JSON.parse(document.getElementById('ledger-data').textContent)") == ledger

    # headline
    assert o.text("#headline-manifest_digest") == ledger["manifest_digest"]
    assert o.text("#headline-platform_digest") == ledger["platform_digest"]
    assert o.text("#headline-checkpoint-layout") == ledger["checkpoint"]["layout"]
    assert o.text("#headline-non_perturbation-identical") == "true"
    assert o.text("#headline-non_perturbation-scope") == ledger["non_perturbation"]["scope"] == "first"
    assert o.text("#headline-anchor-status") == "null"
    assert _num(o.text("#headline-totals-bytes_read")) == ledger["totals"]["bytes_read"]
    for field in ("wall_s", "compile_s", "proof_wall_s", "run_wall_s"):
        assert float(o.text(f"#headline-totals-{field}")) == ledger["totals"][field], field

    # token timeline: every step, every column
    rows = o.page.locator("#timeline-table tbody tr")
    assert rows.count() == len(ledger["steps"])
    for i, step in enumerate(ledger["steps"]):
        cell = lambda field: rows.nth(i).locator(f'td[data-field="{field}"]').text_content()  # noqa: E731
        assert int(cell("index")) == step["index"]
        assert _ints(cell("context")) == step["context"]
        assert int(cell("token")) == step["token"]
        assert float(cell("logit")) == step["logit"]
        assert float(cell("margin")) == step["margin"] and float(cell("entropy")) == step["entropy"]
        assert _num(cell("bytes_read")) == step["bytes_read"]
        assert float(cell("wall_s")) == step["wall_s"]

    # layer table of the default step (0), at the default position (the last)
    step = ledger["steps"][0]
    pos = len(step["layers"][1]["experts"]) - 1
    for layer in (step["layers"][0], step["layers"][1], step["layers"][-1]):
        row = o.page.locator(f'#layer-table tbody tr[data-layer="{layer["layer"]}"]')
        cell = lambda field: row.locator(f'td[data-field="{field}"]').text_content()  # noqa: E731
        assert cell("kind") == layer["kind"]
        assert float(cell("norm_in")) == layer["norm_in"] and float(cell("norm_out")) == layer["norm_out"]
        assert _num(cell("bytes_read")) == layer["bytes_read"]
        if layer["kind"] == "moe":
            assert _ints(cell("experts")) == layer["experts"][pos]
            assert _floats(cell("routing_weights")) == layer["routing_weights"][pos]
            assert _floats(cell("router_scores")) == layer["router_scores"][pos]
        else:
            assert cell("experts") == "–"

    # byte accounting: every layer of every step, and the step totals
    for i, s in enumerate(ledger["steps"]):
        got = [_num(t) for t in o.texts(f'#bytes-table tbody td[data-step="{i}"]')]
        assert got == [l["bytes_read"] for l in s["layers"]]
        assert _num(o.text(f'#bytes-table tfoot td[data-step="{i}"]')) == s["bytes_read"]

    # charts hold exactly the ledger's values
    norms = o.page.evaluate("explorer.charts.norm.data.datasets.map(d => d.data)")
    assert norms == [[l["norm_out"] for l in s["layers"]] for s in ledger["steps"]]
    assert o.page.evaluate("explorer.charts.bytes.data.datasets[0].data") == [l["bytes_read"] for l in step["layers"]]
    cells = o.page.evaluate("explorer.charts.heatmap.data.datasets[0].data")
    want = [{"x": e, "y": l["layer"], "v": w, "s": sc} for l in step["layers"] if "experts" in l
            for e, w, sc in zip(l["experts"][pos], l["routing_weights"][pos], l["router_scores"][pos])]  # fmt: skip
    assert [{k: c[k] for k in "xyvs"} for c in cells] == want
    o.check_clean()


def test_selecting_a_step_updates_every_panel(open_page, bundle, ledger, shots):
    o = open_page(bundle / "explorer.html")
    for i in (3, 1, len(ledger["steps"]) - 1):
        step = ledger["steps"][i]
        o.page.locator(f'#timeline-table tbody tr[data-step="{i}"]').click()
        pos = len(step["layers"][1]["experts"]) - 1
        assert o.page.evaluate("[explorer.state.step, explorer.state.pos]") == [i, pos]
        assert "selected" in o.page.locator(f'#timeline-table tbody tr[data-step="{i}"]').get_attribute("class")
        assert o.page.locator("#timeline-table tbody tr.selected").count() == 1
        assert o.text("#step-detail-title") == f"Step {step['index']}"
        assert int(o.text('#step-fields td[data-field="token"]')) == step["token"]
        assert o.text('#step-fields td[data-field="hidden_digest"]') == step["hidden_digest"]
        assert float(o.text('#step-fields td[data-field="compile_s"]')) == step["compile_s"]
        # the token's bytes byte by byte as \xNN: "2373" would read as a number
        shown = o.text('#step-fields td[data-field="token_bytes"]')
        assert shown == "".join(f"\\x{step['token_bytes'][j:j + 2]}" for j in range(0, len(step["token_bytes"]), 2))
        assert bytes.fromhex(shown.replace("\\x", "")) == bytes.fromhex(step["token_bytes"])
        ids, logits = o.texts('#topk-table tbody td[data-field="token"]'), o.texts('#topk-table tbody td[data-field="logit"]')
        assert [[int(t), float(v)] for t, v in zip(ids, logits)] == step["top_k"]
        assert o.texts('#topk-table tbody td[data-field="text"]') == step["top_k_text"]
        for layer in step["layers"]:
            row = o.page.locator(f'#layer-table tbody tr[data-layer="{layer["layer"]}"]')
            assert float(row.locator('td[data-field="norm_out"]').text_content()) == layer["norm_out"]
            assert _num(row.locator('td[data-field="bytes_read"]').text_content()) == layer["bytes_read"]
            if "experts" in layer:
                assert _ints(row.locator('td[data-field="experts"]').text_content()) == layer["experts"][pos]
        bars = o.page.evaluate("explorer.charts.bytes.data.datasets[0].data")
        assert bars == [l["bytes_read"] for l in step["layers"]]
        widths = o.page.evaluate("explorer.charts.norm.data.datasets.map(d => d.borderWidth)")
        assert widths.index(max(widths)) == i and widths.count(max(widths)) == 1
        heat = o.page.evaluate("explorer.charts.heatmap.data.datasets[0].data.map(c => [c.y, c.x, c.v])")
        assert heat == [[l["layer"], e, w] for l in step["layers"] if "experts" in l
                        for e, w in zip(l["experts"][pos], l["routing_weights"][pos])]  # fmt: skip
        assert o.page.locator("#position-select option").count() == pos + 1
        assert o.page.locator("#bytes-table thead th.selected").text_content() == f"step {step['index']}"
    _shot(o, shots / "explorer_step_selected.png")

    # norm_in is one click away
    o.page.locator('input[name="norm-field"][value="norm_in"]').check()
    assert o.page.evaluate("explorer.charts.norm.data.datasets.map(d => d.data)") == [
        [l["norm_in"] for l in s["layers"]] for s in ledger["steps"]]
    assert "norm_in" in o.text("#norm-badge")
    o.check_clean()


def test_selecting_a_layer_and_a_position_shows_its_routing(open_page, bundle, ledger, shots):
    o = open_page(bundle / "explorer.html")
    o.page.locator('#timeline-table tbody tr[data-step="2"]').click()
    step = ledger["steps"][2]
    moe = [l for l in step["layers"] if "experts" in l]
    for layer in (moe[-1], moe[0]):
        o.page.locator(f'#layer-table tbody tr[data-layer="{layer["layer"]}"]').click()
        assert o.page.evaluate("explorer.state.layer") == layer["layer"]
        assert o.text("#routing-detail-title").startswith(f"Layer {layer['layer']} (moe), step 2")
        for pos in (len(layer["experts"]) - 1, 0):
            o.page.locator("#position-select").select_option(str(pos))
            items = o.page.locator("#routing-selected li")
            shown = items.evaluate_all("els => els.map(e => Number(e.dataset.expert))")
            assert shown == layer["experts"][pos]
            spans = o.texts("#routing-selected li span")
            assert [float(t.split()[1]) for t in spans[1::3]] == layer["routing_weights"][pos]
            assert [float(t.split()[1]) for t in spans[2::3]] == layer["router_scores"][pos]
            detail = o.page.locator("#routing-detail-table tbody tr")
            assert detail.count() == len(layer["experts"])
            for p in range(len(layer["experts"])):
                tds = detail.nth(p).locator("td")
                assert _ints(tds.nth(1).text_content()) == layer["experts"][p]
                assert _floats(tds.nth(2).text_content()) == layer["routing_weights"][p]
            # the layer table follows the position
            row = o.page.locator(f'#layer-table tbody tr[data-layer="{layer["layer"]}"]')
            assert _ints(row.locator('td[data-field="experts"]').text_content()) == layer["experts"][pos]
    o.page.locator("#routing").screenshot(path=str(shots / "explorer_routing.png"))
    # a dense layer has no routing
    dense = next(l for l in step["layers"] if l["kind"] == "dense")
    o.page.locator(f'#layer-table tbody tr[data-layer="{dense["layer"]}"]').click()
    assert o.page.locator("#routing-selected li").all_text_contents() == ["no routed experts recorded for this layer"]
    o.check_clean()


def _expected_class(path: str, classes: dict[str, str]) -> str:
    p = path
    while p:
        if p in classes:
            return classes[p]
        m = re.match(r"^(.*?)(\[\]|\.[^.\[\]]+)$", p)
        if not m:
            break
        p = m.group(1)
    return "unclassified"


def test_every_value_carries_the_schema_provenance(open_page, bundle, ledger):
    o = open_page(bundle / "explorer.html")
    o.page.locator('#timeline-table tbody tr[data-step="1"]').click()
    classes = provenance_map()
    marked = o.page.locator("[data-path]").evaluate_all(
        "els => els.map(e => [e.dataset.path, e.dataset.prov, e.className])")
    assert len(marked) > 200
    for path, prov, cls in marked:
        want = _expected_class(path, classes)
        assert want != "unclassified", path
        assert prov == want and f"prov-{want}" in cls.split(), (path, prov, cls)
        assert f"prov-{'derived' if want == 'measured' else 'measured'}" not in cls.split(), (path, cls)
    by_path = {path: cls for path, _, cls in marked}
    for measured in ("steps[].token", "steps[].logit", "steps[].context", "steps[].bytes_read", "steps[].wall_s",
                     "steps[].layers[].norm_in", "steps[].layers[].norm_out", "steps[].layers[].experts",
                     "steps[].layers[].router_scores", "steps[].layers[].bytes_read", "checkpoint.layout"):  # fmt: skip
        assert "prov-measured" in by_path[measured].split(), measured
    for derived in ("steps[].margin", "steps[].entropy", "steps[].top_k", "steps[].hidden_digest",
                    "steps[].layers[].routing_weights", "manifest_digest", "platform_digest",
                    "non_perturbation.identical", "anchor.status"):  # fmt: skip
        assert "prov-derived" in by_path[derived].split(), derived
    # the legend explains both colours, and the colours differ
    assert o.text("#legend-measured") == "measured" and o.text("#legend-derived") == "derived"
    colour = "el => getComputedStyle(el).backgroundColor"
    measured_bg = o.page.locator('#timeline-table td[data-field="token"]').first.evaluate(colour)
    derived_bg = o.page.locator('#timeline-table td[data-field="margin"]').first.evaluate(colour)
    assert measured_bg == o.page.locator("#legend-measured").evaluate(colour)
    assert derived_bg == o.page.locator("#legend-derived").evaluate(colour)
    assert measured_bg != derived_bg
    assert o.page.locator("#legend-unclassified").is_hidden()


def test_markup_in_token_text_is_inert(open_page, ledger, tmp_path, shots):
    hostile = copy.deepcopy(ledger)
    texts = ["<script>window.__pwned=1</script>", '<img src=x onerror="window.__pwned=2">',
             "</script><script>window.__pwned=3</script>", "<b>bold</b> & \u2028 ünï"]  # fmt: skip
    for i, step in enumerate(hostile["steps"]):
        step["token_text"] = texts[i % len(texts)]
    page = tmp_path / "explorer.html"
    page.write_text(render_explorer(hostile), encoding="utf-8")
    o = open_page(page)
    _shot(o, shots / "explorer_hostile_token_text.png", full_page=False)
    assert o.page.evaluate("typeof window.__pwned") == "undefined"
    shown = o.texts('#timeline-table tbody td[data-field="token_text"]')
    assert shown == [s["token_text"] for s in hostile["steps"]]
    assert o.page.get_by_text("<script>window.__pwned=1</script>", exact=True).first.is_visible()
    assert o.page.locator("img").count() == 0 and o.page.locator("b").count() == 0
    assert o.page.locator("script").count() == 4
    o.page.locator('#timeline-table tbody tr[data-step="1"]').click()
    assert o.text('#step-fields td[data-field="token_text"]') == texts[1]
    assert "prov-derived" in o.page.locator('#step-fields td[data-field="token_text"]').get_attribute("class")
    assert o.page.evaluate("typeof window.__pwned") == "undefined"
    o.check_clean()


HOSTILE_TEXTS = ["<script>window.__pwned=1</script>", '<img src=x onerror="window.__pwned=2">',
                 "</script><script>window.__pwned=3</script>", "<b>bold</b> & \u2028 ünï", '"><svg onload=window.__pwned=4>',
                 "\\xe6\\x88 \x1b[31m {{7*7}} ${x}"]  # fmt: skip


def test_text_and_token_texts_are_shown_next_to_ids_and_inert(open_page, ledger, tmp_path, shots):
    """Hostile strings in every text field a ledger can hold: the prompt as given (a chat), the prompt's
    and the generated text, every token's text and the top-k alternatives' texts."""
    hostile = copy.deepcopy(ledger)
    pick = lambda i: HOSTILE_TEXTS[i % len(HOSTILE_TEXTS)]  # noqa: E731
    texts = {}  # id -> text, one text per id as a tokenizer would give
    for i, token in enumerate(hostile["run"]["prompt"]):
        texts.setdefault(token, pick(i))
    for step in hostile["steps"]:
        texts.setdefault(step["token"], pick(step["index"] + 2))
        for token, _ in step["top_k"]:
            texts.setdefault(token, pick(token))
    hostile["run"]["prompt_input"] = {"chat": [{"role": "user", "content": HOSTILE_TEXTS[0]},
                                              {"role": "<i>assistant</i>", "content": HOSTILE_TEXTS[4]}]}  # fmt: skip
    hostile["text"] = {"prompt_text": "".join(texts[t] for t in hostile["run"]["prompt"]),
                       "prompt_token_texts": [texts[t] for t in hostile["run"]["prompt"]],
                       "generated_text": "".join(texts[s["token"]] for s in hostile["steps"])}  # fmt: skip
    for step in hostile["steps"]:
        step["token_text"] = texts[step["token"]]
        step["top_k_text"] = [texts[t] for t, _ in step["top_k"]]
    page = tmp_path / "explorer.html"
    page.write_text(render_explorer(hostile), encoding="utf-8")
    o = open_page(page)
    _shot(o, shots / "explorer_hostile_texts.png")
    assert o.page.evaluate("typeof window.__pwned") == "undefined"
    assert o.page.locator("img, svg, b, i").count() == 0 and o.page.locator("script").count() == 4

    field = lambda path: o.text(f'#text-table td[data-field="{path}"]')  # noqa: E731
    assert field("run.prompt_input") == f"user: {HOSTILE_TEXTS[0]}\n<i>assistant</i>: {HOSTILE_TEXTS[4]}"
    assert field("text.prompt_text") == hostile["text"]["prompt_text"]
    assert field("text.generated_text") == hostile["text"]["generated_text"]
    assert "prov-derived" in o.page.locator('#text-table td[data-field="text.generated_text"]').get_attribute("class")
    assert "prov-measured" in o.page.locator('#text-table td[data-field="run.prompt_input"]').get_attribute("class")
    assert o.texts('#timeline-table tbody td[data-field="token_text"]') == [s["token_text"] for s in hostile["steps"]]
    for i in (0, 2):
        step = hostile["steps"][i]
        o.page.locator(f'#timeline-table tbody tr[data-step="{i}"]').click()
        assert o.text('#step-fields td[data-field="token_text"]') == step["token_text"]
        assert o.texts('#topk-table tbody td[data-field="text"]') == step["top_k_text"]
        quoted = " ".join(json.dumps(texts[t], ensure_ascii=False) for t in step["context"])
        assert o.text('#step-fields td[data-field="context_text"]') == quoted
        last = step["context"][-1]
        assert o.texts("#position-select option")[-1].endswith(f"(context token {last} "
                                                                f"{json.dumps(texts[last], ensure_ascii=False)})")
    assert o.page.evaluate("typeof window.__pwned") == "undefined"
    o.check_clean()


def test_a_ledger_without_optional_capture_still_renders(open_page, ledger, tmp_path):
    """capture: [] (no norms, routing or logits) and a KV-cache run (one routed position per step)."""
    bare = copy.deepcopy(ledger)
    bare["run"]["capture"] = []
    for step in bare["steps"]:
        for key in ("top_k", "entropy", "margin"):
            step.pop(key)
        step["layers"] = [{k: l[k] for k in ("layer", "kind", "bytes_read")} for l in step["layers"]]
    cached = copy.deepcopy(ledger)
    cached["run"]["kv_cache"] = True
    for step in cached["steps"]:
        for layer in step["layers"]:
            for key in ("experts", "router_scores", "routing_weights"):
                if key in layer:
                    layer[key] = layer[key][-1:]
    for name, variant in (("bare", bare), ("cached", cached)):
        page = tmp_path / f"{name}.html"
        page.write_text(render_explorer(variant), encoding="utf-8")
        o = open_page(page)
        o.page.locator('#timeline-table tbody tr[data-step="2"]').click()
        o.page.locator('#layer-table tbody tr[data-layer="1"]').click()
        assert _num(o.text('#layer-table tbody tr[data-layer="1"] td[data-field="bytes_read"]')) == \
            variant["steps"][2]["layers"][1]["bytes_read"]
        if name == "bare":
            assert o.text('#timeline-table tbody tr[data-step="2"] td[data-field="margin"]') == "–"
            assert o.page.locator("#position-select").is_disabled()
            assert o.page.evaluate("explorer.charts.heatmap.data.datasets[0].data") == []
        else:
            step = variant["steps"][2]
            # one routed position: the last of the context
            options = o.texts("#position-select option")
            text = json.dumps(variant["steps"][1]["token_text"], ensure_ascii=False)  # the last context token's
            assert options == [f"{len(step['context']) - 1} (context token {step['context'][-1]} {text})"]
            assert [int(v) for v in o.page.locator("#routing-selected li").evaluate_all(
                "els => els.map(e => e.dataset.expert)")] == step["layers"][1]["experts"][0]
        o.check_clean()


def test_the_vindex_page_draws_the_router_line_over_the_experts_median(browser, tmp_path):
    """On the tiny model var@64 is 1.0 for experts and routers alike (64 singular values or fewer):
    the router's line must be drawn on top of the median's, not hidden under it."""
    manifest = Path(__file__).resolve().parents[1] / "manifests" / "vindex-demo.yaml"
    result = CliRunner().invoke(main, ["vindex", str(manifest), "--set", "vindex.phases=[1, 2]", "--out",
                                       str(tmp_path / "run"), "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    context = browser.new_context(viewport={"width": 1200, "height": 900}, service_workers="block")
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((tmp_path / "run.vindex" / "vindex.html").resolve().as_uri())
        page.wait_for_function("typeof Chart !== 'undefined' && Chart.getChart(document.getElementById('var64'))")
        drawn = page.evaluate("""() => {
            const chart = Chart.getChart(document.getElementById('var64'));
            // Chart.js draws the sorted datasets last to first: the first is drawn on top
            return chart.getSortedVisibleDatasetMetas().map(m => [m.label, m._dataset.data.map(p => p.y)]);
        }""")
        assert errors == []
    finally:
        context.close()
    labels = [label for label, _ in drawn]
    assert labels[0] == "router var@64", labels
    router = drawn[0][1]
    median = next(ys for label, ys in drawn if label.startswith("median var@64"))
    # the MoE layers (1-3; layer 0 is dense and has no router): the same values, only the order shows both
    assert router == median[1:] == [1.0, 1.0, 1.0]


@pytest.fixture(scope="module")
def sequences_bundle(tiny_checkpoints, tmp_path_factory):
    """A prompts: run's bundle: two sequences of different lengths."""
    tmp = tmp_path_factory.mktemp("explorer-sequences")
    data = {"version": 1, "model": {"checkpoint": str(tiny_checkpoints["kimi-k2.5"])},
            "prompts": [{"tokens": [7, 300, 7]}, {"tokens": [1792, 5]}], "generate": {"max_new_tokens": 3},
            "output": {"dir": str(tmp / "out")}}  # fmt: skip
    outcome = execute(prepare_run(parse_manifest_dict(data, source=str(tmp / "m.yaml"))), echo=lambda *_: None,
                      progress=False)  # fmt: skip
    return outcome.ledger_path.parent


def test_a_prompts_run_is_shown_one_sequence_at_a_time(open_page, sequences_bundle, shots):
    ledger = json.loads((sequences_bundle / "ledger.json").read_text())
    o = open_page(sequences_bundle / "explorer.html")
    _shot(o, shots / "explorer_sequences.png")
    assert o.page.evaluate("explorer.sequence") == 0
    assert len(o.texts("#sequence-select option")) == 2 and "2 sequences in" in o.text("#sequence-summary")

    def shown_tokens() -> list[int]:
        return [int(t) for t in o.texts('#timeline-table tbody td[data-field="token"]')]

    assert shown_tokens() == [s["token"] for s in ledger["sequences"][0]["steps"]]
    assert _ints(o.texts('#timeline-table tbody td[data-field="context"]')[0]) == ledger["sequences"][0]["prompt"]
    o.page.select_option("#sequence-select", "1")  # names it in the fragment and reloads this page
    o.page.wait_for_function("window.explorer && window.explorer.sequence === 1", timeout=30_000)
    assert shown_tokens() == [s["token"] for s in ledger["sequences"][1]["steps"]]
    assert _ints(o.texts('#timeline-table tbody td[data-field="context"]')[0]) == ledger["sequences"][1]["prompt"]
    assert set(o.requests) == {o.url} and o.errors == [], (o.requests, o.errors)  # the page itself, twice
    assert o.page.evaluate("window.__cspViolations") == []
