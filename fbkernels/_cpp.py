"""Host side of the "cpp" backend: allocates outputs with torch and calls the C++ kernels (fbkernels._C_avx2 or _C).

All functions take the canonical layout of fbkernels.ops: contiguous [B, d, N] tensors of one dtype on the CPU.
Each call fills one parameter struct (fbkernels/_params.py: pointers, sizes, dtype code, thread count, which
gradients to write) and calls one compiled entry per op and pass. The kernels run on PyTorch's own OpenMP thread
pool, with ``torch.get_num_threads()`` threads; their results do not depend on the thread count.
"""
from __future__ import annotations

import importlib
import warnings

import torch

from ._params import context_gate_params, feedback_step_params


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
    """_C.FeedbackStepParams for a state ``like`` [B, d, N], running on torch.get_num_threads() threads."""
    return feedback_step_params(_C, like, num_feedback, num_threads=max(1, torch.get_num_threads()), **fields)


def _context_gate_params(like, alpha, **fields):
    """_C.ContextGateParams for a feature map ``like`` [B, C, N], running on torch.get_num_threads() threads."""
    return context_gate_params(_C, like, alpha, num_threads=max(1, torch.get_num_threads()), **fields)


def feedback_step_forward(h, f, decay, num_feedback):
    B, d, N = h.shape
    h_next = torch.empty_like(h)
    v = torch.empty((B, num_feedback, N), dtype=h.dtype, device=h.device)
    _C.feedback_step_forward(_feedback_step_params(h, num_feedback, h=h, f=f, decay=decay, h_next=h_next, v=v))
    return h_next, v


def feedback_step_backward(grad_h, grad_v, f, v, decay, num_feedback, needs_grad=(True, True, True)):
    """(grad of h, grad of f, grad of decay), each None where needs_grad says it is not wanted. grad_h / grad_v
    (the gradients of h_next and v) may be None, meaning zero."""
    need_h, need_f, need_decay = (bool(flag) for flag in needs_grad)
    grad_h_in = torch.empty_like(f) if need_h else None
    grad_f = torch.empty_like(f) if need_f else None
    grad_decay = torch.empty_like(decay) if need_decay else None
    _C.feedback_step_backward(_feedback_step_params(
        f, num_feedback, f=f, v=v, decay=decay, grad_h_next=grad_h, grad_v=grad_v,
        grad_h=grad_h_in, grad_f=grad_f, grad_decay=grad_decay, need_grad_h=need_h, need_grad_f=need_f,
        need_grad_decay=need_decay))
    return grad_h_in, grad_f, grad_decay


def context_gate_forward(h, gate_logits, alpha):
    out = torch.empty_like(h)
    _C.context_gate_forward(_context_gate_params(h, alpha, h=h, gate_logits=gate_logits, out=out))
    return out


def context_gate_backward(grad_out, h, gate_logits, alpha, needs_grad=(True, True)):
    """(grad of h, grad of gate_logits), each None where needs_grad says it is not wanted."""
    need_h, need_gate = (bool(flag) for flag in needs_grad)
    grad_h = torch.empty_like(h) if need_h else None
    grad_gate_logits = torch.empty_like(gate_logits) if need_gate else None
    _C.context_gate_backward(_context_gate_params(
        h, alpha, grad_out=grad_out, h=h, gate_logits=gate_logits, grad_h=grad_h,
        grad_gate_logits=grad_gate_logits, need_grad_h=need_h, need_grad_gate_logits=need_gate))
    return grad_h, grad_gate_logits
