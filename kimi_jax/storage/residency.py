"""What stays in memory across steps (the residency budget), and the expert cache inside it.

``storage.resident_bytes`` is filled once, in priority order, from the index's sizes:

1. the non-expert weights of every layer, layer 0 first (every step needs all of them);
2. the head (final norm and lm_head), or first when not all of the bases and it fit (a streamed
   head is the largest piece read whole each step);
3. routed experts, by observed use: what is left is an :class:`ExpertCache` with LRU or LFU
   eviction.

Sizes are the stored sizes (BF16 stays BF16, int4 stays packed), so the budget is the bytes the
kept weights occupy. ``0`` keeps nothing (pure streaming); ``auto`` is the memory the kernel reports
available when the run starts less the working set of a streamed step
(:func:`streamed_working_set`): what the engine holds beside the budget.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Hashable
from typing import Any

from kimi_jax.settings import AUTO, EXPERT_POLICIES, PAGE_CACHE_MODES, parse_size
from kimi_jax.settings import ExpertPolicy as Policy
from kimi_jax.storage.checkpoint import CheckpointIndex

# What the process holds beside weights and caches: the interpreter, JAX and its compiled programs,
# read buffers on their way to the device, XLA's temporaries. The demo peaks at 0.45 GiB resident
# with weights of a few MB (benchmarks/RESULTS.md records it at the medium and full shapes).
RUNTIME_BYTES = 1 << 30


def available_memory() -> int:
    """Bytes the kernel reports as available to new allocations (``MemAvailable``), else free RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def streamed_working_set(index: CheckpointIndex, positions: int, rows: int | None = None, sequences: int = 1) -> int:
    """Bytes a step holds beside the budget when weights stream, for a run of ``positions`` positions
    per sequence (prompt and generated tokens) and passes of at most ``rows`` tokens (default
    ``positions``: a prompt in one pass; a batch of B sequences decodes B rows): the non-expert
    weights of two layers (the one computing and the one read ahead), the routed experts one layer's
    rows pick at once (top-k of each, at most every expert of the layer), the latent caches of
    ``sequences`` sequences, and :data:`RUNTIME_BYTES`. Sizes are the largest of their kind, so the
    bound holds for every layer."""
    cfg = index.config
    bases = sorted((lm.base_bytes for lm in index.layers), reverse=True)
    expert = max((lm.expert_bytes(e) for lm in index.layers for e in range(len(lm.experts))), default=0)
    picked = min(cfg.n_routed_experts, max(positions, rows or 0) * cfg.num_experts_per_tok) if expert else 0
    caches = cfg.num_hidden_layers * sequences * positions * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    return sum(bases[:2]) + picked * expert + caches + RUNTIME_BYTES


def resolve_budget(spec: int | str, index: CheckpointIndex | None = None, positions: int = 1, rows: int | None = None,
                   sequences: int = 1) -> int:  # fmt: skip
    """The manifest's ``resident_bytes`` as bytes: ``auto`` is the memory available now less the
    working set of a streamed step of ``index`` (:func:`streamed_working_set`; and less the head
    when the rest cannot hold it, since a streamed head is read whole on top of it); anything else
    is parsed."""
    if spec != AUTO:
        return parse_size(spec)
    held = streamed_working_set(index, positions, rows, sequences) if index is not None else RUNTIME_BYTES
    free = available_memory() - held
    head = sum(w.nbytes for w in index.head.values()) if index is not None else 0
    return max(0, free if free >= head else free - head)


@dataclasses.dataclass(frozen=True)
class ResidencyPlan:
    """Which weights a budget keeps: the bases of ``layers``, the head if ``head``, and an expert cache;
    and whether ranges read are dropped from the OS page cache (:func:`drops_page_cache`), resolved
    with the budget, once, when the run starts."""

    budget: int
    layers: frozenset[int]
    head: bool
    expert_capacity: int
    drop_page_cache: bool = False

    @property
    def pinned_bytes(self) -> int:
        return self.budget - self.expert_capacity


def plan_residency(index: CheckpointIndex, budget: int, drop_page_cache: bool = False) -> ResidencyPlan:
    """Fill ``budget`` bytes in priority order: layer bases (layer 0 first), then the head, then experts.

    A base that does not fit is skipped (a later, smaller one may still fit). When the budget cannot
    hold every base and the head, the head goes first: every step needs all of them, so a byte kept
    saves a byte read whichever it is, but a streamed head is read whole at the end of each step
    (2.3 GB for Kimi K2.5, against 0.3 GB for a streamed base) and that is memory on top of the budget."""
    head_bytes = sum(w.nbytes for w in index.head.values())
    head = head_bytes <= budget < sum(lm.base_bytes for lm in index.layers) + head_bytes
    left, layers = budget - (head_bytes if head else 0), set()
    for lm in index.layers:
        if lm.base_bytes <= left:
            layers.add(lm.index)
            left -= lm.base_bytes
    if not head and head_bytes <= left:
        head = True
        left -= head_bytes
    return ResidencyPlan(budget=budget, layers=frozenset(layers), head=head, expert_capacity=left,
                         drop_page_cache=drop_page_cache)


