// Fused CPU kernels of the feedback step (DESIGN.md section 1.1), plain templated C++ (no torch, no Python).
//
// Layout: h, f, h_next, grad_h, grad_h_in, grad_f: [B, d, N] contiguous; v, grad_v: [B, k, N] (softmax of the last
// k channels); decay, grad_decay: [d, d] row-major.
//   forward:  h_next[b,:,n] = h[b,:,n] + M @ f[b,:,n];  v[b,:,n] = softmax(h_next[b, d-k:, n])
//   backward: g = grad_h (0 if absent); g[d-k:] += v * (grad_v - sum_c v * grad_v) (skipped if grad_v absent);
//             grad_h_in = g;  grad_f = M^T g;  grad_decay = sum_{b,n} g outer f
//
// Work is split into chunks of flat positions p = b * N + n (a function of B and N only, never of the thread
// count). A chunk walks its positions in blocks of at most `block` positions inside one b; each block copies what it
// reuses into small padded local buffers, so every tensor is read and written once per pass and the inner loops run
// over contiguous positions (auto-vectorised; the channel mixes use GCC vector types, several output rows at a
// time). In the backward each chunk writes its own [d, d] partial of grad_decay, and the partials are summed in
// chunk order: bitwise identical results for any num_threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/parallel.h"

