// pybind11 module fbkernels._C_cuda: thin bindings over the CUDA launchers of csrc/cuda/kernels.h.
//
// Tensors cross as data pointers (Python ints from tensor.data_ptr(), 0 for an absent optional tensor), sizes, a
// dtype code (0 float32, 1 float64, 2 float16, 3 bfloat16) and the stream as an int
// (torch.cuda.current_stream(device).cuda_stream). The Python layer (fbkernels/_cuda.py) validates, allocates and
// selects the device; this module never includes torch. Launch errors raise RuntimeError, bad arguments ValueError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cuda/kernels.h"

namespace py = pybind11;
namespace fc = fbkernels::cuda;

namespace {

inline const void* in_ptr(std::uintptr_t address) { return reinterpret_cast<const void*>(address); }
inline void* out_ptr(std::uintptr_t address) { return reinterpret_cast<void*>(address); }
inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fbkernels CUDA kernels (fused feedback step and context gate); called by fbkernels._cuda";
  const auto release_gil = py::call_guard<py::gil_scoped_release>();

  m.def(
      "feedback_step_forward",
      [](std::uintptr_t h, std::uintptr_t f, std::uintptr_t decay, std::uintptr_t h_next, std::uintptr_t v,
         int64_t B, int64_t d, int64_t N, int64_t k, int dtype, std::uintptr_t stream) {
        fc::feedback_step_forward(in_ptr(h), in_ptr(f), in_ptr(decay), out_ptr(h_next), out_ptr(v), B, d, N, k,
                                  dtype, as_stream(stream));
      },
      py::arg("h"), py::arg("f"), py::arg("decay"), py::arg("h_next"), py::arg("v"), py::arg("B"), py::arg("d"),
      py::arg("N"), py::arg("k"), py::arg("dtype"), py::arg("stream"), release_gil,
      "h_next = h + decay @ f per position, v = softmax of the last k channels of h_next ([B, d, N] layout).");

  m.def("feedback_step_num_partials", &fc::feedback_step_num_partials, py::arg("B"), py::arg("d"), py::arg("N"),
        release_gil,
        "Number of [d, d] partial sums of grad_decay the backward writes (uses the current device's SM count).");

  m.def(
      "feedback_step_backward",
      [](std::uintptr_t grad_h, std::uintptr_t grad_v, std::uintptr_t f, std::uintptr_t v, std::uintptr_t decay,
         std::uintptr_t grad_h_in, std::uintptr_t grad_f, std::uintptr_t grad_decay, std::uintptr_t partials,
         int64_t partials_elements, int64_t B, int64_t d, int64_t N, int64_t k, int dtype, std::uintptr_t stream) {
        fc::feedback_step_backward(in_ptr(grad_h), in_ptr(grad_v), in_ptr(f), in_ptr(v), in_ptr(decay),
                                   out_ptr(grad_h_in), out_ptr(grad_f), out_ptr(grad_decay), out_ptr(partials),
                                   partials_elements, B, d, N, k, dtype, as_stream(stream));
      },
      py::arg("grad_h"), py::arg("grad_v"), py::arg("f"), py::arg("v"), py::arg("decay"), py::arg("grad_h_in"),
      py::arg("grad_f"), py::arg("grad_decay"), py::arg("partials"), py::arg("partials_elements"), py::arg("B"),
      py::arg("d"), py::arg("N"), py::arg("k"), py::arg("dtype"), py::arg("stream"), release_gil,
      "Gradients of one feedback step; grad_h / grad_v may be 0 (absent), and so may grad_h_in / grad_f / "
      "grad_decay (not needed: skipped). partials: fp32 (fp64 for float64) workspace of at least "
      "feedback_step_num_partials(B, d, N) * d * d elements (partials_elements, checked).");

  m.def(
      "context_gate_forward",
      [](std::uintptr_t h, std::uintptr_t gate_logits, std::uintptr_t out, int64_t B, int64_t C, int64_t N,
         double alpha, int dtype, std::uintptr_t stream) {
        fc::context_gate_forward(in_ptr(h), in_ptr(gate_logits), out_ptr(out), B, C, N, alpha, dtype,
                                 as_stream(stream));
      },
      py::arg("h"), py::arg("gate_logits"), py::arg("out"), py::arg("B"), py::arg("C"), py::arg("N"),
      py::arg("alpha"), py::arg("dtype"), py::arg("stream"), release_gil,
      "out = alpha * h + (1 - alpha) * h * sigmoid(gate_logits) ([B, C, N] layout, gate_logits [B, C]).");

  m.def(
      "context_gate_backward",
      [](std::uintptr_t grad_out, std::uintptr_t h, std::uintptr_t gate_logits, std::uintptr_t grad_h,
         std::uintptr_t grad_gate_logits, int64_t B, int64_t C, int64_t N, double alpha, int dtype,
         std::uintptr_t stream) {
        fc::context_gate_backward(in_ptr(grad_out), in_ptr(h), in_ptr(gate_logits), out_ptr(grad_h),
                                  out_ptr(grad_gate_logits), B, C, N, alpha, dtype, as_stream(stream));
      },
      py::arg("grad_out"), py::arg("h"), py::arg("gate_logits"), py::arg("grad_h"), py::arg("grad_gate_logits"),
      py::arg("B"), py::arg("C"), py::arg("N"), py::arg("alpha"), py::arg("dtype"), py::arg("stream"), release_gil,
      "Gradients of the context gate with respect to h and gate_logits.");

  m.def("kernel_image_error", &fc::kernel_image_error, release_gil,
        "Empty when the current CUDA device runs these kernels, else the runtime's reason (e.g. no kernel image).");
  m.def(
      "architectures", [] { return std::string(FBKERNELS_CUDA_ARCHITECTURES); },
      "The CMake CUDA architectures this module was compiled for, comma-separated, e.g. "
      "'75-real,80-real,90-real,90-virtual'.");
}
