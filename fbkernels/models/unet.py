"""A plain U-Net and the two Feedback U-Net models of experiment A (docs/design.md section 1.1).

- ``UNet(in_channels, out_channels, *, width=16, depth=3)``: encoder of ``depth`` 2x max-pool stages
  (widths ``width * 2**i``), decoder with bilinear upsampling and skip concatenation, each level two
  3x3 conv + GroupNorm + ReLU blocks, a 1x1 conv to ``out_channels``. GroupNorm keeps no running
  statistics, so recomputing a forward (checkpointed BPTT) is exact and has no side effects. Any
  input size works (the decoder upsamples to each skip's size), with one limit in training: GroupNorm needs
  more than one value per group, so a level whose map is 1 x 1 needs at least 2 channels per group (the
  groups: the largest divisor of the level's channel count up to 8). Every level with more than 8 channels meets
  it; a level with 8 or fewer (a width of 8 or less) fails on a 1 x 1 map with PyTorch's "Expected more than 1
  value per channel when training".
- ``FeedbackUNet``: ``FeedbackLoop`` around a U-Net from [x, v] (in_channels + k) to the d = l + k
  state channels, with a 1x1 conv head G from the l segmentation channels to the class logits.
  ``normalization="bn-relu-ln"`` is the authors' code's form (docs/experiments.md section A): the U-Net's
  output goes through BatchNorm + ReLU and a layer norm over (H, W) per channel before the update, and the
  feedback is softmax(LN(h[:, d-k:])); the default "none" is the paper's text (the output used as it is).
- ``FeedforwardUNet``: the same U-Net on x alone, one pass; with ``decay=True`` (the paper's "error
  computation" variant) its output is mixed once by the static decay M(decay_step), through the same
  fused ``fbkernels.feedback_step`` op starting from a zero state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fbkernels

from .._settings import check_choice, check_int_setting, check_positive_setting
from .feedback import (DecayMatrix, FeedbackLoop, SpatialLayerNorm, backend_setting, check_decay_settings,
                       check_input, check_softmax_setting)

__all__ = ["UNet", "FeedbackUNet", "FeedforwardUNet", "NORMALIZATIONS"]

NORMALIZATIONS = ("none", "bn-relu-ln")  # the paper's text; the authors' code


def _num_groups(channels: int, max_groups: int = 8) -> int:
    """Largest group count <= max_groups that divides ``channels`` (GroupNorm needs an exact split)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class ConvBlock(nn.Sequential):
    """(3x3 conv, GroupNorm, ReLU) twice: [B, in_channels, H, W] -> [B, out_channels, H, W]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(_num_groups(out_channels), out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(_num_groups(out_channels), out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Plain U-Net: [B, in_channels, H, W] -> [B, out_channels, H, W]; ``depth`` down/up stages, base ``width``."""

    def __init__(self, in_channels: int, out_channels: int, *, width: int = 16, depth: int = 3):
        super().__init__()
        for name, value, minimum in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                     ("width", width, 1), ("depth", depth, 0)):
            check_int_setting(name, value, minimum)
        widths = [width * 2**i for i in range(depth + 1)]
        self.inc = ConvBlock(in_channels, widths[0])
        self.down = nn.ModuleList(ConvBlock(widths[i], widths[i + 1]) for i in range(depth))
        # Decoder level i takes the upsampled level i+1 map concatenated with encoder level i's skip.
        self.up = nn.ModuleList(ConvBlock(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth)))
        self.out = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = [self.inc(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2, ceil_mode=True)))
        y = skips.pop()
        for block in self.up:
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        return self.out(y)


