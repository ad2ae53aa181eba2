"""CBL-CNN ("Contextual Backpropagation Loops"): a CNN whose logits gate its own earlier feature maps.

- ``StandardCNN``: 8 conv layers (4 blocks of 2x [conv 3x3, batch norm, ReLU], max pooling after each
  block), adaptive average pooling, then two fully connected layers. Input [B, C_in, H, W], any H, W;
  output logits [B, num_classes].
- ``ContextualLoops``: wraps any network given as ``blocks`` (feature maps [B, C_i, *S_i]) and a ``head``
  (last map -> logits) and adds T refinement steps (docs/design.md section 1.2). Each step computes the context
  ``z = g(y)`` from the current logits, per gated block the gate logits ``a_i = W_i z + b_i`` [B, C_i],
  applies ``fbkernels.context_gate(h_i, a_i, alpha)`` (out = alpha h + (1 - alpha) h sigmoid(a)) and
  recomputes the logits. Returns the list [y(0), y(1), ..., y(T)].
- ``CBLCNN``: ``ContextualLoops`` around a ``StandardCNN`` (the paper's instance).

Modes of a refinement step:

- ``"repropagate"`` (default): block i's output is gated, then blocks i+1.. are recomputed from the
  gated map and gated in turn; every step starts again from the ungated outputs of the current input,
  so top-down context changes the whole forward pass and every adapter is trained.
- ``"state"``: the paper's equations read literally. Each stored block output is gated on its own,
  h_i(t+1) = gate(h_i(t), W_i z(t) + b_i) (so gates accumulate over the steps), and only the head
  recomputes the logits, from the refined last state. Gating a block other than the last therefore
  never changes the logits, and those adapters get no gradient; the refined states are returned with
  ``return_states=True``.

Normalisation statistics per pass. The modules that run again in a refinement step (the head, and in
"repropagate" the blocks above the first gated one) see gated feature maps there, whose statistics
differ from the ungated maps of the first pass. A BatchNorm with one set of running statistics would
fold all T + 1 passes into it, and in eval mode every pass (y(0) included) would be normalised with
that mixture while training normalised each pass with its own batch's statistics: eval would not
compute what was trained. So every refinement pass t keeps its own running statistics for each such
layer (``refinement_statistics[t - 1]``), updated only by pass t in training and used only by pass t
in eval; pass 0 keeps the layer's own buffers, so the backbone's state_dict is a StandardCNN's.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

import fbkernels

from .feedback import backend_setting, check_input, check_int_setting, has_running_statistics

__all__ = ["StandardCNN", "ContextualLoops", "CBLCNN", "MODES"]

MODES = ("repropagate", "state")


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _MaxPoolIfLarger(nn.Module):
    """2x2 max pooling (stride 2, ceil mode) on dims of size >= 2; a size-1 dim is kept, so tiny inputs work."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = tuple(2 if size >= 2 else 1 for size in x.shape[2:])
        return nn.functional.max_pool2d(x, kernel_size=kernel, stride=kernel, ceil_mode=True)


class StandardCNN(nn.Module):
    """8-layer CNN: 4 blocks of [conv-BN-ReLU] x 2 + max pool, adaptive avg pool, FC-ReLU-dropout-FC.

    ``widths`` gives the channels of the 4 blocks (both convs of a block share it). Input
    [B, in_channels, H, W] (any H, W >= 1), output logits [B, num_classes]. ``blocks`` and ``head`` are
    exposed for ``ContextualLoops``: block i maps [B, C_{i-1}, H, W] -> [B, widths[i], ceil(H/2), ceil(W/2)].
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        hidden: int = 256,
        dropout: float = 0.0,
    ):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be 4 positive channel counts (one per block of 2 convs), got {widths}")
        if in_channels < 1 or num_classes < 1 or hidden < 1:
            raise ValueError(
                f"in_channels, num_classes and hidden must be positive, got {in_channels}, {num_classes}, {hidden}"
            )
        self.in_channels, self.num_classes, self.widths, self.hidden = in_channels, num_classes, widths, hidden
        blocks, previous = [], in_channels
        for width in widths:
            blocks.append(nn.Sequential(_conv_bn_relu(previous, width), _conv_bn_relu(width, width), _MaxPoolIfLarger()))
            previous = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(widths[-1], hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    @property
    def block_channels(self) -> tuple[int, ...]:
        return self.widths

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, in_channels=self.in_channels, spatial_dims=2)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class _NormStatistics(nn.Module):
    """One normalisation layer's running statistics (its buffers only) for one refinement pass."""

    def __init__(self, source: nn.Module):
        super().__init__()
        self.register_buffer("running_mean", source.running_mean.detach().clone())
        self.register_buffer("running_var", source.running_var.detach().clone())
        count = source.num_batches_tracked
        self.register_buffer("num_batches_tracked", None if count is None else count.detach().clone())

    def as_overrides(self, path: str) -> dict[str, torch.Tensor]:
        """{"<path>.running_mean": ..., ...}: the buffers to put in place of the layer's for one call."""
        names = ("running_mean", "running_var") + (("num_batches_tracked",) if self.num_batches_tracked is not None else ())
        prefix = f"{path}." if path else ""  # path "" is the part itself (a head that is one BatchNorm)
        return {prefix + name: getattr(self, name) for name in names}


