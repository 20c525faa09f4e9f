"""The streaming engine: bytes, compile counts, bounded memory, and errors before compute."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.config import parse_model_config
from kimi_jax.errors import ManifestError
from kimi_jax.model import layers as model
from kimi_jax.model.engine import Engine
from kimi_jax.model.params import expert_stack, head_params, layer_params
from kimi_jax.manifest import parse_manifest_dict
from kimi_jax.run.plan import prepare_run
from kimi_jax.shapes import checkpoint_shapes
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.synth import config_json, logical_value, synth_checkpoint


def test_single_token_step_reads_exactly_the_predicted_bytes(tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    bos = idx.config.bos_token_id
    with Engine(idx) as engine:
        (step,) = engine.generate([bos], 1, kv_cache=False)
    assert step.bytes_read == idx.predicted_bytes_per_token()
    for rec in step.layers:
        lm = idx.layers[rec.layer]
        picked = set(np.asarray(rec.experts).ravel()) if rec.experts else set()
        assert rec.bytes_read == lm.base_bytes + sum(lm.expert_bytes(e) for e in picked)
        if lm.kind == "moe":
            assert len(picked) == idx.config.num_experts_per_tok


def test_longer_context_reads_each_picked_expert_once(tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    with Engine(idx) as engine:
        steps = engine.generate([5, 9, 400, 5, 77], 2, kv_cache=False)
    for step in steps:
        for rec in step.layers:
            if rec.kind == "moe":
                picked = {e for row in rec.experts for e in row}
                assert len(picked) > idx.config.num_experts_per_tok  # positions disagree: dedup matters
                assert rec.bytes_read == idx.layers[rec.layer].base_bytes + sum(
                    idx.layers[rec.layer].expert_bytes(e) for e in picked)  # fmt: skip
        assert step.bytes_read == sum(step.bytes_per_layer.values())


def test_prefetch_does_not_change_results(tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2-fp8"])
    runs = []
    for prefetch in (True, False):
        with Engine(idx, prefetch=prefetch) as engine:
            runs.append(engine.generate([1, 2, 3], 3, kv_cache=False))
    for a, b in zip(*runs):
        assert a.token == b.token and a.bytes_read == b.bytes_read
        assert a.logits.tobytes() == b.logits.tobytes() and a.hidden.tobytes() == b.hidden.tobytes()


def test_kv_cache_and_full_recompute_agree(tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["deepseek-v3"])
    with Engine(idx) as engine:
        full = engine.generate([10, 20, 30], 6, kv_cache=False)
        cached = engine.generate([10, 20, 30], 6, kv_cache=True)
    assert [s.token for s in full] == [s.token for s in cached]
    assert max(float(np.abs(a.logits - b.logits).max()) for a, b in zip(full, cached)) < 1e-4
    # decoding with the cache reads each layer once per token, never the whole context's experts
    assert all(s.context == full[i].context for i, s in enumerate(cached))


def test_compiles_once_per_stage_and_shape_not_per_layer(synth_dir):
    ckpt = synth_checkpoint(synth_dir / "compile-9", "tiny", "kimi-k2.5", num_hidden_layers=9)
    idx = open_checkpoint(ckpt)
    jax.clear_caches()
    model.TRACE_COUNTS.clear()
    with Engine(idx) as engine:
        engine.generate([idx.config.bos_token_id], 4, kv_cache=True)
    counts = dict(model.TRACE_COUNTS)
    # prefill (T=1, empty cache) and decode share shapes here: one program per stage
    assert counts == {"dense_layer": 1, "moe_attention_and_route": 1, "moe_experts": 1, "final_logits": 1}, counts


RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from kimi_jax.storage.checkpoint import open_checkpoint
    from kimi_jax.model.engine import Engine
    idx = open_checkpoint(sys.argv[1])
    with Engine(idx) as engine:
        steps = engine.generate([1, 2, 3], 2, kv_cache=False)
    print(json.dumps({"rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "bytes": sum(s.bytes_read for s in steps)}))
""")


def test_peak_memory_does_not_grow_with_layer_count(synth_dir):
    dims = dict(hidden_size=1024, intermediate_size=1024, moe_intermediate_size=256, q_lora_rank=256,
                kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=8,
                num_experts_per_tok=2, vocab_size=1024)  # fmt: skip
    results = {}
    for layers in (4, 16):
        ckpt = synth_checkpoint(synth_dir / f"rss-{layers}", "tiny", "kimi-k2.5", num_hidden_layers=layers, **dims)
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(ckpt)], capture_output=True, text=True, check=True)
        results[layers] = json.loads(out.stdout.strip().splitlines()[-1])
    idx = open_checkpoint(synth_dir / "rss-16")
    layer_bytes = max(l.total_bytes for l in idx.layers)
    extra_layers_bytes = sum(l.total_bytes for l in idx.layers[4:])
    grew = (results[16]["rss_kib"] - results[4]["rss_kib"]) * 1024
    assert results[16]["bytes"] > 3 * results[4]["bytes"]  # it really streamed four times the layers
    # Holding the 12 extra layers would add at least their on-disk size; streaming adds ~nothing.
    assert grew < min(3 * layer_bytes, extra_layers_bytes / 3), (grew, layer_bytes, extra_layers_bytes)


def _manifest(tmp_path, ckpt, **extra):
    data = {"version": 1, "model": {"checkpoint": str(ckpt)}, "prompt": {"tokens": [1, 2]},
            "output": {"dir": str(tmp_path / "out")}}  # fmt: skip
    for key, value in extra.items():
        data[key] = value
    return parse_manifest_dict(data, source=str(tmp_path / "m.yaml"))


