"""Generic predictive-coding feedback loop (docs/design.md section 1.1) around any user network.

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
trajectory; with ``tol`` it stops once the state has settled (inference).

Two options reproduce the authors' code (docs/experiments.md section A) instead of the paper's text:

- ``update_factor="fractional"``: h(t) = h(t-1) + c(t) M(t-1) @ f with
  c(t) = (1 - (t-1)/T)**(alpha-1) / Gamma(alpha), alpha = 1.5, T the number of steps of the call (its
  maximum under ``tol``): the schedule is stretched to every call's T, so t never reaches T (at t - 1 = T
  the factor would be 0, beyond it undefined). c is folded into the decay matrix given to the fused op.
- ``feedback_layernorm=True``: v(t) = softmax(LN(h(t)[:, d-k:])) (or LN(...) without softmax), LN a
  layer norm over the spatial positions of each channel without affine parameters; v(0) is the same
  function of h(0) = 0 (1/k everywhere with softmax) instead of 0.

``decay_init="independent"`` (DecayMatrix) initialises P and P_inv independently (Xavier uniform), as
the authors' code does, instead of P orthogonal and P_inv = P^T (M(0) = I).

The state h is kept in the loop's parameter dtype (float32 for a float32 model) also under
``torch.autocast``: the network and the head may run in bfloat16/float16, but f is cast up before the
update and M is computed with autocast off, so the accumulation over T steps does not lose precision.

``bptt="checkpoint"`` recomputes each whole step (concatenation, network, state update, head) during
backward (torch.utils.checkpoint, non-reentrant): per step only the state h(t), the feedback v(t) and
the logits stay alive, so memory no longer grows with the network's depth times T, and the gradients
are the same. Normalisation layers with running statistics (BatchNorm) in the network or head update
them once per real forward: the recomputation restores them (see ``_RunningStatisticsKept``).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint

import fbkernels
from fbkernels._settings import (check_bool_setting, check_choice, check_int_setting, check_positive_setting,
                                 check_real_setting)
from fbkernels.backends import BACKENDS

__all__ = ["DecayMatrix", "FeedbackLoop", "SpatialLayerNorm", "fractional_update_factors", "state_changes"]

BPTT_MODES = ("full", "checkpoint")
UPDATE_FACTORS = ("none", "fractional")
DECAY_INITS = ("orthogonal", "independent")
FRACTIONAL_ALPHA = 1.5  # the order alpha of the authors' update factor


# ---------------------------------------------------------------- setting checks shared by the models

def check_decay_settings(decay, learn_rates) -> None:
    """decay and learn_rates are bools, and learned rates need the decay matrix they are the rates of
    (without it they were silently dropped)."""
    decay = check_bool_setting("decay", decay)
    if check_bool_setting("learn_rates", learn_rates) and not decay:
        raise ValueError("learn_rates=True needs decay=True: without the decay matrix there are no rates to learn")


def check_backend_setting(value) -> str | None:
    """A backend name from fbkernels.backends.BACKENDS or None. Whether it can run is checked per call:
    a model built on a CPU machine with backend="cuda" is valid, it runs once moved to a GPU."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"backend must be a str or None, got {type(value).__name__}")
    if value not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)} or None, got {value!r}")
    return value


def backend_setting() -> property:
    """The ``backend`` attribute of the models: checked by ``check_backend_setting`` whenever it is assigned."""

    def get(self) -> str | None:
        return self._backend

    def set(self, value: str | None) -> None:
        self._backend = check_backend_setting(value)

    return property(get, set, doc="fbkernels backend of the model's ops (None: the fastest available per call)")


def check_softmax_setting(softmax, num_classes: int) -> bool:
    """softmax must be a bool, and False when there is a single feedback channel."""
    if not isinstance(softmax, bool):
        raise TypeError(f"softmax must be a bool, got {type(softmax).__name__}")
    if softmax and num_classes == 1:
        raise ValueError(
            "num_classes=1 with softmax=True feeds back a softmax over a single channel, which is constantly 1: "
            "the model would silently be feedforward. For binary segmentation use num_classes=2 (background and "
            "foreground, trained with cross-entropy), or softmax=False to feed back the state channel itself"
        )
    return softmax


