"""Programs for weights kept in memory: a MoE layer with all its experts, and the whole model.

When the residency budget holds every expert, each MoE layer's experts are stacked once,
``[n_routed_experts, ...]``, and the layer runs as a single jitted call: attention and the router,
then the picked experts gathered from the stack inside the program, then the experts. The host
only learns the picks afterwards (for the byte accounting and the capture). The plan of the
expert stack is the host's (:func:`kimi_jax.model.forward.plan_expert_slots`) computed inside the
program: the same distinct ids in the same order, padded to the same power of two, so the experts
run in the same order on the same values and the result is bitwise the streamed one
(``tests/test_memory_model.py``).

When everything is kept (every layer, every expert, the head), a decode step is one program for
the layers, :func:`whole_model_step` (the same layer functions, traced together), and one for the
head: the host does nothing per layer; it learns the picks of every layer at the end, for the byte
accounting.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kimi_jax.config import ModelConfig
from kimi_jax.model import layers
from kimi_jax.model.params import ExpertStack, MoEBaseParams


def expert_plan_in_program(idx: jax.Array, n_routed_experts: int) -> tuple[jax.Array, jax.Array]:
    """``plan_expert_slots`` with static shapes: ``(stack_ids, slots)`` for picks ``idx`` [T, k].

    ``stack_ids`` are the distinct ids, ascending, padded with the smallest to the next power of two
    of T*k (capped at the expert count): the host's bucket when every pick is distinct, and when
    some repeat the extra padding slots are never referenced, so they are skipped as the host's are.
    """
    flat = idx.reshape(-1)
    n = min(1 << (flat.shape[0] - 1).bit_length(), n_routed_experts)
    distinct = jnp.unique(flat, size=n, fill_value=-1)  # ascending, then -1 padding
    real = distinct >= 0
    stack_ids = jnp.where(real, distinct, jnp.min(flat))
    # slot of a pick = how many distinct ids are smaller than it
    slots = jnp.sum((distinct[None, None, :] < idx[..., None]) & real, axis=-1)
    return stack_ids.astype(jnp.int32), slots.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def resident_moe_layer(cfg: ModelConfig, p: MoEBaseParams, experts: ExpertStack, x: jax.Array,
                       positions: jax.Array, cache: layers.LatentCache | None):  # fmt: skip
    """A whole MoE layer with ``experts`` holding every routed expert in id order: returns
    (x_out, cache, Routing, {norm_in, norm_out}) like :func:`kimi_jax.model.forward.layer_step`."""
    layers.TRACE_COUNTS["resident_moe_layer"] += 1
    h, cache, routing, capture = layers.moe_attention_and_route(cfg, p, x, positions, cache)
    stack_ids, slots = expert_plan_in_program(routing.idx, cfg.n_routed_experts)
    x_out, capture_out = layers.moe_experts(cfg, p, experts, slots, routing.weights_scaled, h, stack_ids)
    return x_out, cache, routing, {**capture, **capture_out}


@functools.partial(jax.jit, static_argnums=0)
def whole_model_step(cfg: ModelConfig, bases: tuple, stacks: tuple, x: jax.Array, positions: jax.Array,
                     caches: tuple):  # fmt: skip
    """Every layer as one program: ``bases[l]`` are layer l's non-expert weights, ``stacks[l]`` all
    its routed experts (None for a dense layer), ``caches[l]`` its latent cache.

    Returns (hidden_last, caches, routings, captures), one routing (None for a dense layer) and one
    capture dict per layer, as the layer-by-layer engine gets them. The head stays a call of its own:
    traced into this program, XLA compiled its product differently (not bitwise the streamed logits)."""
    layers.TRACE_COUNTS["whole_model_step"] += 1
    routings, captures, out_caches = [], [], []
    for base, stack, cache in zip(bases, stacks, caches):
        # Layer boundaries stay what they are between separate calls: XLA does not fuse across a
        # barrier, so each layer (and the head) compiles as it does alone and the result is bitwise
        # the layer-by-layer one (tests/test_memory_model.py).
        x = jax.lax.optimization_barrier(x)
        if stack is None:
            x, cache, capture = layers.dense_layer(cfg, base, x, positions, cache)
            routing = None
        else:
            x, cache, routing, capture = resident_moe_layer(cfg, base, stack, x, positions, cache)
        routings.append(routing)
        captures.append(capture)
        out_caches.append(cache)
    return x[-1], tuple(out_caches), tuple(routings), tuple(captures)


__all__ = ["expert_plan_in_program", "resident_moe_layer", "whole_model_step"]
