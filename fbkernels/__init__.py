"""fbkernels: fused kernels, custom autograd and models for feedback neural networks in PyTorch."""
from __future__ import annotations

import importlib

from .backends import available_backends
from .ops import context_gate, decay_matrix, feedback_step

__version__ = "0.1.0"
__all__ = ["__version__", "available_backends", "context_gate", "decay_matrix", "feedback_step", "models", "data"]

_LAZY_SUBMODULES = ("models", "data", "train", "metrics", "triton")


def __getattr__(name):
    # Models and data pull in more code than the ops need: import them on first use.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
