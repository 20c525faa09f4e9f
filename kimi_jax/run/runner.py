"""Execute a run plan: the bare and instrumented runs, the non-perturbation proof, the ledger and the bundle."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

from tqdm import tqdm

from kimi_jax.errors import KimiJaxError
from kimi_jax.explorer.page import render_explorer
from kimi_jax.ledger.bundle import write_bundle
from kimi_jax.ledger.ledger import build_ledger, step_identity, validate_ledger
from kimi_jax.model.engine import Engine, OnLayer
from kimi_jax.model.jax_setup import enable_compilation_cache
from kimi_jax.records import StepRecord
from kimi_jax.run import anchor as anchors
from kimi_jax.run.plan import RunPlan, load_plan
from kimi_jax.run.resume import RunCheckpoints
from kimi_jax.storage.reader import evict_page_cache, resident_bytes


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


def run_steps(plan: RunPlan, keep_capture: bool = True, max_new_tokens: int | None = None, on_step=None,
              on_layer: OnLayer | None = None, done: list | None = None, caches: list | None = None) -> list:  # fmt: skip
    m = plan.manifest
    with Engine.from_plan(plan, keep_capture) as engine:
        return engine.generate(list(plan.prompt), max_new_tokens or m.generate.max_new_tokens, m.generate.kv_cache,
                               on_step, done=done, caches=caches, on_layer=on_layer)  # fmt: skip


def execute(plan: RunPlan, prove: bool = True, resume: bool = False, echo=print, progress: bool = True) -> RunOutcome:
    """Run a plan: anchor precheck, bare run and instrumented run (when proving), ledger, bundle.

    Every completed step is checkpointed beside the output; with ``resume`` a killed run
    continues from its last completed step."""
    m = plan.manifest
    anchor = anchors.precheck(plan)
    enable_compilation_cache(m.model.cache_dir)
    page_cache = page_cache_record(plan)
    for line in describe_run(plan, page_cache):
        echo(line)
    out = Path(m.output.dir)
    identity = {"manifest_digest": m.digest(), "tensor_list_digest": plan.index.tensor_list_digest(), "prove": prove}
    checkpoints = RunCheckpoints(out, identity, resume)
    runs = [("bare", False), ("instrumented", True)] if prove else [("instrumented", True)]
    results = {name: run_with_progress(plan, name, keep, checkpoints, anchor, echo, progress) for name, keep in runs}
    proof = prove_non_perturbation(results["bare"], results["instrumented"]) if prove else None
    steps = results["instrumented"]
    anchor_record = anchors.check(anchor, m.anchor, steps[0]) if anchor is not None else None
    ledger = build_ledger(plan, steps, page_cache, anchor_record, proof)
    validate_ledger(ledger)
    write_bundle(out, m, ledger, steps, m.anchor if anchor is not None else None, explorer_html=render_explorer(ledger))
    checkpoints.discard()
    path = out / "ledger.json"
    report(steps, proof, path, echo)
    return RunOutcome(steps, ledger, path)


def page_cache_record(plan: RunPlan) -> dict:
    """Evict the shards from the page cache if the manifest asks, then record how much is resident."""
    local = plan.index.source is None  # a remote checkpoint has no local page cache to speak of
    shards = [h.path for h in plan.index.shards] if local else []
    if plan.manifest.storage.evict_page_cache and local:
        evict_page_cache(shards)
    return {"page_cache_evicted": plan.manifest.storage.evict_page_cache and local,
            "page_cache_resident_bytes": sum(resident_bytes(p) for p in shards),
            "shard_bytes": sum(h.file_size for h in plan.index.shards)}  # fmt: skip


def describe_run(plan: RunPlan, page_cache: dict) -> list[str]:
    """What is about to run, from where, and how its bytes are checked: lines for the console."""
    m, cfg = plan.manifest, plan.index.config
    lines = [f"{plan.index.layout} checkpoint {plan.index.location}"]
    if plan.source is not None and plan.source.digest_file:
        checked = plan.source.digests is not None
        state = (f"every tensor read is checked (content root {plan.source.digests.root})" if checked
                 else "not checked (storage.verify_digests is false)")  # fmt: skip
        lines.append(f"digest file {plan.source.digest_file}: {state}")
    lines.append(f"{cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}; "
                 f"prompt {list(plan.prompt)}; {m.generate.max_new_tokens} new tokens, kv_cache {m.generate.kv_cache}, "
                 f"{m.compute.dtype}; page cache {page_cache['page_cache_resident_bytes']:,} of "
                 f"{page_cache['shard_bytes']:,} shard bytes resident")  # fmt: skip
    return lines


def run_with_progress(plan: RunPlan, name: str, keep_capture: bool, checkpoints: RunCheckpoints, anchor: dict | None,
                      echo=print, progress: bool = True) -> list[StepRecord]:  # fmt: skip
    """One run (bare or instrumented) with a progress bar, resuming from and saving to ``checkpoints``.

    Step 0 is compared with the anchor as soon as it completes, so a mismatch stops the run early."""
    m, n_layers = plan.manifest, plan.index.config.num_hidden_layers
    done_steps, caches = checkpoints.load(name)
    if done_steps:
        echo(f"{name}: resuming after {len(done_steps)} completed step(s)")
    fault = _fault_hook()
    bar = tqdm(total=m.generate.max_new_tokens * n_layers, unit="layer", disable=not progress, dynamic_ncols=True,
               desc=name)  # fmt: skip
    started, bytes_done = time.perf_counter(), 0

    def on_layer(step: int, layer: int, step_bytes: int) -> None:
        total = bytes_done + step_bytes
        rate = total / max(time.perf_counter() - started, 1e-9) / 2**20
        bar.set_description(f"{name} step {step} layer {layer}")
        bar.set_postfix_str(f"{total / 2**20:,.1f} MiB read, {rate:,.0f} MiB/s")
        bar.update(1)
        if fault:
            fault(name, step, layer)

    def on_step(step: StepRecord) -> None:
        nonlocal bytes_done
        bytes_done += step.bytes_read
        if step.index == 0 and anchor is not None:
            anchors.check(anchor, m.anchor, step)  # stops the run on any difference
        checkpoints.save(name, step)

    bar.update(len(done_steps) * n_layers)
    try:
        return run_steps(plan, keep_capture, on_step=on_step, on_layer=on_layer, done=done_steps, caches=caches)
    finally:
        bar.close()
        if plan.source is not None:
            plan.source.close()  # a remote checkpoint's connections; reopened if the plan runs again


def prove_non_perturbation(bare: list[StepRecord], instrumented: list[StepRecord]) -> dict:
    """The proof record: tokens, digests and bytes of every step agree; raises (no ledger) if not."""
    a = [step_identity(s) for s in bare]
    b = [step_identity(s) for s in instrumented]
    if a != b:
        diffs = [f"step {x['step']}: {k} bare {x[k]!r}, instrumented {y[k]!r}"
                 for x, y in zip(a, b) for k in x if x[k] != y[k]]  # fmt: skip
        raise NonPerturbationFailure("capture perturbed the run; no ledger written:\n  " + "\n  ".join(diffs))
    return {"compared": ["token", "hidden_digest", "logits_digest", "bytes_read"], "bare": a, "instrumented": b,
            "identical": True}  # fmt: skip


def report(steps: list[StepRecord], proof: dict | None, ledger_path: Path, echo=print) -> None:
    echo(f"{'step':>4} {'token':>8} {'logit':>12} {'bytes read':>14} {'wall s':>8}")
    for s in steps:
        echo(f"{s.index:>4} {s.token:>8} {s.logit:>12.6f} {s.bytes_read:>14,} {s.wall_s:>8.3f}")
    echo("tokens: " + " ".join(str(s.token) for s in steps))
    echo(("non-perturbation: bare and instrumented runs identical; " if proof else "") + f"ledger: {ledger_path}")
