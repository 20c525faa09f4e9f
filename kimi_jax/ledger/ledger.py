"""The output formation ledger: schema (with provenance), construction, and derivation.

Every leaf field of the ledger is classified by the schema itself, with the JSON Schema keyword
``x-provenance``:

* ``measured``: read directly off the execution (a token id, a norm, a byte count, a clock).
* ``derived``: computed deterministically from measured values or from the stored arrays by a
  function in this module (:func:`derive_step`, :func:`derive_routing_weights`), which verify
  re-runs to check them.

Digests. ``hidden_digest`` covers the residual stream at the last position after the last decoder
layer (before the final norm); ``logits_digest`` the logits at the last position. Each is the
BLAKE3 (32-byte, hex) of the array's canonical bytes: float32, little-endian, C order, shape
``[hidden_size]`` / ``[vocab_size]``, no header. A bfloat16 run's hidden state is widened to
float32 (exactly) first.

Floats are written as the shortest decimal that reads back to the identical float32 value.

Weights (version 2). When the run checked every tensor it read against the checkpoint's digest
file (``kimi-jax digest``), ``checkpoint.content_root`` is that file's root and each step's
``weights_digest`` is :func:`kimi_jax.storage.digests.weights_digest` over the stored tensors the
step read, so the ledger names exactly the weights behind each token. ``bytes_network`` and
``bytes_cache`` split a remote checkpoint's bytes into those fetched and those the local range
cache served.

Bytes (version 2). ``bytes_read`` keeps its version 1 name and meaning: the bytes of the stored
tensors the step (or layer) *used*, whatever served them; it depends only on the routing, and is
what anchors and the non-perturbation proof compare. Beside it, where those bytes came from:
``bytes_from_memory`` + ``bytes_from_storage`` + ``bytes_from_speculation`` = ``bytes_read``, and
what else was read: ``bytes_mispredicted`` (experts read ahead but not used), ``bytes_preloaded``
(experts read to be kept before any step used them) and ``bytes_overread`` (gaps between merged
ranges). See :class:`kimi_jax.records.ByteCounts`.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import blake3
import numpy as np

from kimi_jax.errors import KimiJaxError
from kimi_jax.ledger.floats import f32, f32_list
from kimi_jax.ledger.schema_parts import COUNT as _INT
from kimi_jax.ledger.schema_parts import derived as _d
from kimi_jax.ledger.schema_parts import measured as _m
from kimi_jax.ledger.schema_parts import schema_object as _obj
from kimi_jax.settings import DEQUANT_MODES, MATMUL_MODES, PROOF_SCOPES

LEDGER_VERSION = 2
LEDGER_SCHEMA_ID = f"urn:kimi-jax:schema:ledger:v{LEDGER_VERSION}"
# What each version changed: told to whoever verifies a bundle of an older version.
LEDGER_VERSION_CHANGES = {2: (
    "checkpoint.config_digest is BLAKE3, like every other digest (version 1 wrote BLAKE2b); the checkpoint's content "
    "root, digest file and storage, each step's weights_digest, and bytes from network and cache are recorded; so "
    "are the tokenizer's digest, the prompt as given, the sampling settings, the stop rules and why the run stopped, "
    "each step's probability, rank, sampling record, token text and bytes and the top-k alternatives' texts, and the "
    "prompt and generated text; run.dequant records how quantized weights were dequantized (version 1 always "
    "rounded them to bfloat16: bf16-rounded)")}
TOP_K = 16


class LedgerInvalid(KimiJaxError):
    """A ledger being written does not satisfy its own schema (a defect of this kimi-jax, not of the input)."""

# -- float32-exact JSON numbers (f32, f32_list: kimi_jax.ledger.floats) -------------------------


def tensor_digest(a: np.ndarray) -> str:
    """BLAKE3 hex of float32 little-endian C-order bytes."""
    return blake3.blake3(np.ascontiguousarray(np.asarray(a, dtype="<f4")).tobytes()).hexdigest()


# -- derivations --------------------------------------------------------------------------------


def top_k_pairs(logits: np.ndarray, k: int = TOP_K) -> list[list]:
    """The k largest logits as ``[token_id, logit]``, by logit descending, ties to the lower id."""
    from kimi_jax.text.sampling import logit_order

    logits = np.asarray(logits, dtype=np.float32)
    return [[int(i), f32(logits[i])] for i in logit_order(logits)[:k]]


def entropy_nats(logits: np.ndarray) -> float:
    """Shannon entropy (nats) of softmax(logits), computed in float64 and written as float32."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    p = np.exp(z)
    total = p.sum()
    logp = z - math.log(total)
    return f32(-(p / total * logp).sum())


