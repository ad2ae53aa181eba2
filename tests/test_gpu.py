"""GPU backends (cuda, triton) against the eager reference on CUDA tensors. Skipped without a CUDA device.

Run on a GPU machine with a build that has fbkernels._C_cuda (`pip install --no-build-isolation .`):
    pytest tests/test_gpu.py          (add `-m "gpu and slow"` for the > 2^31-element cases)
"""
import math

import pytest
import torch
from torch.library import opcheck

import fbkernels
from fbkernels import _reference

from _compare import TOL, assert_close

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FEEDBACK_SHAPES = [
    (1, 2, 1, (5, 7)),
    (0, 4, 2, (3, 3)),
    (3, 5, 5, ()),
    (2, 18, 2, (37, 41)),
    (1, 18, 18, (13,)),
    (3, 33, 3, (2, 3, 5)),
    (2, 64, 1, (31, 33)),
    (16, 18, 2, (512, 512)),
]


def _skip_unavailable(backend):
    if backend not in fbkernels.available_backends("cuda"):
        pytest.skip(f"{backend} is not available on CUDA here")


def _feedback_inputs(B, d, spatial, dtype, device="cuda"):
    h = torch.randn(B, d, *spatial, device=device).to(dtype)
    f = torch.randn(B, d, *spatial, device=device).to(dtype)
    decay = (torch.randn(d, d, device=device) / math.sqrt(d)).to(dtype)
    return [t.requires_grad_() for t in (h, f, decay)]


def _feedback_outputs_and_grads(backend, h, f, decay, k, w_h, w_v):
    h_next, v = fbkernels.feedback_step(h, f, decay, k, backend=backend)
    if h.numel() == 0:
        return h_next, v
    loss = (h_next.float() * w_h).sum() + (v.float() * w_v).sum()
    return (h_next, v, *torch.autograd.grad(loss, (h, f, decay)))


def _assert_matches(got, expected, dtype, positions, names):
    for name, a, b in zip(names, got, expected):
        assert_close(name, a, b, dtype, summed_over=positions if name in ("ddecay", "da") else 1)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,k,spatial", FEEDBACK_SHAPES)
def test_feedback_step_matches_eager(backend, B, d, k, spatial, dtype):
    _skip_unavailable(backend)
    h, f, decay = _feedback_inputs(B, d, spatial, dtype)
    w_h = torch.randn(B, d, *spatial, device="cuda")
    w_v = torch.randn(B, k, *spatial, device="cuda")
    expected = _feedback_outputs_and_grads("eager", h, f, decay, k, w_h, w_v)
    got = _feedback_outputs_and_grads(backend, h, f, decay, k, w_h, w_v)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    _assert_matches(got, expected, dtype, B * math.prod(spatial), ("h_next", "v", "dh", "df", "ddecay"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,spatial", [(1, 3, (5, 7)), (0, 4, (2, 2)), (3, 16, ()), (128, 64, (32, 32)),
                                         (2, 5, (257, 129)), (4, 512, (4, 4))])
