// Our own worker threads (see pool.h). The job state is one 64-bit word, generation << 32 | next
// task, claimed by compare-and-swap: a worker that wakes late for an old generation fails its claim
// and never touches a newer job's fields (two job slots, by generation parity).
#include "pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KJ_PAUSE() _mm_pause()
#else
#define KJ_PAUSE() std::this_thread::yield()
#endif

namespace kj {
namespace {

struct Slot {
  std::atomic<int64_t> n{0};
  std::atomic<TaskFn> fn{nullptr};
  std::atomic<void*> ctx{nullptr};
  std::atomic<int64_t> done{0};
};

class Pool {
 public:
  ~Pool() { stop_workers(); }

  // Workers start on the first job, so a process that never uses this pool never has them.
  void configure(int threads, int spin_us) {
    std::lock_guard<std::mutex> job(run_mutex_);
    stop_workers();
    spin_us_ = spin_us < 0 ? 0 : spin_us;
    threads_ = threads < 1 ? 1 : threads;
  }

  int threads() const { return threads_; }

  void run(int64_t n_tasks, TaskFn fn, void* ctx) {
    std::unique_lock<std::mutex> job(run_mutex_, std::try_to_lock);
    if (job.owns_lock() && workers_.empty() && threads_ > 1) {
      stop_.store(false);
      for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { work(); });
    }
    if (!job.owns_lock() || workers_.empty() || n_tasks < 2) {  // busy, or nothing to share: inline
      for (int64_t i = 0; i < n_tasks; ++i) fn(ctx, i);
      return;
    }
    const uint64_t gen = (state_.load() >> 32) + 1;
    Slot& slot = slots_[gen & 1];
    slot.n.store(n_tasks, std::memory_order_relaxed);
    slot.fn.store(fn, std::memory_order_relaxed);
    slot.ctx.store(ctx, std::memory_order_relaxed);
    slot.done.store(0, std::memory_order_relaxed);
    state_.store(gen << 32);  // seq_cst: publishes the slot, ordered before the sleeper check
    if (sleepers_.load() > 0) {
      { std::lock_guard<std::mutex> lock(sleep_mutex_); }
      wake_.notify_all();
    }
    drain(gen);
    for (int spins = 0; slot.done.load(std::memory_order_acquire) < n_tasks; ++spins) {
      if (spins < 4096) KJ_PAUSE(); else std::this_thread::yield();
    }
  }

 private:
  // Run tasks of generation gen until none is left; false when gen is no longer current.
  bool drain(uint64_t gen) {
    Slot& slot = slots_[gen & 1];
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      if ((s >> 32) != gen) return false;
      const int64_t i = int64_t(s & 0xFFFFFFFFu);
      if (i >= slot.n.load(std::memory_order_relaxed)) return true;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
      slot.fn.load(std::memory_order_relaxed)(slot.ctx.load(std::memory_order_relaxed), i);
      slot.done.fetch_add(1, std::memory_order_release);
      s = state_.load(std::memory_order_acquire);
    }
  }

  void work() {
    uint64_t seen = state_.load() >> 32;
    while (!stop_.load()) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
      uint64_t gen = state_.load() >> 32;
      for (int i = 0; gen == seen && !stop_.load(std::memory_order_relaxed); ++i) {
        KJ_PAUSE();
        if ((i & 255) == 255 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleepers_.fetch_add(1);
          wake_.wait(lock, [&] { return (state_.load() >> 32) != seen || stop_.load(); });
          sleepers_.fetch_sub(1);
        }
        gen = state_.load() >> 32;
      }
      if (stop_.load()) return;
      seen = gen;
      drain(gen);
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      stop_.store(true);
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  std::mutex run_mutex_;
  std::atomic<uint64_t> state_{0};
  Slot slots_[2];
  std::vector<std::thread> workers_;
  std::atomic<bool> stop_{false};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  int threads_ = 1;
  int spin_us_ = 0;
};

// Never destroyed: workers may still be parked at process exit. A forked child gets a fresh pool
// without workers (the parent's threads do not exist there and its mutexes may be held).
std::atomic<Pool*> the_pool{nullptr};

void reset_in_child() { the_pool.store(new Pool()); }

Pool& pool() {
  Pool* p = the_pool.load();
  if (p) return *p;
  static std::once_flag once;
  std::call_once(once, [] {
    the_pool.store(new Pool());
    pthread_atfork(nullptr, nullptr, reset_in_child);
  });
  return *the_pool.load();
}

}  // namespace

void own_pool_configure(int threads, int spin_us) { pool().configure(threads, spin_us); }
void own_pool_run(int64_t n_tasks, TaskFn fn, void* ctx) { pool().run(n_tasks, fn, ctx); }
int own_pool_threads() { return pool().threads(); }

}  // namespace kj