def margin(logits: np.ndarray) -> float:
    """Top-1 minus top-2 logit (float32 subtraction)."""
    top2 = np.sort(np.asarray(logits, dtype=np.float32))[-2:]
    return f32(top2[1] - top2[0])


def derive_routing_weights(router_scores: list[list[float]], normalize: bool = True) -> list[list[float]]:
    """Normalised routing weights from the selected experts' raw sigmoid scores, per position:
    ``w = s / (sum(s) + 1e-20)`` in float32 (``norm_topk_prob``), before ``routed_scaling_factor``."""
    s = np.asarray(router_scores, dtype=np.float32)
    if not normalize:
        return f32_list(s)
    total = np.float32(0.0)
    for j in range(s.shape[1]):  # fixed left-to-right order, so anyone recomputes the same bits
        total = total + s[:, j]
    return f32_list(s / (total + np.float32(1e-20))[:, None])


def expert_hit_rate(layers: list[dict[str, Any]]) -> float | None:
    """Of the distinct experts the step's MoE layers ran, the fraction already in memory (None: no MoE layer)."""
    used = sum(int(layer.get("experts_used", 0)) for layer in layers)
    if not used:
        return None
    return f32(sum(int(layer.get("experts_from_memory", 0)) for layer in layers) / used)


def derive_step(logits: np.ndarray, hidden: np.ndarray) -> dict[str, Any]:
    """Every derived step-level field, from the stored arrays."""
    return {
        "top_k": top_k_pairs(logits),
        "entropy": entropy_nats(logits),
        "margin": margin(logits),
        "hidden_digest": tensor_digest(hidden),
        "logits_digest": tensor_digest(logits),
    }


# -- schema -------------------------------------------------------------------------------------


_NUM = {"type": "number"}
_HEX = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_STR = {"type": "string"}
_HEX_OR_NULL = {"oneOf": [{"type": "null"}, _HEX]}


def _matrix(item: dict) -> dict:
    return {"type": "array", "items": {"type": "array", "items": item}}


# Per-process bytes and run.mesh are written by every run of this version; a ledger without them
# (written by hand, or before meshes) is a one-process run.
_PER_PROCESS = {"type": "array", "items": _INT, "minItems": 1}


_LAYER = _obj({
    "layer": _m(_INT, "Decoder layer index."),
    "kind": _m({"enum": ["dense", "moe"]}, "Dense MLP or mixture-of-experts block."),
    "norm_in": _m(_NUM, "L2 norm of the residual stream at the last position entering the block."),
    "norm_out": _m(_NUM, "L2 norm of the residual stream at the last position leaving the block."),
    "experts": _m(_matrix(_INT), "Selected routed expert ids per position [T][k], best first."),
    "router_scores": _m(_matrix(_NUM), "Raw sigmoid router scores of the selected experts [T][k]."),
    "routing_weights": _d(_matrix(_NUM), "router_scores normalised to sum 1 per position (derive_routing_weights)."),
    "bytes_read": _m(_INT, "Bytes of stored tensors this layer used in this step (weights and experts), whether "
                           "served from memory or read: independent of what was in memory."),
    **{f"bytes_{name}": _m(_INT, doc) for name, doc in (
        ("from_memory", "Of bytes_read: kept in memory from an earlier step (resident weights, expert cache)."),
        ("from_storage", "Of bytes_read: read from storage when needed."),
        ("from_speculation", "Of bytes_read: experts read ahead because the early router predicted them."),
        ("mispredicted", "Read ahead for predicted experts this layer did not use (not in bytes_read)."),
        ("preloaded", "Experts read to be kept in memory before any step used them: a model that fits is read "
                      "whole (not in bytes_read)."),
        ("overread", "Gap bytes between merged ranges, read and discarded (not in bytes_read)."))},
    "experts_used": _m(_INT, "Distinct routed experts this layer ran."),
    "experts_from_memory": _m(_INT, "Of experts_used: already in memory (expert cache hits)."),
    "experts_predicted": _m(_INT, "Distinct experts the layer's router, applied early, predicted."),
    "experts_predicted_used": _m(_INT, "Of experts_predicted: used by this layer."),
    "bytes_per_process": _m(_PER_PROCESS, "Of bytes_from_storage, what each process read, by process index."),
}, required=["layer", "kind", "bytes_read"])  # fmt: skip

