"""The Triton kernels on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py), against the eager reference.

Small shapes only: the interpreter runs every program in numpy. Under the interpreter the kernels use small tiles
(fbkernels/triton/_utils.py) so that these shapes still span several tiles, chunks and persistent-loop rounds.
"""
import math

import pytest
import torch

import fbkernels
from fbkernels import _reference

pytestmark = pytest.mark.skipif(
    "triton" not in fbkernels.available_backends("cpu"), reason="triton not installed or not interpreting"
)

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}

# (B, d, k, spatial): batch 0/1/3, d below and above the tl.dot threshold (16) and not a power of 2,
# k = 1 and k = d, 0-D to 3-D spatial with 1x1 and odd sizes, N not a multiple of the tile.
FEEDBACK_SHAPES = [
    (1, 2, 1, (5, 7)),
    (0, 4, 2, (3, 3)),
    (3, 5, 5, ()),
    (2, 18, 2, (9, 11)),
    (1, 18, 18, (13,)),
    (3, 33, 3, (2, 3, 5)),
    (1, 64, 1, (4, 10)),
    (2, 65, 3, (3, 7)),     # 65..128: grad_decay by a matmul on g, not the in-register accumulator
    (1, 130, 2, (2, 5)),    # > 128: both passes by matmuls
]
# CBL-CNN maps (2x2 .. 16x16 positions, many channels) and rows longer than a chunk.
GATE_SHAPES = [(1, 3, (5, 7)), (0, 4, (2, 2)), (3, 16, ()), (2, 7, (1, 1)), (2, 5, (11, 13)), (1, 2, (2, 3, 40)),
               (2, 64, (2, 2)), (3, 33, (4, 4)), (1, 9, (16, 16))]


def _feedback_inputs(B, d, spatial, dtype):
    h = torch.randn(B, d, *spatial, dtype=dtype)
    f = torch.randn(B, d, *spatial, dtype=dtype)
    decay = torch.randn(d, d, dtype=dtype) / math.sqrt(d)
    return [t.requires_grad_() for t in (h, f, decay)]


