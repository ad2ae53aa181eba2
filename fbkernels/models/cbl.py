"""CBL-CNN ("Contextual Backpropagation Loops"): a CNN whose logits gate its own earlier feature maps.

- ``StandardCNN``: 8 conv layers (4 blocks of 2x [conv 3x3, batch norm, ReLU], max pooling after each
  block), adaptive average pooling, then two fully connected layers. Input [B, C_in, H, W], any H, W;
  output logits [B, num_classes].
- ``ContextualLoops``: wraps any network given as ``blocks`` (feature maps [B, C_i, *S_i]) and a ``head``
  (last map -> logits) and adds T refinement steps (DESIGN.md 1.2). Each step computes the context
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
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

import fbkernels

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
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class ContextualLoops(nn.Module):
    """Adds contextual backpropagation loops to a network given as ``blocks`` and a ``head``.

    blocks: modules applied in order, block i outputs a feature map [B, block_channels[i], *S_i].
    head: module mapping the last block's output to logits [B, num_classes].
    gated_blocks: indices of the blocks whose outputs are gated (default: all), each with its own adapter
    ``nn.Linear(context_dim, block_channels[i])``. The context map g is Linear(num_classes, context_dim)
    + tanh (bounded and without dead units, so every adapter sees a non-zero context).
    forward(x) -> [y(0), ..., y(steps)], each [B, num_classes]; with ``return_states=True`` also the
    final block outputs (list over blocks; in "state" mode these are the refined, gated states).
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
        blocks = list(blocks)
        block_channels = [int(c) for c in block_channels]
        if not blocks:
            raise ValueError("blocks must hold at least one module")
        if len(block_channels) != len(blocks):
            raise ValueError(f"block_channels must give one channel count per block ({len(blocks)}), got {block_channels}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if context_dim < 1:
            raise ValueError(f"context_dim must be positive, got {context_dim}")
        gated = sorted(set(range(len(blocks)) if gated_blocks is None else (int(i) for i in gated_blocks)))
        if not gated or gated[0] < 0 or gated[-1] >= len(blocks):
            raise ValueError(f"gated_blocks must be non-empty indices in 0..{len(blocks) - 1}, got {gated_blocks}")
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.block_channels = tuple(block_channels)
        self.num_classes, self.steps, self.alpha = num_classes, steps, float(alpha)
        self.context_dim, self.mode, self.backend = context_dim, mode, backend
        self.gated_blocks = tuple(gated)
        self.context = nn.Sequential(nn.Linear(num_classes, context_dim), nn.Tanh())
        # ModuleDict keys must be strings: adapters["i"] gates block i.
        self.adapters = nn.ModuleDict({str(i): nn.Linear(context_dim, block_channels[i]) for i in gated})

    def gate(self, index: int, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s output [B, C, *S] gated by the context [B, context_dim], through the fbkernels op."""
        gate_logits = self.adapters[str(index)](context)
        # Looked up on the package at call time: the public op (and whatever backend it picks) applies the gate.
        return fbkernels.context_gate(h, gate_logits.to(h.dtype), self.alpha, backend=self.backend)

    def forward(self, x: torch.Tensor, *, return_states: bool = False):
        states = []
        h = x
        for block in self.blocks:
            h = block(h)
            states.append(h)
        logits = [self.head(h)]
        refined = list(states)
        for _ in range(self.steps):
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
                    h = self.blocks[i](h)
                    if i in self.gated_blocks:
                        h = self.gate(i, h, context)
                    refined[i] = h
            logits.append(self.head(refined[-1]))
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
