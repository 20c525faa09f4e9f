"""Speculative expert reads: guess a MoE layer's experts before it runs.

Before a MoE layer runs, the engine applies that layer's router (its post-attention norm and gate)
to the hidden state entering the layer, and reads the experts it predicts in the background while
the layer's attention computes: the next layer's gate applied to the current hidden state, as in
Eliseev and Mazur (2023). The real router runs on the hidden state after the attention, so the
guess can miss; a miss costs only the bytes read for nothing, counted as ``mispredicted``. The
prediction is a separate program whose result only decides what is read: it never feeds the
computation, so runs with and without it are bitwise identical.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from kimi_jax.config import ModelConfig
from kimi_jax.model.layers import TRACE_COUNTS, rms_norm, route
from kimi_jax.model.params import MoEBaseParams


@functools.partial(jax.jit, static_argnums=0)
def _early_route(cfg: ModelConfig, p: MoEBaseParams, x: jax.Array) -> jax.Array:
    TRACE_COUNTS["early_route"] += 1
    return route(cfg, p.gate, rms_norm(x, p.post_attention_layernorm, cfg.rms_norm_eps)).idx


def predict_experts(cfg: ModelConfig, p: MoEBaseParams, x: jax.Array) -> list[int]:
    """The distinct experts layer ``p``'s router picks for ``x`` [T, hidden] (sorted)."""
    return sorted({int(e) for e in np.asarray(_early_route(cfg, p, x)).reshape(-1)})


__all__ = ["predict_experts"]
