"""Shared host-side helpers of the Triton kernels: interpreter detection, device checks, launch sizes, configs."""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# triton.jit picks the interpreter when the decorator runs, i.e. when the kernels below and in the op modules are
# defined (TRITON_INTERPRET=1 at import). Read once here so configs and launch sizes match the kernels' mode.
INTERPRETING: bool = bool(triton.knobs.runtime.interpret)

# Programs the persistent backward kernels start when interpreting: few, so every program loops over several
# tiles (and across batch boundaries) even on the tiny test shapes.
_INTERPRETER_PROGRAMS = 4
# Resident programs per SM the persistent kernels aim for on a GPU: enough loads in flight to saturate HBM.
_PROGRAMS_PER_SM = 8


def kernel_is_interpreted(kernel) -> bool:
    """True when the (possibly autotuned) Triton kernel runs in the interpreter on CPU tensors."""
    while hasattr(kernel, "fn") and not isinstance(kernel, InterpretedFunction):
        kernel = kernel.fn
    return isinstance(kernel, InterpretedFunction)


def check_launchable(t: torch.Tensor, interpreted: bool) -> None:
    """Raise a clear error when the kernels cannot run on ``t``'s device in this process."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu":
        if interpreted:
            return
        raise RuntimeError(
            "the triton backend runs on CPU tensors only under Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton and fbkernels.triton are first imported"
        )
    raise RuntimeError(f"the triton backend runs on CUDA tensors (or CPU tensors when interpreting), got {t.device}")


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def max_resident_programs(device: torch.device) -> int:
    """How many programs a persistent (grid-stride) kernel launches at most on ``device``."""
    if device.type == "cuda" and not INTERPRETING:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sm_count(index) * _PROGRAMS_PER_SM
    return _INTERPRETER_PROGRAMS


def device_guard(device: torch.device):
    """Make ``device`` current while launching: Triton launches on the current CUDA device, not the tensors'."""
    if device.type == "cuda" and not INTERPRETING:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def partial_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of reduction workspaces: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.jit
def upcast(x, IS_FP64: tl.constexpr):
    """x in the compute dtype: float64 stays float64, every other float becomes float32.

    tl.cast (not x.to) so that scalar kernel arguments work too: the interpreter passes them as Python floats."""
    if IS_FP64:
        return tl.cast(x, tl.float64)
    else:
        return tl.cast(x, tl.float32)


@triton.jit
def sum_partials_kernel(partial_ptr, out_ptr, num_partials, numel, BLOCK: tl.constexpr):
    """out[i] = sum_p partial[p, i] over p = 0, 1, ... in this fixed order (deterministic, no atomics)."""
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    acc = tl.load(partial_ptr + offsets, mask=mask, other=0.0)
    row_ptr = partial_ptr + offsets
    for _ in range(1, num_partials):
        row_ptr += numel
        acc += tl.load(row_ptr, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
