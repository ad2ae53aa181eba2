"""feedback_step: one state update of the Feedback U-Net, the whole op in one place.

Math, per batch element b and position s (h, f: [B, d, *S]; M = decay: [d, d]; k = num_feedback):

    h_next[b, :, s] = h[b, :, s] + M @ f[b, :, s]
    v[b, :, s]      = softmax(h_next[b, d-k:, s])

Backward, from upstream g_h = dL/dh_next and g_v = dL/dv (either may be absent):

    g = g_h;  g[:, d-k:] += v * (g_v - sum_c v * g_v)
    dL/dh = g,   dL/df = M^T @ g,   dL/dM = sum over b, s of g f^T

In order below: input validation, the eager reference (the "eager" backend's host functions), the custom ops
``fbkernels::feedback_step`` and ``fbkernels::feedback_step_backward`` with their fake implementations, autograd,
the autocast rule, the eager fast path (plain eager calls on the cpp backend run the custom op's host calls and
autograd functions without its dispatcher layers), and the public function. The fused backends (fbkernels/_cpp.py,
_cuda.py, triton/) provide host functions with the reference's signatures on contiguous [B, d, *S] tensors; their
kernels see B, d and N = prod(S), and the op passes its tensors without reshaping them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import host_module, resolve_backend
from ._checks import (
    FLOAT_DTYPES,
    check_int,
    check_like_state,
    check_needs_grad,
    check_op_backend,
    check_shape,
    check_tensor,
    compute_dtype,
    fast_path,
    flat,
    register_autocast_to_state_dtype,
    run_as_torch_ops,
    runs_as_torch_ops,
    unaliased,
    unrequested,
)


def _check_inputs(h, f, decay, num_feedback, *, exact_dtypes: bool = False) -> None:
    """The public function's checks, and the custom op's (``exact_dtypes``: its autocast rule has cast already).
    Every public call runs it, so the common case calls no helper; _check_state and _check_decay_and_num_feedback,
    shared with the backward op, raise the errors."""
    check_tensor("h", h, min_dim=2)
    d = h.shape[1]
    if d < 1:  # before num_feedback's check, whose range 1..d would be empty
        _check_state("h", h)  # raises
    check_tensor("f", f)
    check_tensor("decay", decay)
    check_like_state("f", f, "h", h, exact_dtype=exact_dtypes)
    check_like_state("decay", decay, "h", h, exact_dtype=exact_dtypes)
    if f.shape != h.shape:
        raise ValueError(f"f must have the shape of h {tuple(h.shape)}, got {tuple(f.shape)}")
    check_int("num_feedback", num_feedback)
    # Element-wise: the sizes may be symbolic, and Dynamo does not compare a torch.Size holding symbols with a tuple.
    if decay.dim() != 2 or decay.shape[0] != d or decay.shape[1] != d or not 1 <= num_feedback <= d:
        _check_decay_and_num_feedback(decay, num_feedback, "h", h, exact_dtypes)  # raises


def _check_backward_inputs(grad_h, grad_v, f, v, decay, num_feedback, needs_grad) -> None:
    """The backward op's checks: f and decay as in the forward, v [B, k, *S] and the upstream gradients (each may be
    None) of their outputs' shapes, all of f's dtype and device."""
    _check_state("f", f)
    _check_decay_and_num_feedback(decay, num_feedback, "f", f, True)
    expected_v = (f.shape[0], num_feedback, *f.shape[2:])
    for name, value, expected, meaning in (("v", v, expected_v, "[B, num_feedback, *S]"),
                                           ("grad_h", grad_h, f.shape, "of f"),
                                           ("grad_v", grad_v, expected_v, "of v")):
        if value is not None:  # v is a Tensor by the op's schema
            check_tensor(name, value)
            check_like_state(name, value, "f", f, exact_dtype=True)
            check_shape(name, value, expected, meaning)
    check_needs_grad(needs_grad, 3)


def _op_inputs_ok(h: Tensor, f: Tensor, decay: Tensor, num_feedback: int) -> bool:
    """The forward op's checks in one expression, a few microseconds cheaper per call than _check_inputs, which then
    finds what is wrong (the op's schema has made the tensors tensors and num_feedback an int already)."""
    shape, dtype, device = h.shape, h.dtype, h.device
    d = shape[1] if len(shape) >= 2 else 0
    return (d >= 1 and dtype in FLOAT_DTYPES and f.dtype == dtype and decay.dtype == dtype and f.shape == shape
            and decay.shape == (d, d) and 1 <= num_feedback <= d and f.device == device and decay.device == device)


def _backward_op_inputs_ok(grad_h, grad_v, f, v, decay, num_feedback, needs_grad) -> bool:
    """The backward op's checks in one expression, as _op_inputs_ok for the forward."""
    shape, dtype, device = f.shape, f.dtype, f.device
    d = shape[1] if len(shape) >= 2 else 0
    if not (d >= 1 and dtype in FLOAT_DTYPES and decay.dtype == dtype and decay.shape == (d, d)
            and 1 <= num_feedback <= d and decay.device == device and len(needs_grad) == 3):
        return False
    v_shape = (shape[0], num_feedback, *shape[2:])
    for t, expected in ((v, v_shape), (grad_h, shape), (grad_v, v_shape)):
        if t is not None and not (t.dtype == dtype and t.shape == expected and t.device == device):
            return False
    return True


def _check_state(name: str, state) -> None:
    check_tensor(name, state, min_dim=2)
    if state.shape[1] < 1:  # before num_feedback's check, whose range 1..d would be empty
        raise ValueError(f"{name} must have at least one channel ([B, d, *S] with d >= 1), "
                         f"got shape {tuple(state.shape)}")


def _check_decay_and_num_feedback(decay, num_feedback, state_name: str, state: Tensor, exact_dtypes: bool) -> None:
    check_tensor("decay", decay)
    check_like_state("decay", decay, state_name, state, exact_dtype=exact_dtypes)
    d = state.shape[1]
    if decay.dim() != 2 or decay.shape[0] != d or decay.shape[1] != d:
        raise ValueError(f"decay must be a [d, d] = [{d}, {d}] matrix for {state_name} with d={d} channels, "
                         f"got {tuple(decay.shape)}")
    check_int("num_feedback", num_feedback)
    if not 1 <= num_feedback <= d:
        raise ValueError(f"num_feedback must be in 1..d = 1..{d}, got {num_feedback}")


# ---------------------------------------------------------------- eager reference (the "eager" backend)

def _channel_mix(matrix: Tensor, x: Tensor) -> Tensor:
    """y[b, :, s] = matrix @ x[b, :, s] for x: [B, d, *S]."""
    return torch.matmul(matrix, flat(x)).reshape(x.shape[0], matrix.shape[0], *x.shape[2:])


def feedback_step_forward(h: Tensor, f: Tensor, decay: Tensor, num_feedback: int) -> tuple[Tensor, Tensor]:
    """(h_next [B, d, *S], v [B, k, *S]); float16/bfloat16 compute in float32 and round once."""
    ct = compute_dtype(h.dtype)
    h_next = h.to(ct) + _channel_mix(decay.to(ct), f.to(ct))
    v = torch.softmax(h_next[:, h.shape[1] - num_feedback:], dim=1)
    return h_next.to(h.dtype), v.to(h.dtype)


def feedback_step_backward(
    grad_h: Tensor | None, grad_v: Tensor | None, f: Tensor, v: Tensor, decay: Tensor, num_feedback: int,
    needs_grad: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dL/dh, dL/df, dL/ddecay), each None where ``needs_grad`` says so; absent upstream gradients count as zero.
    Plain differentiable torch ops, so the eager backend's backward can itself be differentiated."""
    if not any(needs_grad):
        return None, None, None
    ct = compute_dtype(f.dtype)
    d, k = f.shape[1], num_feedback
    g = grad_h.to(ct) if grad_h is not None else torch.zeros(f.shape, dtype=ct, device=f.device)
    if grad_v is not None:
        v_c, gv = v.to(ct), grad_v.to(ct)
        g_feedback = g[:, d - k:] + v_c * (gv - (v_c * gv).sum(dim=1, keepdim=True))
        g = torch.cat((g[:, :d - k], g_feedback), dim=1)
    needs_h, needs_f, needs_decay = needs_grad
    grad_h_in = g.to(f.dtype) if needs_h else None
    grad_f = _channel_mix(decay.to(ct).t(), g).to(f.dtype) if needs_f else None
    # tensordot rather than einsum: the legacy vmap of torch.autograd.grad(is_grads_batched=True) and
    # jacobian(vectorize=True) has a batching rule for it, not for einsum.
    grad_decay = (torch.tensordot(flat(g), flat(f.to(ct)), dims=([0, 2], [0, 2])).to(decay.dtype)
                  if needs_decay else None)
    return grad_h_in, grad_f, grad_decay


# ---------------------------------------------------------------- custom ops and their fake implementations
# The backend name is an argument of the op: on one device several backends can run the op (eager and cpp on CPU),
# which dispatch keys cannot tell apart. feedback_step() resolves it before the call, so a graph holds a constant.

def _forward_on_host(h: Tensor, f: Tensor, decay: Tensor, num_feedback: int, backend: str) -> tuple[Tensor, Tensor]:
    """The forward op's body, which the eager fast path also runs: backend's host function on contiguous inputs."""
    return host_module(backend).feedback_step_forward(h.contiguous(), f.contiguous(), decay.contiguous(), num_feedback)


def _backward_on_host(grad_h, grad_v, f, v, decay, num_feedback, backend, needs_grad) -> tuple[Tensor | None, ...]:
    """The backward op's body, which the eager fast path also runs (the op adds its own contract: no output
    aliasing an input, an empty tensor for an absent gradient): (dL/dh, dL/df, dL/ddecay), None where
    ``needs_grad`` leaves a gradient out."""
    return host_module(backend).feedback_step_backward(
        None if grad_h is None else grad_h.contiguous(), None if grad_v is None else grad_v.contiguous(),
        f.contiguous(), v.contiguous(), decay.contiguous(), num_feedback, tuple(needs_grad),
    )


# The ops check their inputs as the public function does (torch.ops.fbkernels.* is public API, and the host functions
# read raw pointers), the real ops also the backend against the tensors' device and dtype; the fakes check the
# same shapes, dtypes and devices, so a traced call fails where an eager one would. The public function's fast path
# skips the op, so a plain public call is checked once.

@torch.library.custom_op("fbkernels::feedback_step", mutates_args=())
def _feedback_step_op(h: Tensor, f: Tensor, decay: Tensor, num_feedback: int, backend: str) -> tuple[Tensor, Tensor]:
    if not _op_inputs_ok(h, f, decay, num_feedback):
        _check_inputs(h, f, decay, num_feedback, exact_dtypes=True)  # raises, naming the argument
    check_op_backend(backend, h)
    return _forward_on_host(h, f, decay, num_feedback, backend)


@_feedback_step_op.register_fake
def _(h, f, decay, num_feedback, backend):
    _check_inputs(h, f, decay, num_feedback, exact_dtypes=True)
    return h.new_empty(h.shape), h.new_empty((h.shape[0], num_feedback, *h.shape[2:]))


@torch.library.custom_op("fbkernels::feedback_step_backward", mutates_args=())
def _feedback_step_backward_op(
    grad_h: Optional[Tensor], grad_v: Optional[Tensor], f: Tensor, v: Tensor, decay: Tensor, num_feedback: int,
    backend: str, needs_grad: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dh, dL/df, dL/ddecay); an empty tensor for each gradient that ``needs_grad`` leaves out."""
    if not _backward_op_inputs_ok(grad_h, grad_v, f, v, decay, num_feedback, needs_grad):
        _check_backward_inputs(grad_h, grad_v, f, v, decay, num_feedback, needs_grad)  # raises, naming the argument
    check_op_backend(backend, f)
    grads = _backward_on_host(grad_h, grad_v, f, v, decay, num_feedback, backend, needs_grad)
    return tuple(unrequested(like) if grad is None else unaliased(grad, grad_h, grad_v)
                 for grad, like in zip(grads, (f, f, decay)))


@_feedback_step_backward_op.register_fake
def _(grad_h, grad_v, f, v, decay, num_feedback, backend, needs_grad):
    _check_backward_inputs(grad_h, grad_v, f, v, decay, num_feedback, needs_grad)
    shapes = (f.shape, f.shape, decay.shape)
    return tuple(like.new_empty(shape) if needed else unrequested(like)
                 for needed, shape, like in zip(needs_grad, shapes, (f, f, decay)))


# ---------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    _, f, decay, num_feedback, backend = inputs
    ctx.save_for_backward(f, output[1], decay)
    ctx.num_feedback, ctx.backend = num_feedback, backend
    # An upstream gradient that does not exist stays None, so the kernels skip it instead of reading zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_h_next, grad_v):
    f, v, decay = ctx.saved_tensors
    needs_grad = tuple(ctx.needs_input_grad[:3])
    if (grad_h_next is None and grad_v is None) or not any(needs_grad):
        return None, None, None, None, None
    if ctx.backend == "eager":
        grads = feedback_step_backward(grad_h_next, grad_v, f, v, decay, ctx.num_feedback, needs_grad)
    elif not torch.is_grad_enabled() and fast_path(ctx.backend, grad_h_next, grad_v, f, v, decay):
        # Without create_graph nothing differentiates these gradients: the backward op, which raises on a
        # double backward, is not needed.
        grads = _backward_on_host(grad_h_next, grad_v, f, v, decay, ctx.num_feedback, ctx.backend, needs_grad)
    else:
        grads = torch.ops.fbkernels.feedback_step_backward.default(
            grad_h_next, grad_v, f, v, decay, ctx.num_feedback, ctx.backend, list(needs_grad)
        )
        grads = tuple(grad if needed else None for grad, needed in zip(grads, needs_grad))
    return (*grads, None, None)


_feedback_step_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    ctx.backend = inputs[6]


def _double_backward(ctx, *grads):
    raise RuntimeError(
        f"fbkernels.feedback_step: backend {ctx.backend!r} has no double backward (a gradient of its gradient, as in "
        "a gradient penalty or a Hessian-vector product); use backend='eager', whose backward is differentiable"
    )


_feedback_step_backward_op.register_autograd(_double_backward, setup_context=_setup_backward_context)


# ---------------------------------------------------------------- autocast: compute in the state's dtype

def _cast_to_state(args):
    h, f, decay, num_feedback, backend = args
    return h, f.to(h.dtype), decay.to(h.dtype), num_feedback, backend


register_autocast_to_state_dtype("fbkernels::feedback_step", _cast_to_state)


# ---------------------------------------------------------------- eager fast path
# A custom op call costs tens of microseconds in torch.library's Python layers, as much as the cpp kernels take on
# small maps. Plain eager calls (fast_path in ops/_checks.py) skip them: the same host function, and with gradients
# an autograd.Function with the op's own _setup_context and _backward, so both paths give bitwise the same results.

class _FeedbackStepFunction(torch.autograd.Function):
    # forward(ctx, ...) rather than a separate setup_context: Function.apply binds default arguments by inspecting
    # the signature when setup_context is defined, which costs more than the rest of the call.
    @staticmethod
    def forward(ctx, h, f, decay, num_feedback, backend):
        output = _forward_on_host(h, f, decay, num_feedback, backend)
        _setup_context(ctx, (h, f, decay, num_feedback, backend), output)
        return output

    backward = staticmethod(_backward)


# ---------------------------------------------------------------- public function

def feedback_step(h: Tensor, f: Tensor, decay: Tensor, num_feedback: int, *, backend: str | None = None):
    """One feedback-state update: ``h_next = h + decay @ f`` per position, ``v = softmax(h_next[:, d-k:])``.

    h, f: [B, d, *S]; decay: [d, d]; num_feedback = k in 1..d. Returns (h_next [B, d, *S], v [B, k, *S]) in h's
    dtype (under torch.autocast, f and decay are cast to it). ``backend``: "eager", "cpp", "cuda", "triton" or None
    for the fastest available one.
    """
    _check_inputs(h, f, decay, num_feedback)
    name = resolve_backend(backend, h.device, h.dtype)
    num_feedback = int(num_feedback)
    if fast_path(name, h, f, decay):  # first: it is the common case, and none of the cases below takes it
        if torch.is_grad_enabled() and (h.requires_grad or f.requires_grad or decay.requires_grad):
            return _FeedbackStepFunction.apply(h, f, decay, num_feedback, name)
        return _forward_on_host(h, f, decay, num_feedback, name)
    if runs_as_torch_ops(name, h, f, decay):  # forward AD, torch.func and eager, torch.func.grad and a fused backend
        return run_as_torch_ops("feedback_step", name, h.device, feedback_step_forward, h, f, decay, num_feedback)
    return torch.ops.fbkernels.feedback_step.default(h, f, decay, num_feedback, name)
