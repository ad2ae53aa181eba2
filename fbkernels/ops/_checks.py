"""What the op modules share: input checks for the public functions and the custom ops, the flat [B, d, N] view, the
dtype the reference computes in, the empty stand-in for a gradient autograd did not ask for, the autocast rule that
casts an op's other tensors to its state's dtype, the test for a plain eager call that may skip the custom op, and the
route around the custom op under forward-mode AD (no tangents) and torch.func transforms (no grad or vjp)."""
from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch import Tensor
from torch._C._functorch import TransformType, get_unwrapped, is_functorch_wrapped_tensor, is_legacy_batchedtensor
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad

from .._params import spatial_numel
from ..backends import resolve_backend

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_tensor(name: str, value, *, min_dim: int = 0) -> None:
    """A floating tensor with at least ``min_dim`` dims."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float32, float64, float16 or bfloat16), got {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(value.shape)}")


def autocast_enabled(device: torch.device) -> bool:
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def check_like_state(name: str, value: Tensor, state_name: str, state: Tensor, *, exact_dtype: bool = False) -> None:
    """On the state's device, and of its dtype unless autocast is on there (the op then casts to the state's dtype).
    ``exact_dtype``: of its dtype even under autocast, as inside a custom op, whose autocast rule has cast already."""
    if value.device != state.device:
        raise ValueError(f"{name} must be on the device of {state_name} ({state.device}), got {value.device}")
    if value.dtype != state.dtype and (exact_dtype or not autocast_enabled(state.device)):
        raise TypeError(
            f"{name} must have the dtype of {state_name} ({state.dtype}), got {value.dtype}"
            + ("" if exact_dtype else f" (under torch.autocast it is cast to {state_name}'s dtype)")
        )


def check_shape(name: str, value: Tensor, expected, meaning: str) -> None:
    """``value.shape == expected``, compared element by element (a fake tensor's sizes may be symbolic)."""
    shape = value.shape
    if len(shape) != len(expected) or any(a != b for a, b in zip(shape, expected)):
        raise ValueError(f"{name} must have shape {meaning} = {list(expected)}, got {list(shape)}")


def check_int(name: str, value) -> None:
    if type(value) is int:  # the common case, without the slower abstract-class check below
        return
    if isinstance(value, torch.SymInt):  # an int argument made symbolic by torch.compile (a custom op's fake)
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def check_needs_grad(needs_grad, count: int) -> None:
    """A backward op's ``needs_grad``: one flag per differentiable input."""
    if len(needs_grad) != count:
        raise ValueError(f"needs_grad must have {count} flags (one per differentiable input), got {list(needs_grad)}")


def check_op_backend(backend: str, state: Tensor) -> None:
    """Inside a custom op, before its host function reads any pointer: ``backend`` runs on ``state``'s device and
    dtype (the cpp kernels would read a CUDA pointer or reinterpret float16 bits; meta tensors go to the fake). The
    public functions resolved it already; a direct torch.ops call has not. The resolution is memoised: a dict lookup."""
    resolve_backend(backend, state.device, state.dtype)


def flat(x: Tensor) -> Tensor:
    """[B, d, *S] -> [B, d, N], N = prod(S), a view where the strides allow (N written out: -1 is ambiguous for a
    batch of 0)."""
    return x.reshape(x.shape[0], x.shape[1], spatial_numel(x.shape))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 and bfloat16 compute in float32, as the fused kernels do."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def unrequested(like: Tensor) -> Tensor:
    """The backward ops return tensors only (a custom op cannot return None): an empty one stands for a gradient
    autograd did not ask for, and the autograd function turns it back into None."""
    return like.new_empty(0)


def unaliased(x: Tensor, *inputs: Tensor | None) -> Tensor:
    """``x``, copied if it shares memory with one of ``inputs`` (a custom op's outputs may not alias its inputs)."""
    if x.numel() and any(t is not None and t.numel() and x.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                         for t in inputs):
        return x.clone()
    return x


def forward_ad_active() -> bool:
    """Whether forward-mode AD may ask an op call for tangents: inside ``torch.autograd.forward_ad.dual_level()``, which
    ``torch.func.jvp`` (and jacfwd, hessian) enter too. A custom op has no forward-mode formula, and PyTorch gives its
    outputs no tangent without an error (torch.func.jvp reads it as zeros)."""
    return forward_ad._current_level >= 0


def differentiating_transform_active() -> bool:
    """Whether a torch.func transform that differentiates (grad, vjp, jacrev: Grad; jvp, jacfwd: Jvp) is anywhere on
    the functorch interpreter stack, under any vmap: PyTorch cannot run a custom op's autograd there."""
    differentiating = (TransformType.Grad, TransformType.Jvp)
    return any(interpreter.key() in differentiating for interpreter in retrieve_all_functorch_interpreters())


def vmap_active() -> bool:
    """Whether a torch.func.vmap (also inside jacfwd, jacrev, hessian) is on the functorch interpreter stack."""
    return torch._C._are_functorch_transforms_active() and any(
        interpreter.key() == TransformType.Vmap for interpreter in retrieve_all_functorch_interpreters())


def runs_as_torch_ops(backend: str, *tensors: Tensor) -> bool:
    """Whether an op call on ``tensors`` runs its eager reference as plain torch ops (``run_as_torch_ops``) instead of
    its custom op: under forward-mode AD, where the custom op would give no tangent, and on backend "eager" under a
    functorch transform too (torch.func.grad and vjp cannot run a custom op's autograd; vmap then batches the torch ops
    themselves). A fused backend goes there, to get run_as_torch_ops' error, when a differentiating torch.func
    transform would need its autograd (an input requires grad); on inputs it does not differentiate, and under plain
    vmap, it keeps its custom op (PyTorch's batching fallback runs it per sample)."""
    if forward_ad_active():
        return True
    # is_compiling() first, as in fast_path: Dynamo reads it as the constant True and traces no torch._C query after it.
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return False
    if backend == "eager":
        return True
    # Only where the transform's autograd would record the op: not under torch.no_grad() inside the transform, nor
    # for a plain tensor (an outer nn.Parameter, say) that the transform does not track.
    return (torch.is_grad_enabled() and any(_tracked_by_a_transform(t) for t in tensors)
            and differentiating_transform_active())


def _tracked_by_a_transform(t: Tensor) -> bool:
    """Whether ``t`` is a functorch-wrapped tensor that requires grad at some level: under grad(vmap(...)) the op sees
    a BatchedTensor that does not, around a GradTrackingTensor that does (and the batching fallback hands that one to
    the op's autograd). A plain tensor, even one requiring grad, is not the transform's to differentiate."""
    while is_functorch_wrapped_tensor(t):
        if t.requires_grad:
            return True
        t = get_unwrapped(t)
    return False


def run_as_torch_ops(op: str, backend: str, device: torch.device, reference: Callable, *args):
    """``reference(*args)`` as plain torch ops, whose derivatives of every mode PyTorch knows, with autocast off (the
    reference casts to the state's dtype itself, as the op's autocast rule does); for a fused backend, whose kernels
    have no forward-mode derivative and whose autograd torch.func cannot run, an error naming backend='eager'."""
    if backend != "eager":
        if forward_ad_active():
            raise RuntimeError(
                f"fbkernels.{op}: backend {backend!r} has no forward-mode derivative (torch.func.jvp, jacfwd, hessian, "
                "torch.autograd.forward_ad); use backend='eager', whose reference is made of differentiable torch ops"
            )
        raise RuntimeError(
            f"fbkernels.{op}: backend {backend!r} cannot be differentiated by torch.func transforms (torch.func.grad, "
            "vjp, jacrev; its custom op's autograd does not run under them); use backend='eager', whose "
            "reference is made of differentiable torch ops (torch.autograd.grad and plain torch.func.vmap work on "
            f"backend {backend!r})"
        )
    if autocast_enabled(device):
        with torch.autocast(device.type, enabled=False):
            return reference(*args)
    return reference(*args)


# nn.Parameter is the one subclass that behaves as a plain tensor (its __torch_function__ is disabled).
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


# The backends whose plain eager calls skip their custom op. "eager" is the reference and keeps the one path; the
# GPU backends are not measured on this path yet.
FAST_PATH_BACKENDS = ("cpp",)


def fast_path(backend: str, *tensors: Tensor | None) -> bool:
    """Whether an op call on ``backend`` may run its host functions directly instead of through its custom op (the
    same functions, without torch.library's dispatcher layers): a backend of FAST_PATH_BACKENDS in plain eager
    PyTorch, with no torch.compile or torch.jit.trace tracing, forward-mode AD, TorchDispatchMode (FakeTensorMode,
    make_fx) or TorchFunctionMode, functorch transform (vmap, grad), autocast (its rule is registered on the custom op)
    or autograd profiler (whose traces name the custom op) active, on plain tensors (no subclasses such as FakeTensor,
    no legacy BatchedTensor, which has no storage: the gradients of ``torch.autograd.grad(is_grads_batched=True)``,
    ``jacobian(vectorize=True)`` and ``gradcheck(check_batched_grad=True)``, batched by the legacy vmap, which
    _are_functorch_transforms_active() does not report; None stands for an absent gradient)."""
    if backend not in FAST_PATH_BACKENDS:
        return False
    # is_compiling() first: Dynamo reads it as the constant True and traces none of the torch._C queries after it.
    if (
        torch.compiler.is_compiling()
        or forward_ad_active()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._len_torch_function_stack()
        or torch._C._are_functorch_transforms_active()
        or torch._C._is_any_autocast_enabled()
        or torch._C._autograd._profiler_enabled()
        or torch._C._is_tracing()
    ):
        return False
    for t in tensors:  # a loop rather than all(...): no generator to create on every call
        if t is not None and (type(t) not in _PLAIN_TENSOR_TYPES or is_legacy_batchedtensor(t)):
            return False
    return True


def register_autocast_to_state_dtype(qualname: str, cast_to_state: Callable[[tuple], tuple]) -> None:
    """Under torch.autocast, op ``qualname`` runs with ``cast_to_state(args)``: its other tensors cast to the dtype of
    its state (the first argument), not to autocast's dtype, so a float32 state stays float32 (torch.library's
    register_autocast casts every input to one given dtype instead)."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def run_without_autocast(*args, _key=key):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*cast_to_state(args))

        # The Python-dispatcher entry is what tracing (torch.compile, opcheck) uses; the library entry serves calls.
        op.py_impl(key)(run_without_autocast)
        _AUTOCAST_LIBRARY.impl(name, lambda _keyset, *args, _run=run_without_autocast: _run(*args), key_name,
                               with_keyset=True)


_AUTOCAST_LIBRARY = torch.library.Library("fbkernels", "FRAGMENT")
