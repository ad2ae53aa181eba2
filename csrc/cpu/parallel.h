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
#include <cstring>
#include <exception>
#include <memory>
#include <new>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
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

// Gets a fresh output `data` (`bytes` long, just allocated by the caller) ready for writing, on a team of up to
// num_threads threads. By default glibc gives every block of 32 MiB or more its own new mmap, and the first write
// faults every page in: ~10k faults of 4 KiB for a 40 MB output, which took longer than the kernel itself (27 ms
// against 11 ms for the feedback_step forward at 8x18x256x256 on 2 cores). So the 2 MiB-aligned interior of such an
// output is advised to be backed by transparent huge pages (Linux, THP mode "always" or "madvise"; one fault per
// 2 MiB: 14 ms), and its huge pages are then faulted in by the whole team, one page per task, before the kernel's
// loop (the OS zero-fills a new page in the thread that faults it; the 8x18x256x256 backward went from 18-20 to
// 17-18 ms). Smaller outputs are left alone: after the first call glibc serves them from its heap, already faulted
// in, where the advice would only split the heap's mapping and the prefault would cost a parallel region (in three
// default benchmark runs each, the context_gate forward at the CBL-CNN maps, 4-8 MB outputs, ran 1.13-1.41x
// torch.compile without them against 1.03-1.35x with them). FBKERNELS_HUGE_PAGES=0 in the environment turns both
// off (for example where THP compaction stalls matter more than throughput).
inline void prepare_output(void* data, int64_t bytes, int64_t num_threads) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
#if defined(MADV_POPULATE_WRITE)
  constexpr int kPopulateWrite = MADV_POPULATE_WRITE;
#else
  constexpr int kPopulateWrite = 23;  // Linux's value, for C libraries whose headers predate it
#endif
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  constexpr int64_t kOwnMappingBytes = int64_t{32} << 20;  // glibc's largest mmap threshold (64-bit)
  static const bool enabled = [] {
    const char* setting = std::getenv("FBKERNELS_HUGE_PAGES");
    return setting == nullptr || std::strcmp(setting, "0") != 0;
  }();
  if (!enabled || data == nullptr || bytes < kOwnMappingBytes) return;
  // The whole pages of a given size inside the output: [first page boundary, last page boundary).
  const uintptr_t start = reinterpret_cast<uintptr_t>(data), stop = start + static_cast<uintptr_t>(bytes);
  const auto up = [start](uintptr_t page) { return (start + page - 1) & ~(page - 1); };
  const auto down = [stop](uintptr_t page) { return stop & ~(page - 1); };
  const uintptr_t begin = up(kHugePage), end = down(kHugePage);
  if (end <= begin || madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) != 0) return;
  // The 4 KiB pages before the first and after the last huge page.
  constexpr uintptr_t kPage = 4096;
  const uintptr_t head = up(kPage), tail = down(kPage);
  const int64_t huge_pages = static_cast<int64_t>((end - begin) / kHugePage);
  // Tasks: one per huge page (one byte written faults it in: the kernels overwrite the whole output afterwards, so
  // its value does not matter), then the head and the tail, each faulted in by one MADV_POPULATE_WRITE call, which
  // costs less than a fault per page (1.6 against 2.2 us per page on the benchmark VM); where the kernel lacks it
  // (Linux < 5.14), the kernel's first writes fault them in as before.
  parallel_for(huge_pages + 2, num_threads, [&](int64_t task) {
    if (task < huge_pages) {
      *reinterpret_cast<volatile char*>(begin + static_cast<uintptr_t>(task) * kHugePage) = 0;
      return;
    }
    const uintptr_t from = task == huge_pages ? head : end, to = task == huge_pages ? begin : tail;
    if (to > from) madvise(reinterpret_cast<void*>(from), to - from, kPopulateWrite);
  });
#else
  (void)data;
  (void)bytes;
  (void)num_threads;
#endif
}

}  // namespace cpu
}  // namespace fbkernels