def test_context_beyond_max_position_embeddings(tiny_checkpoints, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path / "ckpt")
    raw = json.loads((ckpt / "config.json").read_text())
    raw["text_config"]["max_position_embeddings"] = 8
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"generate.max_new_tokens: prompt \(2 tokens\) \+ max_new_tokens \(7\) = 9 "
                                            r"positions exceeds max_position_embeddings 8"):  # fmt: skip
        prepare_run(_manifest(tmp_path, ckpt, generate={"max_new_tokens": 7}))
    prepare_run(_manifest(tmp_path, ckpt, generate={"max_new_tokens": 6}))


def test_config_tensor_mismatch_reported_with_manifest_field(tiny_checkpoints, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path / "ckpt")
    raw = json.loads((ckpt / "config.json").read_text())
    raw["text_config"]["moe_intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError) as e:
        prepare_run(_manifest(tmp_path, ckpt))
    assert "model.checkpoint" in str(e.value) and "mlp.experts.0.gate_proj.weight" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_chunked_head_gives_the_same_logits(tiny_checkpoints, monkeypatch):
    from kimi_jax.model import layers as layers_mod

    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    with Engine(idx) as engine:
        whole = engine.generate([5, 6], 2, kv_cache=True)
    monkeypatch.setattr(layers_mod, "HEAD_CHUNK_ROWS", 300)  # 2048 rows: 6 full chunks and a short one
    with Engine(idx) as engine:
        chunked = engine.generate([5, 6], 2, kv_cache=True)
    assert [s.token for s in whole] == [s.token for s in chunked]
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)
        assert a.bytes_read == b.bytes_read


def test_corrupt_weight_shape_is_named_when_read(tiny_checkpoints, tmp_path):
    from kimi_jax.errors import CheckpointError

    ckpt = shutil.copytree(tiny_checkpoints["kimi-k2.5"], tmp_path / "ckpt")
    idx = open_checkpoint(ckpt)
    for projs in idx.layers[1].experts:  # every expert of layer 1, so whichever the router picks
        rec = projs["down_proj"].parts["weight_shape"]
        with open(rec.shard, "r+b") as f:
            f.seek(rec.offset)
            f.write(np.array([7, 7], dtype=np.int32).tobytes())
    with Engine(open_checkpoint(ckpt)) as engine, pytest.raises(CheckpointError) as e:
        engine.generate([1, 2], 1, kv_cache=False)
    assert "down_proj.weight_shape holds [7, 7]" in str(e.value) and "imply [128, 64]" in str(e.value)
    assert "model-00002-of-000007.safetensors" in str(e.value)


def test_prompt_text_needs_a_tokenizer(tiny_checkpoints, tmp_path):
    data = {"version": 1, "model": {"checkpoint": str(tiny_checkpoints["deepseek-v3"])}, "prompt": {"text": "hello"},
            "output": {"dir": str(tmp_path / "out")}}  # fmt: skip
    with pytest.raises(ManifestError, match=r"prompt.text: the checkpoint .* ships no tokenizer \(tiktoken.model or "
                                            r"tokenizer.json\); give the prompt as prompt.tokens"):  # fmt: skip
        prepare_run(parse_manifest_dict(data, source=str(tmp_path / "m.yaml")))


def test_profiles_name_the_model_stages():
    """Each stage's operations sit in named scopes, so a profile (or HLO dump) reads as the model does."""
    cfg = parse_model_config(config_json("tiny", "hf-bf16"))
    tensors = {name: logical_value(0, name, shape) for layer, name, shape in checkpoint_shapes(cfg) if layer in (None, 0, 1)}
    x, pos = jnp.ones((3, cfg.hidden_size)), jnp.arange(3, dtype=jnp.int32)
    k = cfg.num_experts_per_tok
    slots, weights = jnp.zeros((3, k), jnp.int32), jnp.full((3, k), 1.0 / k)

    def scopes(stage, *args) -> set[str]:
        text = stage.lower(cfg, *args).as_text(debug_info=True)
        return set(re.findall(r'loc\("jit\(\w+\)/(\w+)/', text))

    assert {"attention", "mlp"} <= scopes(model.dense_layer, layer_params(cfg, 0, tensors), x, pos, None)
    moe = layer_params(cfg, 1, tensors)
    assert {"attention", "router"} <= scopes(model.moe_attention_and_route, moe, x, pos, None)
    experts = expert_stack(cfg, 1, [0, 1], tensors)
    assert {"routed_experts", "shared_expert"} <= scopes(model.moe_experts, moe, experts, slots, weights, x)
    assert "head" in scopes(model.final_logits, head_params(cfg, tensors), x[-1])


def test_engine_from_plan_and_per_layer_callback(tiny_checkpoints, tmp_path):
    plan = prepare_run(_manifest(tmp_path, tiny_checkpoints["kimi-k2.5"], compute={"dtype": "bfloat16"},
                                 storage={"prefetch": False, "io_retries": 5, "resident_bytes": 0}))  # fmt: skip
    calls = []
    with Engine.from_plan(plan, keep_capture=False) as engine:
        assert (engine.dtype, engine.prefetch, engine.reader.retries) == (jnp.bfloat16, False, 5)
        steps = engine.generate(list(plan.prompt), 2, kv_cache=False, on_layer=lambda *args: calls.append(args))
    n_layers = plan.index.config.num_hidden_layers
    assert [(step, layer) for step, layer, _ in calls] == [(s, i) for s in range(2) for i in range(n_layers)]
    for s, step in enumerate(steps):
        so_far = [nbytes for i, _, nbytes in calls if i == s]
        assert so_far == sorted(so_far) and 0 < so_far[0] and so_far[-1] <= step.bytes_read
        assert all(rec.norm_in is None and rec.experts is None for rec in step.layers)  # keep_capture=False
