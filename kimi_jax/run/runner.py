"""Execute a run plan: the bare and instrumented runs, the non-perturbation proof, the ledger and the bundle."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

from kimi_jax.errors import KimiJaxError, OutputError
from kimi_jax.explorer.page import render_explorer
from kimi_jax.ledger.bundle import recover_interrupted_swap, write_bundle
from kimi_jax.ledger.ledger import build_ledger, step_identity, validate_ledger
from kimi_jax.model.engine import Engine, OnLayer
from kimi_jax.model.jax_setup import enable_compilation_cache
from kimi_jax.note.render import write_note_files
from kimi_jax.records import StepRecord
from kimi_jax.run import anchor as anchors
from kimi_jax.run import distributed
from kimi_jax.run.console import Progress, TextStream, streamed_text, to_stderr
from kimi_jax.run.manifest import load_manifest
from kimi_jax.run.output import check_output_dir, hold_output
from kimi_jax.run.plan import RunPlan, prepare_run
from kimi_jax.run.resume import RunCheckpoints
from kimi_jax.storage.reader import evict_page_cache, resident_bytes
from kimi_jax.storage.residency import ResidencyPlan, budget_plan


def run_manifest(manifest_path: str, overrides: list[str] | None = None, out_dir: str | None = None,
                 prove: bool = True, resume: bool = False, echo=to_stderr, progress: bool = True,
                 text_out=None):  # fmt: skip
    """Load and run a manifest; a multi-process run joins its peers first (see run/distributed.py)."""
    manifest = load_manifest(manifest_path, overrides or [], out_dir)
    check_output_dir(manifest.output.dir, manifest.model.checkpoint)  # before a synthetic checkpoint is made
    plan = prepare_run(manifest)
    settings = distributed.join(plan)
    with distributed.fail_fast(settings):
        outcome = execute(plan, prove=prove, resume=resume, echo=echo, progress=progress, text_out=text_out)
        distributed.finish()
    return outcome


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
    ledger: dict | None  # None in the processes of a multi-process run other than process 0
    ledger_path: Path | None
    text: str | None = None  # the generated text as streamed (special tokens and stop string left out)

    def summary(self) -> dict:
        """What ``kimi-jax run --json`` prints."""
        ledger = self.ledger
        return {"bundle": str(self.ledger_path.parent), "ledger": str(self.ledger_path),
                "prompt": ledger["run"]["prompt"], "tokens": [s["token"] for s in ledger["steps"]],
                "token_texts": [s.get("token_text") for s in ledger["steps"]], "text": self.text,
                "stopped": ledger["stopped"], "non_perturbing": ledger["non_perturbation"] is not None,
                "anchor_matched": ledger["anchor"] is not None}  # fmt: skip


def run_steps(plan: RunPlan, keep_capture: bool = True, max_new_tokens: int | None = None, on_step=None,
              on_layer: OnLayer | None = None, done: list | None = None, caches: list | None = None,
              residency: ResidencyPlan | None = None, on_load=None) -> list:  # fmt: skip
    """``on_load(bytes per process)`` is told what a mesh engine read before step 0 (the resident placement)."""
    m = plan.manifest
    with Engine.from_plan(plan, keep_capture, residency) as engine:
        if on_load is not None and engine.load_bytes_per_process is not None:
            on_load(engine.load_bytes_per_process)
        return engine.generate(list(plan.prompt), max_new_tokens or m.generate.max_new_tokens, m.generate.kv_cache,
                               on_step, done=done, caches=caches, on_layer=on_layer,
                               decoding=plan.decoding)  # fmt: skip


def execute(plan: RunPlan, prove: bool = True, resume: bool = False, echo=to_stderr, progress: bool = True,
            text_out=None) -> RunOutcome:  # fmt: skip
    """Run a plan: anchor precheck, bare run and instrumented run (when proving), ledger, bundle.

    Every completed step is checkpointed beside the output; with ``resume`` a killed run
    continues from its last completed step. ``text_out`` (e.g. sys.stdout) receives the generated
    text as the first run produces it; ``echo`` the report lines; ``progress`` goes to stderr.
    The output folder is held exclusively and checked before any compute."""
    out = Path(plan.manifest.output.dir)
    if not distributed.is_writer():  # a multi-process run: the output folder is process 0's alone
        return _execute_held(plan, prove, resume, echo, progress, text_out)
    check_output_dir(out, plan.index.root)  # before the lock file is created beside it
    with hold_output(out):
        for note in recover_interrupted_swap(out):
            echo(note)
        check_output_dir(out, plan.index.root)  # again, now that no other run can change it
        return _execute_held(plan, prove, resume, echo, progress, text_out)


def _execute_held(plan: RunPlan, prove: bool, resume: bool, echo, progress: bool, text_out) -> RunOutcome:
    m = plan.manifest
    distributed.check_mesh(plan)  # before compute: a mesh that does not fit is an error naming compute.mesh
    writer = distributed.is_writer()  # a multi-process run: only process 0 reports, streams text and writes
    echo, text_out = (echo, text_out) if writer else (lambda *_: None, None)
    anchor = anchors.precheck(plan) if writer else None  # only process 0 needs the anchor file
    enable_compilation_cache(m.model.cache_dir)
    page_cache = page_cache_record(plan)
    for line in describe_run(plan, page_cache):
        echo(line)
    out = Path(m.output.dir)
    identity = {"manifest_digest": m.digest(), "tensor_list_digest": plan.index.tensor_list_digest(), "prove": prove}
    checkpoints = distributed.SharedCheckpoints(RunCheckpoints(out, identity, resume) if writer else None, plan)
    runs = [("bare", False), ("instrumented", True)] if prove else [("instrumented", True)]
    # once: both runs keep the same weights and treat the page cache alike
    residency = budget_plan(plan.index, m.storage.resident_bytes, m.storage.page_cache)
    # the text appears as the first run produces it (the bare run when proving); the second repeats its tokens
    stream = TextStream(plan.tokenizer, plan.decoding.stop_strings, text_out) if text_out is not None else None
    loaded: dict[str, list[int]] = {}
    results = {name: run_with_progress(plan, name, keep, checkpoints, anchor, echo, progress and writer,
                                       stream if name == runs[0][0] else None, residency,
                                       on_load=lambda counts, name=name: loaded.__setitem__(name, counts))
               for name, keep in runs}  # fmt: skip
    if not writer:
        return RunOutcome(results["instrumented"], None, None)
    proof = prove_non_perturbation(results["bare"], results["instrumented"]) if prove else None
    steps = results["instrumented"]
    anchor_record = anchors.check(anchor, m.anchor, steps[0], mesh_label(plan)) if anchor is not None else None
    ledger = build_ledger(plan, steps, page_cache, anchor_record, proof, residency_record(plan, residency),
                          mesh_record(plan, loaded.get("instrumented")))  # fmt: skip
    validate_ledger(ledger)
    try:
        write_bundle(out, m, ledger, steps, m.anchor if anchor is not None else None,
                     explorer_html=render_explorer(ledger),
                     tokenizer_dir=plan.tokenizer.root if plan.tokenizer else None,
                     render_from_files=write_note_files)  # fmt: skip
    except OutputError as e:
        raise OutputError(f"{e}. The completed steps are kept in {checkpoints.root}: once that is fixed, run the "
                          "same command with --resume to write the bundle without computing them "
                          "again") from None  # fmt: skip
    checkpoints.discard()
    path = out / "ledger.json"
    report(steps, proof, path, echo, ledger["stopped"])
    text = None if plan.tokenizer is None else streamed_text(plan.tokenizer, plan.decoding.stop_strings,
                                                             [s.token for s in steps])  # fmt: skip
    return RunOutcome(steps, ledger, path, text)


def page_cache_record(plan: RunPlan) -> dict:
    """Evict the shards from the page cache if the manifest asks, then record how much is resident."""
    local = plan.index.source is None  # a remote checkpoint has no local page cache to speak of
    shards = [h.path for h in plan.index.shards] if local else []
    if plan.manifest.storage.evict_page_cache and local:
        evict_page_cache(shards)
    return {"page_cache_evicted": plan.manifest.storage.evict_page_cache and local,
            "page_cache_resident_bytes": sum(resident_bytes(p) for p in shards),
            "shard_bytes": sum(h.file_size for h in plan.index.shards)}  # fmt: skip


def mesh_label(plan: RunPlan) -> str | None:
    return plan.mesh.label() if plan.mesh is not None else None


def mesh_record(plan: RunPlan, load_bytes_per_process: list[int] | None) -> dict | None:
    """``run.mesh`` of the ledger: the mesh, the processes sharing it, what each read before step 0."""
    mesh = plan.mesh
    if mesh is None:
        return None
    processes = distributed.process_count()
    return {"expert": mesh.expert, "model": mesh.model, "placement": mesh.placement, "process_count": processes,
            "load_bytes_per_process": load_bytes_per_process or [0] * processes}  # fmt: skip


def residency_record(plan: RunPlan, residency: ResidencyPlan) -> dict:
    """The ledger's ``run.residency``: the budget as resolved and what it keeps."""
    s = plan.manifest.storage
    return {"budget_bytes": residency.budget, "resident_layers": len(residency.layers),
            "head_resident": residency.head, "expert_cache_bytes": residency.expert_capacity,
            "expert_cache": s.expert_cache, "speculate": s.speculate,
            "page_cache": "drop" if residency.drop_page_cache else "keep"}  # fmt: skip


