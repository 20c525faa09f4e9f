"""Weights as the layers take them: one container family, one way to make a dense array, one matmul.

A stored weight becomes a container (:meth:`WeightPolicy.decode`) that keeps its stored bytes until
the matmul: :class:`Int4Weight` (pack-quantized), :class:`Fp8Weight` (block FP8) or
:class:`PlainWeight` (BF16/F32). Each is a pytree whose static fields say how it is dequantized
(``dequant``, see :mod:`kimi_jax.storage.codecs`) and which product it meets (``matmul``: the
manifest's ``compute.matmul``), so the jitted layer functions take no extra arguments and a program
compiled for one setting is never reused for another. Norm scales and biases stay plain arrays.

:func:`linear_f32` is the one matmul entry point: ``widened`` (the reference) widens the weight
whole to the activation dtype and multiplies once; ``stored`` multiplies the stored precision
(:mod:`kimi_jax.model.matmul`). A raw array is taken as a widened weight (the in-memory references
in the tests build parameters from plain tensors).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kimi_jax.config import DEFAULT_FP8_BLOCK
from kimi_jax.model.matmul import dense_product, plain_product, tile_rows, tiled_product
from kimi_jax.model.quant import dequant_fp8_block_jax, dequant_int4_jax
from kimi_jax.settings import EXACT, MATMUL_MODES
from kimi_jax.storage.checkpoint import CheckpointIndex, WeightEntry
from kimi_jax.storage.codecs import block_size_pair, check_dequant_mode
from kimi_jax.storage.formats import FORMATS

F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 shortcuts for float32 matmuls on GPU
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
WIDENED, STORED = "widened", "stored"


def _pytree(data: list[str], meta: list[str]):
    def register(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)

    return register


@_pytree(data=["packed", "scale"], meta=["in_features", "group_size", "dequant", "matmul"])
class Int4Weight:
    """A pack-quantized int4 linear weight kept packed inside JAX."""

    packed: jax.Array  # int32 [..., out, ceil(in/8)]
    scale: jax.Array  # bf16 [..., out, ceil(in/group_size)]
    in_features: int
    group_size: int
    dequant: str = EXACT  # exact | bf16-rounded
    matmul: str = WIDENED

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.in_features)

    def dequantize(self, dtype=F32) -> jax.Array:
        return dequant_int4_jax(self.packed, self.scale, self.in_features, self.group_size, dtype, self.dequant)


@_pytree(data=["weight", "scale_inv"], meta=["block_size", "dequant", "matmul"])
class Fp8Weight:
    """A block-FP8 linear weight kept as FP8 inside JAX."""

    weight: jax.Array  # float8_e4m3fn [..., out, in]
    scale_inv: jax.Array  # f32 [..., ceil(out/b0), ceil(in/b1)]
    block_size: tuple = DEFAULT_FP8_BLOCK
    dequant: str = EXACT  # exact | bf16-rounded
    matmul: str = WIDENED

    def __post_init__(self):
        object.__setattr__(self, "block_size", tuple(int(b) for b in self.block_size))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def dequantize(self, dtype=F32) -> jax.Array:
        return dequant_fp8_block_jax(self.weight, self.scale_inv, self.block_size, dtype, self.dequant)


@_pytree(data=["array"], meta=["matmul"])
class PlainWeight:
    """A BF16 or float32 linear weight ``[..., out, in]`` in its stored dtype."""

    array: jax.Array
    matmul: str = WIDENED

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def dequantize(self, dtype=F32) -> jax.Array:
        return jnp.asarray(self.array).astype(dtype)


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
    """The weight meets the stored-precision product."""
    return getattr(w, "matmul", WIDENED) == STORED


def materialize(w: Any, dtype) -> jax.Array:
    """A weight as a dense array of ``dtype``: containers dequantize, plain arrays are cast."""
    if hasattr(w, "dequantize"):
        return w.dequantize(dtype)
    return jnp.asarray(w).astype(dtype)


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
    ``matmul`` field names (a raw array is widened)."""
    if not is_stored(w):
        return dot_f32("...i,oi->...o", x, materialize(w, x.dtype))
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
    "DTYPES", "WIDENED", "STORED", "Int4Weight", "Fp8Weight", "PlainWeight", "WeightPolicy", "to_device",
    "is_stored", "materialize", "row_slice", "dot_f32", "linear_f32",
]
