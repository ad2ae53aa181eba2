"""Which backends can run where, and which one an op call uses.

``backend=None`` picks the preferred available backend for the tensors' device (``FBKERNELS_BACKEND``
overrides that choice); an explicit backend that cannot run gets an error naming what is missing.
Availability is probed on first use, once per (backend, device, interpreter mode), never at import: importing
fbkernels must not initialise CUDA (a process that forks after importing would break its children). Every op call
resolves its backend, so the result is memoised per (requested name, device, dtype) next to the probe results;
the environment variable is still read on each eager call. torch.compile traces the resolution once and keeps its
result in the graph (the variable is not guarded): a compiled function sees a changed FBKERNELS_BACKEND only after
``torch._dynamo.reset()`` or in a new ``torch.compile``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

BACKENDS = ("eager", "cpp", "cuda", "triton")
ENVIRONMENT_VARIABLE = "FBKERNELS_BACKEND"
# Auto choice, most preferred first. On CUDA tensors "cuda" comes first: see README "Backends" for why.
_PREFERENCE = {"cpu": ("cpp", "eager"), "cuda": ("cuda", "triton", "eager")}
_NATIVE_DTYPES = {"cpp": (torch.float32, torch.float64)}
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def source_tree_without_modules() -> str | None:
    """The checkout fbkernels was imported from when it lacks the compiled modules (Python started in a clone,
    so the clone shadows any installed copy), else None."""
    package = Path(__file__).resolve().parent
    root = package.parent
    if not ((root / "CMakeLists.txt").is_file() and (root / "csrc").is_dir()):
        return None
    if _module_found("fbkernels._C"):  # an editable install finds its build through its import hook
        return None
    return str(root)


def _source_tree_message(root: str) -> str:
    return (
        f"fbkernels is imported from its source tree {root}, which has no compiled modules (the current directory "
        "comes first on sys.path and shadows an installed fbkernels). Run Python from another directory, or with "
        "`python -P` (Python 3.11+ leaves the current directory off sys.path), or install this tree editable: "
        "`pip install scikit-build-core pybind11`, then `pip install --no-build-isolation -e .`"
    )


def _module_found(module: str) -> bool:
    # find_spec locates the compiled module without loading it.
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _module_status(module: str, hint: str) -> str | None:
    if _module_found(module):
        return None
    root = source_tree_without_modules()
    if root is not None:
        message = _source_tree_message(root)
        _warn_once(message)
        return f"{module} is missing: {message}"
    return f"{module} is missing; {hint}"


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        # Attributed to the first caller outside this package (the paths into it differ in depth).
        frame, stacklevel = sys._getframe(), 1
        while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            frame, stacklevel = frame.f_back, stacklevel + 1
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def _probe(name: str, device_type: str, device_index: int | None, interpreting: bool) -> str | None:
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
        missing = _module_status(
            "fbkernels._C_cuda",
            "fbkernels was built without its CUDA kernels; rebuild with a CUDA toolkit present: "
            "FBKERNELS_CUDA=ON pip install --no-build-isolation .",
        )
        if missing is not None:
            return missing
        from . import _cuda

        no_image = _cuda.missing_image_reason(device_index)
        if no_image is not None:
            _warn_once(f"fbkernels: the cuda backend cannot run here ({no_image}); backend=None uses triton "
                       "(or eager without triton) on this device")
        return no_image
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


_REASONS: dict[tuple, str | None] = {}


# torch.compile runs this once while tracing and keeps the result as a constant: probing imports modules and asks
# the CUDA driver, which Dynamo cannot trace. Its guards on the arguments re-trace for another device.
@torch.compiler.assume_constant_result
def _cached_reason(name: str, device_type: str, device_index: int, interpreting: bool) -> str:
    key = (name, device_type, device_index, interpreting)
    if key not in _REASONS:
        _REASONS[key] = _probe(name, device_type, None if device_index < 0 else device_index, interpreting)
    reason = _REASONS[key]
    return "" if reason is None else reason


def _check_name(name, source: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {list(BACKENDS)}, got {name!r}")


def unavailable_reason(name: str, device="cpu") -> str | None:
    """None when backend ``name`` can run on tensors on ``device``, else why not."""
    _check_name(name, "backend")
    device = torch.device(device)
    index = -1 if device.index is None else device.index
    # Only triton's availability depends on the interpreter mode; not reading the variable for the others saves an
    # environment lookup per op call.
    interpreting = triton_interpreting() if name == "triton" else False
    return _cached_reason(name, device.type, index, interpreting) or None


def available_backends(device="cpu") -> list[str]:
    """Backends usable now for tensors on ``device``, e.g. ["eager", "cpp"] on a CPU machine."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


