"""Generic predictive-coding feedback loop (DESIGN.md section 1.1) around any user network.

``FeedbackLoop(network, head, num_classes=k, seg_channels=l)`` turns a network F mapping the
concatenation [x, v] ([B, C_in + k, *S]) to d = l + k channels, and a head G from the l segmentation
channels to the class logits, into a feedback model. With h(0) = 0 and v(0) = 0, for t = 1..T:

    f      = F([x, v(t-1)])
    h(t)   = h(t-1) + M(t-1) @ f              per position   } one fused fbkernels.feedback_step
    v(t)   = softmax(h(t)[:, d-k:])  (or h(t)[:, d-k:] without softmax)
    y(t)   = G(h(t)[:, :l])

M(t) = P diag(exp(-t r / tau)) P_inv from ``fbkernels.decay_matrix`` (P, P_inv learnable, initialised
orthogonal / transposed; rates r = 1 unless learned), or I without decay. The model returns every
step's logits so the loss can be summed over the steps and backpropagated once through the whole
trajectory. ``bptt="checkpoint"`` recomputes each step's network forward during backward
(torch.utils.checkpoint, non-reentrant): activation memory then no longer grows with the network's
depth times T, only with the few state-sized tensors each step keeps, and the gradients are the same.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import fbkernels

__all__ = ["DecayMatrix", "FeedbackLoop", "state_changes"]

BPTT_MODES = ("full", "checkpoint")


class DecayMatrix(nn.Module):
    """``M(t) = P diag(exp(-t r / tau)) P_inv``: [d, d], differentiable in P, P_inv and (if learned) r.

    P starts as a random orthogonal basis and P_inv as its transpose (so M(0) = I at initialisation);
    both are then learned independently. Rates are fixed at 1 (the paper's eigenvalues -1) unless
    ``learn_rates``, in which case r = softplus(rho) stays positive, starting at 1.
    """

    def __init__(self, channels: int, *, tau: float = 1.0, learn_rates: bool = False):
        super().__init__()
        if channels < 1 or not tau > 0:
            raise ValueError(f"need channels >= 1 and tau > 0, got {channels} and {tau}")
        self.tau = float(tau)
        basis = nn.init.orthogonal_(torch.empty(channels, channels))
        self.basis = nn.Parameter(basis)
        self.basis_inv = nn.Parameter(basis.t().clone())
        if learn_rates:
            # softplus(log(e - 1)) = 1: learned rates start at the paper's fixed value.
            self.rate_logits = nn.Parameter(torch.full((channels,), math.log(math.e - 1.0)))
        else:
            self.register_buffer("fixed_rates", torch.ones(channels))

    @property
    def rates(self) -> Tensor:
        """The decay rates r: [d], positive."""
        if hasattr(self, "rate_logits"):
            return F.softplus(self.rate_logits)
        return self.fixed_rates

    def forward(self, t) -> Tensor:
        return fbkernels.decay_matrix(self.basis, self.basis_inv, self.rates, t, self.tau)


class FeedbackLoop(nn.Module):
    """Feedback model around ``network`` ([B, C_in + k, *S] -> [B, l + k, *S]) and ``head`` ([B, l, *S] -> logits).

    ``model(x, steps=None, return_states=False)`` -> list of ``steps`` (default ``self.steps``) per-step
    logits; with ``return_states`` -> (logits list, states list h(1..T), each [B, l + k, *S]).

    Args:
        num_classes: k, the number of feedback channels (one per class).
        seg_channels: l, the number of segmentation channels the head reads.
        tau: time constant of the decay.
        decay: use M(t) (the paper's "error computation"); False uses M = I.
        softmax: feed back softmax(h[:, d-k:]); False feeds back h[:, d-k:] itself.
        learn_rates: learn positive decay rates instead of fixing them at 1.
        bptt: "full" keeps every step's network activations for backward; "checkpoint" recomputes them.
        backend: fbkernels backend of the state update (None: the fastest available); settable later.
        steps: default number of steps T.
    """

    def __init__(
        self,
        network: nn.Module,
        head: nn.Module,
        *,
        num_classes: int,
        seg_channels: int,
        tau: float = 1.0,
        decay: bool = True,
        softmax: bool = True,
        learn_rates: bool = False,
        bptt: str = "full",
        backend: str | None = None,
        steps: int = 5,
    ):
        super().__init__()
        if num_classes < 1 or seg_channels < 1:
            raise ValueError(f"need num_classes >= 1 and seg_channels >= 1, got {num_classes}, {seg_channels}")
        if bptt not in BPTT_MODES:
            raise ValueError(f"bptt must be one of {list(BPTT_MODES)}, got {bptt!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.network, self.head = network, head
        self.num_classes, self.seg_channels = num_classes, seg_channels
        self.state_channels = seg_channels + num_classes
        self.softmax, self.bptt, self.backend, self.steps = softmax, bptt, backend, steps
        self.decay = DecayMatrix(self.state_channels, tau=tau, learn_rates=learn_rates) if decay else None
        self.register_buffer("identity", torch.eye(self.state_channels), persistent=False)

    def _network(self, inputs: Tensor) -> Tensor:
        if self.bptt == "checkpoint" and torch.is_grad_enabled():
            return checkpoint(self.network, inputs, use_reentrant=False)
        return self.network(inputs)

    def forward(self, x: Tensor, steps: int | None = None, return_states: bool = False):
        steps = self.steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        k = self.num_classes
        v = x.new_zeros((x.shape[0], k, *x.shape[2:]))
        h = None
        logits, states = [], []
        for t in range(1, steps + 1):
            f = self._network(torch.cat([x, v], dim=1))
            if f.shape[1] != self.state_channels:
                raise ValueError(
                    f"network must output seg_channels + num_classes = {self.state_channels} channels, got {f.shape[1]}"
                )
            if h is None:
                h = torch.zeros_like(f)
            mix = self.decay(t - 1) if self.decay is not None else self.identity.to(f.dtype)
            h, v_softmax = fbkernels.feedback_step(h, f, mix, k, backend=self.backend)
            v = v_softmax if self.softmax else h[:, self.state_channels - k:]
            logits.append(self.head(h[:, : self.seg_channels]))
            states.append(h)
        return (logits, states) if return_states else logits


def state_changes(states: list[Tensor]) -> list[float]:
    """Root-mean-square step-to-step change ``sqrt(mean((h(t) - h(t-1))**2))`` for t = 2..T."""
    return [float((b - a).double().pow(2).mean().sqrt()) for a, b in zip(states[:-1], states[1:])]
