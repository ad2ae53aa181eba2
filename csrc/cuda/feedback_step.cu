// Fused feedback-step kernels (Feedback U-Net state update), forward and backward, for float, double, half and
// bfloat16 tensors in the canonical layout [B, d, N] (N contiguous), accumulating in fp32 (fp64 for double).
//
//   forward:  h_next[b,:,n] = h[b,:,n] + M @ f[b,:,n];   v[b,:,n] = softmax(h_next[b, d-k:, n])
//   backward: g = grad_h_next; g[:, d-k:] += v * (grad_v - sum_c v * grad_v); grad_h = g;
//             grad_f[b,:,n] = M^T @ g[b,:,n];   grad_M = sum_{b,n} g[b,:,n] (outer) f[b,:,n]
//
// Both passes are memory-bound: each reads its inputs and writes its outputs exactly once. Threads own positions n
// (consecutive threads own consecutive n, so every channel row access is coalesced) and loop over the d channels
// in registers; M lives in shared memory and is read by all threads of a warp at one address (a broadcast).
//
// Small d (forward d <= 64, backward d <= 32) use kernels specialised on a channel bound DMAX (d is rounded up to a
// bucket, padding channels are zero), so every per-channel array is indexed by compile-time constants and stays
// in registers. Larger d use "generic" kernels that stream M through shared memory in 32 x 32 chunks.
//
// grad_M is a reduction over all B*N positions. Each block of the backward's main kernel accumulates its positions
// into one [d, d] partial (register micro-tiles over a shared-memory tile of g and f), the partials go to a
// workspace, and a second kernel sums them in a fixed order: the result is deterministic, with no float atomics.
//
// The launchers take a FeedbackStepParams and turn it once into a typed FeedbackStepArgs for the launch helpers.
// The __global__ kernels take separate `__restrict__` pointer parameters: for pointers passed inside a struct nvcc
// cannot prove the inputs read-only, and about half of the ld.global.nc (read-only cache) loads become plain loads.
#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "cuda/utils.cuh"

