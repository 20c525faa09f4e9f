"""DeepSeek-V3 / Kimi forward pass as pure JAX functions, one jitted call per layer stage.

A layer is split where the host may have to act (:mod:`kimi_jax.model.step` decides how each layer
runs; when a layer's experts are all in memory, the two MoE halves run inside one program):

* :func:`dense_layer`: a whole dense layer (attention + SwiGLU MLP).
* :func:`moe_attention_and_route`: attention of a MoE layer, then the router. The host reads the
  picked experts from disk (and only those) before the next call.
* :func:`moe_experts`: shared expert + the weighted routed experts from an :class:`ExpertStack`.
* :func:`final_logits`: final norm and lm_head.

Every stage takes ``cfg`` as its first, static argument and returns a ``capture`` dict that is
always computed (the host decides what to keep), so a capturing run and a bare run execute the
same compiled program.

Attention has two modes, chosen by the *structure* of the ``cache`` argument (never by a value):

* ``cache=None``: naive MLA over the whole sequence passed in (positions 0..T-1, causal mask), with
  per-head K/V expanded from the latent. This is the ``kv_cache: false`` mode; each step recomputes
  the sequence. ``None`` comes back as the cache.
* ``cache=LatentCache``: absorbed MLA. The cache holds only ``kv_a_layernorm(c_kv)`` and the rotated
  ``k_pe`` per position; the new tokens are written at ``positions`` and attend to every cached
  position ``<=`` their own. Capacity is fixed, so each decode step reuses one compiled program.

Dtypes follow ``x`` (float32 by default, bfloat16 allowed): matmul inputs are ``x.dtype``, matmuls
accumulate in float32 and round to ``x.dtype``; RMSNorm statistics, softmax, the router, the sum
over routed experts and the logits are float32 (as transformers does, logits aside).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.config import ModelConfig, yarn_mscale
from kimi_jax.model.mesh import over_expert_axis
from kimi_jax.model.params import (
    AttentionParams,
    DenseLayerParams,
    ExpertStack,
    HeadParams,
    MLPParams,
    MoEBaseParams,
    RouterParams,
)
from kimi_jax.model.kernels import kernel_routed_experts
from kimi_jax.model.weights import KERNELS, dot_f32, is_stored, linear_f32, materialize, row_slice

F32 = jnp.float32

# Incremented when a stage is traced (a Python side effect at trace time, not in the program):
# lets callers and tests see that layers of one shape share one compiled program.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


# ------------------------------------------------------------------------------------ primitives


def _mm(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    return dot_f32(spec, a, b).astype(dtype)


def linear(x: jax.Array, w: Any) -> jax.Array:
    """``x @ w.T`` in ``x.dtype`` for an HF ``[out, in]`` weight (:func:`~kimi_jax.model.weights.linear_f32`)."""
    return linear_f32(x, w).astype(x.dtype)


def rms_norm(x: jax.Array, weight: Any, eps: float) -> jax.Array:
    """transformers' RMSNorm: normalize in float32, round to ``x.dtype``, then scale."""
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return materialize(weight, x.dtype) * y.astype(x.dtype)


def swiglu(x: jax.Array, p: MLPParams) -> jax.Array:
    return linear(jax.nn.silu(linear(x, p.gate_proj)) * linear(x, p.up_proj), p.down_proj)


def _last_norm(x: jax.Array) -> jax.Array:
    """L2 norm (float32) of the residual stream at the last position."""
    return jnp.linalg.norm(x[-1].astype(F32))


def _row_norms(x: jax.Array) -> jax.Array:
    """L2 norm (float32) of the residual stream at every row: each sequence's own when the rows are a
    batch of sequences (:class:`BatchedLatentCache`)."""
    return jnp.linalg.norm(x.astype(F32), axis=-1)


