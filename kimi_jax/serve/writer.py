"""Bundles are written in a process of their own.

Writing a bundle is Python work (the ledger, its schema check, the arrays, the explorer page,
the checksums) that takes longer than decoding a short answer, and on the engine's process it
holds the GIL the engine's thread needs between its programs: on the medium model, with 4 clients,
the time from a request's arrival to its last token was about 1.6x as long with a writer thread
(benchmarks/RESULTS.md section 10). The writer process
opens the same checkpoint once, with the server's resolved residency budget, and plans each
request again from its manifest (the same prompt ids and stop rules: planning is deterministic);
steps travel to it pickled. It dies with the server (``PR_SET_PDEATHSIG``), so a ``kill -9`` of
the server leaves at most a hidden partial bundle, removed at the next start.
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from kimi_jax.errors import KimiJaxError
from kimi_jax.manifest import parse_manifest_dict
from kimi_jax.run.plan import RunPlan, prepare_run, replan
from kimi_jax.serve.bundles import write_request_bundle

_PR_SET_PDEATHSIG = 1
_base: RunPlan | None = None  # the writer process's plan of the server's manifest


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool's own pipe still ends it when the server exits
        pass


def _start(resolved: dict, residency) -> None:
    global _base
    _die_with_parent()
    _base = dataclasses.replace(prepare_run(parse_manifest_dict(resolved, source="server")), residency=residency)


def _write(resolved: dict, out: str, bare, steps: list, wall_s: float, keep: int, notes: bool) -> dict:
    plan = replan(_base, parse_manifest_dict(resolved, source="request"))
    return write_request_bundle(plan, Path(out), bare, steps, wall_s, keep, notes)


class BundleWriter:
    def __init__(self, plan: RunPlan, keep: int, notes: bool):
        self.keep, self.notes = keep, notes
        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start, initargs=(plan.manifest.resolved_dict(), plan.residency))  # fmt: skip
        try:
            self.pool.submit(int).result()  # started now, not by the first request
        except BrokenProcessPool:
            raise KimiJaxError("the bundle writer process failed to start (see the lines above)") from None

    def submit(self, plan: RunPlan, out: Path, bare, steps: list, wall_s: float) -> Future:
        return self.pool.submit(_write, plan.manifest.resolved_dict(), str(out), bare, steps, wall_s, self.keep,
                                self.notes)  # fmt: skip

    def close(self) -> None:
        self.pool.shutdown(wait=True)
