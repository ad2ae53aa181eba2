// Shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) cores: the dtype codes Python passes with every call, and the
// argument checks. Errors are C++ exceptions (pybind11 turns std::invalid_argument into ValueError and
// std::runtime_error into RuntimeError); the cores never exit or abort the interpreter.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace fbkernels {

// Dtype codes sent by fbkernels/_cpp.py and fbkernels/_cuda.py. The values are part of the Python/C++ contract.
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

}  // namespace fbkernels
