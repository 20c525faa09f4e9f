"""Would length buckets keep full recompute bitwise? And what does each new length cost to compile?

Full recompute (``generate.kv_cache: false``) runs a sequence one token longer every step, and each
length is a new program for every layer kind. Reusing programs would mean padding a sequence of T
positions to a bucket of B >= T with the pads after it: the causal mask already hides later
positions from earlier ones, so the T real positions attend to the same keys. This script runs the
engine's own layer programs (``dense_layer``, ``moe_attention_and_route``) on T positions and on
the same positions padded to B, and compares the real positions bit for bit; and it measures the
seconds a new length spends making its programs, against running them once made.

    python benchmarks/length_buckets.py [--preset tiny|small] [--lengths 1,2,3,5,7,12] [--buckets 8,16] [--smoke]

A padded sequence would also route its pad positions to experts (more bytes read) unless they were
masked out of the routing too; that is not measured here, since the bits already decide.
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp
import numpy as np

from common import emit, machine
from kimi_jax.model import layers
from kimi_jax.model.engine import Engine
from kimi_jax.run import compile_clock
from kimi_jax.storage.checkpoint import open_checkpoint
from kimi_jax.storage.synth import ensure_synthetic


def _programs(cfg, dense, moe, x, positions):
    """The two layer programs whose inputs are the sequence: dense layer out, MoE attention out, router scores."""
    out = layers.dense_layer(cfg, dense, x, positions, None)[0]
    h, _, routing, _ = layers.moe_attention_and_route(cfg, moe, x, positions, None)
    return [np.asarray(a) for a in (out, h, routing.scores, routing.idx)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--lengths", default="1,2,3,5,7,12")
    parser.add_argument("--buckets", default="8,16")
    parser.add_argument("--smoke", action="store_true", help="lengths 3,5 and bucket 8")
    args = parser.parse_args()
    lengths = [3, 5] if args.smoke else [int(v) for v in args.lengths.split(",")]
    buckets = [8] if args.smoke else [int(v) for v in args.buckets.split(",")]
    index = open_checkpoint(ensure_synthetic(args.preset, "kimi-k2.5", 0))
    cfg = index.config
    compile_clock.start()
    rng = np.random.default_rng(0)
    names = ("dense_layer", "moe_attention", "router_scores", "router_picks")
    cases, compile_s, run_s = [], {}, {}
    with Engine(index) as engine:
        dense, moe = engine.source.stage_layer(0), engine.source.stage_layer(1)
        for t in lengths:
            x = jnp.asarray(rng.standard_normal((t, cfg.hidden_size)).astype(np.float32))
            positions = jnp.arange(t, dtype=jnp.int32)
            began = compile_clock.now()
            exact = _programs(cfg, dense, moe, x, positions)
            compile_s[t] = compile_clock.compile_seconds(began, compile_clock.now())
            began = time.perf_counter()
            _programs(cfg, dense, moe, x, positions)
            run_s[t] = time.perf_counter() - began
            for b in (b for b in buckets if b >= t):
                padded = jnp.concatenate([x, jnp.zeros((b - t, cfg.hidden_size), jnp.float32)])
                got = _programs(cfg, dense, moe, padded, jnp.arange(b, dtype=jnp.int32))
                cases.append({"length": t, "bucket": b, **{f"{n}_bitwise": bool(np.array_equal(e, g[:t]))
                                                            for n, e, g in zip(names, exact, got)},
                              "max_abs_diff": float(max(np.abs(e[:t].astype(np.float64) - g[:t]).max()
                                                        for e, g in zip(exact[:3], got[:3])))})  # fmt: skip
    bitwise = [c for c in cases if all(c[f"{n}_bitwise"] for n in names)]
    emit({"benchmark": "length_buckets", "preset": args.preset, "machine": machine(), "cases": cases,
          "bitwise_cases": len(bitwise), "of_cases": len(cases),
          "lengths_not_bitwise": sorted({c["length"] for c in cases if c not in bitwise}),
          "compile_s_per_new_length": {str(t): round(s, 4) for t, s in compile_s.items()},
          "run_s_per_length": {str(t): round(s, 5) for t, s in run_s.items()}})  # fmt: skip


if __name__ == "__main__":
    main()
