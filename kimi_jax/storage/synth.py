"""Deterministic synthetic checkpoints in the exact on-disk layouts of the real releases.

Layouts (``kimi-format.md`` sections 1-3):

* ``kimi-k2.5``: ``kimi_k25`` wrapper config with ``quantization_config`` inside ``text_config``;
  ``language_model.model.`` names; int4 pack-quantized routed experts, BF16 elsewhere, F32
  router bias; one layer per shard ``model-{k:05d}-of-{n:06d}``; head shard; vision shards.
* ``kimi-k2-fp8``: top-level config, ``model.`` names, F8_E4M3 + F32 ``weight_scale_inv``
  128x128 blocks, stray ``rotary_emb.inv_freq`` per layer; shards ``model-{k}-of-{n}``, layer k-1
  in shard k, embedding in the first, norm and lm_head in the last.
* ``deepseek-v3``: as fp8 above, but size-packed shards that split layers (and experts) across
  files, an extra multi-token-prediction layer that loaders must skip, index file.
* ``hf-bf16``: plain BF16, as ``save_pretrained`` writes it (two shards + index).

The two Kimi layouts also get Kimi's tokenizer files (``tiktoken.model``, ``tokenizer_config.json``,
``chat_template.jinja``; :mod:`kimi_jax.text.synthetic`), scaled to the preset's vocabulary, so
the synthetic models take text and chat prompts.

Every logical weight's float values depend only on (seed, name), so one seed gives the same
model in every layout, up to each layout's quantization. ``full-shape`` writes the real Kimi
K2.5 dimensions with tensor bytes left as file holes (sparse files): every weight reads as zero, so
every router ties and every token picks the same experts.

``full-shape-routed`` is the same sparse model with what routing depends on written for real:
random routers and correction biases, random norm scales, and random embedding and lm_head rows for
the first :data:`ROUTED_ACTIVE_TOKENS` token ids (0.8 GB written; every other weight a hole). Its
attention and experts still compute zeros, so the hidden state entering every layer is the
current token's embedding: picks vary by token and by layer (each layer has its own router), and the
greedy next token is a fixed function of the current one (tokens stay among the active ids). What it
is not: routing that depends on context, or the skew and reuse of a trained model's routing.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from kimi_jax.config import ModelConfig, QuantScheme, parse_model_config
from kimi_jax.fileio import default_cache_dir
from kimi_jax.shapes import checkpoint_shapes, expert_shapes, layer_shapes
from kimi_jax.storage import codecs
from kimi_jax.settings import SYNTH_LAYOUTS
from kimi_jax.storage.layouts import KIMI_SYNTH_LAYOUTS, synth_prefix
from kimi_jax.storage.safetensors_header import DTYPE_SIZES, PlannedTensor, write_shard
from kimi_jax.text.kimi_format import RESERVED_SPECIAL_TOKENS
from kimi_jax.text.synthetic import tokenizer_files

GENERATOR_VERSION = 3  # 3: Kimi layouts ship tokenizer files (tensors unchanged)
# Per layout where it moved alone: 4: DeepSeek-V3 writes its whole multi-token-prediction layer.
_LAYOUT_VERSIONS = {"deepseek-v3": 4}


def generator_version(layout: str) -> int:
    """The version of what synth writes for ``layout`` (part of the cache's folder names)."""
    return _LAYOUT_VERSIONS.get(layout, GENERATOR_VERSION)

_K25_ROPE = {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    # A few MB: the embedded default for the demo and the tests.
    "tiny": dict(vocab_size=2048, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                 num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                 num_experts_per_tok=4, max_position_embeddings=4096),
    # Benchmark-sized: about 0.5B parameters, 8 layers, 64 experts top-8.
    "small": dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                  num_hidden_layers=8, num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256,
                  qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64,
                  num_experts_per_tok=8, max_position_embeddings=16384),
    # The real Kimi K2.5 text model; written sparse.
    "full-shape": dict(vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                       num_hidden_layers=61, num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512,
                       qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=384,
                       num_experts_per_tok=8, max_position_embeddings=262144),
}  # fmt: skip
PRESETS["full-shape-routed"] = PRESETS["full-shape"]  # the same model, its routing written for real
# Token ids whose embedding and lm_head rows full-shape-routed writes (the first ones).
ROUTED_ACTIVE_TOKENS = 8192


