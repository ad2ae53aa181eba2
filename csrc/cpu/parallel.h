// Parallel loops of the CPU kernels, on the OpenMP runtime that PyTorch itself loads.
//
// The modules are built with -fopenmp and need libgomp.so.1. PyTorch's CPU wheels ship their OpenMP runtime with
// that same soname and are always imported first (fbkernels imports torch before its compiled modules), so the
// dynamic loader binds the modules to the runtime already in the process: one runtime, one pool of worker threads.
// The threads that run PyTorch's own parallel regions run these loops too, and no thread is created per call.
// Only GOMP_parallel and the omp_get_* queries are used (GOMP_4.0 and OMP_1.0 symbol versions), which every
// libgomp PyTorch has shipped provides.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <new>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace fbkernels {
namespace cpu {

// Runs body(task) for every task in [0, num_tasks) on a team of up to num_threads threads (the caller passes
// torch.get_num_threads()) and returns the team's size (1 when it ran inline). Tasks are claimed from a shared
// counter, so a thread descheduled by other load on the machine does not hold the others back; which thread runs
// a task is therefore arbitrary, and bodies write only per-task outputs, which keeps every result independent of
// the thread count. The first exception thrown by a body stops further tasks and is rethrown here.
template <typename Body>
int64_t parallel_for(int64_t num_tasks, int64_t num_threads, const Body& body) {
  if (num_tasks <= 0) return 1;
  const int64_t team = num_threads < num_tasks ? num_threads : num_tasks;
#if defined(_OPENMP)
  if (team > 1) {
    std::atomic<int64_t> next_task{0};
    std::atomic<bool> failed{false};
    std::exception_ptr first_error;
    int64_t team_size = 1;
#pragma omp parallel num_threads(static_cast<int>(team))
    {
      if (omp_get_thread_num() == 0) team_size = omp_get_num_threads();
      try {
        while (!failed.load(std::memory_order_relaxed)) {
          const int64_t task = next_task.fetch_add(1, std::memory_order_relaxed);
          if (task >= num_tasks) break;
          body(task);
        }
      } catch (...) {
        if (!failed.exchange(true)) first_error = std::current_exception();
      }
    }
    if (first_error) std::rethrow_exception(first_error);
    return team_size;
  }
#endif
  for (int64_t task = 0; task < num_tasks; ++task) body(task);
  return 1;
}

// Team size the OpenMP runtime would use for a parallel region started by the calling thread (1 without OpenMP).
// torch.set_num_threads(n) sets it to n when this module shares PyTorch's runtime.
inline int64_t runtime_max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// A per-thread scratch buffer of at least `count` elements, 64-byte aligned, reused across calls (grown when a
// call needs more, never zero-filled): kernels allocate nothing per call or per task.
template <typename T>
T* thread_scratch(int64_t count) {
  struct Buffer {
    std::unique_ptr<void, void (*)(void*)> data{nullptr, std::free};
    size_t bytes = 0;
  };
  thread_local Buffer buffer;
  const size_t bytes = (static_cast<size_t>(count) * sizeof(T) + 63) / 64 * 64;
  if (bytes > buffer.bytes) {
    void* fresh = std::aligned_alloc(64, bytes);
    if (fresh == nullptr) throw std::bad_alloc();
    buffer.data.reset(fresh);
    buffer.bytes = bytes;
  }
  return static_cast<T*>(buffer.data.get());
}

}  // namespace cpu
}  // namespace fbkernels
