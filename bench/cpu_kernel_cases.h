// What the two kernel drivers share (bench/cpu_kernel_driver.cpp, bench/cpu_kernel_ab.cpp): one op's float32
// inputs (random-free and deterministic) and one call of its kernel into given outputs, for any set of CPU kernels.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common.h"

namespace fbkernels {
namespace bench {

// A set of CPU kernels as a type (a namespace cannot be a template argument): KERNELS_OF(Current, cpu) makes
// `Current`, whose members call cpu::feedback_step_forward<float> and the others.
#define KERNELS_OF(name, ns)                                                                                     \
  struct name {                                                                                                  \
    static void feedback_step_forward(const FeedbackStepParams& p) { ns::feedback_step_forward<float>(p); }     \
    static void feedback_step_backward(const FeedbackStepParams& p) { ns::feedback_step_backward<float>(p); }   \
    static void context_gate_forward(const ContextGateParams& p) { ns::context_gate_forward<float>(p); }        \
    static void context_gate_backward(const ContextGateParams& p) { ns::context_gate_backward<float>(p); }      \
  }

inline bool known_op(const std::string& op) {
  return op == "feedback_step_forward" || op == "feedback_step_backward" || op == "context_gate_forward" ||
         op == "context_gate_backward";
}

inline std::vector<float> pattern(size_t n, int period, float scale) {
  std::vector<float> values(n);
  for (size_t i = 0; i < n; ++i) values[i] = static_cast<float>(static_cast<int>(i % period) - period / 2) * scale;
  return values;
}

// The inputs of `op` at [B, C, N] (C = d for feedback_step, k = 2, every gradient asked for; alpha 0 for
// context_gate), and the sizes of its two outputs.
struct OpInputs {
  std::string op;
  int64_t B, C, N, threads;
  static constexpr int64_t k = 2;
  std::vector<float> x, y, g, matrix, logits, v, grad_v;

  OpInputs(std::string op_name, int64_t B_, int64_t C_, int64_t N_, int64_t threads_)
      : op(std::move(op_name)), B(B_), C(C_), N(N_), threads(threads_) {
    const size_t state = this->state();
    x = pattern(state, 97, 0.02f), y = pattern(state, 89, 0.03f), g = pattern(state, 13, 0.1f);
    matrix = pattern(static_cast<size_t>(C * C), 7, 0.05f), logits = pattern(static_cast<size_t>(B * C), 5, 0.5f);
    v.assign(static_cast<size_t>(B * k * N), 0.5f), grad_v = pattern(static_cast<size_t>(B * k * N), 7, 0.1f);
  }
  size_t state() const { return static_cast<size_t>(B * C * N); }
  // Elements of the outputs: first (h_next, grad_h, out), second (v, grad_f, grad_gate_logits; none for
  // context_gate_forward) and small (grad_decay of feedback_step_backward).
  size_t first_size() const { return state(); }
  size_t second_size() const {
    if (op == "feedback_step_forward") return static_cast<size_t>(B * k * N);
    if (op == "feedback_step_backward") return state();
    return op == "context_gate_backward" ? static_cast<size_t>(B * C) : 0;
  }
  size_t small_size() const { return op == "feedback_step_backward" ? static_cast<size_t>(C * C) : 0; }

  // One call of this op's kernel from `Kernels`, writing `first`, `second` (and `small`: grad_decay).
  template <typename Kernels>
  void call(float* first, float* second, float* small) const {
    const auto ptr = [](const void* data) { return reinterpret_cast<uintptr_t>(data); };
    if (op == "feedback_step_forward" || op == "feedback_step_backward") {
      FeedbackStepParams p;
      p.B = B, p.d = C, p.N = N, p.k = k, p.num_threads = threads;
      p.f = ptr(y.data()), p.decay = ptr(matrix.data());
      if (op == "feedback_step_forward") {
        p.h = ptr(x.data()), p.h_next = ptr(first), p.v = ptr(second);
        Kernels::feedback_step_forward(p);
      } else {
        p.v = ptr(v.data()), p.grad_h_next = ptr(g.data()), p.grad_v = ptr(grad_v.data());
        p.grad_h = ptr(first), p.grad_f = ptr(second), p.grad_decay = ptr(small);
        Kernels::feedback_step_backward(p);
      }
    } else {
      ContextGateParams p;
      p.B = B, p.C = C, p.N = N, p.alpha = 0.0, p.num_threads = threads;
      p.h = ptr(x.data()), p.gate_logits = ptr(logits.data());
      if (op == "context_gate_forward") {
        p.out = ptr(first);
        Kernels::context_gate_forward(p);
      } else {
        p.grad_out = ptr(g.data()), p.grad_h = ptr(first), p.grad_gate_logits = ptr(second);
        Kernels::context_gate_backward(p);
      }
    }
  }
};

// The OpInputs that argv[1..5] name (OP B C N THREADS), or none after printing the usage, whose options after
// THREADS are `options`.
inline std::optional<OpInputs> op_inputs_from_args(int argc, char** argv, const char* options) {
  if (argc < 6 || !known_op(argv[1])) {
    std::fprintf(stderr, "usage: %s OP B C N THREADS %s\n", argv[0], options);
    return std::nullopt;
  }
  return OpInputs(argv[1], std::atol(argv[2]), std::atol(argv[3]), std::atol(argv[4]), std::atol(argv[5]));
}

inline double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace bench
}  // namespace fbkernels