def _routes(name: str) -> bool:
    """A tensor full-shape-routed writes for real: what the routers see and pick with."""
    return name.endswith(("mlp.gate.weight", "e_score_correction_bias", "layernorm.weight")) or name in (
        "norm.weight", "embed_tokens.weight", "lm_head.weight")


def text_config(preset: str, layout: str, **overrides: Any) -> dict[str, Any]:
    """The DeepSeek-V3 text config of a preset, spelled as the layout's config.json spells it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose from {', '.join(PRESETS)}")
    dims = dict(PRESETS[preset])
    vocab = overrides.get("vocab_size", dims["vocab_size"])
    # Kimi puts its 256 reserved special tokens at the top of the vocabulary.
    special = {"bos_token_id": vocab - 256, "eos_token_id": vocab - 255} if vocab > 512 else {"bos_token_id": 0, "eos_token_id": 1}
    cfg: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2" if layout != "deepseek-v3" else "deepseek_v3",
        **dims, "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.827,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "num_key_value_heads": dims["num_attention_heads"],
        "num_nextn_predict_layers": 0, "rope_theta": 50000.0, "rope_scaling": dict(_K25_ROPE),
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "initializer_range": 0.02, "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1,
        "pretraining_tp": 1, **special,
    }  # fmt: skip
    if layout == "deepseek-v3":
        cfg.update(n_group=4, topk_group=2, first_k_dense_replace=2, routed_scaling_factor=2.5,
                   rope_theta=10000.0, num_nextn_predict_layers=1, rms_norm_eps=1e-6,
                   rope_scaling={**_K25_ROPE, "factor": 40.0})  # fmt: skip
    cfg.update(overrides)
    return cfg


def config_json(preset: str, layout: str, **overrides: Any) -> dict[str, Any]:
    text = text_config(preset, layout, **overrides)
    if layout in ("kimi-k2-fp8", "deepseek-v3"):
        text["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                       "weight_block_size": [128, 128]}  # fmt: skip
    if layout != "kimi-k2.5":
        return text
    text["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "kv_cache_scheme": None,
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                      "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                                  "group_size": 32, "dynamic": False, "observer": "minmax",
                                                  "observer_kwargs": {}, "actorder": None, "block_structure": None}}},
        "ignore": ["re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
                   "re:.*lm_head.*", "re:vision_tower.*", "re:mm_projector.*"],
    }  # fmt: skip
    vocab = text["vocab_size"]
    return {
        "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
        "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config",
                     "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_kimi_k25.KimiK25ForConditionalGeneration"},
        "bos_token_id": text["bos_token_id"], "eos_token_id": text["eos_token_id"], "pad_token_id": vocab - 1,
        "media_placeholder_token_id": vocab - 235, "ignore_index": -100, "tie_word_embeddings": False,
        "use_unified_vision_chunk": True, "video_placeholder": "<|kimi_k25_video_placeholder|>",
        "torch_dtype": "bfloat16", "text_config": text, "vision_config": _vision_config(preset, text["hidden_size"]),
    }  # fmt: skip


def _vision_config(preset: str, text_hidden: int) -> dict[str, Any]:
    full = preset == "full-shape"
    return {"patch_size": 14, "init_pos_emb_height": 64 if full else 4, "init_pos_emb_width": 64 if full else 4,
            "init_pos_emb_time": 4, "pos_emb_type": "divided_fixed", "vt_hidden_size": 1152 if full else 32,
            "vt_intermediate_size": 4304 if full else 64, "vt_num_attention_heads": 16 if full else 2,
            "vt_num_hidden_layers": 27 if full else 1, "merge_kernel_size": [2, 2], "merge_type": "sd2_tpool",
            "video_attn_type": "spatial_temporal", "mm_projector_type": "patchmerger",
            "mm_hidden_size": 1152 if full else 32, "projector_hidden_act": "gelu", "projector_ln_eps": 1e-5,
            "text_hidden_size": text_hidden}  # fmt: skip


# -- logical weights -------------------------------------------------------------------------------


def _rng(seed: int, name: str) -> np.random.Generator:
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, h])


def logical_value(seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of one logical tensor; scales keep routing and logits non-degenerate."""
    rng = _rng(seed, name)
    if name.endswith("layernorm.weight") or name == "norm.weight":
        return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith("e_score_correction_bias"):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name == "embed_tokens.weight":
        return rng.standard_normal(shape).astype(np.float32)
    gain = 3.0 if name.endswith("mlp.gate.weight") or name == "lm_head.weight" else 1.0
    return (gain / math.sqrt(shape[-1]) * rng.standard_normal(shape)).astype(np.float32)


Encoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _stored(name: str, shape: tuple[int, ...], fmt: str, value: Callable[[], np.ndarray] | None,
            quant: QuantScheme, weight_shape_dtype: str, encoders: dict[str, Encoder]) -> list[tuple[str, str, tuple[int, ...], Callable | None]]:  # fmt: skip
    """Encode a logical tensor as the stored tensors of ``fmt`` (suffixes relative to its module)."""
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    if fmt == "int4" and module:
        out_f, in_f = shape
        q = _Encoded(lambda: encoders["int4"](value()), 2) if value else None
        ws = np.array(shape, dtype=np.int32 if weight_shape_dtype == "I32" else np.int64)
        return [
            (f"{module}.weight_packed", "I32", (out_f, math.ceil(in_f / 8)), q and (lambda: q.part(0))),
            (f"{module}.weight_scale", "BF16", (out_f, math.ceil(in_f / quant.group_size)), q and (lambda: q.part(1))),
            # 8 bytes each, and the loader checks them, so they are written even in sparse mode
            (f"{module}.weight_shape", weight_shape_dtype, (2,), lambda: ws),
        ]
    if fmt == "fp8" and module:
        q = _Encoded(lambda: encoders["fp8"](value()), 2) if value else None
        b0, b1 = quant.fp8_block_size
        blocks = (math.ceil(shape[0] / b0), math.ceil(shape[1] / b1))
        return [(name, "F8_E4M3", shape, q and (lambda: q.part(0))),
                (f"{module}.weight_scale_inv", "F32", blocks, q and (lambda: q.part(1)))]  # fmt: skip
    dtype = "F32" if name.endswith("e_score_correction_bias") else "BF16"
    np_dtype = np.float32 if dtype == "F32" else ml_dtypes.bfloat16
    return [(name, dtype, shape, (lambda: value().astype(np_dtype)) if value else None)]


class _Encoded:
    """Encodes a tensor once for its several stored parts, and forgets it once all are taken."""

    def __init__(self, encode: Callable[[], tuple[np.ndarray, ...]], parts: int):
        self._encode, self._left, self._value = encode, parts, None

    def part(self, i: int) -> np.ndarray:
        if self._value is None:
            self._value = self._encode()
        out = self._value[i]
        self._left -= 1
        if self._left == 0:
            self._value = None
        return out


def _format_of(layout: str, name: str) -> str:
    if layout == "kimi-k2.5":
        return "int4" if ".mlp.experts." in name else "plain"
    if layout in ("kimi-k2-fp8", "deepseek-v3"):
        plain = ("layernorm.weight", "norm.weight", "embed_tokens.weight", "lm_head.weight", "mlp.gate.weight",
                 "e_score_correction_bias")  # fmt: skip
        return "plain" if name.endswith(plain) else "fp8"
    return "plain"


# -- writing ---------------------------------------------------------------------------------------

# safetensors orders a shard's tensors by dtype (widest first), then by name.
_DTYPE_RANK = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
               "F64", "I64", "U64"]  # fmt: skip


