"""``kimi-jax vindex M.yaml`` (wired up in :mod:`kimi_jax.cli`): a "vindex" of a checkpoint's MLP
weights, streamed on one machine.

Phases (the manifest's optional ``vindex`` section picks them, and the layers and experts):

1. Expert spectra: the singular values of every routed expert's ``down_proj`` (and of the dense
   layers' ``mlp.down_proj``), read a few experts at a time, dequantized as ``compute.dequant``
   says (by default exactly, ``q * scale`` in float32), batched through
   :mod:`kimi_jax.vindex.spectra`. Per expert var@64, s0/s1, the top singular values and the
   Frobenius norm; per layer the median / IQR of var@64 and the spectral class (see that module
   for the method, its accuracy and var@64 with < 64 values).
2. Router spectra: the same for each MoE layer's router ``mlp.gate.weight`` [n_experts, hidden].
3. Routing statistics: expert selection counts, usage entropy and the weight share of the
   most-used experts, per layer and per token position, from engine runs over prompts and/or
   the routing records of run bundles' ``ledger.json`` (:mod:`kimi_jax.vindex.routing`).

Everything lands in ``OUTPUT.vindex/``, beside the run bundle ``OUTPUT/`` rather than inside it
(:func:`kimi_jax.vindex.plan.vindex_dir`): ``phase{1,2,3}/layer-NNN.json`` (one per phase and
layer, each written atomically: temp file, fsync, rename), then ``summary.json``,
``vindex.html`` (self-contained), ``run.json`` (timings: the only file that differs between
runs) and ``CHECKSUMS.b3``. Each layer file carries a key (checkpoint tensor digest, config,
method and settings); a restarted run (after kill -9 or anything else) keeps every layer file
whose key matches and computes only the rest, so it ends with identical results.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kimi_jax.fileio import write_bytes_atomic, write_json_atomic
from kimi_jax.ledger.checksums import CHECKSUMS_NAME, write_checksums
from kimi_jax.model.jax_setup import enable_compilation_cache
from kimi_jax.platform_info import package_version
from kimi_jax.manifest import VindexSection
from kimi_jax.storage.reader import ShardReader, evict_page_cache
from kimi_jax.vindex.page import build_html
from kimi_jax.vindex.phases import (
    FORMAT,
    VindexRun,
    layer_file,
    run_phase1,
    run_phase2,
    run_phase3,
)
from kimi_jax.vindex.plan import VindexPlan
from kimi_jax.vindex.spectra import (
    DISSOLVED_BELOW,
    GUARANTEE,
    METHOD,
    METHOD_VERSION,
    quartiles,
    spectral_class,
)


# ------------------------------------------------------------------------------ summary, run


def _read_layer(out_dir: Path, phase: int, layer: int) -> dict[str, Any]:
    return json.loads(layer_file(out_dir, phase, layer).read_text(encoding="utf-8"))


def build_summary(plan: VindexPlan) -> dict[str, Any]:
    """summary.json from the layer files (deterministic: no times, no output paths)."""
    index, cfg, v = plan.index, plan.index.config, plan.manifest.vindex or VindexSection()
    summary: dict[str, Any] = {
        "format": FORMAT,
        "checkpoint": {"name": index.root.name, "root": str(index.root), "layout": index.layout,
                       "tensor_digest": index.tensor_list_digest(), "config_digest": cfg.digest(),
                       "num_hidden_layers": cfg.num_hidden_layers, "n_routed_experts": cfg.n_routed_experts,
                       "num_experts_per_tok": cfg.num_experts_per_tok, "hidden_size": cfg.hidden_size,
                       "moe_intermediate_size": cfg.moe_intermediate_size},
        "method": {"svd": METHOD, "version": METHOD_VERSION, "guarantee": GUARANTEE, "dissolved_below": DISSOLVED_BELOW,
                   "var_at_64": "sum of the top-64 squared singular values / squared Frobenius norm; 1.0 when a "
                                "matrix has <= 64 singular values (class then 'undetermined')",
                   "quartiles": "numpy.percentile, linear interpolation"},
        "settings": {"phases": list(plan.phases), "layers": v.layers, "experts": v.experts,
                     "top_singular_values": plan.top, "prompts": [list(p) for p in plan.prompts],
                     "max_new_tokens": plan.max_new_tokens, "kv_cache": plan.manifest.generate.kv_cache,
                     "dtype": plan.manifest.compute.dtype, "dequant": plan.manifest.compute.dequant,
                     "bundles": [str(b) for b, _, _ in plan.ledgers]},
        "phase1": None, "phase2": None, "phase3": None,
    }  # fmt: skip
    if 1 in plan.phases:
        layers, pooled = [], []
        for layer in plan.layers:
            d = _read_layer(plan.out_dir, 1, layer)
            layers.append({k: d[k] for k in ("layer", "kind", "matrix", "shape", "storage", "n_matrices", "n_singular",
                                             "saturated", "var_at_64", "s0_over_s1", "frobenius", "spectral_class")})  # fmt: skip
            if d["kind"] == "moe":
                pooled += [e["var_at_64"] for e in d["experts"]]
        q = quartiles(pooled)
        n_sv = min(cfg.hidden_size, cfg.moe_intermediate_size)
        summary["phase1"] = {"layers": layers, "model": {"var_at_64": q, "spectral_class": spectral_class(q["median"], n_sv),
                                                         "scope": "every analysed routed expert, pooled"}}  # fmt: skip
    if 2 in plan.phases:
        layers = []
        for layer in plan.moe_layers():
            d = _read_layer(plan.out_dir, 2, layer)
            layers.append({k: d[k] for k in ("layer", "shape", "n_singular", "var_at_64", "s0_over_s1", "top",
                                             "frobenius", "spectral_class")})  # fmt: skip
        summary["phase2"] = {"layers": layers, "model": {"var_at_64": quartiles([x["var_at_64"] for x in layers])}}
    if 3 in plan.phases:
        layers = []
        for layer in plan.moe_layers():
            d = _read_layer(plan.out_dir, 3, layer)
            layers.append({k: d[k] for k in ("layer", "positions", "sequences", "top_k", "counts", "entropy",
                                             "normalised_entropy", "top_k_weight_share", "top_k_experts", "experts_used")})  # fmt: skip
        summary["phase3"] = {"layers": layers, "top_k": cfg.num_experts_per_tok,
                             "sources": {"prompts": len(plan.prompts), "bundles": len(plan.ledgers)}}  # fmt: skip
    return summary


def _clean_temp_files(out_dir: Path) -> None:
    """Remove the temp files a killed run left behind (``.NAME.tmp-PID``)."""
    if out_dir.is_dir():
        for tmp in out_dir.rglob(".*.tmp-*"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def run_vindex(plan: VindexPlan, *, progress: bool = True, echo: Callable[[str], Any] = print,
               on_layer_done: Callable[[int, int, Path], Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) the plan's phases; returns the summary. ``on_layer_done(phase, layer,
    path)`` is called after each layer file a run computes and writes."""
    m = plan.manifest
    enable_compilation_cache(m.model.cache_dir)
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    _clean_temp_files(out)
    (out / CHECKSUMS_NAME).unlink(missing_ok=True)  # stale until this run ends
    if m.storage.evict_page_cache:
        evict_page_cache(h.path for h in plan.index.shards)
    started_at = _dt.datetime.now(_dt.timezone.utc)
    run = VindexRun(plan, progress, on_layer_done)
    echo(f"vindex of {plan.index.root} ({plan.index.layout}): phases {list(plan.phases)}, "
         f"{len(plan.layers)} layer(s) -> {out}")  # fmt: skip
    with ShardReader(retries=m.storage.io_retries) as reader:
        for phase, fn in ((1, lambda: run_phase1(run, reader)), (2, lambda: run_phase2(run, reader)),
                          (3, lambda: run_phase3(run))):  # fmt: skip
            if phase in plan.phases:
                t0 = time.perf_counter()
                fn()
                run.timings[f"phase{phase}_s"] = round(time.perf_counter() - t0, 3)
        run.bytes_read += reader.run.total
    summary = build_summary(plan)
    write_json_atomic(out / "summary.json", summary)
    html_path = write_bytes_atomic(out / "vindex.html", build_html(summary).encode("utf-8"))
    write_json_atomic(out / "run.json", _run_record(run, started_at))
    write_checksums(out)
    _echo_summary(summary, echo)
    echo(f"wrote {out / 'summary.json'}, {html_path.name}, run.json, CHECKSUMS.b3")
    return summary


