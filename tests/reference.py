"""The in-memory reference forward pass the tests compare against: every tensor in a dict, the
package's own layer step, no streaming. Test-only code; the package ships none of it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.config import ModelConfig
from kimi_jax.model.layers import F32, final_logits
from kimi_jax.model.params import ExpertStack, expert_stack, head_params, layer_params
from kimi_jax.model.slots import plan_expert_slots
from kimi_jax.model.step import layer_step


class TensorExperts:
    """A MoE layer's experts taken from ``tensors`` by canonical name, planned as the engine plans
    a stack it reads (:func:`~kimi_jax.model.slots.plan_expert_slots`, bucketed)."""

    fused = False

    def __init__(self, cfg: ModelConfig, layer: int, tensors: Mapping[str, Any]):
        self.cfg, self.layer, self.tensors = cfg, layer, tensors

    def plan(self, picks: np.ndarray) -> tuple[list[int], np.ndarray]:
        _, stack_ids, slots = plan_expert_slots(picks, self.cfg.n_routed_experts)
        return stack_ids, slots

    def stack(self, stack_ids: list[int]) -> ExpertStack:
        return expert_stack(self.cfg, self.layer, stack_ids, self.tensors)


def experts_from_tensors(cfg: ModelConfig, layer: int, tensors: Mapping[str, Any]) -> TensorExperts | None:
    """The expert source of ``layer`` (None for a dense layer)."""
    return TensorExperts(cfg, layer, tensors) if cfg.is_moe_layer(layer) else None


def run_layers(cfg: ModelConfig, tensors: Mapping[str, Any], x: jax.Array, positions: jax.Array,
               caches: list | None = None, routings: list | None = None) -> jax.Array:  # fmt: skip
    """Every layer on ``x`` [T, hidden]; ``caches`` (updated in place) for absorbed attention,
    ``routings`` collects each MoE layer's Routing."""
    for layer in range(cfg.num_hidden_layers):
        params = layer_params(cfg, layer, tensors)
        cache = caches[layer] if caches is not None else None
        x, cache, routing, _ = layer_step(cfg, params, x, positions, cache, experts_from_tensors(cfg, layer, tensors))
        if caches is not None:
            caches[layer] = cache
        if routings is not None and routing is not None:
            routings.append(routing)
    return x


def forward_all(cfg: ModelConfig, tensors: Mapping[str, Any], tokens: Sequence[int], embed: Any,
                dtype=F32) -> jax.Array:
    """Float32 logits [T, vocab] for every position, naive attention (no cache)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    x = jnp.asarray(np.asarray(embed)[tokens]).astype(dtype)
    x = run_layers(cfg, tensors, x, jnp.arange(len(tokens), dtype=jnp.int32))
    return final_logits(cfg, head_params(cfg, tensors), x)
