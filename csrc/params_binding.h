// pybind11 registration of the parameter structs of csrc/common.h, shared by the CPU modules (fbkernels._C,
// _C_avx2, _C_avx512) and the CUDA module (fbkernels._C_cuda). The classes are module-local: each module registers
// its own Python classes for the same C++ types, so any of them can be imported together in one process
// (fbkernels/_params.py makes each struct with the module it calls).
#pragma once

#include <pybind11/pybind11.h>

#include "common.h"

namespace fbkernels {

inline void bind_params(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<FeedbackStepParams>(m, "FeedbackStepParams", py::module_local(),
                                 "Arguments of one feedback_step kernel call: sizes, dtype code, thread count or "
                                 "stream, data pointers (0 = absent), workspace and which gradients to write.")
      .def(py::init<>())
      .def_readwrite("B", &FeedbackStepParams::B)
      .def_readwrite("d", &FeedbackStepParams::d)
      .def_readwrite("N", &FeedbackStepParams::N)
      .def_readwrite("k", &FeedbackStepParams::k)
      .def_readwrite("dtype", &FeedbackStepParams::dtype)
      .def_readwrite("num_threads", &FeedbackStepParams::num_threads)
      .def_readwrite("stream", &FeedbackStepParams::stream)
      .def_readwrite("h", &FeedbackStepParams::h)
      .def_readwrite("f", &FeedbackStepParams::f)
      .def_readwrite("decay", &FeedbackStepParams::decay)
      .def_readwrite("h_next", &FeedbackStepParams::h_next)
      .def_readwrite("v", &FeedbackStepParams::v)
      .def_readwrite("grad_h_next", &FeedbackStepParams::grad_h_next)
      .def_readwrite("grad_v", &FeedbackStepParams::grad_v)
      .def_readwrite("grad_h", &FeedbackStepParams::grad_h)
      .def_readwrite("grad_f", &FeedbackStepParams::grad_f)
      .def_readwrite("grad_decay", &FeedbackStepParams::grad_decay)
      .def_readwrite("partials", &FeedbackStepParams::partials)
      .def_readwrite("partials_elements", &FeedbackStepParams::partials_elements)
      .def_readwrite("need_grad_h", &FeedbackStepParams::need_grad_h)
      .def_readwrite("need_grad_f", &FeedbackStepParams::need_grad_f)
      .def_readwrite("need_grad_decay", &FeedbackStepParams::need_grad_decay);
  py::class_<ContextGateParams>(m, "ContextGateParams", py::module_local(),
                                "Arguments of one context_gate kernel call: sizes, alpha, dtype code, thread count "
                                "or stream, data pointers and which gradients to write.")
      .def(py::init<>())
      .def_readwrite("B", &ContextGateParams::B)
      .def_readwrite("C", &ContextGateParams::C)
      .def_readwrite("N", &ContextGateParams::N)
      .def_readwrite("alpha", &ContextGateParams::alpha)
      .def_readwrite("dtype", &ContextGateParams::dtype)
      .def_readwrite("num_threads", &ContextGateParams::num_threads)
      .def_readwrite("stream", &ContextGateParams::stream)
      .def_readwrite("h", &ContextGateParams::h)
      .def_readwrite("gate_logits", &ContextGateParams::gate_logits)
      .def_readwrite("out", &ContextGateParams::out)
      .def_readwrite("grad_out", &ContextGateParams::grad_out)
      .def_readwrite("grad_h", &ContextGateParams::grad_h)
      .def_readwrite("grad_gate_logits", &ContextGateParams::grad_gate_logits)
      .def_readwrite("need_grad_h", &ContextGateParams::need_grad_h)
      .def_readwrite("need_grad_gate_logits", &ContextGateParams::need_grad_gate_logits);
}

}  // namespace fbkernels