def test_context_gate_matches_eager(backend, B, C, spatial, dtype):
    _skip_unavailable(backend)
    h = torch.randn(B, C, *spatial, device="cuda").to(dtype).requires_grad_()
    a = torch.randn(B, C, device="cuda").to(dtype).requires_grad_()
    w = torch.randn(B, C, *spatial, device="cuda")
    results = {}
    for name in ("eager", backend):
        out = fbkernels.context_gate(h, a, 0.3, backend=name)
        results[name] = (out, *torch.autograd.grad((out.float() * w).sum(), (h, a))) if out.numel() else (out,)
    _assert_matches(results[backend], results["eager"], dtype, math.prod(spatial), ("out", "dh", "da"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    _skip_unavailable(backend)
    h = torch.randn(2, 7, 9, 18, device="cuda").permute(0, 3, 1, 2)
    f = torch.randn(2, 18, 9, 7, device="cuda").transpose(2, 3)
    decay = torch.randn(18, 18, device="cuda").t()
    for a, b in zip(fbkernels.feedback_step(h, f, decay, 2, backend=backend),
                    fbkernels.feedback_step(h, f, decay, 2, backend="eager")):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    gate = torch.randn(18, 2, device="cuda").t()
    torch.testing.assert_close(fbkernels.context_gate(h, gate, 0.1, backend=backend),
                               fbkernels.context_gate(h, gate, 0.1, backend="eager"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gradcheck_float64(backend):
    _skip_unavailable(backend)
    h, f, decay = _feedback_inputs(2, 5, (3, 4), torch.float64)
    assert torch.autograd.gradcheck(lambda *xs: fbkernels.feedback_step(*xs, 2, backend=backend), (h, f, decay))
    gh = torch.randn(2, 5, 3, 4, device="cuda", dtype=torch.float64, requires_grad=True)
    ga = torch.randn(2, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, a: fbkernels.context_gate(h, a, 0.35, backend=backend), (gh, ga))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_decay_gradient_is_deterministic(backend):
    _skip_unavailable(backend)
    h, f, decay = _feedback_inputs(8, 18, (128, 128), torch.float32)
    first, second = (torch.autograd.grad(fbkernels.feedback_step(h, f, decay, 2, backend=backend)[1].sum(), decay)[0]
                     for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck(backend):
    _skip_unavailable(backend)
    h, f, decay = _feedback_inputs(2, 6, (3, 4), torch.float64)
    opcheck(torch.ops.fbkernels.feedback_step.default, (h, f, decay, 2, backend))
    opcheck(torch.ops.fbkernels.feedback_step.default, (h[:0], f[:0], decay, 6, backend))
    gh = torch.randn(2, 6, 3, 4, device="cuda", dtype=torch.float64, requires_grad=True)
    ga = torch.randn(2, 6, device="cuda", dtype=torch.float64, requires_grad=True)
    opcheck(torch.ops.fbkernels.context_gate.default, (gh, ga, 0.5, backend))
    if backend == "triton":  # the inner triton_op registrations (their fake tracing needs a real GPU kernel)
        x = torch.randn(2, 6, 12, device="cuda")
        opcheck(torch.ops.fbkernels.feedback_step_forward_triton.default, (x, x, torch.randn(6, 6, device="cuda"), 2))
        opcheck(torch.ops.fbkernels.context_gate_forward_triton.default, (x, torch.randn(2, 6, device="cuda"), 0.5))


def _two_steps(backend):
    def fn(h, f, decay, gate):
        for _ in range(2):
            h, v = fbkernels.feedback_step(h, f, decay, 2, backend=backend)
            h = fbkernels.context_gate(h, gate, 0.1, backend=backend)
        return (h * h).sum() + v.sum(dim=(2, 3)).pow(2).sum()
    return fn


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph_and_cuda_graphs(backend, mode):
    """reduce-overhead captures CUDA graphs: equal results prove the kernels run on the current stream."""
    _skip_unavailable(backend)
    torch._dynamo.reset()
    h, f, decay = _feedback_inputs(2, 18, (16, 16), torch.float32)
    gate = torch.randn(2, 18, device="cuda", requires_grad=True)
    inputs = (h, f, decay, gate)
    fn = _two_steps(backend)
    compiled = torch.compile(fn, fullgraph=True, mode=mode)
    expected = fn(*inputs)
    expected_grads = torch.autograd.grad(expected, inputs)
    for _ in range(3):  # CUDA graphs record on the first calls and replay after
        got = compiled(*inputs)
        got_grads = torch.autograd.grad(got, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_side_stream(backend):
    _skip_unavailable(backend)
    h, f, decay = (t.detach() for t in _feedback_inputs(4, 18, (64, 64), torch.float32))
    expected = fbkernels.feedback_step(h, f, decay, 2, backend="eager")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = fbkernels.feedback_step(h, f, decay, 2, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_pow_31_elements(backend):
    """B * d * N > 2^31: offsets must be 64-bit. Checked on the last positions (the op is per position)."""
    _skip_unavailable(backend)
    dtype, d, k = torch.bfloat16, 4, 2
    N = 2**31 // d + 4099
    h = torch.randn(1, d, N, device="cuda", dtype=dtype)
    f = torch.randn(1, d, N, device="cuda", dtype=dtype)
    decay = torch.randn(d, d, device="cuda", dtype=dtype)
    h_next, v = fbkernels.feedback_step(h, f, decay, k, backend=backend)
    tail = slice(N - 4096, N)
    ref_h, ref_v = _reference.feedback_step_forward(h[..., tail], f[..., tail], decay, k)
    torch.testing.assert_close(h_next[..., tail].float(), ref_h.float(), **TOL[dtype])
    torch.testing.assert_close(v[..., tail].float(), ref_v.float(), **TOL[dtype])
    del h_next, v
    gate = torch.randn(1, d, device="cuda", dtype=dtype)
    out = fbkernels.context_gate(h, gate, 0.0, backend=backend)
    torch.testing.assert_close(out[..., tail].float(),
                               _reference.context_gate_forward(h[..., tail], gate, 0.0).float(), **TOL[dtype])
