"""The parameter structs of the compiled kernels (csrc/common.h), filled the same way for the cpp and cuda backends.

Each compiled module (fbkernels._C, _C_avx2, _C_avx512, _C_cuda) registers its own Python classes
FeedbackStepParams and ContextGateParams for the same C++ structs; a struct is made by the module that will run it.
Tensors become their data pointers, None becomes 0 (absent); sizes come from ``like`` ([B, C, *S]: B, C and
N = spatial_numel), the dtype code from its dtype.
"""
from __future__ import annotations

import math

import torch

# csrc/common.h's DType codes.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def spatial_numel(shape) -> int:
    """N = prod(S) of a [B, C, *S] shape: the positions per (b, c) that every kernel sees (1 for [B, C])."""
    return math.prod(shape[2:])


def dtype_code(t: torch.Tensor) -> int:
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"the compiled kernels take {[str(d) for d in DTYPE_CODES]}, got {t.dtype}")
    return code


def pointer(t: torch.Tensor | None) -> int:
    """A tensor's data pointer, 0 (absent) for None: what a struct's pointer field holds."""
    return 0 if t is None else t.data_ptr()


def _fill(params, fields: dict):
    # One expression per field: this runs on every kernel call, and small kernels take only microseconds.
    for name, value in fields.items():
        setattr(params, name, pointer(value) if value is None or isinstance(value, torch.Tensor) else value)
    return params


def feedback_step_params(module, like: torch.Tensor, num_feedback: int, **fields):
    """module.FeedbackStepParams for a state ``like`` [B, d, *S] with k = num_feedback, then ``fields`` (tensors,
    None, ints or flags by field name)."""
    params = module.FeedbackStepParams()
    shape = like.shape
    params.B, params.d, params.N = shape[0], shape[1], spatial_numel(shape)
    params.k = int(num_feedback)
    params.dtype = dtype_code(like)
    return _fill(params, fields)


def context_gate_params(module, like: torch.Tensor, alpha: float, **fields):
    """module.ContextGateParams for a feature map ``like`` [B, C, *S] and blend factor alpha, then ``fields``."""
    params = module.ContextGateParams()
    shape = like.shape
    params.B, params.C, params.N = shape[0], shape[1], spatial_numel(shape)
    params.alpha = float(alpha)
    params.dtype = dtype_code(like)
    return _fill(params, fields)
