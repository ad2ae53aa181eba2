// Fused CPU kernels of the CBL context gate (DESIGN.md section 1.2), plain templated C++ (no torch, no Python).
//
// Layout: h, out, grad_out, grad_h: [B, C, N] contiguous; gate_logits, grad_gate_logits: [B, C]; alpha in [0, 1].
//   forward:  s = sigmoid(a[b,c]);  out = alpha * h + (1 - alpha) * h * s  (computed as h * (alpha + (1 - alpha) s))
//   backward: grad_h = grad_out * (alpha + (1 - alpha) * s);  grad_a = (1 - alpha) s (1 - s) sum_n grad_out * h
// Every (b, c) row is independent; tasks are groups of whole rows, so the per-row sums do not depend on threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.h"
#include "cpu/parallel.h"

namespace fbkernels {
namespace cpu {

namespace detail {

// Elements per task (rows are grouped until they reach it): below this, threads cost more than they save.
constexpr int64_t kGateElementsPerTask = 1 << 15;

// Overflow-free logistic function: exp of a non-positive number only.
template <typename acc_t>
inline acc_t stable_sigmoid(acc_t a) {
  if (a >= acc_t(0)) return acc_t(1) / (acc_t(1) + std::exp(-a));
  const acc_t e = std::exp(a);  // also reached by NaN, which propagates
  return e / (acc_t(1) + e);
}

// Runs row_fn(row) for every row in [0, rows), grouped into tasks of about kGateElementsPerTask elements.
template <typename RowFn>
void for_each_row(int64_t rows, int64_t row_length, int64_t num_threads, const RowFn& row_fn) {
  const int64_t rows_per_task = std::max<int64_t>(1, kGateElementsPerTask / std::max<int64_t>(1, row_length));
  const int64_t num_tasks = (rows + rows_per_task - 1) / rows_per_task;
  parallel_for(num_tasks, num_threads, [&](int64_t task) {
    const int64_t end = std::min(rows, (task + 1) * rows_per_task);
    for (int64_t row = task * rows_per_task; row < end; ++row) row_fn(row);
  });
}

}  // namespace detail

template <typename scalar_t, typename acc_t>
void context_gate_forward(const scalar_t* h, const scalar_t* gate_logits, scalar_t* out, int64_t B, int64_t C,
                          int64_t N, double alpha, int64_t num_threads) {
  check_context_gate_sizes("context_gate_forward", B, C, N, alpha);
  const acc_t blend = static_cast<acc_t>(alpha);
  detail::for_each_row(B * C, N, num_threads, [&](int64_t row) {
    const acc_t gate = detail::stable_sigmoid(static_cast<acc_t>(gate_logits[row]));
    const acc_t scale = blend + (acc_t(1) - blend) * gate;
    const scalar_t* __restrict h_row = h + row * N;
    scalar_t* __restrict out_row = out + row * N;
    for (int64_t n = 0; n < N; ++n) out_row[n] = static_cast<scalar_t>(static_cast<acc_t>(h_row[n]) * scale);
  });
}

template <typename scalar_t, typename acc_t>
void context_gate_backward(const scalar_t* grad_out, const scalar_t* h, const scalar_t* gate_logits, scalar_t* grad_h,
                           scalar_t* grad_gate_logits, int64_t B, int64_t C, int64_t N, double alpha,
                           int64_t num_threads) {
  check_context_gate_sizes("context_gate_backward", B, C, N, alpha);
  constexpr int64_t W = static_cast<int64_t>(64 / sizeof(acc_t));
  const acc_t blend = static_cast<acc_t>(alpha);
  detail::for_each_row(B * C, N, num_threads, [&](int64_t row) {
    const acc_t gate = detail::stable_sigmoid(static_cast<acc_t>(gate_logits[row]));
    const acc_t scale = blend + (acc_t(1) - blend) * gate;
    const scalar_t* __restrict g_row = grad_out + row * N;
    const scalar_t* __restrict h_row = h + row * N;
    scalar_t* __restrict grad_h_row = grad_h + row * N;
    // sum_n g * h in W lanes (vectorises without reassociation), reduced in a fixed order.
    acc_t lanes[W] = {};
    const int64_t whole = N / W * W;
    for (int64_t t = 0; t < whole; t += W) {
      for (int64_t l = 0; l < W; ++l) {
        const acc_t g = static_cast<acc_t>(g_row[t + l]);
        lanes[l] += g * static_cast<acc_t>(h_row[t + l]);
        grad_h_row[t + l] = static_cast<scalar_t>(g * scale);
      }
    }
    for (int64_t n = whole; n < N; ++n) {
      const acc_t g = static_cast<acc_t>(g_row[n]);
      lanes[n - whole] += g * static_cast<acc_t>(h_row[n]);
      grad_h_row[n] = static_cast<scalar_t>(g * scale);
    }
    for (int64_t width = W / 2; width > 0; width /= 2)
      for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
    grad_gate_logits[row] = static_cast<scalar_t>((acc_t(1) - blend) * gate * (acc_t(1) - gate) * lanes[0]);
  });
}

}  // namespace cpu
}  // namespace fbkernels
