// pybind11 bindings of the CPU kernels: module fbkernels._C (and _C_avx2 and _C_avx512, the same source built for
// AVX2 + FMA and for AVX-512). fbkernels/_cpp.py fills one parameter struct per call (csrc/common.h, registered by
// csrc/params_binding.h: data pointers of contiguous tensors it made, sizes, dtype code, thread count, which
// gradients to write) and calls one entry per op and pass. Each entry checks the struct, releases the GIL, runs the
// kernel and returns the number of threads that ran it.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "common.h"
#include "cpu/context_gate.h"
#include "cpu/feedback_step.h"
#include "params_binding.h"

namespace py = pybind11;

namespace fbkernels {
namespace {

// Calls kernel(T{}) with the C++ type of `dtype_code`; float16/bfloat16 are GPU-only.
template <typename Kernel>
int64_t dispatch_cpu_dtype(int64_t dtype_code, const char* op, const Kernel& kernel) {
  switch (dtype_from_code(dtype_code)) {
    case kFloat32: return kernel(float{});
    case kFloat64: return kernel(double{});
    default:
      throw std::invalid_argument(concat(op, ": dtype ", dtype_name(dtype_code),
                                         " is not supported by the CPU kernels (float32 or float64)"));
  }
}

void check_threads(const char* op, int64_t num_threads) {
  check_argument(num_threads >= 1, op, ": num_threads must be >= 1, got ", num_threads);
}

int64_t feedback_step_forward(const FeedbackStepParams& p) {
  constexpr const char* op = "feedback_step_forward";
  check_feedback_step_sizes(op, p.B, p.d, p.N, p.k);
  check_threads(op, p.num_threads);
  const int64_t state = p.B * p.d * p.N;
  check_pointer(p.h, state, op, "h");
  check_pointer(p.f, state, op, "f");
  check_pointer(p.decay, p.d * p.d, op, "decay");
  check_pointer(p.h_next, state, op, "h_next");
  check_pointer(p.v, p.B * p.k * p.N, op, "v");
  py::gil_scoped_release no_gil;
  return dispatch_cpu_dtype(p.dtype, op, [&](auto tag) { return cpu::feedback_step_forward<decltype(tag)>(p); });
}

int64_t feedback_step_backward(const FeedbackStepParams& p) {
  constexpr const char* op = "feedback_step_backward";
  check_feedback_step_sizes(op, p.B, p.d, p.N, p.k);
  check_threads(op, p.num_threads);
  const int64_t state = p.B * p.d * p.N;
  check_pointer(p.v, p.B * p.k * p.N, op, "v");
  check_pointer(p.decay, p.d * p.d, op, "decay");
  if (p.need_grad_h) check_pointer(p.grad_h, state, op, "grad_h");
  if (p.need_grad_f) check_pointer(p.grad_f, state, op, "grad_f");
  if (p.need_grad_decay) {
    check_pointer(p.f, state, op, "f");
    check_pointer(p.grad_decay, p.d * p.d, op, "grad_decay");
  }
  py::gil_scoped_release no_gil;
  return dispatch_cpu_dtype(p.dtype, op, [&](auto tag) { return cpu::feedback_step_backward<decltype(tag)>(p); });
}

int64_t context_gate_forward(const ContextGateParams& p) {
  constexpr const char* op = "context_gate_forward";
  check_context_gate_sizes(op, p.B, p.C, p.N, p.alpha);
  check_threads(op, p.num_threads);
  check_pointer(p.h, p.B * p.C * p.N, op, "h");
  check_pointer(p.gate_logits, p.B * p.C, op, "gate_logits");
  check_pointer(p.out, p.B * p.C * p.N, op, "out");
  py::gil_scoped_release no_gil;
  return dispatch_cpu_dtype(p.dtype, op, [&](auto tag) { return cpu::context_gate_forward<decltype(tag)>(p); });
}

int64_t context_gate_backward(const ContextGateParams& p) {
  constexpr const char* op = "context_gate_backward";
  check_context_gate_sizes(op, p.B, p.C, p.N, p.alpha);
  check_threads(op, p.num_threads);
  check_pointer(p.grad_out, p.B * p.C * p.N, op, "grad_out");
  check_pointer(p.gate_logits, p.B * p.C, op, "gate_logits");
  if (p.need_grad_h) check_pointer(p.grad_h, p.B * p.C * p.N, op, "grad_h");
  if (p.need_grad_gate_logits) {
    check_pointer(p.h, p.B * p.C * p.N, op, "h");
    check_pointer(p.grad_gate_logits, p.B * p.C, op, "grad_gate_logits");
  }
  py::gil_scoped_release no_gil;
  return dispatch_cpu_dtype(p.dtype, op, [&](auto tag) { return cpu::context_gate_backward<decltype(tag)>(p); });
}

// Bytes per element of a dtype the CPU kernels take.
int64_t cpu_itemsize(int64_t dtype_code, const char* op) {
  return dispatch_cpu_dtype(dtype_code, op, [](auto tag) { return static_cast<int64_t>(sizeof(tag)); });
}

}  // namespace
}  // namespace fbkernels

#ifndef FBKERNELS_CPU_MODULE
#define FBKERNELS_CPU_MODULE _C
#endif

PYBIND11_MODULE(FBKERNELS_CPU_MODULE, m) {
  using namespace fbkernels;
  m.doc() = "fbkernels CPU kernels (feedback step, context gate) on raw pointers of contiguous tensors";

  bind_params(m);

  m.def("feedback_step_forward", &feedback_step_forward,
        "h_next = h + decay @ f per position, v = softmax of h_next's last k channels; returns the threads used.",
        py::arg("params"));
  m.def("feedback_step_backward", &feedback_step_backward,
        "Backward of feedback_step_forward into grad_h, grad_f, grad_decay (those asked for); bitwise identical for "
        "any num_threads; returns the threads used.",
        py::arg("params"));
  m.def("context_gate_forward", &context_gate_forward,
        "out = alpha * h + (1 - alpha) * h * sigmoid(gate_logits); returns the threads used.", py::arg("params"));
  m.def("context_gate_backward", &context_gate_backward,
        "Backward of context_gate_forward into grad_h, grad_gate_logits (those asked for); returns the threads used.",
        py::arg("params"));
  // Asked before the outputs are allocated (fbkernels/_cpp.py: outputs written with non-temporal stores come from
  // its output cache); pointers need not be set, only the sizes, dtype, upstream gradients given and need_* flags.
  m.def(
      "streams",
      [](const FeedbackStepParams& p, bool backward) {
        return cpu::feedback_step_streams(p, backward, cpu_itemsize(p.dtype, "feedback_step"));
      },
      "Whether the feedback_step pass (backward or forward) writes its outputs with non-temporal stores.",
      py::arg("params"), py::arg("backward"));
  m.def(
      "streams",
      [](const ContextGateParams& p, bool backward) {
        return cpu::context_gate_streams(p, backward, cpu_itemsize(p.dtype, "context_gate"));
      },
      "Whether the context_gate pass (backward or forward) writes its output with non-temporal stores.",
      py::arg("params"), py::arg("backward"));
  m.def("runtime_max_threads", &cpu::runtime_max_threads,
        "omp_get_max_threads() of the OpenMP runtime the kernels run on, in the calling thread (1 without OpenMP).");
}
