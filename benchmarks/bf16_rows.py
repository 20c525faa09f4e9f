"""BF16 products by the CPU kernels against XLA's, as the number of activation rows grows.

    python benchmarks/bf16_rows.py [--rows 1,8,32,128,512] [--repeats 7]

For each weight shape (Kimi K2.5's attention and head, the medium model's), the median wall time
of ``x [rows, in] @ w.T`` for a BF16 ``w`` through ``compute.matmul: kernels`` (the CPU kernel) and
through ``stored`` (XLA's product of the stored BF16), each jitted and warmed up first, side by side
in one invocation. It decides whether the kernels take BF16 products of many rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import ml_dtypes
import numpy as np
from common import emit, machine

from kimi_jax.model.kernels.ops import kernel_linear
from kimi_jax.model.weights import KERNELS, STORED, PlainWeight, linear_f32

SHAPES = {  # [out, in]
    "k25 q_a": (1536, 7168), "k25 kv_a": (576, 7168), "k25 q_b": (12288, 1536), "k25 kv_b": (16384, 512),
    "k25 o_proj": (7168, 8192), "medium head": (32768, 1024), "medium dense up": (2816, 1024),
    "medium o_proj": (1024, 512),
}  # fmt: skip


def median_ms(f, x, w, repeats: int) -> float:
    f(x, w).block_until_ready()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        f(x, w).block_until_ready()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32,128,512")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    shapes = {"small": (64, 128)} if args.smoke else SHAPES
    rows = [1, 8] if args.smoke else [int(r) for r in args.rows.split(",")]
    emit({"benchmark": "bf16_rows", "machine": machine(), "repeats": args.repeats})
    kernel = jax.jit(lambda x, w: kernel_linear(x, PlainWeight(w, KERNELS)))
    xla = jax.jit(lambda x, w: linear_f32(x, PlainWeight(w, STORED)))
    rng = np.random.default_rng(0)
    for name, (out_f, in_f) in shapes.items():
        w = jax.numpy.asarray(rng.standard_normal((out_f, in_f)).astype(ml_dtypes.bfloat16))
        for t in rows:
            x = jax.numpy.asarray(rng.standard_normal((t, in_f)).astype(np.float32))
            k_ms, x_ms = median_ms(kernel, x, w, args.repeats), median_ms(xla, x, w, args.repeats)
            emit({"shape": name, "out": out_f, "in": in_f, "rows": t, "kernel_ms": round(k_ms, 3),
                  "xla_ms": round(x_ms, 3), "xla_over_kernel": round(x_ms / k_ms, 2)})  # fmt: skip


if __name__ == "__main__":
    main()
