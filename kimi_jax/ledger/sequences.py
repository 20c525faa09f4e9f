"""Ledgers of shared passes (version 3): a run whose passes over the weights made several tokens
at once: a ``prompts:`` run (a token of each sequence per pass) or a run with ``generate.drafts``
(drafted tokens verified in one pass).

A one-prompt run without drafts writes version 2, unchanged; only these write version 3. Its
ledger is a version-2 ledger with what belongs to one sequence moved into ``sequences[i]``:

* ``sequences[i]``: sequence i's prompt ids, the prompt as given, its sampling and stop rules
  (from ``run``), its ``steps``, ``stopped``, ``text``, ``anchor`` (sequence 0's step 0 is the
  anchor step; the others' are null), ``non_perturbation`` and its own ``totals``.
* ``passes``: every pass over the weights: which sequences it served (and which step of each), the
  bytes it used once for all of them and where they came from, and, derived, the bytes the
  sharing saved and the bytes used per token it made; a verification pass also its drafted
  tokens and, derived, how many were accepted.
* ``totals``: the whole run, with bytes used and read from storage per generated token (derived).

A sequence's step records the bytes *its* token used, as its lone run would (anchors and proofs
compare them); its sources are its share of the pass's (:func:`kimi_jax.model.batch.share`).
:func:`sequence_view` gives sequence i back as the version-2 ledger of its own run, so every
check of a one-prompt ledger applies to each sequence unchanged. Arrays: sequence i's step j is
stored as array ``step_{offset_i + j}`` (:func:`array_offsets`), in sequence order.
"""

from __future__ import annotations

import copy
from typing import Any

from kimi_jax.ledger import ledger as v2
from kimi_jax.ledger.floats import f32
from kimi_jax.ledger.schema_parts import COUNT as _INT
from kimi_jax.ledger.schema_parts import derived as _d
from kimi_jax.ledger.schema_parts import measured as _m
from kimi_jax.ledger.schema_parts import schema_object as _obj

MULTI_VERSION = 3
MULTI_SCHEMA_ID = f"urn:kimi-jax:schema:ledger:v{MULTI_VERSION}"
# What a sequence owns: from run, and at the top level of a version-2 ledger
RUN_OWN = ("prompt", "prompt_input", "sampling", "stop")
TOP_OWN = ("steps", "stopped", "text", "anchor", "non_perturbation")
# Totals that are the whole run's, never one sequence's
RUN_TIMING = ("proof_wall_s", "run_wall_s", "proof_bytes_network", "proof_bytes_cache")

_V2 = v2.LEDGER_SCHEMA["properties"]
_PER_TOKEN = {"type": ["number", "null"], "minimum": 0}


def _without(schema: dict, names: tuple[str, ...]) -> dict:
    out = copy.deepcopy(schema)
    out["properties"] = {k: v for k, v in out["properties"].items() if k not in names}
    out["required"] = [k for k in out["required"] if k not in names]
    return out


_SEQUENCE = _obj({
    "index": _m(_INT, "Sequence index: the place of its prompt in the manifest's prompts."),
    **{k: _V2["run"]["properties"][k] for k in RUN_OWN},
    **{k: _V2[k] for k in TOP_OWN},
    "totals": _without(_V2["totals"], RUN_TIMING),
}, required=["index", *RUN_OWN, "steps", "stopped", "text", "totals"])  # fmt: skip

