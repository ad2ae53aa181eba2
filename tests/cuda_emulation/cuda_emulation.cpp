// Runtime of the CPU emulation of CUDA declared in cuda_emulation.h: launches (a block's threads as fibers),
// barriers, warp shuffles, errors and the emulated device.
#include "cuda_emulation.h"

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define FBK_ASAN 1
#else
#define FBK_ASAN 0
#endif

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace cuda_emulation {
namespace {

constexpr std::size_t kFiberStack = 128 * 1024;
// A small device: 8 resident blocks, so the backward's persistent grid is smaller than most test shapes' tile
// counts and its grid-stride loop and partial sums are exercised.
constexpr int kMultiprocessors = 4;
constexpr int kBlocksPerMultiprocessor = 2;

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kFinished };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  State state = State::kRunnable;
  int site = 0;
  void* fake_stack = nullptr;  // ASan's bookkeeping while the fiber is switched out
};

struct LaunchState {
  int threads = 0;
  std::vector<Fiber> fibers;
  std::vector<std::array<unsigned char, 8>> shuffle_slots;
  int current = 0;  // the running fiber
  int64_t block = 0;
  void (*body)(void*) = nullptr;
  void* body_context = nullptr;
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;
  std::size_t scheduler_stack_size = 0;
  bool failed = false;
  std::string error;
  std::unordered_map<void*, int64_t> poisoned_in_block;  // shared array -> block serial + 1

  void fail(const std::string& what) {
    if (!failed) error = what;
    failed = true;
  }
};

LaunchState* g_launch = nullptr;  // launches are synchronous and one at a time
std::mutex g_launch_mutex;
std::vector<std::unique_ptr<char[]>> g_stacks;  // fiber stacks, kept for the next launches

// The last launch error, kept as the CUDA runtime keeps it until cudaGetLastError reads it.
std::mutex g_error_mutex;
cudaError_t g_last_error = cudaSuccess;
std::string g_last_message;
std::vector<cudaStream_t> g_launch_streams;  // the stream of each launch since the tests last took them

void set_error(cudaError_t code, const std::string& message) {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  g_last_error = code;
  g_last_message = message;
}

std::string block_name() {
  return "block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
         std::to_string(blockIdx.z) + ")";
}

std::string site_name(State state, int site) {
  if (state == State::kFinished) return "the end of the kernel";
  return std::string(state == State::kAtWarpBarrier ? "the warp shuffle at line " : "the __syncthreads at line ") +
         std::to_string(site);
}

// Fiber -> scheduler. Returns when the scheduler resumes this fiber (never, after `final`).
void yield_to_scheduler(bool final = false) {
  LaunchState& launch = *g_launch;
  Fiber& fiber = launch.fibers[launch.current];
#if FBK_ASAN
  __sanitizer_start_switch_fiber(final ? nullptr : &fiber.fake_stack, launch.scheduler_stack,
                                 launch.scheduler_stack_size);
#endif
  swapcontext(&fiber.context, &launch.scheduler);
#if FBK_ASAN
  __sanitizer_finish_switch_fiber(fiber.fake_stack, &launch.scheduler_stack, &launch.scheduler_stack_size);
#endif
  (void)final;
}

// Scheduler -> fiber `index`, until it yields.
void resume(LaunchState& launch, int index) {
  Fiber& fiber = launch.fibers[index];
  launch.current = index;
  threadIdx = uint3{index % blockDim.x, (index / blockDim.x) % blockDim.y, index / (blockDim.x * blockDim.y)};
  void* scheduler_fake_stack = nullptr;
#if FBK_ASAN
  __sanitizer_start_switch_fiber(&scheduler_fake_stack, fiber.stack, kFiberStack);
#endif
  swapcontext(&launch.scheduler, &fiber.context);
#if FBK_ASAN
  __sanitizer_finish_switch_fiber(scheduler_fake_stack, nullptr, nullptr);
#endif
  (void)scheduler_fake_stack;
}

