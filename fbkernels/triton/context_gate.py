"""Triton context gate: ``out = h * (alpha + (1 - alpha) * sigmoid(a))`` per (b, c) row, and its backward.

Layout: h, out, grad_out, grad_h: [B, C, *S] contiguous, which the kernels address as [B, C, N] with N = prod(S);
gate_logits a, grad_gate_logits: [B, C]; one dtype (float32, float64, float16, bfloat16; fp16/bf16 compute in
fp32), one device.

Every (b, c) row is one gate scale times N positions, so both passes are elementwise streams over h: the forward
reads h once and writes out once; the backward reads grad_out and h once, writes grad_h once and reduces
``sum_n grad_out * h`` per row. A program owns a [BLOCK_R rows, BLOCK_N positions] tile, BLOCK_N sized from N, so
the short rows of CBL-CNN maps (4..256 positions) fill the lanes with several rows. The reduction is deterministic
without atomics: each program owns a fixed chunk of its rows and writes one fp32 (fp64 for float64) partial per
row, and a second kernel sums a row's partials in chunk order and applies ``(1 - alpha) * s * (1 - s)``.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .._params import spatial_numel
from ._utils import INTERPRETING, check_launchable, device_guard, kernel_is_interpreted, partial_dtype, upcast

# Positions per backward partial (a multiple of BLOCK_N): one fp32 partial per (row, chunk) keeps the reduction
# over N deterministic without atomics. Small under the interpreter so the test shapes span several chunks.
_CHUNK = 64 if INTERPRETING else 8192
# Elements of one program's [BLOCK_R, BLOCK_N] tile: 16 (fp32) values a thread at 4 warps.
_TILE_ELEMENTS = 64 if INTERPRETING else 2048
_MAX_BLOCK_N = 16 if INTERPRETING else 1024


def tile_shape(rows: int, N: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps) for a [rows, N] map: BLOCK_N covers the row (CBL-CNN maps have 4..256
    positions) up to _MAX_BLOCK_N, and several rows share a program so no lane idles on short rows."""
    block_n = min(max(triton.next_power_of_2(max(N, 1)), 16), _MAX_BLOCK_N)
    block_r = min(max(1, _TILE_ELEMENTS // block_n), triton.next_power_of_2(max(rows, 1)))
    return block_r, block_n, 4


def _split_alpha(alpha: float) -> tuple[float, float]:
    """alpha as fp32 head + fp32 tail: Triton passes Python floats as fp32, and float64 inputs need all 53 bits."""
    head = float(np.float32(alpha))
    return head, float(np.float32(alpha - head))


@triton.jit
def _gate_scale(gate_logits_ptr, rows, row_ok, alpha_head, alpha_tail, IS_FP64: tl.constexpr):
    """(alpha, s, alpha + (1 - alpha) * s) for the rows (b, c) given, s = sigmoid(a[b, c]), in the compute dtype."""
    a = upcast(tl.load(gate_logits_ptr + rows, mask=row_ok, other=0.0), IS_FP64)
    alpha = upcast(alpha_head, IS_FP64) + upcast(alpha_tail, IS_FP64)
    s = 1.0 / (1.0 + tl.exp(-a))
    return alpha, s, alpha + (1.0 - alpha) * s


@triton.jit
def _context_gate_forward_kernel(
    h_ptr, gate_logits_ptr, out_ptr, num_rows, N, alpha_head, alpha_tail,
    IS_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (row block, n-block): out[rows, n-block] = h[rows, n-block] * scale[rows]; row = b * C + c."""
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: B * C * N may exceed 2^31
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    row_block = pid // num_n_blocks
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    pos = (pid - row_block * num_n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (pos < N)[None, :]
    _, _, scale = _gate_scale(gate_logits_ptr, rows, row_ok, alpha_head, alpha_tail, IS_FP64)
    offsets = rows[:, None] * N + pos[None, :]
    h = upcast(tl.load(h_ptr + offsets, mask=mask, other=0.0), IS_FP64)
    tl.store(out_ptr + offsets, (h * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _context_gate_backward_kernel(
    grad_out_ptr, h_ptr, gate_logits_ptr, grad_h_ptr, partial_ptr, num_rows, N, num_chunks, alpha_head, alpha_tail,
    WRITE_GRAD_H: tl.constexpr, WRITE_PARTIALS: tl.constexpr, CHUNK: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (row block, chunk): grad_h = grad_out * scale over the chunk (WRITE_GRAD_H);
    partial[row, chunk] = sum over the chunk of grad_out * h (WRITE_PARTIALS)."""
    pid = tl.program_id(0).to(tl.int64)
    row_block = pid // num_chunks
    chunk = pid - row_block * num_chunks
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    _, _, scale = _gate_scale(gate_logits_ptr, rows, row_ok, alpha_head, alpha_tail, IS_FP64)
    acc = upcast(tl.zeros([BLOCK_R, BLOCK_N], dtype=partial_ptr.dtype.element_ty), IS_FP64)
    for start in range(0, CHUNK, BLOCK_N):
        pos = chunk * CHUNK + start + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (pos < N)[None, :]
        offsets = rows[:, None] * N + pos[None, :]
        g = upcast(tl.load(grad_out_ptr + offsets, mask=mask, other=0.0), IS_FP64)
        if WRITE_GRAD_H:
            tl.store(grad_h_ptr + offsets, (g * scale[:, None]).to(grad_h_ptr.dtype.element_ty), mask=mask)
        if WRITE_PARTIALS:
            h = upcast(tl.load(h_ptr + offsets, mask=mask, other=0.0), IS_FP64)
            acc += g * h
    if WRITE_PARTIALS:
        tl.store(partial_ptr + rows * num_chunks + chunk, tl.sum(acc, axis=1), mask=row_ok)


@triton.jit
def _context_gate_grad_logits_kernel(
    partial_ptr, gate_logits_ptr, grad_gate_logits_ptr, num_rows, num_chunks, alpha_head, alpha_tail,
    IS_FP64: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Program (row block): grad_a[row] = (1 - alpha) * s * (1 - s) * sum_chunk partial[row, chunk], in chunk
    order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    alpha, s, _ = _gate_scale(gate_logits_ptr, rows, row_ok, alpha_head, alpha_tail, IS_FP64)
    total = tl.load(partial_ptr + rows * num_chunks, mask=row_ok, other=0.0)
    for chunk in range(1, num_chunks):
        total += tl.load(partial_ptr + rows * num_chunks + chunk, mask=row_ok, other=0.0)
    grad = (1.0 - alpha) * s * (1.0 - s) * total
    tl.store(grad_gate_logits_ptr + rows, grad.to(grad_gate_logits_ptr.dtype.element_ty), mask=row_ok)


_INTERPRETED = kernel_is_interpreted(_context_gate_forward_kernel)
_GRAD_LOGITS_ROWS = 128


@triton_op("fbkernels::context_gate_forward_triton", mutates_args=())
def _context_gate_forward_op(h: Tensor, gate_logits: Tensor, alpha: float) -> Tensor:
    B, C, N = h.shape[0], h.shape[1], spatial_numel(h.shape)
    out = torch.empty_like(h)
    if out.numel() == 0:
        return out
    check_launchable(h, _INTERPRETED)
    alpha_head, alpha_tail = _split_alpha(alpha)
    block_r, block_n, warps = tile_shape(B * C, N)
    grid = (triton.cdiv(B * C, block_r) * triton.cdiv(N, block_n),)
    with device_guard(h.device):
        wrap_triton(_context_gate_forward_kernel)[grid](
            h, gate_logits, out, B * C, N, alpha_head, alpha_tail, IS_FP64=h.dtype == torch.float64,
            BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps,
        )
    return out


@triton_op("fbkernels::context_gate_backward_triton", mutates_args=())
def _context_gate_backward_op(
    grad_out: Tensor, h: Tensor, gate_logits: Tensor, alpha: float, needs_grad: list[bool]
) -> tuple[Tensor, Tensor]:
    """Gradients in needs_grad order (grad_h, grad_gate_logits); one not needed is an empty placeholder."""
    B, C, N = h.shape[0], h.shape[1], spatial_numel(h.shape)
    need_h, need_gate = needs_grad
    grad_h = torch.empty_like(h) if need_h else h.new_empty(0)
    grad_gate_logits = torch.empty_like(gate_logits) if need_gate else gate_logits.new_empty(0)
    if B * C == 0 or not (need_h or need_gate):
        return grad_h, grad_gate_logits
    if N == 0:  # no position: the sum over positions is empty
        return grad_h, grad_gate_logits.zero_() if need_gate else grad_gate_logits
    check_launchable(h, _INTERPRETED)
    alpha_head, alpha_tail = _split_alpha(alpha)
    block_r, block_n, warps = tile_shape(B * C, N)
    chunk = min(_CHUNK, block_n * triton.cdiv(N, block_n))  # no loop over a chunk's masked-off tail
    num_chunks = triton.cdiv(N, chunk)
    is_fp64 = h.dtype == torch.float64
    partials = torch.empty((B * C, num_chunks) if need_gate else (0,), dtype=partial_dtype(h.dtype), device=h.device)
    with device_guard(h.device):
        wrap_triton(_context_gate_backward_kernel)[(triton.cdiv(B * C, block_r) * num_chunks,)](
            grad_out, h, gate_logits, grad_h if need_h else grad_out, partials, B * C, N, num_chunks,
            alpha_head, alpha_tail, WRITE_GRAD_H=need_h, WRITE_PARTIALS=need_gate, CHUNK=chunk, IS_FP64=is_fp64,
            BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps,
        )
        if need_gate:
            wrap_triton(_context_gate_grad_logits_kernel)[(triton.cdiv(B * C, _GRAD_LOGITS_ROWS),)](
                partials, gate_logits, grad_gate_logits, B * C, num_chunks, alpha_head, alpha_tail,
                IS_FP64=is_fp64, BLOCK_R=_GRAD_LOGITS_ROWS,
            )
    return grad_h, grad_gate_logits


def context_gate_forward(h: Tensor, gate_logits: Tensor, alpha: float) -> Tensor:
    """out [B, C, *S] for contiguous h: [B, C, *S] and gate_logits: [B, C]."""
    return torch.ops.fbkernels.context_gate_forward_triton(h, gate_logits, float(alpha))


def context_gate_backward(grad_out: Tensor, h: Tensor, gate_logits: Tensor, alpha: float,
                          needs_grad=(True, True)) -> tuple[Tensor | None, Tensor | None]:
    """(grad_h [B, C, *S], grad_gate_logits [B, C]) of the context gate, None where needs_grad says not needed."""
    needs = [bool(n) for n in needs_grad]
    grads = torch.ops.fbkernels.context_gate_backward_triton(grad_out, h, gate_logits, float(alpha), needs)
    return tuple(g if need else None for g, need in zip(grads, needs))
