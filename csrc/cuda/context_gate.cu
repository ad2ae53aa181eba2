// Context-gate kernels (CBL-CNN top-down gating), forward and backward, for float, double, half and bfloat16
// tensors h [B, C, N] (N contiguous) with gate logits a [B, C]; fp32 accumulation (fp64 for double).
//
//   forward:  out = alpha * h + (1 - alpha) * h * s,   s = sigmoid(a[b, c]) broadcast over n
//   backward: grad_h = grad_out * (alpha + (1 - alpha) * s)
//             grad_a[b, c] = (1 - alpha) * s * (1 - s) * sum_n grad_out[b, c, n] * h[b, c, n]
//
// Each of the B*C rows is handled by a group of `tpr` threads (a power of two, 1..512, chosen from N so a thread
// gets a few 16-byte packs): the gate is computed once per row, the group strides over the row with coalesced
// VEC-wide accesses, and in the backward it reduces its sum with warp shuffles (plus shared memory when the group
// spans several warps) in a fixed order, so grad_a is deterministic and needs no workspace or atomics.
// The formulas mirror fbkernels/_reference.py term by term, so NaN/Inf behave as there.
#include <algorithm>
#include <utility>

#include "cuda/utils.cuh"

namespace fbkernels {
namespace cuda {
namespace {

using namespace detail;

constexpr int kGateBlockThreads = 256;
constexpr int kMaxThreadsPerRow = 512;
constexpr int kPacksPerThread = 4;  // target work per thread when choosing the group size

struct RowLayout {
  int threads_per_row;  // power of two
  int block_threads;    // multiple of 32, multiple of threads_per_row
  int64_t row_blocks;   // ceil(rows / rows per block)
};

RowLayout row_layout(int64_t rows, int64_t packs_per_row) {
  const int64_t wanted = ceil_div(std::max<int64_t>(packs_per_row, 1), kPacksPerThread);
  int tpr = 1;
  while (tpr < wanted && tpr < kMaxThreadsPerRow) tpr *= 2;
  RowLayout layout;
  layout.threads_per_row = tpr;
  layout.block_threads = std::max(kGateBlockThreads, tpr);
  layout.row_blocks = ceil_div(rows, layout.block_threads / tpr);
  return layout;
}

// One call's arguments as the kernels take them: typed pointers (null for a gradient nobody needs), sizes, the row
// layout of the launch and alpha in the accumulation type. Built by gate_args from the ContextGateParams. The
// kernels take them as separate `__restrict__` parameters, not as one struct: only so does nvcc keep the inputs'
// loads on the read-only path (ld.global.nc) in the backward.
template <typename scalar_t>
struct ContextGateArgs {
  const scalar_t* h;
  const scalar_t* gate_logits;
  scalar_t* out;
  const scalar_t* grad_out;
  scalar_t* grad_h;
  scalar_t* grad_gate_logits;
  int64_t rows;  // B * C
  int64_t N;
  int threads_per_row;  // RowLayout of the launch
  int64_t row_blocks;
  acc_t_of<scalar_t> alpha, one_minus_alpha;
};

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxThreadsPerRow)
    context_gate_forward_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ gate_logits,
                                scalar_t* __restrict__ out, int64_t rows, int64_t N, int threads_per_row,
                                int64_t row_blocks, acc_t_of<scalar_t> alpha, acc_t_of<scalar_t> one_minus_alpha) {
  using acc_t = acc_t_of<scalar_t>;
  const int rows_per_block = blockDim.x / threads_per_row;
  const int lane = threadIdx.x % threads_per_row;
  const int64_t packs = N / VEC;
  for (int64_t rb = blockIdx.x; rb < row_blocks; rb += gridDim.x) {
    const int64_t row = rb * rows_per_block + threadIdx.x / threads_per_row;
    if (row >= rows) continue;
    const acc_t gate = sigmoid_acc(to_acc(gate_logits[row]));
    const scalar_t* h_row = h + row * N;
    scalar_t* out_row = out + row * N;
#pragma unroll 4
    for (int64_t p = lane; p < packs; p += threads_per_row) {
      acc_t x[VEC], y[VEC];
      load_pack<VEC>(h_row + p * VEC, x);
#pragma unroll
      for (int q = 0; q < VEC; ++q) y[q] = alpha * x[q] + one_minus_alpha * x[q] * gate;
      store_pack<VEC>(out_row + p * VEC, y);
    }
  }
}

// Sum of x over the threads_per_row threads of each row group, returned to the group's first thread (other
// threads get partial sums). Every thread of the block must call it: it shuffles over full warps and, for groups
// wider than a warp, synchronises the block.
template <typename acc_t>
__device__ __forceinline__ acc_t row_group_sum(acc_t x, int threads_per_row, acc_t* warp_sums) {
  const int width = threads_per_row < 32 ? threads_per_row : 32;
  for (int offset = width / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  if (threads_per_row > 32) {  // uniform over the block
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) warp_sums[warp] = x;
    __syncthreads();
    if (threadIdx.x % threads_per_row == 0) {
      const int warps_per_row = threads_per_row / 32;
      x = acc_t(0);
      for (int w = 0; w < warps_per_row; ++w) x += warp_sums[warp + w];
    }
    __syncthreads();  // warp_sums is rewritten by the next row block
  }
  return x;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxThreadsPerRow)
    context_gate_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ h,
                                 const scalar_t* __restrict__ gate_logits, scalar_t* __restrict__ grad_h,
                                 scalar_t* __restrict__ grad_gate_logits, int64_t rows, int64_t N,
                                 int threads_per_row, int64_t row_blocks, acc_t_of<scalar_t> alpha,
                                 acc_t_of<scalar_t> one_minus_alpha) {
  using acc_t = acc_t_of<scalar_t>;
  __shared__ acc_t warp_sums[kMaxThreadsPerRow / 32];
  const int rows_per_block = blockDim.x / threads_per_row;
  const int lane = threadIdx.x % threads_per_row;
  const int64_t packs = N / VEC;
  for (int64_t rb = blockIdx.x; rb < row_blocks; rb += gridDim.x) {  // uniform: every thread reaches the sum
    const int64_t row = rb * rows_per_block + threadIdx.x / threads_per_row;
    const bool active = row < rows;
    acc_t gate = acc_t(0), dot = acc_t(0);
    if (active) {
      gate = sigmoid_acc(to_acc(gate_logits[row]));
      const acc_t scale = alpha + one_minus_alpha * gate;
      const scalar_t* g_row = grad_out + row * N;
      const scalar_t* h_row = h + row * N;
      scalar_t* grad_h_row = grad_h != nullptr ? grad_h + row * N : nullptr;
#pragma unroll 4
      for (int64_t p = lane; p < packs; p += threads_per_row) {
        acc_t g[VEC], x[VEC], y[VEC];
        load_pack<VEC>(g_row + p * VEC, g);
        load_pack<VEC>(h_row + p * VEC, x);
#pragma unroll
        for (int q = 0; q < VEC; ++q) {
          y[q] = g[q] * scale;
          dot += g[q] * x[q];
        }
        if (grad_h != nullptr) store_pack<VEC>(grad_h_row + p * VEC, y);
      }
    }
    if (grad_gate_logits == nullptr) continue;  // uniform: no thread reaches the sum's barriers
    dot = row_group_sum(dot, threads_per_row, warp_sums);
    if (active && lane == 0) {
      grad_gate_logits[row] = from_acc<scalar_t>(one_minus_alpha * gate * (acc_t(1) - gate) * dot);
    }
  }
}

