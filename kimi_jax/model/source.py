"""Where a run's weights come from: one interface for one device and for a device mesh.

The engine runs one layer loop (:mod:`kimi_jax.model.engine`) over a :class:`WeightSource`; what
differs between one device and a mesh, between streaming and keeping weights, lives in the
source:

* :class:`LocalSource`: one device. Weights come from the
  :class:`~kimi_jax.storage.weight_store.WeightStore`, which applies the residency budget (layers'
  non-expert weights and the head kept, an expert cache) and counts every byte by where it came
  from. When the budget holds every expert, each MoE layer's experts are read whole once and kept
  as one stack, and the layer runs as one program; once every weight is kept, a decode step is
  one program for all the layers (:func:`~kimi_jax.model.step.whole_model_step`).
* the mesh placements (:mod:`kimi_jax.model.placement`): each process reads only its devices'
  share.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.model import layers
from kimi_jax.model.params import ExpertStack, HeadParams, expert_stack, head_params, layer_params
from kimi_jax.model.slots import plan_expert_slots
from kimi_jax.model.speculation import predict_experts
from kimi_jax.model.step import ExpertSource
from kimi_jax.model.weights import WeightPolicy, to_device
from kimi_jax.records import ByteCounts
from kimi_jax.storage.checkpoint import CheckpointIndex
from kimi_jax.storage.reader import ReadCounters, ShardReader
from kimi_jax.storage.residency import ResidencyPlan
from kimi_jax.storage.safetensors_header import TensorRecord
from kimi_jax.storage.weight_store import WeightStore


class StepBytes(NamedTuple):
    """The bytes of one step."""

    by_layer: dict[int | None, ByteCounts]  # per layer; None: the embedding rows and the head
    per_process: dict[int | None, list[int]] | None  # a multi-process run: what each process read, per layer
    counters: ReadCounters  # the reader's


class WeightSource:
    """What the engine asks of the weights, in the order of a step (see the module doc). A source
    implements the methods that raise; the rest have the one-device defaults."""

    mesh: Any = None  # the device mesh (jax.sharding.Mesh), or None for one device
    load_bytes_per_process: list[int] | None = None  # read before step 0 (a resident mesh), per process

    def __init__(self, index: CheckpointIndex):
        self.index, self.cfg = index, index.config

    def begin_step(self) -> None:
        raise NotImplementedError

    def embed(self, tokens: list[int]) -> jax.Array:
        raise NotImplementedError

    def stage_layer(self, layer: int) -> Any:
        """Read a layer's non-expert weights (on the prefetch thread: no collective here)."""
        raise NotImplementedError

    def stage_head(self) -> Any:
        raise NotImplementedError

    def assemble(self, staged: Any) -> Any:
        """What ``stage_*`` returned, as parameters (on the thread that runs the layers)."""
        return staged

    def experts(self, layer: int) -> ExpertSource | None:
        """Where ``layer``'s routed experts come from this step; None for a dense layer (the layer
        kinds as the checkpoint index recorded them from the config)."""
        return self.routed_experts(layer) if self.index.layers[layer].kind == "moe" else None

    def routed_experts(self, layer: int) -> ExpertSource:
        raise NotImplementedError

    def logits(self, head: HeadParams, hidden: jax.Array) -> np.ndarray:
        raise NotImplementedError

    def gather(self, hidden: jax.Array, caches: list | None) -> tuple[jax.Array, list | None]:
        """The last hidden state and the caches whole on every device (a mesh splits activations)."""
        return hidden, caches

    def bytes_so_far(self) -> int:
        """Bytes read from storage so far this step (progress)."""
        raise NotImplementedError

    def end_step(self, tokens: list[int]) -> StepBytes:
        raise NotImplementedError

    def fused_ready(self) -> bool:
        """Every layer's weights, every expert and the head are kept: a step can be one program."""
        return False

    def close(self) -> None:
        pass


class _Timed:
    seconds = 0.0  # time spent getting this layer's experts (kept apart from its compute time)

    def read_ahead(self, params: Any, x: jax.Array) -> None:
        """Before the layer runs: start reading the experts its router, applied early to ``x`` (the
        hidden state entering the layer), predicts. Nothing, unless the run speculates."""

    def done(self, routing: layers.Routing) -> None:
        """The layer ran with this routing (the byte accounting may need its picks)."""


class _StreamedExperts(_Timed):
    """The distinct experts the router picked, from the expert cache, a read ahead or storage."""

    fused = False

    def __init__(self, source: LocalSource, layer: int):
        self.source, self.layer = source, layer

    def read_ahead(self, params: Any, x: jax.Array) -> None:
        if self.source.speculating:
            self.source.store.speculate(self.layer, predict_experts(self.source.cfg, params, x))

    def plan(self, picks: np.ndarray) -> tuple[list, np.ndarray]:
        _, stack_ids, slots = plan_expert_slots(picks, self.source.cfg.n_routed_experts)
        return stack_ids, slots

    def stack(self, stack_ids: list | None) -> ExpertStack:
        started = time.perf_counter()
        distinct = list(dict.fromkeys(stack_ids))  # padding repeats an id; order kept: sorted ids first
        s = self.source
        stack = expert_stack(s.cfg, self.layer, stack_ids, s.store.experts(self.layer, distinct))
        self.seconds += time.perf_counter() - started
        return stack


