// Fused CPU kernels of the CBL context gate, plain C++ templated on the dtype (no torch, no Python).
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
#include "cpu/vector.h"

namespace fbkernels {
namespace cpu {

// Whether a pass writes its output with non-temporal stores (streaming_pays on the bytes it reads and writes): the
// forward reads h and writes out; the backward, when it writes grad_h, reads grad_out and (for the logit gradient)
// h. itemsize: bytes per element of p.dtype.
inline bool context_gate_streams(const ContextGateParams& p, bool backward, int64_t itemsize) {
  const int64_t maps = backward ? (p.need_grad_h ? 2 + (p.need_grad_gate_logits ? 1 : 0) : 0) : 2;
  return maps > 0 && streaming_pays(maps * p.B * p.C * p.N * itemsize);
}

namespace detail {

// Elements per task (rows are grouped until they reach it): below this, waking a second thread costs more than it
// saves.
constexpr int64_t kGateElementsPerTask = 1 << 15;

// Overflow-free logistic function: exp of a non-positive number only.
template <typename T>
inline T stable_sigmoid(T a) {
  if (a >= T(0)) return T(1) / (T(1) + std::exp(-a));
  const T e = std::exp(a);  // also reached by NaN, which propagates
  return e / (T(1) + e);
}

// gate[r] = sigmoid(logits[r]) for r < count. Float runs whole vectors through exp_nonpositive (within 2 ulp of
// expf; one expf per row cost a fifth of the forward at the CBL-CNN map 128x128x8x8, whose rows are 64 long), the
// rest through stable_sigmoid. Both take exp of -|a| only; NaN propagates.
template <typename T>
inline void sigmoid_rows(const T* __restrict logits, int64_t count, T* __restrict gate) {
  int64_t r = 0;
  if constexpr (std::is_same_v<T, float>) {
    using V = vec_t<float>;
    constexpr int64_t L = kLanes<float>;
    const V zero = {}, one = zero + 1.0f;
    for (; r + L <= count; r += L) {
      const V a = load_vector<float>(logits + r);
      const V e = exp_nonpositive(a < zero ? a : zero - a);  // exp(-|a|)
      store_vector<float>(gate + r, a >= zero ? one / (one + e) : e / (one + e));
    }
  }
  for (; r < count; ++r) gate[r] = stable_sigmoid(logits[r]);
}

// Runs row_fn(row, sigmoid(logits[row])) for every row in [0, rows), in tasks of about kGateElementsPerTask
// elements, each task computing its rows' sigmoids first (into per-thread scratch); returns the number of threads
// that ran it.
template <typename T, typename RowFn>
int64_t for_each_row(int64_t rows, int64_t row_length, int64_t num_threads, bool stream, const T* logits,
                     const RowFn& row_fn) {
  const int64_t rows_per_task = std::max<int64_t>(1, kGateElementsPerTask / std::max<int64_t>(1, row_length));
  const int64_t num_tasks = (rows + rows_per_task - 1) / rows_per_task;
  return parallel_for(num_tasks, num_threads, [&](int64_t task) {
    const int64_t begin = task * rows_per_task, end = std::min(rows, begin + rows_per_task);
    T* gates = thread_scratch<T>(end - begin);
    sigmoid_rows(logits + begin, end - begin, gates);
    for (int64_t row = begin; row < end; ++row) row_fn(row, gates[row - begin]);
    finish_streaming(stream);
  });
}

// h * scale into out[0:len], through non-temporal stores with `stream` (see write_row_map).
template <typename T>
inline void scale_row(T* __restrict out, const T* __restrict h, T scale, int64_t len, bool stream) {
  write_row_map(out, len, stream, [scale](auto x) { return x * scale; }, h);
}

}  // namespace detail

// out = h * (alpha + (1 - alpha) * sigmoid(gate_logits)) per row. Returns the number of threads that ran it.
template <typename T>
int64_t context_gate_forward(const ContextGateParams& p) {
  const T* h = reinterpret_cast<const T*>(p.h);
  const T* gate_logits = reinterpret_cast<const T*>(p.gate_logits);
  T* out = reinterpret_cast<T*>(p.out);
  const int64_t N = p.N;
  const T blend = static_cast<T>(p.alpha);
  const bool stream = context_gate_streams(p, /*backward=*/false, sizeof(T));
  prepare_output(out, p.B * p.C * N * static_cast<int64_t>(sizeof(T)), p.num_threads);
  return detail::for_each_row(p.B * p.C, N, p.num_threads, stream, gate_logits, [&](int64_t row, T gate) {
    const T scale = blend + (T(1) - blend) * gate;
    detail::scale_row(out + row * N, h + row * N, scale, N, stream);
  });
}

// Backward of context_gate_forward: writes grad_h and grad_gate_logits where p.need_* is set. Returns the number of
// threads that ran it.
template <typename T>
int64_t context_gate_backward(const ContextGateParams& p) {
  const T* grad_out = reinterpret_cast<const T*>(p.grad_out);
  const T* h = reinterpret_cast<const T*>(p.h);
  const T* gate_logits = reinterpret_cast<const T*>(p.gate_logits);
  T* grad_h = reinterpret_cast<T*>(p.grad_h);
  T* grad_gate_logits = reinterpret_cast<T*>(p.grad_gate_logits);
  const int64_t N = p.N;
  if (!p.need_grad_h && !p.need_grad_gate_logits) return 1;
  constexpr int64_t W = kTileWidth<T>;
  const T blend = static_cast<T>(p.alpha);
  const bool stream = context_gate_streams(p, /*backward=*/true, sizeof(T));
  if (p.need_grad_h) prepare_output(grad_h, p.B * p.C * N * static_cast<int64_t>(sizeof(T)), p.num_threads);
  return detail::for_each_row(p.B * p.C, N, p.num_threads, stream, gate_logits, [&](int64_t row, T gate) {
    const T* __restrict g_row = grad_out + row * N;
    if (p.need_grad_h) {
      const T scale = blend + (T(1) - blend) * gate;
      detail::scale_row(grad_h + row * N, g_row, scale, N, stream);
    }
    if (p.need_grad_gate_logits) {
      // sum_n g * h in W lanes (vectorises without reassociation), reduced in a fixed order.
      const T* __restrict h_row = h + row * N;
      T lanes[W] = {};
      const int64_t whole = N / W * W;
      for (int64_t t = 0; t < whole; t += W)
        for (int64_t l = 0; l < W; ++l) lanes[l] += g_row[t + l] * h_row[t + l];
      for (int64_t n = whole; n < N; ++n) lanes[n - whole] += g_row[n] * h_row[n];
      for (int64_t width = W / 2; width > 0; width /= 2)
        for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
      grad_gate_logits[row] = (T(1) - blend) * gate * (T(1) - gate) * lanes[0];
    }
  });
}

}  // namespace cpu
}  // namespace fbkernels
