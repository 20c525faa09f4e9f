"""Stored-precision vs widened matmuls at Kimi K2.5's shapes, side by side in one run.

For each weight format (BF16, int4 pack-quantized) and shape (an expert's gate/up [2048, 7168] and
down [7168, 2048], the attention output [7168, 8192]), the median time of one jitted
``x @ W.T`` with ``compute.matmul: widened`` (the weight widened whole to float32, then one dot)
and ``stored`` (kimi_jax.model.matmul), for T = 1 (decode) and T = 8 rows, the ratio, and the
largest float32 buffer in each program's optimized HLO (the widened one holds the whole weight).

    python benchmarks/matmul.py [--repeats 20] [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import emit, machine

from kimi_jax.model.weights import Int4Weight, PlainWeight, linear_f32
from kimi_jax.storage.codecs import BF16, pack_int4

SHAPES = {"expert gate/up": (2048, 7168), "expert down": (7168, 2048), "attention o_proj": (7168, 8192)}
SMOKE_SHAPES = {"small": (256, 512)}


def weight(fmt: str, n_out: int, n_in: int, rng, matmul: str) -> object:
    """A weight of ``fmt`` meeting the ``matmul`` product (the same values whatever the product)."""
    if fmt == "bf16":
        return PlainWeight(jnp.asarray(rng.standard_normal((n_out, n_in)).astype(BF16)), matmul)
    codes = rng.integers(-8, 8, (n_out, n_in)).astype(np.int8)
    scale = rng.uniform(1e-3, 2e-2, (n_out, n_in // 32)).astype(BF16)
    return Int4Weight(jnp.asarray(pack_int4(codes)), jnp.asarray(scale), in_features=n_in, group_size=32,
                      matmul=matmul)  # fmt: skip


def median_s(fn, args, repeats: int) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def largest_f32(fn, args) -> int:
    text = fn.lower(*args).compile().as_text()
    return max(int(np.prod([int(d) for d in dims.split(",")])) for dims in re.findall(r"f32\[([0-9,]+)\]", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    shapes, repeats = (SMOKE_SHAPES, 3) if args.smoke else (SHAPES, args.repeats)
    emit({"benchmark": "matmul", "machine": machine(), "repeats": repeats})
    rng = np.random.default_rng(0)
    linear = jax.jit(linear_f32)
    for fmt in ("bf16", "int4"):
        for name, (n_out, n_in) in shapes.items():
            seed = int(rng.integers(2**31))
            ws = weight(fmt, n_out, n_in, np.random.default_rng(seed), "stored")
            w = weight(fmt, n_out, n_in, np.random.default_rng(seed), "widened")
            for t in (1, 8):
                x = jnp.asarray(rng.standard_normal((t, n_in)).astype(np.float32))
                widened, stored = functools.partial(linear, x), functools.partial(linear, x)
                a, b = median_s(widened, (w,), repeats), median_s(stored, (ws,), repeats)
                y_w, y_s = np.asarray(linear(x, w)), np.asarray(linear(x, ws))
                emit({"format": fmt, "shape": name, "out_in": [n_out, n_in], "rows": t, "widened_ms": round(a * 1e3, 3),
                      "stored_ms": round(b * 1e3, 3), "stored_over_widened": round(b / a, 3),
                      "bitwise_equal": bool(np.array_equal(y_w, y_s)),
                      "max_rel_diff": float(np.max(np.abs(y_w - y_s)) / np.max(np.abs(y_w))),
                      "largest_f32_elements": {"widened": largest_f32(linear, (x, w)),
                                               "stored": largest_f32(linear, (x, ws))}})  # fmt: skip


if __name__ == "__main__":
    main()
