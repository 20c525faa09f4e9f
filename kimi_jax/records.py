"""What a run produced, per step and per layer: the records the engine emits and the ledger, the
resume checkpoints and the anchor read. Plain data, no JAX, so those can be typed without the
engine."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class LayerRecord:
    """What one layer did in one step. Routing fields are None for dense layers."""

    layer: int
    kind: str
    norm_in: float | None  # None: a bare run did not fetch capture values
    norm_out: float | None
    experts: list[list[int]] | None
    routing_weights: list[list[float]] | None
    router_scores: list[list[float]] | None
    bytes_read: int
    read_s: float
    compute_s: float


@dataclasses.dataclass
class StepRecord:
    index: int
    context: list[int]
    token: int
    logit: float
    logits: np.ndarray  # float32 [vocab], the last position
    hidden: np.ndarray  # the residual stream at the last position after the last layer
    layers: list[LayerRecord]
    bytes_read: int
    bytes_per_layer: dict[Any, int]
    wall_s: float
    caches: list | None = None  # the latent caches after this step (kv_cache runs): what a resume needs
    # ReadCounters.content(): weights_digest (None unless checked against a digest file), bytes_network, bytes_cache
    storage: dict[str, Any] | None = None
