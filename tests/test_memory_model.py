"""The memory model end to end: whatever the residency budget, expert cache or speculation, a run
computes the same tokens, digests and bytes used; only where the bytes come from changes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kimi_jax.ledger.ledger import tensor_digest
from kimi_jax.model.engine import Engine
from kimi_jax.run.runner import run_manifest
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.residency import plan_residency
from kimi_jax.verify.checklist import verify_bundle

PROMPT = [1792, 5, 9]


def _identity(steps) -> list[tuple]:
    return [(s.token, tensor_digest(s.hidden), tensor_digest(s.logits), s.bytes_read,
             [layer.bytes_read for layer in s.layers]) for s in steps]  # fmt: skip


def _generate(idx, budget: int, **engine_args):
    with Engine(idx, residency=plan_residency(idx, budget), **engine_args) as engine:
        return engine.generate(PROMPT, 4, kv_cache=True)


@pytest.fixture(scope="module")
def k25(tiny_checkpoints):
    return open_checkpoint(tiny_checkpoints["kimi-k2.5"])


@pytest.fixture(scope="module")
def streamed(k25):
    return _generate(k25, 0)


@pytest.fixture(scope="module")
def streamed_stored(k25):
    return _generate(k25, 0, matmul="stored")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_whole_model_program_is_bitwise_the_layer_by_layer_run(k25, dtype, streamed, streamed_stored):
    """Everything fits: after the first step (which reads it all) each decode step is one program
    (kimi_jax.model.step.whole_model_step). Its tokens, logits, hidden state, bytes used and
    routing are bitwise those of streaming every weight, whichever matmul path."""
    from kimi_jax.model import layers

    for matmul, reference in (("widened", streamed), ("stored", streamed_stored)):
        if dtype == "bfloat16":
            reference = _generate(k25, 0, matmul=matmul, dtype=dtype)
        before = layers.TRACE_COUNTS["whole_model_step"]
        with Engine(k25, dtype, matmul=matmul, residency=plan_residency(k25, 1 << 40)) as engine:
            steps = engine.generate(PROMPT, 4, kv_cache=True)
            assert engine.source.fused_ready()
        assert layers.TRACE_COUNTS["whole_model_step"] > before or dtype == "bfloat16"  # (traced once per settings)
        assert _identity(steps) == _identity(reference), (matmul, dtype)
        assert [[layer.experts for layer in s.layers] for s in steps] == [[layer.experts for layer in s.layers] for s in reference]
        assert [[(layer.norm_in, layer.norm_out) for layer in s.layers] for s in steps] == [
            [(layer.norm_in, layer.norm_out) for layer in s.layers] for s in reference]


@pytest.mark.parametrize("settings", [
    {"budget": 1 << 40},  # everything fits: loaded once
    {"budget": "bases+experts/4", "expert_cache": "lru", "speculate": True},
    {"budget": "bases+experts/4", "expert_cache": "lfu"},
])  # fmt: skip
def test_same_tokens_digests_and_bytes_used_whatever_is_resident(k25, streamed, settings):
    settings = dict(settings)
    budget = settings.pop("budget")
    if budget == "bases+experts/4":  # every base, the head, and room for a quarter of the experts
        plan_all = plan_residency(k25, 1 << 40)
        experts = sum(lm.total_bytes - lm.base_bytes for lm in k25.layers)
        budget = plan_all.pinned_bytes + experts // 4
    steps = _generate(k25, budget, **settings)
    assert _identity(steps) == _identity(streamed)
    for s in steps + streamed:
        assert s.io.used == s.bytes_read == s.io.from_memory + s.io.from_storage + s.io.from_speculation
        for layer in s.layers:
            assert layer.io.used == layer.io.from_memory + layer.io.from_storage + layer.io.from_speculation
    assert all(s.io.from_memory == 0 for s in streamed)
    assert steps[0].io.from_memory == 0  # nothing is resident before it is first read
    assert all(s.io.from_memory > 0 for s in steps[1:])
    if budget == 1 << 40:  # the whole model is read in the first step; then only the new token's embedding row
        experts = sum(lm.total_bytes - lm.base_bytes for lm in k25.layers)
        assert steps[0].io.from_storage + steps[0].io.preloaded == sum(lm.total_bytes for lm in k25.layers) + sum(
            w.nbytes for w in k25.head.values()) + len(set(PROMPT)) * k25.embed_row_bytes()
        assert 0 < steps[0].io.preloaded < experts
        assert [s.io.from_storage for s in steps[1:]] == [k25.embed_row_bytes()] * 3
        assert all(s.io.preloaded == 0 for s in steps[1:])


def test_speculation_is_counted_and_mispredictions_cost_only_bytes(k25, streamed):
    quiet, ahead = streamed, _generate(k25, 0, speculate=True)
    assert _identity(ahead) == _identity(quiet)
    moe = [layer.io for s in ahead for layer in s.layers if layer.kind == "moe"]
    assert sum(io.experts_predicted for io in moe) > 0
    assert all(io.experts_predicted_used <= min(io.experts_predicted, io.experts_used) for io in moe)
    assert sum(io.from_speculation for io in moe) > 0  # some predictions were right and read ahead
    assert all(io.experts_predicted == 0 and io.from_speculation == 0 for s in quiet for io in (l.io for l in s.layers))
    # the reads ahead replace reads on demand byte for byte
    for a, b in zip(ahead, quiet):
        assert a.io.from_storage + a.io.from_speculation == b.io.from_storage


def test_stored_precision_matmuls_agree_with_widened_within_float32_rounding(k25, streamed):
    stored = _generate(k25, 0, matmul="stored")
    assert [s.token for s in stored] == [s.token for s in streamed]
    for a, b in zip(stored, streamed):
        assert a.bytes_read == b.bytes_read
        np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5 * float(np.abs(b.logits).max()))


def test_run_ledger_records_the_sources_and_verifies(tmp_path):
    """A run with budget auto through the CLI path: bare and instrumented agree, the ledger adds up,
    and verify's continuity check enforces the byte identities."""
    out = tmp_path / "bundle"
    run_manifest("manifests/demo.yaml", ["storage.resident_bytes=auto"], str(out), echo=lambda *_: None,
                 progress=False)  # fmt: skip
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["ledger_version"] == 2 and ledger["run"]["residency"]["budget_bytes"] > 0
    steps = ledger["steps"]
    assert steps[0]["bytes_from_memory"] == 0 and steps[1]["bytes_from_memory"] > 0
    assert steps[1]["expert_hit_rate"] > 0
    report = verify_bundle(out)
    assert report.ok, report
    # break the identity in one layer: continuity names it
    steps[1]["layers"][2]["bytes_from_memory"] += 1
    (out / "ledger.json").write_text(json.dumps(ledger))
    reason = verify_bundle(out).reason("continuity")
    assert "steps[1].layers[2]: bytes_from_memory + bytes_from_storage + bytes_from_speculation" in reason


