"""The CPU kernels (kimi_jax.model.kernels) against float64 truth, today's XLA paths, and themselves.

Oracles: the exactly dequantized weights (numpy codecs, as float64) times the activations in
float64; :func:`kimi_jax.model.weights.linear_f32` on a stored weight (today's ``stored`` path) and
:func:`kimi_jax.model.layers.routed_experts` on the same containers.

Bound (the kernels' contract, kimi_jax/model/kernels/__init__.py): each result is a float32 sum in
which no term passes through more than ``m = n / 16 + 10`` roundings (a chain of n / (2W)
multiply-adds per lane, two for the accumulators and the portable path's separate product,
log2(W) for the lanes, W = 8 or 16), so ``|y - y64| <= gamma(m) * sum_i |w_i x_i|`` with
``gamma(m) = m u / (1 - m u)``, u = 2^-24. Random data lands far inside it; as in
tests/test_matmul.py every result must also lie within 8 u * sum |w x| of the truth, which a lost
bit or a wrong scale fails by orders of magnitude.

Every test runs on every instruction set this CPU offers (``isa=`` picks it per call).
"""

from __future__ import annotations

import dataclasses

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.errors import FormatError
from kimi_jax.model import kernels
from kimi_jax.model.kernels import kernel_linear, kernel_routed_experts
from kimi_jax.model.layers import routed_experts
from kimi_jax.model.params import ExpertStack
from kimi_jax.model.weights import Fp8Weight, Int4Weight, PlainWeight, linear_f32
from kimi_jax.storage.codecs import BF16, BF16_ROUNDED, EXACT, FP8, dequant_fp8_block, dequant_int4, pack_int4

U = 2.0**-24
PRACTICAL_U = 8.0


def StoredWeight(w):
    """``w`` (a container or a plain array) meeting the stored-precision product."""
    return dataclasses.replace(w, matmul="stored") if hasattr(w, "matmul") else PlainWeight(w, "stored")


def stored_linear(x, w):
    """Today's ``stored`` path on the XLA products (kimi_jax.model.matmul)."""
    return linear_f32(x, StoredWeight(w))


@pytest.fixture(scope="module", autouse=True)
def built():
    if not kernels.available():
        pytest.fail(f"the CPU kernels are unavailable: {kernels.unavailable_reason()} "
                    "(build them: `pip install -e .`, or `python setup.py build_ext --inplace`)")  # fmt: skip


def isas():
    return list(kernels.library().supported_isas) if kernels.available() else ["portable"]


ISAS = isas()


def _bound_units(n: int) -> float:
    m = n / 16 + 10
    return m / (1 - m * U)


def _check_against_truth(y, x, w64):
    """y within the proven bound and within PRACTICAL_U units of float64 truth; returns the worst, in u."""
    x64 = np.asarray(x, np.float64)
    truth = x64 @ w64.T
    scale = np.abs(x64) @ np.abs(w64).T
    err = np.abs(np.asarray(y, np.float64) - truth) / (U * scale + 1e-300)
    worst = float(np.max(err))
    assert worst <= _bound_units(w64.shape[1]), worst
    assert worst <= PRACTICAL_U, worst
    return worst


