"""feedback_step, context_gate and decay_matrix: every CPU backend against the eager reference, plus the API."""
import math

import pytest
import torch
from torch.library import opcheck

import fbkernels
from fbkernels import _reference

NATIVE_CPU = [b for b in ("cpp",) if b in fbkernels.available_backends("cpu")]
needs_cpp = pytest.mark.skipif("cpp" not in NATIVE_CPU, reason="fbkernels._C not built")
# Registration-level checks (opcheck, torch.compile) also cover triton, under its interpreter on CPU (conftest.py).
# Its kernels' numerics against eager are in tests/test_triton.py, on shapes small enough for the interpreter.
REGISTERED_CPU = [b for b in ("eager", "cpp", "triton") if b in fbkernels.available_backends("cpu")]

# (B, d, k, spatial) covering batch 0/1/3, d 2..64, k = 1 and k = d, 0-D to 3-D spatial with 1x1 and odd sizes.
FEEDBACK_SHAPES = [
    (1, 2, 1, (5, 7)),
    (3, 2, 2, (1, 1)),
    (0, 4, 2, (3, 3)),
    (1, 5, 5, ()),
    (3, 18, 2, (9, 11)),
    (1, 18, 18, (13,)),
    (3, 7, 1, (1,)),
    (1, 33, 3, (2, 3, 5)),
    (3, 64, 1, (4, 6)),
    (1, 64, 64, (1, 1, 1)),
    (2, 18, 2, (37, 41)),
]
GATE_SHAPES = [(1, 3, (5, 7)), (0, 4, (2, 2)), (3, 16, ()), (2, 7, (1, 1)), (3, 64, (9,)), (2, 5, (2, 3, 4))]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _feedback_inputs(B, d, spatial, dtype, requires_grad=True):
    h = torch.randn(B, d, *spatial, dtype=dtype)
    f = torch.randn(B, d, *spatial, dtype=dtype)
    decay = torch.randn(d, d, dtype=dtype) / math.sqrt(d)
    return [t.requires_grad_(requires_grad) for t in (h, f, decay)]


def _run_feedback(backend, h, f, decay, k, weights, use=("h", "v")):
    """Outputs and gradients of loss = <w_h, h_next> + <w_v, v> (only the used outputs enter the loss)."""
    h_next, v = fbkernels.feedback_step(h, f, decay, k, backend=backend)
    loss = 0.0
    if "h" in use:
        loss = loss + (h_next * weights[0]).sum()
    if "v" in use:
        loss = loss + (v * weights[1]).sum()
    grads = torch.autograd.grad(loss, (h, f, decay), allow_unused=True) if h.numel() else (None,) * 3
    return (h_next, v, *grads)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,d,k,spatial", FEEDBACK_SHAPES)
def test_feedback_step_matches_eager(B, d, k, spatial, dtype):
    h, f, decay = _feedback_inputs(B, d, spatial, dtype)
    weights = (torch.randn(B, d, *spatial, dtype=dtype), torch.randn(B, k, *spatial, dtype=dtype))
    expected = _run_feedback("eager", h, f, decay, k, weights)
    for backend in NATIVE_CPU:
        got = _run_feedback(backend, h, f, decay, k, weights)
        assert got[0].shape == (B, d, *spatial) and got[1].shape == (B, k, *spatial)
        for name, a, b in zip(("h_next", "v", "dh", "df", "ddecay"), got, expected):
            if b is None:
                continue
            tol = dict(TOL[dtype])
            if name == "ddecay":
                # A sum over B*N positions: rounding grows like sqrt(B*N) whatever the summation order.
                tol["atol"] *= math.sqrt(max(1, B * math.prod(spatial)))
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{backend} {name}: {m}")


@needs_cpp
@pytest.mark.parametrize("use", [("h",), ("v",)])
def test_feedback_step_one_output_used(use):
    """Gradients when only h_next or only v reaches the loss (the other upstream gradient is absent)."""
    h, f, decay = _feedback_inputs(2, 6, (5, 4), torch.float64)
    weights = (torch.randn(2, 6, 5, 4, dtype=torch.float64), torch.randn(2, 3, 5, 4, dtype=torch.float64))
    expected = _run_feedback("eager", h, f, decay, 3, weights, use)
    got = _run_feedback("cpp", h, f, decay, 3, weights, use)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@needs_cpp