def _safetensors_order(tensors: list[PlannedTensor]) -> list[PlannedTensor]:
    return sorted(tensors, key=lambda t: (-_DTYPE_RANK.index(t.dtype), t.name))


def synth_checkpoint(out_dir: str | Path, preset: str = "tiny", layout: str = "kimi-k2.5", seed: int = 0,
                     weight_shape_dtype: str = "I32", sparse: bool | None = None,
                     values: Callable[[str, tuple[int, ...]], np.ndarray] | None = None,
                     encoders: dict[str, Encoder] | None = None, **overrides: Any) -> Path:  # fmt: skip
    """Write a synthetic checkpoint to ``out_dir`` (created atomically: temp dir, then rename).

    ``overrides`` replace text-config fields. ``values(name, shape)`` supplies the float32 value of
    each logical tensor (default: seeded random); ``encoders`` may replace the int4 (``w ->
    (packed, scale)``) or fp8 (``w -> (weight, scale_inv)``) quantizers, e.g. by a reference
    library's, so a checkpoint can be written from another model's weights.
    """
    if layout not in SYNTH_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(SYNTH_LAYOUTS)}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; synth never overwrites a checkpoint")
    sparse = preset.startswith("full-shape") if sparse is None else sparse
    routed = preset == "full-shape-routed"
    raw_cfg = config_json(preset, layout, **overrides)
    cfg = parse_model_config(raw_cfg)
    prefix = synth_prefix(layout)
    own_encoders = {"int4": lambda w: codecs.quantize_int4(w, cfg.quant.group_size),
                    "fp8": lambda w: codecs.quantize_fp8_block(w, cfg.quant.fp8_block_size)}  # fmt: skip
    encoders = {**own_encoders, **(encoders or {})}
    values = values or (lambda n, s: logical_value(seed, n, s))

    groups: dict[str, list[PlannedTensor]] = {}  # group key -> tensors, in model order

    def add(key: str, stored_name: str, dtype: str, shape, make) -> None:
        groups.setdefault(key, []).append(PlannedTensor(stored_name, dtype, tuple(shape), make))

    for layer, name, shape in checkpoint_shapes(cfg):
        key = "head" if layer is None and name != "embed_tokens.weight" else ("embed" if layer is None else f"L{layer}")
        if not sparse:
            value = lambda n=name, s=shape: values(n, s)  # noqa: E731
        elif routed and _routes(name):  # the embedding and lm_head: their first rows only, the rest holes
            rows = min(shape[0], ROUTED_ACTIVE_TOKENS) if name.endswith(("embed_tokens.weight", "lm_head.weight")) else shape[0]
            value = lambda n=name, s=(rows, *shape[1:]): values(n, s)  # noqa: E731
        else:
            value = None
        fmt = _format_of(layout, name)
        for sname, dtype, sshape, make in _stored(name, shape, fmt, value, cfg.quant, weight_shape_dtype, encoders):
            full = ("language_model." if layout == "kimi-k2.5" else "") + sname if sname == "lm_head.weight" else prefix + sname
            add(key, full, dtype, sshape, make)
        if layout in ("kimi-k2-fp8", "deepseek-v3") and name.endswith("input_layernorm.weight"):
            inv = None if sparse else (lambda: np.ones(cfg.qk_rope_head_dim // 2, ml_dtypes.bfloat16))
            add(key, f"{prefix}layers.{layer}.self_attn.rotary_emb.inv_freq", "BF16", (cfg.qk_rope_head_dim // 2,), inv)
    if layout == "deepseek-v3":
        _add_mtp_layer(add, cfg, layout, prefix, seed, sparse, values,
                       lambda n, s, f, v: _stored(n, s, f, v, cfg.quant, weight_shape_dtype, own_encoders))
    if layout == "kimi-k2.5":
        _add_vision(add, raw_cfg["vision_config"], text_hidden=cfg.hidden_size, seed=seed, sparse=sparse)

    shards = _assign_shards(layout, groups, cfg.num_hidden_layers)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        weight_map, total = {}, 0
        for fname, tensors in shards:
            planned = []
            for t in _safetensors_order(tensors):
                data = None if t.data is None else t.data()
                planned.append(PlannedTensor(t.name, t.dtype, t.shape, data))
                weight_map[t.name] = fname
            total += write_shard(tmp / fname, planned, {"format": "pt"})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        if not (layout == "hf-bf16" and len(shards) == 1):
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(raw_cfg, indent=2) + "\n")
        if layout in KIMI_SYNTH_LAYOUTS and cfg.bos_token_id == cfg.vocab_size - RESERVED_SPECIAL_TOKENS:
            for name, data in tokenizer_files(cfg.vocab_size).items():
                (tmp / name).write_bytes(data)
        (tmp / "kimi_jax_synth.json").write_text(json.dumps(
            {"generator_version": generator_version(layout), "preset": preset, "layout": layout, "seed": seed,
             "sparse": sparse, "weight_shape_dtype": weight_shape_dtype, "overrides": overrides}, indent=2) + "\n")  # fmt: skip
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _assign_shards(layout: str, groups: dict[str, list[PlannedTensor]], n_layers: int):
    layer_keys = [f"L{i}" for i in range(n_layers)]
    if layout == "kimi-k2.5":
        order = [[k] for k in layer_keys] + [["embed", "head"]] + [["mm_projector"], ["vision_tower"]]
        n = len(order)
        return [(f"model-{i + 1:05d}-of-{n:06d}.safetensors", [t for k in ks for t in groups[k]])
                for i, ks in enumerate(order)]  # fmt: skip
    if layout == "kimi-k2-fp8":
        order = [["embed", layer_keys[0]]] + [[k] for k in layer_keys[1:-1]] + [[layer_keys[-1], "head"]]
        n = len(order)
        return [(f"model-{i + 1}-of-{n}.safetensors", [t for k in ks for t in groups[k]]) for i, ks in enumerate(order)]
    # Size-packed shards (deepseek-v3, hf-bf16): tensors in model order, a new shard whenever the
    # current one reaches its budget, so layers, and for DeepSeek even experts, straddle shards.
    everything = [t for k in ["embed", *layer_keys, "mtp", "head"] if k in groups for t in groups[k]]
    sizes = [math.prod(t.shape) * DTYPE_SIZES[t.dtype] for t in everything]
    n_target = 5 if layout == "deepseek-v3" else 2
    budget = math.ceil(sum(sizes) / n_target)
    shards, current, used = [], [], 0
    for t, size in zip(everything, sizes):
        if current and used + size > budget:
            shards.append(current)
            current, used = [], 0
        current.append(t)
        used += size
    shards.append(current)
    n = len(shards)
    total = f"{n:05d}" if layout == "hf-bf16" else f"{n:06d}"  # transformers pads to 5, DeepSeek to 6
    return [(f"model-{i + 1:05d}-of-{total}.safetensors", ts) for i, ts in enumerate(shards)]


def _add_mtp_layer(add, cfg: ModelConfig, layout: str, prefix: str, seed: int, sparse: bool, values,
                   stored) -> None:  # fmt: skip
    """DeepSeek-V3's multi-token-prediction layer, as layer num_hidden_layers: a whole decoder layer
    (its routed experts in the layout's formats), enorm, hnorm, eh_proj and shared_head.norm, and the
    copies of the embedding and the head that DeepSeek-V3 ships there (the main model's values). The
    layer's own values come from the seed and synth's own encoders (not from ``values`` or the
    caller's encoders: another model's weights have no MTP layer)."""
    layer, h = cfg.num_hidden_layers, cfg.hidden_size
    p = f"layers.{layer}."
    norms = [p + n for n in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight")]
    tensors = [(n, (h,), lambda n=n: (1.0 + 0.2 * _rng(seed, n).standard_normal(h)).astype(np.float32)) for n in norms]
    tensors += [(p + "embed_tokens.weight", (cfg.vocab_size, h), lambda: values("embed_tokens.weight", (cfg.vocab_size, h))),
                (p + "shared_head.head.weight", (cfg.vocab_size, h), lambda: values("lm_head.weight", (cfg.vocab_size, h)))]
    body = [(p + "eh_proj.weight", (h, 2 * h)), *layer_shapes(cfg, layer).items()]
    if cfg.is_moe_layer(layer):
        body += [item for e in range(cfg.n_routed_experts) for item in expert_shapes(cfg, layer, e).items()]
    tensors += [(n, s, lambda n=n, s=s: logical_value(seed, n, s)) for n, s in body]
    for name, shape, value in tensors:
        fmt = "plain" if name in norms or "shared_head.head" in name else _format_of(layout, name)
        for sname, dtype, sshape, make in stored(name, shape, fmt, None if sparse else value):
            add("mtp", prefix + sname, dtype, sshape, make)


def _add_vision(add, vision: dict[str, Any], text_hidden: int, seed: int, sparse: bool) -> None:
    """The K2.5 vision tower and projector tensors (real shapes in full-shape mode); skipped by the engine."""
    d, inner, patch = vision["vt_hidden_size"], vision["vt_intermediate_size"], vision["patch_size"]
    tensors = [("mm_projector", "mm_projector.pre_norm.weight", (d,)), ("mm_projector", "mm_projector.pre_norm.bias", (d,)),
               ("mm_projector", "mm_projector.proj.0.weight", (4 * d, 4 * d)), ("mm_projector", "mm_projector.proj.0.bias", (4 * d,)),
               ("mm_projector", "mm_projector.proj.2.weight", (text_hidden, 4 * d)), ("mm_projector", "mm_projector.proj.2.bias", (text_hidden,)),
               ("vision_tower", "vision_tower.patch_embed.proj.weight", (d, 3, patch, patch)),
               ("vision_tower", "vision_tower.patch_embed.proj.bias", (d,)),
               ("vision_tower", "vision_tower.patch_embed.pos_emb.weight",
                (vision["init_pos_emb_height"], vision["init_pos_emb_width"], d)),
               ("vision_tower", "vision_tower.encoder.final_layernorm.weight", (d,)),
               ("vision_tower", "vision_tower.encoder.final_layernorm.bias", (d,))]  # fmt: skip
    for b in range(vision["vt_num_hidden_layers"]):
        p = f"vision_tower.encoder.blocks.{b}."
        for name, shape in [("wqkv.weight", (3 * d, d)), ("wqkv.bias", (3 * d,)), ("wo.weight", (d, d)), ("wo.bias", (d,)),
                            ("mlp.fc0.weight", (inner, d)), ("mlp.fc0.bias", (inner,)), ("mlp.fc1.weight", (d, inner)),
                            ("mlp.fc1.bias", (d,)), ("norm0.weight", (d,)), ("norm0.bias", (d,)),
                            ("norm1.weight", (d,)), ("norm1.bias", (d,))]:  # fmt: skip
            tensors.append(("vision_tower", p + name, shape))
    for key, name, shape in tensors:
        make = None if sparse else (lambda n=name, s=shape: (0.02 * _rng(seed, n).standard_normal(s)).astype(ml_dtypes.bfloat16))
        add(key, name, "BF16", shape, make)


# -- the cache of generated checkpoints --------------------------------------------------------------


def synthetic_path(preset: str, layout: str = "kimi-k2.5", seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Where the cache keeps the synthetic checkpoint for (preset, layout, seed); it may not exist yet.
    The generator version is part of the name, so a changed generator never reuses old files."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return root / "synthetic" / f"{layout}-{preset}-seed{seed}-v{generator_version(layout)}"


def ensure_synthetic(preset: str, layout: str = "kimi-k2.5", seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Return the cached synthetic checkpoint for (preset, layout, seed), generating it on first use."""
    target = synthetic_path(preset, layout, seed, cache_dir)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        return synth_checkpoint(target, preset=preset, layout=layout, seed=seed)
    except FileExistsError:  # another process finished it first
        return target
