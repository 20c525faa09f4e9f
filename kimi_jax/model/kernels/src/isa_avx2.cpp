// AVX2 + FMA + F16C kernels (x86-64 since 2013), for CPUs without AVX-512. Same structure as
// isa_avx512.cpp with 8 lanes; AVX2 has no 16-entry permute or byte-masked loads, so int4 codes are
// sign-extended and converted, and a ragged last chunk is copied into a zeroed local buffer first.
#include <cstdint>
#include <cstring>

#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace {

struct V {
  static constexpr int W = 8, MAX_ACC = 4, ROW_BLOCK = 4;
  using F = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F madd(F a, F b, F acc) { return _mm256_fmadd_ps(a, b, acc); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static float hsum(F v) {  // lanes i + 4, then i + 2, i + 1
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    return _mm_cvtss_f32(q);
  }
  static F round_bf16(F v) {  // as isa_avx512.cpp
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i hi = _mm256_set1_epi32(int32_t(0xFFFF0000u));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), lsb), hi);
    const __m256i qn = _mm256_and_si256(_mm256_or_si256(b, _mm256_set1_epi32(0x00400000)), hi);
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(qn), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
};

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline int64_t clamp(int64_t v, int64_t hi) { return v < 0 ? 0 : v > hi ? hi : v; }

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

  template <bool TAIL>
  __m256 scale(int64_t c) const {
    const int64_t w0 = V::W * c;
    if (shift >= 0 && gw <= V::W) {  // 8 / gw consecutive groups, each spread over gw lanes
      const int64_t g0 = w0 >> shift, m = V::W >> shift;
      __m128i bits = _mm_setzero_si128();
      if (TAIL) {
        uint16_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(tail, scales + g0, size_t(clamp(n_groups - g0, m)) * 2);
        bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tail));
      } else if (m == 8) {
        bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g0));
      } else if (m == 4) {
        bits = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales + g0));
      } else if (m == 2) {
        uint32_t two;
        std::memcpy(&two, scales + g0, 4);
        bits = _mm_cvtsi32_si128(int(two));
      } else {
        bits = _mm_cvtsi32_si128(scales[g0]);
      }
      const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
      const __m256i idx = _mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), unsigned(shift));
      return _mm256_permutevar8x32_ps(s, idx);
    }
    if (shift >= 0) return _mm256_set1_ps(bf16_to_float(scales[w0 >> shift]));  // one group per chunk
    alignas(32) float s[V::W];
    for (int l = 0; l < V::W; ++l) {
      const int64_t g = (w0 + l) / gw;
      s[l] = g < n_groups ? bf16_to_float(scales[g]) : 0.0f;
    }
    return _mm256_load_ps(s);
  }

  struct Chunk {
    __m256i x;  // the words ^ 0x88888888: each nibble is its code as a 4-bit two's complement number
    __m256 s;
  };

  template <bool TAIL>
  Chunk load(int64_t c) const {
    __m256i v;
    if (TAIL) {
      uint32_t tail[V::W] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(tail, words + V::W * c, size_t(clamp(n_words - V::W * c, V::W)) * 4);
      v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tail));
    } else {
      v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + V::W * c));
    }
    return Chunk{_mm256_xor_si256(v, _mm256_set1_epi32(int32_t(0x88888888u))), scale<TAIL>(c)};
  }

  template <bool TAIL>
  __m256 get(const Chunk& ch, int k, int64_t c) const {
    // shift nibble k to the top, shift back with sign: the code q in [-8, 7]
    const __m256i top = k == 7 ? ch.x : _mm256_slli_epi32(ch.x, unsigned(28 - 4 * k));
    __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(top, 28)), ch.s);
    if (ROUND) w = V::round_bf16(w);
    if (TAIL) {  // columns past n_in are exactly zero
      const __m256i cols = _mm256_add_epi32(
          _mm256_slli_epi32(_mm256_add_epi32(_mm256_set1_epi32(int32_t(V::W * c)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), 3),
          _mm256_set1_epi32(k));
      w = _mm256_and_ps(w, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(n_in)), cols)));
    }
    return w;
  }
};

