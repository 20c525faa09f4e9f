"""kimi_jax.model.layers against transformers' DeepseekV3ForCausalLM (float32) on tiny random models.

Per config: logits at every position (naive attention), greedy tokens over 16 steps, prefill +
absorbed-MLA cached decode against the naive forward, routing invariants, and one trace per stage
shape across layers. Plus unit checks: YaRN frequencies, the router (with group limiting) on its
own, padding slots never used, quantized expert stacks, checkpoint shape errors.
"""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
torch.set_num_threads(2)

from kimi_jax.errors import CheckpointError  # noqa: E402
from kimi_jax.model import layers as M  # noqa: E402
from kimi_jax.model.slots import plan_expert_slots  # noqa: E402
from kimi_jax.model.params import (  # noqa: E402
    RouterParams,
    dense_layer_params,
    expert_stack,
    head_params,
    moe_base_params,
)
from kimi_jax.shapes import checkpoint_shapes  # noqa: E402
from tests import hf_oracle  # noqa: E402
from tests.reference import forward_all, run_layers  # noqa: E402

PROMPT_LEN, NEW_TOKENS, CAPACITY, TOL = 24, 16, 48, 1e-4

CONFIGS = {
    # Kimi-like routing (one group); rope 8 with theta 50: YaRN ramp 0 / 0.5 / 1 / 1.
    "one_group": dict(seed=0),
    # Group limiting (keep 2 of 4 groups), top-4 of 16; rope 16 with ramp 0, 1/3, 2/3, 1, ...;
    # mscale_all_dim != mscale, so the cos/sin attention factor is not 1.
    "grouped": dict(
        seed=1, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, qk_rope_head_dim=16,
        rope=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
                  beta_fast=32.0, beta_slow=0.25, mscale=1.0, mscale_all_dim=0.5),
    ),
    # Two dense layers first, two shared experts, 2 groups keep 1, top-3 of 12.
    "two_dense": dict(
        seed=2, first_k_dense_replace=2, num_hidden_layers=4, n_routed_experts=12, n_group=2, topk_group=1,
        num_experts_per_tok=3, n_shared_experts=2,
    ),
}


def cached_greedy(cfg, tensors, prompt, steps):
    """Engine-like run: prefill into latent caches, then greedy decode one token at a time.

    Returns the generated tokens, the logits after prefill and after each decoded token
    [steps + 1, vocab], every Routing, and TRACE_COUNTS around the first decode step and at the end.
    """
    embed, head = tensors["embed_tokens.weight"], head_params(cfg, tensors)
    caches = M.LatentCache.for_run(cfg, CAPACITY)
    routings = []

    def step(tokens, start):
        x = jnp.asarray(embed[np.asarray(tokens)])
        positions = jnp.arange(start, start + len(tokens), dtype=jnp.int32)
        x = run_layers(cfg, tensors, x, positions, caches, routings)
        return np.asarray(M.final_logits(cfg, head, x[-1]))

    traces = [dict(M.TRACE_COUNTS)]
    logits, tokens = [step(prompt, 0)], []
    traces.append(dict(M.TRACE_COUNTS))
    for s in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(step(tokens[-1:], len(prompt) + s))
        if s == 0:
            traces.append(dict(M.TRACE_COUNTS))
    traces.append(dict(M.TRACE_COUNTS))
    deltas = [{k: b.get(k, 0) - a.get(k, 0) for k in b if b.get(k, 0) != a.get(k, 0)}
              for a, b in zip(traces, traces[1:])]
    lengths = [int(c.length) for c in caches]
    return SimpleNamespace(tokens=tokens, logits=np.stack(logits), routings=routings, lengths=lengths,
                           trace_deltas=dict(zip(("prefill", "first_decode", "later_decodes"), deltas)))


