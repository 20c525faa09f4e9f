// Portable C++ kernels: any CPU, any compiler target (the compiler may vectorize the 8-lane loops).
// Products and sums are separate float32 operations here (no fused multiply-add): each product is
// rounded to float32, then added, as in the widened reference.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

// -O2 here: the fallback's 8-lane loops fully unrolled at -O3 quadrupled the build time (8 s -> 2 s)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O2")
#endif

namespace {

struct V {
  static constexpr int W = 8, MAX_ACC = 4, ROW_BLOCK = 4;
  struct F {
    float v[W];
  };
  static F zero() { return F{}; }
  static F load(const float* p) {
    F r;
    std::memcpy(r.v, p, sizeof r.v);
    return r;
  }
  static void store(float* p, const F& a) { std::memcpy(p, a.v, sizeof a.v); }
  static F madd(const F& a, const F& b, const F& acc) {
    F r;
    for (int l = 0; l < W; ++l) {
      const float p = a.v[l] * b.v[l];
      r.v[l] = acc.v[l] + p;
    }
    return r;
  }
  static F add(const F& a, const F& b) {
    F r;
    for (int l = 0; l < W; ++l) r.v[l] = a.v[l] + b.v[l];
    return r;
  }
  static float hsum(const F& a) {  // lanes i + 4, then i + 2, i + 1, as the AVX2 path
    float q[4];
    for (int l = 0; l < 4; ++l) q[l] = a.v[l] + a.v[l + 4];
    const float p0 = q[0] + q[2], p1 = q[1] + q[3];
    return p0 + p1;
  }
};

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_float(uint16_t bits) { return from_bits(uint32_t(bits) << 16); }

inline float round_bf16(float f) {  // kimi_jax.model.quant._round_to_bf16_bits
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if (std::isnan(f)) return from_bits((b | 0x00400000u) & 0xFFFF0000u);
  return from_bits((b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u);
}

// Columns in natural order for every format: vector k of chunk c holds columns COLS c + 8 k + l.
// int4: one vector is one packed word (8 nibbles, LSB first), so a group of a multiple of 8 columns
// never splits a word.
template <bool ROUND>  // the dequantized weight rounded to bfloat16 (compute.dequant: bf16-rounded)
struct Int4Dec {
  static constexpr int K = 8, COLS = 8 * V::W;
  static int64_t col(int64_t c, int k, int l) { return COLS * c + V::W * k + l; }

  const uint32_t* words;
  const uint16_t* scales;
  int64_t n_words, n_groups, gw, n_in, n_full;

  Int4Dec() = default;
  explicit Int4Dec(const kj::LinearJob& job) {
    n_in = job.n_in;
    n_full = n_in / COLS;
    n_words = (n_in + 7) / 8;
    n_groups = (n_in + job.group_size - 1) / job.group_size;
    gw = job.group_size / 8;
    words = static_cast<const uint32_t*>(job.w);
    scales = static_cast<const uint16_t*>(job.scale);
  }

  Int4Dec at(const kj::LinearJob&, int64_t o) const {
    Int4Dec d = *this;
    d.words += o * n_words;
    d.scales += o * n_groups;
    return d;
  }

  struct Chunk {
    V::F w[K];
  };

  template <bool TAIL>
  Chunk load(int64_t c) const {
    Chunk ch;
    decode(c, ch.w);
    return ch;
  }

  template <bool TAIL>
  V::F get(const Chunk& ch, int k, int64_t) const { return ch.w[k]; }

  void decode(int64_t c, V::F* w) const {
    for (int k = 0; k < K; ++k) {
      const int64_t word = K * c + k;
      if (word >= n_words) {
        w[k] = V::zero();
        continue;
      }
      const uint32_t bits = words[word];
      const float s = bf16_to_float(scales[word / gw]);
      for (int l = 0; l < V::W; ++l) {
        const float q = float(int((bits >> (4 * l)) & 0xFu) - 8);
        const float v = ROUND ? round_bf16(q * s) : q * s;
        w[k].v[l] = 8 * word + l < n_in ? v : 0.0f;
      }
    }
  }
};

struct Bf16Dec {
  static constexpr int K = 4, COLS = 4 * V::W;
  static int64_t col(int64_t c, int k, int l) { return COLS * c + V::W * k + l; }

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
    V::F w[K];
  };

  template <bool TAIL>
  Chunk load(int64_t c) const {
    Chunk ch;
    decode(c, ch.w);
    return ch;
  }

  template <bool TAIL>
  V::F get(const Chunk& ch, int k, int64_t) const { return ch.w[k]; }

  void decode(int64_t c, V::F* w) const {
    for (int k = 0; k < K; ++k)
      for (int l = 0; l < V::W; ++l) {
        const int64_t i = col(c, k, l);
        w[k].v[l] = i < n_in ? bf16_to_float(row[i]) : 0.0f;
      }
  }
};

// e4m3fn -> float32, exactly: S.EEEE.MMM is (-1)^S 2^(E-7) 1.MMM, or 2^-6 0.MMM when E = 0;
// 0x7F and 0xFF are NaN (there is no infinity).
struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 15, m = b & 7;
      float f = e == 0 ? std::ldexp(float(m), -9) : std::ldexp(float(8 + m), e - 10);
      if (e == 15 && m == 7) f = std::nanf("");
      v[b] = (b & 0x80) ? -f : f;
    }
  }
};

template <bool ROUND>  // the dequantized weight rounded to bfloat16 (compute.dequant: bf16-rounded)
struct Fp8Dec {
  static constexpr int K = 4, COLS = 4 * V::W;
  static int64_t col(int64_t c, int k, int l) { return COLS * c + V::W * k + l; }

  const uint8_t* row;
  const float* s;
  const float* table;
  int64_t n_in, n_full;

  Fp8Dec() = default;
  explicit Fp8Dec(const kj::LinearJob& job)
      : row(static_cast<const uint8_t*>(job.w)), s(nullptr), n_in(job.n_in), n_full(job.n_in / COLS) {
    static const Fp8Table fp8;
    table = fp8.v;
  }

  Fp8Dec at(const kj::LinearJob& job, int64_t o) const {
    Fp8Dec d = *this;
    d.row += o * n_in;
    bool folded;
    d.s = kj::fp8_row_scales(job, o / job.block_rows, false, &folded);
    return d;
  }

  struct Chunk {
    V::F w[K];
  };

  template <bool TAIL>
  Chunk load(int64_t c) const {
    Chunk ch;
    decode(c, ch.w);
    return ch;
  }

  template <bool TAIL>
  V::F get(const Chunk& ch, int k, int64_t) const { return ch.w[k]; }

  void decode(int64_t c, V::F* w) const {
    for (int k = 0; k < K; ++k)
      for (int l = 0; l < V::W; ++l) {
        const int64_t i = col(c, k, l);
        const float v = i < n_in ? table[row[i]] * s[i] : 0.0f;
        w[k].v[l] = ROUND ? round_bf16(v) : v;
      }
  }
};

#include "driver.inc"

const kj::KernelTable kTable = {kj::kPortable, "portable", padded_cols, prepare, rows};

}  // namespace

const kj::KernelTable* kj::table_portable() { return &kTable; }
