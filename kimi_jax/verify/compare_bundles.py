"""Two run bundles (directories, archives or ``receipt.json`` files): per step, whether the tokens
and the hidden/logits digests are equal and the largest absolute differences of the stored arrays;
the first divergent step and, within it, the first layer whose norm_in/norm_out differ (when norms
were captured); platform, software and manifest differences. Two multi-sequence bundles are
compared sequence by sequence (sequence i of one with sequence i of the other)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from kimi_jax.errors import KimiJaxError
from kimi_jax.fileio import read_json
from kimi_jax.ledger.archive import open_bundle
from kimi_jax.ledger.bundle import MAX_JSON_BYTES, load_arrays
from kimi_jax.ledger.sequences import array_offsets, is_multi, schema_of
from kimi_jax.manifest import Manifest
from kimi_jax.platform_info import platform_differences
from kimi_jax.storage.digests import checkpoint_identity
from kimi_jax.verify.compare_manifests import ManifestComparison, compare_resolved, show

__all__ = ["CompareError", "StepComparison", "BundleComparison", "compare_bundles"]


class CompareError(KimiJaxError):
    """The two things given cannot be compared (a manifest and a bundle, unreadable input)."""


@dataclasses.dataclass
class StepComparison:
    index: int
    token_a: int | None
    token_b: int | None
    context_equal: bool
    hidden_equal: bool
    logits_equal: bool
    bytes_read_a: int | None
    bytes_read_b: int | None
    max_abs_logits: float | None  # None: arrays not available or of different shapes
    max_abs_hidden: float | None
    sequence: int | None = None  # of a multi-sequence bundle

    @property
    def label(self) -> str:
        return str(self.index) if self.sequence is None else f"{self.sequence}:{self.index}"

    @property
    def tokens_equal(self) -> bool:
        return self.token_a == self.token_b

    @property
    def identical(self) -> bool:
        return self.tokens_equal and self.context_equal and self.hidden_equal and self.logits_equal


@dataclasses.dataclass
class BundleComparison:
    a: str
    b: str
    steps_a: int
    steps_b: int
    steps: list[StepComparison]
    first_divergent_step: int | None
    first_divergent_layer: int | None  # first layer at the divergent step whose norm_in/norm_out differ
    layer_detail: str  # what differs at that layer, or why no layer is named
    first_expert_layer: int | None  # first layer at the divergent step whose selected experts differ
    platform_differences: list[str]
    software_differences: list[str]
    manifest: ManifestComparison
    notes: list[str]
    first_divergent_sequence: int | None = None  # of multi-sequence bundles

    @property
    def identical(self) -> bool:
        return self.steps_a == self.steps_b and all(s.identical for s in self.steps)


def _read_json(root: Path, name: str) -> Any:
    path = root / name
    if not path.exists() and not path.is_symlink():
        raise CompareError(f"{path}: missing; expected a kimi-jax run bundle")
    return read_json(path, MAX_JSON_BYTES, name, CompareError)


def _read_ledger(root: Path) -> dict[str, Any]:
    """The bundle's ledger, which must validate against the ledger schema: everything below reads
    its structure as the schema states it."""
    ledger = _read_json(root, "ledger.json")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema_of(ledger)).iter_errors(ledger))
    if error is not None:
        raise CompareError(f"{root / 'ledger.json'}: does not validate against the ledger schema at "
                           f"{error.json_path}: {error.message[:160]}; `kimi-jax verify` says more")  # fmt: skip
    return ledger


def _read_resolved_manifest(root: Path, notes: list[str]) -> dict[str, Any]:
    """The bundle's manifest.json when it is a valid manifest; else {} and a note."""
    from pydantic import ValidationError

    try:
        resolved = _read_json(root, "manifest.json")
        Manifest.model_validate(resolved, context={"base_dir": root, "check_paths": False})
        return resolved
    except CompareError as e:
        notes.append(f"manifests not compared: {e}")
    except ValidationError as e:
        notes.append(f"manifests not compared: {root / 'manifest.json'} is not a valid manifest "
                     f"({str(e).splitlines()[0][:120]})")  # fmt: skip
    return {}


def _max_abs(x: np.ndarray | None, y: np.ndarray | None) -> float | None:
    if x is None or y is None or x.shape != y.shape:
        return None
    if x.size == 0:
        return 0.0
    return float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))


def _layer_divergence(sa: dict, sb: dict) -> tuple[int | None, str, int | None]:
    """(first layer whose norm_in/norm_out differ, detail, first layer whose experts differ)."""
    layers_a, layers_b = sa.get("layers") or [], sb.get("layers") or []
    first_norm, detail, first_expert = None, "", None
    captured = any("norm_in" in l for l in layers_a) and any("norm_in" in l for l in layers_b)
    for la, lb in zip(layers_a, layers_b):
        if first_norm is None and captured:
            for field in ("norm_in", "norm_out"):
                if la.get(field) != lb.get(field):
                    first_norm = la.get("layer")
                    detail = f"{field} {show(la.get(field))} vs {show(lb.get(field))}"
                    break
        if first_expert is None and ("experts" in la or "experts" in lb) and la.get("experts") != lb.get("experts"):
            first_expert = la.get("layer")
    if not captured:
        detail = "norms were not captured in both runs (capture lacks 'norms')"
    elif first_norm is None:
        detail = "no layer's norm_in/norm_out differs; the difference arises after the last layer's norms"
    return first_norm, detail, first_expert