void fiber_main() {
  LaunchState& launch = *g_launch;
#if FBK_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &launch.scheduler_stack, &launch.scheduler_stack_size);
#endif
  try {
    launch.body(launch.body_context);
  } catch (const std::exception& err) {
    launch.fail(std::string("exception in ") + block_name() + ": " + err.what());
  } catch (...) {
    launch.fail("unknown exception in " + block_name());
  }
  launch.fibers[launch.current].state = State::kFinished;
  yield_to_scheduler(/*final=*/true);
}

// Waits at a barrier of the given kind: marks this fiber and hands over to the scheduler, which resumes it once
// everyone it waits for has arrived at the same site.
void wait_at(State kind, int site) {
  LaunchState& launch = *g_launch;
  Fiber& fiber = launch.fibers[launch.current];
  fiber.state = kind;
  fiber.site = site;
  yield_to_scheduler();
}

// Releases the threads of [first, last) if all wait at one barrier of `kind`; flags a divergence if they wait at
// different places. Returns true if it released them.
bool release_group(LaunchState& launch, int first, int last, State kind) {
  const Fiber& lead = launch.fibers[first];
  bool all_waiting = true, any_waiting = false;
  for (int t = first; t < last; ++t) {
    const Fiber& f = launch.fibers[t];
    if (f.state == State::kRunnable) return false;  // someone has not arrived yet
    all_waiting = all_waiting && f.state == kind;
    any_waiting = any_waiting || f.state == kind;
  }
  if (!any_waiting) return false;
  for (int t = first; t < last; ++t) {
    const Fiber& f = launch.fibers[t];
    if (f.state != lead.state || f.site != lead.site || !all_waiting) {
      if (kind == State::kAtWarpBarrier && f.state == State::kAtBlockBarrier) return false;  // warp waits below
      launch.fail("divergent threads in " + block_name() + ": thread " + std::to_string(first) + " is at " +
                  site_name(lead.state, lead.site) + ", thread " + std::to_string(t) + " at " +
                  site_name(f.state, f.site));
      return false;
    }
  }
  for (int t = first; t < last; ++t) launch.fibers[t].state = State::kRunnable;
  return true;
}

void run_block(LaunchState& launch) {
  for (int t = 0; t < launch.threads; ++t) {
    Fiber& fiber = launch.fibers[t];
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack;
    fiber.context.uc_stack.ss_size = kFiberStack;
    fiber.context.uc_link = nullptr;
    makecontext(&fiber.context, fiber_main, 0);
    fiber.state = State::kRunnable;
  }
  for (int64_t phase = 0; !launch.failed; ++phase) {
    // Run every runnable thread to its next barrier: ascending after even phases, descending after odd ones.
    for (int i = 0; i < launch.threads && !launch.failed; ++i) {
      const int t = phase % 2 == 0 ? i : launch.threads - 1 - i;
      if (launch.fibers[t].state == State::kRunnable) resume(launch, t);
    }
    if (launch.failed) return;
    bool released = false;
    for (int w = 0; w * 32 < launch.threads; ++w) {
      released |= release_group(launch, w * 32, std::min(launch.threads, w * 32 + 32), State::kAtWarpBarrier);
    }
    if (!released) released = release_group(launch, 0, launch.threads, State::kAtBlockBarrier);
    if (launch.failed) return;
    if (!released) {
      const bool all_finished = std::all_of(launch.fibers.begin(), launch.fibers.end(),
                                            [](const Fiber& f) { return f.state == State::kFinished; });
      if (!all_finished) {
        launch.fail("threads of " + block_name() + " wait at barriers that can never complete");
      }
      return;
    }
  }
}

}  // namespace

void fail(const char* what) {
  g_launch->fail(std::string(what) + " (" + block_name() + ", thread " + std::to_string(g_launch->current) + ")");
  g_launch->fibers[g_launch->current].state = State::kFinished;
  yield_to_scheduler(true);
  std::abort();  // unreachable: a finished fiber is never resumed
}

void sync_block(int site) { wait_at(State::kAtBlockBarrier, site); }

void sync_warp(int site) { wait_at(State::kAtWarpBarrier, site); }

unsigned char* warp_slot(int lane) { return g_launch->shuffle_slots[(g_launch->current / 32) * 32 + lane].data(); }

