"""The three vindex phases over a :class:`~kimi_jax.vindex.plan.VindexPlan`, one layer file at a time.

Every ``phase{1,2,3}/layer-NNN.json`` carries a ``key``: BLAKE3 of the checkpoint's tensor
digest, its config digest, the phase, the layer, the method version and the settings that
change the result. A layer whose file exists with the current key is reused, never recomputed;
anything else is (re)computed and written atomically. Phase 3 also keeps each engine run's
routing trace (``phase3/runs/prompt-NNN.json``) so a restart does not run the engine again.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import blake3
import numpy as np

from kimi_jax.fileio import canonical_json, write_json_atomic
from kimi_jax.progress import progress_bar
from kimi_jax.vindex.plan import VindexPlan
from kimi_jax.vindex.routing import (
    Trace,
    layer_routing_stats,
    trace_from_json,
    trace_from_steps,
    trace_to_json,
)
from kimi_jax.vindex.spectra import (
    METHOD_VERSION,
    chunk_eigvals,
    layer_summary,
    matrix_kind,
    matrix_stats,
    spectral_class,
    stack_parts,
)  # fmt: skip

FORMAT = "kimi-jax-vindex/1"


# ----------------------------------------------------------------------------------- the store


def _load_if_current(path: Path, key: str) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def layer_file(out_dir: Path, phase: int, layer: int) -> Path:
    return out_dir / f"phase{phase}" / f"layer-{layer:03d}.json"


class VindexRun:
    """State of one vindex invocation: keys, reader, progress, what was computed or reused."""

    def __init__(self, plan: VindexPlan, progress: bool, on_layer_done: Callable | None):
        self.plan = plan
        self.progress = progress
        self.on_layer_done = on_layer_done
        self.tensors = plan.index.tensor_list_digest()
        self.computed: dict[str, list[int]] = {}
        self.reused: dict[str, list[int]] = {}
        self.timings: dict[str, float] = {}
        self.bytes_read = 0

    def key(self, phase: int, layer: int, **params: Any) -> str:
        ident = {"format": FORMAT, "phase": phase, "layer": layer, "tensors": self.tensors,
                 "config": self.plan.index.config.digest(), **params}  # fmt: skip
        return blake3.blake3(canonical_json(ident)).hexdigest()

    def bar(self, total: int, desc: str, unit: str):
        """Progress on stderr, by the policy of every command (:mod:`kimi_jax.progress`)."""
        return progress_bar(total, desc, unit, enabled=self.progress, stream=sys.stderr)

    def done(self, phase: int, layer: int, path: Path, computed: bool) -> None:
        (self.computed if computed else self.reused).setdefault(f"phase{phase}", []).append(layer)
        if computed and self.on_layer_done is not None:
            self.on_layer_done(phase, layer, path)


# ------------------------------------------------------------------------------------ phase 1


def _phase1_items(plan: VindexPlan, layer: int):
    lm = plan.index.layers[layer]
    if lm.kind == "dense":
        return "mlp.down_proj", [(None, lm.base[f"layers.{layer}.mlp.down_proj.weight"])]
    ids = plan.experts if plan.experts is not None else range(len(lm.experts))
    return "mlp.experts.*.down_proj", [(e, lm.experts[e]["down_proj"]) for e in ids]


def run_phase1(run: VindexRun, reader) -> None:
    plan = run.plan
    todo, keys = [], {}
    for layer in plan.layers:
        keys[layer] = run.key(1, layer, method=METHOD_VERSION, top=plan.top, dequant=plan.manifest.compute.dequant,
                              experts=None if plan.experts is None else list(plan.experts))  # fmt: skip
        path = layer_file(plan.out_dir, 1, layer)
        if _load_if_current(path, keys[layer]) is not None:
            run.done(1, layer, path, computed=False)
        else:
            todo.append(layer)
    total = sum(len(_phase1_items(plan, layer)[1]) for layer in todo)
    bar = run.bar(total, "phase 1", "matrix")
    try:
        for n, layer in enumerate(todo):
            bar.set_description(f"phase 1 layer {layer} ({n + 1}/{len(todo)} to do, {len(plan.layers)} selected)")
            data = _phase1_layer(run, reader, layer, keys[layer], bar)
            path = layer_file(plan.out_dir, 1, layer)
            write_json_atomic(path, data)
            run.done(1, layer, path, computed=True)
    finally:
        bar.close()


def _phase1_layer(run: VindexRun, reader, layer: int, key: str, bar) -> dict[str, Any]:
    plan, index = run.plan, run.plan.index
    matrix, items = _phase1_items(plan, layer)
    groups: dict[Any, list] = {}
    for expert, entry in items:
        groups.setdefault(matrix_kind(entry, index), []).append((expert, entry))
    records: dict[Any, dict[str, Any]] = {}
    for kind, group in groups.items():
        size = min(kind.chunk_size(), len(group))
        chunks = [group[i : i + size] for i in range(0, len(group), size)]

        def read(chunk):
            return reader.read_weights([entry for _, entry in chunk], layer=layer)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kimi-jax-vindex-read") as pool:
            pending = pool.submit(read, chunks[0])
            for c, chunk in enumerate(chunks):
                parts = pending.result()
                if c + 1 < len(chunks):
                    pending = pool.submit(read, chunks[c + 1])  # next chunk reads while this one computes
                stacked = stack_parts(kind, [entry for _, entry in chunk], parts, size)
                del parts
                lam, frob2 = chunk_eigvals(kind, stacked, plan.manifest.compute.dequant)
                del stacked
                for j, (expert, _) in enumerate(chunk):
                    records[expert] = matrix_stats(lam[j], float(frob2[j]), plan.top)
                bar.update(len(chunk))
                bar.set_postfix_str(f"{reader.run.total / 2**30:,.2f} GiB read")
    kind0 = next(iter(groups))
    ordered = [records[e] for e, _ in items]
    data: dict[str, Any] = {
        "format": FORMAT, "key": key, "phase": 1, "layer": layer, "kind": index.layers[layer].kind,
        "matrix": matrix, "shape": list(kind0.shape), "storage": sorted({k.fmt for k in groups}),
        "n_matrices": len(items), **layer_summary(ordered, kind0.n_singular),
    }  # fmt: skip
    if index.layers[layer].kind == "moe":
        data["experts"] = [{"expert": e, **records[e]} for e, _ in items]
    else:
        data["matrices"] = [{"name": items[0][1].name, **ordered[0]}]
    return data


# ------------------------------------------------------------------------------------ phase 2


def run_phase2(run: VindexRun, reader) -> None:
    plan, index = run.plan, run.plan.index
    layers = plan.moe_layers()
    bar = run.bar(len(layers), "phase 2 routers", "layer")
    try:
        for layer in layers:
            key = run.key(2, layer, method=METHOD_VERSION, top=plan.top, dequant=plan.manifest.compute.dequant)
            path = layer_file(plan.out_dir, 2, layer)
            if _load_if_current(path, key) is None:
                entry = index.layers[layer].base[f"layers.{layer}.mlp.gate.weight"]
                kind = matrix_kind(entry, index)
                parts = reader.read_weights([entry], layer=layer)
                lam, frob2 = chunk_eigvals(kind, stack_parts(kind, [entry], parts, 1), plan.manifest.compute.dequant)
                stats = matrix_stats(lam[0], float(frob2[0]), plan.top)
                data = {"format": FORMAT, "key": key, "phase": 2, "layer": layer, "matrix": "mlp.gate",
                        "shape": list(kind.shape), "n_singular": kind.n_singular, **stats,
                        "spectral_class": spectral_class(stats["var_at_64"], kind.n_singular),
                        "singular_values": [float(x) for x in np.sqrt(lam[0])]}  # fmt: skip
                write_json_atomic(path, data)
                run.done(2, layer, path, computed=True)
            else:
                run.done(2, layer, path, computed=False)
            bar.update(1)
    finally:
        bar.close()


# ------------------------------------------------------------------------------------ phase 3


def run_phase3(run: VindexRun) -> None:
    plan, index = run.plan, run.plan.index
    m, cfg = plan.manifest, index.config
    engine_id = {"max_new_tokens": plan.max_new_tokens, "kv_cache": m.generate.kv_cache, "dtype": m.compute.dtype,
                 "dequant": m.compute.dequant}  # fmt: skip
    sources = {"prompts": [list(p) for p in plan.prompts], "ledgers": [d for _, d, _ in plan.ledgers], **engine_id}
    keys = {layer: run.key(3, layer, **sources) for layer in plan.moe_layers()}
    todo = []
    for layer in plan.moe_layers():
        path = layer_file(plan.out_dir, 3, layer)
        if _load_if_current(path, keys[layer]) is None:
            todo.append(layer)
        else:
            run.done(3, layer, path, computed=False)
    if not todo:
        return
    traces: list[Trace] = []
    need = []
    for i, prompt in enumerate(plan.prompts):
        pkey = run.key(3, -1, prompt=list(prompt), **engine_id)
        path = plan.out_dir / "phase3" / "runs" / f"prompt-{i:03d}.json"
        cached = _load_if_current(path, pkey)
        traces.append(trace_from_json(cached["routes"]) if cached else None)  # type: ignore[arg-type]
        if cached is None:
            need.append((i, prompt, pkey, path))
    if need:
        from kimi_jax.model.engine import Engine

        bar = run.bar(len(need) * plan.max_new_tokens * cfg.num_hidden_layers, "phase 3 engine", "layer")
        try:
            with Engine.from_plan(plan) as engine:
                for i, prompt, pkey, path in need:
                    def on_layer(step: int, layer: int, nbytes: int, i=i) -> None:
                        bar.set_description(f"phase 3 prompt {i} step {step} layer {layer}")
                        bar.update(1)

                    steps = engine.generate(list(prompt), plan.max_new_tokens, m.generate.kv_cache, on_layer=on_layer)
                    trace = trace_from_steps(steps)
                    write_json_atomic(path, {"format": FORMAT, "key": pkey, "tokens": list(prompt),
                                             "generated": [s.token for s in steps], "routes": trace_to_json(trace)})  # fmt: skip
                    traces[i] = trace
                run.bytes_read += engine.reader.run.total
        finally:
            bar.close()
    traces += [trace for _, _, trace in plan.ledgers]
    for layer in todo:
        stats = layer_routing_stats(traces, layer, cfg.n_routed_experts, cfg.num_experts_per_tok)
        path = layer_file(plan.out_dir, 3, layer)
        write_json_atomic(path, {"format": FORMAT, "key": keys[layer], "phase": 3, "layer": layer, **stats})
        run.done(3, layer, path, computed=True)
