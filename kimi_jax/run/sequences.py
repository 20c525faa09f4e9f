"""Run a plan whose tokens are made in shared passes, and record it in a version-3 ledger
(:mod:`kimi_jax.ledger.sequences`): each sequence as its own run, plus the passes. A ``prompts:``
plan's sequences decode together (:func:`kimi_jax.model.batch.generate_batch`); a plan with
``generate.drafts`` is one sequence whose drafted tokens are verified in one pass each
(:func:`kimi_jax.model.drafts.generate_with_drafts`, lossless: its tokens are plain decoding's).

The non-perturbation proof runs the batch bare over its scope: ``first`` runs each sequence's step
0 bare (each runs alone, exactly as in its lone run, so this proves every anchor step); ``all``
runs the whole batch bare and compares every step of every sequence. A ``prompts:`` run saves each
pass as it completes (:meth:`~kimi_jax.run.resume.RunCheckpoints.save_pass`: the steps it made and
the caches after it), so a killed run goes on with ``--resume`` from its last complete pass; a
drafted run keeps nothing, and ``--resume`` is refused rather than silently recomputing."""

from __future__ import annotations

import dataclasses

from kimi_jax.errors import OutputError
from kimi_jax.ledger.ledger import build_ledger, validate_ledger
from kimi_jax.ledger.run_record import non_perturbation_record, timing_record
from kimi_jax.ledger.sequences import MULTI_SCHEMA, combine
from kimi_jax.model.batch import generate_batch
from kimi_jax.model.drafts import generate_with_drafts, passes_of, prompt_lookup
from kimi_jax.model.mtp import MTPDrafter
from kimi_jax.model.engine import Engine
from kimi_jax.run import anchor as anchors
from kimi_jax.run import compile_clock, distributed
from kimi_jax.run.plan import PlannedSequence
from kimi_jax.settings import PROVE_ALL


def refuse_resume(resume: bool) -> None:
    if resume:
        raise OutputError("--resume: a run with generate.drafts keeps no completed steps to resume from; run it "
                          "again without --resume")  # fmt: skip


def planned_sequences(plan) -> tuple:
    """The plan's sequences: a prompts: plan's, or its one prompt."""
    return plan.sequences or (PlannedSequence(plan.prompt, plan.prompt_text, plan.decoding, "prompt"),)


def run_batch(plan, keep_capture: bool, max_new_tokens: int, on_step=None, report: PassReport | None = None,
              checkpoints=None, name: str = "instrumented") -> tuple[list[list], list]:  # fmt: skip
    """The plan's sequences in a fresh engine, decoded together or with drafts: (each sequence's
    steps, the passes). Each step gets the seconds its pass spent making programs (the steps of one
    pass share them); ``report`` gets a line per pass. With ``checkpoints`` (a prompts: run), each
    pass of the run ``name`` is saved as it completes, and the run goes on from the passes saved."""
    fault = distributed.fault_hook()

    def passed(batch, made):
        if report is not None:
            report.batch_pass(batch.passes[-1], made)
        if fault:
            fault(name, batch.passes[-1].index, 0)  # testing aid: killed with the pass done, not saved
        if checkpoints is not None:
            checkpoints.save_pass(name, batch.state(), made)

    def timed(index, record):
        ended = compile_clock.now()
        record.compile_s = compile_clock.compile_seconds(ended - record.wall_s, ended)
        if on_step is not None:
            on_step(index, record)
        if report is not None and drafts is not None:
            report.step(record)

    drafts = plan.manifest.generate.drafts
    with Engine.from_plan(plan, keep_capture) as engine:
        try:
            if drafts is not None:
                drafter = _drafter(engine, drafts, len(plan.prompt) + max_new_tokens)
                try:
                    steps, verifications = generate_with_drafts(engine, list(plan.prompt), max_new_tokens,
                                                                drafts.tokens, plan.decoding,
                                                                lambda record: timed(0, record), drafter)  # fmt: skip
                finally:
                    if drafts.method == "mtp":
                        drafter.close()
                return [steps], passes_of(steps, verifications)
            saved = checkpoints.load_passes(name) if checkpoints is not None else None
            return generate_batch(engine, [list(s.prompt) for s in plan.sequences], max_new_tokens,
                                  [s.decoding for s in plan.sequences], timed, passed, saved)  # fmt: skip
        finally:
            if plan.source is not None:
                plan.source.close()


def _drafter(engine, drafts, positions: int):
    """The manifest's drafts' source: prompt lookup, or the checkpoint's multi-token-prediction layer."""
    if drafts.method == "mtp":
        return MTPDrafter(engine, positions + drafts.tokens + 1)
    return prompt_lookup