void check_gate_args(const char* op, int64_t B, int64_t C, int64_t N, double alpha) {
  require(B >= 0 && C >= 0 && N >= 0, op,
          "B, C and N must be >= 0, got B=" + std::to_string(B) + ", C=" + std::to_string(C) +
              ", N=" + std::to_string(N));
  require(alpha >= 0.0 && alpha <= 1.0, op, "alpha must be in [0, 1], got " + std::to_string(alpha));
}

// Calls launch(IntTag<VEC>{}) with the widest pack (16 bytes) when N and every pointer allow it, else VEC = 1.
template <typename scalar_t, typename Launch>
void with_pack_width(int64_t N, std::initializer_list<const void*> pointers, Launch&& launch) {
  constexpr int VEC = static_cast<int>(16 / sizeof(scalar_t));
  bool vectorised = N % VEC == 0;
  for (const void* p : pointers) vectorised = vectorised && is_aligned(p, sizeof(scalar_t) * VEC);
  if (vectorised) {
    launch(IntTag<VEC>{});
  } else {
    launch(IntTag<1>{});
  }
}

template <typename scalar_t>
ContextGateArgs<scalar_t> gate_args(const ContextGateParams& p) {
  using acc_t = acc_t_of<scalar_t>;
  ContextGateArgs<scalar_t> a{};
  a.h = device_ptr<const scalar_t>(p.h);
  a.gate_logits = device_ptr<const scalar_t>(p.gate_logits);
  a.out = device_ptr<scalar_t>(p.out);
  a.grad_out = device_ptr<const scalar_t>(p.grad_out);
  a.grad_h = p.need_grad_h ? device_ptr<scalar_t>(p.grad_h) : nullptr;
  a.grad_gate_logits = p.need_grad_gate_logits ? device_ptr<scalar_t>(p.grad_gate_logits) : nullptr;
  a.rows = p.B * p.C;
  a.N = p.N;
  a.alpha = static_cast<acc_t>(p.alpha);
  a.one_minus_alpha = static_cast<acc_t>(1.0 - p.alpha);
  return a;
}

