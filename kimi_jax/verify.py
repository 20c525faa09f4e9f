"""``kimi-jax verify``: prove, without the model, that a run bundle is intact and self-consistent.

The checks, in order (each prints ``N. name: OK``, ``N. name: FAILED: reason`` or
``N. name: SKIPPED: reason``):

1. ``checksums``: every file's BLAKE3 matches ``CHECKSUMS.b3``; no listed file is missing and no
   file is unlisted (``receipt.json`` and ``CHECKSUMS.b3`` itself excepted); no links or special files.
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
   the token is the argmax of the stored logits and the logit its float32 value.
7. ``anchor``: step 0 equals ``anchor.json`` in every anchored field, the anchor was frozen for this
   checkpoint, prompt and compute mode, and its BLAKE3 is the one the ledger records (SKIPPED
   when the bundle carries no anchor).
8. ``continuity``: step 0's context is the prompt, each context is the previous one plus the
   previous token, step indices run 0..n-1, and byte counts add up.
9. ``non-perturbation``: ``non_perturbation.json`` is present, equals the ledger's record, and shows
   bare == instrumented == the ledger's own steps.
10. ``explorer``: the ledger embedded in ``explorer.html`` equals ``ledger.json`` and the page holds
    no other JSON data block (SKIPPED when the bundle has no explorer page).
11. ``replay`` (only with ``--replay``): the bundle's manifest is run again, without the
    non-perturbation proof, against the checkpoint it names; every measured value must match
    (wall-clock and page-cache fields excepted).
"""

from __future__ import annotations

import copy
import json
import os
import stat
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable, NamedTuple

import blake3
import numpy as np

from kimi_jax.bundle import ARRAYS, BUNDLE_VERSION, CHECKSUMS, RECEIPT, step_key
from kimi_jax.fileio import canonical_json

__all__ = ["Check", "Report", "verify_bundle", "manifest_identity_digest", "replay_differences", "CHECK_NAMES",
           "EXPLORER_ELEMENT_ID"]  # fmt: skip

OK, FAILED, SKIPPED = "OK", "FAILED", "SKIPPED"
EXPLORER_ELEMENT_ID = "ledger-data"
NP_FIELDS = ("token", "hidden_digest", "logits_digest", "bytes_read")
CHECK_NAMES = ("checksums", "receipt", "schema", "provenance", "derivations", "digests", "anchor", "continuity",
               "non-perturbation", "explorer")  # fmt: skip
_MAX_SHOWN = 5


class Check(NamedTuple):
    number: int
    name: str
    status: str  # OK | FAILED | SKIPPED
    reason: str  # why it failed or was skipped; for OK an optional note

    def line(self) -> str:
        if self.status == OK:
            return f"{self.number}. {self.name}: OK" + (f" ({self.reason})" if self.reason else "")
        return f"{self.number}. {self.name}: {self.status}: {self.reason}"


class Report:
    """The outcome of :func:`verify_bundle`: ``checks`` in order, ``ok`` when none FAILED (and some ran)."""

    def __init__(self, source: str, bundle: str, checks: list[Check]) -> None:
        self.source, self.bundle, self.checks = source, bundle, checks

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.status != FAILED for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.status == FAILED]

    def status(self, name: str) -> str:
        for c in self.checks:
            if c.name == name:
                return c.status
        raise KeyError(f"no check named {name!r}; the checks are {[c.name for c in self.checks]}")

    def reason(self, name: str) -> str:
        return next(c.reason for c in self.checks if c.name == name)

    def summary(self) -> str:
        counts = {s: sum(c.status == s for c in self.checks) for s in (OK, SKIPPED, FAILED)}
        if not self.checks:
            return f"{self.bundle}: NOT VERIFIED: no checks ran"
        if self.ok:
            return (f"{self.bundle}: VERIFIED ({counts[OK]} OK, {counts[SKIPPED]} SKIPPED, 0 FAILED)")
        return (f"{self.bundle}: NOT VERIFIED: {counts[FAILED]} of {len(self.checks)} checks FAILED "
                f"({', '.join(self.failed)})")  # fmt: skip

    def format(self) -> str:
        return "\n".join([*(c.line() for c in self.checks), self.summary()])


class _Fail(Exception):
    pass


class _Skip(Exception):
    pass


def _join(problems: list[str]) -> str:
    shown = problems[:_MAX_SHOWN]
    more = len(problems) - len(shown)
    return "; ".join(shown) + (f"; ... and {more} more" if more > 0 else "")