namespace fbkernels {
namespace cuda {
namespace {

using namespace detail;

constexpr int kForwardThreads = 128;
constexpr int kGenericForwardThreads = 128;
constexpr int kChunk = 32;                    // channel chunk (rows and columns of M) of the generic kernels
constexpr int kForwardSmallMaxD = 64;         // forward: largest d of the register-specialised kernels
constexpr int kBackwardSmallMaxD = 32;        // backward: likewise
constexpr int64_t kPartialTilePositions = 128;  // backward tile size for 4-byte accumulators (see num_partials)
constexpr int64_t kMaxPartialElements = int64_t(1) << 24;  // workspace cap: 64 MiB of fp32 partials
constexpr int kReduceX = 32, kReduceY = 32;   // partial-sum reduction block: 32 elements x 32 partial slices

// Backward block size = positions per tile: 128 for 4-byte accumulators, 64 for double (same shared memory).
template <typename acc_t>
struct BackwardThreads {
  static constexpr int value = sizeof(acc_t) == 4 ? 128 : 64;
};

// Positions per thread in the small forward kernel: 16-byte accesses, but at most ~96 registers for the
// DMAX x VEC block of f a thread keeps.
template <typename scalar_t, int DMAX>
struct ForwardVec {
  static constexpr int kWords = static_cast<int>(sizeof(acc_t_of<scalar_t>) / 4);
  static constexpr int kByBytes = static_cast<int>(16 / sizeof(scalar_t));
  static constexpr int kByRegs = 96 / (DMAX * kWords);
  static constexpr int kByRegsPow2 = kByRegs >= 8 ? 8 : kByRegs >= 4 ? 4 : kByRegs >= 2 ? 2 : 1;
  static constexpr int value = kByBytes < kByRegsPow2 ? kByBytes : kByRegsPow2;
};

// Calls fn(IntTag<DMAX>{}) for the smallest channel bucket DMAX >= d (DMAX <= MaxD); false if d > MaxD.
template <int MaxD, typename Fn>
bool dispatch_channel_bucket(int64_t d, Fn&& fn) {
  if (d <= 4) {
    fn(IntTag<4>{});
  } else if (d <= 8) {
    fn(IntTag<8>{});
  } else if (d <= 16) {
    fn(IntTag<16>{});
  } else if (d <= 24) {
    fn(IntTag<24>{});
  } else if (d <= 32) {
    fn(IntTag<32>{});
  } else {
    if constexpr (MaxD >= 64) {
      if (d <= 48) {
        fn(IntTag<48>{});
        return true;
      }
      if (d <= 64) {
        fn(IntTag<64>{});
        return true;
      }
    }
    return false;
  }
  return true;
}

// One call's arguments as the kernels take them: typed pointers (null for an absent input or a gradient nobody
// needs), sizes and the launch's tiling of the B * N positions. Built by feedback_args from the FeedbackStepParams.
template <typename scalar_t>
struct FeedbackStepArgs {
  const scalar_t* h;
  const scalar_t* f;
  const scalar_t* decay;
  scalar_t* h_next;
  scalar_t* v;  // forward output, backward input
  const scalar_t* grad_h_next;
  const scalar_t* grad_v;
  scalar_t* grad_h;
  scalar_t* grad_f;
  scalar_t* grad_decay;
  acc_t_of<scalar_t>* partials;  // [num_partials, d, d]; null when grad_decay is not needed
  int64_t num_partials;
  int64_t B, d, N, k;
  int64_t tiles_per_batch, num_tiles;  // tiles of one launch: they never cross a batch
};

// ------------------------------------------------------------------ device helpers

// One step of an online softmax over channels: running max m and running sum s of exp(z - m).
// -inf entries add exactly 0 (so one -inf channel does not poison the sum); NaN and +inf make s NaN, as in the
// reference (exp(NaN), exp(inf - inf)).
template <typename acc_t>
__device__ __forceinline__ void softmax_update(acc_t z, acc_t& m, acc_t& s) {
  const acc_t m_new = max_acc(m, z);
  const acc_t rescale = (m_new == m) ? acc_t(1) : exp_acc(m - m_new);
  const acc_t e = (z == neg_infinity<acc_t>()) ? acc_t(0) : exp_acc(z - m_new);
  s = s * rescale + e;
  m = m_new;
}

// z[q] = h_row[q] + sum_j m_row[j] * f_reg[j][q] for VEC positions. m_row: a zero-padded row of M in shared memory.
template <int DMAX, int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void mix_row(const acc_t* m_row, const acc_t (&f_reg)[DMAX][VEC],
                                        const scalar_t* __restrict__ h_row, acc_t (&z)[VEC]) {
  acc_t h_val[VEC];
  load_pack<VEC>(h_row, h_val);
  acc_t acc[VEC];
#pragma unroll
  for (int q = 0; q < VEC; ++q) acc[q] = acc_t(0);
#pragma unroll
  for (int j = 0; j < DMAX; ++j) {
    const acc_t m = m_row[j];
#pragma unroll
    for (int q = 0; q < VEC; ++q) acc[q] = fma_acc(m, f_reg[j][q], acc[q]);
  }
#pragma unroll
  for (int q = 0; q < VEC; ++q) z[q] = h_val[q] + acc[q];
}

// acc[ii] = sum_j A[i0 + ii, j] * x(j) for ii < kChunk, with A = mat ([d, d] row-major) or mat^T (TRANSPOSE).
// A is staged through shared memory 32 x 32 at a time: every thread of the block must call this (it
// synchronises), `active` says whether this thread has a position to compute.
template <bool TRANSPOSE, typename scalar_t, typename acc_t, typename XFn>
__device__ __forceinline__ void chunk_matvec(acc_t* m_tile, const scalar_t* __restrict__ mat, int d, int i0,
                                             bool active, XFn&& x_at, acc_t (&acc)[kChunk]) {
#pragma unroll
  for (int ii = 0; ii < kChunk; ++ii) acc[ii] = acc_t(0);
  for (int j0 = 0; j0 < d; j0 += kChunk) {
    __syncthreads();  // the previous chunk's readers are done with m_tile
    for (int e = threadIdx.x; e < kChunk * kChunk; e += blockDim.x) {
      const int i = i0 + e / kChunk, j = j0 + e % kChunk;
      acc_t val = acc_t(0);
      if (i < d && j < d) val = to_acc(TRANSPOSE ? mat[int64_t(j) * d + i] : mat[int64_t(i) * d + j]);
      m_tile[e] = val;
    }
    __syncthreads();
    if (active) {
      const int j_end = min(kChunk, d - j0);
#pragma unroll 4
      for (int jj = 0; jj < j_end; ++jj) {
        const acc_t x = x_at(j0 + jj);
#pragma unroll
        for (int ii = 0; ii < kChunk; ++ii) acc[ii] = fma_acc(m_tile[ii * kChunk + jj], x, acc[ii]);
      }
    }
  }
}

// sum over c < k of v[offset + c * N] * grad_v[offset + c * N]: the inner product of the softmax backward at one
// position.
template <typename scalar_t>
__device__ __forceinline__ acc_t_of<scalar_t> softmax_dot(const scalar_t* __restrict__ v,
                                                          const scalar_t* __restrict__ grad_v, int64_t offset,
                                                          int64_t N, int k) {
  acc_t_of<scalar_t> dot = 0;
  for (int c = 0; c < k; ++c) dot += to_acc(v[offset + c * N]) * to_acc(grad_v[offset + c * N]);
  return dot;
}

// dm[a][c] += g[a] * f[c] for a < 4, c < COLS, with g and f read from one position's row of the position-major
// shared tiles: one position's share of a thread's 4 x COLS micro-tile of grad_M.
template <int COLS, typename acc_t>
__device__ __forceinline__ void accumulate_micro_tile(const acc_t* g, const acc_t* f, acc_t (&dm)[4][COLS]) {
  acc_t gq[4], fq[COLS];
  load_same<4>(g, gq);
  load_same<COLS>(f, fq);
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int c = 0; c < COLS; ++c) dm[a][c] = fma_acc(gq[a], fq[c], dm[a][c]);
  }
}

// ------------------------------------------------------------------ forward kernels

// Small d: thread = VEC consecutive positions of one batch; f[:, those positions] stays in registers.
// Pass 1 writes every row of h_next and runs an online softmax over the last k rows; pass 2 recomputes those k
// rows (the same arithmetic, so bit-identical) and writes v. Tiles of kForwardThreads * VEC positions never cross
// a batch; the grid strides over tiles.
template <typename scalar_t, int DMAX, int VEC>
__global__ void __launch_bounds__(kForwardThreads)
    feedback_forward_small_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ f,
                                  const scalar_t* __restrict__ decay, scalar_t* __restrict__ h_next,
                                  scalar_t* __restrict__ v, int64_t d, int64_t N, int64_t k, int64_t tiles_per_batch,
                                  int64_t num_tiles) {
  using acc_t = acc_t_of<scalar_t>;
  __shared__ __align__(16) acc_t m_s[DMAX * DMAX];  // M, zero-padded to DMAX x DMAX
  const int dd = static_cast<int>(d);
  for (int e = threadIdx.x; e < DMAX * DMAX; e += blockDim.x) {
    const int i = e / DMAX, j = e % DMAX;
    m_s[e] = (i < dd && j < dd) ? to_acc(decay[i * dd + j]) : acc_t(0);
  }
  __syncthreads();

  const int soft_begin = dd - static_cast<int>(k);
  constexpr int64_t kTilePositions = int64_t(kForwardThreads) * VEC;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t b = tile / tiles_per_batch;
    const int64_t n = (tile - b * tiles_per_batch) * kTilePositions + int64_t(threadIdx.x) * VEC;
    if (n >= N) continue;  // N % VEC == 0 when VEC > 1, so n < N means all VEC positions exist
    const int64_t base = b * d * N + n;

    acc_t f_reg[DMAX][VEC];
#pragma unroll
    for (int j = 0; j < DMAX; ++j) {
      if (j < dd) {
        load_pack<VEC>(f + base + j * N, f_reg[j]);
      } else {
#pragma unroll
        for (int q = 0; q < VEC; ++q) f_reg[j][q] = acc_t(0);
      }
    }

    acc_t run_max[VEC], run_sum[VEC];
#pragma unroll
    for (int q = 0; q < VEC; ++q) {
      run_max[q] = neg_infinity<acc_t>();
      run_sum[q] = acc_t(0);
    }
    // Rows are a runtime loop (only the channel sum inside is fully unrolled) to keep code and registers small;
    // unrolling it by 4 lets the loads of 4 rows of h be in flight together.
#pragma unroll 4
    for (int i = 0; i < dd; ++i) {
      acc_t z[VEC];
      mix_row<DMAX, VEC>(m_s + i * DMAX, f_reg, h + base + i * N, z);
      store_pack<VEC>(h_next + base + i * N, z);
      if (i >= soft_begin) {
#pragma unroll
        for (int q = 0; q < VEC; ++q) softmax_update(z[q], run_max[q], run_sum[q]);
      }
    }

    const int64_t v_base = b * k * N + n;
#pragma unroll 1
    for (int i = soft_begin; i < dd; ++i) {
      acc_t z[VEC];
      mix_row<DMAX, VEC>(m_s + i * DMAX, f_reg, h + base + i * N, z);
      acc_t prob[VEC];
#pragma unroll
      for (int q = 0; q < VEC; ++q) prob[q] = exp_acc(z[q] - run_max[q]) / run_sum[q];
      store_pack<VEC>(v + v_base + (i - soft_begin) * N, prob);
    }
  }
}

