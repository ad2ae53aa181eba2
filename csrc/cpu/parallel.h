// A minimal std::thread parallel_for for the CPU kernels. No OpenMP on purpose: PyTorch ships its own OpenMP
// runtime, and a second one in the same process oversubscribes the cores.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace fbkernels {
namespace cpu {

// Runs body(task) for every task in [0, num_tasks) on up to num_threads threads, the calling thread included
// (num_threads <= 1 or a single task: everything runs inline, no thread is created). Tasks are claimed from a shared
// counter, so a descheduled thread does not hold the others back; which thread runs a task is therefore arbitrary,
// and bodies must write only to per-task outputs (every kernel here does, which keeps results thread-count
// independent). The first exception thrown by a body stops further tasks and is rethrown here after all joins.
template <typename Body>
void parallel_for(int64_t num_tasks, int64_t num_threads, const Body& body) {
  if (num_tasks <= 0) return;
  const int64_t workers = std::max<int64_t>(1, std::min(num_threads, num_tasks));
  if (workers == 1) {
    for (int64_t task = 0; task < num_tasks; ++task) body(task);
    return;
  }
  std::atomic<int64_t> next_task{0};
  std::atomic<bool> failed{false};
  std::exception_ptr first_error;
  std::mutex error_mutex;
  auto work = [&]() {
    try {
      while (!failed.load(std::memory_order_relaxed)) {
        const int64_t task = next_task.fetch_add(1, std::memory_order_relaxed);
        if (task >= num_tasks) return;
        body(task);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!first_error) first_error = std::current_exception();
      failed.store(true);
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(workers - 1));
  try {
    for (int64_t i = 0; i < workers - 1; ++i) threads.emplace_back(work);
  } catch (const std::system_error&) {
    // Could not start more threads (resource limits): the threads already running and this one finish the job.
  }
  work();
  for (auto& thread : threads) thread.join();
  if (first_error) std::rethrow_exception(first_error);
}

// Threads worth using for `work` elements: at least `min_work_per_thread` each, so small calls stay inline.
inline int64_t threads_for_work(int64_t num_threads, int64_t work, int64_t min_work_per_thread = 1 << 15) {
  const int64_t useful = std::max<int64_t>(1, work / std::max<int64_t>(1, min_work_per_thread));
  return std::max<int64_t>(1, std::min(num_threads, useful));
}

}  // namespace cpu
}  // namespace fbkernels
