"""Model configuration: one frozen, hashable object derived from a checkpoint's ``config.json``.

Three real spellings reach us and all end up in :class:`ModelConfig`:

* Kimi K2.5: a ``kimi_k25`` vision-language wrapper; the DeepSeek-V3 text model sits in
  ``text_config`` together with its ``quantization_config`` (compressed-tensors int4).
* Kimi K2 / DeepSeek-V3: the text config at top level, block-FP8 ``quantization_config``.
* transformers' ``save_pretrained``: top level, no quantization, and (transformers 5) the
  rope settings folded into ``rope_parameters`` instead of ``rope_theta`` + ``rope_scaling``.

The object is frozen so it can be a static argument of jitted functions and a cache key.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import blake3

from kimi_jax.errors import CheckpointError
from kimi_jax.fileio import canonical_json
from kimi_jax.fileio import read_json

# A real config.json is a few kilobytes.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# Every count and size in a config is an int32 in the programs built from it.
MAX_CONFIG_INT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class YarnRope:
    """YaRN scaling parameters (``rope_scaling`` with ``type: yarn``)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


# DeepSeek-V3's block FP8: one float32 scale per 128x128 block, when no weight_block_size is given.
DEFAULT_FP8_BLOCK = (128, 128)


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How the checkpoint stores its quantized linears.

    ``kind`` is ``"none"``, ``"int4-pack"`` (compressed-tensors pack-quantized, symmetric,
    grouped along the input dimension) or ``"fp8-block"`` (E4M3 with per-block float32
    ``weight_scale_inv``). Which tensors are actually quantized is read from the tensors
    themselves by the index; the scheme gives the parameters to decode them.
    """

    kind: Literal["none", "int4-pack", "fp8-block"] = "none"
    group_size: int = 0
    num_bits: int = 0
    block_size: tuple[int, int] = (0, 0)
    ignore: tuple[str, ...] = ()

    @property
    def fp8_block_size(self) -> tuple[int, int]:
        """The block of one ``weight_scale_inv`` entry of an F8_E4M3 weight: the declared one, else
        DeepSeek's 128x128 (F8 tensors found without an fp8 ``quantization_config`` saying so)."""
        return self.block_size if self.kind == "fp8-block" else DEFAULT_FP8_BLOCK


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The DeepSeek-V3 text model, as Kimi uses it. Field names follow ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    moe_layer_freq: int
    rope_theta: float
    rope_scaling: YarnRope | None
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    quant: QuantScheme = QuantScheme()
    # Which config.json layout this came from: "kimi_k25" wrapper or plain "deepseek_v3".
    wrapper: str = "deepseek_v3"

    # transformers and the DeepSeek remote code build q_a/kv_a layernorms without an eps
    # argument, so they use the RMSNorm default rather than ``rms_norm_eps``.
    latent_norm_eps: float = 1e-6

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    def layer_kind(self, layer: int) -> Literal["dense", "moe"]:
        return "moe" if self.is_moe_layer(layer) else "dense"

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim^-0.5 * mscale^2`` with the YaRN mscale of ``mscale_all_dim``."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale = scale * m * m
        return scale

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """BLAKE3 of the canonical JSON of this config: the model's identity for ledgers (before
        ledger version 2 it was BLAKE2b, so older ledgers and anchors record other values)."""
        return blake3.blake3(canonical_json(self.to_json_dict())).hexdigest()


def yarn_mscale(factor: float, mscale: float) -> float:
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


# Keys that exist in real config.json files but do not change the text forward pass.
_IGNORED_TEXT_KEYS = frozenset(
    """
    architectures auto_map model_type transformers_version dtype torch_dtype use_cache
    initializer_range attention_dropout attention_bias aux_loss_alpha seq_aux ep_size
    pretraining_tp num_key_value_heads hidden_act topk_method scoring_func pad_token_id
    num_nextn_predict_layers head_dim qk_head_dim rope_interleave output_router_logits
    router_aux_loss_coef quantization_config rope_scaling rope_parameters rope_theta
    bos_token_id eos_token_id tie_word_embeddings _name_or_path id2label label2id
    return_dict output_hidden_states output_attentions chunk_size_feed_forward
    is_encoder_decoder problem_type tokenizer_class
    """.split()
)


