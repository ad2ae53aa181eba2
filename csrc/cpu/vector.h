// SIMD building blocks of the CPU kernels: GCC vector types of the native width, explicit fused multiply-adds,
// a fixed-order lane sum, a vector exp, and row writes that can bypass the cache.
//
// The modules are compiled with -ffp-contract=off, so the compiler never fuses a multiply and an add on its own:
// the same expression compiled at two call sites (the serial path and the parallel path of a loop) would otherwise
// round differently, and results would depend on the thread count. Fused multiply-adds are written out
// (multiply_add) where they are wanted.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FBKERNELS_X86 1
#endif

namespace fbkernels {
namespace cpu {

// A native SIMD vector: 32 bytes with AVX2 (the _C_avx2 build), else 16 (SSE2). A tile of positions is one
// 64-byte cache line, kVectorsPerTile vectors of kLanes elements.
#if defined(__AVX2__)
constexpr int64_t kVectorBytes = 32;
#else
constexpr int64_t kVectorBytes = 16;
#endif
constexpr int64_t kVectorsPerTile = 64 / kVectorBytes;
template <typename T>
constexpr int64_t kTileWidth = static_cast<int64_t>(64 / sizeof(T));
template <typename T>
constexpr int64_t kLanes = static_cast<int64_t>(kVectorBytes / sizeof(T));

template <typename T>
struct NativeVector {
  typedef T type __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using vec_t = typename NativeVector<T>::type;

template <typename T>
inline vec_t<T> load_vector(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline void store_vector(T* p, const vec_t<T>& v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename T>
inline vec_t<T> broadcast(T value) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_set1_ps(value);
  } else {
    return _mm256_set1_pd(value);
  }
#else
  return vec_t<T>{} + value;
#endif
}

// a * b + c, rounded once where the build has FMA (the _C_avx2 module), else twice.
template <typename T>
inline vec_t<T> multiply_add(vec_t<T> a, vec_t<T> b, vec_t<T> c) {
#if defined(__FMA__) && defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_fmadd_ps(a, b, c);
  } else {
    return _mm256_fmadd_pd(a, b, c);
  }
#else
  return a * b + c;
#endif
}

// The lanes of a tile (kVectorsPerTile vectors) summed by a fixed tree: vectorises without -ffast-math and gives
// the same bits on every run.
template <typename T>
inline T sum_lanes(const vec_t<T> (&tile)[kVectorsPerTile]) {
  constexpr int64_t W = kTileWidth<T>;
  T lanes[W];
  std::memcpy(lanes, tile, sizeof lanes);
  for (int64_t width = W / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// exp(z) for z <= 0 or NaN (a softmax input after the max is subtracted), on a vector of floats: Cody-Waite range
// reduction and Cephes' expf polynomial, within 2 ulp of expf. Below ln(FLT_MIN) it returns 0 where expf gives a
// subnormal (< 1.2e-38); -inf gives 0 and NaN stays NaN.
inline vec_t<float> exp_nonpositive(vec_t<float> z) {
  using V = vec_t<float>;
  typedef int32_t VI __attribute__((vector_size(kVectorBytes)));
  const V zero = {};
  const V lowest = zero - 87.33654475f;
  const V magic = zero + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  const auto below = z < lowest;
  const V x = below ? lowest : z;
  const V t = x * 1.44269504088896341f + magic;
  const V n = t - magic;  // round(x / ln 2)
  const V r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  V p = zero + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * r * r + r + 1.0f;
  const VI exponent = ((VI)t - (VI)magic + 127) << 23;  // 2^n as float bits (n >= -126 here)
  const V result = below ? zero : y * (V)exponent;
  return z != z ? z : result;
}

// Whether outputs of `bytes` in total are written with non-temporal stores: past the size of a last-level cache,
// a normal store first reads the line it overwrites (a third more traffic for a copy-like kernel), and the data
// would be evicted before anyone reads it again.
inline bool streaming_pays(int64_t bytes) { return bytes >= (int64_t{4} << 20); }

// dst[0:len] = src[0:len]; with `stream`, through non-temporal stores where the build supports them (src is a
// 64-byte aligned scratch row or any readable row; dst any row).
template <typename T>
inline void write_row(T* __restrict dst, const T* __restrict src, int64_t len, bool stream) {
  int64_t n = 0;
#if defined(FBKERNELS_X86)
  if (stream) {
    for (; n < len && (reinterpret_cast<uintptr_t>(dst + n) % 16) != 0; ++n) dst[n] = src[n];
    constexpr int64_t L = static_cast<int64_t>(16 / sizeof(T));
    for (; n + L <= len; n += L) {
      if constexpr (std::is_same_v<T, float>) {
        _mm_stream_ps(dst + n, _mm_loadu_ps(src + n));
      } else {
        _mm_stream_pd(dst + n, _mm_loadu_pd(src + n));
      }
    }
  }
#endif
  std::memcpy(dst + n, src + n, static_cast<size_t>(len - n) * sizeof(T));
}

// Orders a task's non-temporal stores before the stores of whoever reads them next (called at the end of a task).
inline void finish_streaming(bool stream) {
#if defined(FBKERNELS_X86)
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

}  // namespace cpu
}  // namespace fbkernels
