// Fused CPU kernels of the feedback step, plain C++ templated on the dtype (no torch, no Python).
//
// Layout: h, f, h_next, grad_h_next, grad_h, grad_f: [B, d, N] contiguous; v, grad_v: [B, k, N] (softmax of the
// last k channels); decay M, grad_decay: [d, d] row-major.
//   forward:  h_next[b,:,n] = h[b,:,n] + M @ f[b,:,n];  v[b,:,n] = softmax(h_next[b, d-k:, n])
//   backward: g = grad_h_next (0 if absent); g[d-k:] += v * (grad_v - sum_c v * grad_v) (skipped if grad_v absent);
//             grad_h = g;  grad_f = M^T g;  grad_decay = sum_{b,n} g outer f
//
// Work is split into chunks of flat positions p = b * N + n, a function of B and N only (never of the thread
// count). A chunk walks its positions in blocks inside one b; each block copies the rows it reuses into a per-thread
// scratch buffer (allocated once per thread, see parallel.h; the AVX-512 forward reads f's whole tiles in place
// instead, see feedback_step_forward), so every tensor is read and written once per pass and the inner loops run
// over contiguous positions. In the backward each chunk writes its own [d, d] partial of
// grad_decay, and the partials are summed in chunk order: the same bits for any number of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/parallel.h"
#include "cpu/vector.h"

