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

// A native SIMD vector: 64 bytes with AVX-512 (the _C_avx512 build), 32 with AVX2 (_C_avx2), else 16 (SSE2). A
// tile of positions is kVectorsPerTile vectors of kLanes elements: one 64-byte cache line, or two with AVX-512,
// so that a tile still holds two independent vectors per row (the channel mix's multiply-add chains).
#if defined(__AVX512F__)
constexpr int64_t kVectorBytes = 64;
#elif defined(__AVX2__)
constexpr int64_t kVectorBytes = 32;
#else
constexpr int64_t kVectorBytes = 16;
#endif
constexpr int64_t kTileBytes = kVectorBytes > 32 ? 2 * kVectorBytes : 64;
constexpr int64_t kVectorsPerTile = kTileBytes / kVectorBytes;
template <typename T>
constexpr int64_t kTileWidth = static_cast<int64_t>(kTileBytes / sizeof(T));
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

// Makes the compiler keep `value` in a register. GCC otherwise folds a loaded vector into the memory operand of
// every multiply-add that uses it, loading it once per use: the grad_decay outer product then issued 14 loads per 12
// multiply-adds instead of 8 and was load-bound.
template <typename V>
inline void keep_in_register(V& value) {
#if defined(FBKERNELS_X86) && defined(__GNUC__) && defined(__AVX512F__)
  asm("" : "+v"(value));  // any of the 32 vector registers
#elif defined(FBKERNELS_X86) && defined(__GNUC__)
  asm("" : "+x"(value));
#else
  (void)value;
#endif
}

// load_vector / store_vector where V is vec_t<T>, a plain element access where V is T: one function body serves the
// vector loop and its scalar tail.
template <typename T, typename V>
inline V load_as(const T* p) {
  if constexpr (std::is_same_v<V, T>) {
    return *p;
  } else {
    return load_vector<T>(p);
  }
}

template <typename T, typename V>
inline void store_as(T* p, const V& value) {
  if constexpr (std::is_same_v<V, T>) {
    *p = value;
  } else {
    store_vector<T>(p, value);
  }
}

template <typename T>
inline vec_t<T> broadcast(T value) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_set1_ps(value);
  } else {
    return _mm512_set1_pd(value);
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_set1_ps(value);
  } else {
    return _mm256_set1_pd(value);
  }
#else
  return vec_t<T>{} + value;
#endif
}

// a * b + c, rounded once where the build has FMA (the _C_avx512 and _C_avx2 modules), else twice.
template <typename T>
inline vec_t<T> multiply_add(vec_t<T> a, vec_t<T> b, vec_t<T> c) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_fmadd_ps(a, b, c);
  } else {
    return _mm512_fmadd_pd(a, b, c);
  }
#elif defined(__FMA__) && defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_fmadd_ps(a, b, c);
  } else {
    return _mm256_fmadd_pd(a, b, c);
  }
#else
  return a * b + c;
#endif
}

// The lanes of a vector summed by a fixed tree: vectorises without -ffast-math and gives the same bits on every
// run.
template <typename T>
inline T sum_lanes(const vec_t<T>& vector) {
  constexpr int64_t L = kLanes<T>;
  T lanes[L];
  std::memcpy(lanes, &vector, sizeof lanes);
  for (int64_t width = L / 2; width > 0; width /= 2)
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

// Whether a pass that reads and writes `footprint` bytes in all writes its outputs with non-temporal stores. Once a
// pass's data outgrow the last-level cache, a normal store first reads the line it overwrites (a third more traffic
// for a copy-like kernel), pushes the inputs out of the cache, and is itself evicted before anyone reads it back.
// A smaller pass keeps its output in cache for the next op, where non-temporal stores would send it to memory
// (context_gate at the CBL-CNN map 128x64x16x16: 16 MiB of traffic, 0.35-0.45 ms with normal stores against
// 0.48-0.54 ms with streaming ones on one core; the feedback_step forward at 8x18x128x128, 28 MiB, ran 8% faster
// streamed). 24 MiB is three quarters of the 32 MiB L3 that a core of a current server part shares; the L3 size
// the OS reports is often the whole socket's, so it is not queried.
inline bool streaming_pays(int64_t footprint) { return footprint >= (int64_t{24} << 20); }

// Stores one vector at dst, bypassing the cache (dst aligned to the vector size) where the build supports it.
template <typename T>
inline void stream_vector(T* dst, const vec_t<T>& value) {
#if defined(FBKERNELS_X86) && defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(dst, value);
  } else {
    _mm512_stream_pd(dst, value);
  }
#elif defined(FBKERNELS_X86) && defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(dst, value);
  } else {
    _mm256_stream_pd(dst, value);
  }
#elif defined(FBKERNELS_X86)
  if constexpr (std::is_same_v<T, float>) {
    _mm_stream_ps(dst, value);
  } else {
    _mm_stream_pd(dst, value);
  }
#else
  store_vector<T>(dst, value);
#endif
}

// dst[n] = op(src[n]...) for n < len, op taking and returning vectors and scalars alike (an elementwise
// expression: the same bits either way). With `stream`, the vectors are stored through stream_vector. Fusing the
// last elementwise step of a kernel into its store saves a pass over a scratch row.
template <typename T, typename Op, typename... Src>
inline void write_row_map(T* __restrict dst, int64_t len, bool stream, const Op& op, const Src* __restrict... src) {
  constexpr int64_t L = kLanes<T>;
  int64_t n = 0;
  if (stream) {
    for (; n < len && (reinterpret_cast<uintptr_t>(dst + n) % kVectorBytes) != 0; ++n) dst[n] = op(src[n]...);
    for (; n + L <= len; n += L) stream_vector<T>(dst + n, op(load_vector<T>(src + n)...));
  } else {
    for (; n + L <= len; n += L) store_vector<T>(dst + n, op(load_vector<T>(src + n)...));
  }
  for (; n < len; ++n) dst[n] = op(src[n]...);
}

// dst[0:len] = src[0:len]; with `stream`, through non-temporal stores.
template <typename T>
inline void write_row(T* __restrict dst, const T* __restrict src, int64_t len, bool stream) {
  if (!stream) {
    std::memcpy(dst, src, static_cast<size_t>(len) * sizeof(T));
    return;
  }
  write_row_map(dst, len, stream, [](auto x) { return x; }, src);
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
