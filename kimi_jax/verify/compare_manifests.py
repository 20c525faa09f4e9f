"""Two manifests: which of their differences can change what the runs compute, and the verdict.

Each difference is classified as the manifest schema declares its field
(:func:`kimi_jax.manifest.field_effect`), with a plain verdict:

* ``bitwise identical runs expected``
* ``identical for the first N steps (only max_new_tokens differs)``
* ``not expected to be identical: <the fields that differ>`` (their values and why each matters are
  listed above the verdict, once)

A section present on one side only is one difference. The checkpoint's identity is its layout,
config digest and tensor list digest (:func:`kimi_jax.storage.checkpoint.open_checkpoint`) when it
can be opened, plus its content root (``kimi-jax digest``) when both sides have one, and its
tokenizer digest (a different tokenizer encodes the same text to other ids, decodes other text
and can stop elsewhere); otherwise the paths, or the synthetic specs (preset, layout, seed), are
compared.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from kimi_jax.errors import KimiJaxError
from kimi_jax.manifest import field_effect, load_manifest, recorded_manifest
from kimi_jax.manifest.fields import UNDECLARED
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.codecs import LEGACY_DEQUANT, LEGACY_DEQUANT_NOTE
from kimi_jax.storage.digests import DIGEST_FILE, identity_differences, load_digest_file
from kimi_jax.storage.synth import synthetic_path
from kimi_jax.text.tokenizer import JSON_FILE, RANKS_FILE, file_digests, files_digest
from kimi_jax.verify.report import differences

__all__ = ["VERDICT_IDENTICAL", "Difference", "ManifestComparison", "compare_resolved", "compare_manifests",
           "show"]  # fmt: skip

VERDICT_IDENTICAL = "bitwise identical runs expected"
TOKENIZER_WHY = "a different tokenizer encodes the same text to other ids, decodes other text and can stop elsewhere"

@dataclasses.dataclass(frozen=True)
class Difference:
    field: str
    a: Any
    b: Any
    why: str

    def describe(self) -> str:
        return f"{self.field}: {show(self.a)} vs {show(self.b)}"


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



def show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 70 else text[:67] + "..."


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


def _by_entry(field: str, a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """Two prompts: lists of the same length entry by entry (``prompts.N.FIELD``), so the report names
    the sequence whose prompt, seed or stop strings differ; any other difference as it is."""
    if field != "prompts" or not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b) or \
            not all(isinstance(x, dict) for x in a + b):  # fmt: skip
        return [(field, a, b)]
    return [(f"prompts.{n}.{k}", x.get(k), y.get(k)) for n, (x, y) in enumerate(zip(a, b))
            for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]  # fmt: skip


def compare_resolved(a: dict[str, Any], b: dict[str, Any], identity_a: dict | None = None,
                     identity_b: dict | None = None, name_a: str = "A",
                     name_b: str = "B") -> ManifestComparison:  # fmt: skip
    """Compare two resolved manifests (``Manifest.resolved_dict()`` / a bundle's ``manifest.json``).

    ``identity_*`` are the checkpoints' ``{layout, config_digest, tensor_list_digest, tokenizer_digest}``
    where known."""
    notes: list[str] = []
    a, b = _with_legacy_dequant(a, name_a, notes), _with_legacy_dequant(b, name_b, notes)
    a, b = recorded_manifest(a), recorded_manifest(b)  # a field left out means what it meant when written
    result: list[Difference] = []
    neutral: list[Difference] = []

    def by_identity(field: str) -> bool:  # the checkpoint is compared by identity below
        return (field == "model" or field.startswith("model.")) and not field.startswith("model.cache_dir")

    for found in sorted(differences(a, b, "", limit=10_000, skip=by_identity, into_lists=False)):
        for field, va, vb in _by_entry(*found):
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
            verdict = (f"not expected to be identical: generate.max_new_tokens differs ({show(result[0].a)} vs "
                       f"{show(result[0].b)}) with generate.kv_cache on: the latent cache holds prompt + "
                       "max_new_tokens positions, so attention reduces over a different length and even the first "
                       "steps are not guaranteed bitwise equal")  # fmt: skip
        else:
            verdict = f"identical for the first {n} steps (only max_new_tokens differs)"
            identical_steps = n
    else:
        fields = [d.field for d in result]
        verdict = "not expected to be identical: " + (f"{fields[0]} differs" if len(fields) == 1 else
                                                       f"{', '.join(fields)} differ")  # fmt: skip
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
    ident = {"layout": index.layout, "config_digest": index.config.digest(),
             "tensor_list_digest": index.tensor_list_digest(), "tokenizer_digest": _tokenizer_digest(index.root)}  # fmt: skip
    if (index.root / DIGEST_FILE).is_file():
        ident["content_root"] = load_digest_file(index.root / DIGEST_FILE).root
    return ident


def _tokenizer_digest(root: Path) -> str | None:
    files = file_digests(root)
    return files_digest(files) if RANKS_FILE in files or JSON_FILE in files else None


def _checkpoint_identity(manifest) -> tuple[dict | None, str | None]:
    """(identity, problem) of a manifest's checkpoint, opened only when it is on disk (never generated)."""
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
    ma, mb = load_manifest(a, check_paths=False), load_manifest(b, check_paths=False)
    ida, problem_a = _checkpoint_identity(ma)
    idb, problem_b = _checkpoint_identity(mb)
    result = compare_resolved(ma.resolved_dict(), mb.resolved_dict(), ida, idb, os.fspath(a), os.fspath(b))
    both_synthetic = ma.model.synthetic is not None and mb.model.synthetic is not None
    if not both_synthetic:  # each problem once: not when a difference or a note above already names that folder
        said = " ".join([*(d.why for d in result.result_differences), *result.notes])
        result.notes += [f"checkpoint {p}" for p in (problem_a, problem_b) if p and p.split(": ", 1)[0] not in said]
    return result
