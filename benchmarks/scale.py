"""Scale: the full-shape Kimi K2.5 layout (61 layers, 384 experts, 163,840 vocab, sparse files)
on this machine: one token from [BOS] through all 61 layers, then N tokens with and without the
KV cache. Reports bytes used (must equal `kimi-jax inspect`'s prediction), where they came from
(storage, memory, read ahead), the expert cache's hit rate per step, wall time split into read and
compute, and peak RSS (target: under budget + 2 GiB).

    python benchmarks/scale.py                            # the defaults: budget auto, the CPU kernels
    python benchmarks/scale.py --budget 0 --matmul widened  # 0.1.0's behaviour in this tree
    python benchmarks/scale.py --floor                    # also the same bytes read alone, same invocation (first)
    python benchmarks/scale.py --tokens 0                 # the single-token pass only
    python benchmarks/scale.py --baseline 8594dfb         # also the BOS pass of that commit, same invocation
    python benchmarks/scale.py --page-cache keep          # keep the shards' pages (auto drops them: they do not fit)
    python benchmarks/scale.py --smoke                    # the tiny preset, to check the script runs

``--baseline REV`` checks REV out with ``git worktree add`` into a temporary folder and runs its own
``benchmarks/scale.py --tokens 0`` in a child process (its own package on ``PYTHONPATH``), before
this tree's runs, so both BOS passes are measured in one invocation on the same machine state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, machine, peak_rss_bytes

from kimi_jax.model.engine import Engine
from kimi_jax.settings import MATMUL_MODES
from kimi_jax.storage.reader import ShardReader
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.residency import drops_page_cache, plan_residency, resolve_budget
from kimi_jax.storage.synth import ensure_synthetic

REPO = Path(__file__).resolve().parents[1]


def run(index, tokens: int, kv_cache: bool, engine_args: dict) -> dict:
    started = time.perf_counter()
    with Engine(index, **engine_args) as engine:
        steps = engine.generate([index.config.bos_token_id], tokens, kv_cache=kv_cache)
    wall = time.perf_counter() - started
    moe = [[l.io for l in s.layers if l.kind == "moe"] for s in steps]
    return {"tokens": tokens, "kv_cache": kv_cache, "wall_s": round(wall, 2),
            "per_token_s": [round(s.wall_s, 2) for s in steps], "bytes_read": [s.bytes_read for s in steps],
            "bytes_from_storage": [s.io.from_storage + s.io.from_speculation for s in steps],
            "bytes_from_memory": [s.io.from_memory for s in steps],
            "bytes_mispredicted": [s.io.mispredicted for s in steps], "bytes_preloaded": [s.io.preloaded for s in steps],
            "expert_hit_rate": [round(sum(i.experts_from_memory for i in m) / max(1, sum(i.experts_used for i in m)), 4)
                                for m in moe],
            "prediction_recall": [round(sum(i.experts_predicted_used for i in m) / max(1, sum(i.experts_used for i in m)), 4)
                                  for m in moe],
            "read_s": round(sum(l.read_s for s in steps for l in s.layers), 2),
            "compute_s": round(sum(l.compute_s for s in steps for l in s.layers), 2),
            "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2), "tokens_out": [s.token for s in steps]}  # fmt: skip


def read_floor(index, drop_page_cache: bool) -> dict:
    """The storage floor of a one-token step: its bytes (every layer's non-expert weights and k experts
    of each MoE layer, the embedding row aside, and the head) read alone with the engine's reader,
    layer by layer, dropping each range from the page cache as the engine does when the shards do
    not fit. Compare its seconds with the step's wall: the gap is compute and what does not overlap."""
    k = index.config.num_experts_per_tok
    started = time.perf_counter()
    with ShardReader() as reader:
        reader.drop_after_read = drop_page_cache
        for layer in index.layers:
            weights = list(layer.base.values()) + [w for e in layer.experts[:k] for w in e.values()]
            reader.read_weights(weights, layer=layer.index)
        reader.read_weights(list(index.head.values()), layer=None)
        nbytes = reader.run.total
    wall = time.perf_counter() - started
    return {"run": "read-floor", "wall_s": round(wall, 3), "bytes": nbytes, "drop_page_cache": drop_page_cache,
            "gb_per_s": round(nbytes / wall / 1e9, 2)}