def _int4(rng, n_out, n_in, group, mode=EXACT):
    codes = rng.integers(-8, 8, (n_out, n_in)).astype(np.int8)
    # scales over several binades, as real checkpoints have
    scale = (rng.uniform(0.5, 1.0, (n_out, -(-n_in // group))) * 2.0 ** rng.integers(-12, -2, (n_out, -(-n_in // group)))).astype(BF16)
    packed = pack_int4(codes)
    w = Int4Weight(jnp.asarray(packed), jnp.asarray(scale), in_features=n_in, group_size=group, dequant=mode)
    w64 = dequant_int4(packed, scale, (n_out, n_in), group, mode).astype(np.float64)
    return w, w64


def _fp8(rng, n_out, n_in, block, mode=EXACT):
    b0, b1 = block
    raw = rng.integers(0, 256, (n_out, n_in)).astype(np.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x3C  # no NaN codes here (tested on their own)
    raw.reshape(-1)[:: 7] &= 0x87  # plenty of subnormals (exponent field 0)
    scale = (rng.uniform(0.5, 1.0, (-(-n_out // b0), -(-n_in // b1))) * 2.0 ** rng.integers(-10, 0, (-(-n_out // b0), -(-n_in // b1)))).astype(np.float32)
    w = Fp8Weight(jnp.asarray(raw.view(FP8)), jnp.asarray(scale), block_size=block, dequant=mode)
    w64 = np.asarray(dequant_fp8_block(raw, scale, block, mode), np.float64)
    return w, w64


def _bf16(rng, n_out, n_in):
    w = rng.standard_normal((n_out, n_in)).astype(BF16)
    return jnp.asarray(w), w.astype(np.float64)


# Ragged tails (in % 8, in % group, in % chunk), odd group counts, group sizes that are not powers of two.
INT4_SHAPES = [(64, 256, 32), (37, 100, 32), (5, 13, 8), (70, 200, 64), (33, 300, 24), (17, 1030, 128), (9, 7168, 32)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", INT4_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int4_within_float32_bound(isa, shape):
    rng = np.random.default_rng(hash(shape) % 2**32)
    n_out, n_in, group = shape
    w, w64 = _int4(rng, n_out, n_in, group)
    for t in (1, 3, 6):
        x = rng.standard_normal((t, n_in)).astype(np.float32)
        y = kernel_linear(jnp.asarray(x), w, isa=isa)
        assert y.dtype == jnp.float32 and y.shape == (t, n_out)
        _check_against_truth(y, x, w64)


@pytest.mark.parametrize("isa", ISAS)
def test_int4_bf16_rounded_mode(isa):
    rng = np.random.default_rng(5)
    w, w64 = _int4(rng, 40, 200, 32, BF16_ROUNDED)
    _, exact64 = _int4(np.random.default_rng(5), 40, 200, 32, EXACT)
    assert not np.array_equal(w64, exact64)  # the rounding changes these weights
    x = rng.standard_normal((2, 200)).astype(np.float32)
    _check_against_truth(kernel_linear(jnp.asarray(x), w, isa=isa), x, w64)


FP8_CASES = [((64, 256), (128, 128)), ((130, 300), (128, 128)), ((45, 77), (16, 32)), ((20, 50), (7, 5))]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", [EXACT, BF16_ROUNDED])
@pytest.mark.parametrize("case", FP8_CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}-b{c[1][0]}x{c[1][1]}")
def test_fp8_within_float32_bound(isa, mode, case):
    (n_out, n_in), block = case
    rng = np.random.default_rng(n_out * n_in)
    w, w64 = _fp8(rng, n_out, n_in, block, mode)
    for t in (1, 5):
        x = rng.standard_normal((t, n_in)).astype(np.float32)
        _check_against_truth(kernel_linear(jnp.asarray(x), w, isa=isa), x, w64)


@pytest.mark.parametrize("isa", ISAS)
def test_fp8_huge_scales_keep_their_products(isa):
    """A finite scale of 2^125 times a small code does not overflow in float32 (448 * 2^125 does
    not either): the kernels' folded 2^8 must not turn it into inf."""
    rng = np.random.default_rng(11)
    raw = np.full((4, 64), 0x08, np.uint8)  # 2^-6 each
    scale = np.array([[2.0**125]], np.float32)
    w = Fp8Weight(jnp.asarray(raw.view(FP8)), jnp.asarray(scale), block_size=(128, 128))
    x = rng.uniform(0.5, 1.0, (1, 64)).astype(np.float32)
    y = np.asarray(kernel_linear(jnp.asarray(x), w, isa=isa))
    assert np.all(np.isfinite(y))
    _check_against_truth(y, x, np.asarray(dequant_fp8_block(raw, scale, (128, 128)), np.float64))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(64, 256), (31, 100), (3, 1), (8, 1030)])
def test_bf16_weight_within_float32_bound(isa, shape):
    rng = np.random.default_rng(shape[0] * shape[1])
    w, w64 = _bf16(rng, *shape)
    for t in (1, 5):
        x = rng.standard_normal((t, shape[1])).astype(np.float32)
        _check_against_truth(kernel_linear(jnp.asarray(x), w, isa=isa), x, w64)
        xb = x.astype(BF16)  # a bfloat16 activation is widened exactly
        _check_against_truth(kernel_linear(jnp.asarray(xb), w, isa=isa), xb.astype(np.float64), w64)


@pytest.mark.parametrize("isa", ISAS)
def test_equal_to_stored_path_within_float32_rounding(isa):
    """Kernel and ``stored`` path differ only in summation order: both are within 8 u * sum |w x|
    of the truth, so they are within 16 u * sum |w x| of each other (measured here directly)."""
    rng = np.random.default_rng(21)
    int4, _ = _int4(rng, 96, 320, 32)
    fp8, _ = _fp8(rng, 96, 320, (128, 128))
    bf16, _ = _bf16(rng, 96, 320)
    x = jnp.asarray(rng.standard_normal((3, 320)).astype(np.float32))
    for w in (int4, fp8, bf16):
        w64 = np.asarray(w.dequantize(jnp.float32) if hasattr(w, "dequantize") else w, np.float64)
        scale = np.abs(np.asarray(x, np.float64)) @ np.abs(w64).T
        a = np.asarray(kernel_linear(x, StoredWeight(w), isa=isa), np.float64)
        b = np.asarray(stored_linear(x, w), np.float64)
        assert float(np.max(np.abs(a - b) / (U * scale))) <= 2 * PRACTICAL_U


@pytest.mark.parametrize("isa", ISAS)
def test_rows_are_independent_bitwise(isa):
    """A row's result does not depend on how many rows are computed with it (the batching issue
    builds on this): row 2 alone, inside 8 rows and inside 33 rows give the same bits."""
    rng = np.random.default_rng(31)
    for w, n_in in ((_int4(rng, 70, 300, 32)[0], 300), (_fp8(rng, 70, 300, (128, 128))[0], 300),
                    (_bf16(rng, 70, 300)[0], 300)):  # fmt: skip
        x = rng.standard_normal((33, n_in)).astype(np.float32)
        alone = np.asarray(kernel_linear(jnp.asarray(x[2:3]), w, isa=isa))[0]
        for t in (8, 33):
            batch = np.asarray(kernel_linear(jnp.asarray(x[:t]), w, isa=isa))
            np.testing.assert_array_equal(batch[2], alone)


def test_runs_inside_jit_with_leading_dims():
    rng = np.random.default_rng(41)
    w, w64 = _int4(rng, 16, 64, 32)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    y = jax.jit(kernel_linear)(jnp.asarray(x), w)
    assert y.shape == (2, 3, 16)
    _check_against_truth(np.asarray(y).reshape(6, 16), x.reshape(6, 64), w64)


@pytest.mark.parametrize("isa", ISAS)
def test_nan_and_inf_propagate_as_on_the_xla_path(isa):
    rng = np.random.default_rng(51)
    x = jnp.asarray(rng.standard_normal((2, 96)).astype(np.float32))
    int4, _ = _int4(rng, 6, 96, 32)
    scale = np.asarray(int4.scale).copy()
    scale[1, 0], scale[3, 2] = np.inf, np.nan
    int4 = Int4Weight(int4.packed, jnp.asarray(scale), 96, 32)
    raw = rng.integers(0, 0x70, (6, 96)).astype(np.uint8)
    raw[2, 5], raw[4, 90] = 0x7F, 0xFF  # e4m3fn's NaNs
    fp8 = Fp8Weight(jnp.asarray(raw.view(FP8)), jnp.ones((1, 1), jnp.float32), (128, 128))
    bf = np.asarray(rng.standard_normal((6, 96)).astype(BF16))
    bf[0, 3] = np.inf
    for w in (int4, fp8, jnp.asarray(bf)):
        ours, xla = np.asarray(kernel_linear(x, w, isa=isa)), np.asarray(stored_linear(x, w))
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(xla))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(xla))
        assert np.isnan(ours).any() or np.isinf(ours).any()
    x_nan = x.at[1, 7].set(jnp.nan)
    assert np.isnan(np.asarray(kernel_linear(x_nan, int4, isa=isa))[1]).all()


@pytest.mark.parametrize("isa", ISAS)
def test_padding_columns_stay_zero_under_infinite_scales(isa):
    """Columns past in_features are exactly zero, not 0 * inf: all-positive terms under an infinite
    scale sum to +inf, as on the XLA path, not to NaN (ragged tails of an int4 word and an FP8 chunk)."""
    x = jnp.full((1, 100), 0.5, jnp.float32)
    int4 = Int4Weight(jnp.asarray(pack_int4(np.full((3, 100), 3, np.int8))), jnp.full((3, 4), jnp.inf, jnp.bfloat16),
                      100, 32)  # fmt: skip
    fp8 = Fp8Weight(jnp.asarray(np.full((3, 100), 0x38, np.uint8).view(FP8)), jnp.full((1, 1), jnp.inf), (128, 128))
    for w in (int4, fp8):
        np.testing.assert_array_equal(np.asarray(stored_linear(x, w)), np.inf)
        np.testing.assert_array_equal(np.asarray(kernel_linear(x, w, isa=isa)), np.inf)


def test_what_the_kernels_do_not_take_returns_none():
    rng = np.random.default_rng(61)
    x = jnp.asarray(rng.standard_normal((1, 64)).astype(np.float32))
    assert kernel_linear(x, jnp.ones((8, 64), jnp.float32)) is None  # float32 weights: XLA's dot
    codes = pack_int4(np.zeros((8, 64), np.int8))
    assert kernel_linear(x, Int4Weight(jnp.asarray(codes), jnp.ones((8, 6), jnp.bfloat16), 64, 12)) is None
    stacked, _ = _int4(rng, 8, 64, 32)
    stacked = Int4Weight(stacked.packed[None], stacked.scale[None], 64, 32)
    assert kernel_linear(x, stacked) is None
    assert kernel_linear(x.astype(jnp.float16), _bf16(rng, 8, 64)[0]) is None
    with pytest.raises(FormatError, match="activation"):
        kernel_linear(jnp.ones((1, 63)), _bf16(rng, 8, 64)[0])


def test_kernel_info_is_json_and_names_the_isa():
    info = kernels.kernel_info()
    assert json.loads(json.dumps(info)) == info
    assert info["available"] and info["isa"] in info["supported_isas"] and info["threads"] >= 1
    assert info["kernel_set"].startswith("kimi-jax-cpu/")


def _in_subprocess(env: dict, code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


PROBE = ("import jax.numpy as jnp; from kimi_jax.model import kernels; "
         "print(kernels.available(), '|', kernels.unavailable_reason(), '|', "
         "kernels.kernel_linear(jnp.ones((1, 8)), jnp.ones((2, 8), jnp.bfloat16)) is None, '|', kernels.kernel_info())")


def test_kimi_jax_kernels_off_forces_the_xla_path():
    out = _in_subprocess({"KIMI_JAX_KERNELS": "off"}, PROBE)
    assert out.startswith("False | KIMI_JAX_KERNELS=off | True |"), out


def test_an_isa_override_picks_the_path_or_says_why_not():
    out = _in_subprocess({"KIMI_JAX_KERNEL_ISA": "portable"}, PROBE)
    assert out.startswith("True | None | False |") and "'isa': 'portable'" in out, out
    out = _in_subprocess({"KIMI_JAX_KERNEL_ISA": "sse9"}, PROBE)
    assert out.startswith("False | $KIMI_JAX_KERNEL_ISA: expected one of portable, avx2, avx512, found 'sse9'"), out


# ------------------------------------------------------------------------------ routed experts


def _stack(fmt, rng, n, inter, hidden):
    def one(n_out, n_in):
        if fmt == "int4":
            ws = [_int4(rng, n_out, n_in, 32) for _ in range(n)]
            w = Int4Weight(jnp.stack([a.packed for a, _ in ws]), jnp.stack([a.scale for a, _ in ws]), n_in, 32)
        elif fmt == "fp8":
            ws = [_fp8(rng, n_out, n_in, (16, 32)) for _ in range(n)]
            w = Fp8Weight(jnp.stack([a.weight for a, _ in ws]), jnp.stack([a.scale_inv for a, _ in ws]), (16, 32))
        else:
            ws = [_bf16(rng, n_out, n_in) for _ in range(n)]
            w = jnp.stack([a for a, _ in ws])
        return StoredWeight(w), np.stack([w64 for _, w64 in ws])

    (g, g64), (u, u64), (d, d64) = one(inter, hidden), one(inter, hidden), one(hidden, inter)
    return ExpertStack(g, u, d), (g64, u64, d64)


def _moe_truth(w64, slots, weights, x, ids):
    """float64 result and the error scale S: sum over picks of |c| (|Wd| |h| + |Wd| dh), dh the
    first-order effect of the gate's and up's own rounding bounds on h."""
    g64, u64, d64 = w64
    x64 = np.asarray(x, np.float64)
    out, scale = np.zeros_like(x64), np.zeros_like(x64)
    for t in range(x64.shape[0]):
        for j in range(g64.shape[0] if ids is None else len(ids)):
            picks = [e for e in range(slots.shape[1]) if slots[t, e] == j]
            if not picks:
                continue
            e = j if ids is None else ids[j]
            c = float(sum(weights[t, p] for p in picks))
            gate, up = g64[e] @ x64[t], u64[e] @ x64[t]
            sig = 1 / (1 + np.exp(-gate))
            silu, dsilu = gate * sig, sig * (1 + gate * (1 - sig))
            h = silu * up
            dh = np.abs(dsilu * up) * (np.abs(g64[e]) @ np.abs(x64[t])) + np.abs(silu) * (np.abs(u64[e]) @ np.abs(x64[t]))
            out[t] += c * (d64[e] @ h)
            scale[t] += abs(c) * (np.abs(d64[e]) @ (np.abs(h) + dh))
    return out, scale


# gamma(m) for these sizes plus the roundings of silu and of h: the kernels measured at most 1.1 of
# these units, XLA's own layer 2.0.
MOE_UNITS = 16.0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["int4", "fp8", "bf16"])
def test_routed_experts_match_the_xla_layer(isa, fmt):
    rng = np.random.default_rng({"int4": 1, "fp8": 2, "bf16": 3}[fmt])
    n, inter, hidden, t = 5, 64, 96, 4
    experts, w64 = _stack(fmt, rng, n, inter, hidden)
    x = (0.5 * rng.standard_normal((t, hidden))).astype(np.float32)
    slots = np.array([[0, 2], [2, 1], [0, 1], [2, 0]], np.int32)  # slots 3 and 4 are padding
    weights = rng.uniform(0.1, 1.0, (t, 2)).astype(np.float32)
    ours = np.asarray(kernel_routed_experts(experts, jnp.asarray(slots), jnp.asarray(weights), jnp.asarray(x), isa=isa))
    xla = np.asarray(routed_experts(experts, jnp.asarray(slots), jnp.asarray(weights), jnp.asarray(x)))
    truth, scale = _moe_truth(w64, slots, weights, x, None)
    assert np.max(np.abs(ours - truth) / (U * scale)) <= MOE_UNITS
    assert np.max(np.abs(xla - truth) / (U * scale)) <= MOE_UNITS
    assert np.max(np.abs(ours - xla) / (U * scale)) <= 2 * MOE_UNITS


@pytest.mark.parametrize("isa", ISAS)
def test_routed_experts_never_read_padding_and_index_through_stack_ids(isa):
    """A stack of every expert (stack_ids map slot -> entry) whose unpicked entries hold NaN: the
    result is finite, equal to the XLA layer's, and row 1 alone gives the same bits as inside the batch."""
    rng = np.random.default_rng(7)
    n, inter, hidden = 6, 64, 128
    experts, w64 = _stack("int4", rng, n, inter, hidden)
    ids = np.array([4, 1, 3], np.int32)  # slot j -> stack entry ids[j]; entries 0, 2, 5 never picked
    poison = np.asarray(experts.down_proj.scale).copy()
    poison[[0, 2, 5]] = np.nan
    experts = ExpertStack(experts.gate_proj, experts.up_proj,
                          StoredWeight(Int4Weight(experts.down_proj.packed, jnp.asarray(poison), inter, 32)))
    x = (0.5 * rng.standard_normal((3, hidden))).astype(np.float32)
    slots = np.array([[2, 0], [1, 2], [0, 1]], np.int32)
    weights = rng.uniform(0.1, 1.0, (3, 2)).astype(np.float32)
    args = (jnp.asarray(slots), jnp.asarray(weights), jnp.asarray(x), jnp.asarray(ids))
    ours = np.asarray(kernel_routed_experts(experts, *args, isa=isa))
    assert np.all(np.isfinite(ours))
    xla = np.asarray(routed_experts(experts, *args))
    truth, scale = _moe_truth(w64, slots, weights, x, ids)
    assert np.max(np.abs(ours - truth) / (U * scale)) <= MOE_UNITS
    assert np.max(np.abs(ours - xla) / (U * scale)) <= 2 * MOE_UNITS
    alone = np.asarray(kernel_routed_experts(experts, jnp.asarray(slots[1:2]), jnp.asarray(weights[1:2]),
                                             jnp.asarray(x[1:2]), jnp.asarray(ids), isa=isa))  # fmt: skip
    np.testing.assert_array_equal(alone[0], ours[1])


def test_routed_experts_refuse_what_they_do_not_take():
    rng = np.random.default_rng(8)
    experts, _ = _stack("bf16", rng, 2, 16, 32)
    slots, weights = jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.float32)
    assert kernel_routed_experts(experts, slots, weights, jnp.ones((1, 32), jnp.bfloat16)) is None
    mixed = ExpertStack(experts.gate_proj, experts.up_proj, StoredWeight(experts.down_proj.array.astype(jnp.float32)))
    assert kernel_routed_experts(mixed, slots, weights, jnp.ones((1, 32), jnp.float32)) is None


def test_a_stack_id_outside_the_stack_is_an_error_not_a_read():
    rng = np.random.default_rng(9)
    experts, _ = _stack("bf16", rng, 2, 16, 32)
    with pytest.raises(Exception, match="outside the stack of 2 experts"):
        np.asarray(kernel_routed_experts(experts, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.float32),
                                         jnp.ones((1, 32), jnp.float32), jnp.array([5], jnp.int32)))  # fmt: skip
