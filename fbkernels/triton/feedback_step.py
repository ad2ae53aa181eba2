"""Triton feedback step: ``h_next = h + M @ f`` per position, ``v = softmax(h_next[:, d-k:])``, and its backward.

Layout: h, f, h_next, grad_h, grad_f: [B, d, *S]; v, grad_v: [B, k, *S] (the kernels address them as [B, *, N] with
N = prod(S)); M (decay): [d, d]; all contiguous, one dtype (float32, float64, float16, bfloat16; fp16/bf16
accumulate in fp32), one device.

A tile is BLOCK_N positions of one batch element with all d channels (padded to D_PAD = next power of 2) in
registers, so the forward reads h and f once and writes h_next and v once. The channel mix uses ``tl.dot`` (tensor
cores) for float16 and bfloat16 at d >= 16, and rank-1 FMA updates over the input channels otherwise (float32,
float64, small d). The backward's dL/dM = sum_{b,n} g f^T is reduced without atomics: a persistent
kernel accumulates one [d, d] partial per program in registers, and a second kernel sums the partials in a
fixed order (bitwise reproducible for a given config and device).

Routing by channel count (D_PAD = next power of two >= d): up to 64 the kernels do everything; from 65 to 128 the
[D_PAD, D_PAD] accumulator would no longer fit in registers, so the backward kernel writes g and grad_f and
dL/dM = sum_b g f^T is one fp32 matmul; above 128 even a [D_PAD, BLOCK_N] tile spills, and both passes are the
eager computation in the compute dtype (matmuls: at that size the op is compute-bound, and cuBLAS is the right tool).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .. import _reference
from .._params import spatial_numel
from ..ops._checks import flat
from ._utils import (
    INTERPRETING,
    check_launchable,
    device_guard,
    kernel_is_interpreted,
    max_resident_programs,
    partial_dtype,
    sum_partials_kernel,
    upcast,
)

# d at which the half-precision channel mix switches from FMA updates to tensor-core tl.dot (tl.dot needs >= 16 per
# dim). float32 always uses the FMA updates: its IEEE-precision tl.dot runs on FMAs anyway (TF32 would not match
# eager float32), and for sm_90 ptxas spills it in nearly every tile size (up to 9 KB a thread at d = 18).
_DOT_MIN_CHANNELS = 16
_DOT_DTYPES = (torch.float16, torch.bfloat16)
# Largest BLOCK_N of any config: the persistent backward sizes its grid with it, so every program gets a tile.
_MAX_BLOCK_N = 256
_SUM_BLOCK = 256
# Largest D_PAD whose [D_PAD, D_PAD] grad_decay accumulator stays in the backward kernel's registers, and largest
# D_PAD the kernels run at all (see the module docstring).
_ACCUMULATE_MAX_D_PAD = 64
_KERNEL_MAX_D_PAD = 128
# Cap of the backward's partials workspace: 64 MiB of fp32.
_MAX_PARTIAL_ELEMENTS = 1 << 24


def _values_per_thread_budget(backward: bool, use_dot: bool, d_pad: int, is_fp64: bool) -> int:
    """Most [D_PAD, BLOCK_N] tile values a thread may hold: the largest tiles that ptxas compiled for sm_90 without
    spilling registers at d = 4, 18, 33 and 64 (`python tests/compile_triton_for_gpu.py --full --resources`).
    The forward's rank-1 updates also hold a D_PAD-long column, so wide tiles fit only up to D_PAD = 32; the
    backward holds g and f at once, and with tl.dot its operands and accumulators too. float64 takes 2 registers."""
    if backward:
        budget = 8 if use_dot else 16
    else:
        budget = 64 if d_pad <= 32 else 16
    return budget // 2 if is_fp64 else budget


def _configs():
    if INTERPRETING:
        # The interpreter runs programs one by one in numpy: one fixed config, small enough that the test
        # shapes span several tiles and exercise the N masks.
        return [triton.Config({"BLOCK_N": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=nw) for bn in (32, 64, 128, _MAX_BLOCK_N) for nw in (4, 8)]


def _values_per_thread(config, d_pad: int, accumulator: bool = False) -> float:
    """[D_PAD, BLOCK_N] tile values a thread holds, plus its share of a [D_PAD, D_PAD] accumulator."""
    values = d_pad * config.kwargs["BLOCK_N"] + (d_pad * d_pad if accumulator else 0)
    return values / (32 * config.num_warps)


def _config_pruner(backward: bool):
    """An early_config_prune that keeps the configs whose tile fits the thread budget above (the others spill), or
    else the one with the smallest tile."""
    def prune(configs, named_args, **kwargs):
        def flag(name, default):
            return named_args.get(name, kwargs.get(name, default))
        d_pad = flag("D_PAD", 16)
        accumulator = backward and flag("ACC_DECAY", True)
        limit = _values_per_thread_budget(backward, flag("USE_DOT", False), d_pad, flag("IS_FP64", False))
        fitting = [c for c in configs if _values_per_thread(c, d_pad, accumulator) <= limit]
        return fitting or [min(configs, key=lambda c: _values_per_thread(c, d_pad, accumulator))]
    return prune


_FORWARD_AUTOTUNE = dict(configs=_configs(), key=["d", "N"],
                         prune_configs_by={"early_config_prune": _config_pruner(backward=False)})
_BACKWARD_AUTOTUNE = dict(configs=_configs(), key=["d", "N"],
                          prune_configs_by={"early_config_prune": _config_pruner(backward=True)})


@triton.autotune(**_FORWARD_AUTOTUNE)
@triton.jit
def _feedback_step_forward_kernel(
    h_ptr, f_ptr, decay_ptr, h_next_ptr, v_ptr,
    d, N, num_feedback,
    D_PAD: tl.constexpr, USE_DOT: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program = positions [n0, n0 + BLOCK_N) of batch b, all d channels."""
    pid = tl.program_id(0).to(tl.int64)  # int64 from here on: offsets may exceed 2^31
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    b = pid // num_n_blocks
    pos = (pid - b * num_n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    chan = tl.arange(0, D_PAD)
    chan_ok = chan < d
    pos_ok = pos < N
    tile_mask = chan_ok[:, None] & pos_ok[None, :]
    batch_base = b * d * N
    tile_offsets = batch_base + chan[:, None].to(tl.int64) * N + pos[None, :]

    h_next = upcast(tl.load(h_ptr + tile_offsets, mask=tile_mask, other=0.0), IS_FP64)
    if USE_DOT:
        f = tl.load(f_ptr + tile_offsets, mask=tile_mask, other=0.0)
        decay = tl.load(decay_ptr + chan[:, None] * d + chan[None, :], mask=chan_ok[:, None] & chan_ok[None, :],
                        other=0.0)
        h_next = tl.dot(decay, f, h_next)  # tensor cores, fp32 accumulation
    else:
        # h_next += M[:, j] (outer) f[j, :] for each input channel j: registers stay [D_PAD, BLOCK_N] for any d.
        f_row_ptr = f_ptr + batch_base + pos
        for j in range(d):
            f_row = upcast(tl.load(f_row_ptr, mask=pos_ok, other=0.0), IS_FP64)
            decay_col = upcast(tl.load(decay_ptr + chan * d + j, mask=chan_ok, other=0.0), IS_FP64)
            h_next += decay_col[:, None] * f_row[None, :]
            f_row_ptr += N
    tl.store(h_next_ptr + tile_offsets, h_next.to(h_next_ptr.dtype.element_ty), mask=tile_mask)

    # Softmax over the feedback channels d-k .. d-1 of the unrounded h_next; other rows are -inf so they vanish.
    first_feedback = d - num_feedback
    is_feedback = (chan >= first_feedback) & chan_ok
    logits = tl.where(is_feedback[:, None], h_next, float("-inf"))
    shifted = logits - tl.max(logits, axis=0)[None, :]
    numer = tl.exp(shifted)
    v = numer / tl.sum(numer, axis=0)[None, :]
    v_offsets = b * num_feedback * N + (chan[:, None] - first_feedback).to(tl.int64) * N + pos[None, :]
    tl.store(v_ptr + v_offsets, v.to(v_ptr.dtype.element_ty), mask=is_feedback[:, None] & pos_ok[None, :])


@triton.autotune(**_BACKWARD_AUTOTUNE)
@triton.jit
def _feedback_step_backward_kernel(
    grad_h_ptr, grad_v_ptr, f_ptr, v_ptr, decay_ptr,
    grad_h_in_ptr, grad_f_ptr, partial_ptr,
    B, d, N, num_feedback, num_programs,
    HAS_GRAD_H: tl.constexpr, HAS_GRAD_V: tl.constexpr,
    WRITE_G: tl.constexpr, WRITE_GRAD_F: tl.constexpr, ACC_DECAY: tl.constexpr,
    D_PAD: tl.constexpr, USE_DOT: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Persistent: program p handles tiles p, p + P, ... (tile = BLOCK_N positions of one b) and writes
    grad_h_in = g (WRITE_G), grad_f = M^T g (WRITE_GRAD_F) per tile, and partial[p] = sum over its tiles of g f^T
    ([d, d], ACC_DECAY). Only what is asked for is computed."""
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.cast(num_n_blocks, tl.int64) * B
    chan = tl.arange(0, D_PAD)
    chan_ok = chan < d
    square_mask = chan_ok[:, None] & chan_ok[None, :]
    first_feedback = d - num_feedback
    is_feedback = (chan >= first_feedback) & chan_ok

    if USE_DOT:
        # M^T as a [D_PAD, D_PAD] tile, loaded once per program: decay_t[i, j] = M[j, i].
        decay_t = tl.load(decay_ptr + chan[None, :] * d + chan[:, None], mask=square_mask, other=0.0)
    if ACC_DECAY:
        grad_decay = upcast(tl.zeros([D_PAD, D_PAD], dtype=partial_ptr.dtype.element_ty), IS_FP64)

    for tile in range(pid, num_tiles, num_programs):
        tile = tl.cast(tile, tl.int64)
        b = tile // num_n_blocks
        pos = (tile - b * num_n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        pos_ok = pos < N
        tile_mask = chan_ok[:, None] & pos_ok[None, :]
        batch_base = b * d * N
        tile_offsets = batch_base + chan[:, None].to(tl.int64) * N + pos[None, :]

        # g = grad_h (0 if absent), plus the softmax backward on the feedback rows.
        if HAS_GRAD_H:
            g = upcast(tl.load(grad_h_ptr + tile_offsets, mask=tile_mask, other=0.0), IS_FP64)
        else:
            g = upcast(tl.zeros([D_PAD, BLOCK_N], dtype=f_ptr.dtype.element_ty), IS_FP64)
        if HAS_GRAD_V:
            feedback_mask = is_feedback[:, None] & pos_ok[None, :]
            v_offsets = b * num_feedback * N + (chan[:, None] - first_feedback).to(tl.int64) * N + pos[None, :]
            v = upcast(tl.load(v_ptr + v_offsets, mask=feedback_mask, other=0.0), IS_FP64)
            grad_v = upcast(tl.load(grad_v_ptr + v_offsets, mask=feedback_mask, other=0.0), IS_FP64)
            v_dot_grad = tl.sum(v * grad_v, axis=0)
            # where(): a NaN/Inf in v_dot_grad must not leak into the non-feedback rows through 0 * NaN.
            g += tl.where(is_feedback[:, None], v * (grad_v - v_dot_grad[None, :]), 0.0)
        if WRITE_G:
            tl.store(grad_h_in_ptr + tile_offsets, g.to(grad_h_in_ptr.dtype.element_ty), mask=tile_mask)

        if USE_DOT:
            g_in = g.to(f_ptr.dtype.element_ty)  # tensor cores take the input dtype; accumulation stays fp32
            if WRITE_GRAD_F:
                grad_f = tl.dot(decay_t, g_in, tl.zeros([D_PAD, BLOCK_N], dtype=tl.float32))
                tl.store(grad_f_ptr + tile_offsets, grad_f.to(grad_f_ptr.dtype.element_ty), mask=tile_mask)
            if ACC_DECAY:
                f = tl.load(f_ptr + tile_offsets, mask=tile_mask, other=0.0)
                grad_decay = tl.dot(g_in, tl.trans(f), grad_decay)
        elif WRITE_GRAD_F or ACC_DECAY:
            # Per input channel j: grad_f[j, :] = M[:, j] . g (reduce over rows); dM[:, j] += g . f[j, :].
            f_row_ptr = f_ptr + batch_base + pos
            grad_f_row_ptr = grad_f_ptr + batch_base + pos
            for j in range(d):
                if WRITE_GRAD_F:
                    decay_col = upcast(tl.load(decay_ptr + chan * d + j, mask=chan_ok, other=0.0), IS_FP64)
                    grad_f_row = tl.sum(decay_col[:, None] * g, axis=0)
                    tl.store(grad_f_row_ptr, grad_f_row.to(grad_f_ptr.dtype.element_ty), mask=pos_ok)
                if ACC_DECAY:
                    f_row = upcast(tl.load(f_row_ptr, mask=pos_ok, other=0.0), IS_FP64)
                    grad_decay_col = tl.sum(g * f_row[None, :], axis=1)
                    grad_decay += tl.where(chan[None, :] == j, grad_decay_col[:, None], 0.0)
                f_row_ptr += N
                grad_f_row_ptr += N

    if ACC_DECAY:
        partial_offsets = pid.to(tl.int64) * d * d + chan[:, None] * d + chan[None, :]
        tl.store(partial_ptr + partial_offsets, grad_decay, mask=square_mask)


_FORWARD_INTERPRETED = kernel_is_interpreted(_feedback_step_forward_kernel)


def _launch_flags(x: Tensor, d: int) -> dict:
    use_dot = d >= _DOT_MIN_CHANNELS and x.dtype in _DOT_DTYPES
    return dict(D_PAD=_d_pad(d), USE_DOT=use_dot, IS_FP64=x.dtype == torch.float64)


def _d_pad(d: int) -> int:
    return max(triton.next_power_of_2(d), 2)


@triton_op("fbkernels::feedback_step_forward_triton", mutates_args=())
def _feedback_step_forward_op(h: Tensor, f: Tensor, decay: Tensor, num_feedback: int) -> tuple[Tensor, Tensor]:
    B, d, N = h.shape[0], h.shape[1], spatial_numel(h.shape)
    h_next = torch.empty_like(h)
    v = h.new_empty((B, num_feedback, *h.shape[2:]))
    if B * N == 0:
        return h_next, v
    check_launchable(h, _FORWARD_INTERPRETED)
    if _d_pad(d) > _KERNEL_MAX_D_PAD:
        ref_h_next, ref_v = _reference.feedback_step_forward(h, f, decay, num_feedback)
        h_next.copy_(ref_h_next)
        v.copy_(ref_v)
        return h_next, v

    def grid(meta):
        return (B * triton.cdiv(N, meta["BLOCK_N"]),)

    with device_guard(h.device):
        wrap_triton(_feedback_step_forward_kernel)[grid](
            h, f, decay, h_next, v, d, N, num_feedback, **_launch_flags(h, d)
        )
    return h_next, v


@triton_op("fbkernels::feedback_step_backward_triton", mutates_args=())
def _feedback_step_backward_op(
    grad_h: Tensor | None, grad_v: Tensor | None, f: Tensor, v: Tensor, decay: Tensor, num_feedback: int,
    needs_grad: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients in needs_grad order (grad_h_in, grad_f, grad_decay); one not needed is an empty placeholder."""
    B, d, N = f.shape[0], f.shape[1], spatial_numel(f.shape)
    need_h, need_f, need_decay = needs_grad
    grad_h_in = torch.empty_like(f) if need_h else f.new_empty(0)
    grad_f = torch.empty_like(f) if need_f else f.new_empty(0)
    grad_decay = torch.empty_like(decay) if need_decay else decay.new_empty(0)
    if not (need_h or need_f or need_decay):
        return grad_h_in, grad_f, grad_decay
    if B * N == 0:
        return grad_h_in, grad_f, grad_decay.zero_()
    check_launchable(f, _FORWARD_INTERPRETED)
    d_pad = _d_pad(d)
    if d_pad > _KERNEL_MAX_D_PAD:
        for out, ref, need in zip((grad_h_in, grad_f, grad_decay),
                                  _reference.feedback_step_backward(grad_h, grad_v, f, v, decay, num_feedback),
                                  needs_grad):
            if need:
                out.copy_(ref)
        return grad_h_in, grad_f, grad_decay
    accumulate = need_decay and d_pad <= _ACCUMULATE_MAX_D_PAD
    # g for the dL/dM matmul: kept in the accumulation dtype (the fused path never rounds it either).
    g = torch.empty(f.shape, dtype=partial_dtype(f.dtype), device=f.device) if need_decay and not accumulate else None
    # The grid (and so the workspace) is fixed before autotuning picks BLOCK_N: programs loop over tiles.
    num_programs = max(1, min(B * triton.cdiv(N, _MAX_BLOCK_N), max_resident_programs(f.device),
                              _MAX_PARTIAL_ELEMENTS // (d * d)))
    partials = torch.empty((num_programs, d, d) if accumulate else (0,), dtype=partial_dtype(f.dtype),
                           device=f.device)
    with device_guard(f.device):
        wrap_triton(_feedback_step_backward_kernel)[(num_programs,)](
            grad_h if grad_h is not None else f,  # unread placeholder pointers when a gradient is absent
            grad_v if grad_v is not None else v,
            f, v, decay, g if g is not None else (grad_h_in if need_h else f), grad_f if need_f else f, partials,
            B, d, N, num_feedback, num_programs,
            HAS_GRAD_H=grad_h is not None, HAS_GRAD_V=grad_v is not None,
            WRITE_G=need_h or g is not None, WRITE_GRAD_F=need_f, ACC_DECAY=accumulate, **_launch_flags(f, d),
        )
        if accumulate:
            wrap_triton(sum_partials_kernel)[(triton.cdiv(d * d, _SUM_BLOCK),)](
                partials, grad_decay, num_programs, d * d, BLOCK=_SUM_BLOCK
            )
    if g is not None:
        grad_decay.copy_(torch.einsum("bin,bjn->ij", flat(g), flat(f.to(g.dtype))))
        if need_h:
            grad_h_in.copy_(g)
    return grad_h_in, grad_f, grad_decay


def feedback_step_forward(h: Tensor, f: Tensor, decay: Tensor, num_feedback: int) -> tuple[Tensor, Tensor]:
    """(h_next [B, d, *S], v [B, k, *S]) for contiguous h, f: [B, d, *S] and decay: [d, d]; k = num_feedback."""
    return torch.ops.fbkernels.feedback_step_forward_triton(h, f, decay, int(num_feedback))


def feedback_step_backward(
    grad_h: Tensor | None, grad_v: Tensor | None, f: Tensor, v: Tensor, decay: Tensor, num_feedback: int,
    needs_grad=(True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_h_in = g, grad_f = M^T g, grad_decay = sum g f^T) with g = grad_h + softmax backward of grad_v; each
    None where needs_grad says it is not needed (its work is skipped)."""
    needs = [bool(n) for n in needs_grad]
    grads = torch.ops.fbkernels.feedback_step_backward_triton(grad_h, grad_v, f, v, decay, int(num_feedback), needs)
    return tuple(g if need else None for g, need in zip(grads, needs))