// Any d: thread = one position; rows of h_next computed 32 at a time with M streamed through shared memory.
template <typename scalar_t>
__global__ void __launch_bounds__(kGenericForwardThreads)
    feedback_forward_generic_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ f,
                                    const scalar_t* __restrict__ decay, scalar_t* __restrict__ h_next,
                                    scalar_t* __restrict__ v, int64_t d, int64_t N, int64_t k, int64_t tiles_per_batch,
                                    int64_t num_tiles) {
  using acc_t = acc_t_of<scalar_t>;
  __shared__ __align__(16) acc_t m_tile[kChunk * kChunk];
  const int dd = static_cast<int>(d);
  const int soft_begin = dd - static_cast<int>(k);
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {  // uniform: every thread syncs
    const int64_t b = tile / tiles_per_batch;
    const int64_t n = (tile - b * tiles_per_batch) * kGenericForwardThreads + threadIdx.x;
    const bool active = n < N;
    const int64_t base = b * d * N + n;
    auto f_at = [&](int j) { return to_acc(f[base + j * N]); };

    acc_t run_max = neg_infinity<acc_t>(), run_sum = acc_t(0);
    for (int i0 = 0; i0 < dd; i0 += kChunk) {
      acc_t acc[kChunk];
      chunk_matvec<false>(m_tile, decay, dd, i0, active, f_at, acc);
      if (active) {
#pragma unroll
        for (int ii = 0; ii < kChunk; ++ii) {
          const int i = i0 + ii;
          if (i < dd) {
            const acc_t z = to_acc(h[base + i * N]) + acc[ii];
            h_next[base + i * N] = from_acc<scalar_t>(z);
            if (i >= soft_begin) softmax_update(z, run_max, run_sum);
          }
        }
      }
    }
    const int64_t v_base = b * k * N + n;
    for (int i0 = (soft_begin / kChunk) * kChunk; i0 < dd; i0 += kChunk) {
      acc_t acc[kChunk];
      chunk_matvec<false>(m_tile, decay, dd, i0, active, f_at, acc);
      if (active) {
#pragma unroll
        for (int ii = 0; ii < kChunk; ++ii) {
          const int i = i0 + ii;
          if (i >= soft_begin && i < dd) {
            const acc_t z = to_acc(h[base + i * N]) + acc[ii];
            v[v_base + (i - soft_begin) * N] = from_acc<scalar_t>(exp_acc(z - run_max) / run_sum);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------ backward kernels

// Small d (<= 32). Per tile of T positions (thread = position):
//   phase 1: g (grad_h_next + softmax backward) and f in registers; write grad_h = g and grad_f = M^T g; store g
//            and f position-major into shared tiles g_s / f_s (rows padded to DMAX with zeros).
//   phase 2: grad_M micro-tiles: the ceil(d/4)^2 tiles of 4 x 4 entries are spread over the threads, `slices`
//            threads per micro-tile splitting the T positions; each keeps its 16 sums in registers across tiles.
// Epilogue: sum the slices in fixed order into this block's [d, d] partial.
template <typename scalar_t, int DMAX>
__global__ void __launch_bounds__(BackwardThreads<acc_t_of<scalar_t>>::value)
    feedback_backward_small_kernel(const scalar_t* __restrict__ grad_h_next, const scalar_t* __restrict__ grad_v,
                                   const scalar_t* __restrict__ f, const scalar_t* __restrict__ v,
                                   const scalar_t* __restrict__ decay, scalar_t* __restrict__ grad_h,
                                   scalar_t* __restrict__ grad_f, acc_t_of<scalar_t>* __restrict__ partials, int64_t d,
                                   int64_t N, int64_t k, int64_t tiles_per_batch, int64_t num_tiles) {
  using acc_t = acc_t_of<scalar_t>;
  constexpr int T = BackwardThreads<acc_t>::value;
  static_assert(DMAX % 4 == 0 && (DMAX / 4) * (DMAX / 4) <= T, "every 4x4 micro-tile needs a thread");
  // Row stride of the position-major tiles: an odd number of 16-byte units, so the 16-byte accesses of
  // neighbouring positions fall in different banks.
  constexpr int kStride = ((DMAX / 4) % 2 == 0) ? DMAX + 4 : DMAX;
  constexpr int kTileElems = T * kStride;
  constexpr int kReduceElems = T * 16;
  constexpr int kWorkElems = 2 * kTileElems > kReduceElems ? 2 * kTileElems : kReduceElems;
  __shared__ __align__(16) acc_t mt_s[DMAX * DMAX];  // M^T, zero-padded: mt_s[i * DMAX + j] = M[j][i]
  __shared__ __align__(16) acc_t work[kWorkElems];    // g_s and f_s tiles, then the epilogue's slice sums
  acc_t* g_s = work;
  acc_t* f_s = work + kTileElems;

  const int tid = threadIdx.x;
  const int dd = static_cast<int>(d);
  const int kk = static_cast<int>(k);
  for (int e = tid; e < DMAX * DMAX; e += T) {
    const int i = e / DMAX, j = e % DMAX;
    mt_s[e] = (i < dd && j < dd) ? to_acc(decay[j * dd + i]) : acc_t(0);
  }

  const int tiles_1d = (dd + 3) / 4;
  const int num_micro = tiles_1d * tiles_1d;
  const int slices = T / num_micro;
  const int micro = tid % num_micro;
  const int slice = tid / num_micro;
  const bool accumulates = slice < slices;
  const int row0 = (micro / tiles_1d) * 4;
  const int col0 = (micro % tiles_1d) * 4;
  acc_t dm[4][4] = {};
  const int soft_begin = dd - kk;
  // Null outputs are gradients autograd does not need: their work is skipped (uniform over the grid).
  const bool want_decay = partials != nullptr;
  __syncthreads();

  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {  // uniform: every thread syncs
    const int64_t b = tile / tiles_per_batch;
    const int64_t n = (tile - b * tiles_per_batch) * T + tid;
    acc_t* g_row = g_s + tid * kStride;
    acc_t* f_row = f_s + tid * kStride;
    if (n < N) {
      const int64_t base = b * d * N + n;
      acc_t f_reg[DMAX], g[DMAX];
#pragma unroll
      for (int i = 0; i < DMAX; ++i) f_reg[i] = (want_decay && i < dd) ? to_acc(f[base + i * N]) : acc_t(0);
#pragma unroll
      for (int i = 0; i < DMAX; ++i) {
        g[i] = (grad_h_next != nullptr && i < dd) ? to_acc(grad_h_next[base + i * N]) : acc_t(0);
      }
      if (grad_v != nullptr) {
        // Softmax backward on the last k rows. k is a runtime value, so the rows are patched in this thread's own
        // row of g_s (shared memory takes runtime indices; registers do not) and g is read back from there.
#pragma unroll
        for (int i = 0; i < DMAX; i += 4) {
          const acc_t gq[4] = {g[i], g[i + 1], g[i + 2], g[i + 3]};
          store_same<4>(g_row + i, gq);
        }
        const int64_t v_base = b * k * N + n;
        const acc_t dot = softmax_dot(v, grad_v, v_base, N, kk);
        for (int c = 0; c < kk; ++c) {  // the re-reads of v / grad_v hit L1
          g_row[soft_begin + c] += to_acc(v[v_base + c * N]) * (to_acc(grad_v[v_base + c * N]) - dot);
        }
#pragma unroll
        for (int i = 0; i < DMAX; i += 4) {
          acc_t gq[4];
          load_same<4>(g_row + i, gq);
#pragma unroll
          for (int q = 0; q < 4; ++q) g[i + q] = gq[q];
        }
      }
      if (grad_h != nullptr) {
#pragma unroll
        for (int i = 0; i < DMAX; ++i) {
          if (i < dd) grad_h[base + i * N] = from_acc<scalar_t>(g[i]);
        }
      }
      if (grad_f != nullptr) {
#pragma unroll 1
        for (int i = 0; i < dd; ++i) {
          acc_t s = acc_t(0);
#pragma unroll
          for (int j = 0; j < DMAX; ++j) s = fma_acc(mt_s[i * DMAX + j], g[j], s);
          grad_f[base + i * N] = from_acc<scalar_t>(s);
        }
      }
#pragma unroll
      for (int i = 0; i < DMAX; i += 4) {
        const acc_t gq[4] = {g[i], g[i + 1], g[i + 2], g[i + 3]};
        const acc_t fq[4] = {f_reg[i], f_reg[i + 1], f_reg[i + 2], f_reg[i + 3]};
        store_same<4>(g_row + i, gq);
        store_same<4>(f_row + i, fq);
      }
    } else {  // past the end of the batch: contributes zero
      const acc_t zero[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
#pragma unroll
      for (int i = 0; i < DMAX; i += 4) {
        store_same<4>(g_row + i, zero);
        store_same<4>(f_row + i, zero);
      }
    }
    __syncthreads();
    if (want_decay && accumulates) {
      for (int p = slice; p < T; p += slices) {
        accumulate_micro_tile(g_s + p * kStride + row0, f_s + p * kStride + col0, dm);
      }
    }
    __syncthreads();  // g_s / f_s are rewritten by the next tile (or reused by the epilogue)
  }

  if (!want_decay) return;
  // Epilogue: thread tid = slice * num_micro + micro parks its sums at work[tid * 16 ...].
  acc_t* red = work;
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int c = 0; c < 4; ++c) red[tid * 16 + a * 4 + c] = dm[a][c];
  }
  __syncthreads();
  acc_t* partial = partials + int64_t(blockIdx.x) * dd * dd;
  for (int e = tid; e < dd * dd; e += T) {
    const int i = e / dd, j = e % dd;
    const int offset = ((i / 4) * tiles_1d + j / 4) * 16 + (i % 4) * 4 + (j % 4);
    acc_t s = acc_t(0);
    for (int sl = 0; sl < slices; ++sl) s += red[sl * num_micro * 16 + offset];
    partial[e] = s;
  }
}

// Any d. Phase 1 as in the small kernel, but g is recomputed from global memory where needed (L1/L2 hits) and
// grad_f = M^T g goes 32 rows at a time. grad_M goes 32 x 32 chunk by chunk: g and f chunks are staged in shared
// memory and each thread owns a 4 x MTC micro-tile of the chunk, which it adds straight into this block's
// partial in global memory (only this thread ever touches those entries: no races, fixed order).
template <typename scalar_t>
__global__ void __launch_bounds__(BackwardThreads<acc_t_of<scalar_t>>::value)
    feedback_backward_generic_kernel(const scalar_t* __restrict__ grad_h_next, const scalar_t* __restrict__ grad_v,
                                     const scalar_t* __restrict__ f, const scalar_t* __restrict__ v,
                                     const scalar_t* __restrict__ decay, scalar_t* __restrict__ grad_h,
                                     scalar_t* __restrict__ grad_f, acc_t_of<scalar_t>* __restrict__ partials,
                                     int64_t d, int64_t N, int64_t k, int64_t tiles_per_batch, int64_t num_tiles) {
  using acc_t = acc_t_of<scalar_t>;
  constexpr int T = BackwardThreads<acc_t>::value;
  constexpr int MTC = kChunk * kChunk / (4 * T);  // micro-tile columns: 2 (T = 128) or 4 (T = 64)
  constexpr int kColGroups = kChunk / MTC;
  constexpr int kStride = kChunk + 4;  // 9 units of 16 bytes (odd): conflict-free 16-byte accesses
  static_assert((kChunk / 4) * kColGroups == T, "one micro-tile per thread");
  __shared__ __align__(16) acc_t m_tile[kChunk * kChunk];
  __shared__ __align__(16) acc_t g_s[T * kStride];
  __shared__ __align__(16) acc_t f_s[T * kStride];

  const int tid = threadIdx.x;
  const int dd = static_cast<int>(d);
  const int kk = static_cast<int>(k);
  const int soft_begin = dd - kk;
  const int row0 = (tid / kColGroups) * 4;
  const int col0 = (tid % kColGroups) * MTC;
  // Null outputs are gradients autograd does not need: their work is skipped (uniform over the grid).
  const bool want_decay = partials != nullptr;
  acc_t* partial = want_decay ? partials + int64_t(blockIdx.x) * dd * dd : nullptr;
  for (int r0 = 0; want_decay && r0 < dd; r0 += kChunk) {
    for (int c0 = 0; c0 < dd; c0 += kChunk) {
#pragma unroll
      for (int a = 0; a < 4; ++a) {
#pragma unroll
        for (int c = 0; c < MTC; ++c) {
          const int i = r0 + row0 + a, j = c0 + col0 + c;
          if (i < dd && j < dd) partial[int64_t(i) * dd + j] = acc_t(0);
        }
      }
    }
  }

  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {  // uniform: every thread syncs
    const int64_t b = tile / tiles_per_batch;
    const int64_t n = (tile - b * tiles_per_batch) * T + tid;
    const bool active = n < N;
    const int64_t base = b * d * N + n;
    const int64_t v_base = b * k * N + n;
    const acc_t dot = (active && grad_v != nullptr) ? softmax_dot(v, grad_v, v_base, N, kk) : acc_t(0);
    auto g_at = [&](int i) -> acc_t {
      acc_t g = grad_h_next != nullptr ? to_acc(grad_h_next[base + i * N]) : acc_t(0);
      if (grad_v != nullptr && i >= soft_begin) {
        const int64_t off = v_base + (i - soft_begin) * N;
        g += to_acc(v[off]) * (to_acc(grad_v[off]) - dot);
      }
      return g;
    };

    if (active && grad_h != nullptr) {
      for (int i = 0; i < dd; ++i) grad_h[base + i * N] = from_acc<scalar_t>(g_at(i));
    }
    for (int i0 = 0; grad_f != nullptr && i0 < dd; i0 += kChunk) {
      acc_t acc[kChunk];
      chunk_matvec<true>(m_tile, decay, dd, i0, active, g_at, acc);
      if (active) {
#pragma unroll
        for (int ii = 0; ii < kChunk; ++ii) {
          if (i0 + ii < dd) grad_f[base + (i0 + ii) * N] = from_acc<scalar_t>(acc[ii]);
        }
      }
    }

    for (int r0 = 0; want_decay && r0 < dd; r0 += kChunk) {
      __syncthreads();  // the previous chunk's readers are done with g_s
#pragma unroll
      for (int ii = 0; ii < kChunk; ii += 4) {
        acc_t gq[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) gq[q] = (active && r0 + ii + q < dd) ? g_at(r0 + ii + q) : acc_t(0);
        store_same<4>(g_s + tid * kStride + ii, gq);
      }
      for (int c0 = 0; c0 < dd; c0 += kChunk) {
        __syncthreads();  // ... and with f_s
#pragma unroll
        for (int jj = 0; jj < kChunk; jj += 4) {
          acc_t fq[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            fq[q] = (active && c0 + jj + q < dd) ? to_acc(f[base + (c0 + jj + q) * N]) : acc_t(0);
          }
          store_same<4>(f_s + tid * kStride + jj, fq);
        }
        __syncthreads();
        acc_t dm[4][MTC] = {};
#pragma unroll 4
        for (int p = 0; p < T; ++p) accumulate_micro_tile(g_s + p * kStride + row0, f_s + p * kStride + col0, dm);
#pragma unroll
        for (int a = 0; a < 4; ++a) {
#pragma unroll
          for (int c = 0; c < MTC; ++c) {
            const int i = r0 + row0 + a, j = c0 + col0 + c;
            if (i < dd && j < dd) partial[int64_t(i) * dd + j] += dm[a][c];
          }
        }
      }
    }
  }
}

// grad_M[e] = sum over partials p of partials[p][e], p in a fixed order: 32 slices of p per element, then the
// slice sums in slice order.
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceX* kReduceY)
    reduce_partials_kernel(const acc_t_of<scalar_t>* __restrict__ partials, scalar_t* __restrict__ out,
                           int64_t num_partials, int64_t elems) {
  using acc_t = acc_t_of<scalar_t>;
  __shared__ acc_t slice_sums[kReduceY][kReduceX];
  const int64_t e = int64_t(blockIdx.x) * kReduceX + threadIdx.x;
  acc_t s = acc_t(0);
  if (e < elems) {
#pragma unroll 4
    for (int64_t p = threadIdx.y; p < num_partials; p += kReduceY) s += partials[p * elems + e];
  }
  slice_sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && e < elems) {
    acc_t total = acc_t(0);
#pragma unroll
    for (int y = 0; y < kReduceY; ++y) total += slice_sums[y][threadIdx.x];
    out[e] = from_acc<scalar_t>(total);
  }
}

// ------------------------------------------------------------------ host side

// The float instantiation of the backward's main kernel for d: its occupancy sizes the persistent grid.
const void* backward_kernel_for_occupancy(int64_t d) {
  const void* kernel = nullptr;
  const bool small = dispatch_channel_bucket<kBackwardSmallMaxD>(d, [&](auto dmax) {
    kernel = reinterpret_cast<const void*>(&feedback_backward_small_kernel<float, decltype(dmax)::value>);
  });
  if (!small) kernel = reinterpret_cast<const void*>(&feedback_backward_generic_kernel<float>);
  return kernel;
}

// How many blocks of the backward's main kernel the current device runs at once (SMs x blocks per SM), cached
// per (device, kernel). The backward launches at most this many blocks, each looping over many tiles, so the
// [d, d] partials stay few and no wave of blocks runs half empty. A failing CUDA query throws.
int64_t resident_backward_blocks(int64_t d) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  const void* kernel = backward_kernel_for_occupancy(d);
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int64_t> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, kernel);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  int sms = 0, per_sm = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, BackwardThreads<float>::value, 0),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  const int64_t blocks = std::max<int64_t>(1, int64_t(sms) * std::max(1, per_sm));
  cache.emplace(key, blocks);
  return blocks;
}