def load_model_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read ``config.json`` in ``checkpoint_dir`` into a :class:`ModelConfig`."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path}: no config.json in the checkpoint directory")
    # NaN is let through the parser so the field that holds it is named below
    raw = read_json(path, MAX_CONFIG_BYTES, "config.json", CheckpointError, allow_nan=True)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object at top level")
    return parse_model_config(raw, source=str(path))


def parse_model_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    wrapper = "deepseek_v3"
    text = raw
    if "text_config" in raw:
        wrapper = str(raw.get("model_type", "kimi_k25"))
        text = raw["text_config"]
        if not isinstance(text, dict):
            raise CheckpointError(f"{source}: text_config must be an object")
        source = f"{source}: text_config"

    def need(key: str, kind: type | tuple[type, ...]) -> Any:
        if text.get(key) is None:
            null = " (it is null)" if key in text else ""
            raise CheckpointError(f"{source}: missing required field {key!r}{null}")
        return checked(text, key, kind, source)

    def opt(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        return need(key, kind) if text.get(key) is not None else default

    scoring = text.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise CheckpointError(f"{source}: scoring_func {scoring!r} is not supported (expected 'sigmoid')")
    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (expected 'silu')")
    if text.get("q_lora_rank") is None:
        raise CheckpointError(f"{source}: q_lora_rank is null; only the q-LoRA form of MLA is supported")

    theta, rope = _parse_rope(text, source)
    # Kimi K2.5 keeps quantization_config inside text_config; older dumps copy it up a level.
    qraw = text.get("quantization_config") or raw.get("quantization_config")
    dtype = text.get("torch_dtype") or text.get("dtype") or raw.get("torch_dtype") or raw.get("dtype")
    if not isinstance(dtype, (str, type(None))):
        raise CheckpointError(f"{source}: torch_dtype must be a string such as 'bfloat16', got {dtype!r}")

    cfg = ModelConfig(
        vocab_size=need("vocab_size", int),
        hidden_size=need("hidden_size", int),
        intermediate_size=need("intermediate_size", int),
        moe_intermediate_size=opt("moe_intermediate_size", int, 0),
        num_hidden_layers=need("num_hidden_layers", int),
        num_attention_heads=need("num_attention_heads", int),
        q_lora_rank=need("q_lora_rank", int),
        kv_lora_rank=need("kv_lora_rank", int),
        qk_nope_head_dim=need("qk_nope_head_dim", int),
        qk_rope_head_dim=need("qk_rope_head_dim", int),
        v_head_dim=need("v_head_dim", int),
        n_routed_experts=opt("n_routed_experts", int, 0),
        n_shared_experts=opt("n_shared_experts", int, 0),
        num_experts_per_tok=opt("num_experts_per_tok", int, 0),
        n_group=opt("n_group", int, 1),
        topk_group=opt("topk_group", int, 1),
        norm_topk_prob=opt("norm_topk_prob", bool, True),
        routed_scaling_factor=float(opt("routed_scaling_factor", (int, float), 1.0)),
        first_k_dense_replace=opt("first_k_dense_replace", int, 0),
        moe_layer_freq=opt("moe_layer_freq", int, 1),
        rope_theta=theta,
        rope_scaling=rope,
        max_position_embeddings=need("max_position_embeddings", int),
        rms_norm_eps=float(need("rms_norm_eps", (int, float))),
        tie_word_embeddings=checked(text if "tie_word_embeddings" in text else raw, "tie_word_embeddings", bool,
                                    source, default=False),  # fmt: skip
        bos_token_id=_token_id(text if "bos_token_id" in text else raw, "bos_token_id", source),
        eos_token_id=_token_id(text if "eos_token_id" in text else raw, "eos_token_id", source),
        torch_dtype=str(dtype or "bfloat16"),
        quant=_parse_quant(qraw, source),
        wrapper=wrapper,
    )
    _check_consistency(cfg, source)
    return cfg


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def checked(section: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str, default: Any = None) -> Any:
    """``section[key]`` (``default`` when absent or null) if it has the right JSON type: integers in
    [0, 2**31) (never a boolean or 5.0), finite numbers, booleans or strings, as strictly as the manifest."""
    value = section.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        raise CheckpointError(f"{source}: field {key!r} must be {_kind_name(kind)}, got {_shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise CheckpointError(f"{source}: field {key!r} must be a finite number, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= MAX_CONFIG_INT:
        raise CheckpointError(f"{source}: field {key!r} must be in [0, {MAX_CONFIG_INT}], got {value}")
    return float(value) if float in kinds and not isinstance(value, bool) else value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _token_id(section: dict[str, Any], key: str, source: str) -> int | None:
    value = section.get(key)
    if isinstance(value, list):  # some configs list several; the first is the one used
        if not value:
            return None
        section = {key: value[0]}
    return checked(section, key, int, source)


def _parse_rope(text: dict[str, Any], source: str) -> tuple[float, YarnRope | None]:
    params = text.get("rope_parameters")
    scaling = text.get("rope_scaling")
    theta = text.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if scaling is None and params.get("rope_type", params.get("type")) not in (None, "default"):
            scaling = params
    if theta is None:
        theta = 10000.0
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not 0 < theta < math.inf:
        raise CheckpointError(f"{source}: rope_theta must be a positive finite number, got {theta!r}")
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{source}: rope_scaling must be an object or null")
    kind = scaling.get("type", scaling.get("rope_type"))
    if not isinstance(kind, (str, type(None))) or kind != "yarn":
        raise CheckpointError(f"{source}: rope_scaling type {kind!r} is not supported (expected 'yarn')")
    where = f"{source}: rope_scaling"
    for key in ("factor", "original_max_position_embeddings"):
        if scaling.get(key) is None:
            raise CheckpointError(f"{where} is missing {key!r}")
    number = (int, float)
    rope = YarnRope(
        factor=checked(scaling, "factor", number, where),
        original_max_position_embeddings=checked(scaling, "original_max_position_embeddings", int, where),
        beta_fast=checked(scaling, "beta_fast", number, where, 32.0),
        beta_slow=checked(scaling, "beta_slow", number, where, 1.0),
        mscale=checked(scaling, "mscale", number, where, 1.0),
        mscale_all_dim=checked(scaling, "mscale_all_dim", number, where, 0.0),
    )
    if rope.factor <= 0 or rope.original_max_position_embeddings <= 0:
        raise CheckpointError(f"{where}: factor and original_max_position_embeddings must be positive, got "
                              f"{rope.factor} and {rope.original_max_position_embeddings}")  # fmt: skip
    return float(theta), rope


def _parse_quant(qraw: Any, source: str) -> QuantScheme:
    if not qraw:
        return QuantScheme()
    if not isinstance(qraw, dict):
        raise CheckpointError(f"{source}: quantization_config must be an object")
    method = qraw.get("quant_method")
    if method == "fp8":
        block = qraw.get("weight_block_size") or DEFAULT_FP8_BLOCK
        if qraw.get("fmt", "e4m3") != "e4m3":
            raise CheckpointError(f"{source}: fp8 fmt {qraw.get('fmt')!r} is not supported (expected 'e4m3')")
        if not (isinstance(block, list) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= MAX_CONFIG_INT for b in block)):
            raise CheckpointError(f"{source}: quantization_config.weight_block_size must be two positive integers, "
                                  f"got {_shown(block)}")  # fmt: skip
        return QuantScheme(kind="fp8-block", block_size=(block[0], block[1]))
    if method == "compressed-tensors":
        fmt = qraw.get("format")
        groups = qraw.get("config_groups") or {}
        if fmt != "pack-quantized" or not groups:
            raise CheckpointError(
                f"{source}: compressed-tensors format {fmt!r} is not supported (expected 'pack-quantized')"
            )
        first = next(iter(groups.values())) if isinstance(groups, dict) else None
        weights = first.get("weights") if isinstance(first, dict) else None
        if not isinstance(weights, dict):
            raise CheckpointError(f"{source}: quantization_config.config_groups must map a group name to an object "
                                  "with a 'weights' object")  # fmt: skip
        ignore = qraw.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
            raise CheckpointError(f"{source}: quantization_config.ignore must be a list of strings")
        bits, group = weights.get("num_bits"), weights.get("group_size")
        if bits != 4 or weights.get("type") != "int" or not weights.get("symmetric", False):
            raise CheckpointError(f"{source}: only symmetric int4 pack-quantized weights are supported, got {weights}")
        if (weights.get("strategy") != "group" or not isinstance(group, int) or isinstance(group, bool)
                or not 0 < group <= MAX_CONFIG_INT):  # fmt: skip
            raise CheckpointError(f"{source}: expected group quantization with a positive group_size, got {weights}")
        return QuantScheme(kind="int4-pack", group_size=group, num_bits=4, ignore=tuple(ignore))
    raise CheckpointError(f"{source}: quant_method {method!r} is not supported (expected fp8 or compressed-tensors)")


def _check_consistency(cfg: ModelConfig, source: str) -> None:
    positive = (
        "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads q_lora_rank "
        "kv_lora_rank qk_nope_head_dim v_head_dim max_position_embeddings"
    ).split()
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise CheckpointError(f"{source}: {name} must be positive, got {getattr(cfg, name)}")
    if not 0 < cfg.rms_norm_eps < 1:
        raise CheckpointError(f"{source}: rms_norm_eps must be in (0, 1), got {cfg.rms_norm_eps}")
    if not cfg.routed_scaling_factor > 0:
        raise CheckpointError(f"{source}: routed_scaling_factor must be positive, got {cfg.routed_scaling_factor}")
    if cfg.qk_rope_head_dim <= 0 or cfg.qk_rope_head_dim % 2:
        raise CheckpointError(f"{source}: qk_rope_head_dim must be positive and even, got {cfg.qk_rope_head_dim}")
    if cfg.n_routed_experts:
        if cfg.moe_intermediate_size <= 0:
            raise CheckpointError(f"{source}: moe_intermediate_size must be positive when n_routed_experts > 0")
        if not 0 < cfg.num_experts_per_tok <= cfg.n_routed_experts:
            raise CheckpointError(
                f"{source}: num_experts_per_tok must be in [1, n_routed_experts={cfg.n_routed_experts}], "
                f"got {cfg.num_experts_per_tok}"
            )
        if cfg.n_group <= 0 or cfg.n_routed_experts % cfg.n_group:
            raise CheckpointError(
                f"{source}: n_routed_experts={cfg.n_routed_experts} must divide into n_group={cfg.n_group} groups"
            )
        if not 0 < cfg.topk_group <= cfg.n_group:
            raise CheckpointError(f"{source}: topk_group must be in [1, n_group={cfg.n_group}], got {cfg.topk_group}")
        per_group = cfg.n_routed_experts // cfg.n_group
        if cfg.num_experts_per_tok > cfg.topk_group * per_group:
            raise CheckpointError(
                f"{source}: num_experts_per_tok={cfg.num_experts_per_tok} exceeds the experts in "
                f"topk_group={cfg.topk_group} groups of {per_group}"
            )
        if cfg.n_group > 1 and per_group < 2:
            raise CheckpointError(f"{source}: group scores sum the top 2 experts, so each group needs 2 or more")
    if cfg.moe_layer_freq <= 0:
        raise CheckpointError(f"{source}: moe_layer_freq must be positive, got {cfg.moe_layer_freq}")
    if cfg.quant.kind == "int4-pack":
        g = cfg.quant.group_size
        dims = {"hidden_size": cfg.hidden_size, "moe_intermediate_size": cfg.moe_intermediate_size}
        for name, dim in dims.items():
            if dim and dim % g:
                raise CheckpointError(f"{source}: {name}={dim} is not a multiple of the int4 group_size {g}")
