"""Checks 1-2 of verify, on the bundle's files as files: checksums and the receipt."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any


from kimi_jax.errors import KimiJaxError, ManifestError
from kimi_jax.ledger.bundle import (
    ARRAYS,
    BUNDLE_FILES,
    BUNDLE_VERSION,
    CHECKSUMS,
    RECEIPT,
    TOKENIZER,
    anchor_record,
    bundle_digest,
    in_bundle_layout,
    receipt_verdict,
)
from kimi_jax.ledger.checksums import verify_checksums
from kimi_jax.ledger.sequences import is_multi
from kimi_jax.manifest import load_manifest, manifest_digest, recorded_manifest
from kimi_jax.storage.remote import same_checkpoint
from kimi_jax.verify.bundle_view import BundleView
from kimi_jax.verify.report import CheckFailed, require, short


def check_checksums(b: BundleView) -> str:
    root = b.root
    problems, outside = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                problems.append(f"{rel}: symbolic link; a bundle holds only regular files and folders")
            elif not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                problems.append(f"{rel}: not a regular file or folder")
            elif stat.S_ISREG(mode) and not in_bundle_layout(rel):
                outside.append(f"{rel}: not part of the bundle layout (a bundle holds {', '.join(BUNDLE_FILES)} "
                               f"the orbax files under {ARRAYS}/, the tokenizer files under {TOKENIZER}/)")  # fmt: skip
    for p in verify_checksums(root, exclude=(CHECKSUMS, RECEIPT)):
        problems.append(b.relative(p))
    require(problems + sorted(outside))
    return ""


def check_receipt(b: BundleView) -> str:
    receipt = b.json(RECEIPT)
    if not isinstance(receipt, dict):
        raise CheckFailed(f"{RECEIPT}: expected a JSON object")
    ledger = b.ledger
    problems = []
    if receipt.get("receipt_version") != BUNDLE_VERSION:
        problems.append(f"{RECEIPT}: receipt_version is {short(receipt.get('receipt_version'))}, "
                        f"expected {BUNDLE_VERSION}")
    try:
        actual = bundle_digest(b.root)
    except KimiJaxError as e:
        actual = None
        problems.append(f"{b.relative(str(e))}; the receipt's bundle_digest is the BLAKE3 of {CHECKSUMS}")
    if actual is not None and receipt.get("bundle_digest") != actual:
        problems.append(f"{RECEIPT}: bundle_digest is {short(receipt.get('bundle_digest'))}, but BLAKE3({CHECKSUMS}) "
                        f"is {actual}")  # fmt: skip
    recorded = receipt.get("manifest_digest")
    if recorded != ledger.get("manifest_digest"):
        problems.append(f"{RECEIPT}: manifest_digest {short(recorded)} differs from ledger.json manifest_digest "
                        f"{short(ledger.get('manifest_digest'))}")  # fmt: skip
    try:
        resolved = b.json("manifest.json")
        if not isinstance(resolved, dict):
            raise CheckFailed("manifest.json: expected a JSON object (the resolved manifest)")
        problems += _validate_resolved_manifest(b.root)
        for view, at in _runs(b, resolved):
            problems += _run_matches_manifest(view.ledger, resolved, at)
        recomputed = manifest_digest(resolved)
        if recomputed != recorded:
            problems.append(f"manifest.json: its identity digest is {recomputed}, but {RECEIPT} records "
                            f"manifest_digest {short(recorded)}")  # fmt: skip
    except CheckFailed as e:
        problems.append(str(e))
    verdict = receipt.get("verdict")
    if not isinstance(verdict, dict):
        problems.append(f"{RECEIPT}: verdict: expected an object with tokens, steps, non_perturbing, anchor_matched")
    else:
        try:
            b.steps() if not is_multi(ledger) else b.sequences()
            want = receipt_verdict(ledger)
        except (CheckFailed, KeyError, TypeError, AttributeError) as e:
            problems.append(f"ledger.json: its steps cannot be read ({e})")
            want = {}
        said = {"tokens": "the ledger's step tokens", "steps": "the ledger's number of steps",
                "non_perturbing": "what ledger.json non_perturbation proves", "anchor_matched": "whether "
                "ledger.json records a matched anchor"}  # fmt: skip
        problems += [f"{RECEIPT}: verdict.{k} is {short(verdict.get(k))}, but {said[k]} gives {short(v)}"
                     for k, v in want.items() if verdict.get(k) != v or type(verdict.get(k)) is not type(v)]  # fmt: skip
    anchor = anchor_record(ledger) if isinstance(ledger, dict) else None
    want = None if not isinstance(anchor, dict) else {"file": anchor.get("file"), "digest": anchor.get("anchor_digest")}
    if receipt.get("anchor") != want:
        problems.append(f"{RECEIPT}: anchor is {short(receipt.get('anchor'))}, the ledger records {short(want)}")
    require(problems)
    return ""


def _runs(b: BundleView, resolved: dict[str, Any]) -> list[tuple[BundleView, str]]:
    """Each run the bundle records (every sequence of a multi-sequence bundle) and where the
    manifest gives its prompt (a drafted run's one sequence: ``prompt``)."""
    many = resolved.get("prompts") is not None
    return [(v, f"prompts.{v.index}" if many and v is not b else "prompt") for v in b.sequences()]


def _run_matches_manifest(ledger: dict[str, Any], resolved: dict[str, Any], prompt_at: str = "prompt") -> list[str]:
    """The ledger's run settings and checkpoint are the ones manifest.json asks for; ``prompt_at``:
    where it gives this run's prompt (``prompts.N``: a sequence's, with its own seed and stop strings)."""
    run = ledger.get("run") or {}
    resolved = recorded_manifest(resolved)
    entry = _entry(resolved, prompt_at)
    section = lambda name: resolved.get(name) if isinstance(resolved.get(name), dict) else {}  # noqa: E731
    if prompt_at != "prompt":  # a sequence: its prompt, and its own seed and stop strings over the manifest's
        generate = section("generate")
        sampling = generate.get("sampling")
        if isinstance(sampling, dict) and entry.get("seed") is not None:
            sampling = {**sampling, "seed": entry["seed"]}
        resolved = {**resolved, "prompt": {k: v for k, v in entry.items() if k not in ("seed", "stop")},
                    "generate": {**generate, "sampling": sampling, "stop": entry.get("stop") or generate.get("stop")}}  # fmt: skip
    want = {"run.max_new_tokens": ("generate.max_new_tokens", section("generate").get("max_new_tokens")),
            "run.kv_cache": ("generate.kv_cache", section("generate").get("kv_cache")),
            "run.dtype": ("compute.dtype", section("compute").get("dtype")),
            "run.dequant": ("compute.dequant", section("compute").get("dequant")),
            "run.capture": ("capture", resolved.get("capture"))}  # fmt: skip
    if "matmul" in run:  # ledgers before kimi-jax recorded it ran widened products
        want["run.matmul"] = ("compute.matmul", section("compute").get("matmul"))
    want["run.prompt_input"] = (prompt_at, {k: v for k, v in entry.items() if v is not None})
    want["run.sampling"] = ("generate.sampling", section("generate").get("sampling"))
    want["run.stop.strings"] = ("generate.stop", section("generate").get("stop") or [])
    if section("prompt").get("tokens") is not None:
        want["run.prompt"] = (f"{prompt_at}.tokens", section("prompt")["tokens"])
    if section("model").get("checkpoint") is not None:
        want["checkpoint.path"] = ("model.checkpoint", section("model")["checkpoint"])
    have = {"run.max_new_tokens": run.get("max_new_tokens"), "run.kv_cache": run.get("kv_cache"),
            "run.dtype": run.get("dtype"), "run.dequant": run.get("dequant"), "run.capture": run.get("capture"),
            "run.matmul": run.get("matmul"),
            "run.prompt": run.get("prompt"), "checkpoint.path": (ledger.get("checkpoint") or {}).get("path"),
            "run.prompt_input": run.get("prompt_input"), "run.sampling": run.get("sampling"),
            "run.stop.strings": (run.get("stop") or {}).get("strings")}  # fmt: skip
    same = {"checkpoint.path": same_checkpoint}  # a remote location is recorded normalised, a Hub revision pinned
    return [f"ledger.json {field} is {short(have[field])}, but manifest.json {where} is {short(value)}"
            for field, (where, value) in want.items()
            if not same.get(field, lambda written, recorded: written == recorded)(value, have[field])]  # fmt: skip


def _entry(resolved: dict[str, Any], at: str) -> dict[str, Any]:
    """The prompt section at ``prompt`` or ``prompts.N`` of a resolved manifest ({} when it has none)."""
    name, _, n = at.partition(".")
    found = resolved.get(name)
    if n:
        found = found[int(n)] if isinstance(found, list) and int(n) < len(found) else None
    return found if isinstance(found, dict) else {}


def _validate_resolved_manifest(root: Path) -> list[str]:
    """manifest.json must be a valid manifest, read by the manifest loader itself so problems name
    ``manifest.json:LINE: field``; paths are not checked (the checkpoint may be gone)."""
    try:
        load_manifest(root / "manifest.json", check_paths=False)
    except ManifestError as e:
        prefix = f"{root}{os.sep}"  # name the file as the bundle does, wherever it was unpacked
        return [line.replace(prefix, "") for line in str(e).splitlines()]
    return []
