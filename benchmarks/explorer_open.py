"""How long the offline explorer takes to open a Kimi-shaped ledger in headless Chromium.

Builds a synthetic ledger of STEPS x LAYERS at the Kimi K2.5 shape (layer 0 dense, the rest MoE
with 384 routed experts, top-8, routing lists for every position of each step's forward pass,
no KV cache), validates it against ``LEDGER_SCHEMA``, renders the page with
:func:`kimi_jax.explorer.page.render_explorer`, and loads it from ``file://`` several times. The time
of one load is ``window.__explorerReady``: ``performance.now()`` (milliseconds since the
navigation started) in the first animation frame after the page finished its first full render
(tables, the three charts, the routing panel). Prints JSON with the median.

The values are fabricated (seeded random numbers in the schema's shapes); they measure the page,
not a model.

    python benchmarks/explorer_open.py            # 5 steps x 61 layers, 7 loads
    python benchmarks/explorer_open.py --smoke    # 2 steps x 8 layers, 2 loads

Needs Playwright for Python and a Chromium binary (default /usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kimi_jax.ledger.ledger import (
    LEDGER_SCHEMA_ID,
    LEDGER_VERSION,
    derive_routing_weights,
    f32,
    f32_list,
    validate_ledger,  # fmt: skip
)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]  # fmt: skip
TARGET_MS = 1000.0


def synthetic_ledger(steps: int = 5, layers: int = 61, experts: int = 384, top_k: int = 8, vocab: int = 163840,
                     seed: int = 0) -> dict:  # fmt: skip
    """A schema-valid ledger with Kimi K2.5 shapes and fabricated values."""
    rng = np.random.default_rng(seed)
    hexd = lambda: "".join(rng.choice(list("0123456789abcdef"), 64))  # noqa: E731
    prompt = [163584]
    context = list(prompt)
    out_steps = []
    for i in range(steps):
        positions = len(context)
        norm = float(rng.uniform(0.5, 2.0))
        entries = []
        for L in range(layers):
            norm_out = norm * float(rng.uniform(0.97, 1.1))
            entry = {"layer": L, "kind": "dense" if L == 0 else "moe", "norm_in": f32(norm), "norm_out": f32(norm_out)}
            if L > 0:
                chosen = [rng.choice(experts, top_k, replace=False).tolist() for _ in range(positions)]
                raw = rng.uniform(0.05, 1.0, (positions, top_k)).astype(np.float32)
                scores = f32_list(np.sort(raw, axis=1)[:, ::-1])
                entry.update(experts=[[int(e) for e in row] for row in chosen], router_scores=scores,
                             routing_weights=derive_routing_weights(scores))  # fmt: skip
                entry["bytes_read"] = int(rng.integers(300, 900)) * 2**20
            else:
                entry["bytes_read"] = 1_811_939_328
            entries.append(entry)
            norm = norm_out
        logits = rng.normal(0, 3, 64).astype(np.float32)
        top = sorted(((int(t), f32(v)) for t, v in zip(rng.choice(vocab, 16, replace=False), logits[:16])),
                     key=lambda p: -p[1])  # fmt: skip
        top_k_pairs = [[t, v] for t, v in top]
        token, logit = top_k_pairs[0]
        step = {"index": i, "context": list(context), "token": token, "token_text": f" tok{i}",
                "logit": logit, "probability": f32(rng.uniform(0.1, 0.9)), "rank": 0, "top_k": top_k_pairs, "entropy": f32(rng.uniform(1, 6)),
                "margin": f32(top_k_pairs[0][1] - top_k_pairs[1][1]), "hidden_digest": hexd(), "logits_digest": hexd(),
                "bytes_read": sum(e["bytes_read"] for e in entries) + 2_348_810_240,
                "wall_s": f32(rng.uniform(100, 430)), "layers": entries}  # fmt: skip
        out_steps.append(step)
        context.append(token)
    identity = [{"step": s["index"], "token": s["token"], "hidden_digest": s["hidden_digest"],
                 "logits_digest": s["logits_digest"], "bytes_read": s["bytes_read"]} for s in out_steps]  # fmt: skip
    ledger = {
        "schema": LEDGER_SCHEMA_ID, "ledger_version": LEDGER_VERSION, "software": {"kimi-jax": "benchmark"},
        "manifest_digest": hexd(),
        "checkpoint": {"layout": "kimi-k2.5-int4", "path": "/synthetic/kimi-k2.5-shape", "config_digest": hexd(),
                       "tensor_list_digest": hexd(), "tokenizer": None},
        "platform": {"backend": "cpu", "device_kind": "cpu"}, "platform_digest": hexd(),
        "run": {"prompt": prompt, "prompt_input": {"tokens": prompt}, "sampling": None,
                "stop": {"tokens": [[163585, "eos"]], "strings": []}, "max_new_tokens": steps, "kv_cache": False,
                "dtype": "bfloat16", "dequant": "exact",
                "capture": ["norms", "routing", "logits"], "page_cache_evicted": True, "page_cache_resident_bytes": 0,
                "shard_bytes": 595 * 10**9},
        "steps": out_steps, "stopped": {"reason": "max_new_tokens"}, "text": None,
        "totals": {"bytes_read": sum(s["bytes_read"] for s in out_steps),
                   "wall_s": f32(sum(s["wall_s"] for s in out_steps))},
        "anchor": None,
        "non_perturbation": {"compared": ["token", "hidden_digest", "logits_digest", "bytes_read"], "bare": identity,
                             "instrumented": identity, "identical": True},
    }  # fmt: skip
    validate_ledger(ledger)
    return ledger


def measure(page: Path, loads: int, chromium: str) -> dict:
    from playwright.sync_api import sync_playwright

    url = page.resolve().as_uri()
    samples, rendered, requests, errors = [], [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            context.route("**/*", lambda route: route.continue_() if route.request.url == url else route.abort())
            for _ in range(loads):
                tab = context.new_page()
                tab.on("request", lambda r: requests.append(r.url) if r.url != url else None)
                tab.on("pageerror", lambda e: errors.append(str(e)))
                tab.goto(url)
                tab.wait_for_function("window.__explorerReady !== undefined", timeout=60_000)
                ready, done = tab.evaluate("[window.__explorerReady, window.__explorerRendered]")
                samples.append(float(ready))
                rendered.append(float(done))
                tab.close()
            version = browser.version
        finally:
            browser.close()
    return {"samples_ms": [round(s, 1) for s in samples], "ready_ms_median": round(statistics.median(samples), 1),
            "rendered_ms_median": round(statistics.median(rendered), 1), "chromium": version,
            "network_requests": requests, "page_errors": errors}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="2 steps x 8 layers, 2 loads: checks the harness quickly")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--loads", type=int, default=7)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.layers, args.loads = 2, 8, 2

    from kimi_jax.explorer.page import render_explorer

    t0 = time.perf_counter()
    ledger = synthetic_ledger(args.steps, args.layers)
    t1 = time.perf_counter()
    html = render_explorer(ledger)
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="explorer-bench-") as tmp:
        page = Path(tmp) / "explorer.html"
        page.write_text(html, encoding="utf-8")
        result = measure(page, args.loads, args.chromium)
    report = {
        "steps": args.steps, "layers": args.layers, "experts": 384, "top_k": 8, "loads": args.loads,
        "ledger_json_bytes": len(json.dumps(ledger, separators=(",", ":"))), "page_bytes": len(html.encode()),
        "build_ledger_s": round(t1 - t0, 3), "render_html_s": round(t2 - t1, 3), **result,
        "target_ms": TARGET_MS, "under_target": result["ready_ms_median"] < TARGET_MS,
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0 if not result["network_requests"] and not result["page_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