_PASS = _obj({
    "index": _m(_INT, "Pass over the weights, in order."),
    "sequences": _m({"type": "array", "items": _INT, "minItems": 1}, "The sequence of each token it made, by index "
                    "(one: a sequence's step 0, its prompt run alone; several: one decoded token of each; a "
                    "sequence repeated: its tokens a verification pass made)."),
    "steps": _m({"type": "array", "items": _INT, "minItems": 1}, "The step of each of those sequences it made."),
    "bytes_used": _m(_INT, "Bytes of stored tensors the pass used, once for all its sequences: every layer's "
                     "non-expert weights, the union of its tokens' experts, their embedding rows and the head."),
    **{f"bytes_{name}": _m(_INT, f"Of the pass's bytes (as a step's bytes_{name}).")
       for name in ("from_memory", "from_storage", "from_speculation", "mispredicted", "preloaded", "overread")},
    "wall_s": _m({"type": "number", "minimum": 0}, "Wall-clock seconds of the pass."),
    "bytes_shared": _d({"type": "integer"}, "What reading once for all saved: the sum of the bytes_read of the "
                       "steps it made (each token's own bytes, as a plain run counts them) minus bytes_used; negative "
                       "when rejected drafts' rows used more than sharing saved (derive_pass)."),
    "bytes_per_token": _d({"type": "number", "minimum": 0}, "(bytes_used + draft_bytes_used) / the number of tokens "
                          "it made (derive_pass)."),
    "drafted": _m({"type": "array", "items": _INT}, "A verification pass's drafted tokens (generate.drafts), "
                  "verified as rows after the sequence's last token."),
    "accepted": _d(_INT, "Of drafted, how many leading ones were the tokens decoding chose: the pass made them "
                   "and one more (derive_pass)."),
    "draft_passes": _m(_INT, "Drafts from a multi-token-prediction layer (generate.drafts.method mtp): the passes "
                       "over that layer that drafted this pass's tokens (the rows verified since the last, then "
                       "one per further draft)."),
    "draft_bytes_used": _m(_INT, "Bytes of stored tensors those passes used (the layer's weights, its experts' "
                           "union per pass, its embedding rows and head); not in bytes_used."),
    "draft_bytes_from_storage": _m(_INT, "Of draft_bytes_used, bytes read from storage when needed."),
    "draft_wall_s": _m({"type": "number", "minimum": 0}, "Wall-clock seconds of those passes; not in wall_s."),
}, required=["index", "sequences", "steps", "bytes_used", "wall_s", "bytes_shared", "bytes_per_token"])  # fmt: skip

MULTI_SCHEMA: dict[str, Any] = {
    "$schema": v2.LEDGER_SCHEMA["$schema"],
    "$id": MULTI_SCHEMA_ID,
    "title": f"kimi-jax output formation ledger of several sequences, version {MULTI_VERSION}",
    **_obj({
        **{k: s for k, s in _V2.items() if k not in TOP_OWN and k not in ("schema", "ledger_version", "run", "totals")},
        "schema": {"const": MULTI_SCHEMA_ID, "x-provenance": "derived", "description": "Schema identifier."},
        "ledger_version": {"const": MULTI_VERSION, "x-provenance": "derived", "description": "Schema version."},
        "run": _without(_V2["run"], RUN_OWN),
        "sequences": {"type": "array", "items": _SEQUENCE, "minItems": 1},
        "passes": {"type": "array", "items": _PASS, "minItems": 1},
        "totals": _obj({
            **_V2["totals"]["properties"],
            "bytes_read": _m(_INT, "Bytes the sequences' tokens used, each counted as its lone run counts it (the "
                             "sum of the sequences' totals.bytes_read)."),
            "wall_s": _m({"type": "number", "minimum": 0}, "Wall-clock seconds over all passes, drafting included."),
            "tokens": _d(_INT, "Tokens generated: the sequences' steps (derive_totals)."),
            "bytes_used": _d(_INT, "Bytes the passes used: the sum of passes[].bytes_used and "
                             "passes[].draft_bytes_used (derive_totals)."),
            "bytes_from_storage": _d(_INT, "Bytes the passes read from storage when needed: the sum of "
                                     "passes[].bytes_from_storage and passes[].draft_bytes_from_storage "
                                     "(derive_totals)."),
            "bytes_used_per_token": _d(_PER_TOKEN, "bytes_used / tokens (derive_totals)."),
            "bytes_from_storage_per_token": _d(_PER_TOKEN, "bytes_from_storage / tokens (derive_totals)."),
            "drafted": _d(_INT, "Tokens drafted over all verification passes (derive_totals; with generate.drafts)."),
            "accepted": _d(_INT, "Drafted tokens accepted: tokens made without a pass of their own (derive_totals)."),
        }, required=["bytes_read", "wall_s", "tokens", "bytes_used", "bytes_from_storage", "bytes_used_per_token",
                     "bytes_from_storage_per_token"]),
    }),
}  # fmt: skip