def drops_page_cache(mode: str, index: CheckpointIndex) -> bool:
    """``storage.page_cache``: whether each range is dropped from the OS page cache once read
    (``posix_fadvise(DONTNEED)``). ``drop`` always, ``keep`` never; ``auto`` when the shards are larger
    than the memory available now: their pages could not all stay cached until the next step, and
    holding them only makes the kernel reclaim memory on every read (reading the 33 GB of one
    full-shape K2.5 token took 41 s keeping the pages and 4.8 s dropping them, benchmarks/RESULTS.md).
    A checkpoint that fits keeps its pages: the next step reads them from memory."""
    if mode not in PAGE_CACHE_MODES:
        raise ValueError(f"storage.page_cache must be one of {PAGE_CACHE_MODES}, got {mode!r}")
    if mode == "auto":
        return index.source is None and sum(h.file_size for h in index.shards) > available_memory()
    return mode == "drop"


def budget_plan(index: CheckpointIndex, resident_bytes: int | str, page_cache: str = "auto",
                positions: int = 1, rows: int | None = None, sequences: int = 1) -> ResidencyPlan:  # fmt: skip
    """The plan for the manifest's ``storage.resident_bytes`` and ``storage.page_cache`` (``auto``
    measured now, for either) for a run of ``positions`` positions per sequence, passes of at most
    ``rows`` tokens and ``sequences`` sequences (:func:`streamed_working_set`)."""
    budget = resolve_budget(resident_bytes, index, positions, rows, sequences)
    return plan_residency(index, budget, drops_page_cache(page_cache, index))


class ExpertCache:
    """Routed experts kept in memory, at most ``capacity`` bytes, keyed by ``(layer, expert)``.

    ``lru`` evicts the least recently used expert. ``lfu`` counts every use of every expert (kept or
    not, so the counts are the observed routing frequencies), evicts the least frequently used one
    (ties: least recently used) and admits a new expert only if it has been used at least as often
    as the one it would evict.
    """

    def __init__(self, capacity: int, policy: Policy = "lru"):
        if policy not in EXPERT_POLICIES:
            raise ValueError(f"expert cache policy must be one of {EXPERT_POLICIES}, got {policy!r}")
        self.capacity, self.policy = int(capacity), policy
        self._items: collections.OrderedDict[Hashable, tuple[Any, int]] = collections.OrderedDict()
        self._uses: collections.Counter[Hashable] = collections.Counter()
        self.used_bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, key: Hashable) -> Any | None:
        """The kept value (a hit) or None (a miss); either way one observed use of ``key``."""
        self._uses[key] += 1
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def admit(self, key: Hashable, value: Any, nbytes: int) -> bool:
        """Keep ``value`` if the policy finds room for it; returns whether it is kept."""
        if key in self._items or nbytes > self.capacity:
            return key in self._items
        victims, freed = [], 0
        order = self._eviction_order()
        while self.used_bytes - freed + nbytes > self.capacity:
            victim = next(order)
            if self.policy == "lfu" and self._uses[victim] > self._uses[key]:
                return False  # everything kept is used more often than the newcomer
            victims.append(victim)
            freed += self._items[victim][1]
        for victim in victims:
            del self._items[victim]
            self.evictions += 1
        self.used_bytes -= freed
        self._items[key] = (value, nbytes)
        self.used_bytes += nbytes
        return True

    def _eviction_order(self):
        keys = list(self._items)  # least recently used first
        if self.policy == "lfu":
            keys.sort(key=lambda k: self._uses[k])  # stable: ties stay least recently used first
        return iter(keys)


def replay_hit_rate(trace: list[list[tuple[int, list[int]]]], capacity_bytes: int, expert_bytes: dict[int, int],
                    policy: Policy) -> float:  # fmt: skip
    """Hit rate of an :class:`ExpertCache` replaying a routing trace: per step, per MoE layer in order,
    the distinct experts used (``[(layer, [expert, ...]), ...]``); ``expert_bytes[layer]`` is the size of
    one expert of that layer. Benchmarks compare the policies with it on traces from real runs."""
    cache = ExpertCache(capacity_bytes, policy)
    for step in trace:
        for layer, experts in step:
            for expert in experts:
                if cache.lookup((layer, expert)) is None:
                    cache.admit((layer, expert), True, expert_bytes[layer])
    total = cache.hits + cache.misses
    return cache.hits / total if total else 0.0


__all__ = ["RUNTIME_BYTES", "streamed_working_set", "drops_page_cache",
           "available_memory", "resolve_budget", "ResidencyPlan", "plan_residency", "budget_plan", "ExpertCache", "replay_hit_rate"]  # fmt: skip
