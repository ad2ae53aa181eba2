"""The CUDA kernels of csrc/cuda, run without a GPU by the CPU emulation of CUDA (tests/cuda_emulation), against
the eager reference: all four passes, four dtypes, every channel bucket and the generic kernels, vectorised and
scalar paths, the backward's grid-stride loop and partial sums, and the host code of fbkernels/_cuda.py.

What this shows: the kernels index, synchronise and reduce correctly (the emulation also fails a launch on a
divergent __syncthreads or shuffle, and poisons shared memory so reads before writes show). What it cannot show:
speed, and anything that depends on the GPU's memory model or nvcc's code generation; tests/test_gpu.py does that
on a GPU. test_under_address_sanitizer reruns this file with ASan + UBSan (out-of-bounds and misaligned accesses).
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fbkernels import _cuda, _params, _reference

import _cuda_emulation
from _compare import assert_close

SANITIZED = os.environ.get("FBKERNELS_EMULATION_SANITIZED") == "1"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
STREAM = 0

pytestmark = pytest.mark.skipif(_cuda_emulation.compiler() is None, reason="needs g++ >= 12 (for _Float16)")


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    library = _cuda_emulation.build(tmp_path_factory.mktemp("cuda_emulation"), sanitize=SANITIZED)
    return _cuda_emulation.EmulatedCuda(library)


def _feedback_inputs(B, d, N, dtype, unaligned=()):
    """h, f [B, d, N] and decay [d, d]. The tensors named in `unaligned` start one element into their storage:
    contiguous but not 16-byte aligned, so the kernels must take their scalar path."""
    def make(name, *shape, scale=1.0):
        offset = 1 if name in unaligned else 0
        flat = torch.randn(offset + math.prod(shape)) * scale
        return flat.to(dtype)[offset:].view(*shape)
    return make("h", B, d, N), make("f", B, d, N), make("decay", d, d, scale=1 / math.sqrt(d))


def _check_feedback_step(ext, B, d, k, N, dtype, unaligned=(), upstream=("h", "v")):
    h, f, decay = _feedback_inputs(B, d, N, dtype, unaligned)
    h_next, v = _cuda.launch_feedback_step_forward(ext, STREAM, h, f, decay, k)
    ref_h_next, ref_v = _reference.feedback_step_forward(h, f, decay, k)
    assert_close("h_next", h_next, ref_h_next, dtype)
    assert_close("v", v, ref_v, dtype)

    grad_h = torch.randn(B, d, N).to(dtype) if "h" in upstream else None
    grad_v = torch.randn(B, k, N).to(dtype) if "v" in upstream else None
    got = _cuda.launch_feedback_step_backward(ext, STREAM, grad_h, grad_v, f, ref_v, decay, k)
    expected = _reference.feedback_step_backward(grad_h, grad_v, f, ref_v, decay, k)
    for name, a, b in zip(("grad_h", "grad_f", "grad_decay"), got, expected):
        assert_close(name, a, b, dtype, summed_over=B * N if name == "grad_decay" else 1)
    return got


# d covers every register bucket of the forward (4..64) and backward (4..32) and the generic kernels above them
# (backward from 33, forward from 65); N covers one partial tile, many tiles (the backward's 8 resident blocks
# then loop), multiples of the 16-byte pack and odd sizes.
FEEDBACK_CASES = [
    (1, 1, 1, 5),
    (2, 3, 3, 37),
    (3, 4, 2, 64),
    (2, 8, 1, 96),
    (1, 16, 4, 200),
    (2, 18, 2, 1517),
    (3, 18, 18, 33),
    (2, 24, 5, 256),
    (1, 32, 2, 130),
    (2, 33, 3, 30),
    (1, 48, 7, 136),
    (1, 64, 1, 64),
    (1, 65, 2, 21),
    (1, 70, 40, 40),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,d,k,N", FEEDBACK_CASES)
def test_feedback_step_matches_eager(ext, B, d, k, N, dtype):
    _check_feedback_step(ext, B, d, k, N, dtype)


@pytest.mark.parametrize("unaligned", ["h", "f", "decay"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("d", [4, 18, 33, 65])
def test_feedback_step_unaligned_pointers(ext, d, dtype, unaligned):
    """N is a multiple of the pack width but one input is not 16-byte aligned: the scalar path must run (the
    sanitized run fails on a misaligned 16-byte access)."""
    _check_feedback_step(ext, 2, d, 2, 128, dtype, unaligned=(unaligned,))


@pytest.mark.parametrize("upstream", [("h",), ("v",)])
@pytest.mark.parametrize("d", [18, 40])
def test_feedback_step_backward_with_one_upstream_gradient(ext, d, upstream):
    _check_feedback_step(ext, 2, d, 3, 300, torch.float32, upstream=upstream)


@pytest.mark.parametrize("d", [18, 40])
def test_feedback_step_backward_is_deterministic(ext, d):
    """grad_decay is the fixed-order sum of per-block partials: the same bits on every run, though threads race."""
    h, f, decay = _feedback_inputs(4, d, 700, torch.float32)
    _, v = _reference.feedback_step_forward(h, f, decay, 2)
    grad_v = torch.randn_like(v)
    first, second = (_cuda.launch_feedback_step_backward(ext, STREAM, None, grad_v, f, v, decay, 2)[2]
                     for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_feedback_step_benchmark_shape(ext, dtype):
    """The shape of the GPU targets, B=16, d=18, k=2, 512x512 (about 30 s a dtype, emulated). grad_decay sums 4M
    positions, so it is held to eager's own accuracy: its error against float64 at most 3x eager's."""
    B, d, k, N = 16, 18, 2, 512 * 512
    h, f, decay = _feedback_inputs(B, d, N, dtype)
    h_next, v = _cuda.launch_feedback_step_forward(ext, STREAM, h, f, decay, k)
    for name, a, b in zip(("h_next", "v"), (h_next, v), _reference.feedback_step_forward(h, f, decay, k)):
        assert_close(name, a, b, dtype)
    grad_h, grad_v = torch.randn(B, d, N).to(dtype), torch.randn(B, k, N).to(dtype)
    got = _cuda.launch_feedback_step_backward(ext, STREAM, grad_h, grad_v, f, v, decay, k)
    eager = _reference.feedback_step_backward(grad_h, grad_v, f, v, decay, k)
    exact = _reference.feedback_step_backward(*(t.double() for t in (grad_h, grad_v, f, v, decay)), k)
    for name, a, b in zip(("grad_h", "grad_f"), got, eager):
        assert_close(name, a, b, dtype)
    kernel_error = (got[2].double() - exact[2]).abs().max().item()
    eager_error = (eager[2].double() - exact[2]).abs().max().item()
    assert kernel_error <= 3 * eager_error + 1e-6 * exact[2].abs().max().item(), (kernel_error, eager_error)


NEEDS = [(True, False, False), (False, True, False), (False, False, True), (True, True, False), (False, True, True),
         (False, False, False)]


@pytest.mark.parametrize("needs_grad", NEEDS, ids=lambda n: "".join("hfd"[i] if x else "-" for i, x in enumerate(n)))
@pytest.mark.parametrize("d", [18, 40])
def test_feedback_step_backward_computes_only_what_is_needed(ext, d, needs_grad):
    """Unneeded gradients come back None and are not written (their pointer is null: a write would crash the
    emulation); the needed ones match eager. Without grad_decay the reduction kernel does not run."""
    B, k, N = 2, 3, 300
    h, f, decay = _feedback_inputs(B, d, N, torch.float32)
    _, v = _reference.feedback_step_forward(h, f, decay, k)
    grad_h, grad_v = torch.randn(B, d, N), torch.randn(B, k, N)
    ext.take_launch_streams()
    got = _cuda.launch_feedback_step_backward(ext, STREAM, grad_h, grad_v, f, v, decay, k, needs_grad)
    launches = len(ext.take_launch_streams())
    expected = _reference.feedback_step_backward(grad_h, grad_v, f, v, decay, k)
    for name, need, a, b in zip(("grad_h", "grad_f", "grad_decay"), needs_grad, got, expected):
        if need:
            assert_close(name, a, b, torch.float32, summed_over=B * N if name == "grad_decay" else 1)
        else:
            assert a is None, name
    assert launches == (0 if not any(needs_grad) else 1 + needs_grad[2])


@pytest.mark.parametrize("needs_grad", [(True, False), (False, True)])
def test_context_gate_backward_computes_only_what_is_needed(ext, needs_grad):
    h, a, grad_out = torch.randn(2, 3, 1024), torch.randn(2, 3), torch.randn(2, 3, 1024)
    got = _cuda.launch_context_gate_backward(ext, STREAM, grad_out, h, a, 0.3, needs_grad)
    expected = _reference.context_gate_backward(grad_out, h, a, 0.3)
    for name, need, x, y in zip(("grad_h", "grad_gate_logits"), needs_grad, got, expected):
        if need:
            assert_close(name, x, y, torch.float32, summed_over=1024 if name == "grad_gate_logits" else 1)
        else:
            assert x is None, name


def _sizes(ext, B, d, N):
    """A FeedbackStepParams of the emulated module with only the sizes set."""
    return _params.feedback_step_params(ext, torch.empty(B, d, N), 1)


def test_backward_checks_its_partials_workspace(ext):
    """The workspace size comes from the kernel module; one too small is refused before any launch."""
    B, d, k, N = 2, 18, 2, 700
    f, v = torch.randn(B, d, N), torch.rand(B, k, N)
    decay, grad_decay = torch.randn(d, d), torch.empty(d, d)
    need = ext.feedback_step_num_partials(_sizes(ext, B, d, N)) * d * d
    partials = torch.empty(need)
    grad_h, grad_f = torch.empty_like(f), torch.empty_like(f)  # alive for the whole test: structs hold addresses

    def params(**changed):
        fields = dict(stream=STREAM, f=f, v=v, decay=decay, grad_v=v, grad_h=grad_h, grad_f=grad_f,
                      grad_decay=grad_decay, partials=partials, partials_elements=need)
        return _params.feedback_step_params(ext, f, k, **{**fields, **changed})

    with pytest.raises(ValueError, match=f"partials workspace must hold .* = {need} elements, got {need - 1}"):
        ext.feedback_step_backward(params(partials_elements=need - 1))
    with pytest.raises(ValueError, match="null pointer"):
        ext.feedback_step_backward(params(partials=None))
    with pytest.raises(ValueError, match="grad_f is a null pointer"):
        ext.feedback_step_backward(params(grad_f=None))
    ext.feedback_step_backward(params())


def test_the_emulated_device_has_a_kernel_image(ext):
    assert ext.kernel_image_error() == ""


def test_backward_uses_a_persistent_grid_of_partials(ext):
    """The emulated device holds 8 blocks: more tiles than that are looped over, fewer give one partial each."""
    assert ext.feedback_step_num_partials(_sizes(ext, 16, 18, 512 * 512)) == 8
    assert ext.feedback_step_num_partials(_sizes(ext, 1, 18, 100)) == 1
    assert ext.feedback_step_num_partials(_sizes(ext, 0, 18, 100)) == 1
    big = ext.FeedbackStepParams()  # sizes only: no 4 * 10**9-element tensor needed to ask
    big.B, big.d, big.N = 1, 4096, 10**6
    assert ext.feedback_step_num_partials(big) == 1  # capped by the 64 MiB workspace budget


def test_feedback_step_special_values_stay_local(ext):
    """-inf, +inf and NaN inputs: the kernels give what eager gives (softmax NaN exactly where eager's is)."""
    h, f, decay = _feedback_inputs(1, 6, 10, torch.float32)
    h[0, 5, 1] = -math.inf
    h[0, 4, 2] = math.inf
    h[0, 5, 3] = math.nan
    h_next, v = _cuda.launch_feedback_step_forward(ext, STREAM, h, f, decay, 2)
    ref_h_next, ref_v = _reference.feedback_step_forward(h, f, decay, 2)
    torch.testing.assert_close(h_next, ref_h_next, equal_nan=True)
    torch.testing.assert_close(v, ref_v, equal_nan=True)


# (B, C, N): one short row, rows of odd length, rows long enough for a 64-, 256- and 512-thread group (the sum
# then crosses warps through shared memory), and many rows.
GATE_CASES = [(1, 3, 35), (3, 16, 1), (2, 5, 129), (2, 3, 1024), (1, 2, 4100), (2, 1, 8200), (4, 64, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,N", GATE_CASES)
def test_context_gate_matches_eager(ext, B, C, N, dtype):
    h = torch.randn(B, C, N).to(dtype)
    a = torch.randn(B, C).to(dtype)
    grad_out = torch.randn(B, C, N).to(dtype)
    alpha = 0.3
    assert_close("out", _cuda.launch_context_gate_forward(ext, STREAM, h, a, alpha),
                  _reference.context_gate_forward(h, a, alpha), dtype)
    got = _cuda.launch_context_gate_backward(ext, STREAM, grad_out, h, a, alpha)
    expected = _reference.context_gate_backward(grad_out, h, a, alpha)
    assert_close("grad_h", got[0], expected[0], dtype)
    assert_close("grad_gate_logits", got[1], expected[1], dtype, summed_over=N)


def test_context_gate_unaligned_and_empty_rows(ext):
    flat = torch.randn(1 + 2 * 3 * 64)
    h = flat[1:].view(2, 3, 64)  # 4-byte aligned only: the scalar path
    a = torch.randn(2, 3)
    torch.testing.assert_close(_cuda.launch_context_gate_forward(ext, STREAM, h, a, 0.5),
                               _reference.context_gate_forward(h, a, 0.5))
    empty = torch.randn(2, 3, 0)  # N = 0: grad_gate_logits is zero, as eager gives
    _, grad_a = _cuda.launch_context_gate_backward(ext, STREAM, empty, empty, a, 0.5)
    torch.testing.assert_close(grad_a, torch.zeros(2, 3))


@pytest.mark.parametrize("spatial", [(), (3, 5), (2, 3, 4)])
def test_launchers_take_any_spatial_rank(ext, spatial):
    """The launchers take contiguous [B, d, *S] as fbkernels.ops passes them and return outputs of that shape,
    equal in bits to their results on the flat [B, d, N] layout."""
    B, d, k, N = 2, 5, 2, math.prod(spatial)
    h, f, decay = _feedback_inputs(B, d, N, torch.float32)
    shaped = [t.view(B, d, *spatial) for t in (h, f)]
    h_next, v = _cuda.launch_feedback_step_forward(ext, STREAM, *shaped, decay, k)
    assert h_next.shape == (B, d, *spatial) and v.shape == (B, k, *spatial)
    flat_h_next, flat_v = _cuda.launch_feedback_step_forward(ext, STREAM, h, f, decay, k)
    assert torch.equal(h_next.view(B, d, N), flat_h_next) and torch.equal(v.view(B, k, N), flat_v)
    grad_h, grad_v = torch.randn(B, d, N), torch.randn(B, k, N)
    grads = _cuda.launch_feedback_step_backward(ext, STREAM, grad_h.view(B, d, *spatial), grad_v.view(B, k, *spatial),
                                                shaped[1], v, decay, k)
    flat_grads = _cuda.launch_feedback_step_backward(ext, STREAM, grad_h, grad_v, f, flat_v, decay, k)
    assert [g.shape for g in grads] == [(B, d, *spatial), (B, d, *spatial), (d, d)]
    for got, want in zip(grads, flat_grads):
        assert torch.equal(got.reshape(want.shape), want)
    a = torch.randn(B, d)
    out = _cuda.launch_context_gate_forward(ext, STREAM, shaped[0], a, 0.3)
    assert out.shape == shaped[0].shape
    assert torch.equal(out.view(B, d, N), _cuda.launch_context_gate_forward(ext, STREAM, h, a, 0.3))
    got_h, got_a = _cuda.launch_context_gate_backward(ext, STREAM, grad_h.view(shaped[0].shape), shaped[0], a, 0.3)
    want_h, want_a = _cuda.launch_context_gate_backward(ext, STREAM, grad_h, h, a, 0.3)
    assert got_h.shape == shaped[0].shape and torch.equal(got_h.view(B, d, N), want_h) and torch.equal(got_a, want_a)


def test_every_kernel_runs_on_the_given_stream(ext):
    """The launchers launch only on the stream Python passes (PyTorch's current stream: CUDA graphs need that)."""
    stream = 0x5EED0
    h, f, decay = _feedback_inputs(2, 18, 300, torch.float32)
    ext.take_launch_streams()
    _, v = _cuda.launch_feedback_step_forward(ext, stream, h, f, decay, 2)
    _cuda.launch_feedback_step_backward(ext, stream, h, v, f, v, decay, 2)
    out = _cuda.launch_context_gate_forward(ext, stream, h, decay[:2], 0.5)
    _cuda.launch_context_gate_backward(ext, stream, out, h, decay[:2], 0.5)
    assert ext.take_launch_streams() == [stream] * 5  # forward, backward + partial sum, gate forward, backward


def test_bad_arguments_raise(ext):
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="k must be in 1..d=4, got 5"):
        _cuda.launch_feedback_step_forward(ext, STREAM, x, x, torch.randn(4, 4), 5)
    with pytest.raises(ValueError, match="dtype code"):
        ext.feedback_step_forward(_params.feedback_step_params(
            ext, x, 2, dtype=7, stream=STREAM, h=x, f=x, decay=x, h_next=x, v=x))

    with pytest.raises(ValueError, match="alpha must be in"):
        _cuda.launch_context_gate_forward(ext, STREAM, x, torch.randn(1, 4), 1.5)


def test_cpu_and_cuda_modules_load_together(ext):
    """The CPU modules and the CUDA module each register the same C++ structs (module-locally): all load in one
    process, each with its own Python classes, and each runs the structs it made."""
    cpu = pytest.importorskip("fbkernels._C")
    assert cpu.FeedbackStepParams is not ext.FeedbackStepParams
    assert cpu.ContextGateParams is not ext.ContextGateParams
    x, a = torch.randn(1, 4, 8), torch.randn(1, 4)
    expected = _reference.context_gate_forward(x, a, 0.5)
    for module in (cpu, ext):
        out = torch.empty_like(x)
        module.context_gate_forward(_params.context_gate_params(module, x, 0.5, h=x, gate_logits=a, out=out))
        torch.testing.assert_close(out, expected)


@pytest.mark.skipif(SANITIZED, reason="this is the sanitized run")
def test_under_address_sanitizer():
    """This file again, built with ASan + UBSan (any finding aborts), in a Python with the ASan runtime preloaded."""
    cxx = _cuda_emulation.compiler()
    runtimes = [subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
                for name in ("libasan.so", "libstdc++.so.6")]
    if not all(os.path.isabs(path) for path in runtimes):
        pytest.skip("the compiler has no AddressSanitizer runtime")
    # libstdc++ is preloaded too: ASan must find __cxa_throw when it starts, or the first C++ exception crashes.
    env = dict(os.environ, FBKERNELS_EMULATION_SANITIZED="1", LD_PRELOAD=" ".join(runtimes),
               ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0", UBSAN_OPTIONS="print_stacktrace=1")
    # -s: a sanitizer report goes to stderr just before the process exits, where pytest's capture would lose it.
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider", __file__],
                         cwd=Path(__file__).parent, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