int lane_id() { return g_launch->current % 32; }

int warp_width() { return std::min(32, g_launch->threads - (g_launch->current / 32) * 32); }

void poison_shared(void* p, std::size_t bytes) {
  int64_t& mark = g_launch->poisoned_in_block[p];
  if (mark != g_launch->block + 1) {
    std::memset(p, 0xFF, bytes);
    mark = g_launch->block + 1;
  }
}

void run_grid(const Config& config, void (*body)(void*), void* context) {
  const int64_t threads = int64_t(config.block.x) * config.block.y * config.block.z;
  const int64_t blocks = int64_t(config.grid.x) * config.grid.y * config.grid.z;
  if (threads < 1 || threads > 1024 || config.block.z > 64 || blocks < 1 || config.grid.y > 65535 ||
      config.grid.z > 65535 || config.grid.x > 2147483647u) {
    set_error(cudaErrorInvalidConfiguration,
              "invalid configuration argument: grid (" + std::to_string(config.grid.x) + ", " +
                  std::to_string(config.grid.y) + ", " + std::to_string(config.grid.z) + "), block (" +
                  std::to_string(config.block.x) + ", " + std::to_string(config.block.y) + ", " +
                  std::to_string(config.block.z) + ")");
    return;
  }
  std::lock_guard<std::mutex> one_launch(g_launch_mutex);
  g_launch_streams.push_back(config.stream);
  LaunchState launch;
  launch.threads = static_cast<int>(threads);
  launch.fibers.resize(launch.threads);
  while (g_stacks.size() < launch.fibers.size()) g_stacks.emplace_back(new char[kFiberStack]);
  for (int t = 0; t < launch.threads; ++t) launch.fibers[t].stack = g_stacks[t].get();
  launch.shuffle_slots.resize(launch.threads);
  launch.body = body;
  launch.body_context = context;
  g_launch = &launch;
  gridDim = config.grid;
  blockDim = config.block;
  for (int64_t block = 0; block < blocks && !launch.failed; ++block) {
    launch.block = block;
    blockIdx = uint3{unsigned(block % config.grid.x), unsigned((block / config.grid.x) % config.grid.y),
                     unsigned(block / (int64_t(config.grid.x) * config.grid.y))};
    run_block(launch);
  }
  g_launch = nullptr;
  if (launch.failed) set_error(cudaErrorLaunchFailure, "unspecified launch failure (emulation: " + launch.error + ")");
}

}  // namespace cuda_emulation

cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lock(cuda_emulation::g_error_mutex);
  const cudaError_t err = cuda_emulation::g_last_error;
  cuda_emulation::g_last_error = cudaSuccess;
  return err;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected";
    default: {
      // The message of the last failure (kept, unlike the code, after cudaGetLastError).
      static thread_local std::string message;
      std::lock_guard<std::mutex> lock(cuda_emulation::g_error_mutex);
      message = cuda_emulation::g_last_message;
      return message.c_str();
    }
  }
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount || device != 0) return cudaErrorInvalidValue;
  *value = cuda_emulation::kMultiprocessors;
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void* kernel) {
  if (attributes == nullptr || kernel == nullptr) return cudaErrorInvalidValue;
  attributes->maxThreadsPerBlock = 1024;
  attributes->numRegs = 0;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* kernel, int block_size,
                                                          std::size_t) {
  if (kernel == nullptr || block_size < 1 || block_size > 1024) return cudaErrorInvalidValue;
  *blocks = cuda_emulation::kBlocksPerMultiprocessor;
  return cudaSuccess;
}

// Copies the streams of the launches since the last call (at most max of them) to out and forgets them all;
// returns how many launches there were.
extern "C" int64_t fbk_emulation_take_streams(uintptr_t* out, int64_t max) {
  std::lock_guard<std::mutex> lock(cuda_emulation::g_launch_mutex);
  auto& streams = cuda_emulation::g_launch_streams;
  const int64_t count = static_cast<int64_t>(streams.size());
  for (int64_t i = 0; i < std::min(count, max); ++i) out[i] = reinterpret_cast<uintptr_t>(streams[i]);
  streams.clear();
  return count;
}
