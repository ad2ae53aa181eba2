"""The public ops, one module each: feedback_step.py and context_gate.py hold an op's whole contract (math,
validation, eager reference, custom ops ``fbkernels::feedback_step`` / ``fbkernels::context_gate`` with fake
implementations, autograd, autocast rule, eager fast path, public function); decay_matrix.py the decay M(t) of the
feedback step."""
from .context_gate import context_gate
from .decay_matrix import decay_matrix
from .feedback_step import feedback_step

__all__ = ["context_gate", "decay_matrix", "feedback_step"]