# ------------------------------------------------------------------------------------------ RoPE


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rope/2] (float32) and the cos/sin attention factor (kimi-format 4.3).

    Computed as transformers does (``1 / theta**(2i/d)``, float32); with YaRN the ramp between
    ``low = max(floor(corr(beta_fast)), 0)`` and ``high = min(ceil(corr(beta_slow)), d-1)`` blends
    the original frequency (kept below ``low``) with the one divided by ``factor`` (above ``high``).
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(base) ** exponent
    inv_extra = (np.float32(1.0) / pos_freqs).astype(np.float32)
    r = cfg.rope_scaling
    if r is None:
        return inv_extra, 1.0
    inv_inter = (np.float32(1.0) / (np.float32(r.factor) * pos_freqs)).astype(np.float32)

    def corr_dim(rotations: float) -> float:
        return dim * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(r.beta_fast)), 0)
    high = min(math.ceil(corr_dim(r.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = (np.float32(1.0) - ramp).astype(np.float32)
    inv_freq = (inv_inter * (np.float32(1.0) - keep) + inv_extra * keep).astype(np.float32)
    # transformers: mscale(f, mscale) / mscale(f, mscale_all_dim) when both are set, else mscale(f).
    if r.mscale and r.mscale_all_dim:
        factor = yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim)
    else:
        factor = yarn_mscale(r.factor, 1.0)
    return inv_freq, float(factor)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [T, rope/2] of ``positions * inv_freq`` (float32), times the attention factor."""
    inv_freq, factor = rope_inv_freq(cfg)
    angles = positions.astype(F32)[:, None] * jnp.asarray(inv_freq)[None, :]
    return (jnp.cos(angles) * factor).astype(dtype), (jnp.sin(angles) * factor).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` by angle i; the output stays interleaved.

    transformers' ``rope_interleave`` path returns the same rotated pairs de-interleaved (reals
    first); q and k get the same permutation there, so every q.k (and logit) is identical.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.reshape(x.shape)


# ------------------------------------------------------------------------------------------- MLA


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentCache:
    """One layer's absorbed-MLA cache with fixed capacity S.

    ``c_kv`` [S, kv_lora_rank] holds ``kv_a_layernorm(c_kv)``, ``k_pe`` [S, rope] the rotated
    shared key (interleaved pairs); ``length`` (int32 scalar) is how many positions are filled.
    Writes past capacity are not checked inside the program: the host must keep positions < S.
    """

    c_kv: jax.Array
    k_pe: jax.Array
    length: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, capacity: int, dtype=F32) -> LatentCache:
        return cls(
            c_kv=jnp.zeros((capacity, cfg.kv_lora_rank), dtype),
            k_pe=jnp.zeros((capacity, cfg.qk_rope_head_dim), dtype),
            length=jnp.zeros((), jnp.int32),
        )

    @classmethod
    def for_run(cls, cfg: ModelConfig, capacity: int, dtype=F32) -> list[LatentCache]:
        """An empty cache per layer, for ``capacity`` positions (prompt plus tokens to generate)."""
        return [cls.empty(cfg, capacity, dtype) for _ in range(cfg.num_hidden_layers)]

    @property
    def capacity(self) -> int:
        return int(self.c_kv.shape[0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchedLatentCache:
    """The latent caches of B sequences decoding together, one row of the activations each.

    ``c_kv`` [B, S, kv_lora_rank], ``k_pe`` [B, S, rope], ``length`` [B]: sequence b's
    :class:`LatentCache`, padded to the batch's capacity S (positions past a sequence's own are
    never visible to it). Given this cache, attention takes row b of ``x`` as sequence b's next
    token, at ``positions[b]``."""

    c_kv: jax.Array
    k_pe: jax.Array
    length: jax.Array

    @classmethod
    def stack(cls, caches: list[LatentCache]) -> BatchedLatentCache:
        """One layer's caches of several sequences, zero-padded to the largest capacity."""
        capacity = max(c.capacity for c in caches)

        def pad(a: jax.Array) -> jax.Array:
            return jnp.pad(a, ((0, capacity - a.shape[0]), (0, 0)))

        return cls(jnp.stack([pad(c.c_kv) for c in caches]), jnp.stack([pad(c.k_pe) for c in caches]),
                   jnp.stack([c.length for c in caches]))  # fmt: skip

    def join(self, other: BatchedLatentCache) -> BatchedLatentCache:
        """These sequences' caches and ``other``'s, in that row order, padded to the larger capacity."""
        capacity = max(self.c_kv.shape[1], other.c_kv.shape[1])

        def pad(a: jax.Array) -> jax.Array:
            return jnp.pad(a, ((0, 0), (0, capacity - a.shape[1]), (0, 0)))

        return BatchedLatentCache(jnp.concatenate([pad(self.c_kv), pad(other.c_kv)]),
                                  jnp.concatenate([pad(self.k_pe), pad(other.k_pe)]),
                                  jnp.concatenate([self.length, other.length]))  # fmt: skip

    def rows(self, keep: list[int]) -> BatchedLatentCache:
        """The caches of the sequences at rows ``keep`` (finished sequences leave the batch)."""
        index = jnp.asarray(keep, dtype=jnp.int32)
        return BatchedLatentCache(self.c_kv[index], self.k_pe[index], self.length[index])


def _mla_inputs(cfg: ModelConfig, p: AttentionParams, x: jax.Array, positions: jax.Array):
    """q_nope [T,H,nope], rotated q_pe [T,H,rope], normalized c_kv [T,R], rotated k_pe [T,rope]."""
    t, nh, nope = x.shape[0], cfg.num_attention_heads, cfg.qk_nope_head_dim
    c_q = rms_norm(linear(x, p.q_a_proj), p.q_a_layernorm, cfg.latent_norm_eps)
    q = linear(c_q, p.q_b_proj).reshape(t, nh, cfg.qk_head_dim)
    a = linear(x, p.kv_a_proj_with_mqa)
    c_kv = rms_norm(a[:, : cfg.kv_lora_rank], p.kv_a_layernorm, cfg.latent_norm_eps)
    cos, sin = rope_cos_sin(cfg, positions, x.dtype)
    q_pe = apply_rope(q[..., nope:], cos[:, None, :], sin[:, None, :])
    k_pe = apply_rope(a[:, cfg.kv_lora_rank :], cos, sin)
    return q[..., :nope], q_pe, c_kv, k_pe


def _softmax(scores: jax.Array, q_pos: jax.Array, k_pos: jax.Array, dtype) -> jax.Array:
    """Causal (key position <= query position) softmax over the last axis, in float32."""
    visible = k_pos[None, :] <= q_pos[:, None]  # [T, S]
    scores = jnp.where(visible[None], scores, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def _attend_naive(cfg, p: AttentionParams, q_nope, q_pe, c_kv, k_pe, positions) -> jax.Array:
    """Expand per-head K/V from the latent for all T positions; scores q.k over [nope | rope]."""
    t, nh, nope, dt = c_kv.shape[0], cfg.num_attention_heads, cfg.qk_nope_head_dim, c_kv.dtype
    kv = linear(c_kv, p.kv_b_proj).reshape(t, nh, nope + cfg.v_head_dim)
    k = jnp.concatenate([kv[..., :nope], jnp.broadcast_to(k_pe[:, None, :], (t, nh, k_pe.shape[-1]))], -1)
    q = jnp.concatenate([q_nope, q_pe], axis=-1)
    scores = dot_f32("thd,shd->hts", q, k)
    probs = _softmax(scores * cfg.softmax_scale, positions, positions, dt)
    return _mm("hts,shv->thv", probs, kv[..., nope:], dt).reshape(t, nh * cfg.v_head_dim)


def _attend_absorbed(cfg, p: AttentionParams, q_nope, q_pe, cache: LatentCache, positions) -> jax.Array:
    """Attend over the latent cache: W_UK folded into q, W_UV applied after the softmax."""
    t, nh, nope, dt = q_nope.shape[0], cfg.num_attention_heads, cfg.qk_nope_head_dim, q_nope.dtype
    w_kv = materialize(p.kv_b_proj, dt).reshape(nh, nope + cfg.v_head_dim, cfg.kv_lora_rank)
    c_kv, k_pe = cache.c_kv.astype(dt), cache.k_pe.astype(dt)
    q_lat = _mm("thd,hdr->thr", q_nope, w_kv[:, :nope], dt)
    scores = dot_f32("thr,sr->hts", q_lat, c_kv)
    scores += dot_f32("thp,sp->hts", q_pe, k_pe)
    k_pos = jnp.arange(cache.capacity, dtype=positions.dtype)
    probs = _softmax(scores * cfg.softmax_scale, positions, k_pos, dt)
    o_lat = _mm("hts,sr->thr", probs, c_kv, dt)
    return _mm("thr,hvr->thv", o_lat, w_kv[:, nope:], dt).reshape(t, nh * cfg.v_head_dim)


def _attend_each_row(cfg, p: AttentionParams, q_nope, q_pe, c_kv, k_pe, cache: BatchedLatentCache,
                     positions) -> tuple[jax.Array, BatchedLatentCache]:  # fmt: skip
    """Row b is sequence b's next token: written into its own cache at ``positions[b]``, then
    attending over that cache alone (absorbed attention, one sequence at a time under ``vmap``)."""

    def one(q_nope, q_pe, c_kv, k_pe, c_cache, k_cache, length, position):
        row = LatentCache(
            c_kv=jax.lax.dynamic_update_slice(c_cache, c_kv[None].astype(c_cache.dtype), (position, 0)),
            k_pe=jax.lax.dynamic_update_slice(k_cache, k_pe[None].astype(k_cache.dtype), (position, 0)),
            length=jnp.maximum(length, position + 1).astype(jnp.int32),
        )
        out = _attend_absorbed(cfg, p, q_nope[None], q_pe[None], row, position[None])
        return out[0], row.c_kv, row.k_pe, row.length

    out, c_all, k_all, lengths = jax.vmap(one)(q_nope, q_pe, c_kv, k_pe, cache.c_kv, cache.k_pe, cache.length,
                                               positions)  # fmt: skip
    return out, BatchedLatentCache(c_all, k_all, lengths)


def mla(cfg: ModelConfig, p: AttentionParams, x: jax.Array, positions: jax.Array,
        cache: LatentCache | BatchedLatentCache | None):  # fmt: skip
    """Multi-head latent attention of normalized ``x`` [T, hidden]; returns (out, cache). With a
    :class:`BatchedLatentCache` the rows are B sequences' next tokens, each attending over its own cache."""
    q_nope, q_pe, c_kv, k_pe = _mla_inputs(cfg, p, x, positions)
    if cache is None:
        out = _attend_naive(cfg, p, q_nope, q_pe, c_kv, k_pe, positions)
    elif isinstance(cache, BatchedLatentCache):
        out, cache = _attend_each_row(cfg, p, q_nope, q_pe, c_kv, k_pe, cache, positions)
    else:
        start = positions[0]
        cache = LatentCache(
            c_kv=jax.lax.dynamic_update_slice(cache.c_kv, c_kv.astype(cache.c_kv.dtype), (start, 0)),
            k_pe=jax.lax.dynamic_update_slice(cache.k_pe, k_pe.astype(cache.k_pe.dtype), (start, 0)),
            length=jnp.maximum(cache.length, positions[-1] + 1).astype(jnp.int32),
        )
        out = _attend_absorbed(cfg, p, q_nope, q_pe, cache, positions)
    return linear(out, p.o_proj), cache


# ---------------------------------------------------------------------------------------- router


class Routing(NamedTuple):
    idx: jax.Array  # int32 [T, k] expert ids, best first (by biased score; ties to the lower id)
    weights_norm: jax.Array  # f32 [T, k] selected sigmoid scores, renormalized if norm_topk_prob
    scores: jax.Array  # f32 [T, k] raw sigmoid scores of the selected experts
    weights_scaled: jax.Array  # f32 [T, k] weights_norm * routed_scaling_factor (used to combine)


def route(cfg: ModelConfig, gate: RouterParams, x: jax.Array) -> Routing:
    """noaux_tc sigmoid router on normalized ``x`` [T, hidden], float32 throughout."""
    t, e, k = x.shape[0], cfg.n_routed_experts, cfg.num_experts_per_tok
    scores = jax.nn.sigmoid(linear(x.astype(F32), gate.weight))  # [T, E]
    choice = scores + materialize(gate.e_score_correction_bias, F32)
    if cfg.n_group > 1:
        # transformers: group score = sum of the top-2 biased scores; keep topk_group groups and
        # set every expert of the other groups to -inf (the DeepSeek remote code uses 0.0).
        grouped = choice.reshape(t, cfg.n_group, e // cfg.n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [T, G]
        _, keep = jax.lax.top_k(group_scores, cfg.topk_group)
        kept = jnp.any(keep[..., None] == jnp.arange(cfg.n_group), axis=1)  # [T, G]
        choice = jnp.where(jnp.repeat(kept, e // cfg.n_group, axis=-1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, k)
    picked = jnp.take_along_axis(scores, idx, axis=-1)
    weights = picked / (picked.sum(-1, keepdims=True) + 1e-20) if cfg.norm_topk_prob else picked
    return Routing(idx.astype(jnp.int32), weights, picked, weights * cfg.routed_scaling_factor)


# ---------------------------------------------------------------------------------------- experts


# Stored-weight experts for at most this many picks (T x k) run as an unrolled loop: with one token
# to decode (8 picks for top-8) that is a plain sequence of small matmuls, where the scan's loop
# carries and a gathered copy of the picked experts cost more than the matmuls themselves. Decided by
# the picks, not the stack: the host's stack and the in-memory one differ in padding, never in form.
UNROLLED_SLOTS = 16


def routed_experts(experts: ExpertStack, slots: jax.Array, weights: jax.Array, x: jax.Array,
                   stack_ids: jax.Array | None = None) -> jax.Array:  # fmt: skip
    """``sum_k weights[t,k] * Expert_{slots[t,k]}(x[t])`` (float32) over a stack of n experts; with
    weights meeting the kernels, one kernel call where it takes the stack.

    Slot ``j`` holds ``experts[j]``, or with ``stack_ids`` [n] (a stack of every expert kept in
    memory) ``experts[stack_ids[j]]``, indexed in place. Slots are summed in order. A stack of
    weights meeting the stored-precision product for at most :data:`UNROLLED_SLOTS` picks runs as an
    unrolled loop (padding slots add zeros). Any other stack is scanned one expert at a time (so a
    quantized stack is dequantized one expert at a time), and every slot no token references is
    skipped with a real conditional: padding slots are never computed, whatever they hold. A
    referenced expert runs on all T rows and keeps its own.
    """
    if getattr(experts.gate_proj, "matmul", None) == KERNELS:  # the whole sum in one kernel call, where it takes it
        y = kernel_routed_experts(experts, slots, weights, x, stack_ids)
        if y is not None:
            return y
    n = experts.gate_proj.shape[0] if stack_ids is None else stack_ids.shape[0]
    hit = slots[..., None] == jnp.arange(n, dtype=slots.dtype)  # [T, k, n]
    combine = jnp.sum(jnp.where(hit, weights.astype(F32)[..., None], 0.0), axis=1).T  # [n, T]
    used = jnp.any(hit, axis=1).T  # [n, T]

    def add_expert(acc, gate, up, down, c, u):
        y = swiglu(x, MLPParams(gate_proj=gate, up_proj=up, down_proj=down)).astype(F32)
        return acc + jnp.where(u[:, None], y * c[:, None], 0.0)

    acc = jnp.zeros(x.shape, F32)
    if is_stored(experts.gate_proj) and slots.size <= UNROLLED_SLOTS:
        # Always a dynamic index (slot j of the host's stack is index j, kept from being folded into a
        # static slice): XLA compiles a dot on a static slice differently, and the two must agree bitwise.
        ids = stack_ids if stack_ids is not None else jax.lax.optimization_barrier(jnp.arange(n, dtype=jnp.int32))
        for j in range(n):
            expert = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, ids[j], 0, False), experts)
            acc = add_expert(acc, expert.gate_proj, expert.up_proj, expert.down_proj, combine[j], used[j])
        return acc
    if stack_ids is not None:
        experts = jax.tree_util.tree_map(lambda a: jnp.take(a, stack_ids, axis=0), experts)

    def one_expert(acc, xs):
        return jax.lax.cond(jnp.any(xs[-1]), lambda acc: add_expert(acc, *xs), lambda acc: acc, acc), None

    acc, _ = jax.lax.scan(one_expert, acc, (experts.gate_proj, experts.up_proj, experts.down_proj, combine, used))
    return acc


# -------------------------------------------------------------------------------------- the stages


def _attention_residual(cfg: ModelConfig, p: DenseLayerParams | MoEBaseParams, x: jax.Array,
                        positions: jax.Array, cache: LatentCache | None):
    """The attention half every layer shares: ``x + MLA(input_layernorm(x))``; returns (h, cache)."""
    with jax.named_scope("attention"):
        attn, cache = mla(cfg, p.self_attn, rms_norm(x, p.input_layernorm, cfg.rms_norm_eps), positions, cache)
        return x + attn, cache


@functools.partial(jax.jit, static_argnums=0)
def dense_layer(cfg: ModelConfig, p: DenseLayerParams, x: jax.Array, positions: jax.Array,
                cache: LatentCache | None):
    """Dense layer: returns (x_out, cache, {norm_in, norm_out})."""
    TRACE_COUNTS["dense_layer"] += 1
    h, cache = _attention_residual(cfg, p, x, positions, cache)
    with jax.named_scope("mlp"):
        x_out = h + swiglu(rms_norm(h, p.post_attention_layernorm, cfg.rms_norm_eps), p.mlp)
    return x_out, cache, {"norm_in": _last_norm(x), "norm_out": _last_norm(x_out), "norms_in": _row_norms(x),
                          "norms_out": _row_norms(x_out)}  # fmt: skip


@functools.partial(jax.jit, static_argnums=0)
def moe_attention_and_route(cfg: ModelConfig, p: MoEBaseParams, x: jax.Array, positions: jax.Array,
                            cache: LatentCache | None):
    """Attention half of a MoE layer plus routing: returns (h, cache, Routing, {norm_in})."""
    TRACE_COUNTS["moe_attention_and_route"] += 1
    h, cache = _attention_residual(cfg, p, x, positions, cache)
    with jax.named_scope("router"):
        routing = route(cfg, p.gate, rms_norm(h, p.post_attention_layernorm, cfg.rms_norm_eps))
    return h, cache, routing, {"norm_in": _last_norm(x), "norms_in": _row_norms(x)}


@functools.partial(jax.jit, static_argnums=0)
def moe_experts(cfg: ModelConfig, p: MoEBaseParams, experts: ExpertStack, slots: jax.Array,
                weights_scaled: jax.Array, h: jax.Array, stack_ids: jax.Array | None = None):
    """FFN half of a MoE layer: ``h + routed(hn) + shared(hn)``; returns (x_out, {norm_out}).

    ``slots`` [T, k] index each selected expert within ``experts`` (see
    :func:`kimi_jax.model.slots.plan_expert_slots`), or within ``stack_ids`` when ``experts``
    holds every expert (see :func:`routed_experts`).
    """
    TRACE_COUNTS["moe_experts"] += 1
    hn = rms_norm(h, p.post_attention_layernorm, cfg.rms_norm_eps)
    with jax.named_scope("routed_experts"):
        routed = functools.partial(routed_experts, stack_ids=stack_ids)
        ffn = over_expert_axis(routed)(experts, slots, weights_scaled, hn).astype(h.dtype)
    if p.shared_experts is not None:
        with jax.named_scope("shared_expert"):
            ffn = ffn + swiglu(hn, p.shared_experts)
    x_out = h + ffn
    return x_out, {"norm_out": _last_norm(x_out), "norms_out": _row_norms(x_out)}


# Rows of the lm_head per logits call when it is widened: 16384 x 7168 BF16 is 235 MB, 470 MB widened.
HEAD_CHUNK_ROWS = 16384


@functools.partial(jax.jit, static_argnums=0)
def final_logits(cfg: ModelConfig, head: HeadParams, x_last: jax.Array) -> jax.Array:
    """Final RMSNorm and lm_head: [hidden] -> float32 [vocab] (also [T, hidden] -> [T, vocab]).

    The logits leave the float32 accumulator unrounded in every compute dtype: bfloat16 logits
    (8 significant bits) would tie the top tokens far more often than the arithmetic requires."""
    TRACE_COUNTS["final_logits"] += 1
    with jax.named_scope("head"):
        return linear_f32(rms_norm(x_last, head.norm, cfg.rms_norm_eps), head.lm_head)


def head_logits(cfg: ModelConfig, head: HeadParams, x_last: jax.Array) -> jax.Array:
    """:func:`final_logits` in vocabulary chunks of :data:`HEAD_CHUNK_ROWS` rows when the head is
    widened, so the head (2.3 GB in BF16 for Kimi) is never widened to float32 whole, only a chunk at
    a time; a head meeting the stored-precision product is never widened, so it is one call."""
    vocab = head.lm_head.shape[0]
    if is_stored(head.lm_head) or vocab <= HEAD_CHUNK_ROWS:
        return final_logits(cfg, head, x_last)
    rows = range(0, vocab, HEAD_CHUNK_ROWS)
    return jnp.concatenate([final_logits(cfg, HeadParams(head.norm, row_slice(head.lm_head, i, i + HEAD_CHUNK_ROWS)),
                                         x_last) for i in rows], axis=-1)  # fmt: skip


__all__ = [
    "linear", "rms_norm", "swiglu", "rope_inv_freq", "rope_cos_sin", "apply_rope", "LatentCache", "BatchedLatentCache",
    "mla", "Routing", "route", "routed_experts", "dense_layer", "moe_attention_and_route",
    "moe_experts", "final_logits", "head_logits", "HEAD_CHUNK_ROWS", "UNROLLED_SLOTS", "TRACE_COUNTS",
]
