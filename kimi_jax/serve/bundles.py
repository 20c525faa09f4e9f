"""Each completed request's bundle in the server's runs folder, and the folder's retention.

A bundle is the one ``kimi-jax run`` writes for the request's own manifest (the server's manifest
with the request's prompt, token budget, sampling and stop strings), so ``kimi-jax verify`` checks
it as any other. It is assembled in a hidden ``.NAME.partial-TOKEN`` folder and renamed into place
(:func:`~kimi_jax.ledger.bundle.write_bundle`): a request cancelled or a server killed midway
leaves no bundle, only, after a ``kill -9`` while writing, a hidden partial folder that the next
start removes.

Retention: the newest ``keep`` bundles stay; writing one more removes the oldest. Names are
``UTC-TIME-COUNTER-RANDOM``, chosen by the server (no request field reaches the filesystem), so
their order is their age.
"""

from __future__ import annotations

import itertools
import re
import secrets
import shutil
import time
from pathlib import Path

from kimi_jax.explorer.page import render_explorer
from kimi_jax.ledger.bundle import write_bundle
from kimi_jax.ledger.ledger import build_ledger, validate_ledger
from kimi_jax.ledger.run_record import RunFacts, non_perturbation_record, residency_record, timing_record
from kimi_jax.note.render import write_note_files
from kimi_jax.run.plan import RunPlan
from kimi_jax.run.runner import page_cache_facts
from kimi_jax.settings import PROVE_FIRST

NAME = re.compile(r"\d{8}T\d{6}Z-\d{6}-[0-9a-f]{8}")
PARTIAL = re.compile(rf"\.{NAME.pattern}\.partial-[0-9a-f]{{16}}")
_counter = itertools.count()


def new_name() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{next(_counter) % 10**6:06d}-{secrets.token_hex(4)}"


def write_request_bundle(plan: RunPlan, out: Path, bare, steps: list, wall_s: float, keep: int,
                         notes: bool = False) -> dict:  # fmt: skip
    """Ledger and bundle of one request (``bare``: its step 0 run bare, the proof's half); then
    the oldest bundles beyond ``keep`` are removed. Returns what the response reports.

    The technical note (``note.pdf``) is left out unless ``notes``: rendering it takes seconds, four
    times the rest of a small bundle, and one process writes every request's bundle; it is derived
    from the bundle's files alone, so ``kimi-jax note BUNDLE`` renders the same note later."""
    m = plan.manifest
    facts = RunFacts(
        page_cache=page_cache_facts(plan),
        residency=residency_record(plan.residency, m.storage.expert_cache, m.storage.speculate),
        proof=non_perturbation_record([bare], steps, PROVE_FIRST),
        kernels=plan.kernels,
        timing=timing_record(bare.wall_s, wall_s, [bare]),
    )
    ledger = build_ledger(plan, steps, facts)
    validate_ledger(ledger)
    write_bundle(out, m, ledger, steps, None, explorer_html=render_explorer(ledger),
                 tokenizer_dir=plan.tokenizer.root if plan.tokenizer else None,
                 render_from_files=write_note_files if notes else None)  # fmt: skip
    prune(out.parent, keep)
    return {"bundle": str(out), "receipt": str(out / "receipt.json"), "stopped": ledger["stopped"]}


def prune(runs: Path, keep: int) -> list[str]:
    """Remove the oldest bundles beyond ``keep`` (only folders named as the server names them)."""
    ours = sorted(p.name for p in runs.iterdir() if NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink())
    gone = ours[: max(0, len(ours) - keep)]
    for name in gone:
        shutil.rmtree(runs / name, ignore_errors=True)
    return gone


def remove_partials(runs: Path) -> list[str]:
    """The hidden partial bundles a killed server left (its own names only)."""
    gone = [p.name for p in runs.iterdir() if PARTIAL.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    for name in gone:
        shutil.rmtree(runs / name, ignore_errors=True)
    return gone
