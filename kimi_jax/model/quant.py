"""Quantized weights kept packed inside JAX (pytrees) until the matmul: int4 pack-quantized and
block FP8. The stored formats, their numpy decoders and the two dequantization modes (``exact``,
``bf16-rounded``) are in :mod:`kimi_jax.storage.codecs`; the functions here give the same bits.

A container carries its mode as static metadata, so the jitted layer functions need no extra
argument and a program compiled for one mode is never reused for the other. Whatever the mode,
a weight materialized as bfloat16 (``compute.dtype: bfloat16``) is the product rounded once to
bfloat16: both modes give the same matmul input there."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kimi_jax.config import DEFAULT_FP8_BLOCK
from kimi_jax.storage.codecs import (
    EXACT,
    NIBBLE_SHIFTS,
    block_size_pair,
    cdiv,
    check_dequant_mode,
    check_shape,
)


def _round_to_bf16_bits(x: jax.Array) -> jax.Array:
    """f32 -> uint32 bit pattern rounded to bf16 (round-to-nearest-even), low 16 bits zero.

    Done with integer ops so XLA cannot elide the rounding of an f32->bf16->f32 round trip
    (it may when excess precision is allowed, as on GPU)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
    quiet_nan = (bits | jnp.uint32(0x00400000)) & jnp.uint32(0xFFFF0000)
    return jnp.where(jnp.isnan(x), quiet_nan, rounded)


def _bf16_bits_to(bits: jax.Array, dtype) -> jax.Array:
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16:
        return jax.lax.bitcast_convert_type((bits >> 16).astype(jnp.uint16), jnp.bfloat16)
    return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)  # exact for f32


def _finish(product: jax.Array, dtype, mode: str) -> jax.Array:
    """The float32 product as ``dtype``: unrounded when exact in float32, else rounded once to bf16."""
    if check_dequant_mode(mode) == EXACT and jnp.dtype(dtype) != jnp.bfloat16:
        return product.astype(dtype)
    return _bf16_bits_to(_round_to_bf16_bits(product), dtype)


def dequant_int4_jax(packed: jax.Array, scale: jax.Array, in_features: int, group_size: int,
                     dtype=jnp.float32, mode: str = EXACT) -> jax.Array:
    """JAX twin of dequant_int4 (same bits), for [..., out, words] packed / [..., out, groups] scale."""
    in_features, group_size = int(in_features), int(group_size)
    *lead, n_out, _ = packed.shape
    check_shape("weight_packed", packed.shape, (*lead, n_out, cdiv(in_features, 8)))
    check_shape("weight_scale", scale.shape, (*lead, n_out, cdiv(in_features, group_size)))
    words = jax.lax.bitcast_convert_type(packed, jnp.uint32)
    nibbles = (words[..., None] >> jnp.asarray(NIBBLE_SHIFTS)) & jnp.uint32(0xF)
    q = nibbles.reshape(*lead, n_out, -1)[..., :in_features].astype(jnp.float32) - 8.0
    s = jnp.repeat(scale.astype(jnp.float32), group_size, axis=-1)[..., :in_features]
    return _finish(q * s, dtype, mode)


def dequant_fp8_block_jax(weight: jax.Array, scale_inv: jax.Array, block_size=DEFAULT_FP8_BLOCK,
                          dtype=jnp.float32, mode: str = EXACT) -> jax.Array:
    """JAX twin of dequant_fp8_block (same bits); weight float8_e4m3fn or uint8 [..., out, in]."""
    b0, b1 = block_size_pair(block_size)
    if weight.dtype == jnp.uint8:
        weight = jax.lax.bitcast_convert_type(weight, jnp.float8_e4m3fn)
    *lead, n_out, n_in = weight.shape
    check_shape("weight_scale_inv", scale_inv.shape, (*lead, cdiv(n_out, b0), cdiv(n_in, b1)))
    s = jnp.repeat(scale_inv.astype(jnp.float32), b0, axis=-2)[..., :n_out, :]
    s = jnp.repeat(s, b1, axis=-1)[..., :n_in]
    return _finish(weight.astype(jnp.float32) * s, dtype, mode)


@dataclasses.dataclass(frozen=True)
class Int4Weight:
    """A pack-quantized int4 linear weight kept packed inside JAX (a pytree)."""

    packed: jax.Array  # int32 [..., out, ceil(in/8)]
    scale: jax.Array  # bf16 [..., out, ceil(in/group_size)]
    in_features: int
    group_size: int
    dequant: str = EXACT  # exact | bf16-rounded

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.in_features)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequant_int4_jax(self.packed, self.scale, self.in_features, self.group_size, dtype, self.dequant)


@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """A block-FP8 linear weight kept as FP8 inside JAX (a pytree)."""

    weight: jax.Array  # float8_e4m3fn [..., out, in]
    scale_inv: jax.Array  # f32 [..., ceil(out/b0), ceil(in/b1)]
    block_size: tuple = DEFAULT_FP8_BLOCK
    dequant: str = EXACT  # exact | bf16-rounded

    def __post_init__(self):
        object.__setattr__(self, "block_size", tuple(int(b) for b in self.block_size))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequant_fp8_block_jax(self.weight, self.scale_inv, self.block_size, dtype, self.dequant)


jax.tree_util.register_dataclass(Int4Weight, data_fields=["packed", "scale"],
                                 meta_fields=["in_features", "group_size", "dequant"])
jax.tree_util.register_dataclass(Fp8Weight, data_fields=["weight", "scale_inv"],
                                 meta_fields=["block_size", "dequant"])
