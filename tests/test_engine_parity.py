"""End to end against transformers: checkpoint on disk -> streaming engine -> logits and tokens.

A random transformers ``DeepseekV3ForCausalLM`` is written in each real on-disk layout (routed
experts int4-quantized by compressed-tensors itself, or block FP8), and transformers then runs on
exactly the dequantized weights the checkpoint holds. kimi-jax streams the checkpoint from disk.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.initialize import (
    initialize_module_for_quantization,  # noqa: E402
)
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402

from kimi_jax.model.engine import Engine  # noqa: E402
from kimi_jax.storage.checkpoint import open_checkpoint  # noqa: E402
from kimi_jax.storage.codecs import dequant_fp8_block, quantize_fp8_block  # noqa: E402
from kimi_jax.storage.synth import synth_checkpoint  # noqa: E402
from tests import hf_oracle  # noqa: E402

PROMPT = [3, 17, 42, 99, 5]
STEPS = 16


def _bf16(a: np.ndarray) -> np.ndarray:
    return a.astype(ml_dtypes.bfloat16).astype(np.float32)


def _ct_int4(w: np.ndarray, stored: dict, name: str):
    """Quantize with compressed-tensors (symmetric int4, group 32) and keep its decompression."""
    out_f, in_f = w.shape
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    lin = torch.nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
    lin.weight.data.copy_(torch.from_numpy(w).to(torch.bfloat16))
    initialize_module_for_quantization(lin, QuantizationScheme(targets=["Linear"], weights=args))
    grouped = lin.weight.data.float().reshape(out_f, in_f // 32, 32)
    scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    lin.weight_scale.data.copy_(scale.to(torch.bfloat16))
    lin.weight_zero_point.data.copy_(zp)
    PackedQuantizationCompressor.compress_module(lin)
    packed = lin.weight_packed.detach().numpy().copy()
    scale = lin.weight_scale.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    PackedQuantizationCompressor.decompress_module(lin)
    stored[name] = lin.weight.detach().float().numpy().copy()
    return packed, scale


def _fp8(w: np.ndarray, stored: dict, name: str):
    weight, scale_inv = quantize_fp8_block(w, (128, 128))
    stored[name] = dequant_fp8_block(weight, scale_inv, (128, 128)).astype(np.float32)
    return weight, scale_inv


def _write(tmp_path, layout: str, model, quantize=None):
    """Write ``model`` in ``layout``; returns (checkpoint dir, canonical float32 weights it holds)."""
    tensors = {k: (v if k.endswith("e_score_correction_bias") else _bf16(v))
               for k, v in hf_oracle.canonical_tensors(model).items()}  # fmt: skip
    stored = dict(tensors)
    current: list[str] = []

    def values(name, shape):
        current[:] = [name]
        assert tensors[name].shape == shape, name
        return tensors[name]

    encoders = {}
    if quantize == "int4":
        encoders["int4"] = lambda w: _ct_int4(w, stored, current[0])
    encoders["fp8"] = lambda w: _fp8(w, stored, current[0])
    c = model.config
    rope = c.rope_parameters
    overrides = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        moe_intermediate_size=c.moe_intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
        n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.num_experts_per_tok, n_group=c.n_group,
        topk_group=c.topk_group, first_k_dense_replace=c.first_k_dense_replace,
        routed_scaling_factor=c.routed_scaling_factor, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, num_key_value_heads=c.num_attention_heads,
        bos_token_id=0, eos_token_id=1, rope_theta=rope["rope_theta"],
        rope_scaling={k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")} | {"type": "yarn"},
    )  # fmt: skip
    ckpt = synth_checkpoint(tmp_path / layout, "tiny", layout, values=values, encoders=encoders, **overrides)
    return ckpt, stored


def _load_into(model, tensors: dict[str, np.ndarray]) -> None:
    """Put canonical weights back into transformers' (fused-expert) parameters."""
    state = model.state_dict()
    new = {}
    for key in state:
        name = key.removeprefix("model.")
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            n = state[key].shape[0]
            new[key] = np.stack([np.concatenate([tensors[f"{prefix}{e}.gate_proj.weight"],
                                                 tensors[f"{prefix}{e}.up_proj.weight"]]) for e in range(n)])  # fmt: skip
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            new[key] = np.stack([tensors[f"{prefix}{e}.down_proj.weight"] for e in range(state[key].shape[0])])
        else:
            new[key] = tensors[name]
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in new.items()})


def _check(ckpt, model, kv_cache: bool, steps: int = STEPS):
    idx = open_checkpoint(ckpt)
    with Engine(idx, "float32", prefetch=True) as engine:
        records = engine.generate(PROMPT, steps, kv_cache=kv_cache)
    tokens = [r.token for r in records]
    ref = hf_oracle.logits(model, PROMPT + tokens[:-1])[len(PROMPT) - 1 :]
    ours = np.stack([r.logits for r in records])
    diff = float(np.abs(ours - ref).max())
    assert diff < 1e-4, f"max |logits - transformers| = {diff}"
    assert tokens == [int(np.argmax(row)) for row in ref], "greedy tokens differ from transformers"
    assert len(set(tokens)) > 1, "degenerate test model: every step picked the same token"
    return records


CASES = {
    # name: (layout, quantize, hf_oracle.build overrides)
    "k2.5-int4": ("kimi-k2.5", "int4", {}),
    "k2-fp8": ("kimi-k2-fp8", None, {}),
    "n_group>1": ("kimi-k2.5", "int4", dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)),
    "first_k_dense=2": ("deepseek-v3", None, dict(num_hidden_layers=4, first_k_dense_replace=2, n_group=2,
                                                   topk_group=1)),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_checkpoint_matches_transformers(tmp_path, case):
    layout, quantize, overrides = CASES[case]
    model = hf_oracle.build(7, **overrides)
    ckpt, stored = _write(tmp_path, layout, model, quantize)
    _load_into(model, stored)
    records = _check(ckpt, model, kv_cache=True)
    if case == "k2.5-int4":  # the technical note's mode: every step recomputes the sequence
        full = _check(ckpt, model, kv_cache=False)
        assert [r.token for r in full] == [r.token for r in records]


def test_transformers_bf16_save_pretrained(tmp_path):
    """transformers' own writer (transformers-5 config spelling) in BF16."""
    model = hf_oracle.build(11)
    _load_into(model, {k: _bf16(v) for k, v in hf_oracle.canonical_tensors(model).items()})  # all BF16 on disk
    bf16 = hf_oracle.build(11)
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    _check(tmp_path / "hf", model, kv_cache=True)
