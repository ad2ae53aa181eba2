"""How tests compare a backend with the reference: one tolerance per dtype, allocations pre-filled with NaN, and
each compiled CPU build (cpu_build) as the cpp backend's kernels.

The reference is the eager op computed in float64 from the same inputs, so one tolerance per dtype covers every
backend: float32 and float64 rounding of the fused kernels, and the single final rounding of float16 and bfloat16
outputs (their kernels accumulate in float32).
"""
import contextlib
import math

import pytest
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


# The CPU builds of the cpp backend (fbkernels._cpp.CPU_BUILDS): their kernels differ, so CPU tests run each.
CPU_ISAS = ("default", "avx2", "avx512")


def cpu_build(isa: str):
    """The compiled CPU kernels built for ``isa``; the test is skipped where this CPU does not run them or they were
    not built."""
    from fbkernels import _cpp

    if not _cpp.cpu_runs(isa):
        pytest.skip(f"this CPU does not run the {isa} build")
    try:
        return _cpp.load_kernels(isa)
    except ImportError:
        pytest.skip(f"the {isa} build was not built")