def describe_run(plan: RunPlan, page_cache: dict) -> list[str]:
    """What is about to run, from where, and how its bytes are checked: lines for the console."""
    m, cfg = plan.manifest, plan.index.config
    lines = [f"{plan.index.layout} checkpoint {plan.index.location}"]
    if plan.source is not None and plan.source.digest_file:
        checked = plan.source.digests is not None
        state = (f"every tensor read is checked (content root {plan.source.digests.root})" if checked
                 else "not checked (storage.verify_digests is false)")  # fmt: skip
        lines.append(f"digest file {plan.source.digest_file}: {state}")
    sampling = plan.decoding.sampling
    choice = f"sampling {sampling.as_dict()}" if sampling else "greedy"
    lines.append(f"{cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}; "
                 f"prompt {list(plan.prompt)}; up to {m.generate.max_new_tokens} new tokens, {choice}, "
                 f"kv_cache {m.generate.kv_cache}, {m.compute.dtype}, dequant {m.compute.dequant}; page cache "
                 f"{page_cache['page_cache_resident_bytes']:,} of {page_cache['shard_bytes']:,} shard bytes "
                 "resident")  # fmt: skip
    return lines


def run_with_progress(plan: RunPlan, name: str, keep_capture: bool, checkpoints, anchor: dict | None,
                      echo=to_stderr, progress: bool = True, stream: TextStream | None = None,
                      residency: ResidencyPlan | None = None, on_load=None) -> list[StepRecord]:  # fmt: skip
    """One run (bare or instrumented) with its progress on stderr, resuming from and saving to
    ``checkpoints``; ``stream`` gets its tokens as text; ``residency`` is the budget's plan (resolved
    once for both runs).

    Step 0 is compared with the anchor as soon as it completes, so a mismatch stops the run early."""
    m, n_layers = plan.manifest, plan.index.config.num_hidden_layers
    done_steps, caches = checkpoints.load(name)
    if done_steps:
        echo(f"{name}: resuming after {len(done_steps)} completed step(s)")
    for step in done_steps if stream is not None else []:
        stream.feed(step.token)
    fault = _fault_hook()
    # a bar redrawn on the terminal the text streams to would overwrite the text: that run draws none
    on_terminal = stream is not None and getattr(stream.out, "isatty", lambda: False)()
    bar = Progress(name, m.generate.max_new_tokens, n_layers, progress, plan.tokenizer, draw_bar=not on_terminal)
    bar.skip_steps(len(done_steps))

    def on_layer(step: int, layer: int, step_bytes: int) -> None:
        bar.layer(step, layer, step_bytes)
        distributed.beat(f"{name} step {step} layer {layer}")
        if fault:
            fault(name, step, layer)

    def on_step(step: StepRecord) -> None:
        if step.index == 0 and anchor is not None:
            anchors.check(anchor, m.anchor, step, mesh_label(plan))  # stops the run on any difference
        checkpoints.save(name, step)
        bar.step(step)
        if stream is not None:
            stream.feed(step.token)

    try:
        steps = run_steps(plan, keep_capture, on_step=on_step, on_layer=on_layer, done=done_steps, caches=caches,
                          residency=residency, on_load=on_load)  # fmt: skip
    finally:
        bar.close()
        if plan.source is not None:
            plan.source.close()  # a remote checkpoint's connections; reopened if the plan runs again
    if stream is not None:
        stream.close()  # the text is complete
    return steps


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


