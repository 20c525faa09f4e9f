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

import json
import os
import stat
from pathlib import Path
from typing import Any, Callable, NamedTuple

import blake3
import numpy as np

from kimi_jax.ledger.bundle import ARRAYS, BUNDLE_VERSION, CHECKSUMS, RECEIPT, step_key
from kimi_jax.run.manifest import manifest_digest
from kimi_jax.verify.verify_ledger import (  # noqa: F401  (EXPLORER_ELEMENT_ID, NP_FIELDS, replay_differences: public)
    EXPLORER_ELEMENT_ID,
    NP_FIELDS,
    _check_anchor,
    _check_continuity,
    _check_derivations,
    _check_digests,
    _check_explorer,
    _check_non_perturbation,
    _check_provenance,
    _check_replay,
    _check_schema,
    _Fail,
    _join,
    _require,
    _short,
    _Skip,
    replay_differences,
)

__all__ = ["Check", "Report", "verify_bundle", "replay_differences", "CHECK_NAMES",
           "EXPLORER_ELEMENT_ID"]  # fmt: skip

OK, FAILED, SKIPPED = "OK", "FAILED", "SKIPPED"
CHECK_NAMES = ("checksums", "receipt", "schema", "provenance", "derivations", "digests", "anchor", "continuity",
               "non-perturbation", "explorer")  # fmt: skip


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
            from kimi_jax.ledger.bundle import load_arrays

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
    from kimi_jax.ledger.checksums import verify_checksums

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
        recomputed = manifest_digest(resolved)
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

    from kimi_jax.run.manifest import Manifest

    try:
        Manifest.model_validate(resolved, context={"base_dir": root, "check_paths": False})
    except ValidationError as e:
        return [f"manifest.json: {'.'.join(str(x) for x in err['loc']) or '<manifest>'}: {err['msg']}"
                for err in e.errors(include_url=False)]  # fmt: skip
    return []


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
    from kimi_jax.ledger.archive import is_archive, open_bundle

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
