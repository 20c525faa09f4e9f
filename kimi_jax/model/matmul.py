"""Matmul kernels for weights kept in their stored precision: nothing is widened to float32 whole.

XLA on CPU does not fuse a ``convert`` into a ``dot``: ``x @ w.astype(float32).T`` writes a float32
copy of the whole weight on every call and only then multiplies (see the HLO note in
``benchmarks/RESULTS.md``). Its dot kernels do take bfloat16 operands with float32 accumulation.
So a weight stays as stored and the *activation* is adapted instead:

* BF16 weight, float32 activation (:func:`bf16_product`): ``x`` is split exactly into three
  bfloat16 parts (``x == hi + mid + lo``), each part is multiplied by the weight in one bf16 x
  bf16 -> f32 dot (every product is exact: 8 x 8 significant bits fit float32's 24), and the
  three partial results are added in float32. Only float32 accumulation rounds, as in the widened
  product.
* int4 pack-quantized and block FP8 (:func:`tiled_product`): the weight is dequantized and
  multiplied one tile of output rows at a time (``lax.scan``, tiles of about ``TILE_BYTES`` in
  float32), so only one small tile is ever float32, never the whole matrix. Each tile is
  dequantized exactly as the whole matrix would be (the container's own ``dequantize``, whatever
  its mode) and each output row is the same dot product, so the result is the widened one. (The
  per-group form ``y = sum_g s_g * (x_g . q_g)`` was measured too: XLA runs it as a batched dot
  over 32-wide groups and it was no faster than widening; see benchmarks/RESULTS.md.)

BF16 weights with float32 activations give the widened product up to float32 rounding (a
different summation order), not bitwise. Which product a weight meets is its container's
``matmul`` field (:mod:`kimi_jax.model.weights`, from the manifest's ``compute.matmul``); the
dispatch is :func:`kimi_jax.model.weights.linear_f32`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

F32 = jnp.float32
BF16 = jnp.bfloat16
_HIGHEST = jax.lax.Precision.HIGHEST
# Bytes of one dequantized float32 tile: well inside the caches, and far below the allocation size
# (glibc: 32 MiB) above which every call maps fresh pages and pays a page fault per 4 KiB.
TILE_BYTES = 2 << 20


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
    """bfloat16 parts of ``x`` that sum to it exactly: ``x`` and a zero part when ``x`` is already
    bfloat16. (A lone part would make a one-row product, ``[1, in] x [in, out]``, for which XLA's CPU
    backend picks a kernel 15x slower than for two rows, jaxlib 0.10.2; adding the zero part's
    products is exact.)"""
    return jnp.stack([x, jnp.zeros_like(x)]) if x.dtype == BF16 else split_bf16(x)


def plain_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [T, in] @ w.T`` (float32 result) for a plain weight in its stored dtype: a BF16 weight
    meets the exact bf16 parts of ``x``; any other dtype is multiplied as it is."""
    w = jnp.asarray(w)
    if w.dtype == BF16:
        return _bf16_dot("ti,oi->to", _activation_parts(x), w)
    return jnp.einsum("ti,oi->to", x.astype(w.dtype), w, precision=_HIGHEST, preferred_element_type=F32)


def tile_rows(n_out: int, n_in: int, row_multiple: int = 1) -> int:
    """Rows per tile of a quantized weight: the float32 tile stays near ``TILE_BYTES``, a multiple of
    ``row_multiple`` (FP8's scale block) and of 64 (below that the dot kernels change summation order);
    ``n_out`` when the whole matrix is that small or no such tile divides it."""
    step = max(64, row_multiple)
    rows = max(step, (TILE_BYTES // (4 * n_in)) // step * step)
    if rows >= n_out or n_out % rows or rows % row_multiple:
        return n_out
    return rows


def tiled_product(x: jax.Array, w: Any, rows: int) -> jax.Array:
    """``x [T, in] @ dequantize(w).T`` one tile of ``rows`` output rows at a time (``lax.scan``):
    each tile is dequantized exactly as the whole matrix would be, multiplied, and dropped."""
    n_out = w.shape[-2]
    tiles = n_out // rows

    def split(leaf):  # every leaf is indexed by output row, or (FP8 scales) by block of output rows
        per_tile = leaf.shape[0] * rows // n_out
        return leaf.reshape(tiles, per_tile, *leaf.shape[1:])

    leaves, treedef = jax.tree_util.tree_flatten(w)

    def one_tile(_, tile_leaves):
        dense = jax.tree_util.tree_unflatten(treedef, tile_leaves).dequantize(x.dtype)
        return None, jnp.einsum("ti,oi->to", x, dense, precision=_HIGHEST, preferred_element_type=F32)

    _, ys = jax.lax.scan(one_tile, None, [split(leaf) for leaf in leaves])  # [tiles, T, rows]
    return jnp.moveaxis(ys, 0, 1).reshape(x.shape[0], n_out)


def dense_product(x: jax.Array, dense: jax.Array) -> jax.Array:
    """``x @ dense.T`` with a float32 accumulator, in the operands' own dtypes (the stored path's
    product of a weight it dequantizes whole: small matrices and expert slices)."""
    return jnp.einsum("...i,oi->...o", x, dense, precision=_HIGHEST, preferred_element_type=F32)


__all__ = ["TILE_BYTES", "split_bf16", "plain_product", "tile_rows", "tiled_product", "dense_product"]
