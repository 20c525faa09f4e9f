"""The stored-precision matmul (kimi_jax.model.matmul) against float64 truth and the widened reference.

Oracle: the exactly dequantized weight (numpy codecs: q * scale, or fp8 * scale_inv, in float64)
times the activation in float64. Bound: float32 summation of n products errs by at most
``(n - 1) * u * sum_i |x_i w_i|`` (u = 2^-24); in practice both paths stay below a few ``u`` of it.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.model.matmul import StoredWeight, int4_codes, split_bf16, stored_linear, widened_linear
from kimi_jax.model.quant import Fp8Weight, Int4Weight
from kimi_jax.storage.codecs import BF16, pack_int4, quantize_fp8_block, unpack_int4

U = 2.0**-24
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


@pytest.mark.parametrize("n_in,group", [(256, 32), (200, 32)])  # 200: a partial last group and word
def test_int4_grouped_within_float32_rounding(n_in, group):
    rng = np.random.default_rng(3)
    w, exact = _int4(rng, 48, n_in, group)
    np.testing.assert_array_equal(np.asarray(int4_codes(w)).astype(np.int8), unpack_int4(np.asarray(w.packed), n_in))
    for t in (1, 4):
        x = rng.standard_normal((t, n_in)).astype(np.float32)
        fast = stored_linear(jnp.asarray(x), w)
        ref = widened_linear(jnp.asarray(x), jnp.asarray(exact.astype(np.float32)))  # exact in float32
        assert _error_in_u(fast, x, exact) < BOUND_IN_U
        assert _error_in_u(ref, x, exact) < BOUND_IN_U


def test_fp8_blocks_within_float32_rounding():
    rng = np.random.default_rng(4)
    dense = rng.standard_normal((200, 300)).astype(np.float32)
    q, scale_inv = quantize_fp8_block(dense, (128, 128))
    w = Fp8Weight(jnp.asarray(q), jnp.asarray(scale_inv), block_size=(128, 128))
    s = np.repeat(np.repeat(scale_inv.astype(np.float64), 128, 0)[:200], 128, 1)[:, :300]
    exact = q.astype(np.float64) * s
    x = rng.standard_normal((2, 300)).astype(np.float32)
    assert _error_in_u(stored_linear(jnp.asarray(x), w), x, exact) < BOUND_IN_U


def test_leading_axes_and_wrapper():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 32)).astype(BF16)
    x = rng.standard_normal((2, 3, 32)).astype(np.float32)
    wrapped = StoredWeight(jnp.asarray(w))
    assert wrapped.shape == (16, 32)
    y = stored_linear(jnp.asarray(x), wrapped.weight)
    assert y.shape == (2, 3, 16)
    np.testing.assert_array_equal(np.asarray(wrapped.dequantize()), w.astype(np.float32))
    leaves = jax.tree_util.tree_leaves(wrapped)
    assert len(leaves) == 1


def _f32_buffers(fn, *args) -> set[str]:
    """Shapes of every float32 value in the optimized HLO of ``fn``."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return set(re.findall(r"f32\[([0-9,]+)\]", text))


def test_hlo_has_no_float32_copy_of_the_weight():
    """The reference writes a float32 [out, in] copy of the weight (the convert is not fused into
    the dot on CPU); the stored path has no float32 buffer of that size at all."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((1, 512)).astype(np.float32))
    bf16 = jnp.asarray(rng.standard_normal((384, 512)).astype(BF16))
    assert "384,512" in _f32_buffers(widened_linear, x, bf16)
    assert "384,512" not in _f32_buffers(stored_linear, x, bf16)
    int4, _ = _int4(rng, 384, 512, 32)
    assert "384,512" in _f32_buffers(lambda a, w: widened_linear(a, w), x, int4)
    stored = _f32_buffers(stored_linear, x, int4)
    assert "384,512" not in stored and "384,16,32" not in stored
