"""context_gate: the CBL-CNN's top-down gating of a feature map, the whole op in one place.

Math (h: [B, C, *S]; a = gate_logits: [B, C]; alpha in [0, 1]; the gate broadcasts over the positions s):

    out[b, c, s] = alpha * h[b, c, s] + (1 - alpha) * h[b, c, s] * sigmoid(a[b, c])

Backward, from g = dL/dout:

    dL/dh[b, c, s] = g[b, c, s] * (alpha + (1 - alpha) * sigmoid(a[b, c]))
    dL/da[b, c]    = (1 - alpha) * sigmoid(a) * (1 - sigmoid(a)) * sum over s of g[b, c, s] * h[b, c, s]

In order below: input validation, the eager reference (the "eager" backend's host functions), the custom ops
``fbkernels::context_gate`` and ``fbkernels::context_gate_backward`` with their fake implementations, autograd, the
autocast rule, the eager fast path (plain eager calls on the cpp backend run the custom op's host calls and autograd
functions without its dispatcher layers), and the public function. The fused backends provide host functions with
the reference's signatures on contiguous [B, C, *S] tensors; their kernels see B, C and N = prod(S), and the op
passes its tensors without reshaping them.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ..backends import host_module, resolve_backend
from ._checks import (
    FLOAT_DTYPES,
    check_like_state,
    check_needs_grad,
    check_op_backend,
    check_shape,
    check_tensor,
    compute_dtype,
    fast_path,
    register_autocast_to_state_dtype,
    run_as_torch_ops,
    runs_as_torch_ops,
    unaliased,
    unrequested,
)


def _check_inputs(h, gate_logits, alpha, *, exact_dtypes: bool = False) -> None:
    """The public function's checks, and the custom op's (``exact_dtypes``: its autocast rule has cast already)."""
    check_tensor("h", h, min_dim=2)
    check_tensor("gate_logits", gate_logits)
    check_like_state("gate_logits", gate_logits, "h", h, exact_dtype=exact_dtypes)
    B, C = h.shape[0], h.shape[1]
    if gate_logits.dim() != 2 or gate_logits.shape[0] != B or gate_logits.shape[1] != C:  # the sizes may be symbolic
        raise ValueError(f"gate_logits must have shape [B, C] = {[B, C]}, got {list(gate_logits.shape)}")
    if isinstance(alpha, torch.SymFloat):  # a float argument made symbolic by torch.compile (a custom op's fake)
        return
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a float in [0, 1], got {type(alpha).__name__}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def _op_inputs_ok(h: Tensor, gate_logits: Tensor, alpha: float) -> bool:
    """The forward op's checks in one expression, a few microseconds cheaper per call than _check_inputs, which then
    finds what is wrong (the op's schema has made the tensors tensors and alpha a float already)."""
    shape, dtype = h.shape, h.dtype
    return (len(shape) >= 2 and dtype in FLOAT_DTYPES and gate_logits.dtype == dtype and gate_logits.shape == shape[:2]
            and 0.0 <= alpha <= 1.0 and gate_logits.device == h.device)


def _backward_op_inputs_ok(grad_out: Tensor, h: Tensor, gate_logits: Tensor, alpha: float, needs_grad) -> bool:
    return (_op_inputs_ok(h, gate_logits, alpha) and grad_out.dtype == h.dtype and grad_out.shape == h.shape
            and grad_out.device == h.device and len(needs_grad) == 2)


def _check_backward_inputs(grad_out, h, gate_logits, alpha, needs_grad) -> None:
    """The backward op's checks: h, gate_logits and alpha as in the forward, grad_out of h's shape, dtype, device."""
    _check_inputs(h, gate_logits, alpha, exact_dtypes=True)
    check_tensor("grad_out", grad_out)
    check_like_state("grad_out", grad_out, "h", h, exact_dtype=True)
    check_shape("grad_out", grad_out, h.shape, "of h")
    check_needs_grad(needs_grad, 2)


# ---------------------------------------------------------------- eager reference (the "eager" backend)

def _per_position(h: Tensor, gate: Tensor) -> Tensor:
    """[B, C] -> [B, C, 1, ...], broadcastable against h: [B, C, *S]."""
    return gate.reshape(*gate.shape, *([1] * (h.dim() - 2)))


def context_gate_forward(h: Tensor, gate_logits: Tensor, alpha: float) -> Tensor:
    """out [B, C, *S]; float16/bfloat16 compute in float32 and round once."""
    ct = compute_dtype(h.dtype)
    gate = torch.sigmoid(_per_position(h, gate_logits).to(ct))
    h_c = h.to(ct)
    return (alpha * h_c + (1.0 - alpha) * h_c * gate).to(h.dtype)


def context_gate_backward(
    grad_out: Tensor, h: Tensor, gate_logits: Tensor, alpha: float, needs_grad: tuple[bool, bool] = (True, True)
) -> tuple[Tensor | None, Tensor | None]:
    """(dL/dh, dL/dgate_logits), each None where ``needs_grad`` says so. Plain differentiable torch ops, so the eager
    backend's backward can itself be differentiated."""
    needs_h, needs_gate = needs_grad
    ct = compute_dtype(h.dtype)
    gate = torch.sigmoid(gate_logits.to(ct))
    g = grad_out.to(ct)
    grad_h = (g * (alpha + (1.0 - alpha) * _per_position(h, gate))).to(h.dtype) if needs_h else None
    grad_gate = None
    if needs_gate:
        gh = (g * h.to(ct)).sum(dim=tuple(range(2, h.dim()))) if h.dim() > 2 else g * h.to(ct)
        grad_gate = ((1.0 - alpha) * gate * (1.0 - gate) * gh).to(gate_logits.dtype)
    return grad_h, grad_gate


# ---------------------------------------------------------------- custom ops and their fake implementations
# As for feedback_step, the backend is an op argument that context_gate() resolves before the call.

def _forward_on_host(h: Tensor, gate_logits: Tensor, alpha: float, backend: str) -> Tensor:
    """The forward op's body, which the eager fast path also runs: backend's host function on contiguous inputs."""
    return host_module(backend).context_gate_forward(h.contiguous(), gate_logits.contiguous(), alpha)


def _backward_on_host(grad_out, h, gate_logits, alpha, backend, needs_grad) -> tuple[Tensor | None, Tensor | None]:
    """The backward op's body, which the eager fast path also runs (the op adds its own contract: no output
    aliasing an input, an empty tensor for an absent gradient): (dL/dh, dL/dgate_logits), None where
    ``needs_grad`` leaves a gradient out."""
    return host_module(backend).context_gate_backward(
        grad_out.contiguous(), h.contiguous(), gate_logits.contiguous(), alpha, tuple(needs_grad)
    )


# As for feedback_step, the ops check their inputs (the real ops also the backend against the tensors' device and
# dtype) and the fakes the same shapes, dtypes and devices; the public function's fast path skips the op.

@torch.library.custom_op("fbkernels::context_gate", mutates_args=())
def _context_gate_op(h: Tensor, gate_logits: Tensor, alpha: float, backend: str) -> Tensor:
    if not _op_inputs_ok(h, gate_logits, alpha):
        _check_inputs(h, gate_logits, alpha, exact_dtypes=True)  # raises, naming the argument
    check_op_backend(backend, h)
    return _forward_on_host(h, gate_logits, alpha, backend)


@_context_gate_op.register_fake
def _(h, gate_logits, alpha, backend):
    _check_inputs(h, gate_logits, alpha, exact_dtypes=True)
    return h.new_empty(h.shape)


@torch.library.custom_op("fbkernels::context_gate_backward", mutates_args=())
def _context_gate_backward_op(
    grad_out: Tensor, h: Tensor, gate_logits: Tensor, alpha: float, backend: str, needs_grad: list[bool]
) -> tuple[Tensor, Tensor]:
    """(dL/dh, dL/dgate_logits); an empty tensor for each gradient that ``needs_grad`` leaves out."""
    if not _backward_op_inputs_ok(grad_out, h, gate_logits, alpha, needs_grad):
        _check_backward_inputs(grad_out, h, gate_logits, alpha, needs_grad)  # raises, naming the argument
    check_op_backend(backend, h)
    grad_h, grad_gate = _backward_on_host(grad_out, h, gate_logits, alpha, backend, needs_grad)
    return (unrequested(h) if grad_h is None else unaliased(grad_h, grad_out),
            unrequested(gate_logits) if grad_gate is None else grad_gate)


@_context_gate_backward_op.register_fake
def _(grad_out, h, gate_logits, alpha, backend, needs_grad):
    _check_backward_inputs(grad_out, h, gate_logits, alpha, needs_grad)
    return (
        h.new_empty(h.shape) if needs_grad[0] else unrequested(h),
        gate_logits.new_empty(gate_logits.shape) if needs_grad[1] else unrequested(gate_logits),
    )


# ---------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    h, gate_logits, alpha, backend = inputs
    ctx.save_for_backward(h, gate_logits)
    ctx.alpha, ctx.backend = alpha, backend


def _backward(ctx, grad_out):
    h, gate_logits = ctx.saved_tensors
    needs_grad = tuple(ctx.needs_input_grad[:2])
    if not any(needs_grad):
        return None, None, None, None
    if ctx.backend == "eager":
        grads = context_gate_backward(grad_out, h, gate_logits, ctx.alpha, needs_grad)
    elif not torch.is_grad_enabled() and fast_path(ctx.backend, grad_out, h, gate_logits):
        # Without create_graph nothing differentiates these gradients: the backward op, which raises on a
        # double backward, is not needed.
        grads = _backward_on_host(grad_out, h, gate_logits, ctx.alpha, ctx.backend, needs_grad)
    else:
        grads = torch.ops.fbkernels.context_gate_backward.default(
            grad_out, h, gate_logits, ctx.alpha, ctx.backend, list(needs_grad)
        )
        grads = tuple(grad if needed else None for grad, needed in zip(grads, needs_grad))
    return (*grads, None, None)


_context_gate_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    ctx.backend = inputs[4]


def _double_backward(ctx, *grads):
    raise RuntimeError(
        f"fbkernels.context_gate: backend {ctx.backend!r} has no double backward (a gradient of its gradient, as in "
        "a gradient penalty or a Hessian-vector product); use backend='eager', whose backward is differentiable"
    )


_context_gate_backward_op.register_autograd(_double_backward, setup_context=_setup_backward_context)


# ---------------------------------------------------------------- autocast: compute in the feature map's dtype

def _cast_to_state(args):
    h, gate_logits, alpha, backend = args
    return h, gate_logits.to(h.dtype), alpha, backend


register_autocast_to_state_dtype("fbkernels::context_gate", _cast_to_state)


# ---------------------------------------------------------------- eager fast path
# As for feedback_step: plain eager calls skip torch.library's Python layers, through an autograd.Function with the
# op's own _setup_context and _backward.

class _ContextGateFunction(torch.autograd.Function):
    # forward(ctx, ...): with a separate setup_context, Function.apply would inspect the signature on every call.
    @staticmethod
    def forward(ctx, h, gate_logits, alpha, backend):
        output = _forward_on_host(h, gate_logits, alpha, backend)
        _setup_context(ctx, (h, gate_logits, alpha, backend), output)
        return output

    backward = staticmethod(_backward)


# ---------------------------------------------------------------- public function

def context_gate(h: Tensor, gate_logits: Tensor, alpha: float, *, backend: str | None = None) -> Tensor:
    """Top-down gating: ``out = alpha * h + (1 - alpha) * h * sigmoid(gate_logits)`` broadcast over positions.

    h: [B, C, *S]; gate_logits: [B, C]; alpha in [0, 1]. Returns out [B, C, *S] in h's dtype (under torch.autocast,
    gate_logits is cast to it). ``backend``: "eager", "cpp", "cuda", "triton" or None for the fastest available one.
    """
    _check_inputs(h, gate_logits, alpha)
    name = resolve_backend(backend, h.device, h.dtype)
    alpha = float(alpha)
    if fast_path(name, h, gate_logits):  # first: it is the common case, and none of the cases below takes it
        if torch.is_grad_enabled() and (h.requires_grad or gate_logits.requires_grad):
            return _ContextGateFunction.apply(h, gate_logits, alpha, name)
        return _forward_on_host(h, gate_logits, alpha, name)
    if runs_as_torch_ops(name, h, gate_logits):  # forward AD, torch.func and eager, torch.func.grad and a fused backend
        return run_as_torch_ops("context_gate", name, h.device, context_gate_forward, h, gate_logits, alpha)
    return torch.ops.fbkernels.context_gate.default(h, gate_logits, alpha, name)
