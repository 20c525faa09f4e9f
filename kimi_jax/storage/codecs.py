"""Stored quantized formats, decoded with numpy: compressed-tensors int4 (pack-quantized) and
DeepSeek block FP8. The JAX containers that keep them packed until the matmul live in
:mod:`kimi_jax.model.quant`.

int4 (Kimi K2.5 / K2-Thinking routed experts): ``weight_packed`` int32 [out, ceil(in/8)], word w of
row o holds input columns 8w..8w+7, column 8w+j in bits [4j, 4j+4) (LSB first), nibble = q + 8
(offset binary, not two's complement). ``weight_scale`` bf16 [out, ceil(in/group)];
W[o, i] = q[o, i] * scale[o, i // group].

FP8 (K2-Instruct / DeepSeek-V3): ``weight`` float8_e4m3fn [out, in], ``weight_scale_inv`` f32
[ceil(out/b0), ceil(in/b1)] which is *multiplied*: W[i, j] = f32(fp8[i, j]) * s[i//b0, j//b1].

Dequantization modes (``compute.dequant`` in a manifest):

* ``exact``: the product in float32, nothing rounded after it. For int4 that is the exact value
  (a code needs at most 4 significant bits, a bf16 scale 8, float32 keeps 24); for FP8 it is the
  float32 product (4 + 24 bits), rounded once, as float32 arithmetic does.
* ``bf16-rounded``: that product rounded once more to bfloat16, as compressed-tensors'
  decompressor and bf16 serving kernels produce it. It is *not* exact: ``7 * 1.0078125 =
  7.0546875`` needs 10 significant bits and bfloat16 keeps 8.

All functions accept optional leading (stacked-expert) axes: [..., out, in].
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from kimi_jax.config import DEFAULT_FP8_BLOCK
from kimi_jax.errors import FormatError
from kimi_jax.settings import BF16_ROUNDED, DEQUANT_MODES, EXACT

BF16 = ml_dtypes.bfloat16
FP8 = ml_dtypes.float8_e4m3fn
FP8_MAX = 448.0
NIBBLE_SHIFTS = np.arange(8, dtype=np.uint32) * 4  # nibble j of a word sits at bits [4j, 4j+4)

# Records written before the mode existed (ledger v1, anchor v1, manifests without
# compute.dequant) were all computed by kimi-jax 0.1.0, which always rounded to bfloat16.
LEGACY_DEQUANT = BF16_ROUNDED
LEGACY_DEQUANT_NOTE = "bf16-rounded (kimi-jax 0.1.0, which did not record the mode)"


def recorded_dequant(value) -> str:
    """The dequantization mode a record states; a record without one predates the choice."""
    return LEGACY_DEQUANT if value is None else value


def describe_dequant(value) -> str:
    """The recorded mode for a message: a missing one is named as the old rounding, and said so."""
    return LEGACY_DEQUANT_NOTE if value is None else str(value)


def check_dequant_mode(mode: str) -> str:
    if mode not in DEQUANT_MODES:
        raise FormatError(f"dequant: expected one of {', '.join(DEQUANT_MODES)}, found {mode!r}")
    return mode


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_shape(what: str, found, expected) -> None:
    found, expected = tuple(int(d) for d in found), tuple(int(d) for d in expected)
    if found != expected:
        raise FormatError(f"{what}: expected shape {expected}, found {found}")


def _shape_from_weight_shape(weight_shape) -> tuple[int, ...]:
    """Accept the stored ``weight_shape`` tensor (int32 or int64, shape [2]) or a tuple."""
    arr = np.asarray(weight_shape)
    if arr.ndim != 1 or arr.size < 2 or not np.issubdtype(arr.dtype, np.integer):
        raise FormatError(
            f"weight_shape: expected a 1-D integer tensor of length >= 2 (out, in), "
            f"found dtype {arr.dtype} shape {tuple(arr.shape)}")
    if np.any(arr <= 0):
        raise FormatError(f"weight_shape: expected positive dimensions, found {arr.tolist()}")
    return tuple(int(d) for d in arr)


# ----------------------------------------------------------------------------------- int4 (numpy)

def unpack_int4(packed: np.ndarray, in_features: int) -> np.ndarray:
    """int32 [..., out, ceil(in/8)] -> int8 [..., out, in] with codes in [-8, 7]."""
    packed = np.asarray(packed)
    if packed.dtype not in (np.int32, np.uint32):
        raise FormatError(f"weight_packed: expected dtype int32, found {packed.dtype}")
    if packed.ndim < 2:
        raise FormatError(f"weight_packed: expected at least 2 dims [out, words], found shape {packed.shape}")
    in_features = int(in_features)
    if in_features <= 0:
        raise FormatError(f"in_features: expected a positive integer, found {in_features}")
    check_shape("weight_packed", packed.shape, (*packed.shape[:-1], cdiv(in_features, 8)))
    words = packed.view(np.uint32)
    nibbles = (words[..., None] >> NIBBLE_SHIFTS) & np.uint32(0xF)  # [..., out, words, 8]
    q = nibbles.astype(np.int8) - np.int8(8)
    return q.reshape(*packed.shape[:-1], -1)[..., :in_features]


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 [..., out, in] in [-8, 7] -> int32 [..., out, ceil(in/8)]; padding columns packed as q=0."""
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
        raise FormatError(f"int4 codes: expected an integer array, found dtype {q.dtype}")
    if q.ndim < 2:
        raise FormatError(f"int4 codes: expected at least 2 dims [out, in], found shape {q.shape}")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise FormatError(f"int4 codes: expected values in [-8, 7], found range [{q.min()}, {q.max()}]")
    n_in = q.shape[-1]
    n_words = cdiv(n_in, 8)
    nib = np.full((*q.shape[:-1], n_words * 8), 8, dtype=np.uint32)  # nibble 8 == q 0
    nib[..., :n_in] = (q.astype(np.int32) + 8).astype(np.uint32)
    nib = nib.reshape(*q.shape[:-1], n_words, 8) << NIBBLE_SHIFTS
    return np.bitwise_or.reduce(nib, axis=-1).astype(np.uint32).view(np.int32)


