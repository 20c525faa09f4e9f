"""The checkpoint index: layout detection, skipped tensors, shape checks, corrupt shards."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

from kimi_jax.errors import CheckpointError
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.synth import synth_checkpoint


def _listing(path):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir())


def test_kimi_k25_layout(tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    cfg = idx.config
    assert idx.layout == "kimi-k2.5-int4" and idx.prefix == "language_model.model."
    assert cfg.wrapper == "kimi_k25" and cfg.quant.kind == "int4-pack" and cfg.quant.group_size == 32
    # one layer per shard, named as the real release names them
    n = len(idx.shards)
    for layer in idx.layers:
        shards = {p.shard.name for w in layer.base.values() for p in w.parts.values()}
        assert shards == {f"model-{layer.index + 1:05d}-of-{n:06d}.safetensors"}
    assert [l.kind for l in idx.layers] == ["dense"] + ["moe"] * (cfg.num_hidden_layers - 1)
    expert = idx.layers[1].experts[0]["down_proj"]
    assert expert.format == "int4" and set(expert.parts) == {"weight_packed", "weight_scale", "weight_shape"}
    assert expert.shape == (cfg.hidden_size, cfg.moe_intermediate_size)
    # the vision tower and projector are indexed as skipped, never as model weights
    skipped = [name for name, _ in idx.skipped]
    assert skipped and all(s.startswith(("vision_tower.", "mm_projector.")) for s in skipped)
    assert idx.layers[0].base["layers.0.mlp.gate_proj.weight"].format == "plain"
    assert idx.weights["lm_head.weight"].parts["weight"].stored_name == "language_model.lm_head.weight"


def test_kimi_k2_fp8_layout(tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2-fp8"])
    assert idx.layout == "deepseek-v3-fp8" and idx.prefix == "model."
    assert idx.config.quant.kind == "fp8-block" and idx.config.quant.block_size == (128, 128)
    q_b = idx.layers[0].base["layers.0.self_attn.q_b_proj.weight"]
    assert q_b.format == "fp8" and set(q_b.parts) == {"weight", "weight_scale_inv"}
    assert idx.layers[1].base["layers.1.mlp.gate.weight"].format == "plain"
    assert all(name.endswith("rotary_emb.inv_freq") for name, _ in idx.skipped)
    assert len(idx.skipped) == idx.config.num_hidden_layers
    names = sorted(p.name for p in tiny_checkpoints["kimi-k2-fp8"].glob("*.safetensors"))
    assert names[0] == "model-1-of-4.safetensors"


def test_deepseek_v3_layout_splits_layers_and_skips_mtp(tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["deepseek-v3"])
    cfg = idx.config
    assert cfg.n_group > 1 and cfg.first_k_dense_replace == 2
    assert [l.kind for l in idx.layers][:3] == ["dense", "dense", "moe"]
    spans = [len({p.shard for w in l.base.values() for p in w.parts.values()}
                 | {p.shard for e in l.experts for w in e.values() for p in w.parts.values()}) for l in idx.layers]  # fmt: skip
    assert max(spans) > 1, "size-packed shards should split at least one layer"
    mtp = [name for name, why in idx.skipped if f"layers.{cfg.num_hidden_layers}." in name]
    assert mtp and all("multi-token" in why for name, why in idx.skipped if name in mtp)


def test_transformers_save_pretrained_layout(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    idx = open_checkpoint(tmp_path)
    assert idx.layout == "hf-bf16" and idx.config.n_group == 2
    assert len(idx.layers[2].experts) == 4
    assert idx.layers[2].experts[3]["up_proj"].shape == (16, 32)


def test_config_tensor_mismatch_is_named(tiny_checkpoints, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path / "ckpt")
    raw = json.loads((ckpt / "config.json").read_text())
    raw["text_config"]["q_lora_rank"] = 48
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(ckpt)
    msg = str(e.value)
    assert "layers.0.self_attn.q_a_proj.weight" in msg and "[48, 128]" in msg and "[64, 128]" in msg
    assert "model-00001-of-000007.safetensors" in msg


def test_missing_expert_is_named(tiny_checkpoints, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path / "ckpt")
    raw = json.loads((ckpt / "config.json").read_text())
    raw["text_config"]["n_routed_experts"] = 20
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"layer 1 should have experts 0..19; missing \[16, 17, 18, 19\]"):
        open_checkpoint(ckpt)


def test_truncated_shard(tiny_checkpoints, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path / "ckpt")
    shard = ckpt / "model-00003-of-000007.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    before = _listing(ckpt)
    with pytest.raises(CheckpointError, match=r"model-00003-of-000007.safetensors: shard is truncated"):
        open_checkpoint(ckpt)
    assert _listing(ckpt) == before


@pytest.mark.parametrize("damage", ["json", "length", "offsets"])
def test_corrupted_header(tiny_checkpoints, tmp_path, damage):
    ckpt = shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path / "ckpt")
    shard = ckpt / "model-00002-of-000007.safetensors"
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    if damage == "json":
        data[8:12] = b"\x00\xff{["
    elif damage == "length":
        data[:8] = struct.pack("<Q", len(data) + 10)
    else:
        header = json.loads(data[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 4
        blob = json.dumps(header).encode().ljust(n)
        data[8 : 8 + n] = blob[:n]
    shard.write_bytes(bytes(data))
    before = _listing(ckpt)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(ckpt)
    assert "model-00002-of-000007.safetensors" in str(e.value) and "corrupted" in str(e.value) or "span" in str(e.value)
    assert _listing(ckpt) == before


def test_full_shape_sparse_layout_matches_reference_sizes(full_shape_checkpoint):
    """Real Kimi K2.5 dimensions, bytes left as file holes. Figures from kimi-format.md section 6."""
    ckpt = full_shape_checkpoint
    used = sum(p.stat().st_blocks * 512 for p in ckpt.iterdir())
    apparent = sum(p.stat().st_size for p in ckpt.iterdir())
    # only headers, the index and the 8-byte weight_shape tensors take real blocks
    assert used < apparent / 1000, f"the full-shape layout must stay sparse: {used:,} of {apparent:,} bytes"
    idx = open_checkpoint(ckpt)
    assert sum(len(w.parts) for w in idx.weights.values()) + len(idx.skipped) == 208_550
    assert len(idx.shards) == 64
    assert idx.layers[0].total_bytes == 995_000_320
    assert all(l.total_bytes == 9_808_554_496 for l in idx.layers[1:])
    assert idx.layers[1].expert_bytes(0) == 24_772_632
    assert idx.predicted_bytes_per_token() == 32_986_531_072
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 595_148_192_736


def test_full_shape_routed_writes_what_routing_needs_and_picks_vary(tmp_path):
    """full-shape-routed: routers, biases, norms and the first active token rows are written, every
    other weight is a hole; tokens and layers then pick different experts (the plain full-shape model
    ties every router). Shrunk to small dimensions here: the same generator, the same choices."""
    import numpy as np

    from kimi_jax.model.engine import Engine
    from kimi_jax.storage.checkpoint import open_checkpoint
    from kimi_jax.storage.reader import ShardReader
    from kimi_jax.storage.synth import ROUTED_ACTIVE_TOKENS, synth_checkpoint

    small = dict(vocab_size=ROUTED_ACTIVE_TOKENS + 512, hidden_size=64, intermediate_size=96,
                 moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, q_lora_rank=32,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=32,
                 num_experts_per_tok=4)  # fmt: skip
    picks = {}
    for preset in ("full-shape", "full-shape-routed"):
        idx = open_checkpoint(synth_checkpoint(tmp_path / preset, preset=preset, **small))
        with ShardReader() as reader:
            parts = reader.read_weights([idx.weights["embed_tokens.weight"], idx.weights["layers.1.self_attn.q_a_proj.weight"],
                                         idx.weights["layers.1.mlp.gate.weight"]], layer=None)  # fmt: skip
        embed = parts["embed_tokens.weight"]["weight"].astype(np.float32)
        assert not parts["layers.1.self_attn.q_a_proj.weight"]["weight"].astype(np.float32).any()  # a hole
        assert not embed[ROUTED_ACTIVE_TOKENS:].any()  # past the active rows: holes
        written = preset == "full-shape-routed"
        assert embed[:ROUTED_ACTIVE_TOKENS].any() == written
        assert parts["layers.1.mlp.gate.weight"]["weight"].astype(np.float32).any() == written
        with Engine(idx) as engine:
            steps = engine.generate([3, 500, 4000], 3, kv_cache=True)
        picks[preset] = [[sorted(set(sum(layer.experts, []))) for layer in s.layers if layer.experts] for s in steps]
    flat = [p for step in picks["full-shape"] for p in step]
    assert all(p == flat[0] for p in flat)  # every router ties: the same experts everywhere
    routed = picks["full-shape-routed"]
    assert len({tuple(p) for p in routed[0]}) > 1  # layers pick differently
    assert len({tuple(step[0]) for step in routed}) > 1  # and tokens do
