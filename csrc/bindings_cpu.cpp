// pybind11 bindings of the CPU kernels: module fbkernels._C. Called by fbkernels/_cpp.py with data pointers (ints from
// tensor.data_ptr() of contiguous tensors made in Python), sizes, a dtype code (0=float32, 1=float64; the CPU
// kernels support only these) and a thread count. The GIL is released while the kernels run.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.h"
#include "cpu/context_gate.h"
#include "cpu/feedback_step.h"

namespace py = pybind11;

namespace fbkernels {
namespace {

// Calls kernel(scalar_t{}) with the C++ type of `dtype_code`; float16/bfloat16 are GPU-only.
template <typename Kernel>
void dispatch_cpu_dtype(int64_t dtype_code, const char* op, const Kernel& kernel) {
  switch (dtype_from_code(dtype_code)) {
    case kFloat32: kernel(float{}); return;
    case kFloat64: kernel(double{}); return;
    default:
      throw std::invalid_argument(concat(op, ": dtype ", dtype_name(dtype_code),
                                         " is not supported by the CPU kernels (float32 or float64)"));
  }
}

template <typename T>
T* typed(uintptr_t ptr) {
  return reinterpret_cast<T*>(ptr);
}

void check_threads(const char* op, int64_t num_threads) {
  check_argument(num_threads >= 1, op, ": num_threads must be >= 1, got ", num_threads);
}

void feedback_step_forward(uintptr_t h, uintptr_t f, uintptr_t decay, uintptr_t h_next, uintptr_t v, int64_t B,
                           int64_t d, int64_t N, int64_t k, int64_t dtype, int64_t num_threads) {
  constexpr const char* op = "feedback_step_forward";
  check_feedback_step_sizes(op, B, d, N, k);
  check_threads(op, num_threads);
  const int64_t state = B * d * N;
  check_pointer(h, state, op, "h");
  check_pointer(f, state, op, "f");
  check_pointer(decay, d * d, op, "decay");
  check_pointer(h_next, state, op, "h_next");
  check_pointer(v, B * k * N, op, "v");
  dispatch_cpu_dtype(dtype, op, [&](auto tag) {
    using scalar_t = decltype(tag);
    cpu::feedback_step_forward<scalar_t, scalar_t>(typed<const scalar_t>(h), typed<const scalar_t>(f),
                                                   typed<const scalar_t>(decay), typed<scalar_t>(h_next),
                                                   typed<scalar_t>(v), B, d, N, k, num_threads);
  });
}

void feedback_step_backward(uintptr_t grad_h, uintptr_t grad_v, uintptr_t f, uintptr_t v, uintptr_t decay,
                            uintptr_t grad_h_in, uintptr_t grad_f, uintptr_t grad_decay, uintptr_t partials,
                            int64_t B, int64_t d, int64_t N, int64_t k, int64_t dtype, int64_t num_threads) {
  constexpr const char* op = "feedback_step_backward";
  check_feedback_step_sizes(op, B, d, N, k);
  check_threads(op, num_threads);
  const int64_t state = B * d * N;
  check_pointer(f, state, op, "f");
  check_pointer(v, B * k * N, op, "v");
  check_pointer(decay, d * d, op, "decay");
  check_pointer(grad_h_in, state, op, "grad_h_in");
  check_pointer(grad_f, state, op, "grad_f");
  check_pointer(grad_decay, d * d, op, "grad_decay");
  check_pointer(partials, cpu::feedback_step_num_partials(B, N) * d * d, op, "partials");
  dispatch_cpu_dtype(dtype, op, [&](auto tag) {
    using scalar_t = decltype(tag);
    // A zero pointer means the gradient is absent (zero); for empty tensors it is skipped either way.
    cpu::feedback_step_backward<scalar_t, scalar_t>(
        grad_h == 0 ? nullptr : typed<const scalar_t>(grad_h), grad_v == 0 ? nullptr : typed<const scalar_t>(grad_v),
        typed<const scalar_t>(f), typed<const scalar_t>(v), typed<const scalar_t>(decay), typed<scalar_t>(grad_h_in),
        typed<scalar_t>(grad_f), typed<scalar_t>(grad_decay), typed<scalar_t>(partials), B, d, N, k, num_threads);
  });
}

void context_gate_forward(uintptr_t h, uintptr_t gate_logits, uintptr_t out, int64_t B, int64_t C, int64_t N,
                          double alpha, int64_t dtype, int64_t num_threads) {
  constexpr const char* op = "context_gate_forward";
  check_context_gate_sizes(op, B, C, N, alpha);
  check_threads(op, num_threads);
  check_pointer(h, B * C * N, op, "h");
  check_pointer(gate_logits, B * C, op, "gate_logits");
  check_pointer(out, B * C * N, op, "out");
  dispatch_cpu_dtype(dtype, op, [&](auto tag) {
    using scalar_t = decltype(tag);
    cpu::context_gate_forward<scalar_t, scalar_t>(typed<const scalar_t>(h), typed<const scalar_t>(gate_logits),
                                                  typed<scalar_t>(out), B, C, N, alpha, num_threads);
  });
}

void context_gate_backward(uintptr_t grad_out, uintptr_t h, uintptr_t gate_logits, uintptr_t grad_h,
                           uintptr_t grad_gate_logits, int64_t B, int64_t C, int64_t N, double alpha, int64_t dtype,
                           int64_t num_threads) {
  constexpr const char* op = "context_gate_backward";
  check_context_gate_sizes(op, B, C, N, alpha);
  check_threads(op, num_threads);
  check_pointer(grad_out, B * C * N, op, "grad_out");
  check_pointer(h, B * C * N, op, "h");
  check_pointer(gate_logits, B * C, op, "gate_logits");
  check_pointer(grad_h, B * C * N, op, "grad_h");
  check_pointer(grad_gate_logits, B * C, op, "grad_gate_logits");
  dispatch_cpu_dtype(dtype, op, [&](auto tag) {
    using scalar_t = decltype(tag);
    cpu::context_gate_backward<scalar_t, scalar_t>(
        typed<const scalar_t>(grad_out), typed<const scalar_t>(h), typed<const scalar_t>(gate_logits),
        typed<scalar_t>(grad_h), typed<scalar_t>(grad_gate_logits), B, C, N, alpha, num_threads);
  });
}

}  // namespace
}  // namespace fbkernels

