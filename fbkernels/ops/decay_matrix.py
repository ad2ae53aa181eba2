"""decay_matrix: the matrix-exponential decay M(t) that feedback_step mixes the network output with.

    M(t) = basis @ diag(exp(-t * rates / tau)) @ basis_inv        (basis, basis_inv: [d, d]; rates: [d])

A plain composition of torch ops (the matrix is tiny), differentiable in every tensor argument, so it needs no
custom op. Step t = 1..T of a feedback loop uses M(t - 1): the first update is undecayed when basis_inv inverts basis.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ._checks import autocast_enabled, check_tensor, vmap_active


def _check_time(name: str, value, *, positive: bool) -> None:
    """t >= 0 and tau > 0, both finite, as Python numbers or one-element tensors."""
    expected = "positive and finite" if positive else "finite and >= 0"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number, got a tensor of dtype {value.dtype}")
        if torch.compiler.is_compiling():
            # Reading the value would break the graph. On CPU an asynchronous assert checks it when the graph runs
            # (a RuntimeError); on a GPU the same assert is a device-side abort that ruins the CUDA context, so the
            # value is left unchecked there.
            if value.device.type == "cpu":
                ok = torch.isfinite(value) & ((value > 0) if positive else (value >= 0))
                torch._assert_async(ok.reshape(()), f"{name} must be {expected}")
            return
        if value.is_meta or vmap_active():
            # A meta tensor has no value; under torch.func.vmap (over t or tau) .item() cannot run and asynchronous
            # asserts have no batching rule: the value is left unchecked.
            return
        number = value.item()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    else:
        number = float(value)
    # Comparisons rather than math.isfinite: under torch.compile an int or float argument that changes between calls
    # becomes symbolic (automatic dynamic), and Dynamo traces a comparison (as a guard) but not math.isfinite. NaN
    # fails the first comparison, infinity the second.
    if not ((number > 0) if positive else (number >= 0)) or not number < math.inf:
        raise ValueError(f"{name} must be {expected}, got {number}")


def _check_inputs(basis, basis_inv, rates, t, tau) -> None:
    check_tensor("basis", basis)
    if basis.dim() != 2 or basis.shape[0] != basis.shape[1]:
        raise ValueError(f"basis must be a square [d, d] matrix, got shape {tuple(basis.shape)}")
    d = basis.shape[0]
    for name, value in (("basis_inv", basis_inv), ("rates", rates)):
        check_tensor(name, value)
        if value.device != basis.device:
            raise ValueError(f"{name} must be on the device of basis ({basis.device}), got {value.device}")
        if value.dtype != basis.dtype:
            raise TypeError(f"{name} must have the dtype of basis ({basis.dtype}), got {value.dtype}")
    if basis_inv.shape != basis.shape:
        raise ValueError(f"basis_inv must have shape [{d}, {d}], got {tuple(basis_inv.shape)}")
    # dim() and the size rather than rates.shape in ((), (d,)): under torch.compile(dynamic=True) d is symbolic, and
    # Dynamo does not compare a tuple holding it with a torch.Size.
    if not (rates.dim() == 0 or (rates.dim() == 1 and rates.shape[0] == d)):
        raise ValueError(f"rates must have shape [{d}] (or be a scalar), got {tuple(rates.shape)}")
    _check_time("t", t, positive=False)
    _check_time("tau", tau, positive=True)


def decay_matrix(basis: Tensor, basis_inv: Tensor, rates: Tensor, t, tau) -> Tensor:
    """Matrix-exponential decay ``M(t) = basis @ diag(exp(-t * rates / tau)) @ basis_inv``: a [d, d] tensor.

    basis, basis_inv: [d, d]; rates: [d] (or a scalar shared by every eigenvalue); t >= 0 and tau > 0: finite
    numbers or one-element tensors (a tensor's value is read to check it, a device sync on a GPU; under
    torch.func.vmap and on the meta device it is not checked). Differentiable in basis, basis_inv, rates, and in t
    and tau when they are tensors. Computed in basis's dtype, also under torch.autocast (a bfloat16 decay would round
    M(0) = basis @ basis_inv away from the identity).
    """
    _check_inputs(basis, basis_inv, rates, t, tau)
    if isinstance(t, torch.Tensor):
        t = t.reshape(())
    if isinstance(tau, torch.Tensor):
        tau = tau.reshape(())
    # The cheap global query first (autocast_enabled costs a microsecond or two); Dynamo reads is_compiling() as the
    # constant True and traces no torch._C query after it.
    if (torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled()) and autocast_enabled(basis.device):
        with torch.autocast(basis.device.type, enabled=False):
            return _decay(basis, basis_inv, rates, t, tau)
    return _decay(basis, basis_inv, rates, t, tau)


def _decay(basis: Tensor, basis_inv: Tensor, rates: Tensor, t, tau) -> Tensor:
    scale = torch.exp(-t * rates.expand(basis.shape[0]) / tau)
    return (basis * scale.unsqueeze(0)) @ basis_inv
