"""Host side of the "cpp" backend: allocates outputs with torch and calls the C++ kernels (fbkernels._C_avx2 or _C).

All functions take contiguous [B, d, *S] tensors of one dtype on the CPU (the kernels see B, d and N = prod(S)) and
return outputs of that shape.
Each call fills one parameter struct (fbkernels/_params.py: sizes, dtype code, thread count; then pointers and which
gradients to write, assigned field by field here: a call on small maps takes microseconds, and the generic keyword
fill costs a few more) and calls one compiled entry per op and pass. The kernels run on PyTorch's own OpenMP thread
pool, with ``torch.get_num_threads()`` threads; their results do not depend on the thread count.
"""
from __future__ import annotations

import importlib
import warnings

import torch

from ._params import context_gate_params, feedback_step_params, pointer


def load_kernels(prefer_avx2: bool | None = None):
    """The compiled CPU kernels: fbkernels._C_avx2 on CPUs with AVX2 and FMA (as PyTorch detects them, so
    ATEN_CPU_CAPABILITY=default also selects the portable build), else the portable fbkernels._C."""
    if prefer_avx2 is None:
        prefer_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    if prefer_avx2:
        try:
            return importlib.import_module("fbkernels._C_avx2")
        except ImportError:  # built without it (not x86-64, or a compiler without -mavx2)
            pass
    return importlib.import_module("fbkernels._C")


def loaded_openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes (libgomp, libomp, libiomp) mapped into this process (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}
    except OSError:
        return []
    names = ("libgomp", "libomp", "libiomp")
    return sorted(path for path in paths if any(path.rsplit("/", 1)[-1].startswith(name) for name in names))


_C = load_kernels()

if len(loaded_openmp_runtimes()) > 1:
    # PyTorch's runtime under another soname (some wheels ship a hashed libgomp-<hash>.so.1): the kernels got a
    # second runtime whose worker threads compete with PyTorch's.
    warnings.warn(
        "fbkernels: more than one OpenMP runtime is loaded (" + ", ".join(loaded_openmp_runtimes()) + "); the cpp "
        "kernels' threads compete with PyTorch's. Setting OMP_WAIT_POLICY=passive limits the cost.",
        RuntimeWarning, stacklevel=2,
    )


def _feedback_step_params(like, num_feedback, **fields):
    """_C.FeedbackStepParams for a state ``like`` [B, d, *S], running on torch.get_num_threads() threads."""
    params = feedback_step_params(_C, like, num_feedback, **fields)
    params.num_threads = max(1, torch.get_num_threads())
    return params


def _context_gate_params(like, alpha, **fields):
    """_C.ContextGateParams for a feature map ``like`` [B, C, *S], running on torch.get_num_threads() threads."""
    params = context_gate_params(_C, like, alpha, **fields)
    params.num_threads = max(1, torch.get_num_threads())
    return params


def feedback_step_forward(h, f, decay, num_feedback):
    h_next = torch.empty_like(h)
    v = torch.empty((h.shape[0], num_feedback, *h.shape[2:]), dtype=h.dtype, device=h.device)
    params = _feedback_step_params(h, num_feedback)
    params.h, params.f, params.decay = h.data_ptr(), f.data_ptr(), decay.data_ptr()
    params.h_next, params.v = h_next.data_ptr(), v.data_ptr()
    _C.feedback_step_forward(params)
    return h_next, v


def feedback_step_backward(grad_h, grad_v, f, v, decay, num_feedback, needs_grad=(True, True, True)):
    """(grad of h, grad of f, grad of decay), each None where needs_grad says it is not wanted. grad_h / grad_v
    (the gradients of h_next and v) may be None, meaning zero."""
    need_h, need_f, need_decay = (bool(flag) for flag in needs_grad)
    grad_h_in = torch.empty_like(f) if need_h else None
    grad_f = torch.empty_like(f) if need_f else None
    grad_decay = torch.empty_like(decay) if need_decay else None
    params = _feedback_step_params(f, num_feedback)
    params.f, params.v, params.decay = f.data_ptr(), v.data_ptr(), decay.data_ptr()
    params.grad_h_next, params.grad_v = pointer(grad_h), pointer(grad_v)
    params.grad_h, params.grad_f, params.grad_decay = pointer(grad_h_in), pointer(grad_f), pointer(grad_decay)
    params.need_grad_h, params.need_grad_f, params.need_grad_decay = need_h, need_f, need_decay
    _C.feedback_step_backward(params)
    return grad_h_in, grad_f, grad_decay


def context_gate_forward(h, gate_logits, alpha):
    out = torch.empty_like(h)
    params = _context_gate_params(h, alpha)
    params.h, params.gate_logits, params.out = h.data_ptr(), gate_logits.data_ptr(), out.data_ptr()
    _C.context_gate_forward(params)
    return out


def context_gate_backward(grad_out, h, gate_logits, alpha, needs_grad=(True, True)):
    """(grad of h, grad of gate_logits), each None where needs_grad says it is not wanted."""
    need_h, need_gate = (bool(flag) for flag in needs_grad)
    grad_h = torch.empty_like(h) if need_h else None
    grad_gate_logits = torch.empty_like(gate_logits) if need_gate else None
    params = _context_gate_params(h, alpha)
    params.grad_out, params.h, params.gate_logits = grad_out.data_ptr(), h.data_ptr(), gate_logits.data_ptr()
    params.grad_h, params.grad_gate_logits = pointer(grad_h), pointer(grad_gate_logits)
    params.need_grad_h, params.need_grad_gate_logits = need_h, need_gate
    _C.context_gate_backward(params)
    return grad_h, grad_gate_logits
