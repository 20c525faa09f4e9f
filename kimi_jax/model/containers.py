"""The weight containers: a linear weight as a pytree that keeps its stored bytes until the matmul.

:class:`Int4Weight` (pack-quantized), :class:`Fp8Weight` (block FP8) and :class:`PlainWeight`
(BF16/F32). Each carries, as static fields, how it is dequantized (``dequant``, see
:mod:`kimi_jax.storage.codecs`) and which product it meets (``matmul``: the manifest's
``compute.matmul``), so the jitted layer functions take no extra arguments and a program compiled
for one setting is never reused for another. :mod:`kimi_jax.model.weights` makes them and runs
their products.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kimi_jax.config import DEFAULT_FP8_BLOCK
from kimi_jax.model.quant import dequant_fp8_block_jax, dequant_int4_jax
from kimi_jax.settings import EXACT

F32 = jnp.float32
WIDENED, STORED, KERNELS = "widened", "stored", "kernels"


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


def materialize(w: Any, dtype) -> jax.Array:
    """A weight as a dense array of ``dtype``: containers dequantize, plain arrays are cast."""
    if hasattr(w, "dequantize"):
        return w.dequantize(dtype)
    return jnp.asarray(w).astype(dtype)


__all__ = ["WIDENED", "STORED", "KERNELS", "Int4Weight", "Fp8Weight", "PlainWeight", "materialize"]