def _run_record(run: VindexRun, started_at) -> dict[str, Any]:
    finished = _dt.datetime.now(_dt.timezone.utc)
    return {"format": FORMAT, "started": started_at.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "elapsed_s": round((finished - started_at).total_seconds(), 3), "timings": run.timings,
            "computed_layers": run.computed, "reused_layers": run.reused, "bytes_read": run.bytes_read,
            "manifest": str(run.plan.manifest.source) if run.plan.manifest.source else None,
            "manifest_digest": run.plan.manifest.digest(),
            "versions": {"python": platform.python_version(), "jax": package_version("jax"), "numpy": np.__version__},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}  # fmt: skip


def _echo_summary(summary: dict[str, Any], echo) -> None:
    p1, p2, p3 = summary["phase1"], summary["phase2"], summary["phase3"]
    if p1:
        echo(f"{'layer':>5} {'kind':>5} {'n':>4} {'var@64 med':>10} {'Q25':>7} {'Q75':>7} {'s0/s1':>7}  class")
        for L in p1["layers"]:
            v = L["var_at_64"]
            f = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
            s01 = L["s0_over_s1"]["median"]
            echo(f"{L['layer']:>5} {L['kind']:>5} {L['n_matrices']:>4} {f(v['median']):>10} {f(v['q25']):>7} "
                 f"{f(v['q75']):>7} {'-' if s01 is None else f'{s01:.3f}':>7}  {L['spectral_class']}")  # fmt: skip
        mv = p1["model"]["var_at_64"]["median"]
        echo(f"experts pooled: median var@64 {'-' if mv is None else f'{mv:.4f}'}: {p1['model']['spectral_class']}")
    if p2:
        echo("routers: " + ", ".join(f"L{L['layer']} var@64 {L['var_at_64']:.4f}" for L in p2["layers"] if L["var_at_64"] is not None))
    if p3:
        echo("routing: " + ", ".join(f"L{L['layer']} H/Hmax {L['normalised_entropy']:.3f}" for L in p3["layers"]
                                     if L["normalised_entropy"] is not None))  # fmt: skip
