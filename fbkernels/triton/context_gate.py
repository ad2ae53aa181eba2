"""Triton context gate: ``out = h * (alpha + (1 - alpha) * sigmoid(a))`` per (b, c) row, and its backward.

Canonical layout: h, out, grad_out, grad_h: [B, C, N] contiguous; gate_logits a, grad_gate_logits: [B, C]; one dtype
(float32, float64, float16, bfloat16; fp16/bf16 compute in fp32), one device.

Every (b, c) row is one gate scale times N positions, so both passes are elementwise streams over h: the forward
reads h once and writes out once; the backward reads grad_out and h once, writes grad_h once and reduces
``sum_n grad_out * h`` per row. That reduction is deterministic without atomics: each program owns a fixed chunk of
one row and writes one fp32 (fp64 for float64) partial, and a second kernel sums a row's partials in chunk order
and applies ``(1 - alpha) * s * (1 - s)``.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._utils import (
    INTERPRETING,
    check_launchable,
    device_guard,
    dtype_flags,
    kernel_is_interpreted,
    partial_dtype,
    upcast,
)

# Positions per backward partial: fixed (not tuned) so the partials workspace is sized before autotuning runs.
# Small under the interpreter so the test shapes span several chunks and blocks.
_CHUNK = 64 if INTERPRETING else 8192


def _configs():
    if INTERPRETING:
        return [triton.Config({"BLOCK_N": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=nw) for bn in (512, 1024, 2048) for nw in (4, 8)]


_AUTOTUNE = dict(configs=_configs(), key=["N"])


def _split_alpha(alpha: float) -> tuple[float, float]:
    """alpha as fp32 head + fp32 tail: Triton passes Python floats as fp32, and float64 inputs need all 53 bits."""
    head = float(np.float32(alpha))
    return head, float(np.float32(alpha - head))


@triton.jit
def _gate_scale(gate_logits_ptr, row, alpha_head, alpha_tail, IS_FP64: tl.constexpr):
    """(alpha, s, alpha + (1 - alpha) * s) for row (b, c), s = sigmoid(a[b, c]), in the compute dtype."""
    a = upcast(tl.load(gate_logits_ptr + row), IS_FP64)
    alpha = upcast(alpha_head, IS_FP64) + upcast(alpha_tail, IS_FP64)
    s = 1.0 / (1.0 + tl.exp(-a))
    return alpha, s, alpha + (1.0 - alpha) * s


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _context_gate_forward_kernel(
    h_ptr, gate_logits_ptr, out_ptr, N, alpha_head, alpha_tail,
    IS_FP32: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (row, n-block): out[row, n-block] = h[row, n-block] * scale[row]; row = b * C + c."""
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: B * C * N may exceed 2^31
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    row = pid // num_n_blocks
    pos = (pid - row * num_n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = pos < N
    _, _, scale = _gate_scale(gate_logits_ptr, row, alpha_head, alpha_tail, IS_FP64)
    offsets = row * N + pos
    h = upcast(tl.load(h_ptr + offsets, mask=mask, other=0.0), IS_FP64)
    tl.store(out_ptr + offsets, (h * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _context_gate_backward_kernel(
    grad_out_ptr, h_ptr, gate_logits_ptr, grad_h_ptr, partial_ptr, N, num_chunks, alpha_head, alpha_tail,
    CHUNK: tl.constexpr, IS_FP32: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (row, chunk): grad_h = grad_out * scale over the chunk; partial[row, chunk] = sum grad_out * h."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // num_chunks
    chunk_start = (pid - row * num_chunks) * CHUNK
    _, _, scale = _gate_scale(gate_logits_ptr, row, alpha_head, alpha_tail, IS_FP64)
    acc = upcast(tl.zeros([BLOCK_N], dtype=partial_ptr.dtype.element_ty), IS_FP64)
    for start in range(0, CHUNK, BLOCK_N):
        pos = chunk_start + start + tl.arange(0, BLOCK_N)
        mask = pos < N
        offsets = row * N + pos
        g = upcast(tl.load(grad_out_ptr + offsets, mask=mask, other=0.0), IS_FP64)
        h = upcast(tl.load(h_ptr + offsets, mask=mask, other=0.0), IS_FP64)
        tl.store(grad_h_ptr + offsets, (g * scale).to(grad_h_ptr.dtype.element_ty), mask=mask)
        acc += g * h
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _context_gate_grad_logits_kernel(
    partial_ptr, gate_logits_ptr, grad_gate_logits_ptr, num_chunks, alpha_head, alpha_tail,
    IS_FP64: tl.constexpr,
):
    """Program row: grad_a[row] = (1 - alpha) * s * (1 - s) * sum_chunk partial[row, chunk], in chunk order."""
    row = tl.program_id(0).to(tl.int64)
    alpha, s, _ = _gate_scale(gate_logits_ptr, row, alpha_head, alpha_tail, IS_FP64)
    total = tl.load(partial_ptr + row * num_chunks)
    for chunk in range(1, num_chunks):
        total += tl.load(partial_ptr + row * num_chunks + chunk)
    grad = (1.0 - alpha) * s * (1.0 - s) * total
    tl.store(grad_gate_logits_ptr + row, grad.to(grad_gate_logits_ptr.dtype.element_ty))


_INTERPRETED = kernel_is_interpreted(_context_gate_forward_kernel)


@triton_op("fbkernels::context_gate_forward_triton", mutates_args=())
def _context_gate_forward_op(h: Tensor, gate_logits: Tensor, alpha: float) -> Tensor:
    B, C, N = h.shape
    out = torch.empty_like(h)
    if out.numel() == 0:
        return out
    check_launchable(h, _INTERPRETED)
    alpha_head, alpha_tail = _split_alpha(alpha)

    def grid(meta):
        return (B * C * triton.cdiv(N, meta["BLOCK_N"]),)

    with device_guard(h.device):
        wrap_triton(_context_gate_forward_kernel)[grid](
            h, gate_logits, out, N, alpha_head, alpha_tail, **dtype_flags(h.dtype)
        )
    return out


@triton_op("fbkernels::context_gate_backward_triton", mutates_args=())
def _context_gate_backward_op(grad_out: Tensor, h: Tensor, gate_logits: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    B, C, N = h.shape
    grad_h = torch.empty_like(h)
    grad_gate_logits = torch.empty_like(gate_logits)
    if B * C == 0:
        return grad_h, grad_gate_logits
    if N == 0:  # no position: the sum over positions is empty
        return grad_h, grad_gate_logits.zero_()
    check_launchable(h, _INTERPRETED)
    alpha_head, alpha_tail = _split_alpha(alpha)
    num_chunks = triton.cdiv(N, _CHUNK)
    partials = torch.empty((B * C, num_chunks), dtype=partial_dtype(h.dtype), device=h.device)
    flags = dtype_flags(h.dtype)
    with device_guard(h.device):
        wrap_triton(_context_gate_backward_kernel)[(B * C * num_chunks,)](
            grad_out, h, gate_logits, grad_h, partials, N, num_chunks, alpha_head, alpha_tail, CHUNK=_CHUNK, **flags
        )
        wrap_triton(_context_gate_grad_logits_kernel)[(B * C,)](
            partials, gate_logits, grad_gate_logits, num_chunks, alpha_head, alpha_tail, IS_FP64=flags["IS_FP64"]
        )
    return grad_h, grad_gate_logits


def context_gate_forward(h: Tensor, gate_logits: Tensor, alpha: float) -> Tensor:
    """out [B, C, N] for contiguous h: [B, C, N] and gate_logits: [B, C]."""
    return torch.ops.fbkernels.context_gate_forward_triton(h, gate_logits, float(alpha))


def context_gate_backward(grad_out: Tensor, h: Tensor, gate_logits: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """(grad_h [B, C, N], grad_gate_logits [B, C]) of the context gate."""
    return torch.ops.fbkernels.context_gate_backward_triton(grad_out, h, gate_logits, float(alpha))
