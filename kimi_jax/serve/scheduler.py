"""The one thread that drives the engine: requests wait in a bounded queue, join the running batch
between passes (:class:`~kimi_jax.model.batch.Batch`), and leave it when they stop, are cancelled
or run out of time.

A request's step 0 runs twice, bare (capture not fetched) and instrumented, before it joins the
batch: each bundle proves its own prompt step non-perturbing (scope ``first``, as ``kimi-jax run``
does), at the cost of one more prompt pass per request. Its decode steps run as rows of the batch.

Each finished request's ledger and bundle are written by another process
(:mod:`kimi_jax.serve.writer`), so the engine goes on decoding the others meanwhile; the request
learns of its bundle through its event queue.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from pathlib import Path
from typing import Callable

from kimi_jax.model.batch import Batch
from kimi_jax.model.engine import Engine
from kimi_jax.model.jax_setup import long_lived_frozen
from kimi_jax.run.plan import RunPlan
from kimi_jax.serve.writer import BundleWriter

# What a request's ``emit`` receives: ("step", StepRecord), ("done", {bundle facts}) or
# ("failed", message); the last two end the request.
Emit = Callable[[str, object], None]


@dataclasses.dataclass
class Job:
    plan: RunPlan
    bundle: Path
    emit: Emit
    deadline: float  # time.monotonic() past which the request is cancelled
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    started: float = dataclasses.field(default_factory=time.monotonic)
    bare: object = None  # step 0 run bare: the proof's half


class QueueFull(Exception):
    pass


class Scheduler:
    """``max_batch`` sequences decode together; at most ``max_queue`` more wait to join."""

    def __init__(self, plan: RunPlan, max_batch: int, max_queue: int, keep: int, echo: Callable[[str], None],
                 notes: bool = False):  # fmt: skip
        self.plan, self.max_batch, self.keep, self.echo, self.notes = plan, max_batch, keep, echo, notes
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.engine = Engine.from_plan(plan, keep_capture=True)
        self.batch = Batch(self.engine)
        self.jobs: dict[int, Job] = {}  # batch index -> job
        self.writer = BundleWriter(plan, keep, notes)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kimi-jax-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        self.writer.close()
        self.engine.close()

    def _run(self) -> None:
        with long_lived_frozen() as freeze:
            while not self._stop.is_set():
                try:
                    self._admit()
                    self._drop_ended()
                    if self.batch.live:
                        for index, record in self.batch.step():
                            self.jobs[index].emit("step", record)
                        self._finish_stopped()
                        freeze()
                except Exception as e:  # noqa: BLE001 - a failed pass fails its requests, not the server
                    self.echo(f"the engine failed: {type(e).__name__}: {e}; its requests were failed")
                    self._fail_all(f"the engine failed: {type(e).__name__}: {e}")

    def _admit(self) -> None:
        """Take waiting requests into the batch while it has room (block briefly when it is idle)."""
        while len(self.batch.live) < self.max_batch:
            try:
                job = self.waiting.get(timeout=0.05) if not self.batch.live else self.waiting.get_nowait()
            except queue.Empty:
                return
            if job.cancelled.is_set():  # its client left while it waited
                self.echo(f"{job.bundle.name}: cancelled while waiting (nothing run); no bundle written")
                continue
            self._join(job)

    def _join(self, job: Job) -> None:
        plan, engine = job.plan, self.engine
        prompt, max_new = list(plan.prompt), plan.manifest.generate.max_new_tokens
        engine.keep_capture = False  # the proof's bare step: the same programs, capture not fetched
        try:
            job.bare, _ = engine.step(0, prompt, False, engine.empty_caches(len(prompt), max_new), None, plan.decoding)
        finally:
            engine.keep_capture = True
        job.bare.caches = None  # the proof compares values, not caches
        index, record = self.batch.add(prompt, max_new, plan.decoding)
        self.jobs[index] = job
        job.emit("step", record)
        if index not in self.batch.live:  # it stopped at step 0
            self._finish(index)

    def _drop_ended(self) -> None:
        now = time.monotonic()
        for index in list(self.batch.live):
            job = self.jobs[index]
            if job.cancelled.is_set() or now > job.deadline:
                steps = self.batch.release(index)
                del self.jobs[index]
                why = "cancelled" if job.cancelled.is_set() else "timeout"
                self.echo(f"{job.bundle.name}: {why} after {len(steps)} step(s); no bundle written")
                job.emit("failed", why)

    def _finish_stopped(self) -> None:
        live = set(self.batch.live)
        for index in [i for i in self.jobs if i not in live]:
            self._finish(index)

    def _finish(self, index: int) -> None:
        job = self.jobs.pop(index)
        steps = self.batch.release(index)
        steps[0].caches = None  # the prompt's latent cache: the batch has its rows; the ledger needs none
        wall = time.monotonic() - job.started
        written = self.writer.submit(job.plan, job.bundle, job.bare, steps, wall)
        written.add_done_callback(lambda future: self._written(job, future))

    def _written(self, job: Job, future) -> None:
        try:
            facts = future.result()
        except Exception as e:  # noqa: BLE001 - reported to the request; the partial bundle was removed
            job.emit("failed", f"the bundle was not written: {type(e).__name__}: {e}")
            self.echo(f"{job.bundle.name}: the bundle was not written: {type(e).__name__}: {e}")
            return
        job.emit("done", facts)

    def _fail_all(self, message: str) -> None:
        for index in list(self.jobs):
            job = self.jobs.pop(index)
            if index in self.batch.sequences:
                self.batch.release(index)
            job.emit("failed", message)
        self.batch = Batch(self.engine)