_STEP = _obj({
    "index": _m(_INT, "Generation step, from 0."),
    "context": _m({"type": "array", "items": _INT, "minItems": 1}, "Input token ids of this step's forward pass."),
    "token": _m(_INT, "Output token: the argmax of the logits (ties to the lowest id), or the seeded draw of a "
                      "sampled run (kimi_jax.text.sampling)."),
    "token_text": _d(_STR, "The output token's bytes as UTF-8, invalid bytes as \\xNN escapes (with a tokenizer)."),
    "token_bytes": _d({"type": "string", "pattern": "^([0-9a-f]{2})*$"}, "The output token's bytes, hex (with a tokenizer)."),
    "logit": _m(_NUM, "Logit of the output token."),
    "probability": _d({"type": "number", "minimum": 0, "maximum": 1}, "softmax(logits)[token], float64 then float32."),
    "rank": _d(_INT, "Place of the token in logit order (0: the greedy choice; ties to the lower id)."),
    "sampling": _obj({
        **{k: _m(v, f"generate.sampling.{k} used for this step.") for k, v in (
            ("temperature", _NUM), ("top_k", _INT), ("top_p", _NUM), ("min_p", _NUM), ("seed", _INT))},
        "probability": _d({"type": "number", "minimum": 0, "maximum": 1},
                          "Probability of the token under the sampling distribution (sampled_probability)."),
    }),
    "top_k_text": _d({"type": "array", "items": _STR, "maxItems": TOP_K}, "token_text of each top_k entry."),
    "top_k": _d({"type": "array", "items": {"type": "array", "prefixItems": [_INT, _NUM], "items": False,
                                            "minItems": 2}, "maxItems": TOP_K},
                "The 16 largest logits as [token_id, logit], by logit (top_k_pairs)."),  # fmt: skip
    "entropy": _d(_NUM, "Shannon entropy in nats of softmax(logits) (entropy_nats)."),
    "margin": _d(_NUM, "Top-1 minus top-2 logit."),
    "hidden_digest": _d(_HEX, "BLAKE3 of the final hidden state, float32 little-endian [hidden_size]."),
    "logits_digest": _d(_HEX, "BLAKE3 of the last position's logits, float32 little-endian [vocab_size]."),
    "bytes_read": _m(_INT, "Bytes of stored tensors this step used, all layers, embedding rows and head, whether "
                           "served from memory or read: independent of what was in memory."),
    **{f"bytes_{name}": _m(_INT, f"As the layers' bytes_{name}, over all layers, embedding rows and head.")
       for name in ("from_memory", "from_storage", "from_speculation", "mispredicted", "preloaded", "overread")},
    "expert_hit_rate": _d({"type": ["number", "null"]}, "Of the distinct experts the MoE layers ran, the fraction "
                          "already in memory: sum experts_from_memory / sum experts_used (expert_hit_rate)."),
    "bytes_network": _m(_INT, "Of the bytes read from storage, bytes fetched over the network (remote checkpoints)."),
    "bytes_cache": _m(_INT, "Of the bytes read from storage, bytes the local range cache served (remote checkpoints)."),
    "weights_digest": _d(_HEX_OR_NULL, "BLAKE3 over the sorted 'NAME<TAB>DIGEST' lines of every stored tensor this "
                         "step used, read or served from memory (an embedding row as NAME[ROW]), digests from the "
                         "checked digest file (storage.digests.weights_digest); null when no digest file was checked."),
    "bytes_per_process": _m(_PER_PROCESS, "Of bytes_from_storage, what each process read, by process index."),
    "wall_s": _m({"type": "number", "minimum": 0}, "Wall-clock seconds of this step, compilation included."),
    "compile_s": _m({"type": "number", "minimum": 0}, "Of wall_s, the seconds spent making programs: tracing, "
                    "lowering and compiling them, or loading them from the persistent compilation cache "
                    "(kimi_jax.run.compile_clock). Absent from ledgers written before it existed."),
    "layers": {"type": "array", "items": _LAYER},
}, required=["index", "context", "token", "logit", "probability", "rank", "hidden_digest", "logits_digest", "bytes_read",
             "wall_s", "layers"])  # fmt: skip

