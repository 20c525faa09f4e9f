"""Scale: the full-shape Kimi K2.5 layout (61 layers, 384 experts, 163,840 vocab, sparse files)
on this machine: one token from [BOS] through all 61 layers, then N tokens with and without the
KV cache. Reports bytes read (must equal `kimi-jax inspect`'s prediction), wall time split into
read and compute, and peak RSS (target: under 6 GiB).

    python benchmarks/scale.py                 # 1 token, then 5 tokens with and without KV cache
    python benchmarks/scale.py --tokens 0      # the single-token pass only
    python benchmarks/scale.py --smoke         # the tiny preset, to check the script runs
"""

from __future__ import annotations

import argparse
import time

from common import emit, machine, peak_rss_bytes

from kimi_jax.model.engine import Engine
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.synth import ensure_synthetic


def run(index, tokens: int, kv_cache: bool) -> dict:
    started = time.perf_counter()
    with Engine(index) as engine:
        steps = engine.generate([index.config.bos_token_id], tokens, kv_cache=kv_cache)
    wall = time.perf_counter() - started
    return {"tokens": tokens, "kv_cache": kv_cache, "wall_s": round(wall, 2),
            "per_token_s": [round(s.wall_s, 2) for s in steps], "bytes_read": [s.bytes_read for s in steps],
            "read_s": round(sum(l.read_s for s in steps for l in s.layers), 2),
            "compute_s": round(sum(l.compute_s for s in steps for l in s.layers), 2),
            "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2), "tokens_out": [s.token for s in steps]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=5, help="tokens for the multi-token runs (0: skip them)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    preset = "tiny" if args.smoke else "full-shape"
    started = time.perf_counter()
    index = open_checkpoint(ensure_synthetic(preset))
    emit({"benchmark": "scale", "preset": preset, "machine": machine(), "index_s": round(time.perf_counter() - started, 2),
          "predicted_bytes_per_token": index.predicted_bytes_per_token()})  # fmt: skip
    one = run(index, 1, kv_cache=False)
    one["bytes_equal_prediction"] = one["bytes_read"][0] == index.predicted_bytes_per_token()
    emit({"run": "one-token", **one})
    if args.tokens:
        for kv in (True, False):
            emit({"run": f"{args.tokens}-tokens", **run(index, 2 if args.smoke else args.tokens, kv_cache=kv)})


if __name__ == "__main__":
    main()
