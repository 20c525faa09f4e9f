"""Dequantization inside JAX: int4 pack-quantized and block FP8, the JAX twins of the numpy
decoders in :mod:`kimi_jax.storage.codecs` (same bits, both modes: ``exact`` and ``bf16-rounded``).
The weight containers that call them are in :mod:`kimi_jax.model.weights`. Whatever the mode, a
weight materialized as bfloat16 (``compute.dtype: bfloat16``) is the product rounded once to
bfloat16: both modes give the same matmul input there."""

from __future__ import annotations

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


__all__ = ["dequant_int4_jax", "dequant_fp8_block_jax"]
