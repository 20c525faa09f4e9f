// AVX-512 (F, BW, VL, DQ) + F16C kernels. Compiled for that target with a pragma so the rest of the
// library stays baseline x86-64; used only where CPUID reports every feature (ffi.cpp).
//
// Layouts (Dec::col): int4 lanes are packed words (lane l of vector k holds nibble k of word
// 16c + l), bf16 vectors come from in-lane unpacks of 32 columns, fp8 is in column order; the
// activations are permuted to match once per call, so no weight is ever shuffled into place.
#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

namespace {

struct V {
  static constexpr int W = 16, MAX_ACC = 16, ROW_BLOCK = 4;
  using F = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F madd(F a, F b, F acc) { return _mm512_fmadd_ps(a, b, acc); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  // Lanes i + 8, then i + 4, i + 2, i + 1 added in: the same tree on every call.
  static float hsum(F v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    return _mm_cvtss_f32(q);
  }
  // float32 -> nearest bfloat16 (ties to even), as float32 with the low 16 bits zero; NaN stays NaN
  // (quieted, sign kept): the integer rounding of kimi_jax.model.quant._round_to_bf16_bits.
  static F round_bf16(F v) {
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i hi = _mm512_set1_epi32(int32_t(0xFFFF0000u));
    const __m512i r = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), hi);
    const __m512i qn = _mm512_and_si512(_mm512_or_si512(b, _mm512_set1_epi32(0x00400000)), hi);
    return _mm512_castsi512_ps(_mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, qn));
  }
};

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __mmask16 first_lanes16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? 0 : __mmask16((1u << n) - 1); }
inline __mmask32 first_lanes32(int64_t n) { return n >= 32 ? __mmask32(0xFFFFFFFFu) : n <= 0 ? 0 : __mmask32((1u << n) - 1); }

// ------------------------------------------------------------------------------------------ int4
template <bool ROUND>  // the dequantized weight rounded to bfloat16 (compute.dequant: bf16-rounded)
struct Int4Dec {
  static constexpr int K = 8, COLS = 8 * V::W;
  static int64_t col(int64_t c, int k, int l) { return 8 * (V::W * c + l) + k; }

  const uint32_t* words;
  const uint16_t* scales;
  int64_t n_words, n_groups, gw, n_in, n_full;
  int shift;       // log2(gw) when gw (words per group) is a power of two, else -1

  Int4Dec() = default;
  explicit Int4Dec(const kj::LinearJob& job) {
    n_in = job.n_in;
    n_words = (n_in + 7) / 8;
    n_groups = (n_in + job.group_size - 1) / job.group_size;
    gw = job.group_size / 8;
    shift = (gw & (gw - 1)) == 0 ? __builtin_ctzll(uint64_t(gw)) : -1;
    words = static_cast<const uint32_t*>(job.w);
    scales = static_cast<const uint16_t*>(job.scale);
    n_full = n_in / COLS;
  }

  Int4Dec at(const kj::LinearJob&, int64_t o) const {
    Int4Dec d = *this;
    d.words += o * n_words;
    d.scales += o * n_groups;
    return d;
  }

