"""The CPU kernels (kimi_jax.model.kernels) against today's XLA paths, with the memory floor, in one run.

First the machine's memory bandwidth, with the kernels' own threads over arrays far larger than the
last-level cache: a read, a copy and the STREAM triad ``b = a + 3 c``. Then each kernel at Kimi
K2.5 / K2 shapes, timed side by side (rounds interleave the variants, so load on a shared machine
hits them alike) against ``compute.matmul: stored`` and ``widened``: median and best wall time,
weight bytes per second, that as a fraction of the measured read bandwidth, and the largest
difference from the stored path (relative to the largest |y|). Every timed call reads a different
copy of its weights, cycling through more bytes than the cache holds, so the figures are
memory-speed figures, not cache-speed ones:

* INT4 (group 32) expert products, gate/up [2048, 7168] and down [7168, 2048], T = 1, 8, 32;
* BF16 attention products of K2.5 (q_a [1536, 7168], q_b [12288, 1536], kv_a [576, 7168],
  kv_b [16384, 512], o [7168, 8192]) at T = 1, o also at T = 8;
* BF16 [256, 1024] (an expert of the medium model) and [16, 64], 32 calls chained in one program:
  time per expert product, and the fixed cost of a call (the tiny product less the chain's own ops);
* FP8 (128 x 128 blocks) at K2's expert and o_proj shapes, T = 1 and 8;
* the routed experts of one K2.5 MoE layer (8 INT4 experts) in one call, T = 1 and 8, against
  :func:`kimi_jax.model.layers.routed_experts` on the same stack.

``--callgrind`` adds each kernel's instruction count per call, from one call under
``valgrind --tool=callgrind`` with one thread (counts repeat exactly on a busy machine). Valgrind
cannot run AVX-512, so these counts are the AVX2 path's; the AVX-512 path's instructions per
chunk are in benchmarks/RESULTS.md, from the disassembly.

* threading: the INT4 product, the chained BF16 products and the MoE layer with one thread, our own
  worker pool and XLA's intra-op pool (``jax.ffi``'s thread pool), rounds interleaved.

    python benchmarks/cpu_kernels.py [--repeats 10] [--smoke] [--callgrind] [--only int4,bf16,fixed,fp8,moe,threading]
"""

from __future__ import annotations

import argparse
import dataclasses
import ctypes
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import emit, machine
from cpu_kernels_callgrind import SPECS, TOGGLES, spec_bytes

from kimi_jax.model import kernels
from kimi_jax.model.kernels._library import library_path
from kimi_jax.model.layers import routed_experts
from kimi_jax.model.matmul import dense_product
from kimi_jax.model.params import ExpertStack
from kimi_jax.model.weights import Fp8Weight, Int4Weight, PlainWeight, linear_f32, materialize
from kimi_jax.storage.codecs import BF16, pack_int4

def StoredWeight(w):
    """``w`` (a container or a plain array) meeting the stored-precision product."""
    return dataclasses.replace(w, matmul="stored") if hasattr(w, "matmul") else PlainWeight(w, "stored")


def stored_linear(x, w):
    """Today's ``stored`` path: XLA's products on the weight as stored."""
    return linear_f32(x, StoredWeight(w))


def widened_linear(x, w):
    """The reference: the weight widened whole, one product."""
    return dense_product(x, materialize(w, x.dtype))


ROTATE_BYTES = 160 << 20  # weights cycled through per case: five times a 32 MiB last-level cache
BANDWIDTH_BYTES = 1 << 30

INT4 = {"expert gate/up": (2048, 7168), "expert down": (7168, 2048)}
BF16_ATTN = {"q_a_proj": (1536, 7168), "q_b_proj": (12288, 1536), "kv_a_proj_with_mqa": (576, 7168),
             "kv_b_proj": (16384, 512), "o_proj": (7168, 8192)}  # fmt: skip
FP8 = {"expert gate/up": (2048, 7168), "o_proj": (7168, 8192)}
SMOKE = {"int4": {"small": (64, 256)}, "bf16": {"small": (64, 256)}, "fp8": {"small": (64, 256)}}