def check_input(x, *, in_channels: int | None, spatial_dims: int | None) -> None:
    """x must be a floating batch [B, in_channels, *S] (len(S) = spatial_dims where given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if spatial_dims is not None and x.dim() != 2 + spatial_dims:
        layout = {1: "[B, C, L]", 2: "[B, C, H, W]", 3: "[B, C, D, H, W]"}.get(spatial_dims, f"[B, C, *S] ({spatial_dims} spatial dims)")
        hint = " (for one unbatched sample use x[None])" if x.dim() == 1 + spatial_dims else ""
        raise ValueError(f"x must be a batch {layout}, got shape {list(x.shape)}{hint}")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch [B, C, *S], got shape {list(x.shape)}")
    if in_channels is not None and x.shape[1] != in_channels:
        raise ValueError(f"x must have in_channels={in_channels} channels, got {x.shape[1]} (shape {list(x.shape)})")


def fractional_update_factors(steps: int, alpha: float = FRACTIONAL_ALPHA) -> list[float]:
    """The authors' per-step update factors c(t) = (1 - (t-1)/T)**(alpha-1) / Gamma(alpha), t = 1..T (T = steps)."""
    steps = check_int_setting("steps", steps, 1)
    return [(1.0 - (t - 1) / steps) ** (alpha - 1.0) / math.gamma(alpha) for t in range(1, steps + 1)]


