// Device and host helpers shared by the fbkernels CUDA kernels: accumulation types, dtype conversion, vector
// (packed) memory access, dtype dispatch, the conversion of the parameter structs' integer handles, and
// launch-error checks. CUDA runtime only: no torch, no Python.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "cuda/kernels.h"

namespace fbkernels {
namespace cuda {
namespace detail {

// fp16 / bf16 / fp32 accumulate in fp32, fp64 in fp64.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t_of = typename AccType<scalar_t>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(acc_t_of<scalar_t> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Accurate (not __expf) exponential: softmax and sigmoid must match the eager reference to fp32 rounding.
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
// fmax ignores a NaN operand; callers make NaN propagate through the sums instead.
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_infinity() {
  return -static_cast<acc_t>(INFINITY);
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_acc(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_acc(-x));
}

// VEC consecutive elements read or written by one instruction (16 bytes at most, naturally aligned).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC < 16 ? sizeof(T) * VEC : 16) Pack {
  T v[VEC];
};

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_pack(const scalar_t* __restrict__ p, acc_t (&out)[VEC]) {
  const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
#pragma unroll
  for (int q = 0; q < VEC; ++q) out[q] = to_acc(pk.v[q]);
}

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_pack(scalar_t* __restrict__ p, const acc_t (&in)[VEC]) {
  Pack<scalar_t, VEC> pk;
#pragma unroll
  for (int q = 0; q < VEC; ++q) pk.v[q] = from_acc<scalar_t>(in[q]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = pk;
}

// Same-type packed copies for shared-memory tiles of the accumulation type.
template <int VEC, typename T>
__device__ __forceinline__ void load_same(const T* p, T (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int q = 0; q < VEC; ++q) out[q] = pk.v[q];
}

template <int VEC, typename T>
__device__ __forceinline__ void store_same(T* p, const T (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int q = 0; q < VEC; ++q) pk.v[q] = in[q];
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// ------------------------------------------------------------------ host helpers

template <typename T>
struct TypeTag {
  using type = T;
};

template <int V>
struct IntTag {
  static constexpr int value = V;
};

// Calls fn(TypeTag<scalar_t>{}) for the dtype code; throws std::invalid_argument for an unknown code.
template <typename Fn>
void dispatch_dtype(int64_t dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case kFloat32:
      fn(TypeTag<float>{});
      break;
    case kFloat64:
      fn(TypeTag<double>{});
      break;
    case kFloat16:
      fn(TypeTag<__half>{});
      break;
    case kBFloat16:
      fn(TypeTag<__nv_bfloat16>{});
      break;
    default:
      throw std::invalid_argument(std::string("fbkernels.") + op + ": dtype code must be 0 (float32), 1 (float64), " +
                                  "2 (float16) or 3 (bfloat16), got " + std::to_string(dtype));
  }
}

// Throws std::runtime_error if the last launch (or an earlier asynchronous failure) left an error.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fbkernels: CUDA kernel ") + kernel + " failed: " + cudaGetErrorString(err));
  }
}

// A data pointer or stream of a parameter struct (an integer from Python) as the pointer type the kernels take.
template <typename T>
inline T* device_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}
inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the non-sticky error so it does not resurface at the next launch check
    throw std::runtime_error(std::string("fbkernels: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

inline bool is_aligned(const void* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void require(bool ok, const char* op, const std::string& message) {
  if (!ok) throw std::invalid_argument(std::string("fbkernels.") + op + ": " + message);
}

// Grids stride over work items: cap the block count far below gridDim.x's limit.
constexpr int64_t kMaxGridBlocks = int64_t(1) << 30;

}  // namespace detail
}  // namespace cuda
}  // namespace fbkernels