class FeedbackUNet(FeedbackLoop):
    """Feedback U-Net: ``model(x, steps=T, *, tol=None)`` -> list of per-step logits [B, num_classes, H, W].

    x: [B, in_channels, H, W]. State h: [B, seg_channels + num_classes, H, W]; step t: f = UNet([x, v(t-1)]),
    (h, v) = fbkernels.feedback_step(h, f, M(t-1)), logits(t) = G(h[:, :seg_channels]).
    See ``FeedbackLoop`` for decay, softmax (binary segmentation: num_classes=2), learn_rates, bptt, backend, tol,
    update_factor ("none" or the authors' "fractional") and decay_init ("orthogonal" or the authors' "independent").
    normalization: "none" (f = UNet(...)) or "bn-relu-ln" (f = LN_HW(ReLU(BatchNorm(UNet(...)))) and the feedback
    softmax(LN_HW(h[:, d-k:])), the authors' code; ``network`` is then that Sequential, its U-Net ``network[0]``).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        seg_channels: int = 16,
        width: int = 16,
        depth: int = 3,
        tau: float = 1.0,
        decay: bool = True,
        softmax: bool = True,
        learn_rates: bool = False,
        bptt: str = "full",
        backend: str | None = None,
        steps: int = 5,
        normalization: str = "none",
        update_factor: str = "none",
        decay_init: str = "orthogonal",
    ):
        # The U-Net's own checks would name its arguments (in_channels + num_classes, ...), not the user's.
        check_int_setting("in_channels", in_channels, 1)
        state_channels = check_int_setting("seg_channels", seg_channels, 1) + check_int_setting("num_classes", num_classes, 1)
        check_softmax_setting(softmax, num_classes)  # before building a U-Net that could not be used
        self_normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        network = UNet(in_channels + num_classes, state_channels, width=width, depth=depth)
        if normalization == "bn-relu-ln":
            network = nn.Sequential(network, nn.BatchNorm2d(state_channels), nn.ReLU(), SpatialLayerNorm())
        super().__init__(
            network=network,
            head=nn.Conv2d(seg_channels, num_classes, 1),
            num_classes=num_classes,
            seg_channels=seg_channels,
            tau=tau,
            decay=decay,
            softmax=softmax,
            learn_rates=learn_rates,
            bptt=bptt,
            backend=backend,
            steps=steps,
            update_factor=update_factor,
            feedback_layernorm=normalization == "bn-relu-ln",
            decay_init=decay_init,
            in_channels=in_channels,
            spatial_dims=2,
        )
        self.normalization = self_normalization


class FeedforwardUNet(nn.Module):
    """The feedforward counterpart: ``model(x)`` -> logits [B, num_classes, H, W] from one U-Net pass.

    f = UNet(x) with seg_channels + num_classes channels; h = M(decay_step) @ f per position if
    ``decay`` (through fbkernels.feedback_step from a zero state) else f; logits = G(h[:, :seg_channels]).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        seg_channels: int = 16,
        width: int = 16,
        depth: int = 3,
        decay: bool = False,
        tau: float = 1.0,
        decay_step: int = 5,
        learn_rates: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        self.in_channels = check_int_setting("in_channels", in_channels, 1)
        self.num_classes = check_int_setting("num_classes", num_classes, 1)
        self.seg_channels = check_int_setting("seg_channels", seg_channels, 1)
        self.state_channels = seg_channels + num_classes
        # Checked here, also without decay as FeedbackUNet does: unchecked, a bad decay_step surfaced only in the
        # first forward, as decay_matrix's error about its argument "t".
        check_positive_setting("tau", tau)
        check_decay_settings(decay, learn_rates)
        self.decay_step, self.backend = check_int_setting("decay_step", decay_step, 0), backend
        self.network = UNet(in_channels, self.state_channels, width=width, depth=depth)
        self.head = nn.Conv2d(seg_channels, num_classes, 1)
        self.decay = DecayMatrix(self.state_channels, tau=tau, learn_rates=learn_rates) if decay else None

    backend = backend_setting()

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, in_channels=self.in_channels, spatial_dims=2)
        f = self.network(x)
        if self.decay is not None:
            mix = self.decay(self.decay_step)  # in the parameters' dtype, also under autocast
            f = f.to(mix.dtype)
            f, _ = fbkernels.feedback_step(torch.zeros_like(f), f, mix, self.num_classes, backend=self.backend)
        return self.head(f[:, : self.seg_channels])