  // Lane l (word 16c + l) gets the scale of group (16c + l) / gw.
  __m512 scale(int64_t c) const {
    const int64_t w0 = V::W * c;
    if (shift >= 0 && gw <= V::W) {  // 16 / gw consecutive groups, each spread over gw lanes
      const int64_t g0 = w0 >> shift;
      const __m256i bits = _mm256_maskz_loadu_epi16(first_lanes16(n_groups - g0), scales + g0);
      const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
      const __m512i idx = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            unsigned(shift));
      return _mm512_permutexvar_ps(idx, s);
    }
    if (shift >= 0) return _mm512_set1_ps(bf16_to_float(scales[w0 >> shift]));  // one group per chunk
    alignas(64) float s[V::W];
    for (int l = 0; l < V::W; ++l) {
      const int64_t g = (w0 + l) / gw;
      s[l] = g < n_groups ? bf16_to_float(scales[g]) : 0.0f;
    }
    return _mm512_load_ps(s);
  }

  struct Chunk {
    __m512i v;
    __m512 s;
  };

  template <bool TAIL>
  Chunk load(int64_t c) const {
    const __m512i v = TAIL ? _mm512_maskz_loadu_epi32(first_lanes16(n_words - V::W * c), words + V::W * c)
                           : _mm512_loadu_si512(words + V::W * c);
    return Chunk{v, scale(c)};
  }

  template <bool TAIL>
  __m512 get(const Chunk& ch, int k, int64_t c) const {
    // vpermps reads the low 4 bits of each index lane: nibble k of every word picks (k - 8).
    const __m512 codes = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i idx = k ? _mm512_srli_epi32(ch.v, unsigned(4 * k)) : ch.v;
    __m512 w = _mm512_mul_ps(_mm512_permutexvar_ps(idx, codes), ch.s);
    if (ROUND) w = V::round_bf16(w);
    if (TAIL) {  // columns past n_in are exactly zero, whatever the padding nibbles and scales hold
      const int64_t valid = (n_in - COLS * c - k + 7) / 8;  // lanes l with 8 (16c + l) + k < n_in
      w = _mm512_maskz_mov_ps(first_lanes16(valid), w);
    }
    return w;
  }
};

// ------------------------------------------------------------------------------------------ bf16
struct Bf16Dec {
  static constexpr int K = 4, COLS = 4 * V::W;
  // unpacklo/hi of 32 words take words 0-3 / 4-7 of each 128-bit lane
  static int64_t col(int64_t c, int k, int l) { return COLS * c + 32 * (k / 2) + 8 * (l / 4) + 4 * (k % 2) + (l % 4); }

  const uint16_t* row;
  int64_t n_in, n_full;

  Bf16Dec() = default;
  explicit Bf16Dec(const kj::LinearJob& job)
      : row(static_cast<const uint16_t*>(job.w)), n_in(job.n_in), n_full(job.n_in / COLS) {}

  Bf16Dec at(const kj::LinearJob&, int64_t o) const {
    Bf16Dec d = *this;
    d.row += o * n_in;
    return d;
  }

  struct Chunk {
    __m512i v[2];
  };

  template <bool TAIL>
  Chunk load(int64_t c) const {
    Chunk ch;
    for (int h = 0; h < 2; ++h) {
      const uint16_t* p = row + COLS * c + 32 * h;
      ch.v[h] = TAIL ? _mm512_maskz_loadu_epi16(first_lanes32(n_in - (p - row)), p) : _mm512_loadu_si512(p);
    }
    return ch;
  }

  template <bool TAIL>
  __m512 get(const Chunk& ch, int k, int64_t) const {
    const __m512i v = ch.v[k / 2];
    return _mm512_castsi512_ps(k % 2 ? _mm512_unpackhi_epi16(_mm512_setzero_si512(), v)
                                     : _mm512_unpacklo_epi16(_mm512_setzero_si512(), v));
  }
};

// ------------------------------------------------------------------------------------------- fp8
// e4m3fn byte S.EEEE.MMM -> float16 bits S.0EEEE.MMM0000000 (a float16 2^8 times smaller, subnormals
// included), converted exactly by vcvtph2ps; the 2^8 is folded into the scale where that is exact.
template <bool ROUND>  // the dequantized weight rounded to bfloat16 (compute.dequant: bf16-rounded)
struct Fp8Dec {
  static constexpr int K = 4, COLS = 4 * V::W;
  static int64_t col(int64_t c, int k, int l) { return COLS * c + V::W * k + l; }

  const uint8_t* row;
  const float* s;       // the row's scale per column (n_pad floats), when blocks are not whole chunks
  const float* blocks;  // else the row's block scales, one per (1 << chunk_shift) chunks
  int64_t n_in, n_full, n_bc;
  int chunk_shift;
  bool prescaled;

  Fp8Dec() = default;
  explicit Fp8Dec(const kj::LinearJob& job)
      : row(static_cast<const uint8_t*>(job.w)), s(nullptr), blocks(nullptr), n_in(job.n_in), n_full(job.n_in / COLS),
        n_bc((job.n_in + job.block_cols - 1) / job.block_cols), chunk_shift(-1), prescaled(false) {
    const int64_t per = job.block_cols / COLS;  // whole chunks per block, a power of two: one scale per chunk
    if (job.block_cols % COLS == 0 && (per & (per - 1)) == 0) chunk_shift = __builtin_ctzll(uint64_t(per));
  }

