"""``kimi-jax verify``: prove, without the model, that a run bundle is intact and self-consistent.

The checks, in order (each prints ``N. name: OK``, ``N. name: FAILED: reason`` or
``N. name: SKIPPED: reason``):

1. ``checksums``: every file's BLAKE3 matches ``CHECKSUMS.b3``; no listed file is missing and no
   file is unlisted (``receipt.json`` and ``CHECKSUMS.b3`` itself excepted); no links or special
   files, and no file outside the bundle layout (:func:`kimi_jax.ledger.bundle.in_bundle_layout`).
2. ``receipt``: ``bundle_digest`` is the BLAKE3 of ``CHECKSUMS.b3``; ``manifest_digest`` equals the
   ledger's and the digest recomputed from ``manifest.json``; the ledger's run settings and
   checkpoint path are the manifest's; the verdict (tokens, steps, non-perturbing, anchor) and
   the anchor record agree with the ledger.
3. ``schema``: ``ledger.json`` validates against the ledger JSON Schema (Draft 2020-12).
4. ``provenance``: ``provenance.json`` equals the schema's provenance map, and every ledger leaf is
   classified measured or derived.
5. ``derivations``: every derived value recomputes from measured values and the stored arrays
   (top-k, entropy, margin, digests, routing weights, the platform digest).
6. ``digests``: the hidden and logits digests recompute from the stored arrays for every step;
   the token is the one its rule picks from the stored logits (the argmax, or for a sampled run the
   seeded draw) and the logit its float32 value.
7. ``anchor``: step 0 equals ``anchor.json`` in every anchored field, the anchor was frozen for this
   checkpoint, prompt and compute mode, and its BLAKE3 is the one the ledger records (SKIPPED
   when the bundle carries no anchor).
8. ``continuity``: step 0's context is the prompt, each context is the previous one plus the
   previous token, step indices run 0..n-1, byte counts add up, and the run ended where its stop
   rules say (``stopped``), no earlier.
9. ``non-perturbation``: ``non_perturbation.json`` is present, equals the ledger's record, and shows
   bare == instrumented == the ledger's own steps over the proof's scope (step 0, or every step),
   which the OK line names.
10. ``explorer``: ``explorer.html`` is byte for byte the page rendered from ``ledger.json``
    (SKIPPED when the bundle has no explorer page).
11. ``text``: the bundled tokenizer files are the ones the ledger's digests name, the prompt as
    given encodes to the prompt ids, and every text field re-derives (SKIPPED when the checkpoint
    ships no tokenizer).
12. ``synthetic-audit`` (the certification checks, :mod:`kimi_jax.verify.certification`): X0 when the
    weights are named by content and nothing is a kimi-jax synthetic, else X1 with the reasons;
    FAILED only when the origin records contradict each other.
13. ``explorer-scope``: the page embeds ledger.json and nothing else, and loads nothing.
14. ``runtime-contract``: the execution properties the note states match the manifest, the
    environment record and the per-step and per-layer counters.
15. ``ratification-scope``: what a matched anchor ratifies, step 0's anchored fields under its
    conditions, and nothing more (SKIPPED without an anchor).
16. ``note``: ``note.pdf`` and ``certification.json`` are byte for byte what this kimi-jax renders from
    the bundle's other files (SKIPPED for a bundle written before notes existed).
17. ``replay`` (only with ``--replay``, and only when checks 1-16 passed): the bundle's manifest is
    run again, without the non-perturbation proof, against the checkpoint it names; every measured
    value must match (wall-clock and page-cache fields excepted). It writes only into the user's
    own cache and a temporary folder, never where the bundle says, and generates the full-shape
    synthetic preset only with ``allow_large``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from kimi_jax.verify.bundle_view import BundleView
from kimi_jax.verify.certification import CERTIFICATION_CHECKS
from kimi_jax.verify.explorer_check import check_explorer
from kimi_jax.verify.file_checks import check_checksums, check_receipt
from kimi_jax.verify.ledger_checks import check_derivations, check_digests, check_provenance, check_schema
from kimi_jax.verify.note_check import check_note
from kimi_jax.verify.replay import check_replay
from kimi_jax.ledger.sequences import audit_passes, is_multi
from kimi_jax.verify.report import (
    FAILED,
    Check,
    CheckFailed,
    CheckSkipped,
    Report,
    require,
    run_check,
)
from kimi_jax.verify.run_checks import check_anchor, check_continuity, check_non_perturbation
from kimi_jax.verify.text import check_text

def each_sequence(check: Callable[[BundleView], str]) -> Callable[[BundleView], str]:
    """A check of one run, on every sequence of a multi-sequence bundle (each as its own run,
    :class:`~kimi_jax.verify.bundle_view.SequenceView`): it FAILS naming each sequence that fails,
    is SKIPPED when it applies to none, and holds when it holds for every one it applies to."""

    def on_each(b: BundleView) -> str:
        views = b.sequences()
        if views == [b]:
            return check(b)
        notes, problems, skipped = {}, [], []
        for view in views:
            try:
                notes[view.index] = check(view)
            except CheckSkipped as e:
                skipped.append(str(e))
            except CheckFailed as e:
                problems.append(f"sequences[{view.index}]: {e}")
        require(problems)
        if not notes:
            raise CheckSkipped(f"every sequence: {skipped[0]}")
        said = next(iter(notes.values())) if len(set(notes.values())) == 1 else \
            "; ".join(f"sequence {i}: {n}" for i, n in notes.items() if n)  # fmt: skip
        return f"{len(notes)} of {len(views)} sequences" + (f" ({said})" if said else "")

    return on_each


def check_passes(b: BundleView) -> str:
    """A multi-sequence ledger's passes: every step made once, the derived pass and total fields recompute."""
    ledger = b.ledger
    if not is_multi(ledger):
        return ""
    try:
        problems = audit_passes(ledger)
    except (KeyError, TypeError, IndexError) as e:
        raise CheckFailed(f"ledger.json: passes: cannot recompute ({type(e).__name__}: {e})") from None
    require(problems)
    return ""


