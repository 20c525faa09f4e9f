"""kimi_jax.storage.codecs and kimi_jax.model.quant against independent oracles: compressed-tensors' own packer/unpacker and
compressor (int4 pack-quantized), and torch's float8_e4m3fn / bf16 arithmetic (block FP8).

Two dequantization modes: ``exact`` (the default) is checked against the product computed by torch
from the library's own unpacked codes (in float64 for int4, where the float32 product is exact,
and in float32 for FP8); ``bf16-rounded`` is checked bit for bit against compressed-tensors'
decompressor and torch's bf16 conversion, which is what that mode exists to match."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kimi_jax.errors import FormatError
from kimi_jax.model.quant import dequant_fp8_block_jax, dequant_int4_jax
from kimi_jax.model.weights import Fp8Weight, Int4Weight
from kimi_jax.storage.codecs import (
    dequant_fp8_block,
    dequant_int4,
    fp8_e4m3_to_float32,
    pack_int4,
    quantize_fp8_block,
    quantize_int4,
    unpack_int4,
)

torch = pytest.importorskip("torch")
ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import (
    dequantize as ct_dequantize,  # noqa: E402
)
from compressed_tensors.quantization.lifecycle.initialize import (  # noqa: E402
    initialize_module_for_quantization,
)
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402

ct_pack, ct_unpack = ct_helpers.pack_to_int32, ct_helpers.unpack_from_int32
BF16 = ml_dtypes.bfloat16


def _codes(rng, out, n_in):
    """Random int4 codes that always include both boundary codes -8 and +7."""
    q = rng.integers(-8, 8, size=(out, n_in)).astype(np.int8)
    q[0, 0], q[-1, -1] = -8, 7
    q[out // 2, :] = 7  # nibble 0xF in every position: every word of this row is negative int32
    return q


def _bits16(a):
    """bf16 numpy/torch array -> int16 bit patterns."""
    if isinstance(a, torch.Tensor):
        return a.contiguous().view(torch.int16).numpy()
    return np.asarray(a).view(np.int16)


def _same_bits_or_both_nan(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    na, nb = np.isnan(a.astype(np.float32)), np.isnan(b.astype(np.float32))
    np.testing.assert_array_equal(na, nb)
    uint = {2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
    np.testing.assert_array_equal(a.view(uint)[~na], b.view(uint)[~nb])


# --------------------------------------------------------------------------------------------- int4

def test_bit_layout_from_spec():
    # Column 8w+j at bits [4j, 4j+4), nibble = q + 8: codes (-8, 7, 0, 1, 2, 3, 4, 5) give nibbles
    # (0, F, 8, 9, A, B, C, D) from the lowest nibble up, i.e. the word 0xDCBA98F0 (negative int32).
    word = np.array([[0xDCBA98F0]], dtype=np.uint32).view(np.int32)
    assert word[0, 0] < 0
    np.testing.assert_array_equal(unpack_int4(word, 8), [[-8, 7, 0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(pack_int4(np.array([[-8, 7, 0, 1, 2, 3, 4, 5]], np.int8)), word)


@pytest.mark.parametrize("shape", [(16, 64), (7, 40), (5, 21), (3, 7), (4, 1)])
@pytest.mark.parametrize("shape_dtype", [torch.int32, torch.int64])
def test_unpack_matches_compressed_tensors(shape, shape_dtype):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    q = _codes(rng, *shape)
    packed_t = ct_pack(torch.from_numpy(q), 4)
    packed = packed_t.numpy()
    assert packed.dtype == np.int32 and packed.shape == (shape[0], -(-shape[1] // 8))
    if shape[1] >= 8:  # a full word with a top nibble >= 8 is a negative int32
        assert (packed < 0).any()
    weight_shape = torch.tensor(shape, dtype=shape_dtype)
    oracle = ct_unpack(packed_t, 4, weight_shape).numpy()
    ours = unpack_int4(packed, int(weight_shape.numpy()[1]))
    assert ours.dtype == np.int8
    np.testing.assert_array_equal(ours, oracle)
    np.testing.assert_array_equal(ours, q)


@pytest.mark.parametrize("shape", [(16, 64), (9, 32), (5, 21), (3, 7), (6, 44)])
def test_pack_matches_compressed_tensors(shape):
    rng = np.random.default_rng(7 + shape[1])
    q = _codes(rng, *shape)
    ours = pack_int4(q)
    oracle = ct_pack(torch.from_numpy(q), 4).numpy()
    assert ours.dtype == np.int32 and ours.shape == oracle.shape
    n_pad = ours.shape[1] * 8 - shape[1]
    if n_pad == 0:
        np.testing.assert_array_equal(ours, oracle)  # bitwise
    else:
        # Identical except padding nibbles: ours hold q=0 (nibble 8); the library pads its
        # offset values with zeros (nibble 0, i.e. q=-8). Both unpack to the same codes.
        keep = np.uint32((1 << (4 * (8 - n_pad))) - 1)
        np.testing.assert_array_equal(ours[:, :-1], oracle[:, :-1])
        np.testing.assert_array_equal(ours[:, -1].view(np.uint32) & keep,
                                      oracle[:, -1].view(np.uint32) & keep)
        np.testing.assert_array_equal(unpack_int4(ours, ours.shape[1] * 8)[:, shape[1]:], 0)
    # round trips, through us and through the library
    np.testing.assert_array_equal(unpack_int4(ours, shape[1]), q)
    np.testing.assert_array_equal(ct_unpack(torch.from_numpy(ours), 4, torch.Size(shape)).numpy(), q)


def _ct_compressed_linear(out, n_in, group, seed):
    """Quantize + compress a bf16 nn.Linear with compressed-tensors (symmetric int4, group `group`)."""
    torch.manual_seed(seed)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    lin = torch.nn.Linear(n_in, out, bias=False).to(torch.bfloat16)
    initialize_module_for_quantization(lin, scheme)
    w = lin.weight.data.float().reshape(out, n_in // group, group)
    scale, zp = calculate_qparams(w.amin(-1), w.amax(-1), args)
    lin.weight_scale.data.copy_(scale.to(torch.bfloat16))
    lin.weight_zero_point.data.copy_(zp)
    PackedQuantizationCompressor.compress_module(lin)
    compressed = {k: v.detach().clone() for k, v in lin.state_dict().items()}
    PackedQuantizationCompressor.decompress_module(lin)
    return args, compressed, lin.weight.data.detach().clone()


@pytest.mark.parametrize("shape_dtype", [np.int64, np.int32])
def test_dequant_int4_matches_compressed_tensors_decompress(shape_dtype):
    out, n_in, group = 48, 128, 32
    args, comp, oracle = _ct_compressed_linear(out, n_in, group, seed=3)
    assert set(comp) == {"weight_packed", "weight_scale", "weight_shape"}
    assert comp["weight_shape"].dtype == torch.int64  # the library's writer stores int64
    packed = comp["weight_packed"].numpy()
    scale = comp["weight_scale"].float().numpy().astype(BF16)  # exact: values are bf16
    weight_shape = comp["weight_shape"].numpy().astype(shape_dtype)
    ours = dequant_int4(packed, scale, weight_shape, group, mode="bf16-rounded")
    assert ours.dtype == BF16 and ours.shape == (out, n_in) and oracle.dtype == torch.bfloat16
    np.testing.assert_array_equal(_bits16(ours), _bits16(oracle))
    # also against the library's own unpack + dequantize pair on the same tensors
    codes_t = ct_unpack(comp["weight_packed"], 4, comp["weight_shape"])
    lib = ct_dequantize(codes_t, comp["weight_scale"], None, args)
    np.testing.assert_array_equal(_bits16(ours), _bits16(lib))
    # exact (the default): the library's codes times the scale, in float64, is the float32 result
    exact = dequant_int4(packed, scale, weight_shape, group)
    want = (codes_t.double() * comp["weight_scale"].double().repeat_interleave(group, dim=1)).float().numpy()
    assert exact.dtype == np.float32
    np.testing.assert_array_equal(exact.view(np.uint32), want.view(np.uint32))
    # The two modes really differ here: the bf16 rounding changes some weights.
    codes = set(codes_t.unique().tolist())
    assert {-8, 7} <= codes or {-7, 7} <= codes
    assert (exact != ours.astype(np.float32)).any()


def test_dequant_int4_matches_library_dequantize_on_hard_scales():
    # scales whose mantissa needs rounding when multiplied by 3, 5, 7 (e.g. 7 x 1.0078125)
    rng = np.random.default_rng(11)
    out, n_in, group = 8, 64, 32
    q = _codes(rng, out, n_in)
    scale = (1.0 + rng.integers(1, 128, size=(out, n_in // group)) / 128.0).astype(np.float32)
    scale[0, 0] = 1.0078125
    scale = scale.astype(BF16)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    scale_t = torch.from_numpy(scale.astype(np.float32)).to(torch.bfloat16)
    lib = ct_dequantize(torch.from_numpy(q), scale_t, None, args)
    ours = dequant_int4(pack_int4(q), scale, (out, n_in), group, mode="bf16-rounded")
    np.testing.assert_array_equal(_bits16(ours), _bits16(lib))
    exact = dequant_int4(pack_int4(q), scale, (out, n_in), group)
    want = (torch.from_numpy(q).double() * scale_t.double().repeat_interleave(group, dim=1)).float().numpy()
    np.testing.assert_array_equal(exact.view(np.uint32), want.view(np.uint32))
    # the example: 7 x 1.0078125 = 7.0546875 needs 10 significant bits; bf16 keeps 8
    one = dequant_int4(pack_int4(np.full((1, 8), 7, np.int8)), np.full((1, 1), 1.0078125, BF16), (1, 8), 8)
    assert one.dtype == np.float32 and (one == 7.0546875).all()
    rounded = dequant_int4(pack_int4(np.full((1, 8), 7, np.int8)), np.full((1, 1), 1.0078125, BF16), (1, 8), 8,
                           mode="bf16-rounded")
    assert (rounded.astype(np.float32) == 7.0625).all()


def test_quantize_int4():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 80)).astype(np.float32)  # 80 = 2.5 groups of 32: partial last group
    w[1, 32:64] = 0.0  # an all-zero group
    packed, scale = quantize_int4(w, 32)
    assert packed.dtype == np.int32 and packed.shape == (6, 10)
    assert scale.dtype == BF16 and scale.shape == (6, 3)
    amax = torch.from_numpy(np.pad(np.abs(w), ((0, 0), (0, 16)))).reshape(6, 3, 32).amax(-1)
    expect = torch.where(amax > 0, amax / 7, torch.ones_like(amax)).to(torch.bfloat16)
    np.testing.assert_array_equal(_bits16(scale), _bits16(expect))
    q = unpack_int4(packed, 80)
    assert q.min() >= -7 and q.max() <= 7 and (q[1, 32:64] == 0).all()
    deq = dequant_int4(packed, scale, (6, 80), 32).astype(np.float32)
    s = np.repeat(scale.astype(np.float32), 32, axis=1)[:, :80]
    assert (np.abs(deq - w) <= 0.51 * s + 0.02 * np.abs(w)).all()
    q8 = unpack_int4(quantize_int4(-np.abs(w) - 0.01, 32, min_code=-8)[0], 80)
    assert q8.min() >= -8


# ---------------------------------------------------------------------------------------------- fp8

def test_fp8_to_float32_all_bytes_match_torch():
    raw = np.arange(256, dtype=np.uint8)
    oracle = torch.from_numpy(raw).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    for inp in (raw, raw.view(ml_dtypes.float8_e4m3fn)):
        ours = fp8_e4m3_to_float32(inp)
        assert ours.dtype == np.float32
        _same_bits_or_both_nan(ours, oracle)
    assert np.isnan(oracle).sum() == 2 and np.nanmax(oracle) == 448.0


def _random_fp8(rng, shape, allow_nan=False):
    raw = rng.integers(0, 256, size=shape, dtype=np.uint8)
    if not allow_nan:
        raw[(raw & 0x7F) == 0x7F] = 0x7E
    return raw


def _torch_block_dequant(raw, scale_inv, block, dtype=torch.bfloat16):
    w = torch.from_numpy(raw).view(torch.float8_e4m3fn).to(torch.float32)
    s = torch.from_numpy(scale_inv)
    s = s.repeat_interleave(block[0], dim=-2)[..., : w.shape[-2], :]
    s = s.repeat_interleave(block[1], dim=-1)[..., : w.shape[-1]]
    return (w * s).to(dtype)


@pytest.mark.parametrize("shape,block", [((200, 300), (128, 128)), ((256, 128), (128, 128)),
                                         ((70, 45), (32, 16))])
def test_dequant_fp8_block_matches_torch(shape, block):
    rng = np.random.default_rng(shape[0])
    raw = _random_fp8(rng, shape)
    sshape = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    scale_inv = (rng.random(sshape) * 1e-3 + 1e-5).astype(np.float32)
    oracle = _torch_block_dequant(raw, scale_inv, block)
    exact_oracle = _torch_block_dequant(raw, scale_inv, block, torch.float32).numpy()
    for weight in (raw, raw.view(ml_dtypes.float8_e4m3fn)):
        ours = dequant_fp8_block(weight, scale_inv, block, mode="bf16-rounded")
        assert ours.dtype == BF16 and ours.shape == shape
        np.testing.assert_array_equal(_bits16(ours), _bits16(oracle))
        exact = dequant_fp8_block(weight, scale_inv, block)
        assert exact.dtype == np.float32 and exact.shape == shape
        np.testing.assert_array_equal(exact.view(np.uint32), exact_oracle.view(np.uint32))
        assert (exact != ours.astype(np.float32)).any()


def test_quantize_fp8_block_round_trip():
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((200, 300)) * 0.05).astype(np.float32)
    w[128:, :128] = 0.0  # a zero block
    q, scale_inv = quantize_fp8_block(w)
    assert q.dtype == ml_dtypes.float8_e4m3fn and q.shape == (200, 300)
    assert scale_inv.dtype == np.float32 and scale_inv.shape == (2, 3)
    wt = torch.from_numpy(np.pad(np.abs(w), ((0, 56), (0, 84)))).reshape(2, 128, 3, 128)
    amax = wt.amax(dim=(1, 3))
    expect = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax)).numpy()
    np.testing.assert_allclose(scale_inv, expect, rtol=1e-6)
    deq = dequant_fp8_block(q, scale_inv).astype(np.float32)
    s = np.repeat(np.repeat(scale_inv, 128, 0)[:200], 128, 1)[:, :300]
    assert (np.abs(deq - w) <= np.abs(w) * 2.0**-3 + s * 2.0**-9).all()
    assert np.abs(fp8_e4m3_to_float32(q)).max() == 448.0


# ---------------------------------------------------------------------------------------------- JAX

@pytest.mark.parametrize("n_in,group", [(96, 32), (84, 32), (64, 64)])
def test_dequant_int4_jax_matches_numpy_stacked(n_in, group):
    rng = np.random.default_rng(n_in)
    n_exp, out = 3, 16
    q = np.stack([_codes(rng, out, n_in) for _ in range(n_exp)])
    packed = pack_int4(q)
    scale = (rng.random((n_exp, out, -(-n_in // group))) * 0.02 + 1e-4).astype(np.float32).astype(BF16)
    ref = dequant_int4(packed, scale, (out, n_in), group, mode="bf16-rounded")
    exact = dequant_int4(packed, scale, (out, n_in), group)
    for i in range(n_exp):  # stacking is just a batch of independent matrices
        np.testing.assert_array_equal(_bits16(ref[i]), _bits16(dequant_int4(packed[i], scale[i], (out, n_in), group,
                                                                            mode="bf16-rounded")))
        np.testing.assert_array_equal(exact[i], dequant_int4(packed[i], scale[i], (out, n_in), group))
    f = jax.jit(dequant_int4_jax, static_argnums=(2, 3, 4, 5))
    args = (jnp.asarray(packed), jnp.asarray(scale), n_in, group)
    for mode in ("exact", "bf16-rounded"):  # a bf16 result is the product rounded once, whatever the mode
        got_bf16 = np.asarray(f(*args, jnp.bfloat16, mode))
        assert got_bf16.dtype == BF16
        np.testing.assert_array_equal(_bits16(got_bf16), _bits16(ref))
    got_f32 = np.asarray(f(*args, jnp.float32, "bf16-rounded"))
    assert got_f32.dtype == np.float32
    np.testing.assert_array_equal(got_f32.view(np.uint32), ref.astype(np.float32).view(np.uint32))
    got_exact = np.asarray(f(*args, jnp.float32, "exact"))
    np.testing.assert_array_equal(got_exact.view(np.uint32), exact.view(np.uint32))
    assert (got_exact != got_f32).any()
    eager = dequant_int4_jax(jnp.asarray(packed[0]), jnp.asarray(scale[0]), n_in, group, jnp.float32)
    np.testing.assert_array_equal(np.asarray(eager), exact[0])


@pytest.mark.parametrize("shape,block", [((200, 300), (128, 128)), ((70, 45), (32, 16))])
def test_dequant_fp8_block_jax_matches_numpy_stacked(shape, block):
    rng = np.random.default_rng(1)
    raw = np.stack([_random_fp8(rng, shape, allow_nan=True) for _ in range(2)])
    raw[0, 0, :4] = [0x7F, 0xFF, 0x7E, 0xFE]  # NaN, -NaN, +448, -448
    sshape = (2, -(-shape[0] // block[0]), -(-shape[1] // block[1]))
    scale_inv = (rng.random(sshape) * 1e-2 + 1e-6).astype(np.float32)
    ref = dequant_fp8_block(raw, scale_inv, block, mode="bf16-rounded")
    exact = dequant_fp8_block(raw, scale_inv, block)
    # torch agrees too, NaN payloads aside (torch writes 0xFFFF, ml_dtypes a quiet NaN with the sign)
    _same_bits_or_both_nan(ref[1], _torch_block_dequant(raw[1], scale_inv[1], block).float().numpy().astype(BF16))
    f = jax.jit(dequant_fp8_block_jax, static_argnums=(2, 3, 4))
    for weight in (raw, raw.view(ml_dtypes.float8_e4m3fn)):
        for mode in ("exact", "bf16-rounded"):
            got = np.asarray(f(jnp.asarray(weight), jnp.asarray(scale_inv), block, jnp.bfloat16, mode))
            _same_bits_or_both_nan(got, ref)
        got32 = np.asarray(f(jnp.asarray(weight), jnp.asarray(scale_inv), block, jnp.float32, "bf16-rounded"))
        _same_bits_or_both_nan(got32, ref.astype(np.float32))
        got_exact = np.asarray(f(jnp.asarray(weight), jnp.asarray(scale_inv), block, jnp.float32, "exact"))
        _same_bits_or_both_nan(got_exact, exact)


def test_weight_pytrees_through_jit():
    rng = np.random.default_rng(2)
    q = np.stack([_codes(rng, 8, 64) for _ in range(2)])
    scale = (rng.random((2, 8, 2)) * 0.1 + 1e-3).astype(np.float32).astype(BF16)
    iw = Int4Weight(jnp.asarray(pack_int4(q)), jnp.asarray(scale), in_features=64, group_size=32)
    assert iw.shape == (2, 8, 64)
    leaves, treedef = jax.tree_util.tree_flatten(iw)
    assert len(leaves) == 2 and leaves[0].dtype == jnp.int32

    raw = _random_fp8(rng, (2, 200, 300))
    scale_inv = (rng.random((2, 2, 3)) * 1e-2).astype(np.float32)
    fw = Fp8Weight(jnp.asarray(raw.view(ml_dtypes.float8_e4m3fn)), jnp.asarray(scale_inv), [128, 128])
    assert fw.block_size == (128, 128) and fw.shape == (2, 200, 300)
    assert len(jax.tree_util.tree_leaves(fw)) == 2

    @jax.jit
    def run(a, b):
        return a.dequantize(jnp.float32), b.dequantize(jnp.bfloat16), a

    da, db, a_back = run(iw, fw)
    np.testing.assert_array_equal(np.asarray(da), dequant_int4(pack_int4(q), scale, (8, 64), 32))
    np.testing.assert_array_equal(_bits16(np.asarray(db)),
                                  _bits16(dequant_fp8_block(raw, scale_inv, mode="bf16-rounded")))
    assert isinstance(a_back, Int4Weight) and a_back.in_features == 64 and a_back.group_size == 32
    assert a_back.dequant == "exact"
    # The mode is static metadata: it survives jit, and the rounded container gives the rounded bits.
    rounded = Int4Weight(iw.packed, iw.scale, in_features=64, group_size=32, dequant="bf16-rounded")
    dr, r_back = jax.jit(lambda a: (a.dequantize(jnp.float32), a))(rounded)
    assert r_back.dequant == "bf16-rounded"
    np.testing.assert_array_equal(np.asarray(dr), dequant_int4(pack_int4(q), scale, (8, 64), 32,
                                                              mode="bf16-rounded").astype(np.float32))
    f32 = Fp8Weight(fw.weight, fw.scale_inv, [128, 128]).dequantize(jnp.float32)
    np.testing.assert_array_equal(np.asarray(f32), dequant_fp8_block(raw, scale_inv))
    stacked = jax.tree_util.tree_map(lambda x: x[1], iw)  # slicing an expert keeps the static fields
    assert isinstance(stacked, Int4Weight) and stacked.shape == (8, 64)


# ------------------------------------------------------------------------------------------- errors

def _raises(fn, *needles):
    with pytest.raises(FormatError) as exc:
        fn()
    for needle in needles:
        assert needle in str(exc.value), str(exc.value)


def test_bad_shapes_raise_format_error():
    packed = np.zeros((16, 8), np.int32)  # in = 64
    scale = np.ones((16, 2), BF16)  # group 32
    _raises(lambda: dequant_int4(packed[:, :7], scale, (16, 64), 32),
            "weight_packed", "expected shape (16, 8)", "found (16, 7)")
    _raises(lambda: dequant_int4(packed, scale[:, :1], np.array([16, 64], np.int64), 32),
            "weight_scale", "expected shape (16, 2)", "found (16, 1)")
    _raises(lambda: dequant_int4(packed, scale, np.array([16, 64], np.int32), 16),
            "weight_scale", "expected shape (16, 4)", "found (16, 2)")
    _raises(lambda: dequant_int4(packed, scale, np.array([17, 64]), 32),
            "expected shape (17, 8)", "found (16, 8)")
    _raises(lambda: dequant_int4(packed, scale, np.array([16]), 32), "weight_shape")
    _raises(lambda: dequant_int4(packed, scale.astype(np.float32), (16, 64), 32), "bfloat16", "float32")
    _raises(lambda: unpack_int4(packed, 72), "expected shape (16, 9)", "found (16, 8)")
    _raises(lambda: unpack_int4(packed.astype(np.int64), 64), "int32", "int64")
    _raises(lambda: pack_int4(np.array([[8, 0]], np.int8)), "[-8, 7]")
    _raises(lambda: dequant_int4_jax(jnp.asarray(packed), jnp.asarray(scale), 64, 16),
            "expected shape (16, 4)", "found (16, 2)")
    _raises(lambda: Int4Weight(jnp.asarray(packed), jnp.asarray(scale), 70, 32).dequantize(jnp.float32),
            "expected shape (16, 9)", "found (16, 8)")

    raw = np.zeros((200, 300), np.uint8)
    _raises(lambda: dequant_fp8_block(raw, np.ones((1, 3), np.float32)),
            "weight_scale_inv", "expected shape (2, 3)", "found (1, 3)")
    _raises(lambda: dequant_fp8_block(raw, np.ones((2, 3), np.float64)), "float32", "float64")
    _raises(lambda: fp8_e4m3_to_float32(np.zeros(4, np.float16)), "float16")
    _raises(lambda: dequant_fp8_block_jax(jnp.asarray(raw), jnp.ones((2, 2), jnp.float32), (128, 128),
                                          jnp.bfloat16), "expected shape (2, 3)", "found (2, 2)")
    _raises(lambda: Fp8Weight(jnp.asarray(raw), jnp.ones((3, 3), jnp.float32)).dequantize(jnp.float32),
            "expected shape (2, 3)", "found (3, 3)")

    _raises(lambda: dequant_int4(packed, scale, (16, 64), 32, mode="bf16"), "dequant", "exact, bf16-rounded", "'bf16'")
    _raises(lambda: dequant_fp8_block(raw, np.ones((2, 3), np.float32), mode="round"), "dequant", "'round'")
    _raises(lambda: Int4Weight(jnp.asarray(packed), jnp.asarray(scale), 64, 32, "fast").dequantize(jnp.float32),
            "dequant", "'fast'")