_NP_VALUES = {"type": "array", "items": _obj({
    "step": _m(_INT, "Generation step."), "token": _m(_INT, "Output token."),
    "hidden_digest": _m(_HEX, "Hidden-state digest of that execution."),
    "logits_digest": _m(_HEX, "Logits digest of that execution."), "bytes_read": _m(_INT, "Bytes read."),
})}  # fmt: skip

_PLATFORM = {"type": "object", "x-provenance": "measured", "description": "Platform fingerprint of the run.",
             "additionalProperties": {"type": ["string", "number", "boolean", "null"]}}  # fmt: skip

LEDGER_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": LEDGER_SCHEMA_ID,
    "title": f"kimi-jax output formation ledger, version {LEDGER_VERSION}",
    **_obj({
        "schema": {"const": LEDGER_SCHEMA_ID, "x-provenance": "derived", "description": "Schema identifier."},
        "ledger_version": {"const": LEDGER_VERSION, "x-provenance": "derived", "description": "Schema version."},
        "software": _m({"type": "object", "additionalProperties": _STR}, "kimi-jax and library versions."),
        "manifest_digest": _d(_HEX, "BLAKE3 of the resolved manifest's identity (Manifest.digest)."),
        "checkpoint": _obj({
            "layout": _m(_STR, "On-disk layout recognised by the index."),
            "path": _m(_STR, "Checkpoint directory."),
            "config_digest": _d(_HEX, "BLAKE3 of the parsed model config's canonical JSON (ModelConfig.digest)."),
            "tensor_list_digest": _d(_HEX, "BLAKE3 of the sorted (name, dtype, shape, size) tensor list."),
            "storage": _m({"enum": ["local", "http", "https", "hf", "s3"]}, "Where the bytes were read from."),
            "digest_file": _m({"type": ["string", "null"]}, "The checkpoint's digest file, when one was found."),
            "content_root": _d(_HEX_OR_NULL, "Root of the digest file every tensor read was checked against "
                               "(storage.digests.content_root); null when none was checked."),
            "tokenizer": {"oneOf": [{"type": "null"}, _obj({
                "kind": _m({"enum": ["tiktoken", "tokenizer.json"]}, "Which tokenizer files the checkpoint ships."),
                "files": _d({"type": "object", "additionalProperties": _HEX}, "BLAKE3 of each tokenizer file."),
                "digest": _d(_HEX, "BLAKE3 of the canonical JSON of files: the tokenizer's identity."),
            })]},
        }, required=["layout", "path", "config_digest", "tensor_list_digest"]),
        "platform": _PLATFORM,
        "platform_digest": _d(_HEX, "BLAKE3 of the platform fingerprint's canonical JSON."),
        "run": _obj({
            "prompt": _m({"type": "array", "items": _INT}, "Prompt token ids: the model's input."),
            "prompt_input": _m({"type": "object"}, "The prompt as the manifest gives it: tokens, text or chat."),
            "sampling": _m({"oneOf": [{"type": "null"}, _obj({k: _m(v, f"generate.sampling.{k}.") for k, v in (
                ("temperature", _NUM), ("top_k", _INT), ("top_p", _NUM), ("min_p", _NUM), ("seed", _INT))})]},
                "generate.sampling; null: greedy decoding."),
            "stop": _obj({"tokens": _m({"type": "array", "items": {"type": "array"}}, "[token id, reason]: stop tokens."),
                          "strings": _m({"type": "array", "items": _STR}, "generate.stop strings.")}),
            "max_new_tokens": _m(_INT, "Tokens generated."),
            "kv_cache": _m({"type": "boolean"}, "Latent KV cache used for decoding."),
            "dtype": _m({"enum": ["float32", "bfloat16"]}, "Compute dtype."),
            "dequant": _m({"enum": list(DEQUANT_MODES)}, "How quantized weights were dequantized: exact "
                          "(float32 product) or bf16-rounded."),
            "matmul": _m({"enum": list(MATMUL_MODES)}, "How weights entered matmuls (compute.matmul)."),
            "kernels": _obj({
                "kernel_set": _m({"type": ["string", "null"]}, "The CPU kernels that multiplied (compute.matmul: "
                                 "kernels); null when they were unavailable and XLA's stored products ran."),
                "isa": _m({"type": ["string", "null"]}, "The instruction set the kernels ran on (it can change bits)."),
                "unavailable": _m(_STR, "Why the kernels could not run (absent when they did)."),
            }, required=["kernel_set", "isa"]),
            "residency": _obj({
                "budget_bytes": _m(_INT, "storage.resident_bytes resolved when the run started."),
                "resident_layers": _m(_INT, "Layers whose non-expert weights the budget keeps in memory."),
                "head_resident": _m({"type": "boolean"}, "The budget keeps the head in memory."),
                "expert_cache_bytes": _m(_INT, "Budget left for the expert cache."),
                "expert_cache": _m({"enum": ["lru", "lfu"]}, "Expert cache eviction policy."),
                "speculate": _m({"type": "boolean"}, "storage.speculate: predicted experts are read ahead (not when "
                                                     "every expert is kept)."),
                "page_cache": _m({"enum": ["keep", "drop"]}, "storage.page_cache as resolved: ranges read were "
                                 "dropped from the OS page cache (drop) or kept (keep). Absent from ledgers "
                                 "written before it existed."),
            }, required=["budget_bytes", "resident_layers", "head_resident", "expert_cache_bytes", "expert_cache",
                         "speculate"]),
            "capture": _m({"type": "array", "items": {"enum": ["norms", "routing", "logits"]}}, "Capture fields kept."),
            "page_cache_evicted": _m({"type": "boolean"}, "Shards were dropped from the page cache before the run."),
            "page_cache_resident_bytes": _m(_INT, "Bytes of the shards in the page cache when the run started."),
            "shard_bytes": _m(_INT, "Total size of the checkpoint's shard files."),
            "mesh": {"oneOf": [{"type": "null"}, _obj({
                "expert": _m(_INT, "Devices along the expert-parallel axis."),
                "model": _m(_INT, "Devices along the tensor-parallel axis."),
                "placement": _m({"enum": ["streamed", "resident"]}, "How weights reach the devices."),
                "process_count": _m(_INT, "Processes sharing the mesh."),
                "load_bytes_per_process": _m(_PER_PROCESS, "Bytes each process read before step 0 "
                                                           "(the resident placement's load; zeros when streamed)."),
            })]},  # fmt: skip
        }, required=["prompt", "prompt_input", "sampling", "stop", "max_new_tokens", "kv_cache", "dtype", "capture",
                     "page_cache_evicted", "page_cache_resident_bytes", "shard_bytes"]),  # fmt: skip
        "steps": {"type": "array", "items": _STEP, "minItems": 1},
        "stopped": _obj({
            "reason": _d({"enum": ["eos", "end_of_turn", "stop_string", "max_new_tokens"]}, "Why generation ended."),
            "token": _d(_INT, "The stop token (eos, end_of_turn)."),
            "string": _d(_STR, "The stop string found (stop_string)."),
        }, required=["reason"]),
        "text": _d({"oneOf": [{"type": "null"}, _obj({
            "prompt_text": _d(_STR, "The prompt ids decoded (UTF-8, special tokens by name)."),
            "prompt_token_texts": _d({"type": "array", "items": _STR}, "token_text of each prompt id."),
            "generated_text": _d(_STR, "The generated ids decoded (UTF-8, special tokens by name)."),
        })]}, "Texts decoded by the checkpoint's tokenizer; null when it ships none."),
        "totals": _obj({"bytes_read": _m(_INT, "Bytes used over all steps (sum of the steps' bytes_read)."),
                        "bytes_network": _m(_INT, "Bytes fetched over the network over all steps."),
                        "bytes_cache": _m(_INT, "Bytes served by the range cache over all steps."),
                        "bytes_per_process": _m(_PER_PROCESS, "Bytes each process read over all steps."),
                        "wall_s": _m({"type": "number", "minimum": 0}, "Wall-clock seconds over all steps."),
                        "compile_s": _m({"type": "number", "minimum": 0}, "Of wall_s, the seconds spent making "
                                        "programs (the steps' compile_s)."),
                        "proof_wall_s": _m({"type": "number", "minimum": 0}, "Wall-clock seconds of the proof's bare "
                                           "pass (0 without a proof); not in wall_s."),
                        "run_wall_s": _m({"type": "number", "minimum": 0}, "Wall-clock seconds of the whole run: "
                                         "loading, the proof's bare pass and every step, up to the ledger."),
                        "proof_bytes_network": _m(_INT, "Bytes the proof's bare pass fetched over the network: it runs "
                                                  "first, so with a range cache the steps above find those bytes in "
                                                  "the cache (absent without a proof)."),
                        "proof_bytes_cache": _m(_INT, "Bytes the proof's bare pass was served by the range cache.")},
                       required=["bytes_read", "wall_s"]),  # fmt: skip
        "anchor": {"oneOf": [{"type": "null"}, _obj({
            "file": _m(_STR, "Anchor file checked."),
            "status": _d({"enum": ["matched"]}, "Step 0 equals the anchor in every anchored field."),
            "anchor_digest": _d(_HEX, "BLAKE3 of the anchor file's bytes."),
        })]},  # fmt: skip
        "non_perturbation": {"oneOf": [{"type": "null"}, _obj({
            "scope": _m({"enum": list(PROOF_SCOPES)}, "Steps the proof ran bare: first (step 0, the anchor step; "
                        "run's default) or all (--prove all, kimi-jax prove). Absent from ledgers written before "
                        "it existed, whose proofs cover every step."),
            "compared": _m({"type": "array", "items": _STR}, "Fields compared per step."),
            "bare": _NP_VALUES, "instrumented": _NP_VALUES,
            "identical": _d({"const": True}, "Bare and instrumented runs agree on every compared field."),
        }, required=["compared", "bare", "instrumented", "identical"])]},  # fmt: skip
    }),
}


