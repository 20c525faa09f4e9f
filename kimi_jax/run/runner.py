"""Execute a run plan: the bare and instrumented runs, then the ledger and the bundle. Orchestration
only: the records come from the ledger (:mod:`kimi_jax.ledger.run_record`), the lines shown from
:mod:`kimi_jax.run.console`.

The non-perturbation proof runs the plan bare (capture not fetched) as well as instrumented and
requires both to agree. Its scope says over which steps: ``first`` (the default of ``run``) runs
only step 0 bare, the anchor step, as the technical note did; ``all`` (``--prove all``,
``kimi-jax prove``) runs every step bare, which costs a second pass over the whole run; None runs
no proof. The ledger records the scope, the seconds each step spent compiling, the proof's bare
pass and the whole run's wall time."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from kimi_jax.errors import OutputError
from kimi_jax.explorer.page import render_explorer
from kimi_jax.ledger.bundle import recover_interrupted_swap, write_bundle
from kimi_jax.ledger.ledger import build_ledger, validate_ledger
from kimi_jax.ledger.run_record import (
    RunFacts,
    mesh_record,
    non_perturbation_record,
    page_cache_record,
    residency_record,
    timing_record,
)
from kimi_jax.manifest import load_manifest
from kimi_jax.model.engine import Engine, OnLayer
from kimi_jax.model.jax_setup import enable_compilation_cache
from kimi_jax.note.render import write_note_files
from kimi_jax.records import StepRecord
from kimi_jax.run import anchor as anchors
from kimi_jax.run import compile_clock, distributed
from kimi_jax.run.console import CompileNote, Progress, TextStream, describe_run, report, streamed_text, to_stderr
from kimi_jax.run.output import check_output_dir, hold_output
from kimi_jax.run.plan import RunPlan, load_plan, prepare_run
from kimi_jax.run.resume import RunCheckpoints
from kimi_jax.run.sequences import batch_ledger, planned_sequences, refuse_resume
from kimi_jax.settings import PROOF_SCOPES, PROVE_ALL, PROVE_FIRST
from kimi_jax.storage.reader import evict_page_cache, page_cache_bytes


@contextlib.contextmanager
def joined(plan: RunPlan):
    """Around everything a plan computes: join the run's other processes (a multi-process run) and
    check the mesh against the devices, end this process at once if a peer dies, and leave together."""
    settings = distributed.join(plan)
    with distributed.fail_fast(settings):
        yield
        distributed.finish()


def run_manifest(manifest_path: str, overrides: list[str] | None = None, out_dir: str | None = None,
                 prove: str | None = PROVE_FIRST, resume: bool = False, echo=to_stderr, progress: bool = True,
                 text_out=None):  # fmt: skip
    """Load and run a manifest; a multi-process run joins its peers first (see run/distributed.py)."""
    manifest = load_manifest(manifest_path, overrides or [], out_dir)
    check_output_dir(manifest.output.dir, manifest.model.checkpoint)  # before a synthetic checkpoint is made
    plan = prepare_run(manifest)
    with joined(plan):
        return execute(plan, prove=prove, resume=resume, echo=echo, progress=progress, text_out=text_out)


def freeze_anchor(manifest_path: str, overrides: list[str] | None = None,
                  out_file: str | None = None) -> tuple[Path, dict, bool]:  # fmt: skip
    """``kimi-jax anchor freeze``: step 0 twice, the anchor written if both agree bitwise. Returns
    (anchor path, its values, whether this process wrote it: process 0 of a multi-process run)."""
    plan = load_plan(manifest_path, overrides)
    with joined(plan):  # a mesh over several processes: every process runs the steps
        enable_compilation_cache(plan.manifest.model.cache_dir)
        writer = distributed.is_writer()
        path, values = anchors.freeze(plan, lambda p: run_steps(p, keep_capture=False, max_new_tokens=1)[0],
                                      Path(out_file) if out_file else None, write=writer)  # fmt: skip
    return path, values, writer


@dataclasses.dataclass
class RunOutcome:
    steps: list  # StepRecord of the instrumented run
    ledger: dict | None  # None in the processes of a multi-process run other than process 0
    ledger_path: Path | None
    text: str | None = None  # the generated text as streamed (special tokens and stop string left out)

    def summary(self) -> dict:
        """What ``kimi-jax run --json`` prints (a prompts: run: each sequence's prompt, tokens, stop)."""
        ledger = self.ledger
        if "sequences" in ledger:
            return {"bundle": str(self.ledger_path.parent), "ledger": str(self.ledger_path),
                    "sequences": [{"prompt": s["prompt"], "tokens": [t["token"] for t in s["steps"]],
                                   "stopped": s["stopped"], "non_perturbing": s["non_perturbation"] is not None}
                                  for s in ledger["sequences"]],
                    "anchor_matched": ledger["sequences"][0]["anchor"] is not None}  # fmt: skip
        return {"bundle": str(self.ledger_path.parent), "ledger": str(self.ledger_path),
                "prompt": ledger["run"]["prompt"], "tokens": [s["token"] for s in ledger["steps"]],
                "token_texts": [s.get("token_text") for s in ledger["steps"]], "text": self.text,
                "stopped": ledger["stopped"], "non_perturbing": ledger["non_perturbation"] is not None,
                "anchor_matched": ledger["anchor"] is not None}  # fmt: skip


def run_steps(plan: RunPlan, keep_capture: bool = True, max_new_tokens: int | None = None, on_step=None,
              on_layer: OnLayer | None = None, done: list | None = None, caches: list | None = None,
              on_load=None) -> list:  # fmt: skip
    """The plan's steps in a fresh engine (resumed after ``done``, from ``caches``); ``on_step`` and
    ``on_layer`` report progress, ``on_load(bytes per process)`` is told what a mesh engine read
    before step 0 (the resident placement).

    A run of fewer steps than the manifest's (the proof's bare step 0, an anchor's step) gets the
    latent caches the whole run would have: their length is the extent attention reduces over, and a
    shorter one can change the bits of step 0."""
    m = plan.manifest
    with Engine.from_plan(plan, keep_capture) as engine:
        if on_load is not None and engine.load_bytes_per_process is not None:
            on_load(engine.load_bytes_per_process)
        if m.generate.kv_cache and caches is None and not done:
            caches = engine.empty_caches(len(plan.prompt), m.generate.max_new_tokens)
        return engine.generate(list(plan.prompt), max_new_tokens or m.generate.max_new_tokens, m.generate.kv_cache,
                               on_step, done=done, caches=caches, on_layer=on_layer,
                               decoding=plan.decoding)  # fmt: skip


def execute(plan: RunPlan, prove: str | None = PROVE_FIRST, resume: bool = False, echo=to_stderr,
            progress: bool = True, text_out=None) -> RunOutcome:  # fmt: skip
    """Run a plan: anchor precheck, bare run and instrumented run, ledger, bundle. ``prove``: the
    proof's scope (``first``, ``all``; None: no proof, the instrumented run only; see the module doc;
    True and False, from before scopes, mean ``all`` and None).

    Every completed step is checkpointed beside the output; with ``resume`` a killed run
    continues from its last completed step. ``text_out`` (e.g. sys.stdout) receives the generated
    text as the first run produces it; ``echo`` the report lines; ``progress`` goes to stderr.
    The output folder is held exclusively and checked before any compute."""
    prove = {True: PROVE_ALL, False: None}.get(prove, prove) if isinstance(prove, bool) else prove  # as before scopes
    if prove not in (None, *PROOF_SCOPES):
        raise ValueError(f"prove: expected one of {PROOF_SCOPES} or None, got {prove!r}")
    if plan.manifest.generate.drafts is not None:
        refuse_resume(resume)
    out = Path(plan.manifest.output.dir)
    if not distributed.is_writer():  # a multi-process run: the output folder is process 0's alone
        return _execute_held(plan, prove, resume, echo, progress, text_out)
    check_output_dir(out, plan.index.root)  # before the lock file is created beside it
    with hold_output(out):
        for note in recover_interrupted_swap(out):
            echo(note)
        check_output_dir(out, plan.index.root)  # again, now that no other run can change it
        return _execute_held(plan, prove, resume, echo, progress, text_out)


def _execute_held(plan: RunPlan, prove: str | None, resume: bool, echo, progress: bool, text_out) -> RunOutcome:
    m = plan.manifest
    writer = distributed.is_writer()  # a multi-process run: only process 0 reports, streams text and writes
    echo, text_out = (echo, text_out) if writer else (lambda *_: None, None)
    anchor = anchors.precheck(plan) if writer else None  # only process 0 needs the anchor file
    cache = enable_compilation_cache(m.model.cache_dir)
    compile_clock.start()
    started = compile_clock.now()
    page_cache = page_cache_facts(plan)
    for line in describe_run(plan, page_cache, prove):
        echo(line)
    if plan.shares_passes:
        return _execute_sequences(plan, prove, echo, started, page_cache, text_out, progress, resume)
    out = Path(m.output.dir)
    identity = run_identity(plan, prove)
    checkpoints = distributed.SharedCheckpoints(RunCheckpoints(out, identity, resume) if writer else None, plan)
    # (name, keep capture, steps): the bare run covers the proof's scope, the instrumented run every step
    every = m.generate.max_new_tokens
    runs = [("instrumented", True, every)]
    if prove is not None:
        runs.insert(0, ("bare", False, every if prove == PROVE_ALL else 1))
    # the text appears as the first run over every step produces it; a later one repeats its tokens
    streaming = next(name for name, _, steps in runs if steps == every)
    stream = TextStream(plan.tokenizer, plan.decoding.stop_strings, text_out) if text_out is not None else None
    loaded: dict[str, list[int]] = {}
    results, walls = {}, {}
    for name, keep, steps in runs:
        began = compile_clock.now()
        results[name] = run_with_progress(plan, name, keep, checkpoints, anchor, echo, progress and writer,
                                          stream if name == streaming else None,
                                          on_load=lambda counts, name=name: loaded.__setitem__(name, counts),
                                          max_new_tokens=steps, compile_cache=cache)  # fmt: skip
        walls[name] = compile_clock.now() - began
    if not writer:
        return RunOutcome(results["instrumented"], None, None)
    steps = results["instrumented"]
    mesh = plan.mesh
    facts = RunFacts(
        page_cache=page_cache,
        residency=residency_record(plan.residency, m.storage.expert_cache, m.storage.speculate),
        mesh=None if mesh is None else mesh_record(mesh.expert, mesh.model, mesh.placement,
                                                   distributed.process_count(), loaded.get("instrumented")),
        anchor=anchors.check(anchor, m.anchor, steps[0], plan.mesh_label, plan.kernels_label) if anchor is not None else None,
        proof=non_perturbation_record(results["bare"], steps, prove) if prove is not None else None,
        kernels=plan.kernels,
        timing=timing_record(walls.get("bare", 0.0), compile_clock.now() - started, results.get("bare", [])),
    )  # fmt: skip
    ledger = build_ledger(plan, steps, facts)
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
    report(steps, facts.proof, path, echo, ledger["stopped"], ledger["totals"], plan.tokenizer)
    text = None if plan.tokenizer is None else streamed_text(plan.tokenizer, plan.decoding.stop_strings,
                                                             [s.token for s in steps])  # fmt: skip
    return RunOutcome(steps, ledger, path, text)


def run_identity(plan: RunPlan, prove: str | None) -> dict:
    """What saved steps or passes must belong to for ``--resume`` to take them up."""
    m = plan.manifest
    return {"manifest_digest": m.digest(), "tensor_list_digest": plan.index.tensor_list_digest(), "prove": prove}


def _execute_sequences(plan: RunPlan, prove: str | None, echo, started: float, page_cache: dict,
                       text_out, progress: bool = True, resume: bool = False) -> RunOutcome:  # fmt: skip
    """A run of shared passes (kimi_jax.run.sequences: prompts:, generate.drafts): the batch, its
    version-3 ledger and the bundle; each sequence's text is written once the batch is done. A
    prompts: run saves each pass beside the output, and goes on from them with ``resume``."""
    m = plan.manifest
    mesh = plan.mesh
    facts = RunFacts(page_cache=page_cache, kernels=plan.kernels,
                     residency=residency_record(plan.residency, m.storage.expert_cache, m.storage.speculate),
                     mesh=None if mesh is None else mesh_record(mesh.expert, mesh.model, mesh.placement,
                                                                distributed.process_count(), None))  # fmt: skip
    out = Path(m.output.dir)
    identity = run_identity(plan, prove)
    checkpoints = RunCheckpoints(out, identity, resume)
    ledger, steps = batch_ledger(plan, prove, facts, started, echo, progress, checkpoints)
    try:
        write_bundle(out, m, ledger, steps, m.anchor if ledger["sequences"][0].get("anchor") else None,
                     explorer_html=render_explorer(ledger), tokenizer_dir=plan.tokenizer.root if plan.tokenizer else None,
                     render_from_files=write_note_files)  # fmt: skip
    except OutputError as e:
        if not plan.sequences:
            raise
        raise OutputError(f"{e}. The completed passes are kept in {checkpoints.root}: once that is fixed, run the "
                          "same command with --resume to write the bundle without computing them again") from None  # fmt: skip
    checkpoints.discard()
    texts = None
    if plan.tokenizer is not None:
        texts = [streamed_text(plan.tokenizer, seq.decoding.stop_strings, [s["token"] for s in entry["steps"]])
                 for seq, entry in zip(planned_sequences(plan), ledger["sequences"])]  # fmt: skip
        for i, text in enumerate(texts if text_out is not None else []):
            text_out.write(f"[{i}] {text}\n")
    echo(f"ledger: {out / 'ledger.json'}")
    return RunOutcome(steps, ledger, out / "ledger.json", None if texts is None else "\n".join(texts))


def page_cache_facts(plan: RunPlan) -> dict:
    """Evict the shards from the page cache if the manifest asks, then record how much is resident."""
    local = plan.index.source is None  # a remote checkpoint has no local page cache to speak of
    shards = [h.path for h in plan.index.shards] if local else []
    evict = plan.manifest.storage.evict_page_cache and local
    if evict:
        evict_page_cache(shards)
    return page_cache_record(evict, sum(page_cache_bytes(p) for p in shards), sum(h.file_size for h in plan.index.shards))


def run_with_progress(plan: RunPlan, name: str, keep_capture: bool, checkpoints, anchor: dict | None,
                      echo=to_stderr, progress: bool = True, stream: TextStream | None = None,
                      on_load=None, max_new_tokens: int | None = None,
                      compile_cache: Path | None = None) -> list[StepRecord]:  # fmt: skip
    """One run (bare or instrumented) of ``max_new_tokens`` steps (default: the manifest's) with its
    progress on stderr, resuming from and saving to ``checkpoints``; ``stream`` gets its tokens as
    text. Each step's record gets the seconds it spent making programs (``compile_s``); the console
    says when a step compiles, and why (``compile_cache``: where later runs will find the programs).

    Step 0 is compared with the anchor as soon as it completes, so a mismatch stops the run early."""
    m, n_layers = plan.manifest, plan.index.config.num_hidden_layers
    steps_wanted = max_new_tokens or m.generate.max_new_tokens
    done_steps, caches = checkpoints.load(name)
    if done_steps:
        echo(f"{name}: resuming after {len(done_steps)} completed step(s)")
    for step in done_steps if stream is not None else []:
        stream.feed(step.token)
    fault = distributed.fault_hook()
    compile_clock.start()
    # a bar redrawn on the terminal the text streams to would overwrite the text: that run draws none
    on_terminal = stream is not None and getattr(stream.out, "isatty", lambda: False)()
    bar = Progress(name, steps_wanted, n_layers, progress, plan.tokenizer, draw_bar=not on_terminal,
                   compile_note=CompileNote(m.generate.kv_cache, compile_cache))  # fmt: skip
    bar.skip_steps(len(done_steps))

    def on_layer(step: int, layer: int, step_bytes: int) -> None:
        bar.layer(step, layer, step_bytes)
        distributed.beat(f"{name} step {step} layer {layer}")
        if fault:
            fault(name, step, layer)

    def on_step(step: StepRecord) -> None:
        ended = compile_clock.now()
        step.compile_s = compile_clock.compile_seconds(ended - step.wall_s, ended)
        if step.index == 0 and anchor is not None:
            anchors.check(anchor, m.anchor, step, plan.mesh_label, plan.kernels_label)  # stops the run on any difference
        checkpoints.save(name, step)
        bar.step(step)
        if stream is not None:
            stream.feed(step.token)

    try:
        steps = run_steps(plan, keep_capture, steps_wanted, on_step=on_step, on_layer=on_layer, done=done_steps,
                          caches=caches, on_load=on_load)  # fmt: skip
    finally:
        bar.close()
        if plan.source is not None:
            plan.source.close()  # a remote checkpoint's connections; reopened if the plan runs again
    if stream is not None:
        stream.close()  # the text is complete
    return steps