def baseline(revision: str, smoke: bool) -> dict:
    """The BOS pass of ``revision``'s own scale.py, run from a temporary worktree in a child process."""
    with tempfile.TemporaryDirectory(prefix="kimi-jax-scale-baseline-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree), revision], cwd=REPO, check=True)
        try:
            proc = subprocess.run([sys.executable, str(tree / "benchmarks" / "scale.py"), "--tokens", "0"]
                                  + (["--smoke"] if smoke else []), cwd=tree, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(tree)})  # fmt: skip
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=True)
    if proc.returncode != 0:
        return {"revision": revision, "error": proc.stderr[-2000:]}
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {"revision": revision, **next(r for r in records if r.get("run") == "one-token")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=5, help="tokens for the multi-token runs (0: skip them)")
    parser.add_argument("--budget", default="auto", help="storage.resident_bytes: a size, 0 or auto (default)")
    parser.add_argument("--matmul", default="kernels", choices=MATMUL_MODES, help="compute.matmul")
    parser.add_argument("--floor", action="store_true", help="also read the step's bytes alone, just before it")
    parser.add_argument("--expert-cache", default="lru", choices=["lru", "lfu"])
    parser.add_argument("--speculate", action="store_true", help="storage.speculate: read predicted experts ahead")
    parser.add_argument("--page-cache", default="auto", choices=["auto", "keep", "drop"], help="storage.page_cache")
    parser.add_argument("--kv-only", action="store_true", help="skip the multi-token run without the KV cache")
    parser.add_argument("--baseline", metavar="REV", help="also run REV's BOS pass (a git worktree), first")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    preset = "tiny" if args.smoke else "full-shape"
    before = baseline(args.baseline, args.smoke) if args.baseline else None
    started = time.perf_counter()
    index = open_checkpoint(ensure_synthetic(preset))
    budget = resolve_budget(args.budget if args.budget == "auto" else int(args.budget) if args.budget.isdigit()
                            else args.budget, index, 1 + args.tokens)  # fmt: skip
    residency = plan_residency(index, budget, drops_page_cache(args.page_cache, index))
    engine_args = {"matmul": args.matmul, "residency": residency, "expert_cache": args.expert_cache,
                   "speculate": args.speculate}
    emit({"benchmark": "scale", "preset": preset, "machine": machine(), "index_s": round(time.perf_counter() - started, 2),
          "predicted_bytes_per_token": index.predicted_bytes_per_token(), "matmul": args.matmul,
          "budget_bytes": budget, "resident_layers": len(residency.layers), "head_resident": residency.head,
          "expert_cache_bytes": residency.expert_capacity, "page_cache": args.page_cache,
          "drops_page_cache": residency.drop_page_cache})  # fmt: skip
    if before is not None:
        emit({**before, "run": "baseline-one-token"})
    # the floor first, while the memory is free: after the step the engine's kept weights (up to the
    # budget) may still be held when the floor's reads need room
    floor = read_floor(index, residency.drop_page_cache) if args.floor else None
    one = run(index, 1, False, engine_args)
    if before is not None and "wall_s" in before:
        one["wall_vs_baseline"] = round(one["wall_s"] / before["wall_s"], 3)
    one["rss_minus_budget_gib"] = round(one["peak_rss_gib"] - budget / 2**30, 2)
    one["bytes_equal_prediction"] = one["bytes_read"][0] == index.predicted_bytes_per_token()
    emit({"run": "one-token", **one})
    if floor is not None:
        floor["step_vs_floor"] = round(one["wall_s"] / max(floor["wall_s"], 1e-3), 2)
        floor["compute_share_of_step"] = round(one["compute_s"] / one["wall_s"], 3)
        emit(floor)
    if args.tokens:
        for kv in (True,) if args.kv_only else (True, False):
            emit({"run": f"{args.tokens}-tokens", **run(index, 2 if args.smoke else args.tokens, kv, engine_args)})


if __name__ == "__main__":
    main()