void check_feedback_sizes(const char* op, int64_t B, int64_t d, int64_t N, int64_t k) {
  require(B >= 0 && N >= 0, op, "B and N must be >= 0, got B=" + std::to_string(B) + ", N=" + std::to_string(N));
  require(d >= 1 && d <= 46340, op, "d must be in 1..46340, got " + std::to_string(d));
  require(k >= 1 && k <= d, op, "k must be in 1..d=" + std::to_string(d) + ", got " + std::to_string(k));
}

// The kernels' arguments for one call of `p`: outputs nobody needs are null, and so are the partials then.
template <typename scalar_t>
FeedbackStepArgs<scalar_t> feedback_args(const FeedbackStepParams& p) {
  FeedbackStepArgs<scalar_t> a{};
  a.h = device_ptr<const scalar_t>(p.h);
  a.f = device_ptr<const scalar_t>(p.f);
  a.decay = device_ptr<const scalar_t>(p.decay);
  a.h_next = device_ptr<scalar_t>(p.h_next);
  a.v = device_ptr<scalar_t>(p.v);
  a.grad_h_next = device_ptr<const scalar_t>(p.grad_h_next);
  a.grad_v = device_ptr<const scalar_t>(p.grad_v);
  a.grad_h = p.need_grad_h ? device_ptr<scalar_t>(p.grad_h) : nullptr;
  a.grad_f = p.need_grad_f ? device_ptr<scalar_t>(p.grad_f) : nullptr;
  a.grad_decay = p.need_grad_decay ? device_ptr<scalar_t>(p.grad_decay) : nullptr;
  a.partials = p.need_grad_decay ? device_ptr<acc_t_of<scalar_t>>(p.partials) : nullptr;
  a.B = p.B;
  a.d = p.d;
  a.N = p.N;
  a.k = p.k;
  return a;
}

