// A CPU emulation of the parts of CUDA that csrc/cuda uses, so the CUDA kernels can run, unchanged, on a machine
// without a GPU (tests/test_cuda_emulation.py). It is not a simulator of the hardware: it checks what the kernels
// compute and where they read and write, not how fast they are.
//
// A launch runs the grid's blocks one after another. The threads of a block are fibers (ucontext) on the calling
// thread: each runs until it reaches a barrier, and once every thread of the block (or every lane of the warp, for
// a shuffle) waits there, they all go on. Between two barriers the threads run one after another, in ascending
// order after even barriers and descending after odd ones, the two extremes of what a GPU may do, so a missing
// __syncthreads shows as a wrong result. Shared memory is a static array (one block at a time uses it) filled
// with 0xFF bytes (a NaN in every float type) at the start of each block, so reading it before writing it shows.
// The emulation also checks what compute-sanitizer's synccheck would: every thread of a block must wait at the
// same __syncthreads, every lane of a warp at the same shuffle and with a full mask; a thread that finishes while
// others wait, or an exception in a kernel, fails the launch, and cudaGetLastError then returns the error (so the
// host code's launch checks throw).
//
// Built with g++ from tests/_cuda_emulation.py, which rewrites `kernel<<<cfg>>>(args)` as
// `kernel | ::cuda_emulation::Config(cfg) | ::cuda_emulation::args(args)` and adds the shared-memory poisoning
// after each __shared__ declaration. This header is included through the stand-in cuda_runtime.h, cuda_fp16.h
// and cuda_bf16.h next to it.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------ keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __syncthreads() ::cuda_emulation::sync_block(__LINE__)

// ------------------------------------------------------------------ built-in variables
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

extern uint3 threadIdx;  // of the running fiber
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

// Device math the kernels call unqualified (the C library provides expf, fmaf, fmaxf, ...).
inline int min(int a, int b) { return a < b ? a : b; }

// ------------------------------------------------------------------ half and bfloat16 (storage types)
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half x) {
  _Float16 v;
  std::memcpy(&v, &x.bits, 2);
  return static_cast<float>(v);
}
inline __half __float2half_rn(float x) {
  const _Float16 v = static_cast<_Float16>(x);  // IEEE round-to-nearest-even
  __half out;
  std::memcpy(&out.bits, &v, 2);
  return out;
}
inline float __bfloat162float(__nv_bfloat16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float out;
  std::memcpy(&out, &u, 4);
  return out;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  __nv_bfloat16 out;
  if (std::isnan(x)) {
    out.bits = uint16_t((u >> 16) | 0x40);  // quiet NaN, sign kept
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    out.bits = uint16_t(u >> 16);
  }
  return out;
}

// ------------------------------------------------------------------ runtime API
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
struct cudaFuncAttributes {
  int maxThreadsPerBlock;
  int numRegs;
};
// The emulated device has an image of every kernel.
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void* kernel);
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* kernel, int block_size,
                                                          std::size_t dynamic_smem);

namespace cuda_emulation {

// Barrier of all threads of the current block; `site` (the source line) must be the same for all of them.
void sync_block(int site);
// Barrier of the current warp's lanes, with the same check.
void sync_warp(int site);
// Slot of this thread in its warp's shuffle buffer, and the slot of lane `lane` of the same warp.
unsigned char* warp_slot(int lane);
int lane_id();
int warp_width();  // lanes in this thread's warp (32, fewer in a block's last partial warp)
// Marks `bytes` of shared memory at `p` as unwritten (0xFF bytes) once per block: the first thread to reach
// the declaration does it, before any thread can write there.
void poison_shared(void* p, std::size_t bytes);
// Records a kernel error and ends the calling thread; the launch then fails.
[[noreturn]] void fail(const char* what);

struct Config {
  dim3 grid, block;
  cudaStream_t stream;
  Config(dim3 grid_, dim3 block_, std::size_t = 0, cudaStream_t stream_ = nullptr)
      : grid(grid_), block(block_), stream(stream_) {}
};

// Runs body(context) for every thread of every block of the configuration (see the file comment).
void run_grid(const Config& config, void (*body)(void*), void* context);

template <typename... Args>
struct Launch {
  Config config;
  void (*kernel)(Args...);
};

template <typename... Args>
Launch<Args...> operator|(void (*kernel)(Args...), const Config& config) {
  return Launch<Args...>{config, kernel};
}

template <typename... Values>
std::tuple<Values&&...> args(Values&&... values) {
  return std::forward_as_tuple(std::forward<Values>(values)...);
}

template <typename... Args, typename... Values>
void operator|(const Launch<Args...>& launch, std::tuple<Values...>&& values) {
  struct Context {
    void (*kernel)(Args...);
    std::tuple<Values...>* values;
  } context{launch.kernel, &values};
  run_grid(
      launch.config,
      [](void* raw) {
        auto* c = static_cast<Context*>(raw);
        std::apply([&](auto&&... v) { c->kernel(v...); }, *c->values);
      },
      &context);
}

}  // namespace cuda_emulation

// Warp shuffle: lane l gets `value` of lane l ^ lane_mask (within segments of `width` lanes).
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of up to 8 bytes");
  const int lanes = cuda_emulation::warp_width();
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != full) cuda_emulation::fail("__shfl_xor_sync: the mask must name every lane of the warp");
  const int lane = cuda_emulation::lane_id();
  int source = lane ^ lane_mask;
  if (source / width != lane / width || source >= lanes) source = lane;  // outside the segment: own value
  std::memcpy(cuda_emulation::warp_slot(lane), &value, sizeof(T));
  cuda_emulation::sync_warp(__LINE__);
  T out;
  std::memcpy(&out, cuda_emulation::warp_slot(source), sizeof(T));
  cuda_emulation::sync_warp(__LINE__ + 1);  // nobody overwrites a slot before every lane has read it
  return out;
}
