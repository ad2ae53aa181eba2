"""Host side of the "cpp" backend: allocates outputs with torch and calls the C++ kernels (fbkernels._C_avx2 or _C).

All functions take the canonical layout of fbkernels.ops: contiguous [B, d, N] tensors of one dtype on the CPU.
"""
from __future__ import annotations

import importlib

import torch


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


_C = load_kernels()

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}


def _num_threads() -> int:
    return max(1, torch.get_num_threads())


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def feedback_step_forward(h, f, decay, num_feedback):
    B, d, N = h.shape
    h_next = torch.empty_like(h)
    v = torch.empty((B, num_feedback, N), dtype=h.dtype, device=h.device)
    _C.feedback_step_forward(
        h.data_ptr(), f.data_ptr(), decay.data_ptr(), h_next.data_ptr(), v.data_ptr(),
        B, d, N, num_feedback, _DTYPE_CODES[h.dtype], _num_threads(),
    )
    return h_next, v


def feedback_step_backward(grad_h, grad_v, f, v, decay, num_feedback, needs_grad=(True, True, True)):
    # needs_grad is honoured only by dropping results here: the kernels still compute every gradient.
    B, d, N = f.shape
    grad_h_in = torch.empty_like(f)
    grad_f = torch.empty_like(f)
    grad_decay = torch.empty_like(decay)
    partials = torch.empty((_C.feedback_step_num_partials(B, N), d, d), dtype=f.dtype)
    _C.feedback_step_backward(
        _ptr(grad_h), _ptr(grad_v), f.data_ptr(), v.data_ptr(), decay.data_ptr(),
        grad_h_in.data_ptr(), grad_f.data_ptr(), grad_decay.data_ptr(), partials.data_ptr(),
        B, d, N, num_feedback, _DTYPE_CODES[f.dtype], _num_threads(),
    )
    return tuple(grad if needed else None for grad, needed in zip((grad_h_in, grad_f, grad_decay), needs_grad))


def context_gate_forward(h, gate_logits, alpha):
    B, C, N = h.shape
    out = torch.empty_like(h)
    _C.context_gate_forward(
        h.data_ptr(), gate_logits.data_ptr(), out.data_ptr(), B, C, N, float(alpha),
        _DTYPE_CODES[h.dtype], _num_threads(),
    )
    return out


def context_gate_backward(grad_out, h, gate_logits, alpha, needs_grad=(True, True)):
    # needs_grad is honoured only by dropping results here: the kernel still computes both gradients.
    B, C, N = h.shape
    grad_h = torch.empty_like(h)
    grad_gate_logits = torch.empty_like(gate_logits)
    _C.context_gate_backward(
        grad_out.data_ptr(), h.data_ptr(), gate_logits.data_ptr(), grad_h.data_ptr(), grad_gate_logits.data_ptr(),
        B, C, N, float(alpha), _DTYPE_CODES[h.dtype], _num_threads(),
    )
    return tuple(grad if needed else None for grad, needed in zip((grad_h, grad_gate_logits), needs_grad))
