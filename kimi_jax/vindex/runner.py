"""``kimi-jax vindex M.yaml``: a "vindex" of a checkpoint's MLP weights, streamed on one machine.

Phases (the manifest's optional ``vindex`` section picks them, and the layers and experts):

1. Expert spectra: the singular values of every routed expert's ``down_proj`` (and of the dense
   layers' ``mlp.down_proj``), read a few experts at a time, dequantized to their bf16-exact
   values, batched through :mod:`kimi_jax.vindex.spectra`. Per expert var@64, s0/s1, the top
   singular values and the Frobenius norm; per layer the median / IQR of var@64 and the
   spectral class (see that module for the method, its accuracy and var@64 with < 64 values).
2. Router spectra: the same for each MoE layer's router ``mlp.gate.weight`` [n_experts, hidden].
3. Routing statistics: expert selection counts, usage entropy and the weight share of the
   most-used experts, per layer and per token position, from engine runs over prompts and/or
   the routing records of run bundles' ``ledger.json`` (:mod:`kimi_jax.vindex.routing`).

Everything lands in ``OUTPUT.vindex/`` (beside the run bundle): ``phase{1,2,3}/layer-NNN.json`` (one per phase and
layer, each written atomically: temp file, fsync, rename), then ``summary.json``,
``vindex.html`` (self-contained), ``run.json`` (timings: the only file that differs between
runs) and ``CHECKSUMS.b3``. Each layer file carries a key (checkpoint tensor digest, config,
method and settings); a restarted run (after kill -9 or anything else) keeps every layer file
whose key matches and computes only the rest, so it ends with identical results.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import blake3
import click
import numpy as np

from kimi_jax.errors import KimiJaxError, ManifestError
from kimi_jax.ledger.checksums import write_checksums
from kimi_jax.run.manifest import Manifest, VindexSection, load_manifest
from kimi_jax.storage.checkpoint import CheckpointIndex
from kimi_jax.vindex.phases import (
    FORMAT,
    _phase1,
    _phase2,
    _phase3,
    _Run,
    layer_file,
    write_json_atomic,
)
from kimi_jax.vindex.routing import LedgerError, Trace, read_ledger
from kimi_jax.vindex.spectra import (
    DISSOLVED_BELOW,
    GUARANTEE,
    METHOD,
    METHOD_VERSION,
    quartiles,
    spectral_class,
)

__all__ = ["VindexPlan", "plan_vindex", "run_vindex", "vindex_command", "write_json_atomic", "FORMAT"]

def vindex_dir(output_dir: Path) -> Path:
    """Where a manifest's vindex lands: beside its run bundle (``OUT.vindex``), never inside it,
    so ``run`` and ``vindex`` can share one manifest without replacing each other's output."""
    output_dir = Path(output_dir)
    return output_dir.parent / f"{output_dir.name}.vindex"


@dataclasses.dataclass(frozen=True)
class VindexPlan:
    """A validated vindex run: everything checked against the checkpoint, nothing computed."""

    manifest: Manifest
    index: CheckpointIndex
    phases: tuple[int, ...]
    layers: tuple[int, ...]  # selected layers, ascending
    experts: tuple[int, ...] | None  # phase-1 expert ids, None = all
    top: int
    prompts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    ledgers: tuple[tuple[Path, str, Trace], ...]  # (bundle dir, BLAKE3 of ledger.json, routing trace)
    out_dir: Path  # OUTPUT/vindex

    def moe_layers(self) -> list[int]:
        return [i for i in self.layers if self.index.layers[i].kind == "moe"]


# ------------------------------------------------------------------------------------ the plan


