"""Execute a run plan: the bare and instrumented runs, the non-perturbation proof, the ledger and the bundle."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

from kimi_jax.errors import KimiJaxError, OutputError
from kimi_jax.run.manifest import load_manifest
from kimi_jax.run.output import check_output_dir, hold_output
from kimi_jax.run.plan import RunPlan, prepare_run


def run_manifest(manifest_path: str, overrides: list[str] | None = None, out_dir: str | None = None,
                 prove: bool = True, resume: bool = False, echo=print, progress: bool = True):  # fmt: skip
    manifest = load_manifest(manifest_path, overrides or [], out_dir)
    check_output_dir(manifest.output.dir, manifest.model.checkpoint)  # before a synthetic checkpoint is made
    return execute(prepare_run(manifest), prove=prove, resume=resume, echo=echo, progress=progress)


def _fault_hook():
    """Testing aid: ``KIMI_JAX_FAULT=RUN:STEP:LAYER[:SIGNAL]`` sends the process SIGNAL (default
    SIGKILL, or e.g. SIGINT) inside that layer."""
    spec = os.environ.get("KIMI_JAX_FAULT")
    if not spec:
        return None
    run, step, layer, *sig = spec.split(":")
    signum = getattr(signal, sig[0]) if sig else signal.SIGKILL

    def maybe_die(name: str, s: int, l: int) -> None:
        if (name, s, l) == (run, int(step), int(layer)):
            os.kill(os.getpid(), signum)

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
    return Engine(plan.index, m.compute.dtype, m.storage.prefetch, m.storage.io_retries, keep_capture=keep_capture)


def run_steps(plan: RunPlan, keep_capture: bool = True, max_new_tokens: int | None = None, on_step=None,
              on_layer=None, done: list | None = None, caches: list | None = None) -> list:  # fmt: skip
    m = plan.manifest
    with _engine(plan, keep_capture) as engine:
        engine.on_layer = on_layer
        return engine.generate(list(plan.prompt), max_new_tokens or m.generate.max_new_tokens, m.generate.kv_cache,
                               on_step, done=done, caches=caches)  # fmt: skip


def execute(plan: RunPlan, prove: bool = True, resume: bool = False, echo=print, progress: bool = True) -> RunOutcome:
    """Run a plan: anchor precheck, bare run and instrumented run (when proving), ledger, bundle.

    The output folder is held exclusively and checked before any compute; every completed step
    is checkpointed beside it, and with ``resume`` a killed run continues from its last completed step."""
    from kimi_jax.ledger.bundle import recover_interrupted_swap

    out = Path(plan.manifest.output.dir)
    check_output_dir(out, plan.index.root)  # before the lock file is created beside it
    with hold_output(out):
        for note in recover_interrupted_swap(out):
            echo(note)
        check_output_dir(out, plan.index.root)  # again, now that no other run can change it
        return _execute_held(plan, prove, resume, echo, progress)


def _execute_held(plan: RunPlan, prove: bool, resume: bool, echo, progress: bool) -> RunOutcome:
    from tqdm import tqdm

    from kimi_jax.ledger.ledger import build_ledger, step_identity, validate_ledger
    from kimi_jax.model.jax_setup import enable_compilation_cache
    from kimi_jax.run import anchor as anchors
    from kimi_jax.storage.reader import evict_page_cache, resident_bytes

    m, cfg = plan.manifest, plan.index.config
    anchor = anchors.precheck(plan)
    enable_compilation_cache(m.model.cache_dir)
    shards = [h.path for h in plan.index.shards]
    if m.storage.evict_page_cache:
        evict_page_cache(shards)
    page_cache = {"page_cache_evicted": m.storage.evict_page_cache,
                  "page_cache_resident_bytes": sum(resident_bytes(p) for p in shards),
                  "shard_bytes": sum(h.file_size for h in plan.index.shards)}  # fmt: skip
    echo(f"{plan.index.layout} checkpoint {plan.index.root}")
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

    try:
        write_bundle(out, m, ledger, steps, m.anchor if anchor is not None else None,
                     explorer_html=render_explorer(ledger))  # fmt: skip
    except OutputError as e:
        raise OutputError(f"{e}. The completed steps are kept in {checkpoints.root}: once that is fixed, run the "
                          "same command with --resume to write the bundle without computing them "
                          "again") from None  # fmt: skip
    checkpoints.discard()
    path = out / "ledger.json"

    echo(f"{'step':>4} {'token':>8} {'logit':>12} {'bytes read':>14} {'wall s':>8}")
    for s in steps:
        echo(f"{s.index:>4} {s.token:>8} {s.logit:>12.6f} {s.bytes_read:>14,} {s.wall_s:>8.3f}")
    echo("tokens: " + " ".join(str(s.token) for s in steps))
    echo(("non-perturbation: bare and instrumented runs identical; " if proof else "") + f"ledger: {path}")
    return RunOutcome(steps, ledger, path)