# ------------------------------------------------------------------------------------------ weights


def int4_weight(rng, *shape):
    *lead, n_out, n_in = shape
    codes = rng.integers(-8, 8, shape).astype(np.int8)
    scale = rng.uniform(1e-3, 2e-2, (*lead, n_out, n_in // 32)).astype(BF16)
    return Int4Weight(jnp.asarray(pack_int4(codes)), jnp.asarray(scale), in_features=n_in, group_size=32)


def fp8_weight(rng, n_out, n_in):
    raw = rng.integers(0, 0x7F, (n_out, n_in)).astype(np.uint8)
    scale = rng.uniform(1e-4, 1e-2, (-(-n_out // 128), -(-n_in // 128))).astype(np.float32)
    return Fp8Weight(jnp.asarray(raw.view(jnp.float8_e4m3fn)), jnp.asarray(scale), (128, 128))


def bf16_weight(rng, n_out, n_in):
    return jnp.asarray(rng.standard_normal((n_out, n_in)).astype(BF16))


def nbytes(w) -> int:
    return sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(w))


def copies(make, rng, shape, smoke: bool) -> list:
    first = make(rng, *shape)
    n = 1 if smoke else max(1, -(-ROTATE_BYTES // nbytes(first)))
    # copies of one matrix (values do not change the timing): device_put of a fresh buffer each
    return [first] + [jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), first) for _ in range(n - 1)]


# -------------------------------------------------------------------------------------------- timing


def timed(variants: dict, args_of, repeats: int, n_copies: int) -> dict:
    """{name: (median_s, best_s)}: round r calls every variant once, on copy r % n_copies."""
    for fn in variants.values():
        jax.block_until_ready(fn(*args_of(0)))
    times = {name: [] for name in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            args = args_of(r % n_copies)
            started = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - started)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# ------------------------------------------------------------------------------------------ bandwidth


def bandwidth(smoke: bool) -> dict:
    lib = ctypes.CDLL(str(library_path()))
    lib.kimi_jax_stream.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.kimi_jax_stream.restype = ctypes.c_uint64
    n = (16 << 20) if smoke else BANDWIDTH_BYTES
    a, b, c = (np.ones(n // 4, np.float32) for _ in range(3))

    def best(kind, moved, reps=5):
        out = []
        for _ in range(reps):
            started = time.perf_counter()
            lib.kimi_jax_stream(kind, a.ctypes.data, b.ctypes.data, c.ctypes.data, n)
            out.append(moved / (time.perf_counter() - started) / 1e9)
        return round(max(out), 2), round(statistics.median(out), 2)

    read, copy, triad = best(0, n), best(1, 2 * n), best(2, 3 * n)
    started = time.perf_counter()
    np.copyto(b, a)
    numpy_copy = 2 * n / (time.perf_counter() - started) / 1e9
    return {"bytes": n, "threads": kernels.kernel_info().get("threads"), "read_gbs": read[0], "read_gbs_median": read[1],
            "copy_gbs": copy[0], "copy_gbs_median": copy[1], "triad_gbs": triad[0], "triad_gbs_median": triad[1],
            "numpy_copy_gbs_one_thread": round(numpy_copy, 2)}  # fmt: skip


# ---------------------------------------------------------------------------------------------- cases


def linear_case(fmt, name, shape, rows, ws, rng, repeats, read_gbs, with_widened=True) -> dict:
    n_out, n_in = shape
    xs = [jnp.asarray(rng.standard_normal((t, n_in)).astype(np.float32)) for t in rows]
    variants = {"kernel": jax.jit(kernels.kernel_linear), "stored": jax.jit(stored_linear)}
    if with_widened:
        variants["widened"] = jax.jit(widened_linear)
    out = []
    for x in xs:
        got = timed(variants, lambda i, x=x: (x, ws[i]), repeats, len(ws))
        y_k = np.asarray(variants["kernel"](x, ws[0]))
        y_s = np.asarray(variants["stored"](x, ws[0]))
        w_bytes = nbytes(ws[0])
        rec = {"kernel": fmt, "shape": name, "out_in": [n_out, n_in], "rows": int(x.shape[0]), "weight_bytes": w_bytes,
               "copies": len(ws), "load_average": load_average()}  # fmt: skip
        for k, (med, best) in got.items():
            rec[f"{k}_ms"] = round(med * 1e3, 3)
            rec[f"{k}_best_ms"] = round(best * 1e3, 3)
        rec["kernel_gbs"] = round(w_bytes / got["kernel"][0] / 1e9, 2)
        rec["kernel_best_gbs"] = round(w_bytes / got["kernel"][1] / 1e9, 2)
        rec["fraction_of_read_bandwidth"] = round(rec["kernel_gbs"] / read_gbs, 3)
        rec["stored_over_kernel"] = round(got["stored"][0] / got["kernel"][0], 2)
        rec["max_rel_diff_vs_stored"] = float(np.max(np.abs(y_k - y_s)) / np.max(np.abs(y_s)))
        emit(rec)
        out.append(rec)
    return out


def fixed_cost_case(rng, repeats, read_gbs, smoke) -> list:
    """Products chained in one program (each output, repeated, is the next input): per product, the
    expert-size [256, 1024] BF16 product, and the fixed cost of one call, from [16, 64] products (whose
    bytes take nanoseconds) less the same chain with the product replaced by a slice."""
    chain_len = 4 if smoke else 32
    out = []
    for n_out, n_in in ((16, 64), (256, 1024)):
        n_sets = 1 if smoke or n_out == 16 else 8  # 8 x 32 x 512 KiB = 128 MiB cycled
        sets = [[bf16_weight(rng, n_out, n_in) for _ in range(chain_len)] for _ in range(n_sets)]

        def chain(product, reps=n_in // n_out):
            def run(x, ws):
                for w in ws:
                    x = jnp.concatenate([product(x, w)] * reps, axis=-1)
                return x
            return jax.jit(run)

        variants = {"kernel": chain(kernels.kernel_linear), "stored": chain(stored_linear),
                    "slice": chain(lambda x, w: x[:, : w.shape[0]])}  # fmt: skip
        x = jnp.asarray(rng.standard_normal((1, n_in)).astype(np.float32))
        got = timed(variants, lambda i: (x, sets[i]), repeats, n_sets)
        w_bytes = n_out * n_in * 2
        rec = {"kernel": "bf16", "shape": f"[{n_out}, {n_in}], chained", "products_per_program": chain_len,
               "weight_bytes": w_bytes, "load_average": load_average()}  # fmt: skip
        for k, (med, best) in got.items():
            rec[f"{k}_us_per_product"] = round(med / chain_len * 1e6, 2)
            rec[f"{k}_best_us_per_product"] = round(best / chain_len * 1e6, 2)
        # per product less the chain's own ops: for [16, 64] that is the fixed cost of one call
        rec["kernel_net_us"] = round((got["kernel"][0] - got["slice"][0]) / chain_len * 1e6, 2)
        rec["stored_net_us"] = round((got["stored"][0] - got["slice"][0]) / chain_len * 1e6, 2)
        rec["kernel_gbs"] = round(w_bytes / (got["kernel"][0] / chain_len) / 1e9, 2)
        rec["fraction_of_read_bandwidth"] = round(rec["kernel_gbs"] / read_gbs, 3)
        emit(rec)
        out.append(rec)
    return out


def moe_case(rng, repeats, read_gbs, smoke) -> list:
    n, inter, hidden = (2, 64, 128) if smoke else (8, 2048, 7168)
    n_sets = 1 if smoke else 1  # 8 experts x 24.8 MB = 198 MB: already far beyond the cache
    stack = ExpertStack(*(StoredWeight(int4_weight(rng, n, o, i)) for o, i in ((inter, hidden), (inter, hidden), (hidden, inter))))
    w_bytes = nbytes(stack)
    out = []
    for t in (1, 8):
        x = jnp.asarray((0.5 * rng.standard_normal((t, hidden))).astype(np.float32))
        slots = jnp.asarray(np.stack([rng.permutation(n)[: min(n, 8)] for _ in range(t)]).astype(np.int32))
        weights = jnp.asarray(rng.uniform(0.1, 1.0, slots.shape).astype(np.float32))
        variants = {"kernel": jax.jit(kernels.kernel_routed_experts), "xla": jax.jit(routed_experts)}
        got = timed(variants, lambda i: (stack, slots, weights, x), repeats, n_sets)
        y_k = np.asarray(variants["kernel"](stack, slots, weights, x))
        y_x = np.asarray(variants["xla"](stack, slots, weights, x))
        rec = {"kernel": "routed experts (int4)", "experts": n, "inter_hidden": [inter, hidden], "rows": t,
               "weight_bytes": w_bytes, "load_average": load_average()}  # fmt: skip
        for k, (med, best) in got.items():
            rec[f"{k}_ms"] = round(med * 1e3, 3)
            rec[f"{k}_best_ms"] = round(best * 1e3, 3)
        rec["kernel_gbs"] = round(w_bytes / got["kernel"][0] / 1e9, 2)
        rec["fraction_of_read_bandwidth"] = round(rec["kernel_gbs"] / read_gbs, 3)
        rec["xla_over_kernel"] = round(got["xla"][0] / got["kernel"][0], 2)
        rec["max_rel_diff_vs_xla"] = float(np.max(np.abs(y_k - y_x)) / np.max(np.abs(y_x)))
        emit(rec)
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------- threading

POOL_CODES = {"one thread": (1, 0), "own pool": (None, 1), "XLA's pool": (None, 2)}


def threading_case(rng, repeats, smoke) -> dict:
    """The same calls with one thread, our own pool and XLA's intra-op pool, rounds interleaved in one
    process (the library is reconfigured between calls; the default comes back at the end)."""
    from kimi_jax.model.kernels import _library

    lib = ctypes.CDLL(str(library_path()))
    lib.kimi_jax_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    threads = kernels.kernel_info()["threads"]

    def configure(pool):
        n, code = POOL_CODES[pool]
        lib.kimi_jax_configure(n or threads, code, _library.SPIN_US, _library.MIN_PARALLEL_BYTES, _library.TASK_BYTES)

    shape = (64, 256) if smoke else (2048, 7168)
    ws = copies(int4_weight, rng, shape, smoke)
    x = jnp.asarray(rng.standard_normal((1, shape[1])).astype(np.float32))
    chain_len = 4 if smoke else 32
    chain_sets = [[bf16_weight(rng, 256, 1024) for _ in range(chain_len)] for _ in range(1 if smoke else 8)]
    xc = jnp.asarray(rng.standard_normal((1, 1024)).astype(np.float32))

    @jax.jit
    def chain(x, ws):
        for w in ws:
            y = kernels.kernel_linear(x, w)
            x = jnp.concatenate([y, y, y, y], axis=-1)
        return x

    n, inter, hidden = (2, 64, 128) if smoke else (8, 2048, 7168)
    stack = ExpertStack(*(int4_weight(rng, n, o, i) for o, i in ((inter, hidden), (inter, hidden), (hidden, inter))))
    slots = jnp.asarray(rng.permutation(n)[None].astype(np.int32))
    cw = jnp.asarray(rng.uniform(0.1, 1.0, (1, n)).astype(np.float32))
    xm = jnp.asarray(rng.standard_normal((1, hidden)).astype(np.float32))
    linear, moe = jax.jit(kernels.kernel_linear), jax.jit(kernels.kernel_routed_experts)
    calls = {f"int4 {shape[0]}x{shape[1]} T=1": lambda r: linear(x, ws[r % len(ws)]),
             f"bf16 256x1024 x{chain_len} chained": lambda r: chain(xc, chain_sets[r % len(chain_sets)]),
             f"routed experts, {n} int4 experts [{inter}, {hidden}], T=1": lambda r: moe(stack, slots, cw, xm)}  # fmt: skip
    times = {(c, p): [] for c in calls for p in POOL_CODES}
    for call in calls.values():
        jax.block_until_ready(call(0))
    for r in range(repeats):
        for pool in POOL_CODES:
            configure(pool)
            for c, call in calls.items():
                started = time.perf_counter()
                jax.block_until_ready(call(r))
                times[(c, pool)].append(time.perf_counter() - started)
    configure({"none": "one thread", "own": "own pool", "xla": "XLA's pool"}[kernels.kernel_info()["pool"]])
    rec = {"threading": {c: {p: {"median_ms": round(statistics.median(times[(c, p)]) * 1e3, 3),
                                 "best_ms": round(min(times[(c, p)]) * 1e3, 3)} for p in POOL_CODES} for c in calls},
           "threads": threads, "load_average": load_average()}  # fmt: skip
    emit(rec)
    return rec


# ----------------------------------------------------------------------------------------- callgrind


def callgrind_all(names) -> None:
    """Each spec of cpu_kernels_callgrind.py once under callgrind: instructions of the kernel's own work."""
    if shutil.which("valgrind") is None:
        emit({"callgrind": "skipped", "why": "valgrind is not installed (Debian: apt-get install valgrind)"})
        return
    child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels_callgrind.py")
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "callgrind.out")
            proc = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *TOGGLES[SPECS[name][0] == "moe"],
                                   sys.executable, child, name], capture_output=True, text=True, timeout=1800)  # fmt: skip
            found = re.search(r"Collected : (\d+)", proc.stderr)
            rec = {"callgrind": name, "isa": "avx2", "threads": 1}
            if proc.returncode != 0 or not found:
                rec["error"] = proc.stderr[-500:]
            else:
                rec["instructions"] = int(found.group(1))
                rec["weight_bytes"] = spec_bytes(name)
                rec["instructions_per_weight_byte"] = round(rec["instructions"] / rec["weight_bytes"], 3)
            emit(rec)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--only", default="int4,bf16,fixed,fp8,moe,threading")
    args = parser.parse_args()
    if not kernels.available():
        emit({"benchmark": "kernels", "error": f"kernels unavailable: {kernels.unavailable_reason()}"})
        sys.exit(1)
    only = set(args.only.split(","))
    repeats = 2 if args.smoke else args.repeats
    emit({"benchmark": "kernels", "machine": machine(), "kernel_info": kernels.kernel_info(), "repeats": repeats,
          "load_average": load_average()})  # fmt: skip
    bw = bandwidth(args.smoke)
    emit({"bandwidth": bw, "load_average": load_average()})
    read_gbs = bw["read_gbs"]
    rng = np.random.default_rng(0)
    int4_shapes = SMOKE["int4"] if args.smoke else INT4
    bf16_shapes = SMOKE["bf16"] if args.smoke else BF16_ATTN
    fp8_shapes = SMOKE["fp8"] if args.smoke else FP8
    if "int4" in only:
        for name, shape in int4_shapes.items():
            linear_case("int4", name, shape, (1, 8, 32), copies(int4_weight, rng, shape, args.smoke), rng, repeats, read_gbs)
    if "bf16" in only:
        for name, shape in bf16_shapes.items():
            rows = (1, 8) if name in ("o_proj", "small") else (1,)
            linear_case("bf16", name, shape, rows, copies(bf16_weight, rng, shape, args.smoke), rng, repeats, read_gbs)
    if "fixed" in only:
        fixed_cost_case(rng, repeats, read_gbs, args.smoke)
    if "fp8" in only:
        for name, shape in fp8_shapes.items():
            linear_case("fp8", name, shape, (1, 8), copies(fp8_weight, rng, shape, args.smoke), rng, repeats, read_gbs)
    if "moe" in only:
        moe_case(rng, max(2, repeats // 2), read_gbs, args.smoke)
    if "threading" in only:
        threading_case(rng, repeats, args.smoke)
    if args.callgrind:
        callgrind_all(list(SPECS) if not args.smoke else ["bf16 256x1024 T=1"])


if __name__ == "__main__":
    main()