class ContextualLoops(nn.Module):
    """Adds contextual backpropagation loops to a network given as ``blocks`` and a ``head``.

    blocks: modules applied in order, block i outputs a feature map [B, block_channels[i], *S_i].
    head: module mapping the last block's output to logits [B, num_classes].
    gated_blocks: indices of the blocks whose outputs are gated (default: all), each with its own adapter
    ``nn.Linear(context_dim, block_channels[i])``. The context map g is Linear(num_classes, context_dim)
    + tanh (bounded and without dead units, so every adapter sees a non-zero context).
    forward(x) -> [y(0), ..., y(steps)], each [B, num_classes]; with ``return_states=True`` also the
    final block outputs (list over blocks; in "state" mode these are the refined, gated states).
    ``steps``, ``alpha``, ``mode`` and ``backend`` can be set later; every value is checked when set.
    BatchNorm layers in the head and in the blocks above the first gated one keep running statistics per
    refinement pass (see the module docstring), so eval mode computes what training did for every y(t).
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        head: nn.Module,
        block_channels: Sequence[int],
        num_classes: int,
        *,
        steps: int = 2,
        alpha: float = 0.0,
        context_dim: int = 64,
        mode: str = "repropagate",
        gated_blocks: Sequence[int] | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        self.mode, self.alpha, self.backend = mode, alpha, backend
        check_int_setting("steps", steps, 0)
        blocks = list(blocks)
        block_channels = [int(c) for c in block_channels]
        if not blocks:
            raise ValueError("blocks must hold at least one module")
        if len(block_channels) != len(blocks):
            raise ValueError(f"block_channels must give one channel count per block ({len(blocks)}), got {block_channels}")
        if context_dim < 1:
            raise ValueError(f"context_dim must be positive, got {context_dim}")
        gated = sorted(set(range(len(blocks)) if gated_blocks is None else (int(i) for i in gated_blocks)))
        if not gated or gated[0] < 0 or gated[-1] >= len(blocks):
            raise ValueError(f"gated_blocks must be non-empty indices in 0..{len(blocks) - 1}, got {gated_blocks}")
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.block_channels = tuple(block_channels)
        self.num_classes = check_int_setting("num_classes", num_classes, 1)
        self.context_dim = context_dim
        self.gated_blocks = tuple(gated)
        self.context = nn.Sequential(nn.Linear(num_classes, context_dim), nn.Tanh())
        # ModuleDict keys must be strings: adapters["i"] gates block i.
        self.adapters = nn.ModuleDict({str(i): nn.Linear(context_dim, block_channels[i]) for i in gated})
        # The parts a refinement step runs again (in either mode) and their layers with running statistics:
        # (part name as in named_modules, the layer's path inside the part).
        self._rerun_parts = [f"blocks.{i}" for i in range(gated[0] + 1, len(blocks))] + ["head"]
        self._pass_norm_paths = [
            (part, path) for part in self._rerun_parts for path, m in self.get_submodule(part).named_modules()
            if has_running_statistics(m)
        ]
        self.refinement_statistics = nn.ModuleList()  # [pass t - 1][layer j], grown by the steps setter
        self.steps = steps

    # ------------------------------------------------------------ settings, checked when set

    @property
    def steps(self) -> int:
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = check_int_setting("steps", value, 0)
        # A pass beyond those trained so far starts from the statistics of the last one (the closest maps).
        while len(self.refinement_statistics) < self._steps:
            previous = self.refinement_statistics[-1] if len(self.refinement_statistics) else None
            self.refinement_statistics.append(nn.ModuleList(
                _NormStatistics(previous[j] if previous is not None else self.get_submodule(part).get_submodule(path))
                for j, (part, path) in enumerate(self._pass_norm_paths)
            ))

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"alpha must be a float in [0, 1], got {type(value).__name__}")
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {value}")
        self._alpha = float(value)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self._mode = value

    backend = backend_setting()

    def unused_parameter_names(self) -> list[str]:
        """Names of this model's own parameters that ``forward(x)``'s logits do not depend on (no gradient).

        ``steps=0`` leaves the context map and every adapter unused; "state" mode every adapter but the
        last block's (and the context map too when the last block is not gated). A training loop under
        DistributedDataParallel needs ``find_unused_parameters=True`` when this is not empty.
        """
        last = str(len(self.blocks) - 1)
        if self.steps == 0:
            used_adapters = set()
        elif self.mode == "state":
            used_adapters = {last} & set(self.adapters)
        else:
            used_adapters = set(self.adapters)
        unused = [f"adapters.{key}.{name}" for key in self.adapters if key not in used_adapters
                  for name, _ in self.adapters[key].named_parameters()]
        if not used_adapters:
            unused += [f"context.{name}" for name, _ in self.context.named_parameters()]
        return unused

    # ------------------------------------------------------------ forward

    def gate(self, index: int, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s output [B, C, *S] gated by the context [B, context_dim], through the fbkernels op."""
        gate_logits = self.adapters[str(index)](context)
        # Looked up on the package at call time: the public op (and whatever backend it picks) applies the gate.
        return fbkernels.context_gate(h, gate_logits.to(h.dtype), self.alpha, backend=self.backend)

    def _run(self, part: str, module: nn.Module, h: torch.Tensor, pass_index: int) -> torch.Tensor:
        """``module(h)`` for pass ``pass_index``: from pass 1 on, with that pass's running statistics in place."""
        if pass_index == 0 or not self._pass_norm_paths:
            return module(h)
        statistics = self.refinement_statistics[pass_index - 1]
        overrides = {}
        for j, (owner, path) in enumerate(self._pass_norm_paths):
            if owner == part:
                overrides.update(statistics[j].as_overrides(path))
        if not overrides:
            return module(h)
        # functional_call puts the pass's buffers in place for this call only; BatchNorm updates them in place.
        return torch.func.functional_call(module, overrides, (h,))

    def _check_block(self, index: int, h, batch: int) -> torch.Tensor:
        channels = self.block_channels[index]
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"blocks[{index}] must return a Tensor feature map [B, {channels}, *S], got {type(h).__name__}")
        if h.dim() < 2 or h.shape[0] != batch or h.shape[1] != channels:
            raise ValueError(f"blocks[{index}] must return a feature map [B, block_channels[{index}], *S] = "
                             f"[{batch}, {channels}, *S], got shape {list(h.shape)}")
        return h

    def _head(self, h: torch.Tensor, pass_index: int, batch: int) -> torch.Tensor:
        logits = self._run("head", self.head, h, pass_index)
        if not isinstance(logits, torch.Tensor) or list(logits.shape) != [batch, self.num_classes]:
            given = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"head must return logits [B, num_classes] = [{batch}, {self.num_classes}], got {given}")
        return logits

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"x must be a batched torch.Tensor [B, ...], got {type(x).__name__}")

    def forward(self, x: torch.Tensor, *, return_states: bool = False):
        self._check_input(x)
        batch = x.shape[0]
        states = []
        h = x
        for i, block in enumerate(self.blocks):
            h = self._check_block(i, block(h), batch)
            states.append(h)
        logits = [self._head(h, 0, batch)]
        refined = list(states)
        for t in range(1, self.steps + 1):
            context = self.context(logits[-1])
            if self.mode == "state":
                for i in self.gated_blocks:
                    refined[i] = self.gate(i, refined[i], context)
            else:
                # The blocks below the first gated one see the same input every step: reuse their outputs.
                first = self.gated_blocks[0]
                h = self.gate(first, states[first], context)
                refined[first] = h
                for i in range(first + 1, len(self.blocks)):
                    h = self._check_block(i, self._run(f"blocks.{i}", self.blocks[i], h, t), batch)
                    if i in self.gated_blocks:
                        h = self.gate(i, h, context)
                    refined[i] = h
            logits.append(self._head(refined[-1], t, batch))
        return (logits, refined) if return_states else logits