class _KeptExperts(_Timed):
    """Every expert of the layer, kept as one stack in id order (read whole the first time)."""

    fused = True

    def __init__(self, source: LocalSource, layer: int):
        self.source, self.layer, self.read_now = source, layer, False

    def stack(self, stack_ids: list | None = None) -> ExpertStack:
        started = time.perf_counter()
        s = self.source
        stack = s.stacks.get(self.layer)
        if stack is None:
            self.read_now = True
            every = list(range(s.cfg.n_routed_experts))
            stack = s.stacks[self.layer] = expert_stack(s.cfg, self.layer, every, s.store.all_experts(self.layer))
        self.seconds += time.perf_counter() - started
        return stack

    def done(self, routing: layers.Routing) -> None:
        self.source.store.count_all_experts(self.layer, routing.idx, self.read_now)


class LocalSource(WeightSource):
    """One device: weights from the weight store, the residency budget applied (module doc)."""

    def __init__(self, index: CheckpointIndex, reader: ShardReader, residency: ResidencyPlan, expert_cache: str,
                 policy: WeightPolicy, dtype, speculate: bool = False):  # fmt: skip
        super().__init__(index)
        self.reader, self.residency, self.dtype = reader, residency, dtype
        self.store = WeightStore(index, reader, residency, expert_cache,
                                 decode=lambda entry, parts: to_device(policy.decode(entry, parts, index)))  # fmt: skip
        every_expert = sum(lm.total_bytes - lm.base_bytes for lm in index.layers)
        # When the budget holds every expert, reading ahead is pointless.
        self.experts_kept = residency.expert_capacity >= every_expert
        self.speculating = speculate and not self.experts_kept
        self.stacks: dict[int, ExpertStack] = {}  # MoE layer -> every expert (experts_kept)
        self.stacks_complete = False

    def close(self) -> None:
        self.store.close()

    def begin_step(self) -> None:
        self.store.begin_step()

    def embed(self, tokens: list[int]) -> jax.Array:
        """Read only the embedding rows of the distinct tokens in ``tokens``."""
        entry = self.index.embed.parts["weight"]
        row = entry.nbytes // entry.shape[0]
        distinct = sorted(set(tokens))
        records = [TensorRecord(f"{entry.stored_name}[{t}]", entry.shard, entry.offset + t * row, row, entry.dtype,
                                (entry.shape[1],)) for t in distinct]  # fmt: skip
        rows = self.store.records(records, labels=[f"embed_tokens.weight[{t}]" for t in distinct])
        table = dict(zip(distinct, rows))
        return jnp.asarray(np.stack([table[t] for t in tokens])).astype(self.dtype)

    def stage_layer(self, layer: int) -> Any:
        return layer_params(self.cfg, layer, self.store.base(layer))

    def stage_head(self) -> HeadParams:
        return head_params(self.cfg, self.store.head())

    def routed_experts(self, layer: int) -> ExpertSource:
        return _KeptExperts(self, layer) if self.experts_kept else _StreamedExperts(self, layer)

    def logits(self, head: HeadParams, hidden: jax.Array) -> np.ndarray:
        return np.asarray(layers.head_logits(self.cfg, head, hidden))

    def bytes_so_far(self) -> int:
        return self.reader.step.total

    def end_step(self, tokens: list[int]) -> StepBytes:
        by_layer = self.store.end_step()
        counters: ReadCounters = self.reader.end_step()
        # after a whole step with every expert kept, every MoE layer's stack exists
        self.stacks_complete = self.experts_kept
        return StepBytes(by_layer, None, counters)

    def fused_ready(self) -> bool:
        layers_kept = len(self.residency.layers) == self.cfg.num_hidden_layers and self.residency.head
        return self.stacks_complete and layers_kept

    def fused_weights(self) -> tuple[tuple, tuple, HeadParams]:
        """(bases, stacks, head) of a source that is :meth:`fused_ready`: taken from memory and counted
        as used; the picks of each MoE layer are counted with :meth:`count_fused`."""
        n = self.cfg.num_hidden_layers
        bases = tuple(self.stage_layer(layer) for layer in range(n))
        return bases, tuple(self.stacks.get(layer) for layer in range(n)), self.stage_head()

    def count_fused(self, layer: int, picks: np.ndarray) -> None:
        self.store.count_all_experts(layer, picks, False)


__all__ = ["StepBytes", "WeightSource", "LocalSource"]
