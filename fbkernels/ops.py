"""The public ops, registered with torch.library as ``fbkernels::feedback_step`` and ``fbkernels::context_gate``.

Each op takes the backend name as its last argument, flattens the spatial dims to the canonical contiguous
layout [B, d, N] and calls that backend's host functions (fbkernels._reference, _cpp, _cuda, triton), which all
share one signature. Autograd calls the fused backward op of the same backend. Fake implementations give
shapes to torch.compile and opcheck.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _reference, _validation
from .backends import host_module, resolve_backend


def _canonical(x: Tensor) -> Tensor:
    """[B, d, *S] -> contiguous [B, d, N]."""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:])).contiguous()


def _optional_canonical(x: Tensor | None) -> Tensor | None:
    return None if x is None else _canonical(x)


# ---------------------------------------------------------------- feedback_step

@torch.library.custom_op("fbkernels::feedback_step", mutates_args=())
def _feedback_step_op(h: Tensor, f: Tensor, decay: Tensor, num_feedback: int, backend: str) -> tuple[Tensor, Tensor]:
    h_next, v = host_module(backend).feedback_step_forward(_canonical(h), _canonical(f), decay.contiguous(), num_feedback)
    return h_next.reshape(h.shape), v.reshape(h.shape[0], num_feedback, *h.shape[2:])


@_feedback_step_op.register_fake
def _(h, f, decay, num_feedback, backend):
    return h.new_empty(h.shape), h.new_empty((h.shape[0], num_feedback, *h.shape[2:]))


@torch.library.custom_op("fbkernels::feedback_step_backward", mutates_args=())
def _feedback_step_backward_op(
    grad_h: Tensor | None, grad_v: Tensor | None, f: Tensor, v: Tensor, decay: Tensor, num_feedback: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    grad_h_in, grad_f, grad_decay = host_module(backend).feedback_step_backward(
        _optional_canonical(grad_h), _optional_canonical(grad_v), _canonical(f), _canonical(v),
        decay.contiguous(), num_feedback,
    )
    return grad_h_in.reshape(f.shape), grad_f.reshape(f.shape), grad_decay


@_feedback_step_backward_op.register_fake
def _(grad_h, grad_v, f, v, decay, num_feedback, backend):
    return f.new_empty(f.shape), f.new_empty(f.shape), decay.new_empty(decay.shape)


def _feedback_step_setup_context(ctx, inputs, output):
    _, f, decay, num_feedback, backend = inputs
    _, v = output
    ctx.save_for_backward(f, v, decay)
    ctx.num_feedback, ctx.backend = num_feedback, backend
    # Absent upstream gradients stay None, so the kernel skips them instead of reading zeros.
    ctx.set_materialize_grads(False)


def _feedback_step_backward(ctx, grad_h_next, grad_v):
    f, v, decay = ctx.saved_tensors
    if grad_h_next is None and grad_v is None:
        return None, None, None, None, None
    grad_h, grad_f, grad_decay = torch.ops.fbkernels.feedback_step_backward(
        grad_h_next, grad_v, f, v, decay, ctx.num_feedback, ctx.backend
    )
    return grad_h, grad_f, grad_decay, None, None


_feedback_step_op.register_autograd(_feedback_step_backward, setup_context=_feedback_step_setup_context)


def feedback_step(h: Tensor, f: Tensor, decay: Tensor, num_feedback: int, *, backend: str | None = None):
    """One feedback-state update: ``h_next = h + decay @ f`` per position, ``v = softmax(h_next[:, d-k:])``.

    h, f: [B, d, *S]; decay: [d, d]; num_feedback = k in 1..d. Returns (h_next [B, d, *S], v [B, k, *S]).
    """
    _validation.check_feedback_step(h, f, decay, num_feedback)
    name = resolve_backend(backend, h.device, h.dtype)
    return torch.ops.fbkernels.feedback_step(h, f, decay, int(num_feedback), name)


# ---------------------------------------------------------------- context_gate

@torch.library.custom_op("fbkernels::context_gate", mutates_args=())
def _context_gate_op(h: Tensor, gate_logits: Tensor, alpha: float, backend: str) -> Tensor:
    out = host_module(backend).context_gate_forward(_canonical(h), gate_logits.contiguous(), alpha)
    return out.reshape(h.shape)


@_context_gate_op.register_fake
def _(h, gate_logits, alpha, backend):
    return h.new_empty(h.shape)


@torch.library.custom_op("fbkernels::context_gate_backward", mutates_args=())
def _context_gate_backward_op(
    grad_out: Tensor, h: Tensor, gate_logits: Tensor, alpha: float, backend: str
) -> tuple[Tensor, Tensor]:
    grad_h, grad_gate = host_module(backend).context_gate_backward(
        _canonical(grad_out), _canonical(h), gate_logits.contiguous(), alpha
    )
    return grad_h.reshape(h.shape), grad_gate


@_context_gate_backward_op.register_fake
def _(grad_out, h, gate_logits, alpha, backend):
    return h.new_empty(h.shape), gate_logits.new_empty(gate_logits.shape)


def _context_gate_setup_context(ctx, inputs, output):
    h, gate_logits, alpha, backend = inputs
    ctx.save_for_backward(h, gate_logits)
    ctx.alpha, ctx.backend = alpha, backend


def _context_gate_backward(ctx, grad_out):
    h, gate_logits = ctx.saved_tensors
    grad_h, grad_gate = torch.ops.fbkernels.context_gate_backward(grad_out, h, gate_logits, ctx.alpha, ctx.backend)
    return grad_h, grad_gate, None, None


_context_gate_op.register_autograd(_context_gate_backward, setup_context=_context_gate_setup_context)


def context_gate(h: Tensor, gate_logits: Tensor, alpha: float, *, backend: str | None = None) -> Tensor:
    """Top-down gating: ``out = alpha * h + (1 - alpha) * h * sigmoid(gate_logits)`` broadcast over positions.

    h: [B, C, *S]; gate_logits: [B, C]; alpha in [0, 1]. Returns out [B, C, *S].
    """
    _validation.check_context_gate(h, gate_logits, alpha)
    name = resolve_backend(backend, h.device, h.dtype)
    return torch.ops.fbkernels.context_gate(h, gate_logits, float(alpha), name)


# ---------------------------------------------------------------- decay_matrix

def decay_matrix(basis: Tensor, basis_inv: Tensor, rates: Tensor, t, tau) -> Tensor:
    """Matrix-exponential decay ``M(t) = basis @ diag(exp(-t * rates / tau)) @ basis_inv``: a [d, d] tensor.

    basis, basis_inv: [d, d]; rates: [d] (or a scalar, shared by every eigenvalue); t, tau: scalars.
    Differentiable in basis, basis_inv and rates (plain autograd: the matrix is tiny).
    """
    _validation.check_decay_matrix(basis, basis_inv, rates, t, tau)
    if rates.dim() == 0:
        rates = rates.expand(basis.shape[0])
    return _reference.decay_matrix(basis, basis_inv, rates, t, tau)