def _load_arrays(root: Path, notes: list[str], name: str, steps: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    try:
        return load_arrays(root, steps)
    except Exception as e:  # orbax raises many kinds on a damaged or missing tree
        notes.append(f"{name}: stored arrays could not be read ({type(e).__name__}: {str(e)[:120]}); array "
                     "differences are not reported")  # fmt: skip
        return {}


def _runs(ledger: dict) -> list[tuple[int | None, list[dict], int]]:
    """(sequence, its steps, where its arrays start) of each run the ledger records."""
    if not is_multi(ledger):
        return [(None, ledger["steps"], 0)]
    return [(s["index"], s["steps"], at) for s, at in zip(ledger["sequences"], array_offsets(ledger))]


def _all_steps(runs: list) -> list[int]:
    return [at + s["index"] for _, steps, at in runs for s in steps]


def _compare_bundle_dirs(ra: Path, rb: Path, name_a: str, name_b: str) -> BundleComparison:
    la, lb = _read_ledger(ra), _read_ledger(rb)
    notes: list[str] = []
    runs_a, runs_b = _runs(la), _runs(lb)
    arrays_a = _load_arrays(ra, notes, name_a, _all_steps(runs_a))
    arrays_b = _load_arrays(rb, notes, name_b, _all_steps(runs_b))
    steps: list[StepComparison] = []
    pairs: list[tuple[dict, dict]] = []
    if len(runs_a) != len(runs_b) or (runs_a[0][0] is None) != (runs_b[0][0] is None):
        notes.append(f"{name_a} records {len(runs_a)} sequence(s), {name_b} {len(runs_b)}; only the first "
                     f"{min(len(runs_a), len(runs_b))} are compared")  # fmt: skip
    for (seq, steps_a, at_a), (_, steps_b, at_b) in zip(runs_a, runs_b):
        for sa, sb in zip(steps_a, steps_b):
            i = sa.get("index")
            xa, xb = arrays_a.get(at_a + i), arrays_b.get(at_b + sb.get("index"))
            pairs.append((sa, sb))
            steps.append(StepComparison(
                index=i, token_a=sa.get("token"), token_b=sb.get("token"),
                context_equal=sa.get("context") == sb.get("context"),
                hidden_equal=sa.get("hidden_digest") == sb.get("hidden_digest"),
                logits_equal=sa.get("logits_digest") == sb.get("logits_digest"),
                bytes_read_a=sa.get("bytes_read"), bytes_read_b=sb.get("bytes_read"),
                max_abs_logits=_max_abs(xa[0] if xa else None, xb[0] if xb else None),
                max_abs_hidden=_max_abs(xa[1] if xa else None, xb[1] if xb else None), sequence=seq,
            ))  # fmt: skip
        if len(steps_a) != len(steps_b):
            which = "" if seq is None else f"sequence {seq}: "
            notes.append(f"{which}{name_a} has {len(steps_a)} steps, {name_b} {len(steps_b)}; only the first "
                         f"{min(len(steps_a), len(steps_b))} are compared")  # fmt: skip
    first = next((k for k, s in enumerate(steps) if not s.identical), None)
    first_step = None if first is None else steps[first].index
    first_layer, detail, first_expert = None, "", None
    if first is not None:
        first_layer, detail, first_expert = _layer_divergence(*pairs[first])
    pa, pb = la.get("platform") or {}, lb.get("platform") or {}
    sw_a, sw_b = la.get("software") or {}, lb.get("software") or {}
    software = [f"{k}: {sw_a.get(k)!r} -> {sw_b.get(k)!r}" for k in sorted(set(sw_a) | set(sw_b))
                if sw_a.get(k) != sw_b.get(k)]  # fmt: skip
    resolved_a, resolved_b = _read_resolved_manifest(ra, notes), _read_resolved_manifest(rb, notes)
    if not resolved_a or not resolved_b:
        resolved_a = resolved_b = {}
    manifest = compare_resolved(resolved_a, resolved_b, _ledger_identity(la), _ledger_identity(lb), name_a, name_b)
    count = lambda runs: sum(len(steps) for _, steps, _ in runs)  # noqa: E731
    return BundleComparison(name_a, name_b, count(runs_a), count(runs_b), steps, first_step, first_layer,
                            detail, first_expert, platform_differences(pa, pb), software, manifest, notes,
                            None if first is None else steps[first].sequence)  # fmt: skip


def _ledger_identity(ledger: dict) -> dict | None:
    ckpt = ledger.get("checkpoint")
    if not isinstance(ckpt, dict):
        return None
    return checkpoint_identity(ckpt) | {"tokenizer_digest": (ckpt.get("tokenizer") or {}).get("digest")}


def compare_bundles(a: str | os.PathLike, b: str | os.PathLike) -> BundleComparison:
    """Compare two run bundles (directories, archives or receipt.json paths) step by step."""
    with contextlib.ExitStack() as stack:
        ra = stack.enter_context(open_bundle(a))
        rb = stack.enter_context(open_bundle(b))
        return _compare_bundle_dirs(Path(ra), Path(rb), os.fspath(a), os.fspath(b))