def provenance_map(schema: dict = LEDGER_SCHEMA, path: str = "") -> dict[str, str]:
    """``{json path: 'measured'|'derived'}`` for every classified field, e.g. ``steps[].layers[].norm_in``."""
    out: dict[str, str] = {}

    def walk(node: Any, here: str) -> None:
        if not isinstance(node, dict):
            return
        if "x-provenance" in node and here:
            out[here] = node["x-provenance"]
        for name, child in (node.get("properties") or {}).items():
            walk(child, f"{here}.{name}" if here else name)
        if isinstance(node.get("items"), dict):
            walk(node["items"], here + "[]")
        for alt in node.get("oneOf", []):
            walk(alt, here)

    walk(schema, path)
    return out


def unclassified_fields(ledger: dict, schema: dict = LEDGER_SCHEMA) -> list[str]:
    """Paths of ledger leaves that ``schema`` does not classify (should be empty)."""
    classes = set(provenance_map(schema))
    covered: dict[str, bool] = {}  # by path: every step repeats the same paths
    found = set()
    for path, value in _leaf_paths(ledger, ""):
        # a leaf is classified when it, or an ancestor that holds opaque data, is classified (the
        # path cut before a "." or "["); an absent optional section (null) is fine when its fields are
        if path not in covered:
            covered[path] = path in classes or any(path[:i] in classes for i, c in enumerate(path) if c in ".[")
        if not covered[path] and not (value is None and any(p.startswith(path + ".") for p in classes)):
            found.add(path)
    return sorted(found)