class SpatialLayerNorm(nn.Module):
    """Layer norm of each (sample, channel) over its spatial positions, no affine: [B, C, *S] -> [B, C, *S].

    y = (x - mean_S(x)) / sqrt(var_S(x) + eps), the biased variance over S, as ``nn.LayerNorm(S)`` at its
    initialisation (the authors' LayerNorm((H, W)) also learns a per-position scale and shift, which ties the
    model to one image size; this one works at any size).
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = check_positive_setting("eps", eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[2:], eps=self.eps)


def has_running_statistics(module: nn.Module) -> bool:
    """A normalisation layer (BatchNorm, SyncBatchNorm, InstanceNorm with tracking) whose forward updates running stats."""
    return isinstance(module, _NormBase) and module.track_running_stats and module.running_mean is not None


def running_statistics_modules(*modules: nn.Module) -> list[_NormBase]:
    """Every layer inside ``modules`` that has running statistics (see ``has_running_statistics``)."""
    return [m for module in modules for m in module.modules() if has_running_statistics(m)]


class _RunningStatisticsKept:
    """Context manager: run a block of code, then put the norms' running statistics back as they were before it.

    A checkpointed forward is rerun during backward with the modules in the same (training) mode, so
    each BatchNorm would fold the same batch into its running statistics a second time. In training
    mode the recomputed output does not depend on the running statistics (it uses the batch's), so
    restoring them afterwards changes nothing but the double update.

    Reusable: checkpoint's context_fn runs once per forward, and the one recomputation context it returns is
    entered at every backward through that forward (a graph kept with retain_graph=True is recomputed each time),
    which a generator-based context manager refuses the second time.
    """

    def __init__(self, norms: list[_NormBase]):
        self.norms = norms
        self._saved = []  # a stack: one snapshot per entry not yet exited

    def __enter__(self):
        self._saved.append([(m, m.running_mean.clone(), m.running_var.clone(),
                             None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
                            for m in self.norms])
        return self

    def __exit__(self, *exc_info) -> None:
        with torch.no_grad():
            for m, mean, var, count in self._saved.pop():
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if count is not None:
                    m.num_batches_tracked.copy_(count)


class DecayMatrix(nn.Module):
    """``M(t) = P diag(exp(-t r / tau)) P_inv``: [d, d], differentiable in P, P_inv and (if learned) r.

    With ``init="orthogonal"`` P starts as a random orthogonal basis and P_inv as its transpose (so
    M(0) = I at initialisation); with ``init="independent"`` (the authors' code) both start as independent
    Xavier-uniform matrices, so M(0) = P P_inv is not I. Both are then learned independently. Rates are
    fixed at 1 (the paper's eigenvalues -1) unless ``learn_rates``, in which case r = softplus(rho) stays
    positive, starting at 1.
    """

    def __init__(self, channels: int, *, tau: float = 1.0, learn_rates: bool = False, init: str = "orthogonal"):
        super().__init__()
        check_int_setting("channels", channels, 1)
        self.tau = check_positive_setting("tau", tau)
        self.init = check_choice("decay_init", init, DECAY_INITS)
        check_bool_setting("learn_rates", learn_rates)
        if init == "orthogonal":
            basis = nn.init.orthogonal_(torch.empty(channels, channels))
            basis_inv = basis.t().clone()
        else:
            basis = nn.init.xavier_uniform_(torch.empty(channels, channels))
            basis_inv = nn.init.xavier_uniform_(torch.empty(channels, channels))
        self.basis = nn.Parameter(basis)
        self.basis_inv = nn.Parameter(basis_inv)
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
        # The state accumulates in the parameters' dtype: under autocast the tiny matmuls would
        # otherwise come out in bfloat16/float16.
        with torch.autocast(self.basis.device.type, enabled=False):
            return fbkernels.decay_matrix(self.basis, self.basis_inv, self.rates, t, self.tau)

    def matrices(self, steps: int) -> Tensor:
        """``[M(0), ..., M(steps - 1)]``: [steps, d, d], equal to ``forward(t)`` for each t.

        One batched computation instead of one per step: a compiled feedback loop then has one small kernel for
        all decay matrices (and one for their gradient) instead of one per unrolled step.
        """
        with torch.autocast(self.basis.device.type, enabled=False):
            times = torch.arange(steps, dtype=self.basis.dtype, device=self.basis.device)
            scales = torch.exp(-times[:, None] * self.rates[None, :] / self.tau)
            return (self.basis[None] * scales[:, None, :]) @ self.basis_inv


class FeedbackLoop(nn.Module):
    """Feedback model around ``network`` ([B, C_in + k, *S] -> [B, l + k, *S]) and ``head`` ([B, l, *S] -> logits).

    ``model(x, steps=None, *, tol=None, return_states=False)`` -> list of per-step logits
    [B, k, ...], one per step run; with ``return_states`` -> (logits list, states list h(1..), each
    [B, l + k, *S]). ``steps`` (default ``self.steps``) is the number of steps, or with ``tol`` the
    maximum: the loop then stops after the first step t >= 2 whose root-mean-square state change over
    the whole batch, sqrt(mean((h(t) - h(t-1))**2)), is below ``tol`` (one host synchronisation per step,
    so ``tol`` is for eager inference: inside torch.compile(fullgraph=True) it cannot be traced).
    The whole model compiles with fullgraph=True in both bptt modes; a checkpointed network with
    BatchNorm uses checkpoint's context_fn (to keep its statistics), which torch.compile rejects.

    Args:
        num_classes: k, the number of feedback channels (one per class); k = 1 needs softmax=False
            (a softmax over one channel is constantly 1).
        seg_channels: l, the number of segmentation channels the head reads.
        tau: time constant of the decay.
        decay: use M(t) (the paper's "error computation"); False uses M = I.
        softmax: feed back softmax(h[:, d-k:]); False feeds back h[:, d-k:] itself.
        learn_rates: learn positive decay rates instead of fixing them at 1.
        bptt: "full" keeps every step's network activations for backward; "checkpoint" recomputes them.
        backend: fbkernels backend of the state update (None: the fastest available).
        steps: default number of steps T.
        update_factor: "none" (the paper) or "fractional" (the authors' c(t), see the module docstring).
        feedback_layernorm: feed back softmax(LN(h[:, d-k:])) (the authors' code) instead of softmax(h[:, d-k:]).
        decay_init: "orthogonal" (P_inv = P^T, M(0) = I) or "independent" (the authors' code); see DecayMatrix.
        in_channels, spatial_dims: if given, x must be [B, in_channels, *S] with len(S) = spatial_dims.
    ``softmax``, ``bptt``, ``backend`` and ``steps`` can be set later; every value is checked when set.
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
        update_factor: str = "none",
        feedback_layernorm: bool = False,
        decay_init: str = "orthogonal",
        in_channels: int | None = None,
        spatial_dims: int | None = None,
    ):
        super().__init__()
        self.update_factor = check_choice("update_factor", update_factor, UPDATE_FACTORS)
        self.feedback_layernorm = check_bool_setting("feedback_layernorm", feedback_layernorm)
        check_decay_settings(decay, learn_rates)
        check_positive_setting("tau", tau)
        check_choice("decay_init", decay_init, DECAY_INITS)
        self.num_classes = check_int_setting("num_classes", num_classes, 1)
        self.seg_channels = check_int_setting("seg_channels", seg_channels, 1)
        self.in_channels = None if in_channels is None else check_int_setting("in_channels", in_channels, 1)
        self.spatial_dims = None if spatial_dims is None else check_int_setting("spatial_dims", spatial_dims, 0)
        self.state_channels = self.seg_channels + self.num_classes
        self.softmax, self.bptt, self.backend, self.steps = softmax, bptt, backend, steps
        self.network, self.head = network, head
        self.decay = DecayMatrix(self.state_channels, tau=tau, learn_rates=learn_rates, init=decay_init) if decay else None
        self.register_buffer("identity", torch.eye(self.state_channels), persistent=False)
        self.feedback_norm = SpatialLayerNorm() if feedback_layernorm else None

    # ------------------------------------------------------------ settings, checked when set

    @property
    def softmax(self) -> bool:
        return self._softmax

    @softmax.setter
    def softmax(self, value: bool) -> None:
        self._softmax = check_softmax_setting(value, self.num_classes)

    @property
    def bptt(self) -> str:
        return self._bptt

    @bptt.setter
    def bptt(self, value: str) -> None:
        if value not in BPTT_MODES:
            raise ValueError(f"bptt must be one of {list(BPTT_MODES)}, got {value!r}")
        self._bptt = value

    backend = backend_setting()

    @property
    def steps(self) -> int:
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = check_int_setting("steps", value, 1)

    # ------------------------------------------------------------ forward

    def _step(self, x: Tensor, v: Tensor, h: Tensor | None, mix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One step from (v(t-1), h(t-1)) to (h(t), v(t), y(t)); h = None stands for h(0) = 0."""
        inputs = torch.cat([x, v.to(x.dtype)], dim=1)  # v in the network's input dtype only here
        f = self.network(inputs)
        expected = [x.shape[0], self.state_channels, *x.shape[2:]]
        if not isinstance(f, Tensor):
            raise TypeError(f"network must return a Tensor [B, seg_channels + num_classes, *S] = {expected}, "
                            f"got {type(f).__name__}")
        if list(f.shape) != expected:
            raise ValueError(
                f"network must return [B, seg_channels + num_classes, *S] = {expected} (the state's channels at the "
                f"input's resolution) for its input [x, v] of shape {list(inputs.shape)}, got {list(f.shape)}"
            )
        f = f.to(mix.dtype)  # the state accumulates in the loop's dtype, also when the network ran in bf16/f16
        if h is None:
            h = torch.zeros_like(f)
        h, v_softmax = fbkernels.feedback_step(h, f, mix, self.num_classes, backend=self.backend)
        if self.feedback_norm is not None:
            v = self._feedback(h)
        else:
            v = v_softmax if self.softmax else h[:, self.seg_channels:]
        logits = self.head(h[:, : self.seg_channels])
        if not isinstance(logits, Tensor) or list(logits.shape[:2]) != [x.shape[0], self.num_classes]:
            given = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"head must return logits [B, num_classes, ...] = [{x.shape[0]}, {self.num_classes}, ...] "
                             f"from h[:, :seg_channels], got {given}")
        return h, v, logits

    def _feedback(self, h: Tensor) -> Tensor:
        """v = softmax(LN(h[:, d-k:])) (LN(...) without softmax): the feedback_layernorm form, from the state h."""
        v = self.feedback_norm(h[:, self.seg_channels:])
        return torch.softmax(v, dim=1) if self.softmax else v

    def mixes(self, steps: int) -> Tensor:
        """The matrices each step applies to f: [steps, d, d], c(t) M(t-1) for t = 1..steps (c = 1 without the
        fractional factor, M = I without decay)."""
        if self.decay is not None:
            mixes = self.decay.matrices(steps)
        else:
            # The buffer gives the dtype and device, not the values: a model built on the meta device and materialised
            # by to_empty() holds garbage there, which load_state_dict does not replace (the buffer is not persistent).
            identity = torch.eye(self.state_channels, dtype=self.identity.dtype, device=self.identity.device)
            mixes = identity.expand(steps, -1, -1)
        if self.update_factor == "fractional":
            factors = torch.tensor(fractional_update_factors(steps), dtype=mixes.dtype, device=mixes.device)
            mixes = mixes * factors[:, None, None]
        return mixes

    def _checkpointed_step(self, x: Tensor, v: Tensor, h: Tensor | None, mix: Tensor, norms: list[_NormBase]):
        """``_step`` under torch.utils.checkpoint; the recomputation keeps the norms' running statistics."""
        if not norms:  # the plain call is the form torch.compile traces (it rejects a context_fn)
            return checkpoint(self._step, x, v, h, mix, use_reentrant=False)
        context_fn = lambda: (contextlib.nullcontext(), _RunningStatisticsKept(norms))  # noqa: E731
        return checkpoint(self._step, x, v, h, mix, use_reentrant=False, context_fn=context_fn)

    def forward(self, x: Tensor, steps: int | None = None, *, tol: float | None = None, return_states: bool = False):
        steps = self.steps if steps is None else check_int_setting("steps", steps, 1)
        tol = check_real_setting("tol", tol, 0, exclusive=True, optional=True)
        check_input(x, in_channels=self.in_channels, spatial_dims=self.spatial_dims)
        checkpointed = self.bptt == "checkpoint" and torch.is_grad_enabled()
        norms = [m for m in running_statistics_modules(self.network, self.head) if m.training] if checkpointed else []
        v = x.new_zeros((x.shape[0], self.num_classes, *x.shape[2:]))
        if self.feedback_norm is not None:
            v = self._feedback(torch.zeros((x.shape[0], self.state_channels, *x.shape[2:]), dtype=x.dtype, device=x.device))
        h = None
        logits, states = [], []
        mixes = self.mixes(steps)
        for t in range(1, steps + 1):
            mix = mixes[t - 1]
            if checkpointed:
                h_next, v, y = self._checkpointed_step(x, v, h, mix, norms)
            else:
                h_next, v, y = self._step(x, v, h, mix)
            logits.append(y)
            states.append(h_next)
            settled = tol is not None and t >= 2 and float((h_next - h).detach().double().pow(2).mean().sqrt()) < tol
            h = h_next
            if settled:
                break
        return (logits, states) if return_states else logits


def state_changes(states: list[Tensor]) -> list[float]:
    """Root-mean-square step-to-step change ``sqrt(mean((h(t) - h(t-1))**2))`` for t = 2..T."""
    return [float((b - a).double().pow(2).mean().sqrt()) for a, b in zip(states[:-1], states[1:])]