// Sets a's row layout for VEC-wide packs and returns the launch's grid size and block size.
template <int VEC, typename scalar_t>
std::pair<unsigned, int> row_grid(ContextGateArgs<scalar_t>& a) {
  const RowLayout layout = row_layout(a.rows, a.N / VEC);
  a.threads_per_row = layout.threads_per_row;
  a.row_blocks = layout.row_blocks;
  return {static_cast<unsigned>(std::min(layout.row_blocks, kMaxGridBlocks)), layout.block_threads};
}

}  // namespace

void context_gate_forward(const ContextGateParams& p) {
  const char* op = "context_gate_forward";
  check_gate_args(op, p.B, p.C, p.N, p.alpha);
  if (p.B * p.C == 0 || p.N == 0) return;
  require(p.h && p.gate_logits && p.out, op, "null data pointer");
  dispatch_dtype(p.dtype, op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    ContextGateArgs<scalar_t> a = gate_args<scalar_t>(p);
    with_pack_width<scalar_t>(p.N, {a.h, a.out}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const auto [grid, block] = row_grid<VEC>(a);
      context_gate_forward_kernel<scalar_t, VEC><<<grid, block, 0, as_stream(p.stream)>>>(
          a.h, a.gate_logits, a.out, a.rows, a.N, a.threads_per_row, a.row_blocks, a.alpha, a.one_minus_alpha);
      check_launch("context_gate_forward_kernel");
    });
  });
}

void context_gate_backward(const ContextGateParams& p) {
  const char* op = "context_gate_backward";
  check_gate_args(op, p.B, p.C, p.N, p.alpha);
  if (p.B * p.C == 0) return;
  if (!p.need_grad_h && !p.need_grad_gate_logits) return;
  if (p.need_grad_h) check_pointer(p.grad_h, p.B * p.C * p.N, op, "grad_h");
  if (p.need_grad_gate_logits) check_pointer(p.grad_gate_logits, p.B * p.C, op, "grad_gate_logits");
  // With N == 0 the kernel still runs: grad_gate_logits is (1 - alpha) * s * (1 - s) * 0, as in the reference.
  require(p.gate_logits != 0, op, "null gate_logits pointer");
  if (p.N > 0) require(p.grad_out && p.h, op, "null grad_out or h pointer");
  dispatch_dtype(p.dtype, op, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    ContextGateArgs<scalar_t> a = gate_args<scalar_t>(p);
    with_pack_width<scalar_t>(p.N, {a.grad_out, a.h, a.grad_h != nullptr ? a.grad_h : a.h}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const auto [grid, block] = row_grid<VEC>(a);
      context_gate_backward_kernel<scalar_t, VEC><<<grid, block, 0, as_stream(p.stream)>>>(
          a.grad_out, a.h, a.gate_logits, a.grad_h, a.grad_gate_logits, a.rows, a.N, a.threads_per_row,
          a.row_blocks, a.alpha, a.one_minus_alpha);
      check_launch("context_gate_backward_kernel");
    });
  });
}

}  // namespace cuda
}  // namespace fbkernels