# Successful resolutions by (requested name or None, device, dtype, triton interpreter mode), valid for the probe
# results in _RESOLVED_FROM: replacing _REASONS (as tests do to probe again) starts a new memo. Errors are not kept.
_RESOLVED: dict[tuple, str] = {}
_RESOLVED_FROM: dict | None = None


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend an op call on (device, dtype) runs: the given one, else FBKERNELS_BACKEND, else the preferred."""
    global _RESOLVED, _RESOLVED_FROM
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    explicit = (os.environ.get(ENVIRONMENT_VARIABLE) or None) if backend is None else backend
    if torch.compiler.is_compiling():  # Dynamo traces the resolution itself and keeps its result as a constant
        return _resolve(explicit, backend is None, device, dtype)
    if _RESOLVED_FROM is not _REASONS:
        _RESOLVED, _RESOLVED_FROM = {}, _REASONS
    key = (explicit, device, dtype, triton_interpreting() if explicit == "triton" else False)
    name = _RESOLVED.get(key)
    if name is None:
        name = _RESOLVED[key] = _resolve(explicit, backend is None, device, dtype)
    return name


def _resolve(explicit: str | None, from_environment: bool, device: torch.device, dtype: torch.dtype) -> str:
    """resolve_backend's work: check the name ``explicit`` (None: choose the preferred one), given by the argument or
    (``from_environment``) by FBKERNELS_BACKEND, against (device, dtype)."""
    device_type = device.type
    if explicit is not None:
        named_by = f"the backend named by the environment variable {ENVIRONMENT_VARIABLE}"
        _check_name(explicit, named_by if from_environment else "backend")
        reason = unavailable_reason(explicit, device)
        given = f"{ENVIRONMENT_VARIABLE}={explicit!r}" if from_environment else f"backend {explicit!r}"
        if reason is not None:
            raise ValueError(
                f"{given} is not available for {device_type} tensors: {reason}; "
                f"available: {available_backends(device)}"
            )
        supported = _NATIVE_DTYPES.get(explicit)
        if supported is not None and dtype not in supported:
            raise TypeError(
                f"{given} supports dtypes {[str(t) for t in supported]}, got {dtype}; "
                "use backend='eager' or a GPU backend for half precision"
            )
        return explicit
    for name in _PREFERENCE.get(device_type, ("eager",)):
        supported = _NATIVE_DTYPES.get(name)
        if (supported is None or dtype in supported) and unavailable_reason(name, device) is None:
            return name
    return "eager"


_HOST_MODULES = {"eager": "fbkernels._reference", "cpp": "fbkernels._cpp", "cuda": "fbkernels._cuda",
                 "triton": "fbkernels.triton"}


def host_module(name: str) -> ModuleType:
    """The module holding backend ``name``'s host functions: feedback_step_forward/_backward and
    context_gate_forward/_backward with the signatures of the eager reference in fbkernels/ops/feedback_step.py and
    fbkernels/ops/context_gate.py, on contiguous [B, d, *S] tensors."""
    module_name = _HOST_MODULES.get(name)
    if module_name is None:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
    # sys.modules first: every op call asks, and import_module costs more than the lookup once it is loaded.
    return sys.modules.get(module_name) or importlib.import_module(module_name)
