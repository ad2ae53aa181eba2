"""feedback_step, context_gate and decay_matrix on every available (backend, device, dtype), against the reference.

CASES is the one list of what runs here: eager and cpp on CPU, triton on CPU under its interpreter (conftest.py sets
TRITON_INTERPRET=1), and eager, cuda and triton on CUDA tensors when a GPU is visible. Every case runs the one shape
table, with expected values from the eager op in float64, the tolerance policy of _compare.py, and every allocation
inside the op call pre-filled with NaN.
"""
import contextlib
import math
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.library import opcheck
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fbkernels
from fbkernels import _reference
from fbkernels.backends import host_module

from _compare import CPU_ISAS, TOL, assert_close, cpu_build, nan_filled_allocations

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
_DTYPES = {
    ("eager", "cpu"): (F32, F64, BF16),
    ("cpp", "cpu"): (F32, F64),
    ("triton", "cpu"): (F32, F64, F16, BF16),
    ("eager", "cuda"): (F32, F64, F16, BF16),
    ("cuda", "cuda"): (F32, F64, F16, BF16),
    ("triton", "cuda"): (F32, F64, F16, BF16),
}


def _available_cases():
    cases = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for backend in fbkernels.available_backends(device):
            for dtype in _DTYPES[(backend, device)]:
                marks = [pytest.mark.gpu] if device == "cuda" else []
                cases.append(pytest.param(backend, device, dtype, marks=marks,
                                          id=f"{backend}-{device}-{str(dtype).removeprefix('torch.')}"))
    return cases


CASES = _available_cases()
# The (backend, device) pairs of CASES, for the checks that run in float64 only.
BACKEND_DEVICES = list({(c.values[0], c.values[1]): pytest.param(*c.values[:2], marks=c.marks, id=c.id.rsplit("-", 1)[0])
                        for c in CASES}.values())
FUSED_BACKEND_DEVICES = [p for p in BACKEND_DEVICES if p.values[0] != "eager"]
ALL_CPU = fbkernels.available_backends("cpu")
# The shape tables' GPU-sized entries are skipped on CPU, and Triton's interpreter, which runs every program in numpy,
# gets the small ones only.
CPU_MAX_ELEMENTS = 1 << 20
INTERPRETER_MAX_POSITIONS = 512
INTERPRETER_MAX_GATE_ROWS = 32

# (B, d, k, spatial): batch 0/1/3, d from 2 to 64 (below and above 16, where the half-precision Triton kernels switch
# to tl.dot; odd and power-of-2), k = 1 and k = d, 0-D to 3-D spatial dims, 1x1 maps, odd sizes that leave partial
# tiles, a map large enough for several chunks of the CPU backward, and the benchmark's size (GPU only).
FEEDBACK_SHAPES = [
    (1, 2, 1, (5, 7)),
    (3, 2, 2, (1, 1)),
    (0, 4, 2, (3, 3)),
    (1, 5, 5, ()),
    (3, 7, 1, (1,)),
    (3, 18, 2, (9, 11)),
    (1, 18, 18, (13,)),
    (1, 33, 3, (2, 3, 5)),
    (3, 64, 1, (4, 6)),
    (1, 64, 64, (1, 1, 1)),
    (2, 65, 3, (3, 7)),      # Triton: grad_decay by a matmul on g above D_PAD 64
    (1, 130, 2, (2, 5)),     # Triton: both passes by matmuls above D_PAD 128
    (2, 18, 2, (37, 41)),
    (16, 18, 2, (512, 512)),
]
# (B, C, spatial, alpha) of the context gate, with the same coverage and alpha at both ends and inside [0, 1], plus
# CBL-CNN-like maps: many channels on a few positions, and a batch of 128 (GPU only).
GATE_SHAPES = [(1, 3, (5, 7), 0.0), (0, 4, (2, 2), 0.3), (2, 16, (), 1.0), (2, 7, (1, 1), 0.3), (3, 64, (9,), 0.0),
               (2, 5, (2, 3, 4), 0.7), (2, 5, (11, 13), 1.0), (4, 8, (40, 33), 0.3), (2, 5, (257, 129), 0.0),
               (4, 512, (4, 4), 1.0), (128, 64, (32, 32), 0.3),
               (2, 16, (2, 2), 0.0), (1, 9, (16, 16), 0.3)]


def _skip_unsupported(backend, device, dtype, B, channels, positions, op="feedback_step"):
    """Skip what a case cannot run: GPU-sized shapes on CPU, large ones and bfloat16 tl.dot in the interpreter."""
    if device == "cpu" and B * channels * positions > CPU_MAX_ELEMENTS:
        pytest.skip("a GPU-sized shape")
    if backend == "triton" and device == "cpu":
        gate_rows = B * channels if op == "context_gate" else 0
        if B * positions > INTERPRETER_MAX_POSITIONS or gate_rows > INTERPRETER_MAX_GATE_ROWS:
            pytest.skip("too large for Triton's interpreter")
        if op == "feedback_step" and dtype == BF16 and channels >= 16:
            pytest.skip("Triton's interpreter multiplies raw bfloat16 bits in tl.dot (triton-lang/triton#11584)")