@functools.cache
def run_case(name):
    """Build the HF model for ``name``, run transformers and kimi_jax once; shared by the tests."""
    spec = dict(CONFIGS[name])
    seed = spec.pop("seed")
    hf = hf_oracle.build(seed, **spec)
    # A config no other test uses (``wrapper`` is metadata: same math, its own jit cache entries),
    # so the trace counts below start from nothing.
    cfg = dataclasses.replace(hf_oracle.model_config(hf), wrapper=f"model-parity-{name}")
    tensors = hf_oracle.canonical_tensors(hf)
    prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, PROMPT_LEN).tolist()
    hf_new = hf_oracle.greedy(hf, prompt, NEW_TOKENS)
    seq = prompt + hf_new
    naive = np.asarray(forward_all(cfg, tensors, seq, tensors["embed_tokens.weight"]))
    return SimpleNamespace(
        name=name, hf=hf, cfg=cfg, tensors=tensors, prompt=prompt, hf_new=hf_new, seq=seq,
        hf_logits=hf_oracle.logits(hf, seq), naive=naive,
        cached=cached_greedy(cfg, tensors, prompt, NEW_TOKENS),
    )


@pytest.fixture(params=list(CONFIGS))
def case(request):
    return run_case(request.param)


@pytest.fixture
def one_group():
    """For checks that do not depend on the config."""
    return run_case("one_group")


def test_logits_match_transformers_at_every_position(case):
    diff = np.abs(case.naive - case.hf_logits).max(axis=-1)
    print(f"{case.name}: naive vs transformers max |dlogit| = {diff.max():.3g} "
          f"(logit scale {np.abs(case.hf_logits).max():.3g})")
    assert case.naive.shape == (len(case.seq), case.cfg.vocab_size)
    assert diff.max() < TOL, f"positions over tolerance: {np.nonzero(diff >= TOL)[0].tolist()}"


def test_greedy_tokens_match_transformers(case):
    # Cached decode generated its own tokens; the naive full forward is teacher-forced on HF's.
    assert case.cached.tokens == case.hf_new
    naive_greedy = np.argmax(case.naive[PROMPT_LEN - 1 : -1], axis=-1).tolist()
    assert naive_greedy == case.hf_new
    assert len(set(case.hf_new)) > 1, "degenerate continuation: the model is too trivial to test greedy"


def test_cached_decode_matches_naive_forward(case):
    rows = case.naive[PROMPT_LEN - 1 :]  # predictions after the prompt and after each new token
    assert case.cached.logits.shape == rows.shape
    diff = np.abs(case.cached.logits - rows).max()
    diff_hf = np.abs(case.cached.logits - case.hf_logits[PROMPT_LEN - 1 :]).max()
    print(f"{case.name}: cached vs naive max |dlogit| = {diff:.3g}, cached vs transformers {diff_hf:.3g}")
    assert diff < TOL and diff_hf < TOL
    assert case.cached.lengths == [PROMPT_LEN + NEW_TOKENS] * case.cfg.num_hidden_layers


def test_routing_invariants(case):
    cfg = case.cfg
    assert case.cached.routings
    for r in case.cached.routings:
        idx = np.asarray(r.idx)
        np.testing.assert_allclose(np.asarray(r.weights_norm).sum(-1), 1.0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(r.weights_scaled),
                                   np.asarray(r.weights_norm) * cfg.routed_scaling_factor, rtol=1e-6)
        assert np.all((np.asarray(r.scores) > 0) & (np.asarray(r.scores) < 1))
        assert all(len(set(row)) == cfg.num_experts_per_tok for row in idx.tolist())
        groups = idx // (cfg.n_routed_experts // cfg.n_group)
        assert all(len(set(row)) <= cfg.topk_group for row in groups.tolist())


def test_one_trace_per_stage_shape_across_layers(case):
    cfg, deltas = case.cfg, case.cached.trace_deltas
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    dense = {"dense_layer": 1} if n_moe < cfg.num_hidden_layers else {}
    assert n_moe >= 2
    # Each stage ran for every layer of its kind but was traced once per shape: prefill (T=24)
    # and decode (T=1; the expert stack of a decode step is always the same bucket size).
    assert deltas["prefill"]["moe_attention_and_route"] == 1
    assert deltas["prefill"].get("dense_layer", 0) == dense.get("dense_layer", 0)
    assert deltas["prefill"]["final_logits"] == 1
    assert deltas["first_decode"] == {**dense, "moe_attention_and_route": 1, "moe_experts": 1}
    assert deltas["later_decodes"] == {}, "later decode steps must reuse the compiled programs"


