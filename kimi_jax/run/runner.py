"""Execute a run plan: the bare and instrumented runs, the non-perturbation proof, the ledger and the bundle."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

from kimi_jax.errors import KimiJaxError
from kimi_jax.run.plan import RunPlan, load_plan


def run_manifest(manifest_path: str, overrides: list[str] | None = None, out_dir: str | None = None,
                 prove: bool = True, resume: bool = False, echo=print, progress: bool = True):  # fmt: skip
    plan = load_plan(manifest_path, overrides, out_dir)
    return execute(plan, prove=prove, resume=resume, echo=echo, progress=progress)


def _fault_hook():
    """Testing aid: ``KIMI_JAX_FAULT=RUN:STEP:LAYER`` kills the process (SIGKILL) inside that layer."""
    spec = os.environ.get("KIMI_JAX_FAULT")
    if not spec:
        return None
    run, step, layer = spec.split(":")

    def maybe_die(name: str, s: int, l: int) -> None:
        if (name, s, l) == (run, int(step), int(layer)):
            os.kill(os.getpid(), signal.SIGKILL)

    return maybe_die


class NonPerturbationFailure(KimiJaxError):
    """The bare and the instrumented run differ: capture would not be trustworthy."""


@dataclasses.dataclass
class RunOutcome:
    steps: list  # StepRecord of the instrumented run
    ledger: dict
    ledger_path: Path


def _engine(plan: RunPlan, keep_capture: bool):
    from kimi_jax.model.engine import Engine

    m = plan.manifest
    reader = plan.source.reader(m.storage.io_retries) if plan.source is not None else None
    return Engine(plan.index, m.compute.dtype, m.storage.prefetch, m.storage.io_retries, keep_capture=keep_capture,
                  reader=reader)  # fmt: skip


def run_steps(plan: RunPlan, keep_capture: bool = True, max_new_tokens: int | None = None, on_step=None,
              on_layer=None, done: list | None = None, caches: list | None = None) -> list:  # fmt: skip
    m = plan.manifest
    with _engine(plan, keep_capture) as engine:
        engine.on_layer = on_layer
        return engine.generate(list(plan.prompt), max_new_tokens or m.generate.max_new_tokens, m.generate.kv_cache,
                               on_step, done=done, caches=caches)  # fmt: skip


def execute(plan: RunPlan, prove: bool = True, resume: bool = False, echo=print, progress: bool = True) -> RunOutcome:
    """Run a plan: anchor precheck, bare run and instrumented run (when proving), ledger, bundle.

    Every completed step is checkpointed beside the output; with ``resume`` a killed run
    continues from its last completed step."""
    from tqdm import tqdm

    from kimi_jax.ledger.ledger import build_ledger, step_identity, validate_ledger
    from kimi_jax.model.jax_setup import enable_compilation_cache
    from kimi_jax.run import anchor as anchors
    from kimi_jax.storage.reader import evict_page_cache, resident_bytes

    m, cfg = plan.manifest, plan.index.config
    anchor = anchors.precheck(plan)
    enable_compilation_cache(m.model.cache_dir)
    local = plan.index.source is None  # a remote checkpoint has no local page cache to speak of
    shards = [h.path for h in plan.index.shards] if local else []
    if m.storage.evict_page_cache and local:
        evict_page_cache(shards)
    page_cache = {"page_cache_evicted": m.storage.evict_page_cache and local,
                  "page_cache_resident_bytes": sum(resident_bytes(p) for p in shards),
                  "shard_bytes": sum(h.file_size for h in plan.index.shards)}  # fmt: skip
    echo(f"{plan.index.layout} checkpoint {plan.index.location}")
    if plan.source is not None and plan.source.digest_file:
        checked = plan.source.digests is not None
        state = (f"every tensor read is checked (content root {plan.source.digests.root})" if checked
                 else "not checked (storage.verify_digests is false)")  # fmt: skip
        echo(f"digest file {plan.source.digest_file}: {state}")
    echo(f"{cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}; "
         f"prompt {list(plan.prompt)}; {m.generate.max_new_tokens} new tokens, kv_cache {m.generate.kv_cache}, "
         f"{m.compute.dtype}; page cache {page_cache['page_cache_resident_bytes']:,} of "
         f"{page_cache['shard_bytes']:,} shard bytes resident")  # fmt: skip

    from kimi_jax.ledger.bundle import write_bundle
    from kimi_jax.run.resume import RunCheckpoints

    out = Path(m.output.dir)
    identity = {"manifest_digest": m.digest(), "tensor_list_digest": plan.index.tensor_list_digest(), "prove": prove}
    checkpoints = RunCheckpoints(out, identity, resume)
    fault = _fault_hook()
    runs = [("bare", False), ("instrumented", True)] if prove else [("instrumented", True)]
    results: dict[str, list] = {}
    for name, keep in runs:
        done_steps, caches = checkpoints.load(name)
        if done_steps:
            echo(f"{name}: resuming after {len(done_steps)} completed step(s)")
        bar = tqdm(total=m.generate.max_new_tokens * cfg.num_hidden_layers, unit="layer", disable=not progress,
                   dynamic_ncols=True, desc=name)  # fmt: skip
        started, done = time.perf_counter(), [0]

        def on_layer(step: int, layer: int, step_bytes: int, bar=bar, started=started, done=done, name=name) -> None:
            total = done[0] + step_bytes
            rate = total / max(time.perf_counter() - started, 1e-9) / 2**20
            bar.set_description(f"{name} step {step} layer {layer}")
            bar.set_postfix_str(f"{total / 2**20:,.1f} MiB read, {rate:,.0f} MiB/s")
            bar.update(1)
            if fault:
                fault(name, step, layer)

        def on_step(step, done=done, name=name) -> None:
            done[0] += step.bytes_read
            if step.index == 0 and anchor is not None:
                anchors.check(anchor, m.anchor, step)  # stops the run on any difference
            checkpoints.save(name, step)

        bar.update(len(done_steps) * cfg.num_hidden_layers)
        try:
            results[name] = run_steps(plan, keep, on_step=on_step, on_layer=on_layer, done=done_steps, caches=caches)
        finally:
            bar.close()
            if plan.source is not None:
                plan.source.close()  # a remote checkpoint's connections; reopened if the plan runs again

    proof = None
    if prove:
        bare = [step_identity(s) for s in results["bare"]]
        inst = [step_identity(s) for s in results["instrumented"]]
        if bare != inst:
            diffs = [f"step {a['step']}: {k} bare {a[k]!r}, instrumented {b[k]!r}"
                     for a, b in zip(bare, inst) for k in a if a[k] != b[k]]  # fmt: skip
            raise NonPerturbationFailure("capture perturbed the run; no ledger written:\n  " + "\n  ".join(diffs))
        proof = {"compared": ["token", "hidden_digest", "logits_digest", "bytes_read"], "bare": bare,
                 "instrumented": inst, "identical": True}  # fmt: skip
    steps = results["instrumented"]
    anchor_record = anchors.check(anchor, m.anchor, steps[0]) if anchor is not None else None
    ledger = build_ledger(plan, steps, page_cache, anchor_record, proof)
    validate_ledger(ledger)
    from kimi_jax.explorer.page import render_explorer

    write_bundle(out, m, ledger, steps, m.anchor if anchor is not None else None, explorer_html=render_explorer(ledger))
    checkpoints.discard()
    path = out / "ledger.json"

    echo(f"{'step':>4} {'token':>8} {'logit':>12} {'bytes read':>14} {'wall s':>8}")
    for s in steps:
        echo(f"{s.index:>4} {s.token:>8} {s.logit:>12.6f} {s.bytes_read:>14,} {s.wall_s:>8.3f}")
    echo("tokens: " + " ".join(str(s.token) for s in steps))
    echo(("non-perturbation: bare and instrumented runs identical; " if proof else "") + f"ledger: {path}")
    return RunOutcome(steps, ledger, path)
