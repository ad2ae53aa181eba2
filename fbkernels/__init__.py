"""fbkernels: fused kernels, custom autograd and models for feedback neural networks in PyTorch."""
from __future__ import annotations

import importlib

from .backends import available_backends
from .ops import context_gate, decay_matrix, feedback_step

__version__ = "0.1.0"
__all__ = ["__version__", "available_backends", "context_gate", "decay_matrix", "empty_cpu_cache", "feedback_step",
           "models", "data"]


def empty_cpu_cache() -> None:
    """Free the CPU blocks that the cpp backend keeps to reuse for its outputs (those of 32 MiB or more, and those
    its kernels write with streaming stores) once nothing references them (at most 4;
    ``FBKERNELS_CPU_OUTPUT_CACHE=0`` turns the cache off). Blocks still in use stay."""
    try:
        from ._cpp import output_cache
    except ImportError:  # a build without the CPU kernels has no cache
        return
    output_cache.clear()


_LAZY_SUBMODULES = ("models", "data", "train", "metrics", "triton")


def __getattr__(name):
    # Models and data pull in more code than the ops need: import them on first use.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
