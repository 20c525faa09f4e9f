"""Serves every weight a step uses, from memory when the residency plan keeps it, else from storage,
and counts each byte by where it came from.

Per step and layer (``None``: the embedding rows and the head) a
:class:`~kimi_jax.records.ByteCounts` says:

* ``used``: bytes of the stored tensors the layer needed, wherever they came from. This is the v1
  ledger's ``bytes_read``: it depends only on the routing, never on the cache state, so anchors
  and the non-perturbation proof compare it.
* ``from_memory``: used bytes already in memory (resident bases and head, expert cache hits);
* ``from_storage``: used bytes read when they were needed;
* ``from_speculation``: used bytes of experts read ahead because the next layer's router, applied
  early, predicted them;
* ``mispredicted``: bytes read ahead for predicted experts that the layer did not use;
* ``preloaded``: bytes of experts read to be kept before any step used them (when the budget holds
  every expert, a MoE layer's experts are read whole the first time the layer runs);
* ``overread``: bytes between merged ranges that the reader read and discarded.

``used == from_memory + from_storage + from_speculation`` always; the storage traffic is
``from_storage + from_speculation + mispredicted + preloaded + overread``.

No JAX here: the engine passes ``decode`` (stored parts -> the weight the model takes) and ``keep``
(a decoded weight -> the form kept across steps, e.g. device arrays).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from kimi_jax.records import ByteCounts
from kimi_jax.storage.checkpoint import CheckpointIndex, WeightEntry
from kimi_jax.storage.reader import ShardReader
from kimi_jax.storage.residency import ExpertCache, Policy, ResidencyPlan
from kimi_jax.storage.safetensors_header import TensorRecord

Decode = Callable[[WeightEntry, dict[str, np.ndarray]], Any]
Keep = Callable[[Any], Any]
# Threads reading predicted experts ahead: a small queue depth for NVMe and network mounts.
SPECULATIVE_READERS = 2


@dataclasses.dataclass
class _Speculation:
    predicted: set[int]
    reads: dict[int, Future]  # expert -> future of its decoded weights (only experts not in memory)


class WeightStore:
    """Weights for the engine, by layer, with the residency plan applied. Thread-safe: the prefetch
    thread asks for the next layer's base while the main thread asks for this layer's experts."""

    def __init__(self, index: CheckpointIndex, reader: ShardReader, plan: ResidencyPlan, policy: Policy,
                 decode: Decode, keep: Keep = lambda w: w):  # fmt: skip
        self.index, self.reader, self.plan = index, reader, plan
        self.decode, self.keep = decode, keep
        self.experts_cache = ExpertCache(plan.expert_capacity, policy)
        self._resident: dict[Any, dict[str, Any]] = {}  # layer index or "head" -> decoded weights
        self._lock = threading.Lock()
        self._counts: dict[int | None, ByteCounts] = {}
        self._speculation: dict[int, _Speculation] = {}
        self._unused: list[tuple[int, int, Future, int]] = []  # (layer, expert, read, bytes) predicted, not used
        self._expert_sizes: dict[int, list[int]] = {}  # layer -> bytes of each expert (count_all_experts)
        self._pool = ThreadPoolExecutor(max_workers=SPECULATIVE_READERS, thread_name_prefix="kimi-jax-speculate")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- steps -------------------------------------------------------------------------------

    def begin_step(self) -> None:
        """Start counting a step (the reader's step counters too: they hold the over-read)."""
        self.reader.begin_step()
        with self._lock:
            self._counts = {}

    def end_step(self) -> dict[int | None, ByteCounts]:
        """Settle the reads ahead that no layer used (waiting for them) and return the step's counts."""
        for layer, expert, read, nbytes in self._unused:
            read.result()
            self.reader.uncount_digests(p for w in self._expert_entries(layer, expert) for p in w.parts.values())
            self._count(layer, mispredicted=nbytes)
        self._unused = []
        overread = self.reader.step.per_layer_overread
        with self._lock:
            for layer, n in overread.items():
                self._counts.setdefault(layer, ByteCounts()).overread = n
            return dict(self._counts)

    def _count(self, layer: int | None, **amounts: int) -> None:
        with self._lock:
            counts = self._counts.setdefault(layer, ByteCounts())
            for name, n in amounts.items():
                setattr(counts, name, getattr(counts, name) + n)

    # -- reading -----------------------------------------------------------------------------

    def _read(self, entries: list[WeightEntry], layer: int | None) -> dict[str, Any]:
        parts = self.reader.read_weights(entries, layer=layer)
        return {e.name: self.decode(e, parts[e.name]) for e in entries}

    def _resident_or_read(self, key: Any, entries: list[WeightEntry], layer: int | None, pinned: bool) -> dict[str, Any]:
        nbytes = sum(e.nbytes for e in entries)
        with self._lock:
            kept = self._resident.get(key)
        if kept is not None:
            self._count(layer, used=nbytes, from_memory=nbytes)
            self.reader.count_served(p for e in entries for p in e.parts.values())
            return kept
        weights = self._read(entries, layer)
        self._count(layer, used=nbytes, from_storage=nbytes)
        if pinned:
            weights = {name: self.keep(w) for name, w in weights.items()}
            with self._lock:
                self._resident[key] = weights
        return weights

    def base(self, layer: int) -> dict[str, Any]:
        """A layer's non-expert weights, by canonical name. The next layer's base (or the head), when it
        will be read, is announced to the kernel first, so its pages are on their way."""
        following = self.index.layers[layer + 1].base.values() if layer + 1 < len(self.index.layers) else None
        if following is not None and layer + 1 not in self.plan.layers:
            self.reader.advise(p for e in following for p in e.parts.values())
        elif following is None and not self.plan.head:
            self.reader.advise(p for e in self.index.head.values() for p in e.parts.values())
        entries = list(self.index.layers[layer].base.values())
        return self._resident_or_read(layer, entries, layer, layer in self.plan.layers)

    def kept(self, key: Any, entries: list[WeightEntry], layer: int | None) -> dict[str, Any]:
        """``entries`` (by name), read the first time and kept under ``key`` after: small weights a
        source keeps whatever the budget (a multi-token-prediction layer's inputs)."""
        return self._resident_or_read(key, entries, layer, True)

    def head(self) -> dict[str, Any]:
        """The final norm and lm_head (the embedding, when tied), by canonical name."""
        weights = self._resident_or_read("head", list(self.index.head.values()), None, self.plan.head)
        return {role: weights[entry.name] for role, entry in self.index.head.items()}

    def records(self, records: list[TensorRecord], labels: list[str]) -> list[np.ndarray]:
        """Raw tensors outside any layer (embedding rows), always read: they are a few rows."""
        arrays = self.reader.read_records(records, layer=None, labels=labels)
        nbytes = sum(r.nbytes for r in records)
        self._count(None, used=nbytes, from_storage=nbytes)
        return arrays

    # -- experts -----------------------------------------------------------------------------

    def _expert_entries(self, layer: int, expert: int) -> list[WeightEntry]:
        return list(self.index.layers[layer].experts[expert].values())

    def speculate(self, layer: int, predicted: Iterable[int]) -> None:
        """Start reading the predicted experts of ``layer`` that are not in memory, in the background."""
        predicted = {int(e) for e in predicted}
        reads = {}
        for expert in sorted(predicted):
            if (layer, expert) not in self.experts_cache:
                reads[expert] = self._pool.submit(self._read, self._expert_entries(layer, expert), layer)
        self._speculation[layer] = _Speculation(predicted, reads)

    def all_experts(self, layer: int) -> dict[str, Any]:
        """Every routed expert of ``layer`` (by canonical name), read in one merged call and not kept
        here: the caller keeps them (stacked) and reports each step's use with :meth:`count_all_experts`."""
        entries = [w for e in range(len(self.index.layers[layer].experts)) for w in self._expert_entries(layer, e)]
        return self._read(entries, layer)

    def count_all_experts(self, layer: int, picks: np.ndarray, read_now: bool) -> None:
        """The use of the distinct experts among the router's ``picks`` (any shape) of a layer whose
        experts are all in memory: read this step (``read_now``: the used ones count as read when
        needed, the rest as preloaded) or earlier."""
        distinct = [int(e) for e in np.unique(np.asarray(picks))]
        sizes = self._expert_sizes.get(layer)
        if sizes is None:  # asked every step of every layer: the sizes are summed once
            lm = self.index.layers[layer]
            sizes = self._expert_sizes[layer] = [lm.expert_bytes(e) for e in range(len(lm.experts))]
        used = sum(sizes[e] for e in distinct)
        if read_now:
            self._count(layer, used=used, from_storage=used, preloaded=sum(sizes) - used)
            unused = set(range(len(sizes))) - set(distinct)
            self.reader.uncount_digests(p for e in sorted(unused) for w in self._expert_entries(layer, e)
                                        for p in w.parts.values())  # fmt: skip
        else:
            self._count(layer, used=used, from_memory=used, experts_from_memory=len(distinct))
            self.reader.count_served(p for e in distinct for w in self._expert_entries(layer, e) for p in w.parts.values())
        self._count(layer, experts_used=len(distinct))

    def experts(self, layer: int, distinct: list[int]) -> dict[str, Any]:
        """The weights of each distinct expert of ``layer`` (by canonical name), from the expert cache,
        the reads ahead, or storage (all misses in one merged read)."""
        speculation = self._speculation.pop(layer, _Speculation(set(), {}))
        sizes = {e: sum(w.nbytes for w in self._expert_entries(layer, e)) for e in distinct}
        weights: dict[str, Any] = {}
        fresh: dict[int, dict[str, Any]] = {}
        missing = []
        for expert in distinct:
            kept = self.experts_cache.lookup((layer, expert))
            if kept is not None:
                weights.update(kept)
                self._count(layer, from_memory=sizes[expert], experts_from_memory=1)
                self.reader.count_served(p for e in self._expert_entries(layer, expert) for p in e.parts.values())
            elif expert in speculation.reads:
                fresh[expert] = speculation.reads.pop(expert).result()
                self._count(layer, from_speculation=sizes[expert])
            else:
                missing.append(expert)
        if missing:
            loaded = self._read([w for e in missing for w in self._expert_entries(layer, e)], layer)
            for expert in missing:
                names = [w.name for w in self._expert_entries(layer, expert)]
                fresh[expert] = {n: loaded[n] for n in names}
                self._count(layer, from_storage=sizes[expert])
        for expert, expert_weights in fresh.items():
            weights.update(expert_weights)
            if self.experts_cache.capacity >= sizes[expert]:
                self.experts_cache.admit((layer, expert), {n: self.keep(w) for n, w in expert_weights.items()},
                                         sizes[expert])  # fmt: skip
        for expert, read in speculation.reads.items():  # predicted, read ahead, not used
            self._unused.append((layer, expert, read, sum(w.nbytes for w in self._expert_entries(layer, expert))))
        self._count(layer, used=sum(sizes.values()), experts_used=len(distinct),
                    experts_predicted=len(speculation.predicted),
                    experts_predicted_used=len(speculation.predicted & set(distinct)))  # fmt: skip
        return weights


__all__ = ["WeightStore", "SPECULATIVE_READERS"]
