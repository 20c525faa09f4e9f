// Threads over output rows. A job is n tasks (ranges of output rows); the calling thread always
// takes tasks itself, so a job finishes even if no other thread ever runs, and a task is computed
// whole by one thread, so results never depend on the thread count or on who ran what.
#pragma once

#include <cstdint>

namespace kj {

using TaskFn = void (*)(void* ctx, int64_t task);

enum PoolKind : int { kPoolNone = 0, kPoolOwn = 1, kPoolXla = 2 };

// Our own workers: started by the first job; they spin for spin_us after each job (back-to-back kernel
// calls find them awake), then sleep on a condition variable. One job at a time; a second caller
// meanwhile runs inline.
void own_pool_configure(int threads, int spin_us);
void own_pool_run(int64_t n_tasks, TaskFn fn, void* ctx);
int own_pool_threads();

}  // namespace kj
