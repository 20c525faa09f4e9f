"""Frozen anchors: the single-step result of a manifest, required to be bitwise reproducible.

``freeze`` runs the manifest's prompt for one token twice, in two fresh engines, and writes the
anchor only if both runs agree bit for bit. Every later run of a manifest that names the anchor
compares its step 0 against it and stops on any difference, saying which fields differ and
whether the platform does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import blake3

from kimi_jax.errors import KimiJaxError
from kimi_jax.fileio import parse_json, read_regular, write_json_atomic
from kimi_jax.ledger.ledger import f32, step_identity
from kimi_jax.platform_info import (
    fingerprint_digest,
    platform_differences,
    platform_fingerprint,
)

ANCHOR_VERSION = 1
# An anchor is a few kilobytes (the platform fingerprint is the largest part).
MAX_ANCHOR_BYTES = 1024 * 1024
ANCHORED = ("token", "logit", "hidden_digest", "logits_digest", "bytes_read")


class AnchorMismatch(KimiJaxError):
    """Step 0 of a run differs from its frozen anchor, or the anchor does not fit the run."""


def _conditions(plan) -> dict[str, Any]:
    """What a step-0 result depends on besides the platform: checkpoint, prompt, compute mode."""
    m, idx = plan.manifest, plan.index
    return {"checkpoint": {"layout": idx.layout, "config_digest": idx.config.digest(),
                           "tensor_list_digest": idx.tensor_list_digest()},  # fmt: skip
            "prompt": list(plan.prompt), "dtype": m.compute.dtype, "kv_cache": m.generate.kv_cache}


def anchor_values(step) -> dict[str, Any]:
    ident = step_identity(step)
    return {"token": ident["token"], "logit": f32(step.logit), "hidden_digest": ident["hidden_digest"],
            "logits_digest": ident["logits_digest"], "bytes_read": ident["bytes_read"]}  # fmt: skip


def freeze(plan, run_one_step, path: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Run step 0 twice with ``run_one_step(plan) -> StepRecord``; write the anchor if identical."""
    target = Path(path) if path else plan.manifest.anchor
    if target is None:
        raise plan.manifest.error("anchor", "no anchor file to freeze into: set anchor to a path (or pass --out)")
    first, second = anchor_values(run_one_step(plan)), anchor_values(run_one_step(plan))
    if first != second:
        diffs = [f"{k}: {first[k]!r} then {second[k]!r}" for k in ANCHORED if first[k] != second[k]]
        raise AnchorMismatch("anchor not frozen: two runs of step 0 differ:\n  " + "\n  ".join(diffs))
    platform = platform_fingerprint()
    anchor = {"anchor_version": ANCHOR_VERSION, **_conditions(plan), **first,
              "platform": platform, "platform_digest": fingerprint_digest(platform)}  # fmt: skip
    write_json_atomic(target, anchor)
    return target, anchor


def load_anchor(path: Path) -> dict[str, Any]:
    if not Path(path).exists():
        raise AnchorMismatch(f"{path}: anchor file does not exist; create it with `kimi-jax anchor freeze`")
    anchor = parse_json(read_regular(path, MAX_ANCHOR_BYTES, "anchor file", AnchorMismatch), f"{path}: anchor file",
                        AnchorMismatch)  # fmt: skip
    if not isinstance(anchor, dict):
        raise AnchorMismatch(f"{path}: anchor file must hold a JSON object, got {type(anchor).__name__}")
    missing = [k for k in ("anchor_version", *ANCHORED, "platform") if k not in anchor]
    if missing or anchor.get("anchor_version") != ANCHOR_VERSION:
        raise AnchorMismatch(f"{path}: not a version-{ANCHOR_VERSION} anchor file (missing {missing})")
    return anchor


def precheck(plan) -> dict[str, Any] | None:
    """Before compute: the anchor exists and was frozen for this checkpoint, prompt and mode."""
    path = plan.manifest.anchor
    if path is None:
        return None
    anchor = load_anchor(path)
    want = _conditions(plan)
    diffs = [f"{k}: anchor {anchor.get(k)!r}, this run {want[k]!r}" for k in want if anchor.get(k) != want[k]]
    if diffs:
        raise AnchorMismatch(f"{path}: the anchor was frozen for a different run:\n  " + "\n  ".join(diffs))
    return anchor


def check(anchor: dict[str, Any], path: Path, step) -> dict[str, Any]:
    """Compare step 0 with the anchor; raise with a field-by-field report on any difference."""
    got = anchor_values(step)
    diffs = [f"{k}: anchor {anchor[k]!r}, this run {got[k]!r}" for k in ANCHORED if anchor[k] != got[k]]
    if diffs:
        platform = platform_differences(anchor["platform"], platform_fingerprint())
        where = ("the platform differs:\n  " + "\n  ".join(platform)) if platform else "the platform is identical"
        raise AnchorMismatch(f"{path}: step 0 does not match the frozen anchor:\n  " + "\n  ".join(diffs)
                             + f"\n{where}")  # fmt: skip
    data = read_regular(path, MAX_ANCHOR_BYTES, "anchor file", AnchorMismatch)
    return {"file": str(path), "status": "matched", "anchor_digest": blake3.blake3(data).hexdigest()}