def is_multi(ledger: Any) -> bool:
    """Whether ``ledger`` is a multi-sequence (version 3) ledger."""
    return isinstance(ledger, dict) and ledger.get("ledger_version") == MULTI_VERSION


def schema_of(ledger: Any) -> dict:
    """The schema a ledger of this version is checked against."""
    return MULTI_SCHEMA if is_multi(ledger) else v2.LEDGER_SCHEMA


# -- derivations -------------------------------------------------------------------------------


def derive_pass(entry: dict, made: list[dict]) -> dict[str, Any]:
    """A pass's derived fields from its measured ones and the step entries it made."""
    derived = {"bytes_shared": sum(s["bytes_read"] for s in made) - entry["bytes_used"],
               "bytes_per_token": f32((entry["bytes_used"] + entry.get("draft_bytes_used", 0)) / len(entry["sequences"]))}  # fmt: skip
    if "drafted" in entry:
        tokens = [s["token"] for s in made]
        derived["accepted"] = next((k for k, (d, t) in enumerate(zip(entry["drafted"], tokens)) if d != t),
                                   min(len(entry["drafted"]), len(tokens)))  # fmt: skip
    return derived


def derive_totals(sequences: list[dict], passes: list[dict]) -> dict[str, Any]:
    """The run's derived totals: tokens, and the passes' bytes per generated token."""
    tokens = sum(len(s["steps"]) for s in sequences)
    used = sum(p["bytes_used"] + p.get("draft_bytes_used", 0) for p in passes)
    storage = sum(p["bytes_from_storage"] + p.get("draft_bytes_from_storage", 0) for p in passes)
    per = lambda b: f32(b / tokens) if tokens else None  # noqa: E731
    totals = {"tokens": tokens, "bytes_used": used, "bytes_from_storage": storage, "bytes_used_per_token": per(used),
              "bytes_from_storage_per_token": per(storage)}  # fmt: skip
    verified = [p for p in passes if "drafted" in p]
    if verified:
        totals.update(drafted=sum(len(p["drafted"]) for p in verified), accepted=sum(p["accepted"] for p in verified))
    return totals


def _made(ledger: dict, entry: dict) -> list[dict]:
    """The step entries a pass made (a step index past a sequence's steps: a bare placeholder)."""
    steps = [ledger["sequences"][i]["steps"] for i in entry["sequences"]]
    return [s[j] if j < len(s) else {"bytes_read": 0, "token": None} for s, j in zip(steps, entry["steps"])]


def audit_passes(ledger: dict) -> list[str]:
    """Every step is made by exactly one pass, in order, and every derived pass and total field
    recomputes; one line per disagreement."""
    problems = []
    made: dict[int, list[int]] = {}
    for p in ledger["passes"]:
        if len(p["sequences"]) != len(p["steps"]):
            problems.append(f"passes[{p['index']}]: {len(p['sequences'])} sequences but {len(p['steps'])} steps")
            continue
        for i, j in zip(p["sequences"], p["steps"]):
            made.setdefault(i, []).append(j)
        for key, value in derive_pass(p, _made(ledger, p)).items():
            if p.get(key) != value:
                problems.append(f"passes[{p['index']}].{key} is {p.get(key)!r}, recomputed {value!r}")
    for s in ledger["sequences"]:
        want = list(range(len(s["steps"])))
        if made.get(s["index"], []) != want:
            problems.append(f"sequences[{s['index']}]: the passes make steps {made.get(s['index'], [])}, but it has "
                            f"steps {want}")  # fmt: skip
    for key, value in derive_totals(ledger["sequences"], ledger["passes"]).items():
        if ledger["totals"].get(key) != value:
            problems.append(f"totals.{key} is {ledger['totals'].get(key)!r}, recomputed {value!r}")
    return problems


# -- building and reading ----------------------------------------------------------------------


