"""verify's ``note`` check: ``note.pdf`` and ``certification.json`` are byte for byte what this
kimi-jax renders from the bundle's other files. A tampered note differs from the rendering; a
tampered ledger (or manifest, anchor, explorer page...) changes the rendering, so the stored note
no longer matches it. Bundles written before notes existed have neither file: SKIPPED."""

from __future__ import annotations

import re

from kimi_jax.errors import KimiJaxError
from kimi_jax.fileio import read_regular
from kimi_jax.ledger.bundle import MAX_JSON_BYTES
from kimi_jax.verify.bundle_view import BundleView
from kimi_jax.verify.report import CheckFailed, CheckSkipped, require

_PRODUCER = re.compile(rb"/Producer \(([^)]{0,400})\)")


def _producer(pdf: bytes) -> str | None:
    found = _PRODUCER.search(pdf)
    return found.group(1).decode("latin-1") if found else None


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_note(b: BundleView) -> str:
    from kimi_jax.note.render import CERTIFICATION, NOTE, render_certification, render_note

    present = [name for name in (NOTE, CERTIFICATION) if b.has(name)]
    if not present:
        raise CheckSkipped(f"the bundle has no {NOTE} (kimi-jax serve leaves it out unless --notes; bundles written "
                          f"before kimi-jax wrote notes have none; `kimi-jax note` renders it): nothing to compare")
    problems = [f"{name}: missing, but {present[0]} is present (a bundle has both or neither)"
                for name in (NOTE, CERTIFICATION) if name not in present]  # fmt: skip
    try:
        want = {CERTIFICATION: render_certification(b), NOTE: render_note(b)}
    except KimiJaxError as e:
        raise CheckFailed(b.relative(str(e))) from None
    for name in present:
        have = read_regular(b.root / name, 2 * MAX_JSON_BYTES, name)
        if have == want[name]:
            continue
        why = (f"{name}: not the {name} rendered from the bundle's files (first difference at byte "
               f"{_first_difference(have, want[name]):,} of {len(have):,}; the rendering has {len(want[name]):,})")
        if name == NOTE and _producer(have) != _producer(want[name]):
            why += (f"; it was rendered by {_producer(have)!r}, this verifier renders with {_producer(want[name])!r}: "
                    "the bytes are compared only between the same versions")  # fmt: skip
        problems.append(why)
    require(problems)
    return f"{NOTE} ({len(want[NOTE]):,} bytes) and {CERTIFICATION} re-rendered identically"
