"""The "triton" backend: fused Triton kernels registered with ``torch.library.triton_op``.

Host functions share the signatures of fbkernels._reference (contiguous [B, d, *S] / [B, C, *S] tensors);
fbkernels.ops dispatches to them. Importing this package imports Triton: on CPU tensors the kernels run only
when TRITON_INTERPRET=1 was set before Triton was first imported.
"""
from __future__ import annotations

from .context_gate import context_gate_backward, context_gate_forward
from .feedback_step import feedback_step_backward, feedback_step_forward

__all__ = ["context_gate_backward", "context_gate_forward", "feedback_step_backward", "feedback_step_forward"]
