"""What is particular to the Triton backend, on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py): which
gradients its backward computes, how it tiles CBL-CNN maps and caps its workspace, and that every kernel compiles
for an NVIDIA GPU. Its agreement with the eager reference over the shared shape table is in test_ops.py.
"""
import math

import pytest
import torch

import fbkernels
from fbkernels import _reference

pytestmark = pytest.mark.skipif(
    "triton" not in fbkernels.available_backends("cpu"), reason="triton not installed or not interpreting"
)


@pytest.mark.parametrize("d", [18, 65, 130])
@pytest.mark.parametrize("needs_grad", [(True, False, False), (False, True, False), (False, False, True),
                                        (False, True, True)])
def test_feedback_step_backward_computes_only_what_is_needed(d, needs_grad):
    from fbkernels import triton as triton_backend

    B, k, N = 2, 3, 70
    f, grad_h = torch.randn(B, d, N), torch.randn(B, d, N)
    decay = torch.randn(d, d) / math.sqrt(d)
    v, grad_v = torch.softmax(torch.randn(B, k, N), dim=1), torch.randn(B, k, N)
    got = triton_backend.feedback_step_backward(grad_h, grad_v, f, v, decay, k, needs_grad)
    expected = _reference.feedback_step_backward(grad_h, grad_v, f, v, decay, k)
    for need, a, b in zip(needs_grad, got, expected):
        if need:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
        else:
            assert a is None


@pytest.mark.parametrize("needs_grad", [(True, False), (False, True)])
def test_context_gate_backward_computes_only_what_is_needed(needs_grad):
    from fbkernels import triton as triton_backend

    h, a, grad_out = torch.randn(2, 5, 100), torch.randn(2, 5), torch.randn(2, 5, 100)
    got = triton_backend.context_gate_backward(grad_out, h, a, 0.25, needs_grad)
    for need, x, y in zip(needs_grad, got, _reference.context_gate_backward(grad_out, h, a, 0.25)):
        if need:
            torch.testing.assert_close(x, y)
        else:
            assert x is None


def test_context_gate_tiles_fit_the_map():
    """BLOCK_N follows the map size (no 512-wide tile for a 4-position CBL-CNN map), rows fill the tile."""
    from fbkernels.triton.context_gate import _MAX_BLOCK_N, tile_shape

    block_r, block_n, _ = tile_shape(rows=128 * 64, N=4)
    assert block_n == 16 and block_r * block_n > 16
    assert tile_shape(rows=2, N=10**6)[1] == _MAX_BLOCK_N
    assert tile_shape(rows=1, N=4)[0] == 1


def test_backward_partials_are_capped():
    from fbkernels.triton import feedback_step as module

    assert module._ACCUMULATE_MAX_D_PAD <= 64 < module._KERNEL_MAX_D_PAD
    assert module._MAX_PARTIAL_ELEMENTS // (64 * 64) >= 1


def test_kernels_compile_for_an_nvidia_gpu(tmp_path):
    """Every kernel goes through Triton's full GPU pipeline (through ptxas, for sm_90) in a process without
    the interpreter: the tests above run the interpreter, which accepts code that the GPU compiler may reject."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    script = Path(__file__).with_name("compile_triton_for_gpu.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
