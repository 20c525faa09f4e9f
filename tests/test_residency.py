"""Residency budget, expert cache policies, and the weight store's byte accounting by source."""

from __future__ import annotations

import pytest

from kimi_jax.storage import residency
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.reader import ShardReader
from kimi_jax.settings import parse_size
from kimi_jax.storage.residency import ExpertCache, plan_residency, replay_hit_rate, resolve_budget
from kimi_jax.storage.weight_store import WeightStore


@pytest.mark.parametrize("text,expected", [("8GiB", 8 * 2**30), ("512 MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                           ("4096", 4096), (0, 0), (123, 123), ("2kib", 2048)])  # fmt: skip
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["8 gigs", "", "GiB", "-1GiB", -1, True, "1e9"])
def test_parse_size_rejects_with_what_is_expected(bad):
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(bad)


def test_auto_is_available_memory_less_a_streamed_steps_working_set(monkeypatch, tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    cfg = idx.config
    monkeypatch.setattr(residency, "available_memory", lambda: 10 * 2**30)
    bases = sorted(lm.base_bytes for lm in idx.layers)
    expert = max(lm.expert_bytes(e) for lm in idx.layers for e in range(len(lm.experts)))
    cache_row = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    for positions in (1, 6, 10_000):  # one token; a short run; a prompt that picks every expert of a layer
        picked = min(cfg.n_routed_experts, positions * cfg.num_experts_per_tok)
        working = bases[-1] + bases[-2] + picked * expert + positions * cache_row + residency.RUNTIME_BYTES
        assert residency.streamed_working_set(idx, positions) == working
        assert resolve_budget("auto", idx, positions) == 10 * 2**30 - working
    assert resolve_budget("1MiB") == 2**20
    # too little memory for the head too: the head streams, and its bytes come off the budget as well
    head = sum(w.nbytes for w in idx.head.values())
    monkeypatch.setattr(residency, "available_memory", lambda: residency.streamed_working_set(idx, 1) + head - 1)
    assert resolve_budget("auto", idx, 1) == 0


def test_available_memory_is_positive():
    assert residency.available_memory() > 0


def test_plan_fills_bases_then_head_then_experts(tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    bases = [lm.base_bytes for lm in idx.layers]
    head = sum(w.nbytes for w in idx.head.values())
    assert plan_residency(idx, 0) == residency.ResidencyPlan(0, frozenset(), False, 0)
    two = plan_residency(idx, bases[0] + bases[1])
    if head > two.budget:  # the head does not fit: bases only
        assert two.layers == {0, 1} and not two.head and two.expert_capacity == 0
    # not every base fits with the head: the head first (a streamed head is read whole each step)
    some = plan_residency(idx, head + bases[0] + bases[1])
    assert some.head and some.layers == {0, 1} and some.expert_capacity == 0
    assert plan_residency(idx, head - 1).head is False
    everything = sum(bases) + head
    full = plan_residency(idx, everything + 12345)
    assert full.layers == set(range(len(bases))) and full.head and full.expert_capacity == 12345
    assert full.pinned_bytes == everything


def test_lru_evicts_least_recently_used():
    cache = ExpertCache(capacity=20, policy="lru")
    for key in ("a", "b"):
        assert cache.lookup(key) is None and cache.admit(key, key.upper(), 10)
    assert cache.lookup("a") == "A"  # b is now the least recently used
    assert cache.lookup("c") is None and cache.admit("c", "C", 10)
    assert "b" not in cache and "a" in cache and "c" in cache
    assert (cache.hits, cache.misses, cache.evictions, cache.used_bytes) == (1, 3, 1, 20)
    assert not cache.admit("huge", "H", 21) and "huge" not in cache


def test_lfu_keeps_a_frequently_used_expert_through_a_scan():
    """One hot expert used every other access among a stream of one-off experts: LRU with room for two
    always loses it, LFU keeps it after its second use."""
    trace = [[(1, [0, 2 * i + 1, 2 * i + 2])] for i in range(20)]
    sizes = {1: 10}
    lru = replay_hit_rate(trace, 20, sizes, "lru")
    lfu = replay_hit_rate(trace, 20, sizes, "lfu")
    assert lru == 0.0
    assert lfu == pytest.approx(18 / 60)  # the hot expert hits from the third step on


def test_replay_hit_rate_counts_by_hand():
    trace = [[(1, [0, 1])], [(1, [0, 2])], [(1, [0, 1])]]
    # LRU, room for two: miss 0, miss 1 | hit 0, miss 2 (evicts 1) | hit 0, miss 1 (evicts 2)
    assert replay_hit_rate(trace, 20, {1: 10}, "lru") == pytest.approx(2 / 6)
    assert replay_hit_rate(trace, 0, {1: 10}, "lru") == 0.0
    assert replay_hit_rate(trace, 30, {1: 10}, "lfu") == pytest.approx(3 / 6)


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="lru"):
        ExpertCache(10, "fifo")


# -- the weight store ---------------------------------------------------------------------------


def _store(idx, budget, policy="lru"):
    reader = ShardReader()
    store = WeightStore(idx, reader, plan_residency(idx, budget), policy, decode=lambda entry, parts: parts)
    return store, reader


def _expert_bytes(idx, layer, expert):
    return idx.layers[layer].expert_bytes(expert)


def test_streaming_reads_everything_every_step(tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    store, reader = _store(idx, 0)
    with reader:
        for _ in range(2):
            store.begin_step()
            store.base(1)
            store.experts(1, [2, 5])
            counts = store.end_step()[1]
            used = idx.layers[1].base_bytes + _expert_bytes(idx, 1, 2) + _expert_bytes(idx, 1, 5)
            assert (counts.used, counts.from_storage, counts.from_memory) == (used, used, 0)
            assert reader.step.per_layer[1] == used
    store.close()


def test_resident_weights_are_served_from_memory_from_the_second_step(tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    store, reader = _store(idx, 1 << 30)
    steps = []
    with reader:
        for _ in range(2):
            store.begin_step()
            store.base(1)
            store.head()
            store.experts(1, [2, 5])
            steps.append((store.end_step(), reader.step.total))
    (first, read0), (second, read1) = steps
    assert first[1].used == second[1].used == first[1].from_storage == second[1].from_memory
    assert first[None].used == second[None].used == second[None].from_memory
    assert second[1].experts_from_memory == 2 == second[1].experts_used
    assert read0 == first[1].used + first[None].used and read1 == 0
    store.close()


def test_speculative_reads_are_counted_apart_and_mispredictions_settle_at_step_end(tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    store, reader = _store(idx, 0)
    with reader:
        store.begin_step()
        store.speculate(2, [3, 5])
        weights = store.experts(2, [3, 7])
        counts = store.end_step()[2]
        size = {e: _expert_bytes(idx, 2, e) for e in (3, 5, 7)}
        assert counts.used == size[3] + size[7]
        assert (counts.from_speculation, counts.from_storage, counts.mispredicted) == (size[3], size[7], size[5])
        assert counts.used == counts.from_memory + counts.from_storage + counts.from_speculation
        assert (counts.experts_predicted, counts.experts_predicted_used, counts.experts_used) == (2, 1, 2)
        assert reader.step.per_layer[2] == counts.from_storage + counts.from_speculation + counts.mispredicted
        assert {n.split(".")[4] for n in weights} == {"3", "7"}
    store.close()


def test_speculation_skips_experts_already_in_memory(tiny_checkpoints):
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    store, reader = _store(idx, 1 << 30)
    with reader:
        store.begin_step()
        store.experts(2, [3])
        store.end_step()
        store.begin_step()
        store.speculate(2, [3])
        store.experts(2, [3])
        counts = store.end_step()[2]
        assert counts.from_memory == counts.used and counts.mispredicted == counts.from_speculation == 0
        assert counts.experts_predicted_used == 1 and reader.step.total == 0
    store.close()


def test_page_cache_policy_drops_only_what_cannot_stay_cached(tiny_checkpoints, monkeypatch):
    """auto drops the pages of shards larger than the memory available; keep and drop are what they say."""
    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    shards = sum(h.file_size for h in idx.shards)
    assert residency.drops_page_cache("drop", idx) and not residency.drops_page_cache("keep", idx)
    monkeypatch.setattr(residency, "available_memory", lambda: shards + 1)
    assert not residency.drops_page_cache("auto", idx)
    monkeypatch.setattr(residency, "available_memory", lambda: shards - 1)
    assert residency.drops_page_cache("auto", idx)
    with pytest.raises(ValueError, match="storage.page_cache must be one of"):
        residency.drops_page_cache("sometimes", idx)


def test_dropped_ranges_leave_the_page_cache_and_the_bytes_are_the_same(tiny_checkpoints):
    """With storage.page_cache: drop every range read is advised out of the page cache (mincore sees
    it gone) and the run reads the same bytes and computes the same tokens."""
    from kimi_jax.model.engine import Engine
    from kimi_jax.storage.reader import evict_page_cache, page_cache_bytes

    idx = open_checkpoint(tiny_checkpoints["kimi-k2.5"])
    shards = [h.path for h in idx.shards]
    runs = {}
    for mode in ("keep", "drop"):
        evict_page_cache(shards)
        plan = residency.budget_plan(idx, 0, mode)
        assert plan.drop_page_cache is (mode == "drop")
        with Engine(idx, residency=plan) as engine:
            steps = engine.generate([1792, 5], 2, kv_cache=True)
        runs[mode] = ([s.token for s in steps], [s.bytes_read for s in steps], sum(page_cache_bytes(p) for p in shards))
    assert runs["keep"][:2] == runs["drop"][:2]
    assert runs["keep"][2] > 0
    assert runs["drop"][2] < runs["keep"][2] / 4  # only pages the headers' reads and readahead left
