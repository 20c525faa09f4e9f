"""Checks 3-6 of verify, on the ledger itself: its schema, the provenance of every field, the
derived fields recomputed, and the digests and tokens against the stored arrays. Each takes the
loaded bundle and returns a note (OK), or raises :class:`CheckFailed` with the reason."""

from __future__ import annotations

from typing import Any

import jsonschema
import numpy as np

from kimi_jax.ledger.bundle import ARRAYS, step_key
from kimi_jax.ledger.ledger import (
    LEDGER_SCHEMA,
    LEDGER_SCHEMA_ID,
    LEDGER_VERSION,
    LEDGER_VERSION_CHANGES,
    audit_derived,
    provenance_map,
    tensor_digest,
    unclassified_fields,
)
from kimi_jax.ledger.sequences import MULTI_SCHEMA, MULTI_VERSION, is_multi, schema_of
from kimi_jax.platform_info import fingerprint_digest
from kimi_jax.storage.digests import recorded_checkpoint
from kimi_jax.text.sampling import Sampling, sample_token
from kimi_jax.verify.bundle_view import BundleView
from kimi_jax.verify.report import CheckFailed, require, short

__all__ = ["check_schema", "check_provenance", "check_derivations", "check_digests"]


def check_schema(b: BundleView) -> str:
    ledger = b.json("ledger.json")
    version = ledger.get("ledger_version") if isinstance(ledger, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version not in (LEDGER_VERSION, MULTI_VERSION):
        changes = "; ".join(f"version {v}: {what}" for v, what in sorted(LEDGER_VERSION_CHANGES.items()) if v > version)
        raise CheckFailed(f"ledger.json: ledger_version is {version} (schema {short(ledger.get('schema'))}), but this "
                          f"kimi-jax verifies ledger version {LEDGER_VERSION} ({LEDGER_SCHEMA_ID})"
                          + (f"; what changed since: {changes}" if changes else "")
                          + "; verify it with the kimi-jax that wrote it, or run its manifest again")  # fmt: skip
    if is_multi(ledger):  # a multi-sequence ledger (version 3): its schema, and what one of it must hold
        errors = sorted(jsonschema.Draft202012Validator(MULTI_SCHEMA).iter_errors(ledger), key=lambda e: list(e.path))
        require([f"ledger.json {e.json_path}: {e.message[:160]}" for e in errors])
        return f"ledger version {MULTI_VERSION}: {len(ledger['sequences'])} sequences, {len(ledger['passes'])} passes"
    errors = sorted(jsonschema.Draft202012Validator(LEDGER_SCHEMA).iter_errors(ledger), key=lambda e: list(e.path))
    require([f"ledger.json {e.json_path}: {e.message[:160]}" for e in errors])
    return ""


def check_provenance(b: BundleView) -> str:
    stored = b.json("provenance.json")
    ledger = b.json("ledger.json")  # the whole ledger, whichever sequence b shows
    schema = schema_of(ledger)
    expected = provenance_map(schema)
    problems = []
    if not isinstance(stored, dict):
        problems.append("provenance.json: expected an object {ledger field: measured | derived}")
    else:
        for field in sorted(set(stored) | set(expected)):
            if field not in stored:
                problems.append(f"provenance.json: {field}: missing; the schema classifies it {expected[field]}")
            elif field not in expected:
                problems.append(f"provenance.json: {field}: not a field of the ledger schema")
            elif stored[field] != expected[field]:
                problems.append(f"provenance.json: {field}: labelled {short(stored[field])}, the schema says "
                                f"{expected[field]}")  # fmt: skip
    try:
        loose = unclassified_fields(ledger, schema)
    except (AttributeError, TypeError) as e:
        loose = [f"<cannot walk the ledger: {e}>"]
    problems += [f"ledger.json {field}: not classified measured or derived by the schema" for field in loose]
    require(problems)
    return ""


def _normalize(ledger: dict[str, Any]) -> bool | None:
    """The checkpoint's norm_topk_prob, when the checkpoint the ledger records is on disk and is that one."""
    index, _ = recorded_checkpoint(ledger.get("checkpoint"))
    return None if index is None else bool(index.config.norm_topk_prob)


def check_derivations(b: BundleView) -> str:
    ledger = b.ledger
    steps, arrays, problems = b.step_arrays()
    note = ""
    normalize = _normalize(ledger)
    if normalize is not None:
        problems += audit_derived(ledger, arrays, normalize)
    else:
        found = audit_derived(ledger, arrays, True)
        if found and not audit_derived(ledger, arrays, False):
            note = ("routing weights recompute unnormalised (norm_topk_prob false); the checkpoint config was not "
                    "available to confirm that setting")  # fmt: skip
        else:
            problems += found
    platform = ledger.get("platform")
    if isinstance(platform, dict) and fingerprint_digest(platform) != ledger.get("platform_digest"):
        problems.append(f"platform_digest is {short(ledger.get('platform_digest'))}, recomputed "
                        f"{fingerprint_digest(platform)}")  # fmt: skip
    require(problems)
    return note


def check_digests(b: BundleView) -> str:
    steps, arrays, problems = b.step_arrays()
    recorded = (b.ledger.get("run") or {}).get("sampling")
    sampling = Sampling(**recorded) if isinstance(recorded, dict) else None
    shapes: dict[str, set] = {"logits": set(), "hidden": set()}
    for step in steps:
        i = step.get("index")
        if i not in arrays:
            continue
        logits, hidden = arrays[i]
        shapes["logits"].add(logits.shape)
        shapes["hidden"].add(hidden.shape)
        for field, a in (("hidden_digest", hidden), ("logits_digest", logits)):
            got = tensor_digest(a)
            if step.get(field) != got:
                problems.append(f"steps[{i}].{field} is {short(step.get(field))}, but {ARRAYS}/{step_key(i)} "
                                f"gives {got}")
        if logits.size == 0:
            problems.append(f"{ARRAYS}/{step_key(i)}/logits: empty")
            continue
        if sampling is None:
            chosen, rule = int(np.argmax(logits)), "argmax of the stored logits"
        else:
            chosen, rule = sample_token(logits, sampling, i)[0], f"the seeded draw from the stored logits (seed {sampling.seed})"
        if step.get("token") != chosen:
            problems.append(f"steps[{i}].token is {short(step.get('token'))}, but the {rule} is {chosen}")
        token = step.get("token")
        if isinstance(token, int) and 0 <= token < logits.size:
            logit = step.get("logit")
            if not isinstance(logit, (int, float)) or np.float32(logit) != logits[token]:
                problems.append(f"steps[{i}].logit is {short(logit)}, but the stored logits[{token}] is "
                                f"{float(logits[token])!r} (float32)")  # fmt: skip
        else:
            problems.append(f"steps[{i}].token {short(token)} is not an index into the stored logits "
                            f"(vocab {logits.size})")  # fmt: skip
    for what, found in shapes.items():
        if len(found) > 1:
            problems.append(f"{ARRAYS}: {what} shapes differ between steps ({sorted(found)})")
    require(problems)
    return ""