def test_feedback_step_non_contiguous_inputs():
    base_h = torch.randn(3, 8, 11, 6, dtype=torch.float64)
    h = base_h.transpose(2, 3).requires_grad_()  # strided spatial dims
    f = torch.randn(3, 16, 6, 11, dtype=torch.float64)[:, ::2].requires_grad_()  # every other channel
    decay = torch.randn(8, 8, dtype=torch.float64).t().requires_grad_()  # column-major decay
    assert not (h.is_contiguous() or f.is_contiguous() or decay.is_contiguous())
    weights = (torch.randn(3, 8, 6, 11, dtype=torch.float64), torch.randn(3, 2, 6, 11, dtype=torch.float64))
    expected = _run_feedback("eager", h, f, decay, 2, weights)
    got = _run_feedback("cpp", h, f, decay, 2, weights)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


@needs_cpp
def test_feedback_step_gradcheck_float64():
    h, f, decay = _feedback_inputs(2, 5, (3, 2), torch.float64)
    assert torch.autograd.gradcheck(lambda *x: fbkernels.feedback_step(*x, 2, backend="cpp"), (h, f, decay))
    assert torch.autograd.gradcheck(lambda *x: fbkernels.feedback_step(*x, 5, backend="cpp")[1], (h, f, decay))


def test_feedback_step_eager_gradcheck_float64():
    h, f, decay = _feedback_inputs(2, 4, (3,), torch.float64)
    assert torch.autograd.gradcheck(lambda *x: fbkernels.feedback_step(*x, 1, backend="eager"), (h, f, decay))


@needs_cpp
def test_feedback_step_decay_gradient_is_deterministic():
    h, f, decay = _feedback_inputs(4, 18, (64, 64), torch.float32)
    grads = [torch.autograd.grad(fbkernels.feedback_step(h, f, decay, 2, backend="cpp")[1].pow(2).sum(), decay)[0]
             for _ in range(3)]
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@needs_cpp
def test_nan_stays_at_its_position():
    h, f, decay = _feedback_inputs(2, 6, (4, 5), torch.float32, requires_grad=False)
    f[1, 3, 2, 2] = float("nan")
    h[0, 0, 1, 1] = float("inf")
    h_next, v = fbkernels.feedback_step(h, f, decay, 2, backend="cpp")
    bad = torch.zeros(2, 4, 5, dtype=torch.bool)
    bad[1, 2, 2] = bad[0, 1, 1] = True
    assert torch.isfinite(h_next.permute(0, 2, 3, 1)[~bad]).all()
    assert torch.isfinite(v.permute(0, 2, 3, 1)[~bad]).all()
    assert torch.isnan(h_next[1, :, 2, 2]).all()


def _gate_inputs(B, C, spatial, dtype):
    h = torch.randn(B, C, *spatial, dtype=dtype, requires_grad=True)
    a = (2 * torch.randn(B, C, dtype=dtype)).requires_grad_()
    return h, a


def _run_gate(backend, h, a, alpha, weight):
    out = fbkernels.context_gate(h, a, alpha, backend=backend)
    if not h.numel():
        return (out,)
    return (out, *torch.autograd.grad((out * weight).sum(), (h, a)))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("B,C,spatial", GATE_SHAPES)
def test_context_gate_matches_eager(B, C, spatial, alpha, dtype):
    h, a = _gate_inputs(B, C, spatial, dtype)
    weight = torch.randn(B, C, *spatial, dtype=dtype)
    expected = _run_gate("eager", h, a, alpha, weight)
    for backend in NATIVE_CPU:
        got = _run_gate(backend, h, a, alpha, weight)
        for x, y in zip(got, expected):
            torch.testing.assert_close(x, y, **TOL[dtype])


@needs_cpp
def test_context_gate_non_contiguous_and_gradcheck():
    h = torch.randn(2, 5, 7, 3, dtype=torch.float64).transpose(2, 3).requires_grad_()
    a = torch.randn(5, 2, dtype=torch.float64).t().requires_grad_()
    weight = torch.randn(2, 5, 3, 7, dtype=torch.float64)
    for x, y in zip(_run_gate("cpp", h, a, 0.25, weight), _run_gate("eager", h, a, 0.25, weight)):
        torch.testing.assert_close(x, y, **TOL[torch.float64])
    assert torch.autograd.gradcheck(lambda h, a: fbkernels.context_gate(h, a, 0.25, backend="cpp"), (h, a))


def test_context_gate_eager_matches_formula():
    h, a = _gate_inputs(2, 3, (4,), torch.float64)
    expected = 0.4 * h + 0.6 * h * torch.sigmoid(a)[:, :, None]
    torch.testing.assert_close(fbkernels.context_gate(h, a, 0.4, backend="eager"), expected)
    assert torch.autograd.gradcheck(lambda h, a: fbkernels.context_gate(h, a, 0.4, backend="eager"), (h, a))