def pass_entry(record, steps_made: list[int]) -> dict[str, Any]:
    """The measured fields of a :class:`~kimi_jax.model.batch.PassRecord`; ``steps_made``: the
    step of each of its sequences."""
    io = record.io
    entry = {"index": record.index, "sequences": list(record.sequences), "steps": steps_made,
             "bytes_used": int(io.used), **v2.byte_sources(io), "wall_s": f32(record.wall_s)}  # fmt: skip
    if record.drafted is not None:
        entry["drafted"] = [int(t) for t in record.drafted]
    cost = record.draft_cost
    if cost is not None:
        entry.update(draft_passes=cost.passes, draft_bytes_used=int(cost.io.used),
                     draft_bytes_from_storage=int(cost.io.from_storage + cost.io.from_speculation),
                     draft_wall_s=f32(cost.wall_s))  # fmt: skip
    return entry


def combine(views: list[dict], passes: list) -> dict[str, Any]:
    """The version-3 ledger of sequences whose own version-2 ledgers are ``views`` (built as each
    sequence's run, with that sequence's anchor and proof), and the run's ``passes``
    (:class:`~kimi_jax.model.batch.PassRecord`)."""
    first = views[0]
    ledger = {k: v for k, v in first.items() if k not in TOP_OWN and k not in ("totals",)}
    ledger.update(schema=MULTI_SCHEMA_ID, ledger_version=MULTI_VERSION)
    ledger["run"] = {k: v for k, v in first["run"].items() if k not in RUN_OWN}
    ledger["sequences"] = [{"index": i, **{k: view["run"][k] for k in RUN_OWN}, **{k: view[k] for k in TOP_OWN},
                            "totals": {k: v for k, v in view["totals"].items() if k not in RUN_TIMING}}
                           for i, view in enumerate(views)]  # fmt: skip
    counts: dict[int, int] = {}
    ledger["passes"] = []
    for record in passes:
        made = []
        for i in record.sequences:  # a sequence repeated: consecutive steps of it (a verification pass)
            made.append(counts.get(i, 0))
            counts[i] = made[-1] + 1
        ledger["passes"].append(pass_entry(record, made))
    for entry in ledger["passes"]:
        entry.update(derive_pass(entry, _made(ledger, entry)))
    seqs = ledger["sequences"]
    ledger["totals"] = {
        **{k: sum(s["totals"][k] for s in seqs) for k in ("bytes_read", "bytes_network", "bytes_cache")},
        "bytes_per_process": [sum(col) for col in zip(*(s["totals"]["bytes_per_process"] for s in seqs))],
        "wall_s": f32(sum(p.wall_s + (p.draft_cost.wall_s if p.draft_cost else 0.0) for p in passes)),
        **{k: first["totals"][k] for k in RUN_TIMING if k in first["totals"]},
        **derive_totals(seqs, ledger["passes"]),
    }
    return ledger


def sequence_view(ledger: dict, i: int) -> dict[str, Any]:
    """Sequence ``i`` of a version-3 ledger as the version-2 ledger of its own run (its totals
    are its own; the run's timing stays with the run)."""
    seq = ledger["sequences"][i]
    view = {k: v for k, v in ledger.items() if k not in ("sequences", "passes", "totals")}
    view.update(schema=v2.LEDGER_SCHEMA_ID, ledger_version=v2.LEDGER_VERSION)
    view["run"] = {**ledger["run"], **{k: seq[k] for k in RUN_OWN}}
    view.update({k: seq[k] for k in TOP_OWN if k in seq}, totals=seq["totals"])
    return view


def array_offsets(ledger: dict) -> list[int]:
    """Where each sequence's arrays start in the bundle's flat numbering (sequence order)."""
    offsets, at = [], 0
    for seq in ledger["sequences"]:
        offsets.append(at)
        at += len(seq["steps"])
    return offsets


__all__ = ["MULTI_VERSION", "MULTI_SCHEMA_ID", "MULTI_SCHEMA", "is_multi", "schema_of", "derive_pass", "derive_totals",
           "audit_passes", "combine", "sequence_view", "array_offsets"]  # fmt: skip
