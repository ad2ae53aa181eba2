// C entry points over the launchers of csrc/cuda/kernels.h for the emulated build, loaded with ctypes by
// tests/_cuda_emulation.py. Each returns 0, or 1 for std::invalid_argument and 2 for any other exception, with
// the message in fbk_emulation_error().
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/kernels.h"

namespace {

thread_local std::string g_error;

template <typename Fn>
int guarded(Fn&& fn) {
  try {
    fn();
    return 0;
  } catch (const std::invalid_argument& err) {
    g_error = err.what();
    return 1;
  } catch (const std::exception& err) {
    g_error = err.what();
    return 2;
  }
}

}  // namespace

namespace fc = fbkernels::cuda;

extern "C" {

const char* fbk_emulation_error() { return g_error.c_str(); }

int fbk_feedback_step_forward(const void* h, const void* f, const void* decay, void* h_next, void* v, int64_t B,
                              int64_t d, int64_t N, int64_t k, int dtype, void* stream) {
  return guarded([&] {
    fc::feedback_step_forward(h, f, decay, h_next, v, B, d, N, k, dtype, static_cast<cudaStream_t>(stream));
  });
}

int fbk_feedback_step_num_partials(int64_t B, int64_t d, int64_t N, int64_t* out) {
  return guarded([&] { *out = fc::feedback_step_num_partials(B, d, N); });
}

int fbk_feedback_step_backward(const void* grad_h, const void* grad_v, const void* f, const void* v,
                               const void* decay, void* grad_h_in, void* grad_f, void* grad_decay, void* partials,
                               int64_t partials_elements, int64_t B, int64_t d, int64_t N, int64_t k, int dtype,
                               void* stream) {
  return guarded([&] {
    fc::feedback_step_backward(grad_h, grad_v, f, v, decay, grad_h_in, grad_f, grad_decay, partials,
                               partials_elements, B, d, N, k, dtype, static_cast<cudaStream_t>(stream));
  });
}

int fbk_context_gate_forward(const void* h, const void* gate_logits, void* out, int64_t B, int64_t C, int64_t N,
                             double alpha, int dtype, void* stream) {
  return guarded([&] {
    fc::context_gate_forward(h, gate_logits, out, B, C, N, alpha, dtype, static_cast<cudaStream_t>(stream));
  });
}

int fbk_context_gate_backward(const void* grad_out, const void* h, const void* gate_logits, void* grad_h,
                              void* grad_gate_logits, int64_t B, int64_t C, int64_t N, double alpha, int dtype,
                              void* stream) {
  return guarded([&] {
    fc::context_gate_backward(grad_out, h, gate_logits, grad_h, grad_gate_logits, B, C, N, alpha, dtype,
                              static_cast<cudaStream_t>(stream));
  });
}

const char* fbk_kernel_image_error() {
  static thread_local std::string message;
  message = fc::kernel_image_error();
  return message.c_str();
}

}  // extern "C"