// ------------------------------------------------------------------------------------------ bf16
struct Bf16Dec {
  static constexpr int K = 4, COLS = 4 * V::W;
  static int64_t col(int64_t c, int k, int l) { return COLS * c + 16 * (k / 2) + 8 * (l / 4) + 4 * (k % 2) + (l % 4); }

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
    __m256i v[2];
  };

  template <bool TAIL>
  Chunk load(int64_t c) const {
    alignas(32) uint16_t tail[COLS];
    const uint16_t* p = row + COLS * c;
    if (TAIL) {
      std::memset(tail, 0, sizeof tail);
      std::memcpy(tail, p, size_t(clamp(n_in - COLS * c, COLS)) * 2);
      p = tail;
    }
    return Chunk{{_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16))}};
  }

  template <bool TAIL>
  __m256 get(const Chunk& ch, int k, int64_t) const {
    const __m256i v = ch.v[k / 2];
    return _mm256_castsi256_ps(k % 2 ? _mm256_unpackhi_epi16(_mm256_setzero_si256(), v)
                                     : _mm256_unpacklo_epi16(_mm256_setzero_si256(), v));
  }
};

// ------------------------------------------------------------------------------------------- fp8
template <bool ROUND>  // the dequantized weight rounded to bfloat16 (compute.dequant: bf16-rounded)
struct Fp8Dec {  // the float16 trick of isa_avx512.cpp
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
    __m256 w[4];
  };

  template <bool TAIL>
  Chunk load(int64_t c) const {
    Chunk ch;
    alignas(32) uint8_t tail[COLS];
    const uint8_t* p = row + COLS * c;
    if (TAIL) {
      std::memset(tail, 0, sizeof tail);
      std::memcpy(tail, p, size_t(clamp(n_in - COLS * c, COLS)));
      p = tail;
    }
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h)));
      const __m256i t = _mm256_slli_epi16(v, 7);
      const __m256i half = _mm256_add_epi16(t, _mm256_and_si256(t, _mm256_set1_epi16(0x4000)));
      __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(half));
      __m256 hi = _mm256_cvtph_ps(_mm256_extracti128_si256(half, 1));
      if (chunk_shift >= 0) {  // one scale for the chunk: 2^8 folded in when that is exact
        const float b = blocks[c >> chunk_shift];
        if (__builtin_fabsf(b) < 0x1p120f || !__builtin_isfinite(b)) {
          lo = _mm256_mul_ps(lo, _mm256_set1_ps(b * 256.0f));
          hi = _mm256_mul_ps(hi, _mm256_set1_ps(b * 256.0f));
        } else {
          lo = _mm256_mul_ps(_mm256_mul_ps(lo, _mm256_set1_ps(256.0f)), _mm256_set1_ps(b));
          hi = _mm256_mul_ps(_mm256_mul_ps(hi, _mm256_set1_ps(256.0f)), _mm256_set1_ps(b));
        }
      } else {
        const float* sp = s + COLS * c + 16 * h;
        if (!prescaled) {
          lo = _mm256_mul_ps(lo, _mm256_set1_ps(256.0f));
          hi = _mm256_mul_ps(hi, _mm256_set1_ps(256.0f));
        }
        lo = _mm256_mul_ps(lo, _mm256_loadu_ps(sp));
        hi = _mm256_mul_ps(hi, _mm256_loadu_ps(sp + 8));
      }
      if (TAIL) {  // columns past n_in are exactly zero, even under an infinite or NaN block scale
        const __m256i col = _mm256_add_epi32(_mm256_set1_epi32(int32_t(COLS * c + 16 * h)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256i limit = _mm256_set1_epi32(int32_t(n_in));
        lo = _mm256_and_ps(lo, _mm256_castsi256_ps(_mm256_cmpgt_epi32(limit, col)));
        hi = _mm256_and_ps(hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(limit, _mm256_add_epi32(col, _mm256_set1_epi32(8)))));
      }
      const __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x7F)), _mm256_set1_epi16(0x7F));
      if (_mm256_movemask_epi8(nan)) {
        const __m256 q = _mm256_set1_ps(__builtin_nanf(""));
        lo = _mm256_blendv_ps(lo, q, _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(nan))));
        hi = _mm256_blendv_ps(hi, q, _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(nan, 1))));
      }
      ch.w[2 * h] = ROUND ? V::round_bf16(lo) : lo;
      ch.w[2 * h + 1] = ROUND ? V::round_bf16(hi) : hi;
    }
    return ch;
  }

  template <bool TAIL>
  __m256 get(const Chunk& ch, int k, int64_t) const { return ch.w[k]; }
};

#include "driver.inc"

const kj::KernelTable kTable = {kj::kAvx2, "avx2", padded_cols, prepare, rows};

}  // namespace

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

const kj::KernelTable* kj::table_avx2() { return &kTable; }

#else
const kj::KernelTable* kj::table_avx2() { return nullptr; }
#endif
