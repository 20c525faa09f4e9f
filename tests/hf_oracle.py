"""transformers' DeepseekV3ForCausalLM as a float32 oracle for tiny random models (tests only).

Builds a small model with deliberately non-trivial weights (std well above the 0.02 init, RMSNorm
weights around 1, a non-zero ``e_score_correction_bias``) so attention, YaRN and routing all
matter, and converts its state dict to kimi_jax canonical tensor names.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from kimi_jax.config import ModelConfig, parse_model_config

BASE = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    rms_norm_eps=1e-5,  # != the latent norms' 1e-6, so using the wrong eps would show
    max_position_embeddings=128,
    rope_interleave=True,
    tie_word_embeddings=False,
)

YARN = dict(rope_type="yarn", rope_theta=50.0, factor=4.0, original_max_position_embeddings=32,
            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)


def build(seed: int, *, rope: dict | None = None, **overrides) -> DeepseekV3ForCausalLM:
    """A float32 eval-mode model with random, large-ish weights."""
    torch.manual_seed(seed)
    kwargs = {**BASE, **overrides, "rope_parameters": dict(rope or YARN)}
    config = DeepseekV3Config(**kwargs)
    config._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(config).eval().float()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = param.shape
            if name.endswith("norm.weight"):  # every RMSNorm (layer, latent and final)
                value = 1.0 + 0.2 * torch.randn(shape, generator=gen)
            elif name.endswith("embed_tokens.weight"):
                value = torch.randn(shape, generator=gen)
            elif name.endswith("mlp.gate.weight"):
                value = 0.3 * torch.randn(shape, generator=gen)
            elif name.endswith("lm_head.weight"):
                value = 0.3 * torch.randn(shape, generator=gen)
            else:
                value = 0.15 * torch.randn(shape, generator=gen)
            param.copy_(value)
        # Small latent pre-norm activations, so the latent norms' eps (1e-6, not rms_norm_eps) matters.
        for layer in model.model.layers:
            layer.self_attn.q_a_proj.weight.mul_(0.03)
            layer.self_attn.kv_a_proj_with_mqa.weight[: model.config.kv_lora_rank].mul_(0.03)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
    return model


def model_config(model: DeepseekV3ForCausalLM) -> ModelConfig:
    return parse_model_config(model.config.to_dict(), source="hf-test-config")


def canonical_tensors(model: DeepseekV3ForCausalLM) -> dict[str, np.ndarray]:
    """State dict -> canonical names; fused experts split as transformers' forward splits them.

    transformers 5 keeps ``mlp.experts.gate_up_proj`` [E, 2I, H] (its forward does
    ``linear(x, gate_up_proj[e]).chunk(2)``: gate rows first, up rows second) and
    ``mlp.experts.down_proj`` [E, H, I].
    """
    out: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        array = tensor.detach().to(torch.float32).numpy().copy()
        name = name.removeprefix("model.")
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = name.removesuffix("gate_up_proj"), array.shape[1] // 2
            for e in range(array.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = array[e, :inter]
                out[f"{prefix}{e}.up_proj.weight"] = array[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(array.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = array[e]
        else:
            out[name] = array
    return out


@torch.no_grad()
def logits(model: DeepseekV3ForCausalLM, tokens) -> np.ndarray:
    """float32 logits [T, vocab] of a full forward without cache."""
    ids = torch.tensor([list(tokens)], dtype=torch.long)
    return model(input_ids=ids, use_cache=False).logits[0].float().numpy()


@torch.no_grad()
def greedy(model: DeepseekV3ForCausalLM, prompt, steps: int) -> list[int]:
    """Greedy continuation, recomputing the whole sequence each step (no cache)."""
    tokens = list(prompt)
    for _ in range(steps):
        last = logits(model, tokens)[-1]
        tokens.append(int(np.argmax(last)))  # first maximum: ties to the lowest id
    return tokens[len(prompt):]