def test_shape_table_declares_exactly_transformers_tensors(case):
    # transformers' state dict (fused experts split per expert) is the oracle: same names, same shapes.
    ours = {name: shape for _, name, shape in checkpoint_shapes(case.cfg)}
    theirs = {name: tuple(array.shape) for name, array in case.tensors.items()}
    assert ours.keys() == theirs.keys(), f"only ours: {sorted(ours.keys() - theirs.keys())[:5]}, " \
                                         f"only transformers': {sorted(theirs.keys() - ours.keys())[:5]}"
    assert ours == theirs


def test_yarn_frequencies_match_transformers(case):
    inv_freq, factor = M.rope_inv_freq(case.cfg)
    rotary = case.hf.model.rotary_emb
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(rotary.attention_scaling, rel=1e-12)
    dim = case.cfg.qk_rope_head_dim
    base = 1.0 / case.cfg.rope_theta ** (np.arange(0, dim, 2) / dim)
    ramp = (base - inv_freq) / (base - base / case.cfg.rope_scaling.factor)  # 0 kept, 1 interpolated
    assert abs(ramp[0]) < 1e-5 and abs(ramp[-1] - 1) < 1e-5
    assert np.any((ramp > 0.01) & (ramp < 0.99)), f"YaRN blend not exercised: {ramp}"
    if case.name == "grouped":
        assert factor != pytest.approx(1.0)


@pytest.mark.parametrize("bias_shift", [0.0, -1.5])
def test_router_matches_transformers_module(case, bias_shift):
    # bias_shift -1.5 makes every biased score negative: transformers masks dropped groups with
    # -inf, so the picks must still come from the kept groups (a 0.0 fill would pick dropped ones).
    cfg, layer = case.cfg, cfg_first_moe(case.cfg)
    gate = case.hf.model.layers[layer].mlp.gate
    x = np.random.default_rng(7).standard_normal((64, cfg.hidden_size)).astype(np.float32)
    bias = gate.e_score_correction_bias.detach().clone()
    try:
        with torch.no_grad():
            gate.e_score_correction_bias.add_(bias_shift)
            _, hf_w, hf_idx = gate(torch.from_numpy(x))
    finally:
        with torch.no_grad():
            gate.e_score_correction_bias.copy_(bias)
    params = moe_base_params(cfg, layer, case.tensors).gate
    params = RouterParams(weight=params.weight, e_score_correction_bias=params.e_score_correction_bias + bias_shift)
    r = M.route(cfg, params, jnp.asarray(x))
    ours_idx, ours_w = np.asarray(r.idx), np.asarray(r.weights_scaled)
    hf_idx, hf_w = hf_idx.numpy(), hf_w.numpy()
    for t in range(len(x)):  # transformers returns top-k unsorted; compare as {expert: weight}
        hf_map = dict(zip(hf_idx[t].tolist(), hf_w[t].tolist()))
        ours_map = dict(zip(ours_idx[t].tolist(), ours_w[t].tolist()))
        assert hf_map.keys() == ours_map.keys(), f"row {t}"
        np.testing.assert_allclose([ours_map[e] for e in hf_map], list(hf_map.values()), rtol=1e-5)


def cfg_first_moe(cfg):
    return next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))


def _moe_inputs(case, t=5):
    cfg, layer = case.cfg, cfg_first_moe(case.cfg)
    base = moe_base_params(cfg, layer, case.tensors)
    h = jnp.asarray(np.random.default_rng(3).standard_normal((t, cfg.hidden_size)).astype(np.float32))
    routing = M.route(cfg, base.gate, M.rms_norm(h, base.post_attention_layernorm, cfg.rms_norm_eps))
    return cfg, layer, base, h, routing