// Sets a's tiling for tiles of `tile_positions` positions and returns the grid that strides over them.
template <typename scalar_t>
unsigned tile_grid(FeedbackStepArgs<scalar_t>& a, int64_t tile_positions) {
  a.tiles_per_batch = ceil_div(a.N, tile_positions);
  a.num_tiles = a.B * a.tiles_per_batch;
  return static_cast<unsigned>(std::min(a.num_tiles, kMaxGridBlocks));
}

template <typename scalar_t>
void launch_forward(FeedbackStepArgs<scalar_t> a, cudaStream_t stream) {
  const bool small = dispatch_channel_bucket<kForwardSmallMaxD>(a.d, [&](auto dmax) {
    constexpr int DMAX = decltype(dmax)::value;
    constexpr int VEC = ForwardVec<scalar_t, DMAX>::value;
    constexpr std::size_t kBytes = sizeof(scalar_t) * VEC;
    // 16-byte (VEC-wide) accesses need every row start aligned: N a multiple of VEC and aligned base pointers.
    const bool vectorised = VEC > 1 && a.N % VEC == 0 && is_aligned(a.h, kBytes) && is_aligned(a.f, kBytes) &&
                            is_aligned(a.h_next, kBytes) && is_aligned(a.v, kBytes);
    if (vectorised) {
      const unsigned grid = tile_grid(a, int64_t(kForwardThreads) * VEC);
      feedback_forward_small_kernel<scalar_t, DMAX, VEC><<<grid, kForwardThreads, 0, stream>>>(
          a.h, a.f, a.decay, a.h_next, a.v, a.d, a.N, a.k, a.tiles_per_batch, a.num_tiles);
    } else {
      const unsigned grid = tile_grid(a, kForwardThreads);
      feedback_forward_small_kernel<scalar_t, DMAX, 1><<<grid, kForwardThreads, 0, stream>>>(
          a.h, a.f, a.decay, a.h_next, a.v, a.d, a.N, a.k, a.tiles_per_batch, a.num_tiles);
    }
    check_launch("feedback_forward_small_kernel");
  });
  if (!small) {
    const unsigned grid = tile_grid(a, kGenericForwardThreads);
    feedback_forward_generic_kernel<scalar_t><<<grid, kGenericForwardThreads, 0, stream>>>(
        a.h, a.f, a.decay, a.h_next, a.v, a.d, a.N, a.k, a.tiles_per_batch, a.num_tiles);
    check_launch("feedback_forward_generic_kernel");
  }
}

