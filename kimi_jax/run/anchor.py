"""Frozen anchors: the single-step result of a manifest, required to be bitwise reproducible.

``freeze`` runs the manifest's prompt for one token twice, in two fresh engines, and writes the
anchor only if both runs agree bit for bit. Every later run of a manifest that names the anchor
compares its step 0 against it and stops on any difference, saying which fields differ and
whether the platform does. The file's format is :mod:`kimi_jax.ledger.anchor_record`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import blake3

from kimi_jax.errors import KimiJaxError
from kimi_jax.fileio import parse_json, read_regular, write_json_atomic
from kimi_jax.ledger.anchor_record import ANCHOR_VERSION, ANCHORED, MAX_ANCHOR_BYTES, anchor_values, condition_differences
from kimi_jax.ledger.ledger import LEDGER_VERSION_CHANGES, checkpoint_record
from kimi_jax.platform_info import (
    fingerprint_digest,
    platform_differences,
    platform_fingerprint,
)
from kimi_jax.storage.codecs import LEGACY_DEQUANT_NOTE
from kimi_jax.storage.digests import checkpoint_identity, identity_differences


class AnchorMismatch(KimiJaxError):
    """Step 0 of a run differs from its frozen anchor, or the anchor does not fit the run."""


def _conditions(plan) -> dict[str, Any]:
    """What a step-0 result depends on besides the platform: checkpoint (with its content root when
    a digest file was checked), prompt, compute mode, and for a sampled run the sampling settings
    (the seed draws step 0's token), and the mesh of a mesh run."""
    m, sampling = plan.manifest, plan.decoding.sampling
    conditions = {"checkpoint": checkpoint_identity(checkpoint_record(plan)),
                  "prompt": list(plan.prompt), "dtype": m.compute.dtype, "dequant": m.compute.dequant,
                  "kv_cache": m.generate.kv_cache,
                  "sampling": sampling.as_dict() if sampling else None}  # fmt: skip
    if plan.mesh is not None:  # absent for one device, so anchors frozen before meshes existed still fit
        conditions["mesh"] = plan.mesh.label()
    if m.compute.matmul != "widened":  # absent for the reference products every earlier anchor was frozen with
        conditions["matmul"] = m.compute.matmul
    if m.generate.kv_cache and m.generate.prefill_chunk and len(plan.prompt) > m.generate.prefill_chunk:
        conditions["prefill_chunk"] = m.generate.prefill_chunk  # absent when the prompt runs in one pass
    return conditions


def freeze(plan, run_one_step, path: Path | None = None, write: bool = True) -> tuple[Path, dict[str, Any]]:
    """Run step 0 twice with ``run_one_step(plan) -> StepRecord``; write the anchor if identical.

    ``write`` is False in the processes of a multi-process run other than process 0: they run the
    steps with it but leave the file to it."""
    target = Path(path) if path else plan.manifest.anchor
    if target is None:
        raise plan.manifest.error("anchor", "no anchor file to freeze into: set anchor to a path (or pass --out)")
    first, second = anchor_values(run_one_step(plan)), anchor_values(run_one_step(plan))
    if first != second:
        diffs = [f"{k}: {first[k]!r} then {second[k]!r}" for k in ANCHORED if first[k] != second[k]]
        raise AnchorMismatch("anchor not frozen: two runs of step 0 differ:\n  " + "\n  ".join(diffs))
    platform = platform_fingerprint(plan.mesh_label, plan.kernels_label)
    anchor = {"anchor_version": ANCHOR_VERSION, **_conditions(plan), **first,
              "platform": platform, "platform_digest": fingerprint_digest(platform)}  # fmt: skip
    if write:
        write_json_atomic(target, anchor)
    return target, anchor


def load_anchor(path: Path) -> dict[str, Any]:
    if not Path(path).exists():
        raise AnchorMismatch(f"{path}: anchor file does not exist; freeze it first with `kimi-jax anchor freeze "
                             "MANIFEST` and the same --set options (step 0 runs twice and must agree bit for bit), or "
                             "run without an anchor: --set anchor=null")  # fmt: skip
    anchor = parse_json(read_regular(path, MAX_ANCHOR_BYTES, "anchor file", AnchorMismatch), f"{path}: anchor file",
                        AnchorMismatch)  # fmt: skip
    if not isinstance(anchor, dict):
        raise AnchorMismatch(f"{path}: anchor file must hold a JSON object, got {type(anchor).__name__}")
    if anchor.get("anchor_version") != ANCHOR_VERSION:
        raise AnchorMismatch(f"{path}: anchor_version is {anchor.get('anchor_version')!r}, this kimi-jax reads version "
                             f"{ANCHOR_VERSION} ({LEDGER_VERSION_CHANGES[2]}); a version-1 anchor was computed with "
                             f"dequantization {LEGACY_DEQUANT_NOTE}; freeze it again with "
                             "`kimi-jax anchor freeze`")  # fmt: skip
    missing = [k for k in ("anchor_version", *ANCHORED, "platform") if k not in anchor]
    if missing:
        raise AnchorMismatch(f"{path}: not an anchor file: {', '.join(missing)} missing")
    return anchor


def precheck(plan) -> dict[str, Any] | None:
    """Before compute: the anchor exists and was frozen for this checkpoint, prompt and mode."""
    path = plan.manifest.anchor
    if path is None:
        return None
    anchor = load_anchor(path)
    want = _conditions(plan)
    diffs = condition_differences(anchor, want)
    frozen = anchor.get("checkpoint") if isinstance(anchor.get("checkpoint"), dict) else {}
    diffs += [f"checkpoint.{k}: anchor {frozen.get(k)!r}, this run {want['checkpoint'].get(k)!r}"
              for k in identity_differences(frozen, want["checkpoint"])]  # fmt: skip
    if diffs:
        raise AnchorMismatch(f"{path}: the anchor was frozen for a different run:\n  " + "\n  ".join(diffs))
    return anchor


def check(anchor: dict[str, Any], path: Path, step, mesh: str | None = None, kernels: str | None = None) -> dict[str, Any]:
    """Compare step 0 with the anchor; raise with a field-by-field report on any difference."""
    got = anchor_values(step)
    diffs = [f"{k}: anchor {anchor[k]!r}, this run {got[k]!r}" for k in ANCHORED if anchor[k] != got[k]]
    if diffs:
        platform = platform_differences(anchor["platform"], platform_fingerprint(mesh, kernels))
        where = ("the platform differs:\n  " + "\n  ".join(platform)) if platform else "the platform is identical"
        raise AnchorMismatch(f"{path}: step 0 does not match the frozen anchor:\n  " + "\n  ".join(diffs)
                             + f"\n{where}")  # fmt: skip
    data = read_regular(path, MAX_ANCHOR_BYTES, "anchor file", AnchorMismatch)
    return {"file": str(path), "status": "matched", "anchor_digest": blake3.blake3(data).hexdigest()}
