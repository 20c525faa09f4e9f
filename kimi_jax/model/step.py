"""One decoder layer as every caller runs it, and the whole model as one program.

:func:`layer_step` is the one place that decides how a layer runs, from its parameters and where
its routed experts come from (an :class:`ExpertSource`):

* a dense layer (no experts) is one jitted call;
* a MoE layer whose experts are all kept as one stack (``experts.fused``) is one jitted call
  (:func:`kept_moe_layer`): attention, the router, the expert plan made inside the program, the
  experts indexed in place; the host learns the picks afterwards;
* any other MoE layer is split where the host must act: attention and the router, then the host
  plans the stack from the picks and gets the experts (read from storage, the expert cache or a
  mesh's share), then the experts.

When every layer's weights, every expert and the head are in memory, a decode step is
:func:`whole_model_step`: the same layers (:func:`kept_layer`) traced together into one program,
with a barrier between layers so each compiles as it does alone and the result is bitwise the
layer-by-layer one (``tests/test_memory_model.py``).
"""

from __future__ import annotations

import functools
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.config import ModelConfig
from kimi_jax.model import layers
from kimi_jax.model.layers import LatentCache, Routing, dense_layer, moe_attention_and_route, moe_experts
from kimi_jax.model.params import DenseLayerParams, ExpertStack, MoEBaseParams
from kimi_jax.model.slots import expert_plan_in_program


class ExpertSource(Protocol):
    """Where one MoE layer's routed experts come from, for one step."""

    fused: bool  # every expert of the layer is kept as one stack in id order: the layer is one program

    def plan(self, picks: np.ndarray) -> tuple[list, np.ndarray]:
        """The router's picks [T, k] -> (stack_ids, slots): which expert each stack slot holds and
        where each pick finds its expert (not asked of a fused source)."""

    def stack(self, stack_ids: list | None) -> ExpertStack:
        """The experts of ``stack_ids``, slot by slot; a fused source returns its whole stack."""

    # What the engine asks around the layer: reads ahead before it, the picks after it, and the
    # seconds spent getting experts (kept apart from the layer's compute time).
    seconds: float

    def read_ahead(self, params: MoEBaseParams, x: jax.Array) -> None: ...

    def done(self, routing: Routing) -> None: ...


def layer_step(cfg: ModelConfig, params: DenseLayerParams | MoEBaseParams, x: jax.Array, pos: jax.Array,
               cache: LatentCache | None,
               experts: ExpertSource | None) -> tuple[jax.Array, LatentCache | None, Routing | None, dict]:  # fmt: skip
    """Run one layer on ``x`` [T, hidden] at positions ``pos``; returns (x, cache, routing, capture).

    ``experts`` is None for a dense layer. ``routing`` is None for a dense layer; ``capture`` holds
    ``norm_in`` and ``norm_out`` (device scalars: a bare run never fetches them)."""
    if experts is None or experts.fused:
        return kept_layer(cfg, params, None if experts is None else experts.stack(None), x, pos, cache)
    h, cache, routing, capture = moe_attention_and_route(cfg, params, x, pos, cache)
    stack_ids, slots = experts.plan(np.asarray(routing.idx))  # the host waits for the picks here
    x, capture_out = moe_experts(cfg, params, experts.stack(stack_ids), jnp.asarray(slots), routing.weights_scaled, h)
    return x, cache, routing, {**capture, **capture_out}


@functools.partial(jax.jit, static_argnums=0)
def kept_moe_layer(cfg: ModelConfig, p: MoEBaseParams, experts: ExpertStack, x: jax.Array, positions: jax.Array,
                   cache: LatentCache | None):  # fmt: skip
    """A whole MoE layer with ``experts`` holding every routed expert in id order: returns
    (x_out, cache, Routing, {norm_in, norm_out}) like :func:`layer_step`."""
    layers.TRACE_COUNTS["kept_moe_layer"] += 1
    h, cache, routing, capture = layers.moe_attention_and_route(cfg, p, x, positions, cache)
    stack_ids, slots = expert_plan_in_program(routing.idx, cfg.n_routed_experts)
    x_out, capture_out = layers.moe_experts(cfg, p, experts, slots, routing.weights_scaled, h, stack_ids)
    return x_out, cache, routing, {**capture, **capture_out}


def kept_layer(cfg: ModelConfig, base: DenseLayerParams | MoEBaseParams, stack: ExpertStack | None, x: jax.Array,
               positions: jax.Array, cache: LatentCache | None):  # fmt: skip
    """A layer whose weights are all in memory (``stack``: every routed expert, None for a dense
    layer), traceable inside a larger program: returns (x, cache, routing or None, capture)."""
    if stack is None:
        x, cache, capture = dense_layer(cfg, base, x, positions, cache)
        return x, cache, None, capture
    return kept_moe_layer(cfg, base, stack, x, positions, cache)


@functools.partial(jax.jit, static_argnums=0, static_argnames="every_row")
def whole_model_step(cfg: ModelConfig, bases: tuple, stacks: tuple, x: jax.Array, positions: jax.Array,
                     caches: tuple, every_row: bool = False):  # fmt: skip
    """Every layer as one program: ``bases[l]`` are layer l's non-expert weights, ``stacks[l]`` all
    its routed experts (None for a dense layer), ``caches[l]`` its latent cache.

    Returns (hidden, caches, routings, captures): the hidden state at the last position (at every
    row with ``every_row``: a batch of sequences), one routing (None for a dense layer) and one
    capture dict per layer, as the layer-by-layer engine gets them. The head stays a call of its own:
    traced into this program, XLA compiled its product differently (not bitwise the streamed logits)."""
    layers.TRACE_COUNTS["whole_model_step"] += 1
    routings, captures, out_caches = [], [], []
    for base, stack, cache in zip(bases, stacks, caches):
        # XLA does not fuse across a barrier: each layer compiles as it does alone.
        x = jax.lax.optimization_barrier(x)
        x, cache, routing, capture = kept_layer(cfg, base, stack, x, positions, cache)
        routings.append(routing)
        captures.append(capture)
        out_caches.append(cache)
    return x if every_row else x[-1], tuple(out_caches), tuple(routings), tuple(captures)


__all__ = ["ExpertSource", "layer_step", "kept_moe_layer", "kept_layer", "whole_model_step"]