  Fp8Dec at(const kj::LinearJob& job, int64_t o) const {
    Fp8Dec d = *this;
    d.row += o * n_in;
    if (chunk_shift >= 0)
      d.blocks = static_cast<const float*>(job.scale) + (o / job.block_rows) * n_bc;
    else
      d.s = kj::fp8_row_scales(job, o / job.block_rows, true, &d.prescaled);
    return d;
  }

  struct Chunk {
    __m512 w[4];
  };

  template <bool TAIL>
  Chunk load(int64_t c) const {
    Chunk ch;
    for (int h = 0; h < 2; ++h) {
      const uint8_t* p = row + COLS * c + 32 * h;
      const __m256i bytes = TAIL ? _mm256_maskz_loadu_epi8(first_lanes32(n_in - (p - row)), p)
                                 : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m512i v = _mm512_cvtepu8_epi16(bytes);
      const __m512i t = _mm512_slli_epi16(v, 7);
      const __m512i half = _mm512_add_epi16(t, _mm512_and_si512(t, _mm512_set1_epi16(0x4000)));
      __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(half));
      __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(half, 1));
      if (chunk_shift >= 0) {  // one scale for the chunk: 2^8 folded in when that is exact
        const float b = blocks[c >> chunk_shift];
        if (__builtin_fabsf(b) < 0x1p120f || !__builtin_isfinite(b)) {
          lo = _mm512_mul_ps(lo, _mm512_set1_ps(b * 256.0f));
          hi = _mm512_mul_ps(hi, _mm512_set1_ps(b * 256.0f));
        } else {
          lo = _mm512_mul_ps(_mm512_mul_ps(lo, _mm512_set1_ps(256.0f)), _mm512_set1_ps(b));
          hi = _mm512_mul_ps(_mm512_mul_ps(hi, _mm512_set1_ps(256.0f)), _mm512_set1_ps(b));
        }
      } else {
        const float* sp = s + COLS * c + 32 * h;
        if (!prescaled) {
          lo = _mm512_mul_ps(lo, _mm512_set1_ps(256.0f));
          hi = _mm512_mul_ps(hi, _mm512_set1_ps(256.0f));
        }
        lo = _mm512_mul_ps(lo, _mm512_loadu_ps(sp));
        hi = _mm512_mul_ps(hi, _mm512_loadu_ps(sp + 16));
      }
      if (TAIL) {  // columns past n_in are exactly zero, even under an infinite or NaN block scale
        const int64_t col0 = COLS * c + 32 * h;
        lo = _mm512_maskz_mov_ps(first_lanes16(n_in - col0), lo);
        hi = _mm512_maskz_mov_ps(first_lanes16(n_in - col0 - 16), hi);
      }
      const __mmask32 nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(v, _mm512_set1_epi16(0x7F)), _mm512_set1_epi16(0x7F));
      if (nan) {  // 0x7F / 0xFF: e4m3fn's only NaNs (it has no infinities)
        lo = _mm512_mask_mov_ps(lo, __mmask16(nan), _mm512_set1_ps(__builtin_nanf("")));
        hi = _mm512_mask_mov_ps(hi, __mmask16(nan >> 16), _mm512_set1_ps(__builtin_nanf("")));
      }
      ch.w[2 * h] = ROUND ? V::round_bf16(lo) : lo;
      ch.w[2 * h + 1] = ROUND ? V::round_bf16(hi) : hi;
    }
    return ch;
  }

  template <bool TAIL>
  __m512 get(const Chunk& ch, int k, int64_t) const { return ch.w[k]; }
};

#include "driver.inc"

const kj::KernelTable kTable = {kj::kAvx512, "avx512", padded_cols, prepare, rows};

}  // namespace

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

const kj::KernelTable* kj::table_avx512() { return &kTable; }

#else
const kj::KernelTable* kj::table_avx512() { return nullptr; }
#endif
