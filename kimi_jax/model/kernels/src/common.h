// Shared declarations of the kimi-jax CPU kernels: one row-range job per weight format, and the
// table of functions each instruction set provides (isa_*.cpp). Nothing here is ISA-specific.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kj {

// Bumped whenever any kernel's arithmetic (and so possibly its bits) changes; recorded in the ledger.
// 2: the engine gives them BF16 products of up to 32 rows (were at most 4): more bits are theirs.
constexpr int kKernelSetVersion = 2;
// Bumped whenever the C ABI between this library and kimi_jax/model/kernels/_library.py changes.
constexpr int kAbiVersion = 1;

enum Format : int { kInt4 = 0, kFp8 = 1, kBf16 = 2 };
enum Mode : int { kExact = 0, kBf16Rounded = 1 };
enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// One weight matrix [n_out, n_in] in its stored form, multiplied by prepared activations.
struct LinearJob {
  Format format;
  Mode mode;
  int64_t n_in;
  int64_t n_out;
  int64_t n_rows;     // T: activation rows
  const float* xp;    // activations in the ISA's chunk order, [T][n_pad], zero past n_in
  int64_t n_pad;      // floats per activation row in xp (whole chunks)
  const void* w;      // int4: uint32 words [n_out][ceil(n_in/8)]; fp8: bytes [n_out][n_in]; bf16: uint16 [n_out][n_in]
  const void* scale;  // int4: bf16 bits [n_out][n_groups]; fp8: float [ceil(n_out/b0)][ceil(n_in/b1)]
  int64_t group_size; // int4
  int64_t block_rows; // fp8 b0
  int64_t block_cols; // fp8 b1
  float* y;           // results, y[t * y_stride + o]
  int64_t y_stride;
  uint64_t call_id;   // distinct per FFI call: keys per-thread caches (XLA reuses buffer addresses)
};

struct KernelTable {
  Isa isa;
  const char* name;
  // Floats per activation row that `prepare` writes for a weight of n_in columns.
  int64_t (*padded_cols)(Format format, int64_t n_in);
  // x rows (float32, or bfloat16 bits when x_bf16) [T][x_stride] -> xp [T][n_pad], zero padded.
  void (*prepare)(Format format, const void* x, bool x_bf16, int64_t x_stride, int64_t n_rows, int64_t n_in,
                  float* xp, int64_t n_pad);
  // y[t][o] for o in [o_begin, o_end) and every activation row t.
  void (*rows)(const LinearJob& job, int64_t o_begin, int64_t o_end);
};

// A per-thread float buffer of at least n elements, 64-byte aligned, kept between calls (slots 0-9;
// ffi.cpp's callers use them for activations and intermediates). Defined in ffi.cpp, outside any
// ISA-specific code.
float* thread_scratch(int slot, size_t n);

// The scale of every column of FP8 block row `block_row` (n_pad floats, zero past n_in), cached per
// thread for the call, and valid while a tile's other rows (at most 3 more) ask for theirs: for block
// widths that are not whole chunks. With fold_2_8 each is multiplied by 2^8 (the float16 trick's
// exponent offset) when that is exact for every scale of the row; *folded says whether it was.
const float* fp8_row_scales(const LinearJob& job, int64_t block_row, bool fold_2_8, bool* folded);

const KernelTable* table_portable();
const KernelTable* table_avx2();    // nullptr where the compiler could not build it
const KernelTable* table_avx512();  // nullptr where the compiler could not build it

}  // namespace kj
