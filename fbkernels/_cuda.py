"""Host side of the "cuda" backend: allocates outputs and workspaces with torch and calls fbkernels._C_cuda.

All functions take contiguous [B, d, *S] tensors of one dtype on one CUDA device (float32, float64, float16 or
bfloat16) and return outputs of that shape; the kernels see B, d and N = prod(S). Kernels run on that device's
current stream, so they order correctly with surrounding PyTorch work and can be captured in CUDA graphs; nothing
here synchronises.
"""
from __future__ import annotations

import torch

from ._params import context_gate_params, feedback_step_params

_BUILD_HINT = (
    "fbkernels was built without CUDA; reinstall with a CUDA toolkit present: "
    "FBKERNELS_CUDA=ON pip install --no-build-isolation ."
)


def _ext():
    """The compiled module fbkernels._C_cuda, or a RuntimeError saying how to build it."""
    try:
        from . import _C_cuda
    except ImportError as err:
        raise RuntimeError(_BUILD_HINT) from err
    return _C_cuda


def runs_on(capability: tuple[int, int], architectures: list[str]) -> bool:
    """Whether a build for CMake CUDA architectures like ["75-real", "90-virtual"] has code for a device of
    compute ``capability`` (major, minor): a cubin for sm_XY runs on devices X.Z with Z >= Y (same major); PTX for
    compute_XY is compiled by the driver for any device >= X.Y. An entry without a suffix builds both."""
    for entry in architectures:
        arch, _, kind = entry.partition("-")
        if not arch.isdigit():  # "all", "native", "90a": not decidable from the name; the runtime probe decides
            return True
        built = (int(arch) // 10, int(arch) % 10)
        if kind in ("", "real") and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if kind in ("", "virtual") and built <= tuple(capability):
            return True
    return False


_IMAGE_REASONS: dict[int, str | None] = {}


def missing_image_reason(device_index: int | None = None) -> str | None:
    """None when fbkernels._C_cuda has kernels for CUDA device ``device_index`` (default: the current one), else
    why not. Probed once per device: the compiled architecture list against the device's capability, then the
    kernels' attributes as the driver reports them (this also catches PTX newer than the driver)."""
    index = torch.cuda.current_device() if device_index is None else device_index
    if index not in _IMAGE_REASONS:
        ext = _ext()
        capability = torch.cuda.get_device_capability(index)
        architectures = ext.architectures().replace(";", ",").split(",")
        runtime_error = None
        if runs_on(capability, architectures):
            with torch.cuda.device(index):
                runtime_error = ext.kernel_image_error() or None
        _IMAGE_REASONS[index] = image_reason(torch.cuda.get_device_name(index), capability, architectures,
                                             runtime_error)
    return _IMAGE_REASONS[index]


def image_reason(device_name: str, capability: tuple[int, int], architectures: list[str],
                 runtime_error: str | None) -> str | None:
    """The unavailable reason for a device, from what missing_image_reason probed (None: the kernels run)."""
    major, minor = capability
    if runs_on(capability, architectures) and runtime_error is None:
        return None
    detail = f": {runtime_error}" if runtime_error else ""
    return (
        f"fbkernels._C_cuda has no kernel image for {device_name} (compute capability {major}.{minor}); it was "
        f"built for CUDA architectures {','.join(architectures)}{detail}. Rebuild for this GPU: "
        f'CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES={major}{minor}" FBKERNELS_CUDA=ON pip install --no-build-isolation .'
    )


def _check(*tensors: torch.Tensor | None) -> torch.Tensor:
    """The first tensor, after checking that all given tensors are contiguous CUDA tensors of one dtype/device."""
    first = next(t for t in tensors if t is not None)
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(f"the cuda backend needs CUDA tensors, got a tensor on {t.device}")
        if t.device != first.device or t.dtype != first.dtype:
            raise ValueError(
                f"all tensors must share one device and dtype, got {first.device}/{first.dtype} and {t.device}/{t.dtype}"
            )
        if not t.is_contiguous():
            raise ValueError("the cuda backend takes contiguous tensors (fbkernels.ops makes them so)")
    return first


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def feedback_step_forward(h, f, decay, num_feedback):
    """h, f: [B, d, *S]; decay: [d, d]. Returns (h_next [B, d, *S], v [B, k, *S])."""
    _check(h, f, decay)
    with torch.cuda.device(h.device):
        return launch_feedback_step_forward(_ext(), _stream(h.device), h, f, decay, num_feedback)


def feedback_step_backward(grad_h, grad_v, f, v, decay, num_feedback, needs_grad=(True, True, True)):
    """grad_h: [B, d, *S] or None; grad_v: [B, k, *S] or None. Returns (grad_h_in [B, d, *S], grad_f [B, d, *S],
    grad_decay [d, d]), each None where needs_grad says it is not needed (its work is skipped)."""
    _check(f, v, decay, grad_h, grad_v)
    with torch.cuda.device(f.device):
        # The workspace size depends on the current device (its SM count): it is asked under this device guard.
        return launch_feedback_step_backward(_ext(), _stream(f.device), grad_h, grad_v, f, v, decay, num_feedback,
                                             needs_grad)


def context_gate_forward(h, gate_logits, alpha):
    """h: [B, C, *S]; gate_logits: [B, C]. Returns out [B, C, *S]."""
    _check(h, gate_logits)
    with torch.cuda.device(h.device):
        return launch_context_gate_forward(_ext(), _stream(h.device), h, gate_logits, alpha)


def context_gate_backward(grad_out, h, gate_logits, alpha, needs_grad=(True, True)):
    """grad_out, h: [B, C, *S]; gate_logits: [B, C]. Returns (grad_h [B, C, *S], grad_gate_logits [B, C]), each None
    where needs_grad says it is not needed."""
    _check(grad_out, h, gate_logits)
    with torch.cuda.device(h.device):
        return launch_context_gate_backward(_ext(), _stream(h.device), grad_out, h, gate_logits, alpha, needs_grad)


# The launchers below allocate the outputs and workspace and call the kernel module `ext` on `stream`, with no
# device checks: the functions above make those. They are separate so that tests/test_cuda_emulation.py can run
# this same host code against the CPU emulation of the CUDA kernels.

def launch_feedback_step_forward(ext, stream, h, f, decay, num_feedback):
    h_next = torch.empty_like(h)
    v = torch.empty((h.shape[0], int(num_feedback), *h.shape[2:]), dtype=h.dtype, device=h.device)
    ext.feedback_step_forward(feedback_step_params(
        ext, h, num_feedback, stream=stream, h=h, f=f, decay=decay, h_next=h_next, v=v))
    return h_next, v


def launch_feedback_step_backward(ext, stream, grad_h, grad_v, f, v, decay, num_feedback,
                                  needs_grad=(True, True, True)):
    d = f.shape[1]
    need_h, need_f, need_decay = (bool(flag) for flag in needs_grad)
    grad_h_in = torch.empty_like(f) if need_h else None
    grad_f = torch.empty_like(f) if need_f else None
    grad_decay = torch.empty((d, d), dtype=f.dtype, device=f.device) if need_decay else None
    params = feedback_step_params(
        ext, f, num_feedback, stream=stream, f=f, v=v, decay=decay, grad_h_next=grad_h, grad_v=grad_v,
        grad_h=grad_h_in, grad_f=grad_f, grad_decay=grad_decay, need_grad_h=need_h, need_grad_f=need_f,
        need_grad_decay=need_decay)
    if need_decay:
        # Sized by the kernel module (its count is cached per device there), which checks it again at launch.
        partial_dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
        partials = torch.empty(ext.feedback_step_num_partials(params) * d * d, dtype=partial_dtype, device=f.device)
        params.partials, params.partials_elements = partials.data_ptr(), partials.numel()
    if need_h or need_f or need_decay:
        ext.feedback_step_backward(params)
    return grad_h_in, grad_f, grad_decay


def launch_context_gate_forward(ext, stream, h, gate_logits, alpha):
    out = torch.empty_like(h)
    ext.context_gate_forward(context_gate_params(ext, h, alpha, stream=stream, h=h, gate_logits=gate_logits, out=out))
    return out


def launch_context_gate_backward(ext, stream, grad_out, h, gate_logits, alpha, needs_grad=(True, True)):
    need_h, need_gate = (bool(flag) for flag in needs_grad)
    grad_h = torch.empty_like(h) if need_h else None
    grad_gate_logits = torch.empty_like(gate_logits) if need_gate else None
    if need_h or need_gate:
        ext.context_gate_backward(context_gate_params(
            ext, h, alpha, stream=stream, grad_out=grad_out, h=h, gate_logits=gate_logits, grad_h=grad_h,
            grad_gate_logits=grad_gate_logits, need_grad_h=need_h, need_grad_gate_logits=need_gate))
    return grad_h, grad_gate_logits