def _feedback_outputs_and_grads(backend, h, f, decay, k, w_h, w_v):
    h_next, v = fbkernels.feedback_step(h, f, decay, k, backend=backend)
    if h.numel() == 0:
        return h_next, v
    loss = (h_next * w_h).sum() + (v * w_v).sum()
    return (h_next, v, *torch.autograd.grad(loss, (h, f, decay)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,d,k,spatial", FEEDBACK_SHAPES)
def test_feedback_step_matches_eager(B, d, k, spatial, dtype):
    h, f, decay = _feedback_inputs(B, d, spatial, dtype)
    w_h, w_v = torch.randn(B, d, *spatial, dtype=dtype), torch.randn(B, k, *spatial, dtype=dtype)
    expected = _feedback_outputs_and_grads("eager", h, f, decay, k, w_h, w_v)
    got = _feedback_outputs_and_grads("triton", h, f, decay, k, w_h, w_v)
    for name, a, b in zip(("h_next", "v", "dh", "df", "ddecay"), got, expected):
        tol = dict(TOL[dtype])
        if name == "ddecay":  # a sum over B*N positions
            tol["atol"] *= math.sqrt(max(1, B * math.prod(spatial)))
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("use", ["h", "v"])
def test_feedback_step_backward_with_one_upstream_gradient(use):
    """Only h_next or only v reaches the loss: the kernel skips the absent gradient instead of reading zeros."""
    h, f, decay = _feedback_inputs(2, 18, (5, 7), torch.float32)
    grads = {}
    for backend in ("eager", "triton"):
        h_next, v = fbkernels.feedback_step(h, f, decay, 2, backend=backend)
        out = h_next if use == "h" else v
        grads[backend] = torch.autograd.grad((out * out).sum(), (h, f, decay))
    for a, b in zip(grads["triton"], grads["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


# bfloat16 keeps d < 16 (the FMA path): Triton's interpreter multiplies the raw bit patterns of bfloat16 tl.dot
# operands (triton-lang/triton#11584, unsupported upstream); the tl.dot path in bfloat16 is tested on GPU.
@pytest.mark.parametrize("dtype,d", [(torch.float16, 18), (torch.float16, 8), (torch.bfloat16, 8)])
def test_half_precision_accumulates_in_float32(dtype, d):
    h, f, decay = (t.detach() for t in _feedback_inputs(2, d, (6, 5), torch.float32))
    half = [t.to(dtype) for t in (h, f, decay)]
    got = fbkernels.feedback_step(*half, 2, backend="triton")
    expected = _reference.feedback_step_forward(*half, 2)
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])
    gh, ga = torch.randn(3, 6, 7, 5).to(dtype), torch.randn(3, 6).to(dtype)
    torch.testing.assert_close(fbkernels.context_gate(gh, ga, 0.25, backend="triton").float(),
                               _reference.context_gate_forward(gh, ga, 0.25).float(), **TOL[dtype])


def test_feedback_step_non_contiguous_inputs():
    h = torch.randn(2, 7, 9, 18).permute(0, 3, 1, 2)  # [2, 18, 7, 9], channels last in memory
    f = torch.randn(2, 18, 9, 7).transpose(2, 3)  # [2, 18, 7, 9], spatial dims swapped
    decay = torch.randn(18, 18).t()
    assert not (h.is_contiguous() or f.is_contiguous() or decay.is_contiguous())
    for a, b in zip(fbkernels.feedback_step(h, f, decay, 2, backend="triton"),
                    fbkernels.feedback_step(h, f, decay, 2, backend="eager")):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_feedback_step_gradcheck_float64():
    h, f, decay = _feedback_inputs(2, 5, (3, 2), torch.float64)
    assert torch.autograd.gradcheck(lambda *xs: fbkernels.feedback_step(*xs, 2, backend="triton"), (h, f, decay))


def test_feedback_step_decay_gradient_is_deterministic():
    h, f, decay = _feedback_inputs(3, 18, (17, 19), torch.float32)
    first, second = (torch.autograd.grad(fbkernels.feedback_step(h, f, decay, 2, backend="triton")[1].sum(), decay)[0]
                     for _ in range(2))
    assert torch.equal(first, second)


def test_nan_stays_at_its_position():
    h, f, decay = (t.detach() for t in _feedback_inputs(1, 6, (4,), torch.float32))
    f[0, :, 2] = float("nan")
    h_next, v = fbkernels.feedback_step(h, f, decay, 2, backend="triton")
    assert torch.isnan(h_next[0, :, 2]).all() and torch.isnan(v[0, :, 2]).all()
    keep = [0, 1, 3]
    assert torch.isfinite(h_next[0][:, keep]).all() and torch.isfinite(v[0][:, keep]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("B,C,spatial", GATE_SHAPES)
def test_context_gate_matches_eager(B, C, spatial, alpha, dtype):
    h = torch.randn(B, C, *spatial, dtype=dtype, requires_grad=True)
    a = torch.randn(B, C, dtype=dtype, requires_grad=True)
    w = torch.randn(B, C, *spatial, dtype=dtype)
    results = {}
    for backend in ("eager", "triton"):
        out = fbkernels.context_gate(h, a, alpha, backend=backend)
        grads = torch.autograd.grad((out * w).sum(), (h, a)) if out.numel() else ()
        results[backend] = (out, *grads)
    for name, x, y in zip(("out", "dh", "da"), results["triton"], results["eager"]):
        tol = dict(TOL[dtype])
        if name == "da":  # a sum over the positions
            tol["atol"] *= math.sqrt(max(1, math.prod(spatial)))
        torch.testing.assert_close(x, y, **tol, msg=lambda m: f"{name}: {m}")


def test_context_gate_gradcheck_float64_and_non_contiguous():
    h = torch.randn(3, 4, 2, dtype=torch.float64).transpose(0, 2).requires_grad_()  # [2, 4, 3], strided
    a = torch.randn(4, 2, dtype=torch.float64).t().requires_grad_()  # [2, 4], strided
    assert torch.autograd.gradcheck(lambda h, a: fbkernels.context_gate(h, a, 0.35, backend="triton"), (h, a))



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
