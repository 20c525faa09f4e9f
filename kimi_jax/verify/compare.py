"""``kimi-jax compare A B``: what two manifests should produce, or where two bundles differ.

Two manifests (YAML files): their differences are split into fields that can change results and
fields that cannot, as each field declares it in the manifest schema
(:func:`kimi_jax.manifest.field_effect`), with a plain verdict:

* ``bitwise identical runs expected``
* ``identical for the first N steps (only max_new_tokens differs)``
* ``not expected to be identical: <reasons>``

The checkpoint's identity is its layout, config digest and tensor list digest
(:func:`kimi_jax.storage.checkpoint.open_checkpoint`) when it can be opened, plus its content root
(``kimi-jax digest``) when both sides have one, and its tokenizer digest (:mod:`kimi_jax.text.tokenizer`:
a different tokenizer encodes the same text to other ids, decodes other text and can stop elsewhere); otherwise the paths, or the synthetic specs (preset,
layout, seed), are compared.

Two bundles (directories, archives or ``receipt.json`` files): per step, whether the tokens and
the hidden/logits digests are equal and the largest absolute differences of the stored arrays;
the first divergent step and, within it, the first layer whose norm_in/norm_out differ (when
norms were captured); platform and manifest differences.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from kimi_jax.errors import KimiJaxError
from kimi_jax.manifest import field_effect
from kimi_jax.manifest.fields import UNDECLARED
from kimi_jax.storage.codecs import LEGACY_DEQUANT, LEGACY_DEQUANT_NOTE
from kimi_jax.storage.digests import checkpoint_identity, identity_differences

__all__ = ["Difference", "ManifestComparison", "StepComparison", "BundleComparison", "compare_manifests",
           "compare_resolved", "compare_bundles", "compare_paths", "format_comparison", "CompareError"]  # fmt: skip

VERDICT_IDENTICAL = "bitwise identical runs expected"
TOKENIZER_WHY = "a different tokenizer encodes the same text to other ids, decodes other text and can stop elsewhere"

class CompareError(KimiJaxError):
    """The two things given cannot be compared (a manifest and a bundle, unreadable input)."""


@dataclasses.dataclass(frozen=True)
class Difference:
    field: str
    a: Any
    b: Any
    why: str

    def describe(self) -> str:
        return f"{self.field}: {_show(self.a)} vs {_show(self.b)}"


@dataclasses.dataclass
class ManifestComparison:
    a: str
    b: str
    result_differences: list[Difference]
    neutral_differences: list[Difference]
    notes: list[str]
    verdict: str
    identical_steps: int | None  # "identical for the first N steps": N, else None

    @property
    def identical(self) -> bool:
        """Bitwise identical runs are expected."""
        return self.verdict == VERDICT_IDENTICAL


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

    @property
    def identical(self) -> bool:
        return self.steps_a == self.steps_b and all(s.identical for s in self.steps)


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 70 else text[:67] + "..."


# -- manifests ----------------------------------------------------------------------------------


def _flatten(value: Any, here: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, child in value.items():
            out.update(_flatten(child, f"{here}.{key}" if here else str(key)))
        return out
    return {here: value}


def _classify(field: str) -> tuple[str, str]:
    """('result' | 'neutral', why): what the manifest schema declares of the field."""
    effect = field_effect(field) or UNDECLARED
    return effect.kind, effect.why


def _model_differences(ma: dict[str, Any], mb: dict[str, Any], ida: dict | None, idb: dict | None,
                       notes: list[str]) -> list[Difference]:  # fmt: skip
    why = _classify("model")[1]
    syn_a, syn_b = ma.get("synthetic"), mb.get("synthetic")
    path_a, path_b = ma.get("checkpoint"), mb.get("checkpoint")
    if syn_a is not None and syn_b is not None:  # deterministic generators: the spec is the identity
        return [Difference(f"model.synthetic.{k}", syn_a.get(k), syn_b.get(k), why)
                for k in sorted(set(syn_a) | set(syn_b)) if syn_a.get(k) != syn_b.get(k)]  # fmt: skip
    if path_a is not None and path_a == path_b:
        if ida is not None and idb is not None and identity_differences(ida, idb):
            return [Difference("model.checkpoint (identity)", ida, idb, "the checkpoint at that path changed between "
                               "the two records")]  # fmt: skip
        if ida is None:
            notes.append(f"checkpoint {path_a} is not available; the checkpoints were compared by path only")
        return []
    where_a = path_a if path_a is not None else f"synthetic {syn_a}"
    where_b = path_b if path_b is not None else f"synthetic {syn_b}"
    if ida is None or idb is None:
        missing = [str(w) for w, i in ((where_a, ida), (where_b, idb)) if i is None]
        return [Difference("model", where_a, where_b, f"{why}; its identity could not be compared "
                           f"({', '.join(missing)} not available)")]  # fmt: skip
    fields = identity_differences(ida, idb)
    differences = [Difference(f"model (checkpoint {k})", ida.get(k), idb.get(k), why) for k in fields]
    if ida.get("tokenizer_digest") != idb.get("tokenizer_digest"):
        differences.append(Difference("model (checkpoint tokenizer_digest)", ida.get("tokenizer_digest"),
                                      idb.get("tokenizer_digest"), TOKENIZER_WHY))  # fmt: skip
    if differences:
        return differences
    if ida.get("content_root") and idb.get("content_root"):
        notes.append(f"the checkpoints are different locations ({where_a} and {where_b}) with the same content root: "
                     "the same tensors, byte for byte")  # fmt: skip
    else:
        notes.append(f"the checkpoints are different folders ({where_a} and {where_b}) with the same identity (layout, "
                     "config, tensor list and tokenizer digests); their weight bytes were not compared (no content root "
                     "on both sides: run `kimi-jax digest`)")  # fmt: skip
    return []


def compare_resolved(a: dict[str, Any], b: dict[str, Any], identity_a: dict | None = None,
                     identity_b: dict | None = None, name_a: str = "A",
                     name_b: str = "B") -> ManifestComparison:  # fmt: skip
    """Compare two resolved manifests (``Manifest.resolved_dict()`` / a bundle's ``manifest.json``).

    ``identity_*`` are the checkpoints' ``{layout, config_digest, tensor_list_digest, tokenizer_digest}``
    where known."""
    notes: list[str] = []
    a, b = _with_legacy_dequant(a, name_a, notes), _with_legacy_dequant(b, name_b, notes)
    flat_a, flat_b = _flatten(a), _flatten(b)
    result: list[Difference] = []
    neutral: list[Difference] = []
    for field in sorted(set(flat_a) | set(flat_b)):
        if (field == "model" or field.startswith("model.")) and not field.startswith("model.cache_dir"):
            continue  # the checkpoint is compared by identity below
        va, vb = flat_a.get(field), flat_b.get(field)
        if va == vb and isinstance(va, bool) == isinstance(vb, bool):
            continue
        kind, why = _classify(field)
        (result if kind == "result" else neutral).append(Difference(field, va, vb, why))
    result = _model_differences(a.get("model") or {}, b.get("model") or {}, identity_a, identity_b, notes) + result
    identical_steps = None
    if not result:
        verdict = VERDICT_IDENTICAL
    elif all(d.field == "generate.max_new_tokens" for d in result):
        n = min(result[0].a, result[0].b)
        kv_cache = (a.get("generate") or {}).get("kv_cache")
        if kv_cache:
            verdict = (f"not expected to be identical: generate.max_new_tokens differs ({_show(result[0].a)} vs "
                       f"{_show(result[0].b)}) with generate.kv_cache on: the latent cache holds prompt + "
                       "max_new_tokens positions, so attention reduces over a different length and even the first "
                       "steps are not guaranteed bitwise equal")  # fmt: skip
        else:
            verdict = f"identical for the first {n} steps (only max_new_tokens differs)"
            identical_steps = n
    else:
        verdict = "not expected to be identical: " + "; ".join(f"{d.field} differs ({_show(d.a)} vs {_show(d.b)})"
                                                               for d in result)  # fmt: skip
    return ManifestComparison(name_a, name_b, result, neutral, notes, verdict, identical_steps)


def _with_legacy_dequant(resolved: dict[str, Any], name: str, notes: list[str]) -> dict[str, Any]:
    """A resolved manifest of kimi-jax 0.1.0 (a bundle's manifest.json) has no compute.dequant;
    that version always rounded to bfloat16, so it is compared as bf16-rounded, with a note."""
    compute = resolved.get("compute")
    if not isinstance(compute, dict) or "dequant" in compute:
        return resolved
    notes.append(f"{name} has no compute.dequant: read as {LEGACY_DEQUANT_NOTE}")
    return {**resolved, "compute": {**compute, "dequant": LEGACY_DEQUANT}}


def _identity(index) -> dict[str, Any]:
    """A local checkpoint's identity, with the content root of the digest file beside it, if any."""
    from kimi_jax.storage.digests import DIGEST_FILE, load_digest_file

    ident = {"layout": index.layout, "config_digest": index.config.digest(),
             "tensor_list_digest": index.tensor_list_digest(), "tokenizer_digest": _tokenizer_digest(index.root)}  # fmt: skip
    if (index.root / DIGEST_FILE).is_file():
        ident["content_root"] = load_digest_file(index.root / DIGEST_FILE).root
    return ident


def _tokenizer_digest(root: Path) -> str | None:
    from kimi_jax.text.tokenizer import JSON_FILE, RANKS_FILE, file_digests, files_digest

    files = file_digests(root)
    return files_digest(files) if RANKS_FILE in files or JSON_FILE in files else None


def _checkpoint_identity(manifest) -> tuple[dict | None, str | None]:
    """(identity, problem) of a manifest's checkpoint, opened only when it is on disk (never generated)."""
    from kimi_jax.storage.checkpoint import open_checkpoint
    from kimi_jax.storage.synth import synthetic_path

    model = manifest.model
    if model.checkpoint is not None:
        root = Path(model.checkpoint)
    else:
        syn = model.synthetic
        root = synthetic_path(syn.preset, syn.layout, syn.seed, model.cache_dir)
    if not (root / "config.json").is_file():
        return None, f"{root}: not available"
    try:
        return _identity(open_checkpoint(root)), None
    except KimiJaxError as e:
        return None, f"{root}: cannot be opened ({e})"


def compare_manifests(a: str | os.PathLike, b: str | os.PathLike) -> ManifestComparison:
    """Load two manifest files and say whether their runs should be bitwise identical. A checkpoint
    that is not on disk is no error here: the manifests are then compared by its path."""
    from kimi_jax.manifest import load_manifest

    ma, mb = load_manifest(a, check_paths=False), load_manifest(b, check_paths=False)
    ida, problem_a = _checkpoint_identity(ma)
    idb, problem_b = _checkpoint_identity(mb)
    result = compare_resolved(ma.resolved_dict(), mb.resolved_dict(), ida, idb, os.fspath(a), os.fspath(b))
    both_synthetic = ma.model.synthetic is not None and mb.model.synthetic is not None
    if not both_synthetic:
        result.notes += [f"checkpoint {p}" for p in (problem_a, problem_b) if p]
    return result


# -- bundles ------------------------------------------------------------------------------------


def _read_json(root: Path, name: str) -> Any:
    from kimi_jax.fileio import read_json
    from kimi_jax.ledger.bundle import MAX_JSON_BYTES

    path = root / name
    if not path.exists() and not path.is_symlink():
        raise CompareError(f"{path}: missing; expected a kimi-jax run bundle")
    return read_json(path, MAX_JSON_BYTES, name, CompareError)


def _read_ledger(root: Path) -> dict[str, Any]:
    """The bundle's ledger, which must validate against the ledger schema: everything below reads
    its structure as the schema states it."""
    import jsonschema

    from kimi_jax.ledger.ledger import LEDGER_SCHEMA

    ledger = _read_json(root, "ledger.json")
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(LEDGER_SCHEMA).iter_errors(ledger))
    if error is not None:
        raise CompareError(f"{root / 'ledger.json'}: does not validate against the ledger schema at "
                           f"{error.json_path}: {error.message[:160]}; `kimi-jax verify` says more")  # fmt: skip
    return ledger


def _read_resolved_manifest(root: Path, notes: list[str]) -> dict[str, Any]:
    """The bundle's manifest.json when it is a valid manifest; else {} and a note."""
    from pydantic import ValidationError

    from kimi_jax.manifest import Manifest

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
                    detail = f"{field} {_show(la.get(field))} vs {_show(lb.get(field))}"
                    break
        if first_expert is None and ("experts" in la or "experts" in lb) and la.get("experts") != lb.get("experts"):
            first_expert = la.get("layer")
    if not captured:
        detail = "norms were not captured in both runs (capture lacks 'norms')"
    elif first_norm is None:
        detail = "no layer's norm_in/norm_out differs; the difference arises after the last layer's norms"
    return first_norm, detail, first_expert


def _load_arrays(root: Path, notes: list[str], name: str, steps: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    from kimi_jax.ledger.bundle import load_arrays

    try:
        return load_arrays(root, steps)
    except Exception as e:  # orbax raises many kinds on a damaged or missing tree
        notes.append(f"{name}: stored arrays could not be read ({type(e).__name__}: {str(e)[:120]}); array "
                     "differences are not reported")  # fmt: skip
        return {}


def _compare_bundle_dirs(ra: Path, rb: Path, name_a: str, name_b: str) -> BundleComparison:
    from kimi_jax.platform_info import platform_differences

    la, lb = _read_ledger(ra), _read_ledger(rb)
    notes: list[str] = []
    arrays_a = _load_arrays(ra, notes, name_a, [s["index"] for s in la["steps"]])
    arrays_b = _load_arrays(rb, notes, name_b, [s["index"] for s in lb["steps"]])
    steps: list[StepComparison] = []
    for sa, sb in zip(la["steps"], lb["steps"]):
        i = sa.get("index")
        xa, xb = arrays_a.get(i), arrays_b.get(sb.get("index"))
        steps.append(StepComparison(
            index=i, token_a=sa.get("token"), token_b=sb.get("token"),
            context_equal=sa.get("context") == sb.get("context"),
            hidden_equal=sa.get("hidden_digest") == sb.get("hidden_digest"),
            logits_equal=sa.get("logits_digest") == sb.get("logits_digest"),
            bytes_read_a=sa.get("bytes_read"), bytes_read_b=sb.get("bytes_read"),
            max_abs_logits=_max_abs(xa[0] if xa else None, xb[0] if xb else None),
            max_abs_hidden=_max_abs(xa[1] if xa else None, xb[1] if xb else None),
        ))  # fmt: skip
    first_step = next((s.index for s in steps if not s.identical), None)
    first_layer, detail, first_expert = None, "", None
    if first_step is not None:
        n = next(k for k, s in enumerate(steps) if not s.identical)
        first_layer, detail, first_expert = _layer_divergence(la["steps"][n], lb["steps"][n])
    if len(la["steps"]) != len(lb["steps"]):
        notes.append(f"{name_a} has {len(la['steps'])} steps, {name_b} {len(lb['steps'])}; only the first "
                     f"{len(steps)} are compared")  # fmt: skip
    pa, pb = la.get("platform") or {}, lb.get("platform") or {}
    sw_a, sw_b = la.get("software") or {}, lb.get("software") or {}
    software = [f"{k}: {sw_a.get(k)!r} -> {sw_b.get(k)!r}" for k in sorted(set(sw_a) | set(sw_b))
                if sw_a.get(k) != sw_b.get(k)]  # fmt: skip
    resolved_a, resolved_b = _read_resolved_manifest(ra, notes), _read_resolved_manifest(rb, notes)
    if not resolved_a or not resolved_b:
        resolved_a = resolved_b = {}
    manifest = compare_resolved(resolved_a, resolved_b, _ledger_identity(la), _ledger_identity(lb), name_a, name_b)
    return BundleComparison(name_a, name_b, len(la["steps"]), len(lb["steps"]), steps, first_step, first_layer,
                            detail, first_expert, platform_differences(pa, pb), software, manifest, notes)  # fmt: skip


def _ledger_identity(ledger: dict) -> dict | None:
    ckpt = ledger.get("checkpoint")
    if not isinstance(ckpt, dict):
        return None
    return checkpoint_identity(ckpt) | {"tokenizer_digest": (ckpt.get("tokenizer") or {}).get("digest")}


def compare_bundles(a: str | os.PathLike, b: str | os.PathLike) -> BundleComparison:
    """Compare two run bundles (directories, archives or receipt.json paths) step by step."""
    from kimi_jax.ledger.archive import open_bundle

    with contextlib.ExitStack() as stack:
        ra = stack.enter_context(open_bundle(a))
        rb = stack.enter_context(open_bundle(b))
        return _compare_bundle_dirs(Path(ra), Path(rb), os.fspath(a), os.fspath(b))


def _is_bundle(path: str) -> bool:
    from kimi_jax.ledger.archive import is_archive
    from kimi_jax.ledger.bundle import RECEIPT

    p = Path(path)
    return p.is_dir() or p.name == RECEIPT or is_archive(p)


def compare_paths(a: str | os.PathLike, b: str | os.PathLike) -> ManifestComparison | BundleComparison:
    """Two manifest files -> :func:`compare_manifests`; two bundles -> :func:`compare_bundles`."""
    a, b = os.fspath(a), os.fspath(b)
    for p in (a, b):
        if not Path(p).exists():
            raise CompareError(f"{p}: does not exist; expected two manifest files or two run bundles")
    kinds = [_is_bundle(a), _is_bundle(b)]
    if all(kinds):
        return compare_bundles(a, b)
    if not any(kinds):
        return compare_manifests(a, b)
    bundle, manifest = (a, b) if kinds[0] else (b, a)
    raise CompareError(f"cannot compare a bundle ({bundle}) with a manifest ({manifest}); expected two manifest "
                       "files or two run bundles")  # fmt: skip


# -- reports ------------------------------------------------------------------------------------


def _section(title: str, items: list[str], empty: str | None = None) -> list[str]:
    """A titled, indented list, or one line saying there is nothing (``TITLE: none`` unless ``empty``)."""
    if not items:
        return [empty or f"{title}: none"]
    return [f"{title}:", *(f"  {item}" for item in items)]


def _format_manifest(c: ManifestComparison, heading: bool = True) -> list[str]:
    lines = [f"manifests: A = {c.a}", f"           B = {c.b}"] if heading else []
    lines += _section("differences that can change results",
                      [f"{d.describe()}  ({d.why})" for d in c.result_differences])
    lines += _section("differences that cannot change results",
                      [f"{d.describe()}  ({d.why})" for d in c.neutral_differences])
    lines += [f"note: {n}" for n in c.notes]
    return lines


def _fmt_float(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def _format_bundles(c: BundleComparison) -> list[str]:
    lines = [f"bundles: A = {c.a} ({c.steps_a} steps)", f"         B = {c.b} ({c.steps_b} steps)",
             f"{'step':>4}  {'token A':>8}  {'token B':>8}  {'context':<8} {'hidden':<8} {'logits':<8} "
             f"{'max|dlogits|':>12}  {'max|dhidden|':>12}  {'bytes A':>12}  {'bytes B':>12}"]  # fmt: skip
    for s in c.steps:
        same = {k: "equal" if v else "DIFFERS" for k, v in (("context", s.context_equal),
                                                               ("hidden", s.hidden_equal), ("logits", s.logits_equal))}
        lines.append(f"{s.index:>4}  {s.token_a!s:>8}  {s.token_b!s:>8}  {same['context']:<8} "
                     f"{same['hidden']:<8} {same['logits']:<8} "
                     f"{_fmt_float(s.max_abs_logits):>12}  {_fmt_float(s.max_abs_hidden):>12}  "
                     f"{s.bytes_read_a!s:>12}  {s.bytes_read_b!s:>12}")  # fmt: skip
    if c.first_divergent_step is None:
        lines.append("first divergent step: none" + ("" if c.steps_a == c.steps_b else " among the common steps"))
    else:
        lines.append(f"first divergent step: {c.first_divergent_step}")
        if c.first_divergent_layer is not None:
            lines.append(f"first layer where norms differ in step {c.first_divergent_step}: layer "
                         f"{c.first_divergent_layer} ({c.layer_detail})")  # fmt: skip
        else:
            lines.append(f"first layer where norms differ in step {c.first_divergent_step}: none ({c.layer_detail})")
        if c.first_expert_layer is not None:
            lines.append(f"first layer where the selected experts differ: layer {c.first_expert_layer}")
    lines += _section("platform differences", c.platform_differences, empty="platform: identical")
    if c.software_differences:
        lines += _section("software differences", c.software_differences)
    lines += _format_manifest(c.manifest, heading=False)
    lines.append(f"expected from the manifests: {c.manifest.verdict}")
    lines += [f"note: {n}" for n in c.notes]
    return lines


def format_comparison(c: ManifestComparison | BundleComparison) -> str:
    if isinstance(c, ManifestComparison):
        return "\n".join([*_format_manifest(c), f"verdict: {c.verdict}"])
    verdict = "IDENTICAL: every step's tokens and hidden/logits digests are equal" if c.identical else "DIFFERENT"
    return "\n".join([*_format_bundles(c), f"verdict: {verdict}"])
