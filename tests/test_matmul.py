"""The stored-precision matmul (kimi_jax.model.matmul, reached through kimi_jax.model.weights.linear_f32)
against float64 truth and the widened reference.

Oracle: the exactly dequantized weight (numpy codecs: q * scale, or fp8 * scale_inv, in float64)
times the activation in float64. Bound: float32 summation of n products errs by at most
``(n - 1) * u * sum_i |x_i w_i|`` (u = 2^-24); in practice both paths stay below a few ``u`` of it.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.model import matmul
from kimi_jax.model.matmul import dense_product, split_bf16, tile_rows
from kimi_jax.model.weights import Fp8Weight, Int4Weight, PlainWeight, linear_f32, materialize
from kimi_jax.storage.codecs import BF16, pack_int4, quantize_fp8_block

U = 2.0**-24


def _as(w, matmul: str):
    """``w`` (a container or a plain array) meeting the ``matmul`` product."""
    return dataclasses.replace(w, matmul=matmul) if hasattr(w, "matmul") else PlainWeight(w, matmul)


def stored_linear(x, w):
    return linear_f32(x, _as(w, "stored"))


def widened_linear(x, w):
    """The weight widened whole to the activation's dtype, then one product in that dtype."""
    return dense_product(x, materialize(w, x.dtype))
# Measured on this machine: the largest |error| / (u * sum|x w|) is below 2 for both paths at
# these sizes; 8 leaves room for other kernels' summation orders and still fails a lost bit.
BOUND_IN_U = 8.0


def _error_in_u(y: jax.Array, x: np.ndarray, w64: np.ndarray) -> float:
    truth = x.astype(np.float64) @ w64.T
    scale = np.abs(x.astype(np.float64)) @ np.abs(w64).T
    return float(np.max(np.abs(np.asarray(y, np.float64) - truth) / (U * scale + 1e-300)))


def _int4(rng, n_out: int, n_in: int, group: int):
    codes = rng.integers(-8, 8, (n_out, n_in)).astype(np.int8)
    scale = rng.uniform(1e-3, 2e-2, (n_out, -(-n_in // group))).astype(BF16)
    w = Int4Weight(jnp.asarray(pack_int4(codes)), jnp.asarray(scale), in_features=n_in, group_size=group)
    exact = codes.astype(np.float64) * np.repeat(scale.astype(np.float64), group, axis=-1)[:, :n_in]
    return w, exact


def test_split_bf16_parts_sum_exactly():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * 10.0 ** rng.integers(-20, 20, 4096)).astype(np.float32)
    parts = np.asarray(split_bf16(jnp.asarray(x))).astype(np.float64)
    assert parts.shape == (3, 4096)
    np.testing.assert_array_equal(parts.sum(0), x.astype(np.float64))


@pytest.mark.parametrize("t", [1, 5])
def test_bf16_weight_within_float32_rounding(t):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 320)).astype(BF16)
    x = rng.standard_normal((t, 320)).astype(np.float32)
    w64 = w.astype(np.float64)
    fast = stored_linear(jnp.asarray(x), jnp.asarray(w))
    ref = widened_linear(jnp.asarray(x), jnp.asarray(w))
    assert fast.dtype == jnp.float32 and fast.shape == (t, 96)
    assert _error_in_u(fast, x, w64) < BOUND_IN_U
    assert _error_in_u(ref, x, w64) < BOUND_IN_U


