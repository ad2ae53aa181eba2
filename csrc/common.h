// The Python/C++ contract of the compiled kernels, CPU (csrc/cpu) and CUDA (csrc/cuda): dtype codes, one parameter
// struct per op, and the argument checks. No CUDA or torch include: the structs carry data pointers and the CUDA
// stream as integers. Errors are C++ exceptions (pybind11 turns std::invalid_argument into ValueError and
// std::runtime_error into RuntimeError); the kernels never exit or abort the interpreter.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace fbkernels {

// Dtype codes sent by fbkernels/_params.py (the CPU kernels take float32 and float64 only).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline const char* dtype_name(int64_t code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

// Concatenates any streamable arguments into one message (built only when a check fails).
template <typename... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

// Throws std::invalid_argument with the concatenated message when `ok` is false.
template <typename... Parts>
inline void check_argument(bool ok, Parts&&... parts) {
  if (!ok) throw std::invalid_argument(concat(std::forward<Parts>(parts)...));
}

inline DType dtype_from_code(int64_t code) {
  check_argument(code >= kFloat32 && code <= kBFloat16, "fbkernels: unknown dtype code ", code,
                 " (expected 0=float32, 1=float64, 2=float16, 3=bfloat16)");
  return static_cast<DType>(code);
}

// A data pointer may be null only when the tensor has no elements.
inline void check_pointer(uintptr_t ptr, int64_t numel, const char* op, const char* name) {
  check_argument(ptr != 0 || numel == 0, op, ": ", name, " is a null pointer but has ", numel, " elements");
}

// Sizes of feedback_step: state [B, d, N], feedback softmax [B, k, N], decay [d, d].
inline void check_feedback_step_sizes(const char* op, int64_t B, int64_t d, int64_t N, int64_t k) {
  check_argument(B >= 0 && N >= 0, op, ": B and N must be >= 0, got B=", B, ", N=", N);
  check_argument(d >= 1, op, ": d (state channels) must be >= 1, got ", d);
  check_argument(k >= 1 && k <= d, op, ": k (num_feedback) must be in 1..d=", d, ", got ", k);
}

// Sizes of context_gate: feature map [B, C, N], gate logits [B, C], blend factor alpha in [0, 1].
inline void check_context_gate_sizes(const char* op, int64_t B, int64_t C, int64_t N, double alpha) {
  check_argument(B >= 0 && C >= 0 && N >= 0, op, ": B, C and N must be >= 0, got B=", B, ", C=", C, ", N=", N);
  check_argument(alpha >= 0.0 && alpha <= 1.0, op, ": alpha must be in [0, 1], got ", alpha);  // false for NaN
}

// Everything one call of a feedback_step kernel needs, forward or backward, on either device. Pointers are
// data_ptr()s of contiguous tensors of `dtype` (0 where a tensor is absent or not wanted). Sizes: h, f, h_next,
// grad_h_next, grad_h, grad_f: [B, d, N]; v, grad_v: [B, k, N]; decay, grad_decay: [d, d] row-major.
struct FeedbackStepParams {
  int64_t B = 0;  // batch
  int64_t d = 0;  // state channels
  int64_t N = 0;  // positions (product of the spatial dims)
  int64_t k = 0;  // feedback channels: the softmax runs over the last k of the d channels
  int64_t dtype = kFloat32;  // DType code of every tensor
  int64_t num_threads = 1;   // CPU: team size for the parallel loops (torch.get_num_threads()); CUDA: unused
  uintptr_t stream = 0;      // CUDA: the cudaStream_t to launch on (0 = legacy default stream); CPU: unused
  uintptr_t h = 0;           // forward input: the state
  uintptr_t f = 0;           // input of both passes: the decayed feedback term
  uintptr_t decay = 0;       // input of both passes: the channel-mixing matrix M
  uintptr_t h_next = 0;      // forward output: h + M @ f per position
  uintptr_t v = 0;           // forward output, backward input: softmax of h_next's last k channels
  uintptr_t grad_h_next = 0; // backward input: gradient of h_next; 0 means zero
  uintptr_t grad_v = 0;      // backward input: gradient of v; 0 means zero
  uintptr_t grad_h = 0;      // backward output (gradient of h), written only if need_grad_h
  uintptr_t grad_f = 0;      // backward output (gradient of f), written only if need_grad_f
  uintptr_t grad_decay = 0;  // backward output (gradient of M), written only if need_grad_decay
  // CUDA backward with need_grad_decay: workspace for the per-block [d, d] partial sums of grad_decay, float32
  // (float64 when dtype is float64), of at least feedback_step_num_partials(params) * d * d elements; CPU: unused.
  uintptr_t partials = 0;
  int64_t partials_elements = 0;  // elements the partials workspace holds (checked against what the launch needs)
  bool need_grad_h = true, need_grad_f = true, need_grad_decay = true;  // which backward outputs to compute
};

// Everything one call of a context_gate kernel needs, on either device (same conventions). h, out, grad_out,
// grad_h: [B, C, N]; gate_logits, grad_gate_logits: [B, C].
struct ContextGateParams {
  int64_t B = 0;  // batch
  int64_t C = 0;  // channels
  int64_t N = 0;  // positions
  double alpha = 0.0;        // blend factor in [0, 1]: out = alpha * h + (1 - alpha) * h * sigmoid(gate_logits)
  int64_t dtype = kFloat32;  // DType code of every tensor
  int64_t num_threads = 1;   // CPU: team size for the parallel loops; CUDA: unused
  uintptr_t stream = 0;      // CUDA: the cudaStream_t to launch on; CPU: unused
  uintptr_t h = 0;                 // input of both passes
  uintptr_t gate_logits = 0;       // input of both passes
  uintptr_t out = 0;               // forward output
  uintptr_t grad_out = 0;          // backward input
  uintptr_t grad_h = 0;            // backward output, written only if need_grad_h
  uintptr_t grad_gate_logits = 0;  // backward output, written only if need_grad_gate_logits
  bool need_grad_h = true, need_grad_gate_logits = true;
};

}  // namespace fbkernels
