"""How tests compare a backend with the reference: one tolerance per dtype, and allocations pre-filled with NaN.

The reference is the eager op computed in float64 from the same inputs, so one tolerance per dtype covers every
backend: float32 and float64 rounding of the fused kernels, and the single final rounding of float16 and bfloat16
outputs (their kernels accumulate in float32).
"""
import contextlib
import math

import torch

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
}


def assert_close(name, got, expected, dtype, summed_over=1):
    """got == expected within TOL[dtype]; ``summed_over`` > 1 for a sum over that many positions, whose rounding
    grows like sqrt(summed_over)."""
    tol = dict(TOL[dtype])
    if summed_over > 1:
        tol["atol"] *= math.sqrt(summed_over)
        if dtype in (torch.float16, torch.bfloat16):
            tol["rtol"] *= 4
    torch.testing.assert_close(got.double(), expected.double(), **tol, msg=lambda m: f"{name}: {m}")


@contextlib.contextmanager
def nan_filled_allocations():
    """Inside, torch.empty, torch.empty_like and Tensor.new_empty return floating tensors filled with NaN, so an
    output element that a kernel forgets to write (or a workspace it reads before writing) shows as NaN."""
    originals = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poisoned(allocate):
        def allocate_nan(*args, **kwargs):
            tensor = allocate(*args, **kwargs)
            if tensor.is_floating_point():
                tensor.fill_(math.nan)
            return tensor
        return allocate_nan

    torch.empty, torch.empty_like, torch.Tensor.new_empty = (poisoned(a) for a in originals)
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = originals