def _require(problems: list[str]) -> None:
    if problems:
        raise _Fail(_join(problems))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def manifest_identity_digest(resolved: dict[str, Any]) -> str:
    """The run identity of a resolved manifest dict (``manifest.json``) without re-validating its
    paths: :meth:`Manifest.digest` computed over the stored JSON (``output`` and ``model.cache_dir``
    left out, canonical JSON, BLAKE3). The checkpoint need not exist."""
    data = copy.deepcopy(resolved)
    data.pop("output", None)
    if isinstance(data.get("model"), dict):
        data["model"].pop("cache_dir", None)
    return blake3.blake3(canonical_json(data)).hexdigest()


# -- the bundle's files, loaded once ------------------------------------------------------------


class _Bundle:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, Any] = {}

    def _memo(self, key: str, load: Callable[[], Any]) -> Any:
        if key not in self._cache:
            try:
                self._cache[key] = (True, load())
            except _Fail as e:
                self._cache[key] = (False, str(e))
        ok, value = self._cache[key]
        if not ok:
            raise _Fail(value)
        return value

    def json(self, name: str) -> Any:
        def load() -> Any:
            path = self.root / name
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise _Fail(f"{name}: missing from the bundle") from None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _Fail(f"{name}: not valid JSON ({e})") from None
            except OSError as e:
                raise _Fail(f"{name}: cannot read ({e})") from None

        return self._memo(name, load)

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    @property
    def ledger(self) -> dict[str, Any]:
        ledger = self.json("ledger.json")
        if not isinstance(ledger, dict):
            raise _Fail(f"ledger.json: expected a JSON object, got {type(ledger).__name__}")
        return ledger

    def steps(self) -> list[dict[str, Any]]:
        steps = self.ledger.get("steps")
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            raise _Fail("ledger.json: steps: expected a list of step objects")
        return steps

    def arrays(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        def load() -> dict[int, tuple[np.ndarray, np.ndarray]]:
            from kimi_jax.bundle import load_arrays

            if not (self.root / ARRAYS).is_dir():
                raise _Fail(f"{ARRAYS}/: missing from the bundle; expected the orbax tree of per-step arrays")
            try:
                arrays = load_arrays(self.root)
            except Exception as e:  # orbax raises many kinds on a damaged tree
                raise _Fail(f"{ARRAYS}/: cannot restore the orbax tree ({type(e).__name__}: {str(e)[:200]})") from None
            for step, (logits, hidden) in arrays.items():
                for what, a in (("logits", logits), ("hidden", hidden)):
                    if a.dtype != np.float32 or a.ndim != 1:
                        raise _Fail(f"{ARRAYS}/{step_key(step)}/{what}: expected a float32 vector, got "
                                    f"{a.dtype}{list(a.shape)}")  # fmt: skip
            return arrays

        return self._memo("arrays", load)

    def step_arrays(self) -> tuple[list[dict[str, Any]], dict[int, tuple[np.ndarray, np.ndarray]], list[str]]:
        """Ledger steps, stored arrays, and problems with how the two line up."""
        steps, arrays = self.steps(), self.arrays()
        indices = [s.get("index") for s in steps]
        problems = [f"{ARRAYS}/{step_key(i)}: stored for a step the ledger does not have" for i in sorted(arrays)
                    if i not in indices]  # fmt: skip
        problems += [f"steps[{i}]: no stored arrays ({ARRAYS}/{step_key(i) if isinstance(i, int) else i} missing)"
                     for i in indices if i not in arrays]  # fmt: skip
        return steps, arrays, problems


# -- the checks ---------------------------------------------------------------------------------


def _check_checksums(b: _Bundle) -> str:
    from kimi_jax.checksums import verify_checksums

    root = b.root
    problems = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = path.lstat().st_mode
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                problems.append(f"{rel}: symbolic link; a bundle holds only regular files and folders")
            elif not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                problems.append(f"{rel}: not a regular file or folder")
    prefix = str(root) + os.sep
    for p in verify_checksums(root, exclude=(CHECKSUMS, RECEIPT)):
        problems.append(p[len(prefix):] if p.startswith(prefix) else p.replace(prefix, ""))
    _require(problems)
    return ""


def _check_receipt(b: _Bundle) -> str:
    receipt = b.json(RECEIPT)
    if not isinstance(receipt, dict):
        raise _Fail(f"{RECEIPT}: expected a JSON object")
    ledger = b.ledger
    problems = []
    if receipt.get("receipt_version") != BUNDLE_VERSION:
        problems.append(f"{RECEIPT}: receipt_version is {_short(receipt.get('receipt_version'))}, "
                        f"expected {BUNDLE_VERSION}")
    try:
        actual = blake3.blake3((b.root / CHECKSUMS).read_bytes()).hexdigest()
    except FileNotFoundError:
        actual = None
        problems.append(f"{CHECKSUMS}: missing; the receipt's bundle_digest is the BLAKE3 of that file")
    if actual is not None and receipt.get("bundle_digest") != actual:
        problems.append(f"{RECEIPT}: bundle_digest is {_short(receipt.get('bundle_digest'))}, but BLAKE3({CHECKSUMS}) "
                        f"is {actual}")  # fmt: skip
    recorded = receipt.get("manifest_digest")
    if recorded != ledger.get("manifest_digest"):
        problems.append(f"{RECEIPT}: manifest_digest {_short(recorded)} differs from ledger.json manifest_digest "
                        f"{_short(ledger.get('manifest_digest'))}")  # fmt: skip
    try:
        resolved = b.json("manifest.json")
        if not isinstance(resolved, dict):
            raise _Fail("manifest.json: expected a JSON object (the resolved manifest)")
        problems += _validate_resolved_manifest(resolved, b.root)
        problems += _run_matches_manifest(ledger, resolved)
        recomputed = manifest_identity_digest(resolved)
        if recomputed != recorded:
            problems.append(f"manifest.json: its identity digest is {recomputed}, but {RECEIPT} records "
                            f"manifest_digest {_short(recorded)}")  # fmt: skip
    except _Fail as e:
        problems.append(str(e))
    verdict = receipt.get("verdict")
    if not isinstance(verdict, dict):
        problems.append(f"{RECEIPT}: verdict: expected an object with tokens, steps, non_perturbing, anchor_matched")
    else:
        try:
            steps = b.steps()
        except _Fail as e:
            problems.append(str(e))
            steps = []
        tokens = [s.get("token") for s in steps]
        if verdict.get("tokens") != tokens:
            problems.append(f"{RECEIPT}: verdict.tokens {_short(verdict.get('tokens'))} differ from the ledger's step "
                            f"tokens {_short(tokens)}")  # fmt: skip
        if verdict.get("steps") != len(steps):
            problems.append(f"{RECEIPT}: verdict.steps is {_short(verdict.get('steps'))}, the ledger has "
                            f"{len(steps)} steps")
        proof = ledger.get("non_perturbation")
        proven = bool(isinstance(proof, dict) and proof.get("identical") is True)
        if verdict.get("non_perturbing") is not proven:
            problems.append(f"{RECEIPT}: verdict.non_perturbing is {_short(verdict.get('non_perturbing'))}, but "
                            f"ledger.json non_perturbation {'proves' if proven else 'does not prove'} it")  # fmt: skip
        anchored = ledger.get("anchor") is not None
        if verdict.get("anchor_matched") is not anchored:
            problems.append(f"{RECEIPT}: verdict.anchor_matched is {_short(verdict.get('anchor_matched'))}, but "
                            f"ledger.json anchor is {'set' if anchored else 'null'}")  # fmt: skip
    anchor = ledger.get("anchor")
    want = None if not isinstance(anchor, dict) else {"file": anchor.get("file"), "digest": anchor.get("anchor_digest")}
    if receipt.get("anchor") != want:
        problems.append(f"{RECEIPT}: anchor is {_short(receipt.get('anchor'))}, the ledger records {_short(want)}")
    _require(problems)
    return ""


def _run_matches_manifest(ledger: dict[str, Any], resolved: dict[str, Any]) -> list[str]:
    """The ledger's run settings and checkpoint are the ones manifest.json asks for."""
    run = ledger.get("run") or {}
    section = lambda name: resolved.get(name) if isinstance(resolved.get(name), dict) else {}  # noqa: E731
    want = {"run.max_new_tokens": ("generate.max_new_tokens", section("generate").get("max_new_tokens")),
            "run.kv_cache": ("generate.kv_cache", section("generate").get("kv_cache")),
            "run.dtype": ("compute.dtype", section("compute").get("dtype")),
            "run.capture": ("capture", resolved.get("capture"))}  # fmt: skip
    if section("prompt").get("tokens") is not None:
        want["run.prompt"] = ("prompt.tokens", section("prompt")["tokens"])
    if section("model").get("checkpoint") is not None:
        want["checkpoint.path"] = ("model.checkpoint", section("model")["checkpoint"])
    have = {"run.max_new_tokens": run.get("max_new_tokens"), "run.kv_cache": run.get("kv_cache"),
            "run.dtype": run.get("dtype"), "run.capture": run.get("capture"), "run.prompt": run.get("prompt"),
            "checkpoint.path": (ledger.get("checkpoint") or {}).get("path")}  # fmt: skip
    return [f"ledger.json {field} is {_short(have[field])}, but manifest.json {where} is {_short(value)}"
            for field, (where, value) in want.items() if have[field] != value]  # fmt: skip


def _validate_resolved_manifest(resolved: dict[str, Any], root: Path) -> list[str]:
    """manifest.json must be a valid manifest; paths are not checked (the checkpoint may be gone)."""
    from pydantic import ValidationError

    from kimi_jax.manifest import Manifest

    try:
        Manifest.model_validate(resolved, context={"base_dir": root, "check_paths": False})
    except ValidationError as e:
        return [f"manifest.json: {'.'.join(str(x) for x in err['loc']) or '<manifest>'}: {err['msg']}"
                for err in e.errors(include_url=False)]  # fmt: skip
    return []


def _check_schema(b: _Bundle) -> str:
    import jsonschema

    from kimi_jax.ledger import LEDGER_SCHEMA

    ledger = b.json("ledger.json")
    errors = sorted(jsonschema.Draft202012Validator(LEDGER_SCHEMA).iter_errors(ledger), key=lambda e: list(e.path))
    _require([f"ledger.json {e.json_path}: {e.message[:160]}" for e in errors])
    return ""


def _check_provenance(b: _Bundle) -> str:
    from kimi_jax.ledger import provenance_map, unclassified_fields

    stored = b.json("provenance.json")
    expected = provenance_map()
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
                problems.append(f"provenance.json: {field}: labelled {_short(stored[field])}, the schema says "
                                f"{expected[field]}")  # fmt: skip
    try:
        loose = unclassified_fields(b.ledger)
    except (AttributeError, TypeError) as e:
        loose = [f"<cannot walk the ledger: {e}>"]
    problems += [f"ledger.json {field}: not classified measured or derived by the schema" for field in loose]
    _require(problems)
    return ""


def _normalize(ledger: dict[str, Any]) -> bool | None:
    """The checkpoint's norm_topk_prob, when its config is available and is the one the ledger records."""
    from kimi_jax.config import load_model_config

    path = (ledger.get("checkpoint") or {}).get("path")
    if not isinstance(path, str) or not (Path(path) / "config.json").is_file():
        return None
    try:
        cfg = load_model_config(path)
    except Exception:
        return None
    if cfg.digest() != ledger["checkpoint"].get("config_digest"):
        return None
    return bool(cfg.norm_topk_prob)


def _check_derivations(b: _Bundle) -> str:
    from kimi_jax.ledger import audit_derived
    from kimi_jax.platform_info import fingerprint_digest

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
        problems.append(f"platform_digest is {_short(ledger.get('platform_digest'))}, recomputed "
                        f"{fingerprint_digest(platform)}")  # fmt: skip
    _require(problems)
    return note


def _check_digests(b: _Bundle) -> str:
    from kimi_jax.ledger import tensor_digest

    steps, arrays, problems = b.step_arrays()
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
                problems.append(f"steps[{i}].{field} is {_short(step.get(field))}, but {ARRAYS}/{step_key(i)} "
                                f"gives {got}")
        if logits.size == 0:
            problems.append(f"{ARRAYS}/{step_key(i)}/logits: empty")
            continue
        best = int(np.argmax(logits))
        if step.get("token") != best:
            problems.append(f"steps[{i}].token is {_short(step.get('token'))}, but argmax of the stored logits "
                            f"is {best}")
        token = step.get("token")
        if isinstance(token, int) and 0 <= token < logits.size:
            logit = step.get("logit")
            if not isinstance(logit, (int, float)) or np.float32(logit) != logits[token]:
                problems.append(f"steps[{i}].logit is {_short(logit)}, but the stored logits[{token}] is "
                                f"{float(logits[token])!r} (float32)")  # fmt: skip
        else:
            problems.append(f"steps[{i}].token {_short(token)} is not an index into the stored logits "
                            f"(vocab {logits.size})")  # fmt: skip
    for what, found in shapes.items():
        if len(found) > 1:
            problems.append(f"{ARRAYS}: {what} shapes differ between steps ({sorted(found)})")
    _require(problems)
    return ""


def _check_anchor(b: _Bundle) -> str:
    from kimi_jax.anchor import ANCHOR_VERSION, ANCHORED

    ledger = b.ledger
    record = ledger.get("anchor")
    if not b.has("anchor.json"):
        if record is None:
            raise _Skip("the bundle carries no anchor (no anchor.json, ledger.anchor is null)")
        raise _Fail(f"anchor.json: missing, but ledger.json anchor records a matched anchor ({_short(record)})")
    if not isinstance(record, dict):
        raise _Fail("anchor.json is present but ledger.json anchor is null; the run did not check it")
    anchor = b.json("anchor.json")
    if not isinstance(anchor, dict):
        raise _Fail("anchor.json: expected a JSON object")
    problems = []
    if anchor.get("anchor_version") != ANCHOR_VERSION:
        problems.append(f"anchor.json: anchor_version is {_short(anchor.get('anchor_version'))}, "
                        f"expected {ANCHOR_VERSION}")
    steps = b.steps()
    if not steps:
        raise _Fail("ledger.json: steps: empty; step 0 is compared with the anchor")
    step0 = steps[0]
    for field in ANCHORED:
        if field not in anchor:
            problems.append(f"anchor.json: {field}: missing")
        elif anchor[field] != step0.get(field):
            problems.append(f"steps[0].{field} is {_short(step0.get(field))}, anchor.json has {_short(anchor[field])}")
    ckpt = ledger.get("checkpoint") or {}
    run = ledger.get("run") or {}
    want = {"checkpoint": {k: ckpt.get(k) for k in ("layout", "config_digest", "tensor_list_digest")},
            "prompt": run.get("prompt"), "dtype": run.get("dtype"), "kv_cache": run.get("kv_cache")}  # fmt: skip
    for key, value in want.items():
        if anchor.get(key) != value:
            problems.append(f"anchor.json: {key} is {_short(anchor.get(key))}, this run's is {_short(value)}")
    digest = blake3.blake3((b.root / "anchor.json").read_bytes()).hexdigest()
    if record.get("anchor_digest") != digest:
        problems.append(f"ledger.json anchor.anchor_digest is {_short(record.get('anchor_digest'))}, but "
                        f"BLAKE3(anchor.json) is {digest}")  # fmt: skip
    if record.get("status") != "matched":
        problems.append(f"ledger.json anchor.status is {_short(record.get('status'))}, expected 'matched'")
    _require(problems)
    return ""


def _check_continuity(b: _Bundle) -> str:
    ledger = b.ledger
    steps = b.steps()
    run = ledger.get("run") or {}
    prompt = run.get("prompt")
    problems = []
    if not steps:
        raise _Fail("ledger.json: steps: empty")
    if run.get("max_new_tokens") != len(steps):
        problems.append(f"run.max_new_tokens is {_short(run.get('max_new_tokens'))}, but the ledger has "
                        f"{len(steps)} steps")
    layer_plan: list[tuple[Any, Any]] | None = None
    outside, note = _embedding_head_bytes(ledger)
    for n, step in enumerate(steps):
        if step.get("index") != n:
            problems.append(f"steps[{n}].index is {_short(step.get('index'))}, expected {n}")
        context = step.get("context")
        if n == 0:
            if context != prompt:
                problems.append(f"steps[0].context {_short(context)} is not run.prompt {_short(prompt)}")
        else:
            prev = steps[n - 1]
            want = (prev.get("context") or []) + [prev.get("token")] if isinstance(prev.get("context"), list) else None
            if context != want:
                problems.append(f"steps[{n}].context {_short(context)} is not steps[{n - 1}].context + "
                                f"[steps[{n - 1}].token] = {_short(want)}")  # fmt: skip
        layers = step.get("layers") or []
        indices = [layer.get("layer") for layer in layers]
        if indices != list(range(len(layers))):
            problems.append(f"steps[{n}].layers: layer indices are {_short(indices)}, expected 0..{len(layers) - 1}")
        plan = [(layer.get("layer"), layer.get("kind")) for layer in layers]
        if layer_plan is None:
            layer_plan = plan
        elif plan != layer_plan:
            problems.append(f"steps[{n}].layers: layers/kinds {_short(plan)} differ from steps[0]'s "
                            f"{_short(layer_plan)}")
        layer_bytes = sum(int(layer.get("bytes_read") or 0) for layer in layers)
        step_bytes = step.get("bytes_read")
        if not isinstance(step_bytes, int) or step_bytes < layer_bytes:
            problems.append(f"steps[{n}].bytes_read is {_short(step_bytes)}, less than the sum of its layers' "
                            f"bytes_read ({layer_bytes}); it also counts embedding rows and the head")  # fmt: skip
        elif outside is not None and isinstance(context, list):
            extra = outside(n, context)
            if step_bytes != layer_bytes + extra:
                problems.append(f"steps[{n}].bytes_read is {step_bytes}, expected {layer_bytes + extra}: its layers' "
                                f"{layer_bytes} plus {extra} for embedding rows and the head")  # fmt: skip
    total = sum(int(s.get("bytes_read") or 0) for s in steps)
    recorded = (ledger.get("totals") or {}).get("bytes_read")
    if recorded != total:
        problems.append(f"totals.bytes_read is {_short(recorded)}, but the steps' bytes_read sum to {total}")
    _require(problems)
    return note


def _embedding_head_bytes(ledger: dict[str, Any]) -> tuple[Callable[[int, list], int] | None, str]:
    """Bytes a step reads outside the decoder layers (the embedding rows of the distinct input tokens of
    its forward pass, the final norm and the head), when the ledger's checkpoint is on disk with the
    recorded identity; otherwise (None, note) and only ``bytes_read >= sum of layers`` is checked."""
    from kimi_jax.checkpoint import open_checkpoint

    ckpt = ledger.get("checkpoint") or {}
    path = ckpt.get("path")
    unchecked = ("embedding and head bytes not itemised: checkpoint not available, so each step was only checked "
                 "to read at least its layers' bytes")  # fmt: skip
    if not isinstance(path, str) or not (Path(path) / "config.json").is_file():
        return None, unchecked
    try:
        index = open_checkpoint(path)
        same = (index.config.digest() == ckpt.get("config_digest")
                and index.tensor_list_digest() == ckpt.get("tensor_list_digest"))  # fmt: skip
    except Exception:
        return None, unchecked
    if not same:
        return None, unchecked.replace("checkpoint not available", f"the checkpoint at {path} is not the one recorded")
    row = index.embed_row_bytes()
    head = sum(w.nbytes for w in index.head.values())
    kv_cache = bool((ledger.get("run") or {}).get("kv_cache"))

    def outside(n: int, context: list) -> int:
        tokens = context[-1:] if kv_cache and n > 0 else context
        return len(set(tokens)) * row + head

    return outside, ""


def _check_non_perturbation(b: _Bundle) -> str:
    if not b.has("non_perturbation.json"):
        raise _Fail("non_perturbation.json: missing; the bundle carries no proof that capture did not perturb the "
                    "run (a --no-prove run?)")  # fmt: skip
    proof = b.json("non_perturbation.json")
    ledger = b.ledger
    problems = []
    if ledger.get("non_perturbation") != proof:
        problems.append("non_perturbation.json differs from ledger.json non_perturbation")
    if not isinstance(proof, dict):
        raise _Fail(_join([*problems, "non_perturbation.json: expected an object with compared, bare, instrumented, "
                                      "identical"]))  # fmt: skip
    if proof.get("identical") is not True:
        problems.append(f"non_perturbation.json: identical is {_short(proof.get('identical'))}, expected true")
    compared = proof.get("compared")
    if not isinstance(compared, list) or not set(NP_FIELDS) <= set(compared):
        problems.append(f"non_perturbation.json: compared is {_short(compared)}, expected it to cover "
                        f"{list(NP_FIELDS)}")
    bare, inst = proof.get("bare"), proof.get("instrumented")
    if bare != inst:
        first = _first_list_difference(bare, inst)
        problems.append(f"non_perturbation.json: bare and instrumented differ ({first})")
    own = [{"step": s.get("index"), **{k: s.get(k) for k in NP_FIELDS}} for s in b.steps()]
    if inst != own:
        first = _first_list_difference(inst, own)
        problems.append(f"non_perturbation.json: instrumented does not match the ledger's steps ({first})")
    _require(problems)
    return ""


def _first_list_difference(a: Any, b: Any) -> str:
    if not isinstance(a, list) or not isinstance(b, list):
        return f"{_short(a, 40)} vs {_short(b, 40)}"
    for n, (x, y) in enumerate(zip(a, b)):
        if x != y:
            if isinstance(x, dict) and isinstance(y, dict):
                keys = [k for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
                return f"entry {n}: " + ", ".join(f"{k} {_short(x.get(k), 30)} vs {_short(y.get(k), 30)}" for k in keys)
            return f"entry {n}: {_short(x, 40)} vs {_short(y, 40)}"
    return f"{len(a)} entries vs {len(b)}"


class _DataBlocks(HTMLParser):
    """Every <script> whose type is JSON: (attributes, text)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.blocks: list[tuple[dict[str, str | None], str]] = []
        self._open: tuple[dict[str, str | None], list[str]] | None = None

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "script":
            attributes = {k.lower(): v for k, v in attrs}
            kind = (attributes.get("type") or "").split(";")[0].strip().lower()
            if kind == "application/json" or kind.endswith("+json") or kind == "text/json":
                self._open = (attributes, [])

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open[1].append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script" and self._open is not None:
            self.blocks.append((self._open[0], "".join(self._open[1])))
            self._open = None


def _check_explorer(b: _Bundle) -> str:
    if not b.has("explorer.html"):
        raise _Skip("the bundle has no explorer.html")
    try:
        text = (b.root / "explorer.html").read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _Fail(f"explorer.html: not UTF-8 ({e})") from None
    parser = _DataBlocks()
    parser.feed(text)
    parser.close()
    problems = []
    ours = [(a, t) for a, t in parser.blocks if a.get("id") == EXPLORER_ELEMENT_ID]
    others = [a.get("id") or "(no id)" for a, _ in parser.blocks if a.get("id") != EXPLORER_ELEMENT_ID]
    if len(ours) != 1:
        problems.append(f"explorer.html: expected exactly one <script type=\"application/json\" "
                        f"id=\"{EXPLORER_ELEMENT_ID}\">, found {len(ours)}")  # fmt: skip
    if others:
        problems.append(f"explorer.html: holds other JSON data blocks (ids {', '.join(others)}); expected only "
                        f"#{EXPLORER_ELEMENT_ID}")  # fmt: skip
    if len(ours) == 1:
        try:
            embedded = json.loads(ours[0][1])
        except json.JSONDecodeError as e:
            problems.append(f"explorer.html: #{EXPLORER_ELEMENT_ID} is not valid JSON ({e})")
        else:
            if embedded != b.json("ledger.json"):
                where = _first_difference(b.json("ledger.json"), embedded, "")
                problems.append(f"explorer.html: the ledger embedded in #{EXPLORER_ELEMENT_ID} differs from "
                                f"ledger.json (first at {where or '<root>'})")  # fmt: skip
    _require(problems)
    return ""


def _first_difference(a: Any, b: Any, here: str) -> str | None:
    diffs = _differences(a, b, here, limit=1)
    return diffs[0][0] if diffs else None


def _differences(a: Any, b: Any, here: str, limit: int = 20, skip: Callable[[str], bool] | None = None,
                 out: list | None = None) -> list[tuple[str, Any, Any]]:  # fmt: skip
    """``(path, a value, b value)`` where two JSON values differ, depth first, at most ``limit``."""
    out = [] if out is None else out
    if len(out) >= limit or (skip is not None and skip(here)):
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            path = f"{here}.{key}" if here else str(key)
            if key not in a or key not in b:
                if not (skip is not None and skip(path)):
                    out.append((path, a.get(key, "<absent>"), b.get(key, "<absent>")))
            else:
                _differences(a[key], b[key], path, limit, skip, out)
            if len(out) >= limit:
                break
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for n, (x, y) in enumerate(zip(a, b)):
            _differences(x, y, f"{here}[{n}]", limit, skip, out)
            if len(out) >= limit:
                break
    elif a != b or isinstance(a, bool) != isinstance(b, bool):
        out.append((here, a, b))
    return out


# -- replay -------------------------------------------------------------------------------------

# Measured fields that legitimately differ between two executions of the same manifest.
_REPLAY_EXCLUDED = ("wall_s", "page_cache_evicted", "page_cache_resident_bytes")
_REPLAY_SECTIONS = ("checkpoint", "run", "steps", "totals")


def replay_differences(recorded: dict[str, Any], replayed: dict[str, Any], limit: int = 20) -> list[str]:
    """Where a replayed ledger differs from the recorded one in the checkpoint identity, the run
    settings, any step field (tokens, contexts, logits, digests, top-k, norms, experts, router
    scores, routing weights, bytes per step and layer) or the byte totals; wall-clock and
    page-cache fields are not compared."""

    def skip(path: str) -> bool:
        return path.rsplit(".", 1)[-1] in _REPLAY_EXCLUDED

    a = {k: recorded.get(k) for k in _REPLAY_SECTIONS}
    b = {k: replayed.get(k) for k in _REPLAY_SECTIONS}
    return [f"{path}: bundle {_short(x, 60)}, replay {_short(y, 60)}"
            for path, x, y in _differences(a, b, "", limit, skip)]


def _check_replay(b: _Bundle) -> str:
    from kimi_jax.errors import KimiJaxError
    from kimi_jax.manifest import parse_manifest_dict
    from kimi_jax.platform_info import platform_differences
    from kimi_jax.runner import execute, prepare_run

    resolved = b.json("manifest.json")
    if not isinstance(resolved, dict):
        raise _Fail("manifest.json: expected a JSON object (the resolved manifest)")
    ledger = b.ledger
    with tempfile.TemporaryDirectory(prefix="kimi-jax-replay-") as tmp:
        data = copy.deepcopy(resolved)
        data["output"] = {"dir": str(Path(tmp) / "replay")}
        data["anchor"] = None  # the anchor is checked by check 7; replay compares step 0 in full anyway
        try:
            plan = prepare_run(parse_manifest_dict(data, source=str(b.root / "manifest.json"), base_dir=b.root))
        except KimiJaxError as e:
            raise _Fail(f"cannot replay: {e} (--replay runs the bundle's manifest against the checkpoint it names, "
                        "which must exist)") from None  # fmt: skip
        try:
            outcome = execute(plan, prove=False, echo=lambda *_: None, progress=False)
        except KimiJaxError as e:
            raise _Fail(f"the replay stopped: {e}") from None
    diffs = replay_differences(ledger, outcome.ledger)
    if diffs:
        platform = platform_differences(ledger.get("platform") or {}, outcome.ledger.get("platform") or {})
        where = (f"; the platform differs ({', '.join(platform[:3])})" if platform else "; the platform is identical")
        raise _Fail(f"the replay differs from the ledger in {len(diffs)}{'+' if len(diffs) >= 20 else ''} field(s); "
                    f"first: {_join(diffs)}{where}")  # fmt: skip
    steps = len(outcome.ledger["steps"])
    return f"re-ran {steps} step(s) against {plan.index.root}; every measured value matches"


_CHECKS: tuple[tuple[str, Callable[[_Bundle], str]], ...] = (
    ("checksums", _check_checksums),
    ("receipt", _check_receipt),
    ("schema", _check_schema),
    ("provenance", _check_provenance),
    ("derivations", _check_derivations),
    ("digests", _check_digests),
    ("anchor", _check_anchor),
    ("continuity", _check_continuity),
    ("non-perturbation", _check_non_perturbation),
    ("explorer", _check_explorer),
)


def _run_check(number: int, name: str, fn: Callable[[_Bundle], str], bundle: _Bundle) -> Check:
    try:
        note = fn(bundle)
        return Check(number, name, OK, note or "")
    except _Skip as e:
        return Check(number, name, SKIPPED, str(e))
    except _Fail as e:
        return Check(number, name, FAILED, str(e))
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        # a ledger or record whose structure is not what the schema says (reported by check 3)
        return Check(number, name, FAILED, f"unexpected structure in the bundle's JSON ({type(e).__name__}: {e})")


def verify_bundle(path: str | os.PathLike, replay: bool = False,
                  on_check: Callable[[Check], None] | None = None) -> Report:
    """Run every check on the bundle at ``path`` (a bundle directory, an archive, or a ``receipt.json``).

    ``on_check`` is called with each :class:`Check` as soon as it completes."""
    from kimi_jax.archive import is_archive, open_bundle

    source = os.fspath(path)
    checks: list[Check] = []
    with open_bundle(path) as root:
        shown = f"{source} (bundle folder {root.name})" if is_archive(source) else str(root)
        bundle = _Bundle(Path(root))
        todo = list(_CHECKS) + ([("replay", _check_replay)] if replay else [])
        for number, (name, fn) in enumerate(todo, start=1):
            check = _run_check(number, name, fn, bundle)
            checks.append(check)
            if on_check is not None:
                on_check(check)
    return Report(source, shown, checks)