def test_bfloat16_decodes_with_the_kv_cache(k25):
    """XLA's CPU dot has no bf16 x bf16 -> f32 kernel for some batched contractions of the absorbed
    attention (it failed with UNIMPLEMENTED); decoding in bfloat16 with the cache now runs and picks
    the tokens the bfloat16 recompute picks."""
    with Engine(k25, "bfloat16", matmul="stored") as engine:
        cached = engine.generate(PROMPT, 3, kv_cache=True)
        recomputed = engine.generate(PROMPT, 3, kv_cache=False)
    assert [s.token for s in cached] == [s.token for s in recomputed]


def test_whole_model_program_bare_and_instrumented_agree(tmp_path, monkeypatch):
    """With the KV cache and everything in memory the decode steps are the whole-model program; the
    bare run (which fetches only the picks) and the instrumented run still prove identical, and the
    bundle verifies."""
    calls = []
    whole = Engine._forward_fused
    monkeypatch.setattr(Engine, "_forward_fused", lambda self, *a: calls.append(self.keep_capture) or whole(self, *a))
    out = tmp_path / "bundle"
    run_manifest("manifests/demo.yaml", ["storage.resident_bytes=auto", "generate.kv_cache=true"], str(out),
                 prove="all", echo=lambda *_: None, progress=False)  # fmt: skip
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["run"]["kv_cache"] is True and ledger["run"]["residency"]["page_cache"] == "keep"
    assert ledger["non_perturbation"]["identical"] is True
    assert all(s["bytes_from_storage"] < s["bytes_read"] for s in ledger["steps"][1:])
    assert calls == [False] * 4 + [True] * 4  # steps 1-4 of the bare run, then of the instrumented one
    assert verify_bundle(out).ok