def test_bf16_activation_with_bf16_weight_is_the_reference_bitwise():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((64, 128)).astype(BF16))
    x = jnp.asarray(rng.standard_normal((3, 128)).astype(BF16))
    np.testing.assert_array_equal(np.asarray(stored_linear(x, w)), np.asarray(widened_linear(x, w)))


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 rows for the small test matrices (the default targets 2 MiB tiles)."""
    monkeypatch.setattr(matmul, "TILE_BYTES", 64 * 4 * 256)


def test_tile_rows():
    assert tile_rows(2048, 7168) == 64  # 64 x 7168 x 4 bytes = 1.75 MiB
    assert tile_rows(7168, 2048) == 256
    assert tile_rows(100, 7168) == 100  # small: one tile, the whole matrix
    assert tile_rows(2048 + 32, 7168) == 2048 + 32  # no 64-row tile divides it
    assert tile_rows(7168, 7168, row_multiple=128) == 128


@pytest.mark.parametrize("n_in,group", [(256, 32), (200, 32)])  # 200: a partial last group and word
def test_int4_tiles_within_float32_rounding(small_tiles, n_in, group):
    """Oracle: the container's own dense weight (its dequantization mode decides those values; the
    tiles must reproduce the product with them), multiplied in float64."""
    rng = np.random.default_rng(3)
    w, _ = _int4(rng, 256, n_in, group)
    dequant = np.asarray(w.dequantize(jnp.float32)).astype(np.float64)
    assert tile_rows(256, n_in) == 64
    for t in (1, 4):
        x = rng.standard_normal((t, n_in)).astype(np.float32)
        assert _error_in_u(stored_linear(jnp.asarray(x), w), x, dequant) < BOUND_IN_U
        assert _error_in_u(widened_linear(jnp.asarray(x), w), x, dequant) < BOUND_IN_U


def test_fp8_tiles_within_float32_rounding(small_tiles):
    rng = np.random.default_rng(4)
    dense = rng.standard_normal((256, 300)).astype(np.float32)
    q, scale_inv = quantize_fp8_block(dense, (128, 128))
    w = Fp8Weight(jnp.asarray(q), jnp.asarray(scale_inv), block_size=(128, 128))
    assert tile_rows(256, 300, 128) == 128
    x = rng.standard_normal((2, 300)).astype(np.float32)
    fast = np.asarray(stored_linear(jnp.asarray(x), w))
    ref = np.asarray(widened_linear(jnp.asarray(x), w))
    dequant = np.asarray(w.dequantize(jnp.float32)).astype(np.float64)
    assert _error_in_u(fast, x, dequant) < BOUND_IN_U
    assert _error_in_u(ref, x, dequant) < BOUND_IN_U


def test_leading_axes_and_the_plain_container():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 32)).astype(BF16)
    x = rng.standard_normal((2, 3, 32)).astype(np.float32)
    wrapped = PlainWeight(jnp.asarray(w), "stored")
    assert wrapped.shape == (16, 32)
    y = linear_f32(jnp.asarray(x), wrapped)
    assert y.shape == (2, 3, 16)
    np.testing.assert_array_equal(np.asarray(wrapped.dequantize()), w.astype(np.float32))
    leaves, treedef = jax.tree_util.tree_flatten(wrapped)
    assert len(leaves) == 1
    # the product is static metadata: a widened weight is another pytree, so another program
    assert treedef != jax.tree_util.tree_flatten(PlainWeight(jnp.asarray(w)))[1]


def _largest_f32_buffer(fn, *args) -> int:
    """Elements of the largest float32 value in the optimized HLO of ``fn``."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return max(int(np.prod([int(d) for d in dims.split(",")])) for dims in re.findall(r"f32\[([0-9,]+)\]", text))


def test_hlo_has_no_float32_copy_of_the_weight(small_tiles):
    """The reference writes a float32 [out, in] copy of the weight (the convert is not fused into
    the dot on CPU); the stored path has none: BF16 meets bf16 activation parts, int4 is widened
    one 64-row tile at a time."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((1, 256)).astype(np.float32))
    bf16 = jnp.asarray(rng.standard_normal((384, 256)).astype(BF16))
    int4, _ = _int4(rng, 384, 256, 32)
    for weight in (bf16, int4):
        assert _largest_f32_buffer(widened_linear, x, weight) == 384 * 256
    assert _largest_f32_buffer(stored_linear, x, bf16) <= 3 * 384  # the activation parts' partial products
    assert _largest_f32_buffer(stored_linear, x, int4) == 64 * 256  # one tile
