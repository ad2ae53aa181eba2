"""The "eager" backend: each op's pure-PyTorch reference, under the host-function names every backend provides.

The functions live with their ops (fbkernels/ops/feedback_step.py, fbkernels/ops/context_gate.py); tests and
benchmarks compare the fused backends against them.
"""
from .ops.context_gate import context_gate_backward, context_gate_forward
from .ops.feedback_step import feedback_step_backward, feedback_step_forward

__all__ = ["context_gate_backward", "context_gate_forward", "feedback_step_backward", "feedback_step_forward"]