class CBLCNN(ContextualLoops):
    """``StandardCNN`` with contextual backpropagation loops (the paper's CBL-CNN; defaults T=2, alpha=0).

    The backbone is built first, so under the same seed its initial weights equal a ``StandardCNN``'s
    with the same arguments. forward(x) -> [y(0), y(1), ..., y(steps)], each [B, num_classes].
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        steps: int = 2,
        alpha: float = 0.0,
        context_dim: int = 64,
        mode: str = "repropagate",
        backend: str | None = None,
        widths: Sequence[int] = (64, 128, 256, 512),
        hidden: int = 256,
        dropout: float = 0.0,
        gated_blocks: Sequence[int] | None = None,
    ):
        backbone = StandardCNN(in_channels, num_classes, widths=widths, hidden=hidden, dropout=dropout)
        super().__init__(
            backbone.blocks,
            backbone.head,
            backbone.block_channels,
            num_classes,
            steps=steps,
            alpha=alpha,
            context_dim=context_dim,
            mode=mode,
            gated_blocks=gated_blocks,
            backend=backend,
        )
        self.in_channels, self.widths, self.hidden = in_channels, backbone.widths, hidden

    def _check_input(self, x) -> None:
        check_input(x, in_channels=self.in_channels, spatial_dims=2)
