"""Matmuls on weights kept in their stored precision: nothing is widened to float32 whole.

XLA on CPU does not fuse a ``convert`` into a ``dot``: ``x @ w.astype(float32).T`` writes a float32
copy of the whole weight on every call and only then multiplies (see the HLO note in
``benchmarks/RESULTS.md``). Its dot kernels do take bfloat16 operands with float32 accumulation.
So a weight stays as stored and the *activation* is adapted instead:

* BF16 weight, float32 activation: ``x`` is split exactly into three bfloat16 parts
  (``x == hi + mid + lo``), each part is multiplied by the weight in one bf16 x bf16 -> f32 dot
  (every product is exact: 8 x 8 significant bits fit float32's 24), and the three partial results
  are added in float32. Only float32 accumulation rounds, as in the widened product.
* int4 pack-quantized: ``y = sum_g s_g * (x_g . q_g)``: the codes ``q`` (integers in [-8, 7], exact in
  bfloat16) are multiplied group by group, then each group's partial sum is scaled by its scale in
  float32. The dequantized product ``q * s`` (exact in float32) is never formed.
* block FP8: the same per block of input columns; E4M3 values are exact in bfloat16.

The result equals the exactly dequantized float32 product up to float32 rounding (a different
summation order), not bitwise: which of the two a run used is the manifest's ``compute.matmul``
(``stored`` here, ``widened`` the reference), recorded in the ledger. Weights reach
:func:`kimi_jax.model.layers.linear` wrapped in :class:`StoredWeight` only in ``stored`` mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kimi_jax.model.quant import Fp8Weight, Int4Weight
from kimi_jax.storage.codecs import NIBBLE_SHIFTS, block_size_pair, cdiv

F32 = jnp.float32
BF16 = jnp.bfloat16
_HIGHEST = jax.lax.Precision.HIGHEST
MATMUL_MODES = ("stored", "widened")


@dataclasses.dataclass(frozen=True)
class StoredWeight:
    """A linear weight ``[..., out, in]`` that reaches the matmul in its stored precision.

    ``weight`` is a plain array (BF16 or float32) or a quantized container (``Int4Weight`` /
    ``Fp8Weight``). A pytree, so expert stacks stack it and ``lax.scan`` slices it like the bare weight.
    """

    weight: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def dequantize(self, dtype=F32) -> jax.Array:
        """The dense array (for the few uses that need one: the absorbed attention's reshaped kv_b_proj)."""
        if hasattr(self.weight, "dequantize"):
            return self.weight.dequantize(dtype)
        return jnp.asarray(self.weight).astype(dtype)


jax.tree_util.register_dataclass(StoredWeight, data_fields=["weight"], meta_fields=[])


def split_bf16(x: jax.Array) -> jax.Array:
    """float32 ``[..., n]`` -> bfloat16 ``[3, ..., n]`` whose parts sum exactly to ``x``.

    Each part is ``x`` minus the parts before it, truncated to bfloat16 with an integer mask (so XLA
    cannot elide a float32 -> bfloat16 -> float32 round trip). Truncation keeps the sign and leaves a
    remainder with 8 fewer significant bits each time: 24 = 3 x 8, so three parts are exact
    (remainders below bfloat16's smallest normal, about 1e-38, are lost).
    """
    parts, rest = [], x.astype(F32)
    for _ in range(3):
        bits = jax.lax.bitcast_convert_type(rest, jnp.uint32) & jnp.uint32(0xFFFF0000)
        part = jax.lax.bitcast_convert_type(bits, F32)
        parts.append(part.astype(BF16))  # exact: the low 16 bits are zero
        rest = rest - part  # exact (Sterbenz): part and rest share sign and leading bits
    return jnp.stack(parts)


def _bf16_dot(spec: str, xs: jax.Array, w: jax.Array) -> jax.Array:
    """``sum_p einsum(spec, xs[p], w)`` with a float32 accumulator; ``xs`` [P, ...] bf16 parts."""
    out = jnp.einsum("p" + spec.replace("->", "->p"), xs, w, preferred_element_type=F32)
    total = out[0]
    for p in range(1, out.shape[0]):
        total = total + out[p]
    return total


def _activation_parts(x: jax.Array) -> jax.Array:
    """bfloat16 parts of ``x`` that sum to it exactly: one part when ``x`` is already bfloat16."""
    return x[None] if x.dtype == BF16 else split_bf16(x)


def _plain(x: jax.Array, w: jax.Array) -> jax.Array:
    w = jnp.asarray(w)
    if w.dtype == BF16:
        return _bf16_dot("ti,oi->to", _activation_parts(x), w)
    return jnp.einsum("ti,oi->to", x.astype(w.dtype), w, precision=_HIGHEST, preferred_element_type=F32)


def _grouped(x: jax.Array, codes: jax.Array, scale: jax.Array, group: int) -> jax.Array:
    """``y[t, o] = sum_g scale[o, g] * (x[t, g] . codes[o, g])``; codes bf16 [out, in], scale [out, G]."""
    n_out, n_in = codes.shape
    groups = scale.shape[-1]
    pad = groups * group - n_in
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)))
        codes = jnp.pad(codes, ((0, 0), (0, pad)))
    xs = _activation_parts(x).reshape(-1, x.shape[0], groups, group)
    partial = _bf16_dot("tgi,ogi->tog", xs, codes.reshape(n_out, groups, group))  # [T, out, G]
    return jnp.einsum("tog,og->to", partial, scale.astype(F32), precision=_HIGHEST, preferred_element_type=F32)