def _derivations(b: BundleView) -> str:
    passes = check_passes(b)
    return each_sequence(check_derivations)(b) + passes


# Checks of the whole bundle run once; checks of a run's ledger run on each sequence (each_sequence).
_CHECKS: tuple[tuple[str, Callable[[BundleView], str]], ...] = (
    ("checksums", check_checksums),
    ("receipt", check_receipt),
    ("schema", check_schema),
    ("provenance", check_provenance),
    ("derivations", _derivations),
    ("digests", each_sequence(check_digests)),
    ("anchor", each_sequence(check_anchor)),
    ("continuity", each_sequence(check_continuity)),
    ("non-perturbation", each_sequence(check_non_perturbation)),
    ("explorer", check_explorer),
    ("text", each_sequence(check_text)),
    *((name, fn if name == "explorer-scope" else each_sequence(fn)) for name, fn in CERTIFICATION_CHECKS),
    ("note", check_note),
)
CHECK_NAMES = tuple(name for name, _ in _CHECKS)


def _replay_if_sound(bundle: BundleView, done: list[Check], allow_large: bool) -> str:
    """A bundle that failed an offline check is not run: what it asks to compute is not trusted."""
    failed = [c.name for c in done if c.status == FAILED]
    if failed:
        raise CheckFailed(f"not replayed: the offline check(s) {', '.join(failed)} FAILED, and a bundle is re-run "
                          "only once everything it says is consistent")  # fmt: skip
    return check_replay(bundle, allow_large)


def verify_bundle(path: str | os.PathLike, replay: bool = False, on_check: Callable[[Check], None] | None = None,
                  allow_large: bool = False) -> Report:  # fmt: skip
    """Run every check on the bundle at ``path`` (a bundle directory, an archive, or a ``receipt.json``).

    ``on_check`` is called with each :class:`Check` as soon as it completes. The replay runs only
    when every offline check passed; ``allow_large`` lets it generate the full-shape preset."""
    from kimi_jax.ledger.archive import is_archive, open_bundle

    source = os.fspath(path)
    checks: list[Check] = []
    with open_bundle(path) as root:
        shown = f"{source} (bundle folder {root.name})" if is_archive(source) else str(root)
        bundle = BundleView(Path(root))
        replayed = lambda b: _replay_if_sound(b, checks, allow_large)  # noqa: E731
        todo = list(_CHECKS) + ([("replay", replayed)] if replay else [])
        for number, (name, fn) in enumerate(todo, start=1):
            check = run_check(number, name, fn, bundle)
            checks.append(check)
            if on_check is not None:
                on_check(check)
    return Report(source, shown, checks)
