// A runtime-neutral parallel-for: kernels spread their work through a ParallelFor that the glue
// fills in (ONNX Runtime's intra-op thread pool: qexport_ort.h; none: serial), and run tasks
// with ParallelRun, which turns an exception inside a task into a Status.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <thread>

#include "qexport_status.h"

namespace qexport {

// Calls task(data, i) once for every i in [0, total), possibly from several threads at once,
// and returns when all are done. Null run: serial.
struct ParallelFor {
  void (*run)(void* pool, void (*task)(void* data, size_t i), size_t total, void* data) = nullptr;
  void* pool = nullptr;
};

// Calls fn(i) for i < total through `par` (serially when it has no pool, or for one task);
// exceptions inside a task are caught and reported as the returned status (the first one's
// message; later tasks are skipped once one failed).
template <typename Fn>
Status ParallelRun(const ParallelFor& par, size_t total, Fn fn) {
  struct Ctx {
    Fn* fn;
    std::atomic<bool> failed{false};
    std::string message;
    std::atomic_flag message_lock = ATOMIC_FLAG_INIT;
  } ctx;
  ctx.fn = &fn;
  auto task = [](void* data, size_t i) {
    Ctx* c = static_cast<Ctx*>(data);
    if (c->failed.load(std::memory_order_relaxed)) return;
    std::string err;
    try {
      (*c->fn)(i);
      return;
    } catch (...) {
      err = ExceptionMessage();
    }
    if (!c->message_lock.test_and_set()) c->message = err;
    c->failed.store(true);
  };
  if (total == 0) return Status::Ok();
  if (total == 1 || !par.run) {
    for (size_t i = 0; i < total; ++i) task(&ctx, i);
  } else {
    par.run(par.pool, task, total, &ctx);
  }
  if (ctx.failed.load()) return Status::Error(ctx.message);
  return Status::Ok();
}

// CPUs that tasks can spread over (at least 1).
inline int64_t Cpus() {
  static const int64_t n = std::max<unsigned>(1, std::thread::hardware_concurrency());
  return n;
}

}  // namespace qexport
