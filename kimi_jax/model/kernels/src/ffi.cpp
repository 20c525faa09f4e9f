// XLA FFI handlers (CPU custom calls) for the kimi-jax kernels, the instruction-set choice, the
// threading and the routed-experts layer. Every shape is checked here again, whatever the Python
// wrapper checked: a handler never reads outside the buffers XLA hands it.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "pool.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define KJ_PAUSE() _mm_pause()
#else
#define KJ_PAUSE() std::this_thread::yield()
#endif
#include <thread>

namespace ffi = xla::ffi;

namespace kj {

// ------------------------------------------------------------------------------- per-thread scratch

float* thread_scratch(int slot, size_t n) {
  thread_local std::vector<float> buffers[10];
  std::vector<float>& b = buffers[slot];
  if (b.size() < n + 16) b.resize(n + 16);
  // 64-byte aligned: a vector load that straddles two cache lines costs two
  const uintptr_t p = reinterpret_cast<uintptr_t>(b.data());
  return reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));
}

namespace {

struct Fp8Cache {  // which block row a scale buffer holds, for which call
  uint64_t call_id = ~uint64_t(0);
  int64_t block_row = -1;
  bool fold = false, folded = false;
  std::vector<float> values;
};

}  // namespace

// Four buffers, by block row mod 4: a tile of up to 4 consecutive output rows never needs two block
// rows that share a buffer, whatever the block height.
const float* fp8_row_scales(const LinearJob& job, int64_t block_row, bool fold_2_8, bool* folded) {
  thread_local Fp8Cache caches[4];
  Fp8Cache& c = caches[block_row & 3];
  if (c.call_id == job.call_id && c.block_row == block_row && c.fold == fold_2_8) {
    *folded = c.folded;
    return c.values.data();
  }
  const int64_t n_bc = (job.n_in + job.block_cols - 1) / job.block_cols;
  const float* src = static_cast<const float*>(job.scale) + block_row * n_bc;
  bool ok = fold_2_8;  // 2^8 s is exact unless a finite s reaches 2^120 (inf and NaN stay themselves)
  for (int64_t b = 0; ok && b < n_bc; ++b) {
    const float a = std::fabs(src[b]);
    if (a >= 0x1p120f && std::isfinite(a)) ok = false;
  }
  const float factor = ok ? 256.0f : 1.0f;
  if (c.values.size() < size_t(job.n_pad)) c.values.resize(size_t(job.n_pad));
  float* s = c.values.data();
  for (int64_t i = 0; i < job.n_pad; ++i) s[i] = i < job.n_in ? src[i / job.block_cols] * factor : 0.0f;
  c.call_id = job.call_id;
  c.block_row = block_row;
  c.fold = fold_2_8;
  c.folded = ok;
  *folded = ok;
  return s;
}

namespace {

// ----------------------------------------------------------------------------- instruction sets

struct CpuFeatures {
  bool avx2 = false, avx512 = false;
};

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!(osxsave && avx)) return f;
  unsigned xlo, xhi;
  __asm__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  const bool ymm_state = (xlo & 0x6) == 0x6, zmm_state = (xlo & 0xE6) == 0xE6;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512dq = b & (1u << 17);
  const bool avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  f.avx2 = ymm_state && avx2 && fma && f16c && table_avx2() != nullptr;
  f.avx512 = f.avx2 && zmm_state && avx512f && avx512dq && avx512bw && avx512vl && table_avx512() != nullptr;
#endif
  return f;
}

const CpuFeatures& cpu() {
  static const CpuFeatures f = detect();
  return f;
}

const KernelTable* table_for(int64_t isa) {
  switch (isa) {
    case kPortable: return table_portable();
    case kAvx2: return cpu().avx2 ? table_avx2() : nullptr;
    case kAvx512: return cpu().avx512 ? table_avx512() : nullptr;
    default: return nullptr;
  }
}

// ------------------------------------------------------------------------------------- threading

struct Settings {
  std::atomic<int> threads{1};
  std::atomic<int> pool{kPoolOwn};
  std::atomic<int64_t> min_parallel_bytes{256 << 10};
  std::atomic<int64_t> task_bytes{64 << 10};
};
Settings settings;
std::atomic<uint64_t> call_counter{0};

