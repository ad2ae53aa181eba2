"""Input checks run once at the public API, before any kernel: errors name the argument, the expected and the given."""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(name: str, value, *, min_dim: int = 0) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float32, float64, float16 or bfloat16), got {value.dtype}"
        )
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(value.shape)}")


def check_same(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Same dtype and device as the reference tensor."""
    if value.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {value.device}")
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {value.dtype}")


def check_feedback_step(h, f, decay, num_feedback) -> None:
    check_tensor("h", h, min_dim=2)
    check_tensor("f", f)
    check_tensor("decay", decay)
    check_same("f", f, "h", h)
    check_same("decay", decay, "h", h)
    if f.shape != h.shape:
        raise ValueError(f"f must have the shape of h {tuple(h.shape)}, got {tuple(f.shape)}")
    d = h.shape[1]
    if decay.shape != (d, d):
        raise ValueError(f"decay must be a [d, d] = [{d}, {d}] matrix for h with d={d} channels, got {tuple(decay.shape)}")
    if isinstance(num_feedback, bool) or not isinstance(num_feedback, numbers.Integral):
        raise TypeError(f"num_feedback must be an int, got {type(num_feedback).__name__}")
    if not 1 <= num_feedback <= d:
        raise ValueError(f"num_feedback must be in 1..d = 1..{d}, got {num_feedback}")


def check_context_gate(h, gate_logits, alpha) -> None:
    check_tensor("h", h, min_dim=2)
    check_tensor("gate_logits", gate_logits)
    check_same("gate_logits", gate_logits, "h", h)
    expected = (h.shape[0], h.shape[1])
    if tuple(gate_logits.shape) != expected:
        raise ValueError(f"gate_logits must have shape [B, C] = {list(expected)}, got {list(gate_logits.shape)}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a float in [0, 1], got {type(alpha).__name__}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def check_decay_matrix(basis, basis_inv, rates, t, tau) -> None:
    check_tensor("basis", basis)
    if basis.dim() != 2 or basis.shape[0] != basis.shape[1]:
        raise ValueError(f"basis must be a square [d, d] matrix, got shape {tuple(basis.shape)}")
    d = basis.shape[0]
    for name, value in (("basis_inv", basis_inv), ("rates", rates)):
        check_tensor(name, value)
        check_same(name, value, "basis", basis)
    if basis_inv.shape != basis.shape:
        raise ValueError(f"basis_inv must have shape [{d}, {d}], got {tuple(basis_inv.shape)}")
    if rates.shape not in ((), (d,)):
        raise ValueError(f"rates must have shape [{d}] (or be a scalar), got {tuple(rates.shape)}")
    for name, value in (("t", t), ("tau", tau)):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not isinstance(tau, torch.Tensor) and tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
