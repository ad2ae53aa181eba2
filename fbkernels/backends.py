"""Which backends can run where, and which one an op call uses.

``backend=None`` picks the preferred available backend for the tensors' device (``FBKERNELS_BACKEND``
overrides that choice); an explicit backend that cannot run gets an error naming what is missing.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

BACKENDS = ("eager", "cpp", "cuda", "triton")
# Auto choice, most preferred first. On CUDA tensors "cuda" comes first: see README "Backends" for why.
_PREFERENCE = {"cpu": ("cpp", "eager"), "cuda": ("cuda", "triton", "eager")}
_NATIVE_DTYPES = {"cpp": (torch.float32, torch.float64)}


def _device_type(device) -> str:
    return torch.device(device).type


def _module_status(module: str, hint: str) -> str | None:
    # find_spec locates the compiled module without initialising anything (no CUDA context before a fork).
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:
        found = False
    return None if found else f"{module} is missing; {hint}"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe(name: str, device_type: str, interpreting: bool) -> str | None:
    if name == "eager":
        return None
    if name == "cpp":
        if device_type != "cpu":
            return f"cpp runs on CPU tensors only, not {device_type}"
        return _module_status("fbkernels._C", "reinstall fbkernels with `pip install .`")
    if name == "cuda":
        if device_type != "cuda":
            return f"cuda runs on CUDA tensors only, not {device_type}"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to PyTorch"
        return _module_status(
            "fbkernels._C_cuda",
            "fbkernels was built without its CUDA kernels; rebuild with a CUDA toolkit present: "
            "FBKERNELS_CUDA=ON pip install --no-build-isolation .",
        )
    missing = _module_status("triton", "install it with `pip install triton`")
    if missing is not None:
        return missing
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is visible to PyTorch"
    if device_type == "cpu":
        if interpreting:
            return None
        return "triton runs on CPU tensors only under its interpreter (set TRITON_INTERPRET=1 before importing triton)"
    return f"triton does not run on {device_type} tensors"


# Probed once at import: torch.compile then reads plain dict entries instead of tracing imports.
_STATUS = {
    (name, device_type, interpreting): _probe(name, device_type, interpreting)
    for name in BACKENDS
    for device_type in ("cpu", "cuda")
    for interpreting in (False, True)
}


def unavailable_reason(name: str, device="cpu") -> str | None:
    """None when backend ``name`` can run on tensors on ``device``, else why not."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)} or None, got {name!r}")
    key = (name, _device_type(device), triton_interpreting())
    if key not in _STATUS:
        _STATUS[key] = _probe(*key)
    return _STATUS[key]


def available_backends(device="cpu") -> list[str]:
    """Backends usable now for tensors on ``device``, e.g. ["eager", "cpp"] on a CPU machine."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend an op call on (device, dtype) runs: the given one, else FBKERNELS_BACKEND, else the preferred."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    explicit = backend if backend is not None else os.environ.get("FBKERNELS_BACKEND") or None
    device_type = device.type
    if explicit is not None:
        reason = unavailable_reason(explicit, device)
        if reason is not None:
            raise ValueError(
                f"backend {explicit!r} is not available for {device_type} tensors: {reason}; "
                f"available: {available_backends(device)}"
            )
        supported = _NATIVE_DTYPES.get(explicit)
        if supported is not None and dtype not in supported:
            raise TypeError(
                f"backend {explicit!r} supports dtypes {[str(t) for t in supported]}, got {dtype}; "
                "use backend='eager' or a GPU backend for half precision"
            )
        return explicit
    for name in _PREFERENCE.get(device_type, ("eager",)):
        supported = _NATIVE_DTYPES.get(name)
        if (supported is None or dtype in supported) and unavailable_reason(name, device) is None:
            return name
    return "eager"


def host_module(name: str) -> ModuleType:
    """The module holding backend ``name``'s host functions: feedback_step_forward/_backward and
    context_gate_forward/_backward with the signatures of the eager reference in fbkernels/ops/feedback_step.py and
    fbkernels/ops/context_gate.py, on contiguous [B, d, N] tensors."""
    if name == "eager":
        return importlib.import_module("fbkernels._reference")
    if name == "cpp":
        return importlib.import_module("fbkernels._cpp")
    if name == "cuda":
        return importlib.import_module("fbkernels._cuda")
    if name == "triton":
        return importlib.import_module("fbkernels.triton")
    raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
