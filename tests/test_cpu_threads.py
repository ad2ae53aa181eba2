"""The cpp backend on PyTorch's thread pool: one OpenMP runtime, torch.set_num_threads governs the kernels, results
bitwise equal for any thread count, and the backward writes only the gradients asked for (against eager)."""
import itertools
import math

import pytest
import torch

import fbkernels
from fbkernels import _reference

from _compare import CPU_ISAS, assert_close, cpu_build

pytestmark = pytest.mark.skipif("cpp" not in fbkernels.available_backends("cpu"), reason="fbkernels._C not built")

DTYPES = [torch.float32, torch.float64]
# (B, d, k, N): the Feedback U-Net state at batch 2 (d = 18, 128 x 128), odd N, several chunks with a partial one,
# and passes past 24 MiB with an odd N (non-temporal stores from unaligned row starts, huge-page advice) and with
# aligned rows (with AVX-512 the forward's channel mix then writes h_next itself).
FEEDBACK_SHAPES = [(2, 18, 2, 128 * 128), (3, 18, 2, 37 * 41), (5, 7, 3, 4099), (1, 33, 1, 3 * 5 * 7),
                   (2, 18, 2, 512 * 231 + 3), (2, 18, 2, 512 * 232)]
# (B, C, N): CBL-CNN maps, odd N, and a pass past 24 MiB with an odd N.
GATE_SHAPES = [(128, 64, 16 * 16), (16, 64, 129), (3, 5, 7), (32, 64, 2049)]
THREAD_COUNTS = (1, 2, 3)


@pytest.fixture(params=CPU_ISAS)
def cpp(request, monkeypatch):
    """fbkernels._cpp running each CPU build that was built and that this CPU runs (the kernels differ per build)."""
    from fbkernels import _cpp

    monkeypatch.setattr(_cpp, "_C", cpu_build(request.param))
    return _cpp


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _feedback_tensors(B, d, k, N, dtype):
    return {
        "h": torch.randn(B, d, N, dtype=dtype), "f": torch.randn(B, d, N, dtype=dtype),
        "decay": torch.randn(d, d, dtype=dtype) / math.sqrt(d),
        "grad_h": torch.randn(B, d, N, dtype=dtype), "grad_v": torch.randn(B, k, N, dtype=dtype),
    }


def _bitwise_equal(a, b):
    if a is None or b is None:
        return a is None and b is None
    as_int = torch.int64 if a.dtype == torch.float64 else torch.int32
    return a.shape == b.shape and torch.equal(a.view(as_int), b.view(as_int))


def test_one_openmp_runtime_shared_with_torch(cpp):
    runtimes = cpp.loaded_openmp_runtimes()
    assert len(runtimes) == 1, runtimes
    for threads in (1, 3, 2):
        torch.set_num_threads(threads)
        assert cpp._C.runtime_max_threads() == threads  # torch's setting reaches the kernels' runtime


@pytest.mark.parametrize("threads", [1, 2])
def test_set_num_threads_sets_the_kernels_team(cpp, threads):
    torch.set_num_threads(threads)
    x = _feedback_tensors(8, 18, 2, 64 * 64, torch.float32)
    h_next, v = torch.empty_like(x["h"]), torch.empty(8, 2, 64 * 64)
    params = cpp._feedback_step_params(x["h"], 2, h=x["h"].data_ptr(), f=x["f"].data_ptr(),
                                       decay=x["decay"].data_ptr(), h_next=h_next.data_ptr(), v=v.data_ptr())
    assert cpp._C.feedback_step_forward(params) == threads
    g = torch.randn(128, 64, 256)
    out = torch.empty_like(g)
    params = cpp._context_gate_params(g, 0.25, h=g.data_ptr(), gate_logits=torch.zeros(128, 64).data_ptr(),
                                      out=out.data_ptr())
    assert cpp._C.context_gate_forward(params) == threads