def dequant_int4(packed: np.ndarray, scale: np.ndarray, weight_shape, group_size: int,
                 mode: str = EXACT) -> np.ndarray:
    """W[o, i] = q[o, i] * scale[o, i // group_size]: float32 (exact) or, ``bf16-rounded``, bfloat16."""
    shape = _shape_from_weight_shape(weight_shape)
    packed, scale = np.asarray(packed), np.asarray(scale)
    group_size = int(group_size)
    if group_size <= 0:
        raise FormatError(f"group_size: expected a positive integer, found {group_size}")
    if scale.dtype != BF16:
        raise FormatError(f"weight_scale: expected dtype bfloat16, found {scale.dtype}")
    if len(shape) == 2:  # the stored [2] tensor describes one matrix; allow stacked leading axes
        shape = (*packed.shape[:-2], *shape)
    *lead, n_out, n_in = shape
    check_shape("weight_packed", packed.shape, (*lead, n_out, cdiv(n_in, 8)))
    check_shape("weight_scale", scale.shape, (*lead, n_out, cdiv(n_in, group_size)))
    check_dequant_mode(mode)
    q = unpack_int4(packed, n_in).astype(np.float32)
    s = np.repeat(scale.astype(np.float32), group_size, axis=-1)[..., :n_in]
    exact = q * s  # 4 + 8 significant bits fit float32's 24: no rounding
    return exact if mode == EXACT else exact.astype(BF16)