@pytest.mark.parametrize("backend", REGISTERED_CPU)
def test_opcheck(backend):
    h, f, decay = _feedback_inputs(2, 6, (3, 4), torch.float64)
    opcheck(torch.ops.fbkernels.feedback_step.default, (h, f, decay, 2, backend))
    opcheck(torch.ops.fbkernels.feedback_step.default, (h[:0], f[:0], decay, 6, backend))
    gh, ga = _gate_inputs(2, 6, (3, 4), torch.float64)
    opcheck(torch.ops.fbkernels.context_gate.default, (gh, ga, 0.5, backend))


@pytest.mark.parametrize("backend", REGISTERED_CPU)
def test_torch_compile_two_step_loop(backend):
    torch._dynamo.reset()
    h0, f, decay = _feedback_inputs(2, 6, (5, 4), torch.float64)
    gate = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)

    def two_steps(h, f, decay, gate):
        for _ in range(2):
            h, v = fbkernels.feedback_step(h, f, decay, 2, backend=backend)
            h = fbkernels.context_gate(h, gate, 0.1, backend=backend)
        return (h * h).sum() + v.sum(dim=(2, 3)).pow(2).sum()

    compiled = torch.compile(two_steps, fullgraph=True)
    inputs = (h0, f, decay, gate)
    got, expected = compiled(*inputs), two_steps(*inputs)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(a, b)


def test_decay_matrix_math_and_gradients():
    d = 5
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0].requires_grad_()
    basis_inv = basis.detach().t().clone().requires_grad_()
    rates = torch.rand(d, dtype=torch.float64).add(0.5).requires_grad_()
    m = fbkernels.decay_matrix(basis, basis_inv, rates, 2.0, 1.5)
    torch.testing.assert_close(m, basis @ torch.diag(torch.exp(-2.0 * rates / 1.5)) @ basis_inv)
    torch.testing.assert_close(fbkernels.decay_matrix(basis, basis_inv, rates, 0, 1.0), basis @ basis_inv)
    shared = fbkernels.decay_matrix(basis, basis_inv, torch.tensor(1.0, dtype=torch.float64), 1.0, 1.0)
    torch.testing.assert_close(shared, math.exp(-1.0) * basis @ basis_inv)
    assert torch.autograd.gradcheck(lambda p, q, r: fbkernels.decay_matrix(p, q, r, 3.0, 2.0), (basis, basis_inv, rates))


def test_available_backends_and_selection(monkeypatch):
    assert fbkernels.available_backends("cpu")[0] == "eager"
    h, f, decay = _feedback_inputs(1, 4, (3,), torch.float32, requires_grad=False)
    monkeypatch.setenv("FBKERNELS_BACKEND", "eager")
    torch.testing.assert_close(fbkernels.feedback_step(h, f, decay, 2)[0], _reference.feedback_step_forward(h, f, decay, 2)[0])
    monkeypatch.setenv("FBKERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend"):
        fbkernels.feedback_step(h, f, decay, 2)
    monkeypatch.delenv("FBKERNELS_BACKEND")
    with pytest.raises(ValueError, match="cuda"):
        fbkernels.feedback_step(h, f, decay, 2, backend="cuda")
    # Half precision on CPU: the automatic choice falls back to eager instead of failing.
    half = [t.to(torch.bfloat16) for t in (h, f, decay)]
    torch.testing.assert_close(fbkernels.feedback_step(*half, 2)[0].float(),
                               _reference.feedback_step_forward(h, f, decay, 2)[0], rtol=2e-2, atol=5e-2)


@needs_cpp
@pytest.mark.parametrize("prefer_avx2", [False, True])
def test_both_cpu_builds_match_eager(prefer_avx2):
    """The portable module and the AVX2 one (where built and supported) compute the same op within rounding."""
    from fbkernels import _cpp
    if prefer_avx2 and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    module = _cpp.load_kernels(prefer_avx2)
    if prefer_avx2 and module.__name__ != "fbkernels._C_avx2":
        pytest.skip("fbkernels._C_avx2 was not built")
    h, f = torch.randn(3, 18, 99), torch.randn(3, 18, 99)  # canonical [B, d, N]
    decay = torch.randn(18, 18) / math.sqrt(18)
    v = _reference.feedback_step_forward(h, f, decay, 2)[1]
    grad_h, grad_v = torch.randn_like(h), torch.randn_like(v)
    gate_h, gate_a = torch.randn(2, 5, 77), torch.randn(2, 5)
    original = _cpp._C
    try:
        _cpp._C = module
        got = (*_cpp.feedback_step_forward(h, f, decay, 2), *_cpp.feedback_step_backward(grad_h, grad_v, f, v, decay, 2),
               _cpp.context_gate_forward(gate_h, gate_a, 0.3), *_cpp.context_gate_backward(gate_h, gate_h, gate_a, 0.3))
    finally:
        _cpp._C = original
    expected = (*_reference.feedback_step_forward(h, f, decay, 2),
                *_reference.feedback_step_backward(grad_h, grad_v, f, v, decay, 2),
                _reference.context_gate_forward(gate_h, gate_a, 0.3),
                *_reference.context_gate_backward(gate_h, gate_h, gate_a, 0.3))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@needs_cpp
