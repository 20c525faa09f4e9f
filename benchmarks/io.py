"""I/O: exact byte accounting, cold-read throughput against a plain sequential read of the same
byte ranges, read/compute overlap per layer, and the expert cache policies and speculative reads
measured on the run's own routing.

1. bytes used per token / bytes of the tensors the step needs (must be exactly 1.00);
2. with the shards evicted from the page cache: the engine's read throughput (bytes over the time
   any read was in flight: reads run in parallel) / a plain sequential pread of the same byte
   ranges, evicted again, in the same run (target >= 0.9);
3. per layer: wall time / max(read time, compute time) (target <= 1.1);
4. speculative reads (budget 0, so every expert is read): prediction recall (of the experts a layer
   used, the fraction predicted) and precision, bytes read ahead and mispredicted;
5. the expert cache, LRU vs LFU, replayed on the run's routing trace at several capacities.

    python benchmarks/io.py [--preset small] [--tokens 3] [--matmul stored] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import emit, machine

from kimi_jax.model.engine import Engine
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.reader import evict_page_cache
from kimi_jax.storage.residency import replay_hit_rate
from kimi_jax.storage.synth import ensure_synthetic


def needed_bytes(index, step) -> int:
    """Independent of the reader: what the step's forward pass needs, from the index and routing."""
    total = sum(w.nbytes for w in index.head.values())
    total += len(set(step.context)) * index.embed_row_bytes()  # full recompute: every context token's row
    for rec in step.layers:
        layer = index.layers[rec.layer]
        total += layer.base_bytes
        if rec.experts:
            total += sum(layer.expert_bytes(e) for e in {e for row in rec.experts for e in row})
    return total


def in_flight_seconds(trace) -> float:
    """Seconds during which at least one read was in flight (the union of the reads' intervals)."""
    spans = sorted((end - elapsed, end) for *_, elapsed, end in trace)
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def policy_hit_rates(index, steps) -> dict:
    """LRU and LFU hit rates replaying the run's routing (distinct experts per MoE layer per step) with
    room for 10, 25 and 50 % of all experts' bytes."""
    trace = [[(l.layer, sorted({e for row in l.experts for e in row})) for l in s.layers if l.experts] for s in steps]
    sizes = {lm.index: lm.expert_bytes(0) for lm in index.layers if lm.kind == "moe"}
    every = sum(lm.total_bytes - lm.base_bytes for lm in index.layers)
    return {f"{policy}@{pct}%": round(replay_hit_rate(trace, every * pct // 100, sizes, policy), 4)
            for policy in ("lru", "lfu") for pct in (10, 25, 50)}  # fmt: skip


def plain_read(ranges) -> float:
    fds = {}
    started = time.perf_counter()
    for shard, offset, nbytes, *_ in ranges:
        fd = fds.setdefault(shard, os.open(shard, os.O_RDONLY))
        done = 0
        while done < nbytes:
            chunk = os.pread(fd, min(nbytes - done, 64 << 20), offset + done)
            if not chunk:
                break
            done += len(chunk)
    elapsed = time.perf_counter() - started
    for fd in fds.values():
        os.close(fd)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--tokens", type=int, default=3)
    parser.add_argument("--matmul", default="stored", choices=["stored", "widened"], help="compute.matmul")
    parser.add_argument("--no-speculate", dest="speculate", action="store_false",
                        help="storage.speculate false (default: read predicted experts ahead, to measure them)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.tokens = "tiny", 2
    index = open_checkpoint(ensure_synthetic(args.preset))
    shards = [h.path for h in index.shards]
    prompt = [index.config.bos_token_id, 11, 12]
    with Engine(index, matmul=args.matmul, speculate=args.speculate) as engine:  # warm-up: compile every program once: timings are I/O + math
        engine.generate(prompt, args.tokens, kv_cache=False)

    evict_page_cache(shards)
    layer_ends: list[float] = []
    with Engine(index, matmul=args.matmul, speculate=args.speculate) as engine:
        engine.reader.trace = []
        started = time.perf_counter()
        steps = engine.generate(prompt, args.tokens, kv_cache=False,
                                on_layer=lambda step, layer, b: layer_ends.append(time.perf_counter()))
        trace = engine.reader.trace
    ratios = [s.bytes_read / needed_bytes(index, s) for s in steps]
    moe = [l.io for s in steps for l in s.layers if l.kind == "moe"]
    engine_bytes = sum(n for _, _, n, *_ in trace)
    engine_read_s = in_flight_seconds(trace)
    evict_page_cache(shards)
    plain_s = plain_read(trace)
    walls, overlap = [], []
    previous = started
    for step in steps:
        for rec in step.layers:
            end = layer_ends.pop(0)
            wall = end - previous
            previous = end
            walls.append(wall)
            overlap.append(wall / max(rec.read_s, rec.compute_s, 1e-9))
        previous = time.perf_counter() if not layer_ends else previous
    emit({"benchmark": "io", "preset": args.preset, "tokens": args.tokens, "machine": machine(),
          "bytes_ratio": [round(r, 6) for r in ratios], "bytes_exact": all(r == 1.0 for r in ratios),
          "cold_engine_mib_s": round(engine_bytes / engine_read_s / 2**20, 1),
          "cold_plain_mib_s": round(engine_bytes / plain_s / 2**20, 1),
          "cold_throughput_fraction": round(plain_s / engine_read_s, 3),
          "overlap_median": round(statistics.median(overlap), 3), "overlap_max": round(max(overlap), 3),
          "overlap_p90": round(sorted(overlap)[int(0.9 * (len(overlap) - 1))], 3),
          "overread_bytes": sum(s.io.overread for s in steps),
          "speculation": {"recall": round(sum(i.experts_predicted_used for i in moe) / max(1, sum(i.experts_used for i in moe)), 4),
                          "precision": round(sum(i.experts_predicted_used for i in moe)
                                             / max(1, sum(i.experts_predicted for i in moe)), 4),
                          "bytes_from_speculation": sum(s.io.from_speculation for s in steps),
                          "bytes_mispredicted": sum(s.io.mispredicted for s in steps)},
          "expert_cache_hit_rate": policy_hit_rates(index, steps)})  # fmt: skip


if __name__ == "__main__":
    main()
