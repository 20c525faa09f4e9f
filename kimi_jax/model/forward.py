"""One decoder layer as the host runs it, and the in-memory forward pass built from it.

:func:`layer_step` is the only place that knows how a layer of each kind is run: a dense layer is
one jitted call; a MoE layer is attention and the router, then the host plans which experts the
picks need and asks ``fetch_experts`` for them, then the experts. Where the experts come from is
the caller's business: the streaming engine reads them from disk (only the distinct ones picked),
the in-memory reference and the tests take them from a dict (:func:`experts_from_tensors`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.config import ModelConfig
from kimi_jax.model.layers import (F32, UNROLLED_SLOTS, LatentCache, Routing, dense_layer, final_logits,
                                   moe_attention_and_route, moe_experts)
from kimi_jax.model.params import DenseLayerParams, ExpertStack, MoEBaseParams, expert_stack, head_params, layer_params

# stack_ids -> the stack of those experts, slot j holding expert stack_ids[j]. The ids are sorted
# distinct ids, then padding that repeats the first: an expert is never needed twice.
FetchExperts = Callable[[list[int]], ExpertStack]
# the router's picks idx [T, k] -> (stack_ids, slots): which expert each stack slot holds and where
# each pick finds its expert. A device mesh deals the experts to its devices (kimi_jax.model.placement).
PlanSlots = Callable[[np.ndarray], tuple[list, np.ndarray]]


def plan_expert_slots(idx: np.ndarray, n_routed_experts: int, bucket: bool = True) -> tuple[list[int], list[int], np.ndarray]:
    """Host side: which experts to read, the stack to build, and each pick's slot in the stack.

    Returns ``(distinct, stack_ids, slots)``: ``distinct`` are the ids in ``idx`` [T, k], sorted,
    each read once; ``stack_ids`` pads them (when ``bucket``) to the next power of two by repeating
    the first, so stacks of one size share one compiled program and padding never reads another
    expert (for at most ``UNROLLED_SLOTS`` picks, to the power of two of the number of picks);
    ``slots[t, j]`` is the position of ``idx[t, j]`` in the stack. Padding slots are never
    referenced, so :func:`kimi_jax.model.layers.routed_experts` skips them.
    """
    idx = np.asarray(idx)
    ids = np.unique(idx)
    # A few picks (an unrolled stack, see routed_experts) are bucketed by their count, as the
    # in-memory program must (kimi_jax.model.resident): the two then run the same slots, bitwise.
    least = idx.size if idx.size <= UNROLLED_SLOTS else len(ids)
    n = min(1 << (max(len(ids), least) - 1).bit_length(), n_routed_experts) if bucket else len(ids)
    distinct = [int(i) for i in ids]
    return distinct, distinct + [distinct[0]] * (n - len(distinct)), np.searchsorted(ids, idx).astype(np.int32)


def layer_step(cfg: ModelConfig, params: DenseLayerParams | MoEBaseParams, x: jax.Array, pos: jax.Array,
               cache: LatentCache | None, fetch_experts: FetchExperts, plan_slots: PlanSlots | None = None) -> tuple[jax.Array, LatentCache | None, Routing | None, dict[str, jax.Array]]:  # fmt: skip
    """Run one layer on ``x`` [T, hidden] at positions ``pos``; returns (x, cache, routing, capture).

    ``plan_slots`` lays out the expert stack (default: :func:`plan_expert_slots`, bucketed).

    ``routing`` is None for a dense layer; ``capture`` holds ``norm_in`` and ``norm_out`` (device
    scalars: a bare run never fetches them). A MoE layer waits for the router's picks, because the
    host must know them to fetch the experts.
    """
    if isinstance(params, DenseLayerParams):
        x, cache, capture = dense_layer(cfg, params, x, pos, cache)
        return x, cache, None, capture
    h, cache, routing, capture = moe_attention_and_route(cfg, params, x, pos, cache)
    picks = np.asarray(routing.idx)
    if plan_slots is None:
        _, stack_ids, slots = plan_expert_slots(picks, cfg.n_routed_experts)
    else:
        stack_ids, slots = plan_slots(picks)
    x, capture_out = moe_experts(cfg, params, fetch_experts(stack_ids), jnp.asarray(slots), routing.weights_scaled, h)
    return x, cache, routing, {**capture, **capture_out}


def experts_from_tensors(cfg: ModelConfig, layer: int, tensors: Mapping[str, Any]) -> FetchExperts:
    """``fetch_experts`` for ``layer`` when every tensor is already in memory, by canonical name."""
    return lambda stack_ids: expert_stack(cfg, layer, stack_ids, tensors)


def forward_all(cfg: ModelConfig, tensors: Mapping[str, Any], tokens: Sequence[int], embed: Any,
                dtype=F32) -> jax.Array:
    """Non-streaming reference: float32 logits [T, vocab] for every position, naive attention.

    Everything is in memory (``tensors`` by canonical name, ``embed`` the [vocab, hidden] table);
    it runs the same layer step as the engine, with expert stacks padded as the engine does.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    x = jnp.asarray(np.asarray(embed)[tokens]).astype(dtype)
    positions = jnp.arange(len(tokens), dtype=jnp.int32)
    for layer in range(cfg.num_hidden_layers):
        params = layer_params(cfg, layer, tensors)
        x, _, _, _ = layer_step(cfg, params, x, positions, None, experts_from_tensors(cfg, layer, tensors))
    return final_logits(cfg, head_params(cfg, tensors), x)


__all__ = ["FetchExperts", "PlanSlots", "plan_expert_slots", "layer_step", "experts_from_tensors", "forward_all"]