namespace fbkernels {
namespace cpu {

// Positions per grad_decay partial; capped so that the workspace stays small for huge inputs.
constexpr int64_t kFeedbackPositionsPerChunk = 4096;
constexpr int64_t kFeedbackMaxChunks = 256;

// Number of chunks, i.e. of [d, d] partials the backward writes into its workspace (0 when there is no position).
inline int64_t feedback_step_num_partials(int64_t B, int64_t N) {
  if (B <= 0 || N <= 0) return 0;
  const int64_t positions = B * N;
  const int64_t chunks = (positions + kFeedbackPositionsPerChunk - 1) / kFeedbackPositionsPerChunk;
  return std::min(kFeedbackMaxChunks, chunks);
}

namespace detail {

// Positions handled together in registers: one 64-byte cache line of accumulators.
template <typename acc_t>
constexpr int64_t kTileWidth = static_cast<int64_t>(64 / sizeof(acc_t));

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Positions per block, a multiple of the tile width: d rows of one local buffer take up to 256 KiB, and each row
// of h, f and the outputs is read or written in runs of up to 4096 positions. The kernels wait on memory, and
// long runs let the hardware prefetchers get ahead: at B=8, d=18, 128x128 (one thread, AVX2) 4096-position
// blocks were 10-15% faster than 1024-position (64 KiB) ones.
template <typename acc_t>
int64_t feedback_block_length(int64_t d, int64_t N) {
  constexpr int64_t W = kTileWidth<acc_t>;
  const int64_t budget = (int64_t{256} * 1024 / (d * static_cast<int64_t>(sizeof(acc_t)))) / W * W;
  return std::min(std::clamp<int64_t>(budget, W, 4096), round_up(N, W));
}

// Flat positions [begin, end) of chunk `chunk` out of `num_chunks` (sizes differ by at most one).
struct PositionRange {
  int64_t begin, end;
};

inline PositionRange chunk_positions(int64_t chunk, int64_t num_chunks, int64_t positions) {
  const int64_t base = positions / num_chunks, extra = positions % num_chunks;
  const int64_t begin = chunk * base + std::min(chunk, extra);
  return {begin, begin + base + (chunk < extra ? 1 : 0)};
}

// Calls block_fn(b, n0, len) for consecutive blocks of at most `block` positions, each inside one batch entry b.
template <typename BlockFn>
void for_each_block(PositionRange range, int64_t N, int64_t block, const BlockFn& block_fn) {
  for (int64_t p = range.begin; p < range.end;) {
    const int64_t b = p / N, n0 = p % N;
    const int64_t len = std::min({block, N - n0, range.end - p});
    block_fn(b, n0, len);
    p += len;
  }
}

// dst[0:len] = src[0:len] and dst[len:padded] = 0 (zero padding lets the tile loops run on whole tiles).
template <typename acc_t, typename scalar_t>
inline void load_padded(acc_t* __restrict dst, const scalar_t* __restrict src, int64_t len, int64_t padded) {
  for (int64_t n = 0; n < len; ++n) dst[n] = static_cast<acc_t>(src[n]);
  for (int64_t n = len; n < padded; ++n) dst[n] = acc_t(0);
}

template <typename scalar_t, typename acc_t>
inline void store_row(scalar_t* __restrict dst, const acc_t* __restrict src, int64_t len) {
  for (int64_t n = 0; n < len; ++n) dst[n] = static_cast<scalar_t>(src[n]);
}

// A native SIMD vector as a GCC vector type: 32 bytes with AVX2 (the _C_avx2 build), else 16 (SSE2). A tile of
// W positions (64 bytes) is kVectorsPerTile of them. (A 64-byte GCC vector would be split by the compiler too,
// but through memory.)
#if defined(__AVX2__)
constexpr int64_t kVectorBytes = 32;
#else
constexpr int64_t kVectorBytes = 16;
#endif
constexpr int64_t kVectorsPerTile = 64 / kVectorBytes;

template <typename acc_t>
struct NativeVector {
  typedef acc_t type __attribute__((vector_size(kVectorBytes)));
};
template <typename acc_t>
using vec_t = typename NativeVector<acc_t>::type;

template <typename acc_t>
inline vec_t<acc_t> load_vector(const acc_t* p) {
  vec_t<acc_t> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename acc_t>
inline void store_vector(acc_t* p, const vec_t<acc_t>& v) {
  std::memcpy(p, &v, sizeof v);
}

// Every output tile of the channel mix and of grad_decay is a chain of dependent multiply-adds; computed one at a
// time, the FMA latency and not the loads would set the pace. These many tiles are computed together, as
// independent chains in 8 to 12 of the 16 vector registers: 6 (AVX2) or 3 (SSE2) rows of the mix, 2 x 2 or
// 1 x 2 entries of grad_decay.
#if defined(__AVX2__)
constexpr int64_t kMixRows = 6;
constexpr int64_t kOuterRows = 2;
#else
constexpr int64_t kMixRows = 3;
constexpr int64_t kOuterRows = 1;
#endif
constexpr int64_t kOuterCols = 2;
// The local buffers have their row count rounded up to this (with zero rows), so the blocked loops need no
// remainder code: a multiple of kMixRows, kOuterRows and kOuterCols in both builds.
constexpr int64_t kRowPad = 6;

// out[i * stride + n] = sum_r matrix[i * d + r] * rows[r * stride + n] for i < out_rows, r < d and n < padded:
// the channel mix of a cached block. out_rows is a multiple of kRowPad and matrix has that many rows (zero past
// d); padded is a multiple of the tile width. For each tile of positions, kMixRows output rows at a time.
template <typename acc_t>
inline void mix_block(acc_t* __restrict out, const acc_t* __restrict matrix, const acc_t* __restrict rows, int64_t d,
                      int64_t out_rows, int64_t stride, int64_t padded) {
  using V = vec_t<acc_t>;
  constexpr int64_t W = kTileWidth<acc_t>, L = W / kVectorsPerTile;
  for (int64_t t0 = 0; t0 < padded; t0 += W) {
    for (int64_t i0 = 0; i0 < out_rows; i0 += kMixRows) {
      const acc_t* __restrict m = matrix + i0 * d;
      V acc[kMixRows][kVectorsPerTile] = {};
      for (int64_t r = 0; r < d; ++r) {
        V x[kVectorsPerTile];
#pragma GCC unroll 4
        for (int64_t u = 0; u < kVectorsPerTile; ++u) x[u] = load_vector(rows + r * stride + t0 + u * L);
#pragma GCC unroll 8
        for (int64_t q = 0; q < kMixRows; ++q) {
          const acc_t c = m[q * d + r];
#pragma GCC unroll 4
          for (int64_t u = 0; u < kVectorsPerTile; ++u) acc[q][u] += c * x[u];
        }
      }
#pragma GCC unroll 8
      for (int64_t q = 0; q < kMixRows; ++q) {
#pragma GCC unroll 4
        for (int64_t u = 0; u < kVectorsPerTile; ++u) store_vector(out + (i0 + q) * stride + t0 + u * L, acc[q][u]);
      }
    }
  }
}

// The W lanes of a tile (kVectorsPerTile vectors) summed by a fixed tree: vectorises without -ffast-math and
// gives the same bits on every run.
template <typename acc_t>
inline acc_t sum_lanes(const vec_t<acc_t> (&tile)[kVectorsPerTile]) {
  constexpr int64_t W = kTileWidth<acc_t>;
  acc_t lanes[W];
  std::memcpy(lanes, tile, sizeof lanes);
  for (int64_t width = W / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// dM[i * rows + j] += sum_n g[i * stride + n] * f[j * stride + n] for i, j < rows and n < padded (rows a multiple
// of kRowPad, padded of the tile width; g and f are zero past their real rows and positions). Each (i, j) sums
// lane-wise tile by tile, then over its lanes by sum_lanes.
template <typename acc_t>
inline void accumulate_outer(acc_t* __restrict dM, const acc_t* __restrict g, const acc_t* __restrict f,
                             int64_t rows, int64_t stride, int64_t padded) {
  using V = vec_t<acc_t>;
  constexpr int64_t W = kTileWidth<acc_t>, L = W / kVectorsPerTile;
  for (int64_t i0 = 0; i0 < rows; i0 += kOuterRows) {
    for (int64_t j0 = 0; j0 < rows; j0 += kOuterCols) {
      V acc[kOuterRows][kOuterCols][kVectorsPerTile] = {};
      for (int64_t t0 = 0; t0 < padded; t0 += W) {
#pragma GCC unroll 4
        for (int64_t u = 0; u < kVectorsPerTile; ++u) {
          V f_vec[kOuterCols];
#pragma GCC unroll 4
          for (int64_t b = 0; b < kOuterCols; ++b) f_vec[b] = load_vector(f + (j0 + b) * stride + t0 + u * L);
#pragma GCC unroll 4
          for (int64_t a = 0; a < kOuterRows; ++a) {
            const V g_vec = load_vector(g + (i0 + a) * stride + t0 + u * L);
#pragma GCC unroll 4
            for (int64_t b = 0; b < kOuterCols; ++b) acc[a][b][u] += g_vec * f_vec[b];
          }
        }
      }
      for (int64_t a = 0; a < kOuterRows; ++a)
        for (int64_t b = 0; b < kOuterCols; ++b) dM[(i0 + a) * rows + j0 + b] += sum_lanes<acc_t>(acc[a][b]);
    }
  }
}

// The [d, d] matrix src (transposed if asked) in the accumulation type, as [rows, d] with zero rows past d.
template <typename acc_t, typename scalar_t>
std::vector<acc_t> padded_matrix(const scalar_t* src, int64_t d, int64_t rows, bool transpose) {
  std::vector<acc_t> out(static_cast<size_t>(rows * d), acc_t(0));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j)
      out[static_cast<size_t>(i * d + j)] = static_cast<acc_t>(transpose ? src[j * d + i] : src[i * d + j]);
  return out;
}

template <typename acc_t>
struct NativeIntVector;
template <>
struct NativeIntVector<float> {
  typedef int32_t type __attribute__((vector_size(kVectorBytes)));
};

// exp(z) for z <= 0 or NaN (a softmax input after the max is subtracted), on a vector of floats: Cody-Waite range
// reduction and Cephes' expf polynomial, within 2 ulp of expf. Below ln(FLT_MIN) it returns 0 where expf gives a
// subnormal (< 1.2e-38); -inf gives 0 and NaN stays NaN.
inline vec_t<float> exp_nonpositive(vec_t<float> z) {
  using V = vec_t<float>;
  using VI = NativeIntVector<float>::type;
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

// x[n] = exp(x[n] - max[n]) and sum[n] += x[n] for n < len: the softmax's exponentials. float runs
// exp_nonpositive on whole vectors and expf on the last few positions; double uses exp throughout.
template <typename acc_t>
inline void exp_minus_max(acc_t* __restrict x, const acc_t* __restrict max_buf, acc_t* __restrict sum_buf,
                          int64_t len) {
  int64_t n = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    constexpr int64_t L = kVectorBytes / static_cast<int64_t>(sizeof(float));
    for (; n + L <= len; n += L) {
      const vec_t<float> e = exp_nonpositive(load_vector(x + n) - load_vector(max_buf + n));
      store_vector(x + n, e);
      store_vector(sum_buf + n, load_vector(sum_buf + n) + e);
    }
  }
  for (; n < len; ++n) {
    const acc_t e = std::exp(x[n] - max_buf[n]);
    x[n] = e;
    sum_buf[n] += e;
  }
}

// v[c * v_stride + n] = softmax over c < k of x[c * x_stride + n], for n < len. Subtracts the per-position max for
// stability; a NaN/Inf only reaches the positions whose logits hold it. Overwrites x with exp(x - max).
template <typename scalar_t, typename acc_t>
void softmax_columns(acc_t* x, int64_t x_stride, int64_t k, int64_t len, acc_t* __restrict max_buf,
                     acc_t* __restrict sum_buf, scalar_t* v, int64_t v_stride) {
  for (int64_t n = 0; n < len; ++n) max_buf[n] = x[n];
  for (int64_t c = 1; c < k; ++c) {
    const acc_t* __restrict xc = x + c * x_stride;
    for (int64_t n = 0; n < len; ++n) max_buf[n] = xc[n] > max_buf[n] ? xc[n] : max_buf[n];
  }
  for (int64_t n = 0; n < len; ++n) sum_buf[n] = acc_t(0);
  for (int64_t c = 0; c < k; ++c) exp_minus_max(x + c * x_stride, max_buf, sum_buf, len);
  for (int64_t n = 0; n < len; ++n) sum_buf[n] = acc_t(1) / sum_buf[n];
  for (int64_t c = 0; c < k; ++c) {
    const acc_t* __restrict xc = x + c * x_stride;
    scalar_t* __restrict vc = v + c * v_stride;
    for (int64_t n = 0; n < len; ++n) vc[n] = static_cast<scalar_t>(xc[n] * sum_buf[n]);
  }
}

}  // namespace detail

// h_next = h + M @ f per position and v = softmax of h_next's last k channels (shapes in the file comment).
template <typename scalar_t, typename acc_t>
void feedback_step_forward(const scalar_t* h, const scalar_t* f, const scalar_t* decay, scalar_t* h_next,
                           scalar_t* v, int64_t B, int64_t d, int64_t N, int64_t k, int64_t num_threads) {
  check_feedback_step_sizes("feedback_step_forward", B, d, N, k);
  const int64_t num_chunks = feedback_step_num_partials(B, N);
  if (num_chunks == 0) return;
  constexpr int64_t W = detail::kTileWidth<acc_t>;
  const int64_t rows = detail::round_up(d, detail::kRowPad);
  const std::vector<acc_t> M = detail::padded_matrix<acc_t>(decay, d, rows, /*transpose=*/false);
  const int64_t block = detail::feedback_block_length<acc_t>(d, N);
  const int64_t stride = block + W;  // one spare cache line per row: rows do not share cache sets
  const int64_t positions = B * N;

  parallel_for(num_chunks, num_threads, [&](int64_t chunk) {
    // f_buf: the block's f rows; mix_buf: M @ f (rows padded), then h_next (its last k rows are the softmax
    // input); then max and sum rows.
    std::vector<acc_t> work(static_cast<size_t>((d + rows + 2) * stride));
    acc_t* f_buf = work.data();
    acc_t* mix_buf = f_buf + d * stride;
    acc_t* max_buf = mix_buf + rows * stride;
    acc_t* sum_buf = max_buf + stride;
    const auto range = detail::chunk_positions(chunk, num_chunks, positions);
    detail::for_each_block(range, N, block, [&](int64_t b, int64_t n0, int64_t len) {
      const int64_t padded = detail::round_up(len, W);
      const int64_t offset = b * d * N + n0;
      for (int64_t c = 0; c < d; ++c) detail::load_padded(f_buf + c * stride, f + offset + c * N, len, padded);
      // The mix works tile by tile on the cached block; h and h_next are then streamed one row at a time. Touching
      // all d rows of h per tile instead would keep 2d strided memory streams open, more than the hardware
      // prefetchers follow.
      detail::mix_block(mix_buf, M.data(), f_buf, d, rows, stride, padded);
      for (int64_t i = 0; i < d; ++i) {
        const scalar_t* __restrict h_row = h + offset + i * N;
        scalar_t* __restrict out_row = h_next + offset + i * N;
        acc_t* __restrict mix_row = mix_buf + i * stride;
        if (i < d - k) {  // one pass: read, add, write h_next
          for (int64_t n = 0; n < len; ++n) out_row[n] = static_cast<scalar_t>(mix_row[n] + static_cast<acc_t>(h_row[n]));
        } else {  // the softmax rows also keep h_next in the buffer, as the softmax input
          for (int64_t n = 0; n < len; ++n) mix_row[n] += static_cast<acc_t>(h_row[n]);
          detail::store_row(out_row, mix_row, len);
        }
      }
      detail::softmax_columns(mix_buf + (d - k) * stride, stride, k, len, max_buf, sum_buf, v + b * k * N + n0, N);
    });
  });
}

// Backward of feedback_step_forward. grad_h / grad_v may be null (absent, i.e. zero). `partials` is a workspace of
// feedback_step_num_partials(B, N) * d * d elements; grad_decay is always written (zeros when there is no position).
template <typename scalar_t, typename acc_t>
void feedback_step_backward(const scalar_t* grad_h, const scalar_t* grad_v, const scalar_t* f, const scalar_t* v,
                            const scalar_t* decay, scalar_t* grad_h_in, scalar_t* grad_f, scalar_t* grad_decay,
                            scalar_t* partials, int64_t B, int64_t d, int64_t N, int64_t k, int64_t num_threads) {
  check_feedback_step_sizes("feedback_step_backward", B, d, N, k);
  const int64_t num_chunks = feedback_step_num_partials(B, N);
  const int64_t dd = d * d;
  if (num_chunks == 0) {
    for (int64_t ij = 0; ij < dd; ++ij) grad_decay[ij] = scalar_t(0);
    return;
  }
  constexpr int64_t W = detail::kTileWidth<acc_t>;
  const int64_t rows = detail::round_up(d, detail::kRowPad);
  // Transposed decay: grad_f = M^T g reads row j of M^T contiguously.
  const std::vector<acc_t> MT = detail::padded_matrix<acc_t>(decay, d, rows, /*transpose=*/true);
  const int64_t block = detail::feedback_block_length<acc_t>(d, N);
  const int64_t stride = block + W;
  const int64_t positions = B * N;

  parallel_for(num_chunks, num_threads, [&](int64_t chunk) {
    // g_buf, f_buf: the block's g and f rows (zero-padded to whole tiles, and to `rows` rows); mix_buf: M^T g;
    // dot_buf: sum_c v*grad_v; dM: this chunk's partial of grad_decay, [rows, rows].
    std::vector<acc_t> work(static_cast<size_t>((3 * rows + 1) * stride + rows * rows), acc_t(0));
    acc_t* g_buf = work.data();
    acc_t* f_buf = g_buf + rows * stride;
    acc_t* mix_buf = f_buf + rows * stride;
    acc_t* dot_buf = mix_buf + rows * stride;
    acc_t* dM = dot_buf + stride;
    const auto range = detail::chunk_positions(chunk, num_chunks, positions);
    detail::for_each_block(range, N, block, [&](int64_t b, int64_t n0, int64_t len) {
      const int64_t padded = detail::round_up(len, W);
      const int64_t offset = b * d * N + n0;
      for (int64_t i = 0; i < d; ++i) {
        acc_t* g_row = g_buf + i * stride;
        if (grad_h != nullptr) {
          detail::load_padded(g_row, grad_h + offset + i * N, len, padded);
        } else {
          for (int64_t n = 0; n < padded; ++n) g_row[n] = acc_t(0);
        }
      }
      if (grad_v != nullptr) {  // softmax backward into the last k rows of g
        const scalar_t* v_b = v + b * k * N + n0;
        const scalar_t* grad_v_b = grad_v + b * k * N + n0;
        for (int64_t n = 0; n < len; ++n) dot_buf[n] = acc_t(0);
        for (int64_t c = 0; c < k; ++c) {
          const scalar_t* __restrict v_row = v_b + c * N;
          const scalar_t* __restrict gv_row = grad_v_b + c * N;
          for (int64_t n = 0; n < len; ++n)
            dot_buf[n] += static_cast<acc_t>(v_row[n]) * static_cast<acc_t>(gv_row[n]);
        }
        for (int64_t c = 0; c < k; ++c) {
          const scalar_t* __restrict v_row = v_b + c * N;
          const scalar_t* __restrict gv_row = grad_v_b + c * N;
          acc_t* __restrict g_row = g_buf + (d - k + c) * stride;
          for (int64_t n = 0; n < len; ++n)
            g_row[n] += static_cast<acc_t>(v_row[n]) * (static_cast<acc_t>(gv_row[n]) - dot_buf[n]);
        }
      }
      for (int64_t i = 0; i < d; ++i) detail::store_row(grad_h_in + offset + i * N, g_buf + i * stride, len);
      for (int64_t c = 0; c < d; ++c) detail::load_padded(f_buf + c * stride, f + offset + c * N, len, padded);

      // grad_f = M^T g into mix_buf, then stored one row at a time (see the forward for why).
      detail::mix_block(mix_buf, MT.data(), g_buf, d, rows, stride, padded);
      for (int64_t j = 0; j < d; ++j) detail::store_row(grad_f + offset + j * N, mix_buf + j * stride, len);
      detail::accumulate_outer(dM, g_buf, f_buf, rows, stride, padded);  // dM += g f^T (padding is zero in both)
    });
    for (int64_t i = 0; i < d; ++i) detail::store_row(partials + chunk * dd + i * d, dM + i * rows, d);
  });

  // Sum the partials in chunk order: the same bits whatever thread ran which chunk.
  std::vector<acc_t> total(static_cast<size_t>(dd), acc_t(0));
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    const scalar_t* __restrict partial = partials + chunk * dd;
    for (int64_t ij = 0; ij < dd; ++ij) total[static_cast<size_t>(ij)] += static_cast<acc_t>(partial[ij]);
  }
  detail::store_row(grad_decay, total.data(), dd);
}

}  // namespace cpu
}  // namespace fbkernels