def _leaf_paths(node: Any, here: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaf_paths(value, f"{here}.{key}" if here else key)
    elif isinstance(node, list) and node and isinstance(node[0], (dict, list)) and not here.endswith("]"):
        for value in node:
            yield from _leaf_paths(value, here + "[]")
    else:
        yield here, node


# -- building -----------------------------------------------------------------------------------


def layer_entry(rec, capture: list[str], normalize: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"layer": rec.layer, "kind": rec.kind}
    if "norms" in capture:
        entry["norm_in"], entry["norm_out"] = f32(rec.norm_in), f32(rec.norm_out)
    if "routing" in capture and rec.experts is not None:
        entry["experts"] = [[int(e) for e in row] for row in rec.experts]
        entry["router_scores"] = f32_list(rec.router_scores)
        entry["routing_weights"] = derive_routing_weights(entry["router_scores"], normalize)
    entry["bytes_read"] = int(rec.bytes_read)
    entry.update(byte_sources(rec.io))
    if rec.kind == "moe":
        entry.update(experts_used=rec.io.experts_used, experts_from_memory=rec.io.experts_from_memory,
                     experts_predicted=rec.io.experts_predicted, experts_predicted_used=rec.io.experts_predicted_used)  # fmt: skip
    entry["bytes_per_process"] = per_process(rec)
    return entry


def per_process(rec) -> list[int]:
    """What each process read from storage for a step or layer; one process read all of it."""
    counts = getattr(rec, "bytes_per_process", None)
    return [int(b) for b in counts] if counts is not None else [int(rec.io.from_storage)]


def byte_sources(io) -> dict[str, int]:
    return {"bytes_from_memory": int(io.from_memory), "bytes_from_storage": int(io.from_storage),
            "bytes_from_speculation": int(io.from_speculation), "bytes_mispredicted": int(io.mispredicted),
            "bytes_preloaded": int(io.preloaded), "bytes_overread": int(io.overread)}  # fmt: skip


def step_entry(step, capture: list[str], normalize: bool, tokenizer=None, sampling=None) -> dict[str, Any]:
    """One step's ledger entry; ``tokenizer`` adds its text fields, ``sampling`` (a sampled run's
    :class:`kimi_jax.text.sampling.Sampling`) its sampling record."""
    from kimi_jax.ledger.text_fields import choice_fields, step_text_fields

    derived = derive_step(step.logits, step.hidden)
    entry: dict[str, Any] = {"index": step.index, "context": [int(t) for t in step.context], "token": int(step.token),
                             "logit": f32(step.logit), **choice_fields(step.logits, int(step.token), sampling)}  # fmt: skip
    if "logits" in capture:
        entry.update(top_k=derived["top_k"], entropy=derived["entropy"], margin=derived["margin"])
    entry.update(step_text_fields(tokenizer, int(step.token), entry.get("top_k")))
    storage = step.storage or {}
    layers = [layer_entry(r, capture, normalize) for r in step.layers]
    entry.update(hidden_digest=derived["hidden_digest"], logits_digest=derived["logits_digest"],
                 bytes_read=int(step.bytes_read), **byte_sources(step.io), bytes_per_process=per_process(step),
                 expert_hit_rate=expert_hit_rate(layers),
                 bytes_network=int(storage.get("bytes_network", 0)), bytes_cache=int(storage.get("bytes_cache", 0)),
                 weights_digest=storage.get("weights_digest"), wall_s=f32(step.wall_s),
                 compile_s=f32(step.compile_s), layers=layers)  # fmt: skip
    return entry


def step_identity(step) -> dict[str, Any]:
    """The fields the anchor and the non-perturbation proof compare."""
    return {"step": step.index, "token": int(step.token), "hidden_digest": tensor_digest(step.hidden),
            "logits_digest": tensor_digest(step.logits), "bytes_read": int(step.bytes_read)}  # fmt: skip


def checkpoint_record(plan) -> dict[str, Any]:
    """The checkpoint's identity: layout, config and tensor list, its content root when checked, and its
    tokenizer's files."""
    idx, source, tokenizer = plan.index, getattr(plan, "source", None), getattr(plan, "tokenizer", None)
    location = idx.location
    storage = location.split("://", 1)[0] if "://" in location else "local"
    digests = source.digests if source is not None else None
    return {"layout": idx.layout, "path": location, "config_digest": idx.config.digest(),
            "tensor_list_digest": idx.tensor_list_digest(), "storage": storage,
            "digest_file": source.digest_file if source is not None else None,
            "content_root": digests.root if digests is not None else None,
            "tokenizer": None if tokenizer is None else {"kind": tokenizer.kind, "files": tokenizer.files,
                                                         "digest": tokenizer.digest}}  # fmt: skip


def build_ledger(plan, steps, facts, prompt_field: str = "prompt") -> dict[str, Any]:
    """The ledger of a run plan's ``steps`` (:class:`~kimi_jax.records.StepRecord`) and the run's
    other records, ``facts`` (:class:`~kimi_jax.ledger.run_record.RunFacts`); ``prompt_field``:
    where the manifest gives the plan's prompt (``prompts.N`` for a sequence of a prompts: run)."""
    from kimi_jax.ledger.text_fields import text_section
    from kimi_jax.platform_info import (
        fingerprint_digest,
        package_version,
        platform_fingerprint,
    )

    m, idx, tokenizer, decoding = plan.manifest, plan.index, plan.tokenizer, plan.decoding
    capture = list(m.capture)
    platform = platform_fingerprint(plan.mesh_label, plan.kernels_label)
    software = {"kimi-jax": package_version("kimi-jax") or "source"}
    for pkg in ("jax", "jaxlib", "numpy", "safetensors", "blake3", "tiktoken", "tokenizers", "jinja2"):
        if package_version(pkg):
            software[pkg] = package_version(pkg)
    return {
        "schema": LEDGER_SCHEMA_ID,
        "ledger_version": LEDGER_VERSION,
        "software": software,
        "manifest_digest": m.digest(),
        "checkpoint": checkpoint_record(plan),
        "platform": platform,
        "platform_digest": fingerprint_digest(platform),
        "run": {"prompt": list(plan.prompt), "prompt_input": prompt_input(m, prompt_field), "max_new_tokens": m.generate.max_new_tokens,
                "kv_cache": m.generate.kv_cache, "dtype": m.compute.dtype, "dequant": m.compute.dequant,
                "matmul": m.compute.matmul, **({"residency": facts.residency} if facts.residency is not None else {}),
                **({"kernels": facts.kernels} if facts.kernels is not None else {}),
                "capture": capture,
                "sampling": decoding.sampling.as_dict() if decoding.sampling else None, "stop": decoding.settings(),
                **facts.page_cache, "mesh": facts.mesh},  # fmt: skip
        "steps": [step_entry(s, capture, idx.config.norm_topk_prob, tokenizer, decoding.sampling) for s in steps],
        "stopped": decoding.final_reason([int(s.token) for s in steps]),
        "text": text_section(tokenizer, list(plan.prompt), [int(s.token) for s in steps]),
        "totals": {"bytes_read": sum(int(s.bytes_read) for s in steps),
                   "bytes_network": sum(int((s.storage or {}).get("bytes_network", 0)) for s in steps),
                   "bytes_cache": sum(int((s.storage or {}).get("bytes_cache", 0)) for s in steps),
                   "bytes_per_process": [sum(col) for col in zip(*(per_process(s) for s in steps))],
                   "wall_s": f32(sum(s.wall_s for s in steps)), "compile_s": f32(sum(s.compile_s for s in steps)),
                   **(facts.timing or {})},  # fmt: skip
        "anchor": facts.anchor,
        "non_perturbation": facts.proof,
    }


def prompt_input(manifest, field: str = "prompt") -> dict[str, Any]:
    """The manifest's prompt section at ``field`` (``prompt``, or ``prompts.N``) as given (the fields it sets)."""
    section: Any = manifest.resolved_dict()
    for part in field.split("."):
        section = section[int(part)] if isinstance(section, list) else section[part]
    return {k: v for k, v in section.items() if v is not None}


def validate_ledger(ledger: dict, schema: dict = LEDGER_SCHEMA) -> None:
    """Raise if the ledger does not validate against ``schema``, or has a field it does not classify."""
    import jsonschema

    jsonschema.Draft202012Validator(schema).validate(ledger)
    loose = unclassified_fields(ledger, schema)
    if loose:
        raise LedgerInvalid(f"ledger fields without provenance in the schema: {loose}")


def audit_derived(ledger: dict, arrays: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
                  normalize: bool = True) -> list[str]:  # fmt: skip
    """Recompute every derived field from measured values (and, given ``arrays`` = {step: (logits,
    hidden)}, from the stored arrays); return one line per disagreement (empty: all recompute).
    Text fields need the tokenizer: :func:`kimi_jax.ledger.text_fields.audit_text`."""
    from kimi_jax.ledger.text_fields import audit_choices

    problems: list[str] = []
    for step in ledger["steps"]:
        i = step["index"]
        for layer in step["layers"]:
            if "routing_weights" in layer:
                want = derive_routing_weights(layer["router_scores"], normalize)
                if want != layer["routing_weights"]:
                    problems.append(f"steps[{i}].layers[{layer['layer']}].routing_weights does not recompute "
                                    "from router_scores")  # fmt: skip
        if "expert_hit_rate" in step and step["expert_hit_rate"] != expert_hit_rate(step["layers"]):
            problems.append(f"steps[{i}].expert_hit_rate does not recompute from the layers' expert counts")
        if arrays is None or i not in arrays:
            continue
        logits, hidden = arrays[i]
        derived = derive_step(logits, hidden)
        for key, value in derived.items():
            if key in step and step[key] != value:
                problems.append(f"steps[{i}].{key} is {step[key]!r}, recomputed {value!r}")
        if not 0 <= step["token"] < logits.size or step["logit"] != f32(logits[step["token"]]):
            problems.append(f"steps[{i}].token/logit do not match the stored logits")
    if arrays is not None:
        problems += audit_choices(ledger, arrays)
    return problems
