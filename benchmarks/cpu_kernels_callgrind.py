"""One raw kernel call (no XLA, one thread, the AVX2 path), for ``benchmarks/cpu_kernels.py --callgrind``
to count under ``valgrind --tool=callgrind``. Imports neither JAX nor the kimi_jax.model package
(slow under valgrind): the library is found next to the sources and called through ctypes.

    valgrind --tool=callgrind --toggle-collect='*run_tasks*' ... python benchmarks/cpu_kernels_callgrind.py "int4 2048x7168 T=1"
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kimi_jax.storage.codecs import BF16, pack_int4  # noqa: E402 (numpy and ml_dtypes only)

# name: (format code, n_out, n_in, rows) for kimi_jax_linear_raw, or ("moe", experts, inter, hidden)
SPECS = {
    "int4 2048x7168 T=1": (0, 2048, 7168, 1), "int4 7168x2048 T=1": (0, 7168, 2048, 1),
    "int4 2048x7168 T=8": (0, 2048, 7168, 8), "fp8 2048x7168 T=1": (1, 2048, 7168, 1),
    "bf16 7168x8192 T=1": (2, 7168, 8192, 1), "bf16 256x1024 T=1": (2, 256, 1024, 1),
    "routed experts int4 2x(2048,7168) T=1": ("moe", 2, 2048, 7168),
}  # fmt: skip
# The kernel's own work: a product's preparation and rows, or the whole layer (toggles nest, so the
# layer's inner functions must not toggle too).
TOGGLES = {False: ["--toggle-collect=kj::*run_tasks*", "--toggle-collect=*prepare(kj::Format*"],
           True: ["--toggle-collect=kj::*run_routed*"]}  # fmt: skip


def spec_bytes(name: str) -> int:
    what = SPECS[name]
    if what[0] == "moe":
        _, n, inter, hidden = what
        return n * 3 * (inter * hidden // 2 + inter * hidden // 32 * 2)  # codes and bf16 scales
    fmt, n_out, n_in, _ = what
    return {0: n_out * n_in // 2 + n_out * n_in // 32 * 2, 1: n_out * n_in, 2: 2 * n_out * n_in}[fmt]


def library() -> ctypes.CDLL:
    here = Path(__file__).resolve().parents[1] / "kimi_jax" / "model" / "kernels"
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"_kimi_jax_kernels{suffix}").is_file():
            return ctypes.CDLL(str(here / f"_kimi_jax_kernels{suffix}"))
    raise SystemExit("the compiled kernels are not built (pip install -e .)")


def main(name: str) -> None:
    lib = library()
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.kimi_jax_configure.argtypes = [C, C, C, I, I]
    lib.kimi_jax_configure(1, 0, 0, 1 << 40, 64 << 10)
    rng = np.random.default_rng(0)
    what = SPECS[name]
    avx2 = 1
    if what[0] == "moe":
        _, n, inter, hidden = what
        mats = []
        for o, i in ((inter, hidden), (inter, hidden), (hidden, inter)):
            mats += [pack_int4(rng.integers(-8, 8, (n, o, i)).astype(np.int8)),
                     rng.uniform(1e-3, 2e-2, (n, o, i // 32)).astype(BF16)]  # fmt: skip
        x = rng.standard_normal((1, hidden)).astype(np.float32)
        slots = rng.permutation(n)[None].astype(np.int32)
        comb = rng.uniform(0, 1, (1, n)).astype(np.float32)
        out = np.zeros((1, hidden), np.float32)
        lib.kimi_jax_routed_experts_raw.argtypes = [C, C, C, P, I, I, I, I] + [P] * 6 + [I, I, I, P, P, I, P]
        rc = lib.kimi_jax_routed_experts_raw(0, 0, avx2, x.ctypes.data, 1, hidden, inter, n,
                                             *(m.ctypes.data for m in mats), 32, 1, 1, slots.ctypes.data,
                                             comb.ctypes.data, n, out.ctypes.data)  # fmt: skip
    else:
        fmt, n_out, n_in, t = what
        if fmt == 0:
            w = pack_int4(rng.integers(-8, 8, (n_out, n_in)).astype(np.int8))
            s = rng.uniform(1e-3, 2e-2, (n_out, n_in // 32)).astype(BF16)
        elif fmt == 1:
            w = rng.integers(0, 0x7F, (n_out, n_in)).astype(np.uint8)
            s = rng.uniform(1e-4, 1e-2, (-(-n_out // 128), -(-n_in // 128))).astype(np.float32)
        else:
            w = rng.standard_normal((n_out, n_in)).astype(BF16)
            s = w
        x = rng.standard_normal((t, n_in)).astype(np.float32)
        y = np.zeros((t, n_out), np.float32)
        lib.kimi_jax_linear_raw.argtypes = [C, C, C, P, C, I, I, P, P, I, I, I, I, P]
        rc = lib.kimi_jax_linear_raw(fmt, 0, avx2, x.ctypes.data, 0, t, n_in, w.ctypes.data, s.ctypes.data, n_out, 32,
                                     128, 128, y.ctypes.data)  # fmt: skip
    if rc != 0:
        raise SystemExit("the AVX2 path is not available here")


if __name__ == "__main__":
    main(sys.argv[1])
