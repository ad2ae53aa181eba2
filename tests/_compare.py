"""Tolerances of the GPU kernels (cuda, triton) against the eager reference, shared by test_gpu.py and
test_cuda_emulation.py: per dtype, widened for sums over many positions."""
import math

import torch

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
}


def assert_close(name, got, expected, dtype, summed_over=1):
    """got == expected within TOL[dtype]; `summed_over` > 1 for a sum over that many positions, whose rounding
    grows like sqrt(summed_over)."""
    tol = dict(TOL[dtype])
    if summed_over > 1:
        tol["atol"] *= math.sqrt(summed_over)
        if dtype in (torch.float16, torch.bfloat16):
            tol["rtol"] *= 4
    torch.testing.assert_close(got.float(), expected.float(), **tol, msg=lambda m: f"{name}: {m}")