template <typename scalar_t>
void launch_backward(FeedbackStepArgs<scalar_t> a, cudaStream_t stream) {
  constexpr int T = BackwardThreads<acc_t_of<scalar_t>>::value;
  a.tiles_per_batch = ceil_div(a.N, T);
  a.num_tiles = a.B * a.tiles_per_batch;
  // One block per partial (even with no positions: its partial is then zero, and so is grad_decay).
  const auto grid = static_cast<unsigned>(a.num_partials);
  const bool small = dispatch_channel_bucket<kBackwardSmallMaxD>(a.d, [&](auto dmax) {
    feedback_backward_small_kernel<scalar_t, decltype(dmax)::value><<<grid, T, 0, stream>>>(
        a.grad_h_next, a.grad_v, a.f, a.v, a.decay, a.grad_h, a.grad_f, a.partials, a.d, a.N, a.k, a.tiles_per_batch,
        a.num_tiles);
    check_launch("feedback_backward_small_kernel");
  });
  if (!small) {
    feedback_backward_generic_kernel<scalar_t><<<grid, T, 0, stream>>>(
        a.grad_h_next, a.grad_v, a.f, a.v, a.decay, a.grad_h, a.grad_f, a.partials, a.d, a.N, a.k, a.tiles_per_batch,
        a.num_tiles);
    check_launch("feedback_backward_generic_kernel");
  }
  if (a.grad_decay == nullptr) return;
  const auto reduce_grid = static_cast<unsigned>(ceil_div(a.d * a.d, kReduceX));
  reduce_partials_kernel<scalar_t><<<reduce_grid, dim3(kReduceX, kReduceY), 0, stream>>>(
      a.partials, a.grad_decay, a.num_partials, a.d * a.d);
  check_launch("reduce_partials_kernel");
}

}  // namespace