def _under_threads(fn):
    results = []
    for threads in THREAD_COUNTS:
        torch.set_num_threads(threads)
        results.append(fn())
    return results


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,k,N", FEEDBACK_SHAPES)
def test_feedback_step_bits_independent_of_threads(cpp, B, d, k, N, dtype):
    x = _feedback_tensors(B, d, k, N, dtype)
    forwards = _under_threads(lambda: cpp.feedback_step_forward(x["h"], x["f"], x["decay"], k))
    wide = {name: t.double() for name, t in x.items()}  # the reference in float64, as tests/_compare.py says
    for name, got, expected in zip(("h_next", "v"), forwards[0],
                                   _reference.feedback_step_forward(wide["h"], wide["f"], wide["decay"], k)):
        assert_close(name, got, expected, dtype)
    v = forwards[0][1]
    expected_grads = _reference.feedback_step_backward(wide["grad_h"], wide["grad_v"], wide["f"], v.double(),
                                                       wide["decay"], k)
    for needs_grad in ((True, True, True), (False, True, True), (True, True, False)):
        for grad_h, grad_v in ((x["grad_h"], x["grad_v"]), (None, x["grad_v"]), (x["grad_h"], None)):
            backwards = _under_threads(
                lambda: cpp.feedback_step_backward(grad_h, grad_v, x["f"], v, x["decay"], k, needs_grad))
            for result in backwards[1:]:
                assert all(_bitwise_equal(a, b) for a, b in zip(result, backwards[0]))
            if all(needs_grad) and grad_h is not None and grad_v is not None:
                for name, got, expected, summed_over in zip(("grad_h", "grad_f", "grad_decay"), backwards[0],
                                                            expected_grads, (1, 1, B * N)):
                    assert_close(name, got, expected, dtype, summed_over)
    for result in forwards[1:]:
        assert all(_bitwise_equal(a, b) for a, b in zip(result, forwards[0]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,N", GATE_SHAPES)
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_context_gate_bits_independent_of_threads(cpp, B, C, N, alpha, dtype):
    h, gate_logits, grad_out = (torch.randn(B, C, N, dtype=dtype), torch.randn(B, C, dtype=dtype),
                                torch.randn(B, C, N, dtype=dtype))
    forwards = _under_threads(lambda: cpp.context_gate_forward(h, gate_logits, alpha))
    assert all(_bitwise_equal(out, forwards[0]) for out in forwards[1:])
    wide = h.double(), gate_logits.double()
    assert_close("out", forwards[0], _reference.context_gate_forward(*wide, alpha), dtype)
    backwards = _under_threads(lambda: cpp.context_gate_backward(grad_out, h, gate_logits, alpha))
    for name, got, expected, summed_over in zip(
            ("grad_h", "grad_gate_logits"), backwards[0],
            _reference.context_gate_backward(grad_out.double(), *wide, alpha), (1, N)):
        assert_close(name, got, expected, dtype, summed_over)
    for result in backwards[1:]:
        assert all(_bitwise_equal(a, b) for a, b in zip(result, backwards[0]))


def _close(actual, expected, dtype):
    tol = 1e-4 if dtype == torch.float32 else 1e-10  # grad_decay sums thousands of float32 products
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("needs_grad", list(itertools.product((False, True), repeat=3)))
def test_feedback_step_backward_writes_what_is_asked(cpp, needs_grad, dtype):
    B, d, k, N = 3, 18, 2, 37 * 41
    x = _feedback_tensors(B, d, k, N, dtype)
    _, v = _reference.feedback_step_forward(x["h"], x["f"], x["decay"], k)
    expected = _reference.feedback_step_backward(x["grad_h"], x["grad_v"], x["f"], v, x["decay"], k)
    result = cpp.feedback_step_backward(x["grad_h"], x["grad_v"], x["f"], v, x["decay"], k, needs_grad)
    for wanted, actual, reference in zip(needs_grad, result, expected):
        if wanted:
            _close(actual, reference, dtype)
        else:
            assert actual is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("needs_grad", list(itertools.product((False, True), repeat=2)))
def test_context_gate_backward_writes_what_is_asked(cpp, needs_grad, dtype):
    h, gate_logits, grad_out = (torch.randn(16, 64, 129, dtype=dtype), torch.randn(16, 64, dtype=dtype),
                                torch.randn(16, 64, 129, dtype=dtype))
    expected = _reference.context_gate_backward(grad_out, h, gate_logits, 0.3)
    result = cpp.context_gate_backward(grad_out, h, gate_logits, 0.3, needs_grad)
    for wanted, actual, reference in zip(needs_grad, result, expected):
        if wanted:
            _close(actual, reference, dtype)
        else:
            assert actual is None
