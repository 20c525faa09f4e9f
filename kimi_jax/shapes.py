"""The shape of every weight, declared once from :class:`~kimi_jax.config.ModelConfig`.

Canonical name -> shape (HF ``[out, in]`` layout), per layer kind, per routed expert, and for the
embedding and head. The checkpoint index checks stored tensors against these tables, the
parameter builders check what they are handed, and synth writes exactly these tensors. Plain
data, no JAX, so storage code can use it.
"""

from __future__ import annotations

from collections.abc import Iterator

from kimi_jax.config import ModelConfig

Shape = tuple[int, ...]


def attention_shapes(cfg: ModelConfig, prefix: str) -> dict[str, Shape]:
    """Multi-head latent attention: q through its LoRA, k/v through the compressed latent."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    return {
        f"{prefix}.q_a_proj.weight": (cfg.q_lora_rank, h),
        f"{prefix}.q_a_layernorm.weight": (cfg.q_lora_rank,),
        f"{prefix}.q_b_proj.weight": (heads * cfg.qk_head_dim, cfg.q_lora_rank),
        f"{prefix}.kv_a_proj_with_mqa.weight": (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
        f"{prefix}.kv_a_layernorm.weight": (cfg.kv_lora_rank,),
        f"{prefix}.kv_b_proj.weight": (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        f"{prefix}.o_proj.weight": (h, heads * cfg.v_head_dim),
    }


def mlp_shapes(prefix: str, hidden: int, inter: int) -> dict[str, Shape]:
    """A SwiGLU MLP: the dense MLP, the shared expert and every routed expert."""
    return {
        f"{prefix}.gate_proj.weight": (inter, hidden),
        f"{prefix}.up_proj.weight": (inter, hidden),
        f"{prefix}.down_proj.weight": (hidden, inter),
    }


def layer_shapes(cfg: ModelConfig, layer: int) -> dict[str, Shape]:
    """One layer's weights except its routed experts (what is read before the router runs)."""
    h, p = cfg.hidden_size, f"layers.{layer}"
    shapes = {f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
              **attention_shapes(cfg, f"{p}.self_attn")}  # fmt: skip
    if not cfg.is_moe_layer(layer):
        return {**shapes, **mlp_shapes(f"{p}.mlp", h, cfg.intermediate_size)}
    shapes[f"{p}.mlp.gate.weight"] = (cfg.n_routed_experts, h)
    shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
    if cfg.n_shared_experts:
        shapes.update(mlp_shapes(f"{p}.mlp.shared_experts", h, cfg.n_shared_experts * cfg.moe_intermediate_size))
    return shapes


def expert_shapes(cfg: ModelConfig, layer: int, expert: int) -> dict[str, Shape]:
    """One routed expert of a MoE layer."""
    return mlp_shapes(f"layers.{layer}.mlp.experts.{expert}", cfg.hidden_size, cfg.moe_intermediate_size)


def head_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """The final norm and the output projection (with tied embeddings, the embedding itself)."""
    return {"norm.weight": (cfg.hidden_size,), "lm_head.weight": (cfg.vocab_size, cfg.hidden_size)}


def global_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """What a checkpoint stores outside the decoder layers: no ``lm_head`` when it is tied."""
    shapes = {"embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), **head_shapes(cfg)}
    if cfg.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def checkpoint_shapes(cfg: ModelConfig) -> Iterator[tuple[int | None, str, Shape]]:
    """(layer, canonical name, shape) of every tensor a checkpoint stores; layer None outside the layers.

    Globals first, then layer by layer: non-expert weights, then experts in id order.
    """
    for name, shape in global_shapes(cfg).items():
        yield None, name, shape
    for layer in range(cfg.num_hidden_layers):
        for name, shape in layer_shapes(cfg, layer).items():
            yield layer, name, shape
        if cfg.is_moe_layer(layer):
            for expert in range(cfg.n_routed_experts):
                for name, shape in expert_shapes(cfg, layer, expert).items():
                    yield layer, name, shape


__all__ = [
    "Shape", "attention_shapes", "mlp_shapes", "layer_shapes", "expert_shapes",
    "head_shapes", "global_shapes", "checkpoint_shapes",
]