def test_padding_slots_are_never_used(case):
    cfg, layer, base, h, routing = _moe_inputs(case)
    ids, _, slots = plan_expert_slots(np.asarray(routing.idx), cfg.n_routed_experts, bucket=False)
    exact = expert_stack(cfg, layer, ids, case.tensors)
    ref, _ = M.moe_experts(cfg, base, exact, jnp.asarray(slots), routing.weights_scaled, h)
    poison = jax.tree.map(lambda a: np.concatenate([a, np.full((3, *a.shape[1:]), np.nan, a.dtype)]), exact)
    padded, _ = M.moe_experts(cfg, base, poison, jnp.asarray(slots), routing.weights_scaled, h)
    np.testing.assert_array_equal(np.asarray(padded), np.asarray(ref))
    # Bucketed plan: the stack is padded to a power of two by repeating a picked expert, so the
    # padding never needs an expert the router did not pick.
    distinct, ids_b, slots_b = plan_expert_slots(np.asarray(routing.idx), cfg.n_routed_experts)
    assert distinct == ids and ids_b[: len(ids)] == ids and set(ids_b) == set(ids) and np.array_equal(slots_b, slots)
    assert len(ids_b) in (cfg.n_routed_experts, 1 << (len(ids) - 1).bit_length())


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_quantized_expert_stack_matches_dequantized(one_group, kind):
    case = one_group
    from kimi_jax.model.weights import Fp8Weight, Int4Weight
    from kimi_jax.storage import codecs

    cfg, layer, base, h, routing = _moe_inputs(case)
    ids, _, slots = plan_expert_slots(np.asarray(routing.idx), cfg.n_routed_experts, bucket=False)
    quantized, dequantized = {}, {}
    for e in ids:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"layers.{layer}.mlp.experts.{e}.{proj}.weight"
            w = case.tensors[name]
            if kind == "int4":
                packed, scale = codecs.quantize_int4(w, group_size=32)
                q = Int4Weight(packed=packed, scale=scale, in_features=w.shape[1], group_size=32)
            else:
                weight, scale_inv = codecs.quantize_fp8_block(w, block_size=(16, 16))
                q = Fp8Weight(weight=weight, scale_inv=scale_inv, block_size=(16, 16))
            quantized[name] = q
            dequantized[name] = np.asarray(q.dequantize(jnp.float32))
    q_stack = expert_stack(cfg, layer, ids, quantized)
    assert type(q_stack.gate_proj).__name__ in ("Int4Weight", "Fp8Weight")
    assert tuple(q_stack.down_proj.shape) == (len(ids), cfg.hidden_size, cfg.moe_intermediate_size)
    d_stack = expert_stack(cfg, layer, ids, dequantized)
    args = (jnp.asarray(slots), routing.weights_scaled, h)
    got, _ = M.moe_experts(cfg, base, q_stack, *args)
    want, _ = M.moe_experts(cfg, base, d_stack, *args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    # linear() takes a container directly, too.
    x = h
    name = f"layers.{layer}.mlp.experts.{ids[0]}.gate_proj.weight"
    np.testing.assert_allclose(np.asarray(M.linear(x, quantized[name])),
                               np.asarray(M.linear(x, dequantized[name])), rtol=1e-6, atol=1e-6)


def test_bfloat16_forward_is_close_to_float32(one_group):
    case = one_group
    bf = np.asarray(forward_all(case.cfg, case.tensors, case.seq, case.tensors["embed_tokens.weight"],
                                  dtype=jnp.bfloat16))
    assert bf.dtype == np.float32 and np.isfinite(bf).all()
    assert np.abs(bf - case.naive).max() < 0.05 * np.abs(case.naive).max()


def test_checkpoint_shape_errors_name_the_tensor(one_group):
    case = one_group
    cfg, tensors = case.cfg, dict(case.tensors)
    name = "layers.0.self_attn.q_b_proj.weight"
    tensors[name] = tensors[name][:, :-1]
    with pytest.raises(CheckpointError, match=r"q_b_proj.*expected shape \(96, 32\), found \(96, 31\)"):
        dense_layer_params(cfg, 0, tensors)
    del tensors["layers.1.mlp.gate.e_score_correction_bias"]
    with pytest.raises(CheckpointError, match="e_score_correction_bias.*missing"):
        moe_base_params(cfg, 1, tensors)
    with pytest.raises(CheckpointError, match="out of range"):
        expert_stack(cfg, 1, [0, cfg.n_routed_experts], case.tensors)
    with pytest.raises(CheckpointError, match="is a moe layer"):
        dense_layer_params(cfg, 1, case.tensors)
