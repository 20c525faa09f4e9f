"""What a run produced, per step and per layer: the records the engine emits and the ledger, the
resume checkpoints and the anchor read. Plain data, no JAX, so those can be typed without the
engine."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class ByteCounts:
    """Where the bytes of one layer (or of the embedding rows and head) in one step came from.

    ``used`` is what the step needed, whatever the source: it depends only on the routing, never on
    what was in memory, and is what the ledger's ``bytes_read`` holds, what anchors and the
    non-perturbation proof compare. ``used == from_memory + from_storage + from_speculation``;
    storage traffic is ``from_storage + from_speculation + mispredicted + preloaded + overread``.
    """

    used: int = 0
    from_memory: int = 0  # kept in memory from an earlier step (resident weights, expert cache hits)
    from_storage: int = 0  # read when needed
    from_speculation: int = 0  # read ahead because the early router predicted the expert
    mispredicted: int = 0  # read ahead for a predicted expert the layer did not use
    preloaded: int = 0  # read to keep in memory before any step used it (a model that fits, loaded whole)
    overread: int = 0  # gap bytes between merged ranges, read and discarded
    experts_used: int = 0  # distinct routed experts the layer ran
    experts_from_memory: int = 0  # of those, already in memory (expert cache hits)
    experts_predicted: int = 0  # distinct experts the early router predicted
    experts_predicted_used: int = 0  # of those, used

    def add(self, other: "ByteCounts") -> "ByteCounts":
        # field by field (dataclasses.astuple deep-copies: a batch of 8 spent 10 ms a pass in it)
        return ByteCounts(*(getattr(self, f) + getattr(other, f) for f in _BYTE_FIELDS))

    @staticmethod
    def total(parts) -> "ByteCounts":
        """The sum of ``parts`` (a step's or a pass's layers, or a token's share of them)."""
        out = ByteCounts()
        for counts in parts:
            out = out.add(counts)
        return out


_BYTE_FIELDS = tuple(f.name for f in dataclasses.fields(ByteCounts))


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
    bytes_read: int  # bytes used (io.used)
    read_s: float
    compute_s: float
    io: ByteCounts = dataclasses.field(default_factory=ByteCounts)
    bytes_per_process: list[int] | None = None  # a multi-process run: the bytes each process read from storage


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
    io: ByteCounts = dataclasses.field(default_factory=ByteCounts)  # every layer's plus the embedding rows and head
    bytes_per_process: list[int] | None = None  # a multi-process run: the bytes each process read from storage
    compile_s: float = 0.0  # of wall_s, seconds spent making programs (kimi_jax.run.compile_clock)