class PassReport:
    """A line on stderr per pass of a run of shared passes (or per step of a drafted run): what it
    made, how long it took, what it used and read. ``tokenizer`` shows each token as text."""

    def __init__(self, name: str, enabled: bool, tokenizer=None, stream=None):
        import sys

        self.name, self.enabled, self.tokenizer = name, enabled, tokenizer
        self.stream = stream if stream is not None else sys.stderr

    def _token(self, token: int) -> str:
        raw = self.tokenizer.token_bytes(token) if self.tokenizer is not None else None
        return str(token) if raw is None else f"{token} {raw.decode('utf-8', 'replace')!r}"

    def batch_pass(self, record, made: list) -> None:
        if self.enabled:
            tokens = ", ".join(f"[{i}] {self._token(step.token)}" for i, step in made)
            print(f"{self.name} pass {record.index}: {record.wall_s:.2f} s, {record.io.used / 2**20:,.1f} MiB used, "
                  f"{(record.io.from_storage + record.io.from_speculation) / 2**20:,.1f} MiB from storage; {tokens}",
                  file=self.stream, flush=True)  # fmt: skip

    def step(self, record) -> None:
        if self.enabled:
            print(f"{self.name} step {record.index}: {self._token(record.token)} ({record.wall_s:.2f} s pass)",
                  file=self.stream, flush=True)  # fmt: skip


def batch_ledger(plan, prove: str | None, facts, started: float, echo, progress: bool = False,
                 checkpoints=None) -> tuple[dict, list]:  # fmt: skip
    """Run the batch (bare over the proof's scope, then instrumented) and build its version-3 ledger
    (``started``: when the run began, by :mod:`compile_clock`); returns (ledger, every step in
    sequence order: what the bundle's arrays hold). ``progress``: a line per pass on stderr;
    ``checkpoints``: where a prompts: run saves its passes (see :func:`run_batch`)."""
    checkpoints = checkpoints if plan.sequences else None
    m = plan.manifest
    anchor = anchors.precheck(plan)  # sequence 0's step 0 is the anchor step, as in its lone run
    bare, proof_wall = None, 0.0
    if prove is not None:
        began = compile_clock.now()
        bare, _ = run_batch(plan, False, m.generate.max_new_tokens if prove == PROVE_ALL else 1,
                            report=PassReport("bare", progress, plan.tokenizer), checkpoints=checkpoints,
                            name="bare")  # fmt: skip
        proof_wall = compile_clock.now() - began

    def check_anchor(index, record):
        if index == 0 and record.index == 0 and anchor is not None:
            anchors.check(anchor, m.anchor, record, plan.mesh_label, plan.kernels_label)  # stops the run early

    steps, passes = run_batch(plan, True, m.generate.max_new_tokens, check_anchor,
                              PassReport("instrumented", progress, plan.tokenizer), checkpoints)  # fmt: skip
    facts = dataclasses.replace(facts, timing=timing_record(proof_wall, compile_clock.now() - started,
                                                            [s for own in bare or [] for s in own]))  # fmt: skip
    views = []
    for i, (seq, own) in enumerate(zip(planned_sequences(plan), steps)):
        alone = dataclasses.replace(plan, prompt=seq.prompt, prompt_text=seq.prompt_text, decoding=seq.decoding)
        seq_facts = dataclasses.replace(
            facts,
            anchor=anchors.check(anchor, m.anchor, own[0], plan.mesh_label, plan.kernels_label)
            if anchor is not None and i == 0 else None,
            proof=non_perturbation_record(bare[i], own, prove) if bare is not None else None,
        )  # fmt: skip
        views.append(build_ledger(alone, own, seq_facts, seq.field))
    ledger = combine(views, passes)
    validate_ledger(ledger, MULTI_SCHEMA)
    for i, (seq, own) in enumerate(zip(ledger["sequences"], steps)):
        echo(f"sequence {i}: {len(own)} token(s) {[s.token for s in own]}, stopped: {seq['stopped']['reason']}")
    totals = ledger["totals"]
    echo(f"{len(passes)} passes, {totals['tokens']} tokens: {totals['bytes_used_per_token']:,.0f} bytes used and "
         f"{totals['bytes_from_storage_per_token']:,.0f} read from storage per token"
         + (f"; {totals['accepted']} of {totals['drafted']} drafted tokens accepted" if "drafted" in totals else ""))  # fmt: skip
    return ledger, [s for own in steps for s in own]