// One source, two modules (CMakeLists.txt): fbkernels._C for any CPU, fbkernels._C_avx2 built with AVX2 + FMA.
#ifndef FBKERNELS_CPU_MODULE
#define FBKERNELS_CPU_MODULE _C
#endif

PYBIND11_MODULE(FBKERNELS_CPU_MODULE, m) {
  using namespace fbkernels;
  using py::arg;
  m.doc() = "fbkernels CPU kernels (feedback step, context gate) on raw pointers of contiguous tensors";
  const auto release_gil = py::call_guard<py::gil_scoped_release>();

  m.def("feedback_step_forward", &feedback_step_forward, release_gil,
        "h_next = h + decay @ f per position, v = softmax of h_next's last k channels. h, f, h_next: [B, d, N]; "
        "v: [B, k, N]; decay: [d, d].",
        arg("h"), arg("f"), arg("decay"), arg("h_next"), arg("v"), arg("B"), arg("d"), arg("N"), arg("k"),
        arg("dtype"), arg("num_threads"));
  m.def(
      "feedback_step_num_partials", [](int64_t B, int64_t N) { return cpu::feedback_step_num_partials(B, N); },
      "Number of [d, d] grad_decay partials (workspace rows) feedback_step_backward needs; depends on B and N only.",
      arg("B"), arg("N"));
  m.def("feedback_step_backward", &feedback_step_backward, release_gil,
        "Backward of feedback_step_forward; grad_h / grad_v may be 0 (absent). partials: workspace of "
        "feedback_step_num_partials(B, N) * d * d elements of the tensors' dtype. grad_decay is bitwise identical "
        "for any num_threads.",
        arg("grad_h"), arg("grad_v"), arg("f"), arg("v"), arg("decay"), arg("grad_h_in"), arg("grad_f"),
        arg("grad_decay"), arg("partials"), arg("B"), arg("d"), arg("N"), arg("k"), arg("dtype"),
        arg("num_threads"));
  m.def("context_gate_forward", &context_gate_forward, release_gil,
        "out = alpha * h + (1 - alpha) * h * sigmoid(gate_logits). h, out: [B, C, N]; gate_logits: [B, C].",
        arg("h"), arg("gate_logits"), arg("out"), arg("B"), arg("C"), arg("N"), arg("alpha"), arg("dtype"),
        arg("num_threads"));
  m.def("context_gate_backward", &context_gate_backward, release_gil,
        "Backward of context_gate_forward: writes grad_h [B, C, N] and grad_gate_logits [B, C].", arg("grad_out"),
        arg("h"), arg("gate_logits"), arg("grad_h"), arg("grad_gate_logits"), arg("B"), arg("C"), arg("N"),
        arg("alpha"), arg("dtype"), arg("num_threads"));
}