struct XlaShared {
  std::atomic<int64_t> next{0}, done{0};
  int64_t n = 0;
  TaskFn fn = nullptr;
  void* ctx = nullptr;
};

void drain(XlaShared& s) {
  for (;;) {
    const int64_t i = s.next.fetch_add(1);
    if (i >= s.n) return;
    s.fn(s.ctx, i);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

// Runs tasks 0..n-1: inline when the work is small or one thread is configured, else on our pool or
// on XLA's intra-op pool (the one XLA runs its own CPU kernels on).
void run_tasks(ffi::ThreadPool* xla, int64_t n_tasks, TaskFn fn, void* ctx, int64_t work_bytes) {
  const int threads = settings.threads.load(std::memory_order_relaxed);
  const int kind = settings.pool.load(std::memory_order_relaxed);
  if (n_tasks < 2 || threads < 2 || kind == kPoolNone || work_bytes < settings.min_parallel_bytes.load()) {
    for (int64_t i = 0; i < n_tasks; ++i) fn(ctx, i);
    return;
  }
  if (kind == kPoolOwn || xla == nullptr) {
    own_pool_run(n_tasks, fn, ctx);
    return;
  }
  auto shared = std::make_shared<XlaShared>();
  shared->n = n_tasks;
  shared->fn = fn;
  shared->ctx = ctx;
  const int64_t helpers = std::min<int64_t>(threads - 1, n_tasks - 1);
  for (int64_t h = 0; h < helpers; ++h) xla->Schedule([shared] { drain(*shared); });
  drain(*shared);
  for (int spins = 0; shared->done.load(std::memory_order_acquire) < n_tasks; ++spins) {
    if (spins < 4096) KJ_PAUSE(); else std::this_thread::yield();
  }
}

int64_t weight_bytes(Format f, int64_t n_out, int64_t n_in) {
  switch (f) {
    case kInt4: return n_out * ((n_in + 7) / 8) * 4;
    case kFp8: return n_out * n_in;
    default: return n_out * n_in * 2;
  }
}

// Output rows [o_begin, o_end) of a job, in tasks of about task_bytes of weights each.
struct RowTasks {
  const KernelTable* table;
  const LinearJob* job;
  int64_t rows_per_task;

  static int64_t per_task(const LinearJob& job) {
    const int64_t row = std::max<int64_t>(1, weight_bytes(job.format, 1, job.n_in));
    return std::max<int64_t>(1, settings.task_bytes.load() / row);
  }
  int64_t count() const { return (job->n_out + rows_per_task - 1) / rows_per_task; }
  static void run(void* self, int64_t task) {
    const RowTasks& r = *static_cast<const RowTasks*>(self);
    const int64_t o0 = task * r.rows_per_task;
    r.table->rows(*r.job, o0, std::min(r.job->n_out, o0 + r.rows_per_task));
  }
};

// ------------------------------------------------------------------------------------ validation

std::string shape_text(ffi::AnyBuffer::Dimensions d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + (d.size() == 1 ? ",)" : ")");
}

ffi::Error expect_shape(const char* what, ffi::AnyBuffer::Dimensions found, std::vector<int64_t> expected) {
  bool same = found.size() == expected.size();
  for (size_t i = 0; same && i < expected.size(); ++i) same = found[i] == expected[i];
  if (same) return ffi::Error::Success();
  std::string e = "(";
  for (size_t i = 0; i < expected.size(); ++i) e += (i ? ", " : "") + std::to_string(expected[i]);
  e += expected.size() == 1 ? ",)" : ")";
  return ffi::Error::InvalidArgument(std::string("kimi_jax kernels: ") + what + ": expected shape " + e +
                                     ", found " + shape_text(found));
}

ffi::Error expect_type(const char* what, ffi::DataType found, std::initializer_list<ffi::DataType> allowed) {
  for (ffi::DataType t : allowed)
    if (t == found) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("kimi_jax kernels: ") + what + ": unexpected element type " +
                                     std::to_string(int(found)));
}

#define KJ_CHECK(expr)                   \
  do {                                   \
    ffi::Error kj_error = (expr);        \
    if (kj_error.failure()) return kj_error; \
  } while (0)

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The weight of one matrix in its format: element type and shape checks; n_out/n_in from w.
struct Matrix {
  Format format;
  const void* w;
  const void* scale;
  int64_t n_out, n_in;
};

// w/scale with `lead` leading (stack) dims; checks and returns the trailing [n_out, n_in] matrix view.
ffi::Error check_matrix(Format fmt, const char* name, ffi::AnyBuffer w, ffi::AnyBuffer scale, size_t lead,
                        int64_t n_in, int64_t group, int64_t b0, int64_t b1, Matrix* m) {
  auto wd = w.dimensions();
  if (wd.size() != lead + 2)
    return ffi::Error::InvalidArgument(std::string("kimi_jax kernels: ") + name + ": expected " +
                                       std::to_string(lead + 2) + " dims, found shape " + shape_text(wd));
  std::vector<int64_t> stack(wd.begin(), wd.begin() + lead);
  const int64_t n_out = wd[lead];
  auto with = [&](std::vector<int64_t> tail) {
    std::vector<int64_t> s = stack;
    s.insert(s.end(), tail.begin(), tail.end());
    return s;
  };
  const std::string sname = std::string(name) + " scale";
  switch (fmt) {
    case kInt4:
      if (group < 8 || group % 8) return ffi::Error::InvalidArgument("kimi_jax kernels: group_size must be a positive multiple of 8");
      KJ_CHECK(expect_type(name, w.element_type(), {ffi::S32, ffi::U32}));
      KJ_CHECK(expect_shape(name, wd, with({n_out, cdiv(n_in, 8)})));
      KJ_CHECK(expect_type(sname.c_str(), scale.element_type(), {ffi::BF16}));
      KJ_CHECK(expect_shape(sname.c_str(), scale.dimensions(), with({n_out, cdiv(n_in, group)})));
      break;
    case kFp8:
      if (b0 < 1 || b1 < 1) return ffi::Error::InvalidArgument("kimi_jax kernels: block sizes must be positive");
      KJ_CHECK(expect_type(name, w.element_type(), {ffi::F8E4M3FN, ffi::U8}));
      KJ_CHECK(expect_shape(name, wd, with({n_out, n_in})));
      KJ_CHECK(expect_type(sname.c_str(), scale.element_type(), {ffi::F32}));
      KJ_CHECK(expect_shape(sname.c_str(), scale.dimensions(), with({cdiv(n_out, b0), cdiv(n_in, b1)})));
      break;
    case kBf16:
      KJ_CHECK(expect_type(name, w.element_type(), {ffi::BF16}));
      KJ_CHECK(expect_shape(name, wd, with({n_out, n_in})));
      break;
    default: return ffi::Error::InvalidArgument("kimi_jax kernels: unknown weight format");
  }
  *m = Matrix{fmt, w.untyped_data(), fmt == kBf16 ? nullptr : scale.untyped_data(), n_out, n_in};
  return ffi::Error::Success();
}

// Elements (of the weight's and the scale's own types) between consecutive matrices of a stack.
void matrix_strides(const Matrix& m, int64_t group, int64_t b0, int64_t b1, int64_t* w_bytes, int64_t* s_bytes) {
  switch (m.format) {
    case kInt4:
      *w_bytes = m.n_out * cdiv(m.n_in, 8) * 4;
      *s_bytes = m.n_out * cdiv(m.n_in, group) * 2;
      break;
    case kFp8:
      *w_bytes = m.n_out * m.n_in;
      *s_bytes = cdiv(m.n_out, b0) * cdiv(m.n_in, b1) * 4;
      break;
    default:
      *w_bytes = m.n_out * m.n_in * 2;
      *s_bytes = 0;
  }
}

LinearJob make_job(const Matrix& m, Mode mode, int64_t group, int64_t b0, int64_t b1, int64_t n_rows,
                   const float* xp, int64_t n_pad, float* y, int64_t y_stride) {
  LinearJob j;
  j.format = m.format;
  j.mode = mode;
  j.n_in = m.n_in;
  j.n_out = m.n_out;
  j.n_rows = n_rows;
  j.xp = xp;
  j.n_pad = n_pad;
  j.w = m.w;
  j.scale = m.scale;
  j.group_size = group;
  j.block_rows = b0;
  j.block_cols = b1;
  j.y = y;
  j.y_stride = y_stride;
  j.call_id = call_counter.fetch_add(1);
  return j;
}

ffi::Error check_common(int64_t isa, int64_t mode, const KernelTable** table) {
  *table = table_for(isa);
  if (*table == nullptr)
    return ffi::Error::InvalidArgument("kimi_jax kernels: instruction set " + std::to_string(isa) +
                                       " is not available on this CPU or in this build");
  if (mode != kExact && mode != kBf16Rounded) return ffi::Error::InvalidArgument("kimi_jax kernels: unknown dequant mode");
  return ffi::Error::Success();
}

ffi::Error check_x(ffi::AnyBuffer x, int64_t n_in, int64_t* n_rows) {
  KJ_CHECK(expect_type("x", x.element_type(), {ffi::F32, ffi::BF16}));
  auto d = x.dimensions();
  if (d.size() != 2 || d[1] != n_in)
    return ffi::Error::InvalidArgument("kimi_jax kernels: x: expected shape (rows, " + std::to_string(n_in) +
                                       "), found " + shape_text(d));
  *n_rows = d[0];
  return ffi::Error::Success();
}

// --------------------------------------------------------------------------------------- linear

// The product itself, after every check: prepare the activations once, then rows in tasks.
void run_linear(ffi::ThreadPool* xla, const KernelTable* table, const Matrix& m, Mode mode, int64_t group, int64_t b0,
                int64_t b1, const void* x, bool x_bf16, int64_t n_rows, float* y) {
  if (n_rows == 0 || m.n_out == 0) return;
  if (m.n_in == 0) {
    std::memset(y, 0, size_t(n_rows * m.n_out) * 4);
    return;
  }
  const int64_t n_pad = table->padded_cols(m.format, m.n_in);
  float* xp = thread_scratch(3, size_t(n_rows * n_pad));
  table->prepare(m.format, x, x_bf16, m.n_in, n_rows, m.n_in, xp, n_pad);
  const LinearJob job = make_job(m, mode, group, b0, b1, n_rows, xp, n_pad, y, m.n_out);
  RowTasks tasks{table, &job, RowTasks::per_task(job)};
  run_tasks(xla, tasks.count(), RowTasks::run, &tasks, weight_bytes(m.format, m.n_out, m.n_in));
}

ffi::Error linear(ffi::ThreadPool* xla, Format fmt, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer scale,
                  ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t n_in, int64_t group, int64_t b0, int64_t b1,
                  int64_t mode, int64_t isa) {
  const KernelTable* table;
  KJ_CHECK(check_common(isa, mode, &table));
  Matrix m;
  KJ_CHECK(check_matrix(fmt, "weight", w, scale, 0, n_in, group, b0, b1, &m));
  int64_t n_rows;
  KJ_CHECK(check_x(x, m.n_in, &n_rows));
  KJ_CHECK(expect_shape("result", y->dimensions(), {n_rows, m.n_out}));
  run_linear(xla, table, m, Mode(mode), group, b0, b1, x.untyped_data(), x.element_type() == ffi::BF16, n_rows,
             y->typed_data());
  return ffi::Error::Success();
}

ffi::Error int4_linear(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer packed, ffi::AnyBuffer scale,
                       ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t in_features, int64_t group_size, int64_t mode,
                       int64_t isa) {
  return linear(&pool, kInt4, x, packed, scale, y, in_features, group_size, 1, 1, mode, isa);
}

ffi::Error fp8_linear(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer scale_inv,
                      ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t block_rows, int64_t block_cols, int64_t mode,
                      int64_t isa) {
  auto d = w.dimensions();
  const int64_t n_in = d.size() == 2 ? d[1] : -1;
  return linear(&pool, kFp8, x, w, scale_inv, y, n_in, 8, block_rows, block_cols, mode, isa);
}

ffi::Error bf16_linear(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::Buffer<ffi::F32>> y,
                       int64_t isa) {
  auto d = w.dimensions();
  const int64_t n_in = d.size() == 2 ? d[1] : -1;
  return linear(&pool, kBf16, x, w, w, y, n_in, 8, 1, 1, kExact, isa);
}

// -------------------------------------------------------------------------------- routed experts

// The layer itself, after every check. gate/up are [n][I][H] and down [n][H][I] in their format
// (with scales), slots/combine [T][k], ids [n_slots] or null (slot j is stack entry j).
struct Experts {
  Format format;
  Mode mode;
  int64_t group, b0, b1;
  int64_t n, I, H;
  const void *gate_w, *gate_s, *up_w, *up_s, *down_w, *down_s;
};

// One picked slot: the rows that picked it, their combine weights, its products.
struct Pick {
  std::vector<int64_t> rows;
  std::vector<float> c;
  LinearJob gate, up, down;
  float* h;          // [rows][I]: gate's result, then silu(gate) * up
  const float* u;    // [rows][I]
  const float* y;    // [rows][H]: down's result
  int64_t first_task;  // of the gate/up phase
};

// Phase 1, every picked expert at once: tasks are (expert, range of intermediate rows); each computes
// gate and up for its rows and then h = silu(gate) * up there.
struct GateUpPhase {
  const KernelTable* table;
  std::vector<Pick>* picks;
  int64_t rows_per_task, I;

  static void run(void* self, int64_t task) {
    const GateUpPhase& g = *static_cast<const GateUpPhase*>(self);
    std::vector<Pick>& picks = *g.picks;
    size_t p = 0;
    while (p + 1 < picks.size() && picks[p + 1].first_task <= task) ++p;
    const Pick& pick = picks[p];
    const int64_t i0 = (task - pick.first_task) * g.rows_per_task, i1 = std::min(g.I, i0 + g.rows_per_task);
    g.table->rows(pick.gate, i0, i1);
    g.table->rows(pick.up, i0, i1);
    for (size_t t = 0; t < pick.rows.size(); ++t)
      for (int64_t i = i0; i < i1; ++i) {
        const float a = pick.h[int64_t(t) * g.I + i];
        const float silu = a * (1.0f / (1.0f + std::exp(-a)));  // jax.nn.silu: x * sigmoid(x)
        pick.h[int64_t(t) * g.I + i] = silu * pick.u[int64_t(t) * g.I + i];
      }
  }
};

// Phase 2: tasks are ranges of hidden rows; each runs every picked expert's down product there, in
// slot order, and adds it into the result: out[t] = (out[t] + c_j y_j[t]), j ascending, as the XLA path.
struct DownPhase {
  const KernelTable* table;
  const std::vector<Pick>* picks;
  float* out;  // [T][H]
  int64_t rows_per_task, H;

  static void run(void* self, int64_t task) {
    const DownPhase& d = *static_cast<const DownPhase*>(self);
    const int64_t o0 = task * d.rows_per_task, o1 = std::min(d.H, o0 + d.rows_per_task);
    for (const Pick& pick : *d.picks) {
      d.table->rows(pick.down, o0, o1);
      for (size_t t = 0; t < pick.rows.size(); ++t) {
        float* acc = d.out + pick.rows[t] * d.H;
        const float* y = pick.y + int64_t(t) * d.H;
        for (int64_t o = o0; o < o1; ++o) {
          const float term = y[o] * pick.c[t];  // two roundings, as acc + y * c in the XLA path
          acc[o] = acc[o] + term;
        }
      }
    }
  }
};

void run_routed(ffi::ThreadPool* xla, const KernelTable* table, const Experts& ex, const float* x, int64_t T,
                const int32_t* slot, const float* weight, int64_t k, const int32_t* ids, int64_t n_slots,
                float* result) {
  const Format fmt = ex.format;
  const int64_t I = ex.I, H = ex.H;
  if (T > 0 && H > 0) std::memset(result, 0, size_t(T * H) * 4);
  if (T == 0 || H == 0 || I == 0) return;
  int64_t g_wstride, g_sstride, d_wstride, d_sstride;
  matrix_strides(Matrix{fmt, nullptr, nullptr, I, H}, ex.group, ex.b0, ex.b1, &g_wstride, &g_sstride);
  matrix_strides(Matrix{fmt, nullptr, nullptr, H, I}, ex.group, ex.b0, ex.b1, &d_wstride, &d_sstride);
  const int64_t pad_h = table->padded_cols(fmt, H), pad_i = table->padded_cols(fmt, I);
  const auto at = [](const void* base, int64_t bytes) {
    return base ? static_cast<const void*>(static_cast<const char*>(base) + bytes) : nullptr;
  };

  // Which rows picked which slot (a row that picks a slot twice adds its weights, k ascending).
  std::vector<Pick> picks;
  int64_t total = 0;
  for (int64_t j = 0; j < n_slots; ++j) {
    Pick p;
    for (int64_t t = 0; t < T; ++t) {
      bool hit = false;
      float w = 0.0f;
      for (int64_t e = 0; e < k; ++e)
        if (slot[t * k + e] == j) {
          hit = true;
          w += weight[t * k + e];
        }
      if (hit) {
        p.rows.push_back(t);
        p.c.push_back(w);
      }
    }
    if (p.rows.empty()) continue;  // padding and unpicked slots are never read
    const int64_t e = ids ? ids[j] : j;
    p.gate.w = at(ex.gate_w, e * g_wstride);  // the rest of the jobs once the buffers are known
    p.gate.scale = at(ex.gate_s, e * g_sstride);
    p.up.w = at(ex.up_w, e * g_wstride);
    p.up.scale = at(ex.up_s, e * g_sstride);
    p.down.w = at(ex.down_w, e * d_wstride);
    p.down.scale = at(ex.down_s, e * d_sstride);
    total += int64_t(p.rows.size());
    picks.push_back(std::move(p));
  }
  if (picks.empty()) return;

  // Caller-thread scratch (the row kernels' tasks only read it).
  float* xp = thread_scratch(3, size_t(total * pad_h));
  float* h = thread_scratch(5, size_t(total * I));
  float* u = thread_scratch(6, size_t(total * I));
  float* hp = thread_scratch(7, size_t(total * pad_i));
  float* y = thread_scratch(8, size_t(total * H));
  const int64_t gu_rows = std::max<int64_t>(1, settings.task_bytes.load() / (2 * weight_bytes(fmt, 1, H)));
  int64_t offset = 0, tasks = 0;
  for (Pick& p : picks) {
    const int64_t R = int64_t(p.rows.size());
    for (int64_t r = 0; r < R; ++r)
      table->prepare(fmt, x + p.rows[size_t(r)] * H, false, H, 1, H, xp + (offset + r) * pad_h, pad_h);
    const Matrix ge{fmt, p.gate.w, p.gate.scale, I, H}, ue{fmt, p.up.w, p.up.scale, I, H};
    p.gate = make_job(ge, ex.mode, ex.group, ex.b0, ex.b1, R, xp + offset * pad_h, pad_h, h + offset * I, I);
    p.up = make_job(ue, ex.mode, ex.group, ex.b0, ex.b1, R, xp + offset * pad_h, pad_h, u + offset * I, I);
    p.h = h + offset * I;
    p.u = u + offset * I;
    p.y = y + offset * H;
    p.first_task = tasks;
    tasks += cdiv(I, gu_rows);
    offset += R;
  }
  GateUpPhase gu{table, &picks, gu_rows, I};
  run_tasks(xla, tasks, GateUpPhase::run, &gu, int64_t(picks.size()) * 2 * weight_bytes(fmt, I, H));

  offset = 0;
  for (Pick& p : picks) {
    const int64_t R = int64_t(p.rows.size());
    table->prepare(fmt, p.h, false, I, R, I, hp + offset * pad_i, pad_i);
    const Matrix de{fmt, p.down.w, p.down.scale, H, I};
    p.down = make_job(de, ex.mode, ex.group, ex.b0, ex.b1, R, hp + offset * pad_i, pad_i, y + offset * H, H);
    offset += R;
  }
  const int64_t dn_rows = std::max<int64_t>(
      1, settings.task_bytes.load() / (int64_t(picks.size()) * weight_bytes(fmt, 1, I)));
  DownPhase dn{table, &picks, result, dn_rows, H};
  run_tasks(xla, cdiv(H, dn_rows), DownPhase::run, &dn, int64_t(picks.size()) * weight_bytes(fmt, H, I));
}

ffi::Error routed_experts(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer gate_w, ffi::AnyBuffer gate_s,
                          ffi::AnyBuffer up_w, ffi::AnyBuffer up_s, ffi::AnyBuffer down_w, ffi::AnyBuffer down_s,
                          ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::F32> combine, ffi::Buffer<ffi::S32> stack_ids,
                          ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t format, int64_t group, int64_t b0,
                          int64_t b1, int64_t mode, int64_t isa, int64_t use_stack_ids) {
  const KernelTable* table;
  KJ_CHECK(check_common(isa, mode, &table));
  if (format != kInt4 && format != kFp8 && format != kBf16)
    return ffi::Error::InvalidArgument("kimi_jax kernels: unknown weight format");
  const Format fmt = Format(format);
  KJ_CHECK(expect_type("x", x.element_type(), {ffi::F32}));
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("kimi_jax kernels: x: expected 2 dims, found " + shape_text(xd));
  const int64_t T = xd[0], H = xd[1];
  auto gd = gate_w.dimensions();
  if (gd.size() != 3)
    return ffi::Error::InvalidArgument("kimi_jax kernels: gate_proj: expected a stack [n, inter, ...], found " +
                                       shape_text(gd));
  const int64_t n = gd[0], I = gd[1];
  Matrix g, u, d;
  KJ_CHECK(check_matrix(fmt, "gate_proj", gate_w, gate_s, 1, H, group, b0, b1, &g));
  KJ_CHECK(check_matrix(fmt, "up_proj", up_w, up_s, 1, H, group, b0, b1, &u));
  KJ_CHECK(check_matrix(fmt, "down_proj", down_w, down_s, 1, I, group, b0, b1, &d));
  KJ_CHECK(expect_shape("up_proj", up_w.dimensions(), {n, I, fmt == kInt4 ? cdiv(H, 8) : H}));
  KJ_CHECK(expect_shape("down_proj", down_w.dimensions(), {n, H, fmt == kInt4 ? cdiv(I, 8) : I}));
  auto sd = slots.dimensions();
  if (sd.size() != 2 || sd[0] != T)
    return ffi::Error::InvalidArgument("kimi_jax kernels: slots: expected shape (" + std::to_string(T) +
                                       ", k), found " + shape_text(sd));
  const int64_t k = sd[1];
  KJ_CHECK(expect_shape("combine weights", combine.dimensions(), {T, k}));
  KJ_CHECK(expect_shape("result", out->dimensions(), {T, H}));
  const int64_t n_slots = use_stack_ids ? int64_t(stack_ids.element_count()) : n;
  const int32_t* slot = slots.typed_data();
  const int32_t* ids = use_stack_ids ? stack_ids.typed_data() : nullptr;
  for (int64_t j = 0; ids && j < n_slots; ++j) {
    if (ids[j] >= 0 && ids[j] < n) continue;
    for (int64_t e = 0; e < T * k; ++e)
      if (slot[e] == j)
        return ffi::Error::InvalidArgument("kimi_jax kernels: stack_ids[" + std::to_string(j) + "] = " +
                                           std::to_string(ids[j]) + " is outside the stack of " + std::to_string(n) +
                                           " experts");
  }
  const Experts ex{fmt, Mode(mode), group, b0, b1, n, I, H, g.w, g.scale, u.w, u.scale, d.w, d.scale};
  run_routed(&pool, table, ex, static_cast<const float*>(x.untyped_data()), T, slot, combine.typed_data(), k, ids,
             n_slots, out->typed_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace kj

// ------------------------------------------------------------------------------------- exports

#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(KimiJaxInt4Linear, kj::int4_linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("in_features")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KimiJaxFp8Linear, kj::fp8_linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_rows")
                                  .Attr<int64_t>("block_cols")
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KimiJaxBf16Linear, kj::bf16_linear,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KimiJaxRoutedExperts, kj::routed_experts,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // gate weight
                                  .Arg<ffi::AnyBuffer>()  // gate scale
                                  .Arg<ffi::AnyBuffer>()  // up weight
                                  .Arg<ffi::AnyBuffer>()  // up scale
                                  .Arg<ffi::AnyBuffer>()  // down weight
                                  .Arg<ffi::AnyBuffer>()  // down scale
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("format")
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("block_rows")
                                  .Attr<int64_t>("block_cols")
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("use_stack_ids"));

extern "C" {

int kimi_jax_abi_version() { return kj::kAbiVersion; }
int kimi_jax_kernel_set_version() { return kj::kKernelSetVersion; }

// Bit i set: instruction set i (kj::Isa) can run here.
int kimi_jax_supported_isas() {
  return (1 << kj::kPortable) | (kj::cpu().avx2 ? 1 << kj::kAvx2 : 0) | (kj::cpu().avx512 ? 1 << kj::kAvx512 : 0);
}

// threads >= 1; pool: kj::PoolKind; spin_us: how long our idle workers spin before sleeping;
// min_parallel_bytes: weights below this run on the calling thread alone.
void kimi_jax_configure(int threads, int pool, int spin_us, int64_t min_parallel_bytes, int64_t task_bytes) {
  kj::settings.threads.store(threads < 1 ? 1 : threads);
  kj::settings.pool.store(pool);
  kj::settings.min_parallel_bytes.store(min_parallel_bytes);
  kj::settings.task_bytes.store(task_bytes < 1 ? 1 : task_bytes);
  kj::own_pool_configure(threads, spin_us);  // started only if used (pool own, or the raw entries)
}

// For benchmarks and instruction counts (benchmarks/cpu_kernels.py --callgrind): the same products without
// XLA, on raw pointers, which are NOT checked: shapes as the handlers define them, T rows of x.
int kimi_jax_linear_raw(int format, int mode, int isa, const void* x, int x_bf16, int64_t n_rows, int64_t n_in,
                        const void* w, const void* scale, int64_t n_out, int64_t group, int64_t b0, int64_t b1,
                        float* y) {
  const kj::KernelTable* table = kj::table_for(isa);
  if (table == nullptr) return 1;
  const kj::Matrix m{kj::Format(format), w, scale, n_out, n_in};
  kj::run_linear(nullptr, table, m, kj::Mode(mode), group, b0, b1, x, x_bf16 != 0, n_rows, y);
  return 0;
}

int kimi_jax_routed_experts_raw(int format, int mode, int isa, const float* x, int64_t n_rows, int64_t hidden,
                                int64_t inter, int64_t n_experts, const void* gate_w, const void* gate_s,
                                const void* up_w, const void* up_s, const void* down_w, const void* down_s,
                                int64_t group, int64_t b0, int64_t b1, const int32_t* slots, const float* combine,
                                int64_t k, float* out) {
  const kj::KernelTable* table = kj::table_for(isa);
  if (table == nullptr) return 1;
  const kj::Experts ex{kj::Format(format), kj::Mode(mode), group, b0, b1, n_experts, inter, hidden,
                       gate_w, gate_s, up_w, up_s, down_w, down_s};
  kj::run_routed(nullptr, table, ex, x, n_rows, slots, combine, k, nullptr, n_experts, out);
  return 0;
}

// Memory bandwidth, measured with the kernels' own threads (benchmarks/cpu_kernels.py): kind 0 reads
// n_bytes of a (returns a checksum so the reads cannot be dropped), 1 copies a to b, 2 computes the
// STREAM triad b = a + 3 c over floats. Tasks of 1 MiB on our pool (configure it first).
uint64_t kimi_jax_stream(int kind, const void* a, void* b, const void* c, int64_t n_bytes) {
  struct Stream {
    int kind;
    const char* a;
    char* b;
    const char* c;
    int64_t n;
    std::atomic<uint64_t> sum{0};
    static void run(void* self, int64_t task) {
      Stream& s = *static_cast<Stream*>(self);
      const int64_t chunk = 1 << 20, begin = task * chunk, end = std::min(s.n, begin + chunk);
      if (s.kind == 0) {
        uint64_t x = 0;
        const uint64_t* p = reinterpret_cast<const uint64_t*>(s.a + begin);
        for (int64_t i = 0; i < (end - begin) / 8; ++i) x ^= p[i];
        s.sum.fetch_xor(x, std::memory_order_relaxed);
      } else if (s.kind == 1) {
        std::memcpy(s.b + begin, s.a + begin, size_t(end - begin));
      } else {
        const float* x = reinterpret_cast<const float*>(s.a + begin);
        const float* z = reinterpret_cast<const float*>(s.c + begin);
        float* y = reinterpret_cast<float*>(s.b + begin);
        for (int64_t i = 0; i < (end - begin) / 4; ++i) y[i] = x[i] + 3.0f * z[i];
      }
    }
  } stream;
  stream.kind = kind;
  stream.a = static_cast<const char*>(a);
  stream.b = static_cast<char*>(b);
  stream.c = static_cast<const char*>(c);
  stream.n = n_bytes;
  const int64_t tasks = (n_bytes + (1 << 20) - 1) >> 20;
  kj::own_pool_run(tasks, Stream::run, &stream);
  return stream.sum.load();
}

}  // extern "C"

#pragma GCC visibility pop
