"""Weights as the layers take them: made into containers once, multiplied through one entry point.

A stored weight becomes a container (:meth:`WeightPolicy.decode`, :mod:`kimi_jax.model.containers`)
that keeps its stored bytes until the matmul. Norm scales and biases stay plain arrays.

:func:`linear_f32` is the one matmul entry point, by the weight's ``matmul`` field:

* ``widened`` (the reference) widens the weight whole to the activation dtype and multiplies once;
* ``stored`` multiplies in the stored precision with XLA's products (:mod:`kimi_jax.model.matmul`);
* ``kernels`` multiplies in the stored precision with the CPU kernels (:mod:`kimi_jax.model.kernels`:
  the dequantized weight times the activation, rounded to float32, summed in float32, each row
  independent of the others), and takes the ``stored`` products where a kernel does not take the
  call (the extension is not built, a weight form the kernels do not handle, BF16 with more rows
  than :data:`BF16_KERNEL_ROWS`). Up to 32 rows (a batch of sequences, a token and its drafts) the
  BF16 kernels were 1.1-5x faster than XLA's product on every shape measured on 2026-12-07; at 128
  rows (a prompt) XLA's was as fast or faster on some (benchmarks/RESULTS.md section 13).

A raw array is taken as a widened weight (the in-memory references in the tests build parameters
from plain tensors).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kimi_jax.model.containers import (
    KERNELS,
    STORED,
    WIDENED,
    Fp8Weight,
    Int4Weight,
    PlainWeight,
    materialize,
)
from kimi_jax.model.kernels import kernel_linear
from kimi_jax.model.matmul import dense_product, plain_product, tile_rows, tiled_product
from kimi_jax.settings import EXACT, MATMUL_MODES
from kimi_jax.storage.checkpoint import CheckpointIndex, WeightEntry
from kimi_jax.storage.codecs import block_size_pair, check_dequant_mode
from kimi_jax.storage.formats import FORMATS

F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 shortcuts for float32 matmuls on GPU
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# BF16 products of more activation rows than this take XLA's blocked product (module doc).
BF16_KERNEL_ROWS = 32


@dataclasses.dataclass(frozen=True)
class WeightPolicy:
    """How stored weights become containers: the manifest's ``compute.dequant`` and ``compute.matmul``."""

    dequant: str = EXACT
    matmul: str = WIDENED

    def __post_init__(self):
        check_dequant_mode(self.dequant)
        if self.matmul not in MATMUL_MODES:
            raise ValueError(f"compute.matmul must be one of {MATMUL_MODES}, got {self.matmul!r}")

    def decode(self, entry: WeightEntry, parts: dict[str, Any], index: CheckpointIndex, check: bool = True) -> Any:
        """Stored parts -> the weight a layer takes: a container for a linear weight (two axes),
        the array itself for a norm scale or a bias.

        ``check=False`` when an int4 weight's ``weight_shape`` was already checked where it was read (a
        mesh process reads only its share of a weight, and only one process reads the metadata)."""
        compute = [parts[p] for p in FORMATS[entry.format].compute_parts]
        if entry.format == "plain":
            return PlainWeight(compute[0], self.matmul) if len(entry.shape) == 2 else compute[0]
        if entry.format == "int4":
            if check:
                entry.check_weight_shape(parts)
            return Int4Weight(*compute, in_features=entry.shape[1], group_size=index.config.quant.group_size,
                              dequant=self.dequant, matmul=self.matmul)  # fmt: skip
        return Fp8Weight(*compute, block_size=index.config.quant.fp8_block_size, dequant=self.dequant,
                         matmul=self.matmul)  # fmt: skip


def to_device(weight: Any) -> Any:
    """A decoded weight as device arrays (the reader's aligned buffers are adopted, not copied)."""
    return jax.tree_util.tree_map(jax.device_put, weight)


def is_stored(w: Any) -> bool:
    """The weight meets a stored-precision product (XLA's or the kernels')."""
    return getattr(w, "matmul", WIDENED) in (STORED, KERNELS)


def row_slice(w: Any, start: int, stop: int) -> Any:
    """Output rows ``start:stop`` of a plain weight (a container keeps its fields)."""
    if isinstance(w, PlainWeight):
        return dataclasses.replace(w, array=w.array[start:stop])
    return w[start:stop]


def dot_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum accumulated in float32. bfloat16 operands are widened first: that is exact, so the
    products and the float32 sum are those of a bf16 x bf16 -> f32 dot, which XLA's CPU backend
    rejects for some specs (``hts,sr->thr`` with s >= 8: "Unsupported element type for
    DotThunk", jax 0.10.2)."""
    return jnp.einsum(spec, a.astype(F32), b.astype(F32), precision=_HIGHEST, preferred_element_type=F32)


def linear_f32(x: jax.Array, w: Any) -> jax.Array:
    """``x @ w.T`` as the float32 accumulator, for an HF ``[out, in]`` weight: the product its
    ``matmul`` field names (a raw array is widened); see the module doc."""
    matmul = getattr(w, "matmul", WIDENED)
    if matmul == WIDENED:
        return dot_f32("...i,oi->...o", x, materialize(w, x.dtype))
    rows = int(x.size // x.shape[-1]) if x.shape[-1] else 0
    if matmul == KERNELS and not (isinstance(w, PlainWeight) and rows > BF16_KERNEL_ROWS):
        y = kernel_linear(x, w)
        if y is not None:
            return y
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in)
    if isinstance(w, PlainWeight):
        y = plain_product(x2, w.array)
    else:
        block = block_size_pair(w.block_size)[0] if isinstance(w, Fp8Weight) else 1
        rows = tile_rows(w.shape[-2], w.shape[-1], block) if len(w.shape) == 2 else w.shape[-2]
        y = tiled_product(x2, w, rows) if rows < w.shape[-2] else dense_product(x2, w.dequantize(x2.dtype))
    return y.reshape(*lead, y.shape[-1])


__all__ = [
    "DTYPES", "WIDENED", "STORED", "KERNELS", "BF16_KERNEL_ROWS", "Int4Weight", "Fp8Weight", "PlainWeight",
    "WeightPolicy", "to_device", "is_stored", "materialize", "row_slice", "dot_f32", "linear_f32",
]
