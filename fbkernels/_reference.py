"""Eager PyTorch reference of every fbkernels op: the "eager" backend, and the baseline of tests and benchmarks.

Shapes: state ``h``/``f``: [B, d, *S]; feedback softmax ``v``: [B, k, *S] over the last k channels;
``decay``: [d, d]; context gate ``h``: [B, C, *S], ``gate_logits``: [B, C]. fp16/bf16 inputs are computed
in float32 and cast back, as the fused kernels do.
"""
from __future__ import annotations

import math

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, d, *S] -> [B, d, N] (explicit N: -1 is ambiguous for an empty batch)."""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def _channel_mix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y[b, :, s] = matrix @ x[b, :, s] for x of shape [B, d, *S]."""
    return torch.matmul(matrix, _flat(x)).reshape(x.shape[0], matrix.shape[0], *x.shape[2:])


def feedback_step_forward(h, f, decay, num_feedback):
    """h_next = h + decay @ f per position; v = softmax over the last ``num_feedback`` channels of h_next."""
    ct = _compute_dtype(h.dtype)
    h_next = h.to(ct) + _channel_mix(decay.to(ct), f.to(ct))
    v = torch.softmax(h_next[:, h.shape[1] - num_feedback:], dim=1)
    return h_next.to(h.dtype), v.to(h.dtype)


def feedback_step_backward(grad_h, grad_v, f, v, decay, num_feedback):
    """Gradients (dL/dh, dL/df, dL/ddecay) of one feedback step; ``grad_h``/``grad_v`` may be None (zero)."""
    ct = _compute_dtype(f.dtype)
    d = f.shape[1]
    if grad_h is None:
        g = torch.zeros(f.shape, dtype=ct, device=f.device)
    else:
        g = grad_h.to(ct).clone()
    if grad_v is not None:
        v_c, gv = v.to(ct), grad_v.to(ct)
        g[:, d - num_feedback:] += v_c * (gv - (v_c * gv).sum(dim=1, keepdim=True))
    f_c = f.to(ct)
    grad_f = _channel_mix(decay.to(ct).t(), g)
    grad_decay = torch.einsum("bin,bjn->ij", _flat(g), _flat(f_c))
    return g.to(f.dtype), grad_f.to(f.dtype), grad_decay.to(decay.dtype)


def _gate_shape(h, gate_logits):
    return gate_logits.reshape(*gate_logits.shape, *([1] * (h.dim() - 2)))


def context_gate_forward(h, gate_logits, alpha):
    """out = alpha * h + (1 - alpha) * h * sigmoid(gate_logits)[:, :, None, ...]."""
    ct = _compute_dtype(h.dtype)
    gate = torch.sigmoid(_gate_shape(h, gate_logits).to(ct))
    h_c = h.to(ct)
    return (alpha * h_c + (1.0 - alpha) * h_c * gate).to(h.dtype)


def context_gate_backward(grad_out, h, gate_logits, alpha):
    """(dL/dh, dL/dgate_logits) of the context gate."""
    ct = _compute_dtype(h.dtype)
    gate = torch.sigmoid(gate_logits.to(ct))
    g, h_c = grad_out.to(ct), h.to(ct)
    grad_h = g * (alpha + (1.0 - alpha) * _gate_shape(h, gate))
    reduce_dims = tuple(range(2, h.dim()))
    gh = (g * h_c).sum(dim=reduce_dims) if reduce_dims else g * h_c
    grad_gate = (1.0 - alpha) * gate * (1.0 - gate) * gh
    return grad_h.to(h.dtype), grad_gate.to(gate_logits.dtype)


def decay_matrix(basis, basis_inv, rates, t, tau):
    """M(t) = basis @ diag(exp(-t * rates / tau)) @ basis_inv, differentiable in every tensor argument."""
    scale = torch.exp(-t * rates / tau)
    return (basis * scale.unsqueeze(0)) @ basis_inv