def _randn(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _feedback_inputs(B, d, spatial, dtype, device="cpu", requires_grad=True):
    h = _randn(B, d, *spatial, dtype=dtype, device=device)
    f = _randn(B, d, *spatial, dtype=dtype, device=device)
    decay = _randn(d, d, dtype=dtype, device=device, scale=1 / math.sqrt(d))
    return [t.requires_grad_(requires_grad) for t in (h, f, decay)]


def _feedback_run(backend, inputs, k, weights, use=("h", "v")):
    """(h_next, v, dL/dh, dL/df, dL/ddecay) for L = <w_h, h_next> + <w_v, v> over the used outputs."""
    h_next, v = fbkernels.feedback_step(*inputs, k, backend=backend)
    loss = 0
    if "h" in use:
        loss = loss + (h_next.double() * weights[0]).sum()
    if "v" in use:
        loss = loss + (v.double() * weights[1]).sum()
    return (h_next, v, *torch.autograd.grad(loss, inputs))


def _feedback_expected(inputs, k, weights, use=("h", "v")):
    exact = [t.detach().double().requires_grad_() for t in inputs]
    return _feedback_run("eager", exact, k, weights, use)


def _assert_feedback_matches(got, expected, dtype, positions):
    for name, a, b in zip(("h_next", "v", "dL/dh", "dL/df", "dL/ddecay"), got, expected):
        assert a.dtype == dtype, f"{name} has dtype {a.dtype}"
        assert_close(name, a, b, dtype, summed_over=positions if name == "dL/ddecay" else 1)


# ---------------------------------------------------------------- feedback_step against the reference

@pytest.mark.parametrize("B,d,k,spatial", FEEDBACK_SHAPES)
@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_feedback_step_matches_reference(backend, device, dtype, B, d, k, spatial):
    positions = B * math.prod(spatial)
    _skip_unsupported(backend, device, dtype, B, d, math.prod(spatial))
    inputs = _feedback_inputs(B, d, spatial, dtype, device)
    weights = (_randn(B, d, *spatial, dtype=F64, device=device), _randn(B, k, *spatial, dtype=F64, device=device))
    with nan_filled_allocations():
        got = _feedback_run(backend, inputs, k, weights)
    assert got[0].shape == (B, d, *spatial) and got[1].shape == (B, k, *spatial)
    _assert_feedback_matches(got, _feedback_expected(inputs, k, weights), dtype, positions)


@pytest.mark.parametrize("use", [("h",), ("v",)], ids=["h_next_only", "v_only"])
@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_feedback_step_with_one_upstream_gradient(backend, device, dtype, use):
    """Only h_next or only v reaches the loss: the backward gets None for the other and must not read it."""
    _skip_unsupported(backend, device, dtype, 2, 6, 20)
    inputs = _feedback_inputs(2, 6, (5, 4), dtype, device)
    weights = (_randn(2, 6, 5, 4, dtype=F64, device=device), _randn(2, 3, 5, 4, dtype=F64, device=device))
    with nan_filled_allocations():
        got = _feedback_run(backend, inputs, 3, weights, use)
    _assert_feedback_matches(got, _feedback_expected(inputs, 3, weights, use), dtype, 40)


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_feedback_step_non_contiguous_inputs(backend, device, dtype):
    _skip_unsupported(backend, device, dtype, 3, 8, 66)
    h = _randn(3, 8, 11, 6, dtype=dtype, device=device).transpose(2, 3)  # strided spatial dims
    f = _randn(3, 16, 6, 11, dtype=dtype, device=device)[:, ::2]  # every other channel
    decay = _randn(8, 8, dtype=dtype, device=device, scale=0.3).t()  # column-major
    inputs = [t.requires_grad_() for t in (h, f, decay)]
    assert not any(t.is_contiguous() for t in inputs)
    weights = (_randn(3, 8, 6, 11, dtype=F64, device=device), _randn(3, 2, 6, 11, dtype=F64, device=device))
    with nan_filled_allocations():
        got = _feedback_run(backend, inputs, 2, weights)
    _assert_feedback_matches(got, _feedback_expected(inputs, 2, weights), dtype, 3 * 66)


@pytest.mark.parametrize("requires", ["h", "f", "decay", "f+decay"])
@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_feedback_step_backward_computes_only_the_requested_gradients(backend, device, dtype, requires,
                                                                       monkeypatch):
    """The backward receives ctx.needs_input_grad as needs_grad (h(0) = 0 and a frozen decay need no gradient)."""
    _skip_unsupported(backend, device, dtype, 2, 5, 12)
    names = ("h", "f", "decay")
    needs_grad = tuple(name in requires.split("+") for name in names)
    inputs = _feedback_inputs(2, 5, (3, 4), dtype, device, requires_grad=False)
    for t, needed in zip(inputs, needs_grad):
        t.requires_grad_(needed)
    # The eager backend's backward is the reference function itself; the others go through their host module.
    owner = sys.modules["fbkernels.ops.feedback_step"] if backend == "eager" else host_module(backend)
    backward, received = owner.feedback_step_backward, []

    def recording_backward(*args):
        received.append(tuple(args[6]) if len(args) > 6 else "no needs_grad argument")
        return backward(*args)

    monkeypatch.setattr(owner, "feedback_step_backward", recording_backward)
    h_next, v = fbkernels.feedback_step(*inputs, 2, backend=backend)
    (h_next.double().sum() + v.double().square().sum()).backward()
    assert received == [needs_grad]
    exact = [t.detach().double().requires_grad_() for t in inputs]
    h_ref, v_ref = fbkernels.feedback_step(*exact, 2, backend="eager")
    (h_ref.sum() + v_ref.square().sum()).backward()
    for name, t, ref, needed in zip(names, inputs, exact, needs_grad):
        if needed:
            assert_close(f"dL/d{name}", t.grad, ref.grad, dtype, summed_over=24 if name == "decay" else 1)
        else:
            assert t.grad is None


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_feedback_step_nan_stays_at_its_position(backend, device, dtype):
    _skip_unsupported(backend, device, dtype, 2, 6, 20)
    h, f, decay = _feedback_inputs(2, 6, (4, 5), dtype, device, requires_grad=False)
    f[1, 3, 2, 2] = float("nan")
    h[0, 0, 1, 1] = float("inf")
    h_next, v = fbkernels.feedback_step(h, f, decay, 2, backend=backend)
    bad = torch.zeros(2, 4, 5, dtype=torch.bool, device=device)
    bad[1, 2, 2] = bad[0, 1, 1] = True
    assert torch.isfinite(h_next.permute(0, 2, 3, 1)[~bad]).all()
    assert torch.isfinite(v.permute(0, 2, 3, 1)[~bad]).all()
    assert torch.isnan(h_next[1, :, 2, 2]).all()


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("k", [2, 3])
def test_feedback_step_softmax_of_ties_and_infinities(backend, device, dtype, k):
    """Every pair of logits from {0, 3, inf, -inf, nan} in the first two feedback channels, at every position (the
    vector body and the scalar tail of the CPU kernels): v is eager's, NaN where eager's is NaN."""
    _skip_unsupported(backend, device, dtype, 2, 6, 20)
    h, f, decay = _feedback_inputs(2, 6, (4, 5), dtype, device, requires_grad=False)
    f.zero_()  # h_next = h exactly, so the logits are the values set here
    special = torch.tensor([0.0, 3.0, math.inf, -math.inf, math.nan], dtype=dtype, device=device)
    pairs = torch.cartesian_prod(torch.arange(5), torch.arange(5)).to(device)
    slots = torch.arange(2 * 4 * 5, device=device) % len(pairs)
    logits = h[:, 6 - k:].permute(0, 2, 3, 1).reshape(-1, k)  # a copy: [positions, k]
    logits[:, 0] = special[pairs[slots, 0]]
    logits[:, 1] = special[pairs[slots, 1]]
    h[:, 6 - k:] = logits.reshape(2, 4, 5, k).permute(0, 3, 1, 2)
    _, v = fbkernels.feedback_step(h, f, decay, k, backend=backend)
    _, v_ref = fbkernels.feedback_step(h.double(), f.double(), decay.double(), k, backend="eager")
    assert torch.equal(v.isnan(), v_ref.isnan())
    assert_close("v", v.nan_to_num(), v_ref.nan_to_num(), dtype)


@pytest.mark.parametrize("backend,device,dtype", [c for c in CASES if c.values[2] == F32])
def test_feedback_step_decay_gradient_is_deterministic(backend, device, dtype):
    B, *spatial = (4, 64, 64) if not (backend == "triton" and device == "cpu") else (2, 9, 11)
    h, f, decay = _feedback_inputs(B, 18, spatial, dtype, device)
    grads = [torch.autograd.grad(fbkernels.feedback_step(h, f, decay, 2, backend=backend)[1].square().sum(), decay)[0]
             for _ in range(2)]
    assert torch.equal(*grads)


# ---------------------------------------------------------------- context_gate against the reference

def _gate_inputs(B, C, spatial, dtype, device="cpu"):
    h = _randn(B, C, *spatial, dtype=dtype, device=device).requires_grad_()
    gate_logits = _randn(B, C, dtype=dtype, device=device, scale=2.0).requires_grad_()
    return h, gate_logits


def _gate_run(backend, h, gate_logits, alpha, weight):
    out = fbkernels.context_gate(h, gate_logits, alpha, backend=backend)
    return (out, *torch.autograd.grad((out.double() * weight).sum(), (h, gate_logits)))


def _assert_gate_matches(backend, h, gate_logits, alpha, weight, dtype):
    with nan_filled_allocations():
        got = _gate_run(backend, h, gate_logits, alpha, weight)
    exact = [t.detach().double().requires_grad_() for t in (h, gate_logits)]
    expected = _gate_run("eager", *exact, alpha, weight)
    positions = math.prod(h.shape[2:])
    for name, a, b in zip(("out", "dL/dh", "dL/dgate_logits"), got, expected):
        assert a.dtype == dtype, f"{name} has dtype {a.dtype}"
        assert_close(name, a, b, dtype, summed_over=positions if name == "dL/dgate_logits" else 1)


@pytest.mark.parametrize("B,C,spatial,alpha", GATE_SHAPES)
@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_context_gate_matches_reference(backend, device, dtype, B, C, spatial, alpha):
    _skip_unsupported(backend, device, dtype, B, C, math.prod(spatial), op="context_gate")
    h, gate_logits = _gate_inputs(B, C, spatial, dtype, device)
    weight = _randn(B, C, *spatial, dtype=F64, device=device)
    _assert_gate_matches(backend, h, gate_logits, alpha, weight, dtype)


@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_context_gate_non_contiguous_inputs(backend, device, dtype):
    h = _randn(2, 5, 7, 3, dtype=dtype, device=device).transpose(2, 3).requires_grad_()
    gate_logits = _randn(5, 2, dtype=dtype, device=device).t().requires_grad_()
    assert not (h.is_contiguous() or gate_logits.is_contiguous())
    weight = _randn(2, 5, 3, 7, dtype=F64, device=device)
    _assert_gate_matches(backend, h, gate_logits, 0.25, weight, dtype)


@pytest.mark.parametrize("requires", ["h", "gate_logits"])
@pytest.mark.parametrize("backend,device,dtype", CASES)
def test_context_gate_backward_computes_only_the_requested_gradients(backend, device, dtype, requires, monkeypatch):
    needs_grad = (requires == "h", requires == "gate_logits")
    h, gate_logits = (t.detach().requires_grad_(needed)
                      for t, needed in zip(_gate_inputs(2, 4, (3, 5), dtype, device), needs_grad))
    owner = sys.modules["fbkernels.ops.context_gate"] if backend == "eager" else host_module(backend)
    backward, received = owner.context_gate_backward, []

    def recording_backward(*args):
        received.append(tuple(args[4]) if len(args) > 4 else "no needs_grad argument")
        return backward(*args)

    monkeypatch.setattr(owner, "context_gate_backward", recording_backward)
    fbkernels.context_gate(h, gate_logits, 0.3, backend=backend).double().square().sum().backward()
    assert received == [needs_grad]
    assert (h.grad is None) != needs_grad[0] and (gate_logits.grad is None) != needs_grad[1]


# ---------------------------------------------------------------- gradcheck, opcheck, torch.compile

def _gradcheck_options(backend, device):
    # The interpreter is slow: fast_mode checks random projections of the Jacobian instead of every entry.
    return dict(fast_mode=True) if (backend, device) == ("triton", "cpu") else {}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_gradcheck_float64(backend, device):
    h, f, decay = _feedback_inputs(2, 5, (3, 2), F64, device)
    options = _gradcheck_options(backend, device)
    assert torch.autograd.gradcheck(lambda *x: fbkernels.feedback_step(*x, 2, backend=backend), (h, f, decay),
                                    **options)
    assert torch.autograd.gradcheck(lambda *x: fbkernels.feedback_step(*x, 5, backend=backend)[1], (h, f, decay),
                                    **options)
    gate_h = _randn(3, 4, 2, dtype=F64, device=device).transpose(0, 2).requires_grad_()  # [2, 4, 3], strided
    gate_logits = _randn(4, 2, dtype=F64, device=device).t().requires_grad_()
    assert torch.autograd.gradcheck(lambda h, a: fbkernels.context_gate(h, a, 0.35, backend=backend),
                                    (gate_h, gate_logits), **options)


def test_eager_backend_supports_double_backward():
    """Gradient penalties and Hessian-vector products: the eager backward is made of differentiable torch ops."""
    h, f, decay = _feedback_inputs(2, 4, (3,), F64)
    assert torch.autograd.gradgradcheck(lambda *x: fbkernels.feedback_step(*x, 2, backend="eager"), (h, f, decay))
    gate_h, gate_logits = _gate_inputs(2, 3, (4,), F64)
    assert torch.autograd.gradgradcheck(lambda h, a: fbkernels.context_gate(h, a, 0.3, backend="eager"),
                                        (gate_h, gate_logits))


@pytest.mark.parametrize("backend,device", FUSED_BACKEND_DEVICES)
def test_fused_backends_name_eager_for_double_backward(backend, device):
    h, f, decay = _feedback_inputs(2, 4, (3,), F64, device)
    h_next, v = fbkernels.feedback_step(h, f, decay, 2, backend=backend)
    grad_f, = torch.autograd.grad(h_next.sum() + v.square().sum(), f, create_graph=True)
    with pytest.raises(RuntimeError, match="backend='eager'"):
        grad_f.square().sum().backward()
    gate_h, gate_logits = _gate_inputs(2, 3, (4,), F64, device)
    grad_h, = torch.autograd.grad(fbkernels.context_gate(gate_h, gate_logits, 0.3, backend=backend).square().sum(),
                                  gate_h, create_graph=True)
    with pytest.raises(RuntimeError, match="backend='eager'"):
        grad_h.sum().backward()


def test_eager_backend_supports_forward_mode_derivatives():
    """torch.func.jvp and forward-over-reverse Hessian-vector products: a custom op would give no tangent (jvp read it
    as zeros), so the eager backend runs its reference as plain torch ops there."""
    h, f, decay = (t.detach() for t in _feedback_inputs(2, 4, (3,), F64))
    tangents = tuple(torch.randn_like(t) for t in (h, f, decay))
    step = lambda *x: fbkernels.feedback_step(*x, 2, backend="eager")  # noqa: E731
    _, jvp_out = torch.func.jvp(step, (h, f, decay), tangents)
    _, vjp_fn = torch.func.vjp(step, h, f, decay)
    for i, out_tangent in enumerate(jvp_out):
        # <J t, e_j> by jvp equals <t, J^T e_j> by reverse mode, for a few output directions e_j.
        for j in range(3):
            cotangent = [torch.zeros_like(o) for o in jvp_out]
            cotangent[i].view(-1)[j * 5] = 1.0
            expected = sum((g * t).sum() for g, t in zip(vjp_fn(tuple(cotangent)), tangents))
            torch.testing.assert_close(out_tangent.reshape(-1)[j * 5], expected)
    with torch.autograd.forward_ad.dual_level():
        h_next, v = fbkernels.feedback_step(h, torch.autograd.forward_ad.make_dual(f, tangents[1]), decay, 2,
                                            backend="eager")
        assert torch.autograd.forward_ad.unpack_dual(h_next).tangent.abs().sum() > 0
    # Forward over reverse equals reverse over reverse.
    loss = lambda d: sum(o.square().sum() for o in step(h, f, d))  # noqa: E731
    _, hvp = torch.func.jvp(torch.func.grad(loss), (decay,), (tangents[2],))
    decay_r = decay.clone().requires_grad_()
    grad, = torch.autograd.grad(loss(decay_r), decay_r, create_graph=True)
    torch.testing.assert_close(hvp, torch.autograd.grad((grad * tangents[2]).sum(), decay_r)[0])
    gate_h, gate_logits = (t.detach() for t in _gate_inputs(2, 3, (4,), F64))
    gate_tangents = (torch.randn_like(gate_h), torch.randn_like(gate_logits))
    gate = lambda h, a: fbkernels.context_gate(h, a, 0.3, backend="eager")  # noqa: E731
    _, out_tangent = torch.func.jvp(gate, (gate_h, gate_logits), gate_tangents)
    _, expected = torch.func.jvp(lambda h, a: _reference.context_gate_forward(h, a, 0.3), (gate_h, gate_logits),
                                 gate_tangents)
    torch.testing.assert_close(out_tangent, expected)
    assert out_tangent.abs().sum() > 0


def test_eager_backend_runs_under_torch_func_grad_and_vmap():
    """torch.func.grad cannot run a custom op's autograd: under a torch.func transform the eager backend runs its
    reference as plain torch ops, so per-sample gradients (vmap of grad) work."""
    h, f, decay = (t.detach() for t in _feedback_inputs(3, 4, (5,), F64))

    def loss(decay, h, f):  # of one sample h, f: [4, 5]
        return sum(o.square().sum() for o in fbkernels.feedback_step(h[None], f[None], decay, 2, backend="eager"))

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(decay, h, f)
    for i in range(3):
        decay_r = decay.clone().requires_grad_()
        torch.testing.assert_close(per_sample[i], torch.autograd.grad(loss(decay_r, h[i], f[i]), decay_r)[0])
    gate_h, gate_logits = (t.detach() for t in _gate_inputs(2, 3, (4,), F64))
    grad = torch.func.grad(lambda a: fbkernels.context_gate(gate_h, a, 0.3, backend="eager").square().sum())(gate_logits)
    gate_logits.requires_grad_()
    expected, = torch.autograd.grad(fbkernels.context_gate(gate_h, gate_logits, 0.3, backend="eager").square().sum(),
                                    gate_logits)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("backend,device", FUSED_BACKEND_DEVICES)
def test_fused_backends_name_eager_for_forward_mode_derivatives(backend, device):
    h, f, decay = (t.detach() for t in _feedback_inputs(2, 4, (3,), F64, device))
    with pytest.raises(RuntimeError, match=f"backend '{backend}' has no forward-mode derivative.*backend='eager'"):
        torch.func.jvp(lambda f: fbkernels.feedback_step(h, f, decay, 2, backend=backend), (f,), (torch.ones_like(f),))
    gate_h, gate_logits = (t.detach() for t in _gate_inputs(2, 3, (4,), F64, device))
    with pytest.raises(RuntimeError, match=f"backend '{backend}' has no forward-mode derivative.*backend='eager'"):
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(gate_h, torch.ones_like(gate_h))
            fbkernels.context_gate(dual, gate_logits, 0.3, backend=backend)


@pytest.mark.parametrize("backend,device", FUSED_BACKEND_DEVICES)
def test_fused_backends_name_eager_under_torch_func_grad(backend, device):
    """torch.func.grad, vjp and jacrev cannot run a custom op's autograd: the fused backends say so and name
    backend='eager', inside or around a vmap too, instead of PyTorch's internal error about setup_context. An op whose
    inputs the transform does not differentiate still runs."""
    h, f, decay = (t.detach() for t in _feedback_inputs(2, 4, (3,), F64, device))
    gate_logits = _randn(2, 4, dtype=F64, device=device)

    def step_loss(decay):
        return fbkernels.feedback_step(h, f, decay, 2, backend=backend)[1].square().sum()

    def gate(x):
        return fbkernels.context_gate(x, gate_logits, 0.3, backend=backend)

    transforms = {
        "grad": lambda: torch.func.grad(step_loss)(decay),
        "vjp": lambda: torch.func.vjp(gate, h),
        "jacrev": lambda: torch.func.jacrev(gate)(h),
        "vmap(grad)": lambda: torch.func.vmap(torch.func.grad(step_loss))(torch.stack([decay, 2 * decay])),
        "grad(vmap)": lambda: torch.func.grad(lambda x: torch.func.vmap(gate)(x).sum())(torch.stack([h, 2 * h])),
    }
    for name, transform in transforms.items():
        with pytest.raises(RuntimeError, match=rf"backend '{backend}' cannot be differentiated by torch\.func.*"
                                               r"backend='eager'"):
            transform()
            pytest.fail(f"{name} did not raise")
    out = gate(h)
    torch.testing.assert_close(torch.func.grad(lambda x: (x * gate(h)).sum())(h), out)

    # Ops the transform does not record still run (both were refused by a first version of the check): under
    # torch.no_grad() inside the transform, and on a plain tensor requiring grad (an outer nn.Parameter).
    def loss_without_grad(x):
        with torch.no_grad():
            target = gate(x)
        return ((x - target) ** 2).sum()

    torch.testing.assert_close(torch.func.grad(loss_without_grad)(h), 2 * (h - out))
    weight = torch.nn.Parameter(h.clone())
    scale = torch.tensor(2.0, dtype=F64, device=device)
    torch.testing.assert_close(torch.func.grad(lambda s: (gate(weight) * s).sum())(scale), out.sum())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_batched_gradients(backend, device):
    """torch.autograd.grad(is_grads_batched=True), jacobian(vectorize=True) and gradcheck(check_batched_grad=True)
    batch the backward with the legacy vmap, whose tensors have no storage: the fast path leaves them to the custom
    op, and the eager backward uses ops with batching rules."""
    h, f, decay = _feedback_inputs(2, 4, (3,), F64, device)
    h_next, v = fbkernels.feedback_step(h, f, decay, 2, backend=backend)
    cotangents = _randn(3, 2, 2, 3, dtype=F64, device=device)
    batched = torch.autograd.grad(v, (h, f, decay), cotangents, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        for got, expected in zip(batched, torch.autograd.grad(v, (h, f, decay), cotangents[i], retain_graph=True)):
            torch.testing.assert_close(got[i], expected)
    fixed = [t.detach() for t in (h, f)]
    v_of_decay = lambda m: fbkernels.feedback_step(*fixed, m, 2, backend=backend)[1]  # noqa: E731
    torch.testing.assert_close(torch.autograd.functional.jacobian(v_of_decay, decay.detach(), vectorize=True),
                               torch.autograd.functional.jacobian(v_of_decay, decay.detach()))
    gate_h, gate_logits = _gate_inputs(2, 3, (4,), F64, device)
    options = _gradcheck_options(backend, device)
    assert torch.autograd.gradcheck(lambda h, a: fbkernels.context_gate(h, a, 0.3, backend=backend),
                                    (gate_h, gate_logits), check_batched_grad=True, **options)
    assert torch.autograd.gradcheck(lambda h, m: fbkernels.feedback_step(h, f.detach(), m, 2, backend=backend),
                                    (h, decay), check_batched_grad=True, **options)


def _bad_op_calls():
    """(id, op, arguments before the backend, arguments after it, error, the argument the message names) for direct
    calls of the four custom ops, on float64 tensors made by ``make(shape)``."""
    fs, fs_backward = "feedback_step", "feedback_step_backward"
    cg, cg_backward = "context_gate", "context_gate_backward"
    h, m, v, a = (2, 4, 3), (4, 4), (2, 2, 3), (2, 4)
    all_grads = [True, True, True]
    return [
        ("f_shape", fs, lambda T: (T(h), T((2, 4, 1)), T(m), 2), (), ValueError, "f"),
        ("f_dtype", fs, lambda T: (T(h), T(h).float(), T(m), 2), (), TypeError, "f"),
        ("decay_shape", fs, lambda T: (T(h), T(h), T((3, 4)), 2), (), ValueError, "decay"),
        ("decay_dtype", fs, lambda T: (T(h), T(h), T(m).float(), 2), (), TypeError, "decay"),
        ("num_feedback", fs, lambda T: (T(h), T(h), T(m), 5), (), ValueError, "num_feedback"),
        ("no_channels", fs, lambda T: (T((2, 0, 3)), T((2, 0, 3)), T((0, 0)), 1), (), ValueError, "h"),
        ("gate_shape", cg, lambda T: (T(h), T((1, 1)), 0.0), (), ValueError, "gate_logits"),
        ("gate_dtype", cg, lambda T: (T(h), T(a).float(), 0.0), (), TypeError, "gate_logits"),
        ("alpha", cg, lambda T: (T(h), T(a), 1.5), (), ValueError, "alpha"),
        ("grad_h", fs_backward, lambda T: (T((2, 4, 1)), None, T(h), T(v), T(m), 2), (all_grads,), ValueError,
         "grad_h"),
        ("grad_v", fs_backward, lambda T: (None, T((2, 1, 3)), T(h), T(v), T(m), 2), (all_grads,), ValueError,
         "grad_v"),
        ("v_shape", fs_backward, lambda T: (T(h), None, T(h), T((2, 3, 3)), T(m), 2), (all_grads,), ValueError, "v"),
        ("v_dtype", fs_backward, lambda T: (T(h), None, T(h), T(v).float(), T(m), 2), (all_grads,), TypeError, "v"),
        ("backward_decay", fs_backward, lambda T: (T(h), None, T(h), T(v), T((4, 3)), 2), (all_grads,), ValueError,
         "decay"),
        ("needs_grad", fs_backward, lambda T: (T(h), None, T(h), T(v), T(m), 2), ([True],), ValueError, "needs_grad"),
        ("grad_out", cg_backward, lambda T: (T((2, 4, 1)), T(h), T(a), 0.5), ([True, True],), ValueError, "grad_out"),
        ("backward_gate", cg_backward, lambda T: (T(h), T(h), T((2, 1)), 0.5), ([True, True],), ValueError,
         "gate_logits"),
    ]


@pytest.mark.parametrize("case", _bad_op_calls(), ids=lambda case: case[0])
@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_custom_ops_check_their_inputs(backend, device, fake, case):
    """torch.ops.fbkernels.* is public API and the fused host functions read raw pointers: a bad direct call gets the
    public function's error (naming the argument), not garbage or a crash, and so does its fake (torch.compile)."""
    _, op, before, after, error, name = case
    make = lambda shape: torch.ones(shape, dtype=F64, device=device)  # noqa: E731
    args = (*before(make), backend, *after)
    if fake:
        with FakeTensorMode() as mode:
            args = tuple(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args)
            with pytest.raises(error, match=rf"^{name} must"):
                getattr(torch.ops.fbkernels, op).default(*args)
    else:
        with pytest.raises(error, match=rf"^{name} must"):
            getattr(torch.ops.fbkernels, op).default(*args)


@pytest.mark.skipif("cpp" not in ALL_CPU, reason="fbkernels._C not built")
def test_custom_ops_check_the_backend_against_the_tensors():
    """The cpp kernels would reinterpret float16 bits (or read a CUDA pointer): a direct op call checks the backend
    against the tensors' dtype and device, as the public function's resolution does (meta tensors go to the fake)."""
    h = torch.zeros(2, 4, 3)
    with pytest.raises(TypeError, match="backend 'cpp' supports dtypes"):
        torch.ops.fbkernels.feedback_step(h.half(), h.half(), torch.eye(4).half(), 2, "cpp")
    with pytest.raises(TypeError, match="backend 'cpp' supports dtypes"):
        torch.ops.fbkernels.context_gate_backward(h.half(), h.half(), torch.zeros(2, 4).half(), 0.5, "cpp",
                                                  [True, True])
    assert torch.ops.fbkernels.context_gate(h.to("meta"), torch.zeros(2, 4, device="meta"), 0.5, "cpp").is_meta
    with pytest.raises(ValueError, match="backend must be one of"):
        torch.ops.fbkernels.context_gate(h, torch.zeros(2, 4), 0.5, "tpu")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_opcheck(backend, device):
    h, f, decay = _feedback_inputs(2, 6, (3, 4), F64, device)
    opcheck(torch.ops.fbkernels.feedback_step.default, (h, f, decay, 2, backend))
    opcheck(torch.ops.fbkernels.feedback_step.default, (h[:0], f[:0], decay, 6, backend))
    gate_h, gate_logits = _gate_inputs(2, 6, (3, 4), F64, device)
    opcheck(torch.ops.fbkernels.context_gate.default, (gate_h, gate_logits, 0.5, backend))
    grad_h, grad_v = _randn(2, 6, 3, 4, dtype=F64, device=device), _randn(2, 2, 3, 4, dtype=F64, device=device)
    v = torch.softmax(_randn(2, 2, 3, 4, dtype=F64, device=device), dim=1)
    for needs_grad in ([True, True, True], [False, True, False], [True, False, True]):
        opcheck(torch.ops.fbkernels.feedback_step_backward.default,
                (grad_h, grad_v, f.detach(), v, decay.detach(), 2, backend, needs_grad))
    for only_grad_h, only_grad_v in ((grad_h, None), (None, grad_v)):
        opcheck(torch.ops.fbkernels.feedback_step_backward.default,
                (only_grad_h, only_grad_v, f.detach(), v, decay.detach(), 2, backend, [True, True, True]))
    for needs_grad in ([True, True], [False, True]):
        opcheck(torch.ops.fbkernels.context_gate_backward.default,
                (grad_h, gate_h.detach(), gate_logits.detach(), 0.5, backend, needs_grad))


def _two_steps(backend):
    def run(h, f, decay, gate):
        for _ in range(2):
            h, v = fbkernels.feedback_step(h, f, decay, 2, backend=backend)
            h = fbkernels.context_gate(h, gate, 0.1, backend=backend)
        return (h * h).sum() + v.sum(dim=(2, 3)).pow(2).sum()
    return run


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    h0, f, decay = _feedback_inputs(2, 6, (5, 4), F64, device)
    gate = _randn(2, 6, dtype=F64, device=device).requires_grad_()
    run = _two_steps(backend)
    compiled = torch.compile(run, fullgraph=True)
    inputs = (h0, f, decay, gate)
    got, expected = compiled(*inputs), run(*inputs)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- autocast

@pytest.mark.parametrize("backend", ALL_CPU)
def test_autocast_computes_in_the_state_dtype(backend):
    """Under CPU bfloat16 autocast a float32 state stays float32: bfloat16 f, decay and gate logits are cast to it."""
    h, f, decay = (t.detach() for t in _feedback_inputs(2, 6, (3, 4), F32))
    f16, decay16 = (t.to(BF16).requires_grad_() for t in (f, decay))
    h.requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        h_next, v = fbkernels.feedback_step(h, f16, decay16, 2, backend=backend)
        raw_h_next, _ = torch.ops.fbkernels.feedback_step.default(h, f16, decay16, 2, backend)
        gated = fbkernels.context_gate(h_next, torch.randn(2, 6, dtype=BF16), 0.2, backend=backend)
    assert h_next.dtype == v.dtype == raw_h_next.dtype == gated.dtype == F32
    expected_h_next, expected_v = _reference.feedback_step_forward(h, f16.float(), decay16.float(), 2)
    torch.testing.assert_close(h_next, expected_h_next)
    torch.testing.assert_close(v, expected_v)
    torch.testing.assert_close(raw_h_next, expected_h_next)
    gated.sum().backward()
    assert f16.grad.dtype == decay16.grad.dtype == BF16 and h.grad.dtype == F32


def test_autocast_keeps_a_low_precision_state_and_works_compiled():
    h, f, decay = (t.detach() for t in _feedback_inputs(2, 6, (3, 4), F32))
    with torch.autocast("cpu", dtype=BF16):
        h_next, _ = fbkernels.feedback_step(h.to(BF16), f, decay, 2, backend="eager")
    assert h_next.dtype == BF16

    def step(h, f, decay):
        with torch.autocast("cpu", dtype=BF16):
            return fbkernels.feedback_step(h, f, decay, 2)[0]

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(h, f.to(BF16), decay.to(BF16))
    assert got.dtype == F32
    torch.testing.assert_close(got, step(h, f.to(BF16), decay.to(BF16)))


# ---------------------------------------------------------------- decay_matrix

def test_decay_matrix_math_and_gradients():
    d = 5
    basis = torch.linalg.qr(torch.randn(d, d, dtype=F64))[0].requires_grad_()
    basis_inv = basis.detach().t().clone().requires_grad_()
    rates = torch.rand(d, dtype=F64).add(0.5).requires_grad_()
    m = fbkernels.decay_matrix(basis, basis_inv, rates, 2.0, 1.5)
    torch.testing.assert_close(m, basis @ torch.diag(torch.exp(-2.0 * rates / 1.5)) @ basis_inv)
    torch.testing.assert_close(fbkernels.decay_matrix(basis, basis_inv, rates, 0, 1.0), basis @ basis_inv)
    shared = fbkernels.decay_matrix(basis, basis_inv, torch.tensor(1.0, dtype=F64), 1.0, 1.0)
    torch.testing.assert_close(shared, math.exp(-1.0) * basis @ basis_inv)
    tensor_time = fbkernels.decay_matrix(basis, basis_inv, rates, torch.tensor([2.0], dtype=F64), torch.tensor(1.5))
    torch.testing.assert_close(tensor_time, m)
    assert torch.autograd.gradcheck(lambda p, q, r: fbkernels.decay_matrix(p, q, r, 3.0, 2.0), (basis, basis_inv, rates))


@pytest.mark.parametrize("t,tau,name", [
    (1.0, 0.0, "tau"), (1.0, -1.0, "tau"), (1.0, math.nan, "tau"), (1.0, math.inf, "tau"),
    (math.nan, 1.0, "t"), (-1.0, 1.0, "t"), (math.inf, 1.0, "t"),
    (1.0, torch.tensor(0.0), "tau"), (1.0, torch.tensor(-2.0), "tau"), (1.0, torch.tensor(math.nan), "tau"),
    (torch.tensor(math.nan), 1.0, "t"), (torch.tensor(-1), 1.0, "t"), (torch.tensor([1.0, 2.0]), 1.0, "t"),
])
def test_decay_matrix_rejects_bad_time_values(t, tau, name):
    eye = torch.eye(3)
    with pytest.raises(ValueError, match=rf"^{name} must"):
        fbkernels.decay_matrix(eye, eye, torch.ones(3), t, tau)


def test_decay_matrix_checks_tensor_tau_inside_torch_compile():
    eye = torch.eye(3)
    torch._dynamo.reset()
    compiled = torch.compile(lambda tau: fbkernels.decay_matrix(eye, eye, torch.ones(3), 1, tau), fullgraph=True)
    torch.testing.assert_close(compiled(torch.tensor(2.0)), math.exp(-0.5) * eye)
    with pytest.raises(RuntimeError, match="tau must be positive and finite"):
        compiled(torch.tensor(0.0))


def test_decay_matrix_compiles_with_a_changing_int_time():
    """From the second call on, torch.compile makes an int t that changes symbolic (automatic dynamic); its check is
    then a guard, not a Python math call Dynamo cannot trace."""
    basis = torch.linalg.qr(torch.randn(4, 4, dtype=F64))[0]
    rates = torch.rand(4, dtype=F64) + 0.5
    torch._dynamo.reset()
    decay_at = torch.compile(lambda t: fbkernels.decay_matrix(basis, basis.t(), rates, t, 1.5), fullgraph=True)
    for t in range(4):
        torch.testing.assert_close(decay_at(t), fbkernels.decay_matrix(basis, basis.t(), rates, t, 1.5))
    with pytest.raises(RuntimeError, match=r"t must be finite and >= 0, got -1"):
        decay_at(-1)


def test_decay_matrix_compiles_with_dynamic_shapes():
    """Under dynamic=True d is symbolic: a constant rates of shape [d] is still accepted."""
    basis = torch.linalg.qr(torch.randn(4, 4, dtype=F64))[0]
    torch._dynamo.reset()
    compiled = torch.compile(lambda p: fbkernels.decay_matrix(p, p.t(), torch.ones(4, dtype=F64), 1, 2.0),
                             fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(basis), fbkernels.decay_matrix(basis, basis.t(), torch.ones(4, dtype=F64),
                                                                       1, 2.0))


def test_decay_matrix_under_vmap_and_on_the_meta_device():
    """vmap over t or tau (the value of a batched tensor cannot be read to check it) and meta tensors (no value)."""
    basis = torch.linalg.qr(torch.randn(3, 3, dtype=F64))[0]
    rates = torch.rand(3, dtype=F64) + 0.5
    values = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    over_t = torch.func.vmap(lambda t: fbkernels.decay_matrix(basis, basis.t(), rates, t, 1.5))(values)
    over_tau = torch.func.vmap(lambda tau: fbkernels.decay_matrix(basis, basis.t(), rates, 1.0, tau))(values + 1)
    for i, value in enumerate(values.tolist()):
        torch.testing.assert_close(over_t[i], fbkernels.decay_matrix(basis, basis.t(), rates, value, 1.5))
        torch.testing.assert_close(over_tau[i], fbkernels.decay_matrix(basis, basis.t(), rates, 1.0, value + 1))
    meta = [t.to("meta") for t in (basis, basis.t(), rates, values[1], values[2])]
    m = fbkernels.decay_matrix(*meta)
    assert m.is_meta and m.shape == (3, 3)


def test_decay_matrix_computes_in_the_basis_dtype_under_autocast():
    """Under autocast a bfloat16 matmul would round M(0) = P @ P^T away from the identity (errors of 4e-3)."""
    basis = torch.linalg.qr(torch.randn(18, 18))[0]
    with torch.autocast("cpu", dtype=BF16):
        m = fbkernels.decay_matrix(basis, basis.t(), torch.ones(18), 0, 1.0)
    assert m.dtype == F32
    torch.testing.assert_close(m, torch.eye(18), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- backend choice and bad inputs

def test_nan_filled_allocations_fill_with_nan():
    with nan_filled_allocations():
        made = (torch.empty(3), torch.empty_like(torch.ones(2)), torch.ones(1).new_empty(4))
    assert all(t.isnan().all() for t in made)
    assert not torch.empty(3, dtype=torch.int64).is_floating_point()


def test_available_backends_and_selection(monkeypatch):
    assert fbkernels.available_backends("cpu")[0] == "eager"
    h, f, decay = _feedback_inputs(1, 4, (3,), F32, requires_grad=False)
    monkeypatch.setenv("FBKERNELS_BACKEND", "eager")
    torch.testing.assert_close(fbkernels.feedback_step(h, f, decay, 2)[0],
                               _reference.feedback_step_forward(h, f, decay, 2)[0])
    monkeypatch.setenv("FBKERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend"):
        fbkernels.feedback_step(h, f, decay, 2)
    monkeypatch.delenv("FBKERNELS_BACKEND")
    with pytest.raises(ValueError, match="cuda"):
        fbkernels.feedback_step(h, f, decay, 2, backend="cuda")
    # Half precision on CPU: the automatic choice falls back to eager instead of failing.
    half = [t.to(BF16) for t in (h, f, decay)]
    torch.testing.assert_close(fbkernels.feedback_step(*half, 2)[0].float(),
                               _reference.feedback_step_forward(h, f, decay, 2)[0], rtol=2e-2, atol=5e-2)


@pytest.mark.skipif("cpp" not in ALL_CPU, reason="fbkernels._C not built")
def test_cpp_is_the_automatic_cpu_choice_and_rejects_half(monkeypatch):
    monkeypatch.delenv("FBKERNELS_BACKEND", raising=False)
    from fbkernels.backends import resolve_backend
    assert resolve_backend(None, torch.device("cpu"), F32) == "cpp"
    h, f, decay = (t.half() for t in _feedback_inputs(1, 4, (3,), F32, requires_grad=False))
    with pytest.raises(TypeError, match="cpp"):
        fbkernels.feedback_step(h, f, decay, 2, backend="cpp")


@pytest.mark.skipif("cpp" not in ALL_CPU, reason="fbkernels._C not built")
@pytest.mark.parametrize("isa", CPU_ISAS)
# The last two move > 24 MiB: non-temporal stores, from unaligned rows and from aligned ones (with AVX-512 the
# forward's channel mix then writes h_next itself).
@pytest.mark.parametrize("N,gate_shape",
                         [(99, (2, 5, 77)), (512 * 231 + 3, (32, 64, 2049)), (512 * 232, (32, 64, 2048))],
                         ids=["small", "streamed", "streamed-aligned"])
def test_every_cpu_build_matches_eager(isa, N, gate_shape):
    """The portable module and the AVX2 and AVX-512 ones (where built and supported) compute the same op within
    rounding."""
    from fbkernels import _cpp
    module = cpu_build(isa)
    B = 2
    h, f = torch.randn(B, 18, N), torch.randn(B, 18, N)  # canonical [B, d, N]
    decay = torch.randn(18, 18) / math.sqrt(18)
    v = _reference.feedback_step_forward(h, f, decay, 2)[1]
    grad_h, grad_v = torch.randn_like(h), torch.randn_like(v)
    gate_h, gate_a = torch.randn(gate_shape), torch.randn(gate_shape[:2])
    original = _cpp._C
    try:
        _cpp._C = module
        got = (*_cpp.feedback_step_forward(h, f, decay, 2), *_cpp.feedback_step_backward(grad_h, grad_v, f, v, decay, 2),
               _cpp.context_gate_forward(gate_h, gate_a, 0.3), *_cpp.context_gate_backward(gate_h, gate_h, gate_a, 0.3))
    finally:
        _cpp._C = original
    h, f, decay, v, grad_h, grad_v, gate_h, gate_a = (
        t.double() for t in (h, f, decay, v, grad_h, grad_v, gate_h, gate_a))
    expected = (*_reference.feedback_step_forward(h, f, decay, 2),
                *_reference.feedback_step_backward(grad_h, grad_v, f, v, decay, 2),
                _reference.context_gate_forward(gate_h, gate_a, 0.3),
                *_reference.context_gate_backward(gate_h, gate_h, gate_a, 0.3))
    names = ("h_next", "v", "grad_h", "grad_f", "grad_decay", "out", "grad_gate_h", "grad_gate_logits")
    summed_over = (1, 1, 1, 1, B * N, 1, 1, gate_shape[2])
    for name, a, b, summed in zip(names, got, expected, summed_over):
        assert_close(name, a, b, F32, summed)


def _bad_feedback_calls():
    h = torch.randn(2, 5, 3, 3)
    f = torch.randn(2, 5, 3, 3)
    m = torch.randn(5, 5)
    return [
        ((h, f[:, :4], m, 2), ValueError, "f"),
        ((h, f.double(), m, 2), TypeError, "f"),
        ((h, f, m.double(), 2), TypeError, "decay"),
        ((h, f.to("meta"), m, 2), ValueError, "f"),
        ((h.long(), f.long(), m.long(), 2), TypeError, "h"),
        ((torch.randn(5), torch.randn(5), m, 2), ValueError, "h"),
        ((h, f, m, 0), ValueError, "num_feedback"),
        ((h, f, m, 6), ValueError, "num_feedback"),
        ((h, f, m, 2.0), TypeError, "num_feedback"),
        ((h, f, torch.randn(5, 4), 2), ValueError, "decay"),
        ((h, f, torch.randn(25), 2), ValueError, "decay"),
        (("h", f, m, 2), TypeError, "h"),
        ((torch.zeros(2, 0, 3), torch.zeros(2, 0, 3), torch.zeros(0, 0), 1), ValueError, "h"),
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
    with pytest.raises(TypeError, match="tau"):
        fbkernels.decay_matrix(eye, eye, torch.ones(3), 1.0, "1")


# ---------------------------------------------------------------- the eager fast path
# Plain eager calls on the cpp backend skip the custom op (ops/_checks.py fast_path) and run its host functions through
# an autograd.Function with the op's own setup_context and backward. Everything that needs the op must still see it.

needs_cpp = pytest.mark.skipif("cpp" not in ALL_CPU, reason="fbkernels._C not built")
FAST_PATH_NODES = {"_FeedbackStepFunctionBackward", "_ContextGateFunctionBackward"}


class _RecordingMode(TorchDispatchMode):
    """Records the ops that reach the dispatcher's Python key (so the op path, not the fast path, runs under it)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _grads_by_path(run, inputs, needs_grad):
    """(outputs, gradients of the inputs that require grad, the grad_fn name, the ops recorded) for ``run(*inputs)``
    on the fast path and through the custom op (under a pass-through TorchDispatchMode)."""
    results = {}
    for path in ("fast", "op"):
        leaves = [t.detach().clone().requires_grad_(needed) for t, needed in zip(inputs, needs_grad)]
        mode = _RecordingMode()
        with mode if path == "op" else contextlib.nullcontext():
            outputs, loss = run(*leaves)
            wanted = [t for t in leaves if t.requires_grad]
            grads = torch.autograd.grad(loss, wanted) if wanted else ()
        node = next((type(out.grad_fn).__name__ for out in outputs if out.grad_fn is not None), None)
        results[path] = outputs, grads, node, mode.ops
    return results


def _assert_bitwise_equal(results):
    (fast_outputs, fast_grads, fast_node, _), (op_outputs, op_grads, op_node, op_ops) = results["fast"], results["op"]
    assert len(fast_grads) == len(op_grads)
    for a, b in zip((*fast_outputs, *fast_grads), (*op_outputs, *op_grads)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert fast_node is None or fast_node in FAST_PATH_NODES, fast_node
    assert op_node is None or op_node not in FAST_PATH_NODES, op_node
    return op_ops


@needs_cpp
@pytest.mark.parametrize("use", [("h",), ("v",), ("h", "v")], ids="+".join)
@pytest.mark.parametrize("needs_grad", [(h, f, d) for h in (0, 1) for f in (0, 1) for d in (0, 1)],
                         ids=lambda flags: "".join(n for n, on in zip("hfd", flags) if on) or "none")
@pytest.mark.parametrize("spatial", [(3, 4), (7,)], ids=["4d", "3d"])
def test_feedback_step_fast_path_matches_the_custom_op_bitwise(spatial, needs_grad, use):
    """Every needs_input_grad combination (a frozen decay, h(0) without gradient) and either output alone."""
    inputs = _feedback_inputs(2, 5, spatial, F32, requires_grad=False)
    weights = [torch.randn(2, 5, *spatial), torch.randn(2, 2, *spatial)]

    def run(h, f, decay):
        h_next, v = fbkernels.feedback_step(h, f, decay, 2, backend="cpp")
        used = {"h": (h_next * weights[0]).sum(), "v": (v * weights[1]).sum()}
        return (h_next, v), sum(used[name] for name in use)

    op_ops = _assert_bitwise_equal(_grads_by_path(run, inputs, tuple(map(bool, needs_grad))))
    assert "fbkernels.feedback_step.default" in op_ops
    assert ("fbkernels.feedback_step_backward.default" in op_ops) == any(needs_grad)


@needs_cpp
@pytest.mark.parametrize("needs_grad", [(0, 0), (1, 0), (0, 1), (1, 1)], ids=["none", "h", "gate", "h+gate"])
@pytest.mark.parametrize("spatial", [(3, 5), (7,), ()], ids=["4d", "3d", "2d"])
def test_context_gate_fast_path_matches_the_custom_op_bitwise(spatial, needs_grad):
    inputs = [t.detach() for t in _gate_inputs(2, 4, spatial, F32)]
    weight = torch.randn(2, 4, *spatial)

    def run(h, gate_logits):
        out = fbkernels.context_gate(h, gate_logits, 0.3, backend="cpp")
        return (out,), (out * weight).sum()

    op_ops = _assert_bitwise_equal(_grads_by_path(run, inputs, tuple(map(bool, needs_grad))))
    assert "fbkernels.context_gate.default" in op_ops
    assert ("fbkernels.context_gate_backward.default" in op_ops) == any(needs_grad)


@needs_cpp
def test_fast_path_runs_without_the_custom_op_and_with_the_requested_gradients_only():
    """The fast path's autograd node is the op's own; an input without requires_grad gets no gradient, and a call
    without gradients builds no node at all."""
    h, f, decay = _feedback_inputs(2, 5, (3,), F32, requires_grad=False)
    f.requires_grad_()
    h_next, v = fbkernels.feedback_step(h, f, decay, 2, backend="cpp")
    assert type(h_next.grad_fn).__name__ == "_FeedbackStepFunctionBackward"
    v.sum().backward()
    assert h.grad is None and decay.grad is None and f.grad is not None
    with torch.no_grad():
        assert fbkernels.feedback_step(h, f, decay, 2, backend="cpp")[0].grad_fn is None
    gate_h, gate_logits = _gate_inputs(2, 4, (3,), F32)
    assert type(fbkernels.context_gate(gate_h, gate_logits, 0.5, backend="cpp").grad_fn).__name__ == \
        "_ContextGateFunctionBackward"
    # The eager backend keeps the custom op path.
    assert type(fbkernels.feedback_step(h, f, decay, 2, backend="eager")[0].grad_fn).__name__ not in FAST_PATH_NODES
    # A model's decay is an nn.Parameter, which the fast path takes as a plain tensor; the results stay the op's.
    parameter = torch.nn.Parameter(decay.clone())
    fast = fbkernels.feedback_step(h, f, parameter, 2, backend="cpp")
    assert type(fast[0].grad_fn).__name__ == "_FeedbackStepFunctionBackward"
    with _RecordingMode():
        through_op = fbkernels.feedback_step(h, f, parameter, 2, backend="cpp")
    for a, b in zip(torch.autograd.grad(sum(t.sum() for t in fast), (f, parameter)),
                    torch.autograd.grad(sum(t.sum() for t in through_op), (f, parameter))):
        assert torch.equal(a, b)


@needs_cpp
def test_fast_path_double_backward_names_eager():
    h, f, decay = _feedback_inputs(2, 4, (3,), F64)
    h_next, v = fbkernels.feedback_step(h, f, decay, 2, backend="cpp")
    assert type(h_next.grad_fn).__name__ in FAST_PATH_NODES
    grad_f, = torch.autograd.grad(h_next.sum() + v.square().sum(), f, create_graph=True)
    with pytest.raises(RuntimeError, match="backend 'cpp' has no double backward.*backend='eager'"):
        grad_f.square().sum().backward()
    gate_h, gate_logits = _gate_inputs(2, 3, (4,), F64)
    out = fbkernels.context_gate(gate_h, gate_logits, 0.3, backend="cpp")
    assert type(out.grad_fn).__name__ in FAST_PATH_NODES
    grad_h, = torch.autograd.grad(out.square().sum(), gate_h, create_graph=True)
    with pytest.raises(RuntimeError, match="backend 'cpp' has no double backward.*backend='eager'"):
        grad_h.sum().backward()


@needs_cpp
def test_fake_tensors_and_function_modes_go_through_the_custom_op():
    """FakeTensorMode (the fast path would read the fake tensors' data) and a TorchFunctionMode see the op."""
    with FakeTensorMode():
        h, f, decay = torch.empty(2, 5, 3, 4), torch.empty(2, 5, 3, 4), torch.empty(5, 5)
        h_next, v = fbkernels.feedback_step(h, f, decay, 2, backend="cpp")
        out = fbkernels.context_gate(h, torch.empty(2, 5), 0.5, backend="cpp")
    assert all(isinstance(t, FakeTensor) for t in (h_next, v, out))
    assert h_next.shape == (2, 5, 3, 4) and v.shape == (2, 2, 3, 4) and out.shape == (2, 5, 3, 4)

    class RecordingFunctionMode(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.funcs = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.funcs.append(str(func))
            return func(*args, **(kwargs or {}))

    h, f, decay = _feedback_inputs(2, 5, (3,), F32)
    with RecordingFunctionMode() as mode:
        h_next, _ = fbkernels.feedback_step(h, f, decay, 2, backend="cpp")
    assert "fbkernels.feedback_step.default" in mode.funcs
    assert type(h_next.grad_fn).__name__ not in FAST_PATH_NODES


@needs_cpp
def test_torch_compile_graph_holds_the_custom_ops():
    captured = []

    def capture(graph_module, example_inputs):
        captured.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    torch._dynamo.reset()
    h, f, decay = _feedback_inputs(2, 6, (5, 4), F32)
    gate = torch.randn(2, 6)
    run = _two_steps("cpp")
    got = torch.compile(run, backend=capture, fullgraph=True)(h, f, decay, gate)
    assert "fbkernels.feedback_step.default" in captured and "fbkernels.context_gate.default" in captured
    assert torch.equal(got, run(h, f, decay, gate))


@needs_cpp
def test_profiler_names_the_custom_ops():
    h, f, decay = _feedback_inputs(2, 5, (3,), F32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        h_next, v = fbkernels.feedback_step(h, f, decay, 2, backend="cpp")
        (h_next.sum() + v.sum()).backward()
    names = {event.name for event in profile.events()}
    assert {"fbkernels::feedback_step", "fbkernels::feedback_step_backward"} <= names, sorted(names)


@needs_cpp
def test_backend_memo_follows_the_environment_variable_and_keeps_no_errors(monkeypatch):
    """Resolutions are memoised, but a changed FBKERNELS_BACKEND takes effect at the next call, and a failing
    resolution fails again with the same error."""
    h, f, decay = _feedback_inputs(1, 4, (3,), F32)
    monkeypatch.delenv("FBKERNELS_BACKEND", raising=False)
    assert type(fbkernels.feedback_step(h, f, decay, 2)[0].grad_fn).__name__ in FAST_PATH_NODES
    monkeypatch.setenv("FBKERNELS_BACKEND", "eager")
    assert type(fbkernels.feedback_step(h, f, decay, 2)[0].grad_fn).__name__ not in FAST_PATH_NODES
    monkeypatch.setenv("FBKERNELS_BACKEND", "cuda")
    for _ in range(2):
        with pytest.raises(ValueError, match="FBKERNELS_BACKEND='cuda' is not available for cpu tensors"):
            fbkernels.feedback_step(h, f, decay, 2)
    monkeypatch.delenv("FBKERNELS_BACKEND")
    half = [t.detach().half() for t in (h, f, decay)]
    for _ in range(2):
        with pytest.raises(TypeError, match="backend 'cpp' supports dtypes"):
            fbkernels.feedback_step(*half, 2, backend="cpp")
    assert type(fbkernels.feedback_step(h, f, decay, 2)[0].grad_fn).__name__ in FAST_PATH_NODES


@needs_cpp
@pytest.mark.parametrize("use", ["h_next", "v"])
def test_fast_path_passes_an_unused_outputs_gradient_as_none(use, monkeypatch):
    """set_materialize_grads(False) holds on the fast path too: the kernels get no zero tensor to read."""
    cpp, received = host_module("cpp"), []
    backward = cpp.feedback_step_backward

    def recording_backward(grad_h, grad_v, *args):
        received.append((grad_h is None, grad_v is None))
        return backward(grad_h, grad_v, *args)

    monkeypatch.setattr(cpp, "feedback_step_backward", recording_backward)
    h, f, decay = _feedback_inputs(2, 5, (3,), F32)
    h_next, v = fbkernels.feedback_step(h, f, decay, 2, backend="cpp")
    assert type(h_next.grad_fn).__name__ in FAST_PATH_NODES
    (h_next if use == "h_next" else v).sum().backward()
    assert received == [(use == "v", use == "h_next")]


@pytest.mark.parametrize("spatial", [(), (7,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_host_functions_take_any_spatial_rank(backend, device, spatial):
    """Every backend's host functions take contiguous [B, d, *S] as they come (the ops pass them without reshaping)
    and return outputs of that shape, equal in bits to their results on the flat [B, d, N] layout."""
    host = host_module(backend)
    h, f, decay = (t.detach() for t in _feedback_inputs(2, 5, spatial, F64, device))
    k = 2
    flat = [t.reshape(2, 5, math.prod(spatial)) for t in (h, f)]
    h_next, v = host.feedback_step_forward(h, f, decay, k)
    assert h_next.shape == h.shape and v.shape == (2, k, *spatial)
    for got, want in zip((h_next, v), host.feedback_step_forward(*flat, decay, k)):
        assert torch.equal(got.reshape(want.shape), want)
    grad_h, grad_v = torch.randn_like(h), torch.randn_like(v)
    grads = host.feedback_step_backward(grad_h, grad_v, f, v, decay, k)
    flat_grads = host.feedback_step_backward(grad_h.reshape(flat[0].shape), grad_v.reshape(2, k, -1), flat[1],
                                             v.reshape(2, k, -1), decay, k)
    assert [g.shape for g in grads] == [h.shape, h.shape, decay.shape]
    for got, want in zip(grads, flat_grads):
        assert torch.equal(got.reshape(want.shape), want)
    gate = torch.randn(2, 5, dtype=F64, device=device)
    out = host.context_gate_forward(h, gate, 0.3)
    assert out.shape == h.shape
    assert torch.equal(out.reshape(flat[0].shape), host.context_gate_forward(flat[0], gate, 0.3))
    grad_out = torch.randn_like(h)
    grad_h_in, grad_gate = host.context_gate_backward(grad_out, h, gate, 0.3)
    want_h, want_gate = host.context_gate_backward(grad_out.reshape(flat[0].shape), flat[0], gate, 0.3)
    assert grad_h_in.shape == h.shape and torch.equal(grad_h_in.reshape(want_h.shape), want_h)
    assert torch.equal(grad_gate, want_gate)


@needs_cpp
def test_jit_trace_records_the_custom_ops():
    """torch.jit.trace records the op (the fast path's kernel call would be invisible to it, leaving a wrong trace)."""
    h, f, decay = (t.detach() for t in _feedback_inputs(2, 5, (3, 4), F32))
    gate = torch.randn(2, 5)

    def run(h, f, decay, gate):
        h_next, v = fbkernels.feedback_step(h, f, decay, 2, backend="cpp")
        return fbkernels.context_gate(h_next, gate, 0.5, backend="cpp"), v

    traced = torch.jit.trace(run, (h, f, decay, gate), check_trace=False)
    graph = str(traced.graph)
    assert "fbkernels::feedback_step" in graph and "fbkernels::context_gate" in graph, graph
    h2, f2 = torch.randn_like(h), torch.randn_like(f)
    for a, b in zip(traced(h2, f2, decay, gate), run(h2, f2, decay, gate)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", FUSED_BACKEND_DEVICES)
def test_vmap_goes_through_the_custom_op(backend, device):
    """Under vmap the op runs per sample through the custom op's batching fallback (the fast path would hand the
    kernels a batched tensor's storage); plain vmap is not a differentiating transform, so it is not refused."""
    h, f = _randn(3, 2, 4, 5, dtype=F32, device=device), _randn(2, 4, 5, dtype=F32, device=device)
    decay, gate_logits = _randn(4, 4, dtype=F32, device=device), _randn(2, 4, dtype=F32, device=device)
    batched = torch.func.vmap(lambda x: fbkernels.feedback_step(x, f, decay, 2, backend=backend)[1])(h)
    gated = torch.func.vmap(lambda x: fbkernels.context_gate(x, gate_logits, 0.3, backend=backend))(h)
    for i in range(3):
        assert torch.equal(batched[i], fbkernels.feedback_step(h[i], f, decay, 2, backend=backend)[1])
        assert torch.equal(gated[i], fbkernels.context_gate(h[i], gate_logits, 0.3, backend=backend))