def test_cpp_is_the_automatic_cpu_choice_and_rejects_half(monkeypatch):
    monkeypatch.delenv("FBKERNELS_BACKEND", raising=False)
    from fbkernels.backends import resolve_backend
    assert resolve_backend(None, torch.device("cpu"), torch.float32) == "cpp"
    h, f, decay = (t.half() for t in _feedback_inputs(1, 4, (3,), torch.float32, requires_grad=False))
    with pytest.raises(TypeError, match="cpp"):
        fbkernels.feedback_step(h, f, decay, 2, backend="cpp")


def _bad_feedback_calls():
    h = torch.randn(2, 5, 3, 3)
    f = torch.randn(2, 5, 3, 3)
    m = torch.randn(5, 5)
    return [
        ((h, f[:, :4], m, 2), ValueError, "f"),
        ((h, f.double(), m, 2), TypeError, "f"),
        ((h, f.to("meta"), m, 2), ValueError, "f"),
        ((h.long(), f.long(), m.long(), 2), TypeError, "h"),
        ((torch.randn(5), torch.randn(5), m, 2), ValueError, "h"),
        ((h, f, m, 0), ValueError, "num_feedback"),
        ((h, f, m, 6), ValueError, "num_feedback"),
        ((h, f, m, 2.0), TypeError, "num_feedback"),
        ((h, f, torch.randn(5, 4), 2), ValueError, "decay"),
        ((h, f, torch.randn(25), 2), ValueError, "decay"),
        (("h", f, m, 2), TypeError, "h"),
    ]


@pytest.mark.parametrize("args,error,name", _bad_feedback_calls())
def test_feedback_step_bad_inputs(args, error, name):
    with pytest.raises(error, match=rf"\b{name}\b"):
        fbkernels.feedback_step(*args)


@pytest.mark.parametrize(
    "h,gate,alpha,error,name",
    [
        (torch.randn(2, 3, 4), torch.randn(2, 4), 0.0, ValueError, "gate_logits"),
        (torch.randn(2, 3, 4), torch.randn(2, 3, 1), 0.0, ValueError, "gate_logits"),
        (torch.randn(2, 3, 4), torch.randn(2, 3).double(), 0.0, TypeError, "gate_logits"),
        (torch.randn(2, 3, 4), torch.randn(2, 3), 1.5, ValueError, "alpha"),
        (torch.randn(2, 3, 4), torch.randn(2, 3), -0.1, ValueError, "alpha"),
        (torch.randn(2, 3, 4), torch.randn(2, 3), "x", TypeError, "alpha"),
        (torch.randn(3), torch.randn(3, 1), 0.0, ValueError, "h"),
        (torch.ones(2, 3, 4, dtype=torch.int32), torch.randn(2, 3), 0.0, TypeError, "h"),
    ],
)
def test_context_gate_bad_inputs(h, gate, alpha, error, name):
    with pytest.raises(error, match=rf"\b{name}\b"):
        fbkernels.context_gate(h, gate, alpha)


def test_unknown_backend_and_bad_decay_matrix_inputs():
    h = torch.randn(1, 3, 2)
    with pytest.raises(ValueError, match="backend"):
        fbkernels.context_gate(h, torch.randn(1, 3), 0.5, backend="tpu")
    with pytest.raises(TypeError, match="backend"):
        fbkernels.context_gate(h, torch.randn(1, 3), 0.5, backend=3)
    eye = torch.eye(3)
    with pytest.raises(ValueError, match="basis"):
        fbkernels.decay_matrix(torch.randn(3, 2), eye, torch.ones(3), 1.0, 1.0)
    with pytest.raises(ValueError, match="rates"):
        fbkernels.decay_matrix(eye, eye, torch.ones(4), 1.0, 1.0)
    with pytest.raises(ValueError, match="tau"):
        fbkernels.decay_matrix(eye, eye, torch.ones(3), 1.0, 0.0)