def quantize_int4(w: np.ndarray, group_size: int, min_code: int = -7) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-group int4: scale = bf16(amax / 7), q = clip(round(w / scale), min_code, 7)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 2:
        raise FormatError(f"weight: expected at least 2 dims [out, in], found shape {w.shape}")
    if not -8 <= int(min_code) <= 0:
        raise FormatError(f"min_code: expected a value in [-8, 0], found {min_code}")
    n_in, n_groups = w.shape[-1], cdiv(w.shape[-1], group_size)
    padded = np.zeros((*w.shape[:-1], n_groups * group_size), dtype=np.float32)
    padded[..., :n_in] = w
    amax = np.abs(padded.reshape(*w.shape[:-1], n_groups, group_size)).max(axis=-1)
    scale = np.where(amax > 0, amax / np.float32(7.0), np.float32(1.0)).astype(BF16)
    s = np.repeat(scale.astype(np.float32), group_size, axis=-1)[..., :n_in]
    q = np.clip(np.round(w / s), int(min_code), 7).astype(np.int8)
    return pack_int4(q), scale


# ------------------------------------------------------------------------------------ fp8 (numpy)

def fp8_e4m3_to_float32(raw: np.ndarray) -> np.ndarray:
    """uint8 bytes or float8_e4m3fn values -> float32 (0x7F / 0xFF are NaN; there is no inf)."""
    raw = np.asarray(raw)
    if raw.dtype == np.uint8:
        raw = raw.view(FP8)
    elif raw.dtype != FP8:
        raise FormatError(f"fp8 weight: expected dtype float8_e4m3fn or uint8, found {raw.dtype}")
    return raw.astype(np.float32)


def block_size_pair(block_size) -> tuple[int, int]:
    bs = tuple(int(b) for b in block_size)
    if len(bs) != 2 or min(bs) <= 0:
        raise FormatError(f"block_size: expected two positive integers, found {tuple(block_size)}")
    return bs


def dequant_fp8_block(weight: np.ndarray, scale_inv: np.ndarray, block_size=DEFAULT_FP8_BLOCK,
                      mode: str = EXACT) -> np.ndarray:
    """W[i, j] = f32(fp8[i, j]) * scale_inv[i // b0, j // b1] in float32 (or, ``bf16-rounded``,
    that rounded to bfloat16); edge blocks may be partial."""
    b0, b1 = block_size_pair(block_size)
    check_dequant_mode(mode)
    w = fp8_e4m3_to_float32(weight)
    scale_inv = np.asarray(scale_inv)
    if w.ndim < 2:
        raise FormatError(f"fp8 weight: expected at least 2 dims [out, in], found shape {w.shape}")
    if scale_inv.dtype != np.float32:
        raise FormatError(f"weight_scale_inv: expected dtype float32, found {scale_inv.dtype}")
    *lead, n_out, n_in = w.shape
    check_shape("weight_scale_inv", scale_inv.shape, (*lead, cdiv(n_out, b0), cdiv(n_in, b1)))
    s = np.repeat(np.repeat(scale_inv, b0, axis=-2)[..., :n_out, :], b1, axis=-1)[..., :n_in]
    product = w * s
    return product if mode == EXACT else product.astype(BF16)


def quantize_fp8_block(w: np.ndarray, block_size=DEFAULT_FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Per-block FP8: scale_inv = amax_block / 448 (1.0 for all-zero blocks), q = fp8(w / scale_inv)."""
    b0, b1 = block_size_pair(block_size)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 2:
        raise FormatError(f"weight: expected at least 2 dims [out, in], found shape {w.shape}")
    *lead, n_out, n_in = w.shape
    r, c = cdiv(n_out, b0), cdiv(n_in, b1)
    padded = np.zeros((*lead, r * b0, c * b1), dtype=np.float32)
    padded[..., :n_out, :n_in] = w
    blocks = np.abs(padded.reshape(*lead, r, b0, c, b1))
    amax = blocks.max(axis=(-3, -1))
    scale_inv = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1.0)).astype(np.float32)
    s = np.repeat(np.repeat(scale_inv, b0, axis=-2)[..., :n_out, :], b1, axis=-1)[..., :n_in]
    q = np.clip(w / s, -FP8_MAX, FP8_MAX).astype(FP8)
    return q, scale_inv


