"""CPU kernels for the engine's products, as XLA custom calls (``jax.ffi``).

What they compute (``src/``, built by ``pip install -e .``; see setup.py):

* INT4 pack-quantized (group a multiple of 8, BF16 scales), FP8 E4M3 with block scales, and BF16
  weights times float32 (or bfloat16, widened exactly) activations: every product is the
  dequantized weight (``exact`` or ``bf16-rounded``, bit for bit as
  :mod:`kimi_jax.model.quant` defines it) times the activation, rounded to float32, and the
  products are summed in float32. Nothing is unpacked to memory: nibbles, FP8 bytes and BF16 halves
  are widened in registers.
* The routed experts of a MoE layer in one call (gate, up, SiLU, down, weighted sum), each picked
  expert's bytes read once.

Summation order: per output row and activation row, two float32 accumulators of SIMD width W (16
lanes with AVX-512, 8 otherwise) take the products column chunk by chunk (fused multiply-add; the
portable path rounds each product, then adds), then a fixed tree adds them. The order never depends
on how many rows are computed together or by which thread, so a row's result is the same alone or in
a batch. Against the exact sum a result errs by at most ``gamma(m) * sum_i |w_i x_i|``, where
``m = n / (2W) + 2 + log2(W) <= n / 16 + 10`` bounds the roundings on any one term's path and
``gamma(m) = m u / (1 - m u)``, u = 2^-24 (``tests/test_kernels.py`` holds every kernel to it).

The instruction set (AVX-512, AVX2+FMA+F16C, portable C++) is chosen by CPUID when the library
loads; it can change bits, so :func:`kernel_info` reports it, with the kernel set's version, for the
ledger and the platform fingerprint. Settings: see :mod:`kimi_jax.model.kernels._library`.
"""

from __future__ import annotations

from kimi_jax.model.kernels._library import ISAS, library
from kimi_jax.model.kernels.ops import kernel_linear, kernel_routed_experts

KERNEL_SET = "kimi-jax-cpu"


def available() -> bool:
    """Whether the kernels can run in this process (built, loaded, registered, not switched off)."""
    return library().available


def unavailable_reason() -> str | None:
    """Why the kernels are unavailable (one line for the engine to say once), or None."""
    return library().reason


def run_record() -> dict:
    """What a run that asks for the kernels records: their set and instruction set (both can change
    bits), or why they are unavailable (then the XLA products ran)."""
    lib = library()
    if not lib.available:
        return {"kernel_set": None, "isa": None, "unavailable": lib.reason}
    return {"kernel_set": f"{KERNEL_SET}/{lib.kernel_set_version}", "isa": lib.isa}


def kernel_info() -> dict:
    """A small JSON-able description for the ledger and the platform fingerprint."""
    lib = library()
    if not lib.available:
        return {"kernel_set": None, "available": False, "reason": lib.reason}
    return {"kernel_set": f"{KERNEL_SET}/{lib.kernel_set_version}", "available": True, "isa": lib.isa,
            "supported_isas": list(lib.supported_isas), "threads": lib.threads, "pool": lib.pool}  # fmt: skip


__all__ = ["ISAS", "KERNEL_SET", "available", "unavailable_reason", "run_record", "kernel_info", "kernel_linear",
           "kernel_routed_experts"]  # fmt: skip