def plan_vindex(manifest: Manifest) -> VindexPlan:
    """Open the checkpoint and check the manifest's vindex section against it, before compute."""
    from kimi_jax.run.plan import prepare_run

    run = prepare_run(manifest)
    index, cfg = run.index, run.index.config
    v = manifest.vindex or VindexSection()
    problems: list[ManifestError] = []
    n_layers = cfg.num_hidden_layers
    has_experts = any(layer.kind == "moe" for layer in index.layers)
    if not has_experts:
        what = {1: "1 (expert spectra)", 2: "2 (router spectra)", 3: "3 (routing statistics)"}
        problems.append(manifest.error("vindex.phases", f"phase(s) {', '.join(what[p] for p in v.phases)} need routed "
                                                        f"experts, but checkpoint {index.root} has none "
                                                        f"(n_routed_experts={cfg.n_routed_experts}, all {n_layers} layers "
                                                        "dense); choose a MoE checkpoint"))  # fmt: skip
    layers = list(range(n_layers)) if v.layers is None else list(v.layers)
    for i, layer in enumerate(v.layers or []):
        if layer >= n_layers:
            problems.append(manifest.error(f"vindex.layers.{i}", f"layer {layer} is out of range: checkpoint "
                                                                 f"{index.root} has {n_layers} layers (0..{n_layers - 1})"))  # fmt: skip
    for i, expert in enumerate(v.experts or []):
        if expert >= cfg.n_routed_experts:
            problems.append(manifest.error(f"vindex.experts.{i}", f"expert id {expert} is out of range: checkpoint "
                                                                  f"{index.root} has {cfg.n_routed_experts} routed experts "
                                                                  f"per MoE layer (0..{cfg.n_routed_experts - 1})"))  # fmt: skip
    layers = sorted(layer for layer in layers if layer < n_layers)
    if has_experts and v.layers is not None and ({2, 3} & set(v.phases)):
        if not any(index.layers[i].kind == "moe" for i in layers):
            problems.append(manifest.error("vindex.layers", f"phases {sorted({2, 3} & set(v.phases))} need a MoE layer, "
                                                            f"but layers {layers} are all dense (the first "
                                                            f"{cfg.first_k_dense_replace} layer(s) are)"))  # fmt: skip
    max_new = v.max_new_tokens if v.max_new_tokens is not None else manifest.generate.max_new_tokens
    if v.prompts is not None:
        prompts = [tuple(p) for p in v.prompts]
    else:
        prompts = [] if v.bundles else [tuple(run.prompt)]
    if 3 in v.phases:
        max_field = "vindex.max_new_tokens" if v.max_new_tokens is not None else "generate.max_new_tokens"
        for i, prompt in enumerate(prompts):
            where = f"vindex.prompts.{i}" if v.prompts is not None else "prompt"
            for j, token in enumerate(prompt):
                if token >= cfg.vocab_size:
                    problems.append(manifest.error(f"{where}.{j}" if v.prompts is not None else "prompt.tokens",
                                                   f"token id {token} is outside the vocabulary (vocab_size {cfg.vocab_size})"))  # fmt: skip
            if len(prompt) + max_new > cfg.max_position_embeddings:
                problems.append(manifest.error(max_field, f"prompt {i} ({len(prompt)} tokens) + {max_new} new tokens exceeds "
                                                          f"max_position_embeddings {cfg.max_position_embeddings}"))  # fmt: skip
    ledgers = []
    if 3 in v.phases:
        for i, bundle in enumerate(v.bundles):
            ledger = Path(bundle) / "ledger.json"
            if not ledger.is_file():
                problems.append(manifest.error(f"vindex.bundles.{i}", f"{ledger} does not exist (expected a run-bundle "
                                                                      "directory holding ledger.json)"))  # fmt: skip
                continue
            try:
                trace = read_ledger(Path(bundle), n_layers, cfg.n_routed_experts)
            except LedgerError as e:
                problems.append(manifest.error(f"vindex.bundles.{i}", str(e)))
                continue
            ledgers.append((Path(bundle), blake3.blake3(ledger.read_bytes()).hexdigest(), trace))
    if problems:
        raise ManifestError("\n".join(str(p) for p in problems))
    return VindexPlan(manifest, index, tuple(sorted(v.phases)), tuple(layers),
                      None if v.experts is None else tuple(v.experts), v.top_singular_values, tuple(prompts),
                      max_new, tuple(ledgers), vindex_dir(Path(manifest.output.dir)))  # fmt: skip


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
                     "dtype": plan.manifest.compute.dtype, "bundles": [str(b) for b, _, _ in plan.ledgers]},
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
    from kimi_jax.model.jax_setup import enable_compilation_cache
    from kimi_jax.storage.reader import ShardReader, evict_page_cache

    m = plan.manifest
    enable_compilation_cache(m.model.cache_dir)
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    _clean_temp_files(out)
    (out / "CHECKSUMS.b3").unlink(missing_ok=True)  # stale until this run ends
    if m.storage.evict_page_cache:
        evict_page_cache(h.path for h in plan.index.shards)
    started_at = _dt.datetime.now(_dt.timezone.utc)
    run = _Run(plan, progress, on_layer_done)
    echo(f"vindex of {plan.index.root} ({plan.index.layout}): phases {list(plan.phases)}, "
         f"{len(plan.layers)} layer(s) -> {out}")  # fmt: skip
    with ShardReader(retries=m.storage.io_retries) as reader:
        for phase, fn in ((1, lambda: _phase1(run, reader)), (2, lambda: _phase2(run, reader)), (3, lambda: _phase3(run))):
            if phase in plan.phases:
                t0 = time.perf_counter()
                fn()
                run.timings[f"phase{phase}_s"] = round(time.perf_counter() - t0, 3)
        run.bytes_read += reader.run.total
    summary = build_summary(plan)
    write_json_atomic(out / "summary.json", summary)
    from kimi_jax.vindex.page import build_html

    html_path = out / "vindex.html"
    tmp = html_path.with_name(f".{html_path.name}.tmp-{os.getpid()}")
    tmp.write_text(build_html(summary), encoding="utf-8")
    os.replace(tmp, html_path)
    write_json_atomic(out / "run.json", _run_record(run, started_at))
    write_checksums(out)
    _echo_summary(summary, echo)
    echo(f"wrote {out / 'summary.json'}, {html_path.name}, run.json, CHECKSUMS.b3")
    return summary


def _run_record(run: _Run, started_at) -> dict[str, Any]:
    import jax

    finished = _dt.datetime.now(_dt.timezone.utc)
    return {"format": FORMAT, "started": started_at.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "elapsed_s": round((finished - started_at).total_seconds(), 3), "timings": run.timings,
            "computed_layers": run.computed, "reused_layers": run.reused, "bytes_read": run.bytes_read,
            "manifest": str(run.plan.manifest.source) if run.plan.manifest.source else None,
            "manifest_digest": run.plan.manifest.digest(),
            "versions": {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__},
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


# --------------------------------------------------------------------------------------- CLI


@click.command(name="vindex")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a manifest field (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output directory (replaces output.dir).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars on stderr.")
def vindex_command(manifest: str, overrides: tuple[str, ...], out_dir: str | None, progress: bool) -> None:
    """Singular-value statistics of every expert (phase 1), router spectra (phase 2) and routing
    statistics (phase 3), streamed and resumable; writes OUTPUT/vindex/."""
    try:
        plan = plan_vindex(load_manifest(manifest, list(overrides), out_dir))
        run_vindex(plan, progress=progress, echo=click.echo)
    except KimiJaxError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
