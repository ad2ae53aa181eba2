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
// over contiguous positions (auto-vectorised). In the backward each chunk writes its own [d, d] partial of
// grad_decay, and the partials are summed in chunk order: bitwise identical results for any num_threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// Positions per block: d rows of local buffer stay near 64 KiB (L2-resident), a multiple of the tile width.
template <typename acc_t>
int64_t feedback_block_length(int64_t d, int64_t N) {
  constexpr int64_t W = kTileWidth<acc_t>;
  const int64_t budget = (int64_t{64} * 1024 / (d * static_cast<int64_t>(sizeof(acc_t)))) / W * W;
  return std::min(std::clamp<int64_t>(budget, W, 1024), round_up(N, W));
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

// acc[0:W] = sum_r coeffs[r] * rows[r * row_stride + 0:W] over r < num_rows: a tile of one output row of a
// channel mix, kept in registers while the (cache-resident) input rows stream through.
template <int64_t W, typename acc_t>
inline void mix_tile(acc_t* __restrict out, const acc_t* __restrict coeffs, const acc_t* __restrict rows,
                     int64_t num_rows, int64_t row_stride) {
  acc_t acc[W] = {};  // a local array stays in registers; accumulating through `out` would go through memory
  for (int64_t r = 0; r < num_rows; ++r) {
    const acc_t c = coeffs[r];
    const acc_t* __restrict row = rows + r * row_stride;
    for (int64_t l = 0; l < W; ++l) acc[l] += c * row[l];
  }
  for (int64_t l = 0; l < W; ++l) out[l] = acc[l];
}

// out[i * stride + n] = sum_r matrix[i, r] * rows[r * stride + n] for i, r < d and n < padded (a multiple of W):
// the channel mix of a cached block, one W-wide tile of every output row at a time.
template <int64_t W, typename acc_t>
inline void mix_block(acc_t* __restrict out, const acc_t* __restrict matrix, const acc_t* __restrict rows, int64_t d,
                      int64_t stride, int64_t padded) {
  for (int64_t t0 = 0; t0 < padded; t0 += W)
    for (int64_t i = 0; i < d; ++i) mix_tile<W>(out + i * stride + t0, matrix + i * d, rows + t0, d, stride);
}

// sum_n a[n] * b[n] over n < len (a multiple of W), in W independent lanes reduced by a fixed tree: vectorises
// without -ffast-math and gives the same bits on every run.
template <int64_t W, typename acc_t>
inline acc_t dot_lanes(const acc_t* __restrict a, const acc_t* __restrict b, int64_t len) {
  acc_t lanes[W] = {};
  for (int64_t t = 0; t < len; t += W)
    for (int64_t l = 0; l < W; ++l) lanes[l] += a[t + l] * b[t + l];
  for (int64_t width = W / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
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
  for (int64_t c = 0; c < k; ++c) {
    acc_t* __restrict xc = x + c * x_stride;
    for (int64_t n = 0; n < len; ++n) {
      const acc_t e = std::exp(xc[n] - max_buf[n]);
      xc[n] = e;
      sum_buf[n] += e;
    }
  }
  for (int64_t n = 0; n < len; ++n) sum_buf[n] = acc_t(1) / sum_buf[n];
  for (int64_t c = 0; c < k; ++c) {
    const acc_t* __restrict xc = x + c * x_stride;
    scalar_t* __restrict vc = v + c * v_stride;
    for (int64_t n = 0; n < len; ++n) vc[n] = static_cast<scalar_t>(xc[n] * sum_buf[n]);
  }
}

template <typename acc_t, typename scalar_t>
std::vector<acc_t> to_acc(const scalar_t* src, int64_t count) {
  std::vector<acc_t> out(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) out[static_cast<size_t>(i)] = static_cast<acc_t>(src[i]);
  return out;
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
  const std::vector<acc_t> M = detail::to_acc<acc_t>(decay, d * d);
  const int64_t block = detail::feedback_block_length<acc_t>(d, N);
  const int64_t stride = block + W;  // one spare cache line per row: rows do not share cache sets
  const int64_t positions = B * N;

  parallel_for(num_chunks, num_threads, [&](int64_t chunk) {
    // f_buf: the block's f rows; mix_buf: M @ f, then h_next (its last k rows are the softmax input); then max and
    // sum rows.
    std::vector<acc_t> work(static_cast<size_t>((2 * d + 2) * stride));
    acc_t* f_buf = work.data();
    acc_t* mix_buf = f_buf + d * stride;
    acc_t* max_buf = mix_buf + d * stride;
    acc_t* sum_buf = max_buf + stride;
    const auto range = detail::chunk_positions(chunk, num_chunks, positions);
    detail::for_each_block(range, N, block, [&](int64_t b, int64_t n0, int64_t len) {
      const int64_t padded = detail::round_up(len, W);
      const int64_t offset = b * d * N + n0;
      for (int64_t c = 0; c < d; ++c) detail::load_padded(f_buf + c * stride, f + offset + c * N, len, padded);
      // The mix works tile by tile on the cached block; h and h_next are then streamed one row at a time. Touching
      // all d rows of h per tile instead would keep 2d strided memory streams open, more than the hardware
      // prefetchers follow.
      detail::mix_block<W>(mix_buf, M.data(), f_buf, d, stride, padded);
      for (int64_t i = 0; i < d; ++i) {
        const scalar_t* __restrict h_row = h + offset + i * N;
        scalar_t* __restrict out_row = h_next + offset + i * N;
        acc_t* __restrict mix_row = mix_buf + i * stride;
        for (int64_t n = 0; n < len; ++n) mix_row[n] += static_cast<acc_t>(h_row[n]);
        detail::store_row(out_row, mix_row, len);
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
  // Transposed decay: grad_f = M^T g reads row j of M^T contiguously.
  std::vector<acc_t> MT(static_cast<size_t>(dd));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) MT[static_cast<size_t>(j * d + i)] = static_cast<acc_t>(decay[i * d + j]);
  const int64_t block = detail::feedback_block_length<acc_t>(d, N);
  const int64_t stride = block + W;
  const int64_t positions = B * N;

  parallel_for(num_chunks, num_threads, [&](int64_t chunk) {
    // g_buf, f_buf: the block's g and f rows (zero-padded to whole tiles); mix_buf: M^T g; dot_buf: sum_c v*grad_v;
    // dM: this chunk's partial of grad_decay.
    std::vector<acc_t> work(static_cast<size_t>((3 * d + 1) * stride + dd), acc_t(0));
    acc_t* g_buf = work.data();
    acc_t* f_buf = g_buf + d * stride;
    acc_t* mix_buf = f_buf + d * stride;
    acc_t* dot_buf = mix_buf + d * stride;
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
      detail::mix_block<W>(mix_buf, MT.data(), g_buf, d, stride, padded);
      for (int64_t j = 0; j < d; ++j) detail::store_row(grad_f + offset + j * N, mix_buf + j * stride, len);
      for (int64_t i = 0; i < d; ++i)  // dM += g f^T over the block (padding is zero in both)
        for (int64_t j = 0; j < d; ++j)
          dM[i * d + j] += detail::dot_lanes<W>(g_buf + i * stride, f_buf + j * stride, padded);
    });
    detail::store_row(partials + chunk * dd, dM, dd);
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
