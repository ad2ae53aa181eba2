// pybind11 module fbkernels._C_cuda: thin bindings over the CUDA launchers of csrc/cuda/kernels.h.
//
// Each launcher takes the op's parameter struct (csrc/common.h, registered by csrc/params_binding.h, the same
// structs as the CPU modules): data pointers (tensor.data_ptr(), 0 for an absent tensor), sizes, dtype code
// (0 float32, 1 float64, 2 float16, 3 bfloat16) and the stream (torch.cuda.current_stream(device).cuda_stream).
// The Python layer (fbkernels/_cuda.py) validates, allocates and selects the device; this module never includes
// torch. Launch errors raise RuntimeError, bad arguments ValueError. Each call releases the GIL.
#include <pybind11/pybind11.h>

#include <string>

#include "cuda/kernels.h"
#include "params_binding.h"

namespace py = pybind11;
namespace fc = fbkernels::cuda;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fbkernels CUDA kernels (fused feedback step and context gate); called by fbkernels._cuda";
  const auto release_gil = py::call_guard<py::gil_scoped_release>();

  fbkernels::bind_params(m);

  m.def("feedback_step_forward", &fc::feedback_step_forward, py::arg("params"), release_gil,
        "h_next = h + decay @ f per position, v = softmax of the last k channels of h_next ([B, d, N] layout).");
  m.def("feedback_step_num_partials", &fc::feedback_step_num_partials, py::arg("params"), release_gil,
        "Number of [d, d] partial sums of grad_decay the backward writes for params' B, d, N (uses the current "
        "device's SM count).");
  m.def("feedback_step_backward", &fc::feedback_step_backward, py::arg("params"), release_gil,
        "Gradients of one feedback step into those of grad_h / grad_f / grad_decay whose need_grad_* is set; "
        "grad_h_next / grad_v may be 0 (zero). partials: fp32 (fp64 for float64) workspace of at least "
        "feedback_step_num_partials(params) * d * d elements (partials_elements, checked).");
  m.def("context_gate_forward", &fc::context_gate_forward, py::arg("params"), release_gil,
        "out = alpha * h + (1 - alpha) * h * sigmoid(gate_logits) ([B, C, N] layout, gate_logits [B, C]).");
  m.def("context_gate_backward", &fc::context_gate_backward, py::arg("params"), release_gil,
        "Gradients of the context gate with respect to h and gate_logits (those whose need_grad_* is set).");

  m.def("kernel_image_error", &fc::kernel_image_error, release_gil,
        "Empty when the current CUDA device runs these kernels, else the runtime's reason (e.g. no kernel image).");
  m.def(
      "architectures", [] { return std::string(FBKERNELS_CUDA_ARCHITECTURES); },
      "The CMake CUDA architectures this module was compiled for, comma-separated, e.g. "
      "'75-real,80-real,90-real,90-virtual'.");
}