namespace fbkernels {
namespace cpu {

// Positions per chunk (one task of the parallel loop, and in the backward one grad_decay partial); at most
// kFeedbackMaxChunks chunks, so that the partials stay small for huge inputs. The forward, which has no partials,
// takes chunks twice as long: at 8x18x128x128 on 2 threads (Xeon VM, bench/cpu_kernel_ab.sh, 300 pairs each) 0.976
// and 0.988 of the time with inputs in cache, 0.984 and 1.001 out of it; chunks of 16384 were slower (1.013, and
// 1.055 out of cache).
constexpr int64_t kFeedbackPositionsPerChunk = 4096;
constexpr int64_t kFeedbackForwardPositionsPerChunk = 8192;
constexpr int64_t kFeedbackMaxChunks = 256;

inline int64_t feedback_step_num_chunks(int64_t B, int64_t N, int64_t per_chunk = kFeedbackPositionsPerChunk) {
  if (B <= 0 || N <= 0) return 0;
  const int64_t chunks = (B * N + per_chunk - 1) / per_chunk;
  return std::min(kFeedbackMaxChunks, chunks);
}

// Whether a pass writes its outputs with non-temporal stores (streaming_pays on the bytes it reads and writes):
// the forward reads h and f and writes h_next and v; the backward reads grad_h_next and grad_v (those given), v and
// (for grad_decay) f, and writes grad_h and grad_f (those asked for). itemsize: bytes per element of p.dtype.
inline bool feedback_step_streams(const FeedbackStepParams& p, bool backward, int64_t itemsize) {
  const int64_t d = p.d, k = p.k;
  const int64_t rows = backward ? (p.grad_h_next != 0 ? d : 0) + (p.grad_v != 0 ? k : 0) + k +
                                      (p.need_grad_decay ? d : 0) + (p.need_grad_h ? d : 0) + (p.need_grad_f ? d : 0)
                                : 3 * d + k;
  return streaming_pays(p.B * p.N * rows * itemsize);
}

namespace detail {

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Positions per block, a multiple of the tile width: the chunk's positions split into equal blocks of at most
// 2048 positions, so that the block's buffers (f or g and the mix, d rows each) stay in the core's L2 cache.
template <typename T>
int64_t feedback_block_length(int64_t chunk_positions, int64_t N) {
  constexpr int64_t W = kTileWidth<T>;
  constexpr int64_t kMaxBlock = 2048;
  const int64_t span = std::min(chunk_positions, N);
  const int64_t blocks = (span + kMaxBlock - 1) / kMaxBlock;
  return round_up((span + blocks - 1) / blocks, W);
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

// The block of `range` that starts at flat position p: batch entry b, its positions [n0, n0 + len), at most `block`.
struct Block {
  int64_t b, n0, len;
};

inline Block block_at(int64_t p, PositionRange range, int64_t N, int64_t block) {
  const int64_t n0 = p % N;
  return {p / N, n0, std::min({block, N - n0, range.end - p})};
}

// Calls block_fn(b, n0, len) for consecutive blocks of at most `block` positions, each inside one batch entry b.
template <typename BlockFn>
void for_each_block(PositionRange range, int64_t N, int64_t block, const BlockFn& block_fn) {
  for (int64_t p = range.begin; p < range.end;) {
    const Block at = block_at(p, range, N, block);
    block_fn(at.b, at.n0, at.len);
    p += at.len;
  }
}

// dst[0:len] = src[0:len] and dst[len:padded] = 0 (zero padding lets the tile loops run on whole tiles).
template <typename T>
inline void load_padded(T* __restrict dst, const T* __restrict src, int64_t len, int64_t padded) {
  std::memcpy(dst, src, static_cast<size_t>(len) * sizeof(T));
  for (int64_t n = len; n < padded; ++n) dst[n] = T(0);
}

// Every output tile of the channel mix and of grad_decay is a chain of dependent multiply-adds; computed one at a
// time, the FMA latency and not the loads would set the pace. These many tiles are computed together, as
// independent chains in 6 to 12 of the 16 vector registers: 6 (AVX2) or 3 (SSE2) rows of the mix, 2 x 6 or
// 2 x 3 entries of grad_decay (one vector each: 8 or 5 loads feed 12 or 6 multiply-adds). AVX-512 (which defines
// __AVX2__ too) has 32 registers: the same 6 rows, for two tiles at a time in the mix (mix_block).
#if defined(__AVX2__)
constexpr int64_t kMixRows = 6;
constexpr int64_t kOuterCols = 6;
#else
constexpr int64_t kMixRows = 3;
constexpr int64_t kOuterCols = 3;
#endif
constexpr int64_t kOuterRows = 2;
// The scratch buffers have their row count rounded up to this (the extra rows zero), so the blocked loops need no
// remainder code: a multiple of kMixRows, kOuterRows and kOuterCols in every build.
constexpr int64_t kRowPad = 6;

// Rows of memory that a block reads right after its channel mix: `count` rows of `length` elements, `stride` apart.
// The mix runs at the FMA units' rate with load slots to spare, so it prefetches each of these rows' cache lines
// of the tile, and the block's next step finds them in cache instead of waiting on memory (on the 2-core AMD EPYC
// VM, feedback_step forward at 8x18x128x128 on 2 threads, inputs out of cache: 1.95 against 2.11 ms; measured with
// bench/cpu_kernel_driver.cpp, medians of alternating runs). Into L2, not L1 (prefetcht2): non-temporal
// prefetches (prefetchnta), 2% faster there, were 1.5x slower on the 2-core Xeon (Sapphire Rapids) VM, 2.35-2.52
// against 1.52-1.81 ms with inputs in cache and 2.55-2.70 against 1.78-1.92 ms out of it (the _C_avx2 build, two
// runs each); without a prefetch it ran 1.54-1.58 ms in cache and 1.98-2.39 ms out of it. Prefetching the next
// block's f as well, or f a few tiles ahead in the mix, gained nothing on either machine.
template <typename T>
struct RowsAhead {
  const T* first = nullptr;  // nullptr: nothing to fetch
  int64_t count = 0, stride = 0, length = 0;

  void fetch_tile(int64_t t0) const {
    if (first == nullptr || t0 >= length) return;
    constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
    for (int64_t r = 0; r < count; ++r)
      for (int64_t line = t0; line < t0 + kTileWidth<T> && line < length; line += kLine)
        __builtin_prefetch(first + r * stride + line, /*read*/ 0, /*into L2 and L3, not L1*/ 1);
  }
};

// Rows of memory that the next block reads first, fetched one cache line at a time, row after row, spread over the
// backward's grad_decay outer product: on two cores a thread's multiply-adds and its memory phases do not overlap
// by themselves (docs/cpu-kernels.md, "Where the time goes"), and these loads then run under the multiply-adds.
// Ordinary prefetches: the lines must survive until the next block, after the outer product. Paired runs
// (bench/cpu_kernel_ab.sh, 2 threads, inputs out of cache, same bits, 2026-12-01): 0.946-0.967 of the time at
// 8x18x256x256 and 0.939-0.964 at 8x18x128x128 (four runs each), 0.990 on one thread. Fetching the next block's f
// as well was slower (1.006-1.028): with the block's buffers it no longer fits the L2 cache; so were blocks of 512
// positions (1.09), and blocks of 1024 gained no more (0.94-1.06).
template <typename T>
class RowsInTurn {
 public:
  // `count` rows of `length` elements, `stride` apart; up to kMaxGroups such groups, fetched in the order added.
  void add(const T* first, int64_t count, int64_t stride, int64_t length) {
    if (first != nullptr && count > 0 && length > 0 && groups_ < kMaxGroups) {
      group_[groups_++] = {first, count, stride, length};
      lines_ += count * ((length + kLine - 1) / kLine);
    }
  }
  int64_t lines() const { return lines_; }
  void fetch_next_line() {
    if (current_ >= groups_) return;
    const Group& g = group_[current_];
    __builtin_prefetch(g.first + row_ * g.stride + at_, /*read*/ 0, /*keep in all levels*/ 3);
    at_ += kLine;
    if (at_ >= g.length) {
      at_ = 0;
      if (++row_ == g.count) {
        row_ = 0;
        ++current_;
      }
    }
  }

 private:
  static constexpr int kMaxGroups = 3;
  static constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  struct Group {
    const T* first;
    int64_t count, stride, length;
  };
  Group group_[kMaxGroups] = {};
  int groups_ = 0, current_ = 0;
  int64_t lines_ = 0, row_ = 0, at_ = 0;
};

// The channel mix (below) of kTiles tiles starting at position t0: kMixRows output rows at a time, each a row of
// kTiles * kVectorsPerTile independent multiply-add chains fed by one broadcast of the matrix entry.
template <int64_t kTiles, typename T, typename Store>
inline void mix_tiles(const Store& store, const T* __restrict matrix, const T* __restrict x, int64_t x_stride,
                      int64_t d, int64_t out_rows, int64_t t0) {
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>, U = kTiles * kVectorsPerTile;
  for (int64_t i0 = 0; i0 < out_rows; i0 += kMixRows) {
    const T* __restrict m = matrix + i0 * d;
    V acc[kMixRows][U] = {};
    for (int64_t r = 0; r < d; ++r) {
      V xr[U];
#pragma GCC unroll 8
      for (int64_t u = 0; u < U; ++u) xr[u] = load_vector<T>(x + r * x_stride + t0 + u * L);
#pragma GCC unroll 8
      for (int64_t q = 0; q < kMixRows; ++q) {
        const V c = broadcast<T>(m[q * d + r]);
#pragma GCC unroll 8
        for (int64_t u = 0; u < U; ++u) acc[q][u] = multiply_add<T>(c, xr[u], acc[q][u]);
      }
    }
#pragma GCC unroll 8
    for (int64_t q = 0; q < kMixRows; ++q) {
#pragma GCC unroll 8
      for (int64_t u = 0; u < U; ++u) store(i0 + q, t0 + u * L, acc[q][u]);
    }
  }
}

// out[i * out_stride + n] = sum_r matrix[i * d + r] * x[r * x_stride + n] for i < out_rows, r < d and n < padded:
// the channel mix of a block. out_rows is a multiple of kMixRows and matrix has that many rows (zero past d);
// padded is a multiple of the tile width. For each tile of positions, kMixRows output rows at a time, and the
// tile's cache lines of each row `ahead` names.
template <typename T, typename Store>
inline void mix_block_to(const Store& store, const T* __restrict matrix, const T* __restrict x, int64_t x_stride,
                         int64_t d, int64_t out_rows, int64_t padded, const RowsAhead<T>& ahead) {
  constexpr int64_t W = kTileWidth<T>;
  // With AVX-512's 32 vector registers, two tiles at a time (24 accumulators): half the broadcasts per
  // multiply-add. feedback_step forward at 8x18x128x128, 2 threads, on the 2-core Xeon VM: 0.94-1.33 against
  // 1.07-1.35 ms, faster in 7 of 9 alternating runs (bench/cpu_kernel_driver.cpp).
  constexpr int64_t kPair = kVectorBytes == 64 ? 2 : 1;
  int64_t t0 = 0;
  for (; t0 + kPair * W <= padded; t0 += kPair * W) {
    for (int64_t t = 0; t < kPair; ++t) ahead.fetch_tile(t0 + t * W);
    mix_tiles<kPair>(store, matrix, x, x_stride, d, out_rows, t0);
  }
  for (; t0 < padded; t0 += W) {
    ahead.fetch_tile(t0);
    mix_tiles<1>(store, matrix, x, x_stride, d, out_rows, t0);
  }
}

template <typename T>
inline void mix_block(T* __restrict out, int64_t out_stride, const T* __restrict matrix, const T* __restrict x,
                      int64_t x_stride, int64_t d, int64_t out_rows, int64_t padded, const RowsAhead<T>& ahead) {
  const auto store = [out, out_stride](int64_t i, int64_t n, const vec_t<T>& value) {
    store_vector<T>(out + i * out_stride + n, value);
  };
  mix_block_to(store, matrix, x, x_stride, d, out_rows, padded, ahead);
}

// dM[i * rows + j] += sum_n g[i * stride + n] * f[j * stride + n] for i, j < rows and n < padded (rows a multiple
// of kRowPad, padded of the tile width; g and f are zero past their real rows and positions). Each (i, j) sums
// lane-wise vector by vector, then over its lanes by sum_lanes. Meanwhile the lines of `ahead`, evenly spread.
template <typename T>
inline void accumulate_outer(T* __restrict dM, const T* __restrict g, const T* __restrict f, int64_t rows,
                             int64_t stride, int64_t padded, RowsInTurn<T>& ahead) {
  using V = vec_t<T>;
  constexpr int64_t L = kLanes<T>;
  const int64_t steps = (rows / kOuterRows) * (rows / kOuterCols) * (padded / L);
  const int64_t steps_per_line = ahead.lines() > 0 ? std::max<int64_t>(1, steps / ahead.lines()) : steps + 1;
  int64_t until_fetch = steps_per_line;
  for (int64_t i0 = 0; i0 < rows; i0 += kOuterRows) {
    for (int64_t j0 = 0; j0 < rows; j0 += kOuterCols) {
      V acc[kOuterRows][kOuterCols] = {};
      for (int64_t n = 0; n < padded; n += L) {
        if (--until_fetch == 0) {
          until_fetch = steps_per_line;
          ahead.fetch_next_line();
        }
        V g_vec[kOuterRows];
#pragma GCC unroll 4
        for (int64_t a = 0; a < kOuterRows; ++a) g_vec[a] = load_vector<T>(g + (i0 + a) * stride + n);
#pragma GCC unroll 8
        for (int64_t b = 0; b < kOuterCols; ++b) {
          V f_vec = load_vector<T>(f + (j0 + b) * stride + n);
          keep_in_register(f_vec);  // 12 accumulators + 2 g + 1 f: 15 vector registers (of 16, or 32)
#pragma GCC unroll 4
          for (int64_t a = 0; a < kOuterRows; ++a) acc[a][b] = multiply_add<T>(g_vec[a], f_vec, acc[a][b]);
        }
      }
      for (int64_t a = 0; a < kOuterRows; ++a)
        for (int64_t b = 0; b < kOuterCols; ++b) dM[(i0 + a) * rows + j0 + b] += sum_lanes<T>(acc[a][b]);
    }
  }
}

// The [d, d] matrix src (transposed if asked) as [rows, d] with zero rows past d.
template <typename T>
std::vector<T> padded_matrix(const T* src, int64_t d, int64_t rows, bool transpose) {
  std::vector<T> out(static_cast<size_t>(rows * d), T(0));
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) out[static_cast<size_t>(i * d + j)] = transpose ? src[j * d + i] : src[i * d + j];
  return out;
}

// x[c * stride + n] = exp(x[c * stride + n] - max_c x[c * stride + n]) for c < k, and inverse_sum[n] = 1 / sum_c of
// those, at the positions n of one vector (V a vector type) or one scalar (V = T). The max keeps exp's argument
// <= 0 (no overflow); a NaN/Inf only reaches the positions whose logits hold it.
template <typename T, typename V, typename Exp>
inline void exp_and_inverse_sum(T* x, int64_t stride, int64_t k, int64_t n, T* inverse_sum, const Exp& exp_fn) {
  if (k == 2) {
    // The channel holding the max gets exp(max - max): 1, or NaN where the max is infinite or NaN, which is
    // (max - max) + 1. So one exp per position serves both channels, with the bits of the general loop below.
    const V x0 = load_as<T, V>(x + n), x1 = load_as<T, V>(x + stride + n);
    const auto second_larger = x1 > x0;
    const V max = second_larger ? x1 : x0;
    const V e_other = exp_fn((second_larger ? x0 : x1) - max);
    const V e_max = (max - max) + T(1);
    const V e0 = second_larger ? e_other : e_max;
    const V e1 = second_larger ? e_max : e_other;
    store_as<T, V>(x + n, e0);
    store_as<T, V>(x + stride + n, e1);
    store_as<T, V>(inverse_sum + n, T(1) / ((V{} + T(0)) + e0 + e1));
    return;
  }
  V max = load_as<T, V>(x + n);
  for (int64_t c = 1; c < k; ++c) {
    const V xc = load_as<T, V>(x + c * stride + n);
    max = xc > max ? xc : max;
  }
  V sum = V{} + T(0);
  for (int64_t c = 0; c < k; ++c) {
    const V e = exp_fn(load_as<T, V>(x + c * stride + n) - max);
    store_as<T, V>(x + c * stride + n, e);
    sum = sum + e;
  }
  store_as<T, V>(inverse_sum + n, T(1) / sum);
}

// v[c * v_stride + n] = softmax over c < k of x[c * x_stride + n], for n < len (x overwritten with the
// exponentials). One pass computes the exponentials and their inverse sum a vector of positions at a time (float:
// exp_nonpositive on whole vectors, expf on the last few positions; double: exp throughout; one exp per position
// when k = 2); a second pass per channel scales and writes v.
template <typename T>
void softmax_columns(T* x, int64_t x_stride, int64_t k, int64_t len, T* __restrict inverse_sum, T* v,
                     int64_t v_stride, bool stream) {
  int64_t n = 0;
  if constexpr (std::is_same_v<T, float>) {
    constexpr int64_t L = kLanes<float>;
    const auto vector_exp = [](vec_t<float> z) { return exp_nonpositive(z); };
    for (; n + L <= len; n += L) exp_and_inverse_sum<float, vec_t<float>>(x, x_stride, k, n, inverse_sum, vector_exp);
  }
  const auto scalar_exp = [](T z) { return std::exp(z); };
  for (; n < len; ++n) exp_and_inverse_sum<T, T>(x, x_stride, k, n, inverse_sum, scalar_exp);
  const auto scale = [](auto e, auto inverse) { return e * inverse; };
  for (int64_t c = 0; c < k; ++c) write_row_map(v + c * v_stride, len, stream, scale, x + c * x_stride, inverse_sum);
}

}  // namespace detail

// h_next = h + M @ f per position and v = softmax of h_next's last k channels (shapes in the file comment).
// Returns the number of threads that ran it.
template <typename T>
int64_t feedback_step_forward(const FeedbackStepParams& p) {
  const int64_t B = p.B, d = p.d, N = p.N, k = p.k;
  const int64_t num_chunks = feedback_step_num_chunks(B, N, kFeedbackForwardPositionsPerChunk);
  if (num_chunks == 0) return 1;
  const T* h = reinterpret_cast<const T*>(p.h);
  const T* f = reinterpret_cast<const T*>(p.f);
  T* h_next = reinterpret_cast<T*>(p.h_next);
  T* v = reinterpret_cast<T*>(p.v);
  constexpr int64_t W = kTileWidth<T>;
  const int64_t rows = detail::round_up(d, detail::kRowPad);
  const std::vector<T> M = detail::padded_matrix(reinterpret_cast<const T*>(p.decay), d, rows, /*transpose=*/false);
  const int64_t positions = B * N;
  const int64_t block = detail::feedback_block_length<T>(positions / num_chunks + 1, N);
  const int64_t stride = block + W;  // one spare tile per row: rows do not share cache sets
  const bool stream = feedback_step_streams(p, /*backward=*/false, sizeof(T));
  prepare_output(h_next, positions * d * static_cast<int64_t>(sizeof(T)), p.num_threads);
  prepare_output(v, positions * k * static_cast<int64_t>(sizeof(T)), p.num_threads);

  return parallel_for(num_chunks, p.num_threads, [&](int64_t chunk) {
    // mix_buf: M @ f (rows padded), then h_next (its last k rows are the softmax input; where the mix writes h_next
    // itself, only those rows); then the softmax's inverse sums; then f_buf, the block's f rows (zero-padded to
    // whole tiles) where they are copied.
    T* mix_buf = thread_scratch<T>((rows + 1 + d) * stride);
    T* inverse_sum = mix_buf + rows * stride;
    T* f_buf = inverse_sum + stride;
    const auto range = detail::chunk_positions(chunk, num_chunks, positions);
    detail::for_each_block(range, N, block, [&](int64_t b, int64_t n0, int64_t len) {
      const int64_t offset = b * d * N + n0;
      // The mix works tile by tile, fetching h meanwhile; h and h_next are then streamed one row at a time.
      // Reading and writing all d rows per tile instead would keep 2d strided memory streams open, more than the
      // hardware prefetchers follow (on the AMD VM with the AVX2 build: 1.7x slower). There, too, the mix was
      // fastest from a copy of the block's f rows (folding the copy into the mix: 1.50-1.68 against 1.35-1.44 ms at
      // 8x18x128x128), so the AVX2 and SSE2 builds mix only the copy. (On the Xeon VM, whose AVX-512 build is described
      // next, the AVX2 build read f in place 7% faster, 1.64 against 1.75 ms: bench/cpu_kernel_ab.sh.)
      // With AVX-512 the mix reads the whole tiles of f in place (a tile's d cache lines stay in L1 while every
      // output row uses them) and, where it can, writes their h_next itself, h added to each output vector in
      // registers: one store per output vector is a whole cache line, so even with d rows written per tile the
      // non-temporal stores leave full lines. Forward at 8x18x128x128 on the 2-core Xeon VM, 2 threads, inputs out
      // of cache: 1.25-1.34 against 1.46-1.56 ms through mix_buf (six alternating driver runs; in cache 1.12-1.23
      // against 1.04-1.36 ms). Non-temporal stores need aligned rows; where they are not, the mix goes to mix_buf.
      constexpr bool kInPlace = kVectorBytes == 64;
      const int64_t whole = kInPlace ? len / W * W : 0;  // positions mixed from f in place
      const bool rows_aligned = reinterpret_cast<uintptr_t>(h_next + offset) % kVectorBytes == 0 && N % kLanes<T> == 0;
      const bool fused = kInPlace && (!stream || rows_aligned);
      const detail::RowsAhead<T> h_rows{h + offset, d, N, whole};  // h, read next to write h_next
      if (fused) {
        const auto store = [&](int64_t i, int64_t n, const vec_t<T>& value) {
          if (i >= d) return;  // a padding row
          const vec_t<T> out = value + load_vector<T>(h + offset + i * N + n);
          if (i >= d - k) store_vector<T>(mix_buf + i * stride + n, out);  // the softmax's input
          if (stream) {
            stream_vector<T>(h_next + offset + i * N + n, out);
          } else {
            store_vector<T>(h_next + offset + i * N + n, out);
          }
        };
        detail::mix_block_to(store, M.data(), f + offset, N, d, rows, whole, h_rows);
      } else {
        detail::mix_block(mix_buf, stride, M.data(), f + offset, N, d, rows, whole, h_rows);
      }
      const int64_t from = fused ? whole : 0;  // h_next is written from here on below
      if (whole < len) {  // the rest from the copy
        const int64_t rest = len - whole, padded = detail::round_up(rest, W);
        for (int64_t c = 0; c < d; ++c)
          detail::load_padded(f_buf + c * stride, f + offset + c * N + whole, rest, padded);
        detail::mix_block(mix_buf + whole, stride, M.data(), f_buf, stride, d, rows, padded,
                          detail::RowsAhead<T>{h + offset + whole, d, N, rest});
      }
      const auto add = [](auto x, auto y) { return x + y; };
      for (int64_t i = 0; i < d - k; ++i)
        write_row_map(h_next + offset + i * N + from, len - from, stream, add, mix_buf + i * stride + from,
                      h + offset + i * N + from);
      for (int64_t i = d - k; i < d; ++i) {  // kept in mix_buf too: the softmax's input
        T* __restrict mix_row = mix_buf + i * stride;
        const T* __restrict h_row = h + offset + i * N;
        for (int64_t n = from; n < len; ++n) mix_row[n] += h_row[n];
        write_row(h_next + offset + i * N + from, mix_row + from, len - from, stream);
      }
      detail::softmax_columns(mix_buf + (d - k) * stride, stride, k, len, inverse_sum, v + b * k * N + n0, N, stream);
    });
    finish_streaming(stream);
  });
}

// Backward of feedback_step_forward: writes grad_h, grad_f and grad_decay where p.need_* is set (grad_decay is
// zeros when there is no position). Returns the number of threads that ran it.
template <typename T>
int64_t feedback_step_backward(const FeedbackStepParams& p) {
  const int64_t B = p.B, d = p.d, N = p.N, k = p.k;
  const int64_t num_chunks = feedback_step_num_chunks(B, N);
  const int64_t dd = d * d;
  T* grad_decay = reinterpret_cast<T*>(p.grad_decay);
  if (num_chunks == 0 || !(p.need_grad_h || p.need_grad_f || p.need_grad_decay)) {
    if (p.need_grad_decay) std::fill(grad_decay, grad_decay + dd, T(0));
    return 1;
  }
  const T* grad_h_next = reinterpret_cast<const T*>(p.grad_h_next);
  const T* grad_v = reinterpret_cast<const T*>(p.grad_v);
  const T* f = reinterpret_cast<const T*>(p.f);
  const T* v = reinterpret_cast<const T*>(p.v);
  T* grad_h = reinterpret_cast<T*>(p.grad_h);
  T* grad_f = reinterpret_cast<T*>(p.grad_f);
  constexpr int64_t W = kTileWidth<T>;
  const int64_t rows = detail::round_up(d, detail::kRowPad);
  // Transposed decay: grad_f = M^T g reads row j of M^T contiguously.
  const std::vector<T> MT = detail::padded_matrix(reinterpret_cast<const T*>(p.decay), d, rows, /*transpose=*/true);
  const int64_t positions = B * N;
  const int64_t block = detail::feedback_block_length<T>(positions / num_chunks + 1, N);
  const int64_t stride = block + W;
  const bool stream = feedback_step_streams(p, /*backward=*/true, sizeof(T));
  if (p.need_grad_h) prepare_output(grad_h, positions * d * static_cast<int64_t>(sizeof(T)), p.num_threads);
  if (p.need_grad_f) prepare_output(grad_f, positions * d * static_cast<int64_t>(sizeof(T)), p.num_threads);
  // One [rows, rows] partial of grad_decay per chunk (the entries past d unused).
  std::unique_ptr<T[]> partials(p.need_grad_decay ? new T[static_cast<size_t>(num_chunks * rows * rows)] : nullptr);

  const int64_t threads = parallel_for(num_chunks, p.num_threads, [&](int64_t chunk) {
    // g_buf, f_buf: the block's g and f rows (zero past d rows and len positions); mix_buf: M^T g; dot_buf:
    // sum_c v * grad_v.
    T* g_buf = thread_scratch<T>((3 * rows + 1) * stride);
    T* f_buf = g_buf + rows * stride;
    T* mix_buf = f_buf + rows * stride;
    T* dot_buf = mix_buf + rows * stride;
    T* dM = p.need_grad_decay ? partials.get() + chunk * rows * rows : nullptr;
    if (dM != nullptr) {
      std::fill(dM, dM + rows * rows, T(0));
      std::fill(g_buf + d * stride, g_buf + rows * stride, T(0));
      std::fill(f_buf + d * stride, f_buf + rows * stride, T(0));
    }
    const auto range = detail::chunk_positions(chunk, num_chunks, positions);
    detail::for_each_block(range, N, block, [&](int64_t b, int64_t n0, int64_t len) {
      const int64_t padded = detail::round_up(len, W);
      const int64_t offset = b * d * N + n0;
      for (int64_t i = 0; i < d; ++i) {
        T* g_row = g_buf + i * stride;
        if (grad_h_next != nullptr) {
          detail::load_padded(g_row, grad_h_next + offset + i * N, len, padded);
        } else {
          std::fill(g_row, g_row + padded, T(0));
        }
      }
      if (grad_v != nullptr) {  // softmax backward into the last k rows of g
        const T* v_b = v + b * k * N + n0;
        const T* grad_v_b = grad_v + b * k * N + n0;
        for (int64_t n = 0; n < len; ++n) dot_buf[n] = T(0);
        for (int64_t c = 0; c < k; ++c) {
          const T* __restrict v_row = v_b + c * N;
          const T* __restrict gv_row = grad_v_b + c * N;
          for (int64_t n = 0; n < len; ++n) dot_buf[n] += v_row[n] * gv_row[n];
        }
        for (int64_t c = 0; c < k; ++c) {
          const T* __restrict v_row = v_b + c * N;
          const T* __restrict gv_row = grad_v_b + c * N;
          T* __restrict g_row = g_buf + (d - k + c) * stride;
          for (int64_t n = 0; n < len; ++n) g_row[n] += v_row[n] * (gv_row[n] - dot_buf[n]);
        }
      }
      if (p.need_grad_h)
        for (int64_t i = 0; i < d; ++i) write_row(grad_h + offset + i * N, g_buf + i * stride, len, stream);
      if (p.need_grad_f) {  // grad_f = M^T g into mix_buf, then written one row at a time (see the forward)
        const detail::RowsAhead<T> f_rows{dM != nullptr ? f + offset : nullptr, d, N, len};  // for dM below
        detail::mix_block(mix_buf, stride, MT.data(), g_buf, stride, d, rows, padded, f_rows);
        for (int64_t j = 0; j < d; ++j) write_row(grad_f + offset + j * N, mix_buf + j * stride, len, stream);
      }
      if (dM != nullptr) {  // dM += g f^T (zero padding in both), fetching the next block's first reads
        for (int64_t c = 0; c < d; ++c) detail::load_padded(f_buf + c * stride, f + offset + c * N, len, padded);
        detail::RowsInTurn<T> next_rows;
        const int64_t next = b * N + n0 + len;
        // The next block of this chunk (the next chunk may go to another thread), when the pass is too large for
        // the caches (the streaming stores' test): with the inputs in cache the prefetches only cost instructions
        // (1.01-1.02 of the time at 8x18x64x64 and 1x18x64x64 in cache).
        if (stream && next < range.end) {
          const detail::Block at = detail::block_at(next, range, N, block);
          next_rows.add(grad_h_next == nullptr ? nullptr : grad_h_next + at.b * d * N + at.n0, d, N, at.len);
          if (grad_v != nullptr) {
            next_rows.add(v + at.b * k * N + at.n0, k, N, at.len);
            next_rows.add(grad_v + at.b * k * N + at.n0, k, N, at.len);
          }
        }
        detail::accumulate_outer(dM, g_buf, f_buf, rows, stride, padded, next_rows);
      }
    });
    finish_streaming(stream);
  });

  if (p.need_grad_decay) {  // the partials summed in chunk order: the same bits whatever thread ran which chunk
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = 0; j < d; ++j) {
        T total = T(0);
        for (int64_t chunk = 0; chunk < num_chunks; ++chunk) total += partials[chunk * rows * rows + i * rows + j];
        grad_decay[i * d + j] = total;
      }
    }
  }
  return threads;
}

}  // namespace cpu
}  // namespace fbkernels