def int4_codes(w: Int4Weight) -> jax.Array:
    """The int4 codes ``q`` of a 2-D ``Int4Weight`` as bfloat16 [out, in] (integers, exact)."""
    words = jax.lax.bitcast_convert_type(w.packed, jnp.uint32)
    nibbles = (words[..., None] >> jnp.asarray(NIBBLE_SHIFTS)) & jnp.uint32(0xF)
    q = nibbles.astype(jnp.int32) - 8
    return q.reshape(*w.packed.shape[:-1], -1)[..., : w.in_features].astype(BF16)


def _int4(x: jax.Array, w: Int4Weight) -> jax.Array:
    return _grouped(x, int4_codes(w), w.scale, int(w.group_size))


def _fp8(x: jax.Array, w: Fp8Weight) -> jax.Array:
    b0, b1 = block_size_pair(w.block_size)
    weight = w.weight
    if weight.dtype == jnp.uint8:
        weight = jax.lax.bitcast_convert_type(weight, jnp.float8_e4m3fn)
    n_out = weight.shape[0]
    # one scale per (row block, column block): repeat over the rows of each row block
    scale = jnp.repeat(w.scale_inv.astype(F32), b0, axis=0)[:n_out]
    if scale.shape[-1] != cdiv(weight.shape[-1], b1):
        raise ValueError(f"weight_scale_inv: expected {cdiv(weight.shape[-1], b1)} column blocks, found {scale.shape[-1]}")
    return _grouped(x, weight.astype(BF16), scale, b1)


def _exact_dequant(w: Any) -> bool:
    """Whether the container's dense form is the exact float32 product (what the grouped path computes)."""
    return getattr(w, "dequant", "exact") == "exact"


def stored_linear(x: jax.Array, w: Any) -> jax.Array:
    """``x @ w.T`` (float32 result) for ``x`` [..., in] and a weight in its stored form [out, in]."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in)
    if isinstance(w, Int4Weight) and w.packed.ndim == 2 and _exact_dequant(w):
        y = _int4(x2, w)
    elif isinstance(w, Fp8Weight) and w.weight.ndim == 2 and _exact_dequant(w):
        y = _fp8(x2, w)
    elif not hasattr(w, "dequantize") and jnp.ndim(w) == 2:
        y = _plain(x2, w)
    else:  # a stacked or bf16-rounded container: no grouped form reproduces it, so widen it
        dense = w.dequantize(x.dtype)
        y = jnp.einsum("ti,oi->to", x2, dense, precision=_HIGHEST, preferred_element_type=F32)
    return y.reshape(*lead, y.shape[-1])


def widened_linear(x: jax.Array, w: Any) -> jax.Array:
    """The reference: the weight widened (dequantized) to ``x.dtype`` whole, then one matmul (float32 result)."""
    dense = w.dequantize(x.dtype) if hasattr(w, "dequantize") else jnp.asarray(w).astype(x.dtype)
    return jnp.einsum("...i,oi->...o", x, dense, precision=_HIGHEST, preferred_element_type=F32)


__all__ = ["MATMUL_MODES", "StoredWeight", "split_bf16", "int4_codes", "stored_linear", "widened_linear"]