def report(steps: list[StepRecord], proof: dict | None, ledger_path: Path, echo=to_stderr,
           stopped: dict | None = None) -> None:  # fmt: skip
    """Per step: token, logit, bytes used and where they came from, the expert cache's hit rate, wall time."""
    echo(f"{'step':>4} {'token':>8} {'logit':>12} {'bytes used':>14} {'from storage':>14} {'from memory':>14} "
         f"{'expert hits':>11} {'wall s':>8}")  # fmt: skip
    for s in steps:
        used = sum(layer.io.experts_used for layer in s.layers)
        hits = f"{sum(layer.io.experts_from_memory for layer in s.layers) / used:.0%}" if used else "-"
        echo(f"{s.index:>4} {s.token:>8} {s.logit:>12.6f} {s.bytes_read:>14,} "
             f"{s.io.from_storage + s.io.from_speculation:>14,} {s.io.from_memory:>14,} {hits:>11} {s.wall_s:>8.3f}")  # fmt: skip
    echo("tokens: " + " ".join(str(s.token) for s in steps))
    if stopped is not None:
        echo(f"stopped: {stopped['reason']}" + "".join(f", {k} {v!r}" for k, v in stopped.items() if k != "reason"))
    echo(("non-perturbation: bare and instrumented runs identical; " if proof else "") + f"ledger: {ledger_path}")