int64_t feedback_step_num_partials(const FeedbackStepParams& p) {
  const char* op = "feedback_step_num_partials";
  require(p.B >= 0 && p.N >= 0, op,
          "B and N must be >= 0, got B=" + std::to_string(p.B) + ", N=" + std::to_string(p.N));
  require(p.d >= 1 && p.d <= 46340, op, "d must be in 1..46340, got " + std::to_string(p.d));
  // Tiles of the 4-byte-accumulator kernels; double uses half-size tiles, so it has at least as many tiles as
  // blocks too and no block is left without work.
  const int64_t tiles = p.B * ceil_div(p.N, kPartialTilePositions);
  const int64_t budget = std::max<int64_t>(1, kMaxPartialElements / (p.d * p.d));
  const int64_t blocks = std::min({tiles, resident_backward_blocks(p.d), budget});
  return std::max<int64_t>(1, blocks);
}

void feedback_step_forward(const FeedbackStepParams& p) {
  const char* op = "feedback_step_forward";
  check_feedback_sizes(op, p.B, p.d, p.N, p.k);
  if (p.B == 0 || p.N == 0) return;
  require(p.h && p.f && p.decay && p.h_next && p.v, op, "null data pointer");
  dispatch_dtype(p.dtype, op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    launch_forward(feedback_args<scalar_t>(p), as_stream(p.stream));
  });
}

void feedback_step_backward(const FeedbackStepParams& p) {
  const char* op = "feedback_step_backward";
  check_feedback_sizes(op, p.B, p.d, p.N, p.k);
  require(p.decay != 0, op, "null decay pointer");
  if (p.B > 0 && p.N > 0) require(p.f && p.v, op, "null f or v pointer");
  const int64_t state = p.B * p.d * p.N;
  if (p.need_grad_h) check_pointer(p.grad_h, state, op, "grad_h");
  if (p.need_grad_f) check_pointer(p.grad_f, state, op, "grad_f");
  if (p.need_grad_decay) check_pointer(p.grad_decay, p.d * p.d, op, "grad_decay");
  // The grid is one block per partial whether or not grad_decay is wanted.
  const int64_t num_partials = feedback_step_num_partials(p);
  if (p.need_grad_decay) {
    require(p.partials != 0 && p.partials_elements >= num_partials * p.d * p.d, op,
            "the partials workspace must hold feedback_step_num_partials(B, d, N) * d * d = " +
                std::to_string(num_partials * p.d * p.d) + " elements, got " + std::to_string(p.partials_elements) +
                (p.partials == 0 ? " (null pointer)" : ""));
  }
  if (!p.need_grad_h && !p.need_grad_f && !p.need_grad_decay) return;
  dispatch_dtype(p.dtype, op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    FeedbackStepArgs<scalar_t> a = feedback_args<scalar_t>(p);
    a.num_partials = num_partials;
    launch_backward(a, as_stream(p.stream));
  });
}

std::string kernel_image_error() {
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, backward_kernel_for_occupancy(18));
  if (err == cudaSuccess) return std::string();
  cudaGetLastError();  // a missing image is an answer here, not a failure to carry into the next launch
  return cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace fbkernels
