"""CBL-CNN ("Contextual Backpropagation Loops"): a CNN whose logits gate its own earlier feature maps.

- ``StandardCNN``: the paper's text (arXiv:2412.17737): 8 conv layers (4 blocks of 2x [conv 3x3, batch norm,
  ReLU], max pooling after each block), adaptive average pooling, then two fully connected layers.
  Input [B, C_in, H, W], any H, W; output logits [B, num_classes].
- ``SmallCNN``: the network of the authors' code (docs/experiments.md B): conv 3x3 (32) - ReLU, conv (64) -
  ReLU - max pool, conv (128) - ReLU - max pool, no batch norm, then FC (256) - ReLU - dropout - FC. Its
  4th "block" is the flatten + first FC layer, so the 256-vector it outputs is a state that can be refined.
- ``ContextualLoops``: wraps any network given as ``blocks`` (outputs [B, C_i, *S_i], or vectors [B, C_i])
  and a ``head`` (last output -> logits) and adds T refinement steps (docs/design.md section 1.2). Each step
  computes the context ``z = g(y)`` from the current logits, refines the outputs of the gated blocks with
  their adapters and recomputes the logits. Returns the list [y(0), y(1), ..., y(T)].
- ``CBLCNN``: ``ContextualLoops`` around a ``StandardCNN`` (``backbone="paper"``) or a ``SmallCNN``
  (``backbone="authors"``).

Options of ``ContextualLoops`` (each the paper's text read one way, or the authors' code):

- ``context_map``: ``"linear_tanh"`` (default) z = tanh(W y + b): bounded, so no adapter input blows up;
  ``"linear"`` z = W y + b (the authors' code).
- ``adapter``: ``"sigmoid_gate"`` (default): gate logits a_i = W_i z + b_i [B, C_i] and
  ``fbkernels.context_gate(h, a, alpha)`` = alpha h + (1 - alpha) h sigmoid(a), a per-channel multiplicative
  gate computed by the fused op; ``"concat_relu"`` (the authors' code): a new state
  n = ReLU(W_i [h, c] + b_i) per position (a 1x1 convolution over the channels of h and c), with c the mean
  of z over its features broadcast to every position for a feature map, and c = z for a vector state
  (``vector_blocks``); then alpha h + (1 - alpha) n. This adapter mixes channels and replaces h rather than
  scaling it, so it is not a context_gate and runs in plain PyTorch (``backend`` does not apply to it).
- ``learn_alpha``: alpha fixed (default) or a parameter ``alpha_parameter`` initialised at ``alpha`` (the
  authors' code: learnable, initialised at 0). The blend uses clamp(alpha_parameter, 0, 1) with the clamp's
  gradient taken as 1 (straight through), so every forward blends with an alpha in [0, 1] and a parameter
  pushed past a bound still gets the gradient that brings it back (a plain clamp would stop it there for
  good); the authors' code does not bound alpha. Because context_gate takes alpha as a float, a learnable
  alpha blends outside the op: alpha h + (1 - alpha) context_gate(h, a, 0).
- ``mode``, below; ``steps`` T (paper text 2, authors' CIFAR-10 code 4).

Modes of a refinement step:

- ``"repropagate"`` (default): block i's output is refined, then blocks i+1.. are recomputed from the
  refined map and refined in turn; every step starts again from the unrefined outputs of the current input,
  so top-down context changes the whole forward pass and every adapter is trained.
- ``"state"``: the paper's equations read literally, and what the authors' code does. Each stored block
  output is refined on its own, h_i(t+1) = refine_i(h_i(t), z(t)) (so refinements accumulate over the
  steps), and only the head recomputes the logits, from the refined last state. Refining a block other
  than the last therefore never changes the logits, and those adapters get no gradient; the refined
  states are returned with ``return_states=True``.

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

from .._settings import check_bool_setting, check_choice, check_int_setting, check_real_setting
from .feedback import backend_setting, check_input, has_running_statistics

__all__ = ["StandardCNN", "SmallCNN", "ContextualLoops", "CBLCNN", "ConcatReluAdapter", "build_backbone",
           "MODES", "CONTEXT_MAPS", "ADAPTERS", "BACKBONES"]

MODES = ("repropagate", "state")
CONTEXT_MAPS = ("linear_tanh", "linear")
ADAPTERS = ("sigmoid_gate", "concat_relu")
BACKBONES = ("paper", "authors")


def _check_dropout(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"dropout must be a float in [0, 1), got {type(value).__name__} {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {value!r}")
    return float(value)


def _check_widths(value, count: int, what: str) -> tuple[int, ...]:
    """``count`` channel counts, each an int >= 1 (a float such as 4.5 is refused, not truncated)."""
    widths = tuple(value)
    if len(widths) != count:
        raise ValueError(f"widths must be {count} positive channel counts ({what}), got {widths}")
    return tuple(check_int_setting(f"widths[{i}]", width, 1) for i, width in enumerate(widths))


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
        widths = _check_widths(widths, 4, "one per block of 2 convs")
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("hidden", hidden)):
            check_int_setting(name, value, 1)
        dropout = _check_dropout(dropout)
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

    vector_blocks: tuple[int, ...] = ()  # every block outputs a feature map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, in_channels=self.in_channels, spatial_dims=2)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class SmallCNN(nn.Module):
    """The authors' CNN: 3 conv layers without batch norm, then FC-ReLU-dropout-FC (docs/experiments.md B).

    Blocks: [conv 3x3 (widths[0]), ReLU], [conv (widths[1]), ReLU, max pool 2x2],
    [conv (widths[2]), ReLU, max pool 2x2], [adaptive average pool to pooled_size x pooled_size, flatten,
    FC (-> hidden), ReLU]; head: dropout, FC (-> num_classes). On 32x32 inputs with pooled_size 8 the
    adaptive pooling is the identity, so this is their CIFAR-10 network (flatten of 128 x 8 x 8); on other
    sizes it makes the FC input fixed, as their Speech Commands network does. Input [B, in_channels, H, W],
    output logits [B, num_classes]; block outputs [B, 32, H, W], [B, 64, H/2, W/2], [B, 128, H/4, W/4],
    [B, hidden] (``vector_blocks`` = (3,): the last block outputs a vector).
    """

    vector_blocks: tuple[int, ...] = (3,)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        widths: Sequence[int] = (32, 64, 128),
        hidden: int = 256,
        pooled_size: int = 8,
        dropout: float = 0.0,
    ):
        super().__init__()
        widths = _check_widths(widths, 3, "one per conv layer")
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("hidden", hidden),
                            ("pooled_size", pooled_size)):
            check_int_setting(name, value, 1)
        dropout = _check_dropout(dropout)
        self.in_channels, self.num_classes, self.widths = in_channels, num_classes, widths
        self.hidden, self.pooled_size = hidden, pooled_size
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(widths[0], widths[1], 3, padding=1), nn.ReLU(), _MaxPoolIfLarger()),
            nn.Sequential(nn.Conv2d(widths[1], widths[2], 3, padding=1), nn.ReLU(), _MaxPoolIfLarger()),
            nn.Sequential(nn.AdaptiveAvgPool2d(pooled_size), nn.Flatten(),
                          nn.Linear(widths[2] * pooled_size * pooled_size, hidden), nn.ReLU()),
        ])
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    @property
    def block_channels(self) -> tuple[int, ...]:
        return (*self.widths, self.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, in_channels=self.in_channels, spatial_dims=2)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build_backbone(backbone: str, in_channels: int, num_classes: int, *, widths: Sequence[int] | None = None,
                   hidden: int = 256, dropout: float = 0.0, pooled_size: int | None = None) -> nn.Module:
    """``StandardCNN`` (backbone "paper") or ``SmallCNN`` ("authors"); widths None: the backbone's default.
    ``pooled_size`` is the SmallCNN's (default 8); the StandardCNN pools to 1 x 1 and refuses it."""
    check_choice("backbone", backbone, BACKBONES)
    options = dict(hidden=hidden, dropout=dropout)
    if widths is not None:
        options["widths"] = widths
    if backbone == "paper":
        if pooled_size is not None:
            raise ValueError(f"pooled_size is an option of the authors' backbone, got pooled_size={pooled_size} "
                             "with backbone='paper'")
        return StandardCNN(in_channels, num_classes, **options)
    return SmallCNN(in_channels, num_classes, pooled_size=8 if pooled_size is None else pooled_size, **options)


class ConcatReluAdapter(nn.Module):
    """The authors' adapter: a new state n = ReLU(W [h, c] + b), W: [C, C + K], applied at every position.

    h: a feature map [B, C, *S] with c = mean of z over its features [B, 1] broadcast to every position
    (K = 1), or a vector [B, C] with c = z [B, context_dim] (K = context_dim), as ``vector`` says.
    forward(h, z) -> n, shaped like h.
    """

    def __init__(self, channels: int, context_dim: int, *, vector: bool):
        super().__init__()
        self.channels, self.vector = channels, bool(vector)
        self.linear = nn.Linear(channels + (context_dim if vector else 1), channels)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.vector:
            return torch.relu(self.linear(torch.cat([h, context.to(h.dtype)], dim=1)))
        summary = context.mean(dim=1, keepdim=True).to(h.dtype)  # [B, 1]
        summary = summary.reshape(*summary.shape, *([1] * (h.dim() - 2))).expand(-1, -1, *h.shape[2:])
        # A 1x1 convolution for any number of spatial dims: the linear map over channels, channels last.
        mixed = self.linear(torch.cat([h, summary], dim=1).movedim(1, -1)).movedim(-1, 1)
        return torch.relu(mixed)


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

    blocks: modules applied in order, block i outputs a feature map [B, block_channels[i], *S_i] (or a
    vector [B, block_channels[i]] for the indices in ``vector_blocks``).
    head: module mapping the last block's output to logits [B, num_classes].
    gated_blocks: indices of the blocks whose outputs are refined (default: all), each with its own adapter
    ``adapters[str(i)]``: ``nn.Linear(context_dim, block_channels[i])`` for ``adapter="sigmoid_gate"``, a
    ``ConcatReluAdapter`` for ``"concat_relu"``. The context map g is ``context[0]`` = Linear(num_classes,
    context_dim), followed by tanh for ``context_map="linear_tanh"`` (see the module docstring for every
    option). ``learn_alpha=True`` makes alpha the parameter ``alpha_parameter`` (initial value ``alpha``).
    forward(x) -> [y(0), ..., y(steps)], each [B, num_classes]; with ``return_states=True`` also the
    final block outputs (list over blocks; in "state" mode these are the refined states).
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
        context_map: str = "linear_tanh",
        adapter: str = "sigmoid_gate",
        learn_alpha: bool = False,
        vector_blocks: Sequence[int] = (),
    ):
        super().__init__()
        self.mode, self.backend = mode, backend
        check_int_setting("steps", steps, 0)
        self.context_map = check_choice("context_map", context_map, CONTEXT_MAPS)
        self.adapter = check_choice("adapter", adapter, ADAPTERS)
        self.learn_alpha = check_bool_setting("learn_alpha", learn_alpha)
        # The parameter exists before the alpha setter runs, which writes the initial value into it.
        if learn_alpha:
            self.alpha_parameter = nn.Parameter(torch.zeros(()))
        else:
            self.register_parameter("alpha_parameter", None)
        self.alpha = alpha
        blocks = list(blocks)
        # Sizes and indices are ints under the user's names: a float (4.7, 0.9) is refused, not truncated by int().
        block_channels = [check_int_setting(f"block_channels[{i}]", c, 1) for i, c in enumerate(block_channels)]
        if not blocks:
            raise ValueError("blocks must hold at least one module")
        if len(block_channels) != len(blocks):
            raise ValueError(f"block_channels must give one channel count per block ({len(blocks)}), got {block_channels}")
        check_int_setting("context_dim", context_dim, 1)
        gated = sorted(set(range(len(blocks)) if gated_blocks is None else (
            check_int_setting(f"gated_blocks[{j}]", i, 0) for j, i in enumerate(gated_blocks))))
        if not gated or gated[0] < 0 or gated[-1] >= len(blocks):
            raise ValueError(f"gated_blocks must be non-empty indices in 0..{len(blocks) - 1}, got {gated_blocks}")
        vectors = sorted(set(check_int_setting(f"vector_blocks[{j}]", i, 0) for j, i in enumerate(vector_blocks)))
        if vectors and (vectors[0] < 0 or vectors[-1] >= len(blocks)):
            raise ValueError(f"vector_blocks must be indices in 0..{len(blocks) - 1}, got {tuple(vector_blocks)}")
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.block_channels = tuple(block_channels)
        self.num_classes = check_int_setting("num_classes", num_classes, 1)
        self.context_dim = context_dim
        self.gated_blocks = tuple(gated)
        self.vector_blocks = tuple(vectors)
        self.context = nn.Sequential(nn.Linear(num_classes, context_dim),
                                     *([nn.Tanh()] if context_map == "linear_tanh" else []))
        # ModuleDict keys must be strings: adapters["i"] refines block i.
        if adapter == "sigmoid_gate":
            adapters = {str(i): nn.Linear(context_dim, block_channels[i]) for i in gated}
        else:
            adapters = {str(i): ConcatReluAdapter(block_channels[i], context_dim, vector=i in vectors) for i in gated}
        self.adapters = nn.ModuleDict(adapters)
        # The parts a refinement step runs again (in either mode) and their layers with running statistics:
        # (part name as in named_modules, the layer's path inside the part).
        self._rerun_parts = [f"blocks.{i}" for i in range(gated[0] + 1, len(blocks))] + ["head"]
        self._pass_norm_paths = [
            (part, path) for part in self._rerun_parts for path, m in self.get_submodule(part).named_modules()
            if has_running_statistics(m)
        ]
        self.refinement_statistics = nn.ModuleList()  # [pass t - 1][layer j], grown by steps and load_state_dict
        self.steps = steps

    # ------------------------------------------------------------ settings, checked when set

    @property
    def steps(self) -> int:
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = check_int_setting("steps", value, 0)
        self._grow_refinement_statistics(self._steps)

    def _grow_refinement_statistics(self, passes: int) -> None:
        """Running statistics for refinement passes 1..passes (never fewer than there are: lowering ``steps`` keeps
        the statistics of the passes it leaves out)."""
        # A pass beyond those trained so far starts from the statistics of the last one (the closest maps).
        while len(self.refinement_statistics) < passes:
            previous = self.refinement_statistics[-1] if len(self.refinement_statistics) else None
            self.refinement_statistics.append(nn.ModuleList(
                _NormStatistics(previous[j] if previous is not None else self.get_submodule(part).get_submodule(path))
                for j, (part, path) in enumerate(self._pass_norm_paths)
            ))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A model whose steps were raised once (say to evaluate with more passes) keeps statistics for those passes,
        # so its state_dict holds more of them than a model built with the original steps. Grow to the passes the
        # state_dict holds before the children load, so they load instead of failing as unexpected keys. This runs
        # before the recursion into refinement_statistics, which therefore sees the new passes.
        head = f"{prefix}refinement_statistics."
        indices = (key[len(head):].split(".", 1)[0] for key in state_dict if key.startswith(head))
        passes = [int(index) for index in indices if index.isdigit()]
        if passes:
            self._grow_refinement_statistics(max(passes) + 1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def alpha(self) -> float:
        """The blend factor in [0, 1]; with ``learn_alpha``, clamp(alpha_parameter, 0, 1) as the forward uses it."""
        if self.alpha_parameter is not None:
            return float(self.alpha_parameter.detach().clamp(0.0, 1.0))
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        # Any real number, as fbkernels.context_gate takes it (a NumPy float32 is not a Python float).
        self._alpha = check_real_setting("alpha", value, 0, maximum=1)
        if self.alpha_parameter is not None:
            with torch.no_grad():
                self.alpha_parameter.fill_(float(value))

    def _blend_alpha(self):
        """alpha for the blend: the float, or the learnable parameter clamped to [0, 1] with a straight-through
        gradient (forward value clamped, d alpha / d alpha_parameter = 1), so a parameter beyond a bound can return."""
        if self.alpha_parameter is None:
            return self._alpha
        raw = self.alpha_parameter
        return raw + (raw.clamp(0.0, 1.0) - raw).detach()

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

        ``steps=0`` leaves the context map, every adapter and a learnable alpha unused; "state" mode every
        adapter but the last block's (and the context map and alpha too when the last block is not gated). A
        training loop under DistributedDataParallel needs ``find_unused_parameters=True`` when this is not empty.
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
            if self.alpha_parameter is not None:
                unused.append("alpha_parameter")
        return unused

    # ------------------------------------------------------------ forward

    def gate(self, index: int, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s output h [B, C, *S] refined by the context [B, context_dim]: the sigmoid gate through
        the fbkernels op, or the authors' adapter blended as alpha h + (1 - alpha) ReLU(W [h, c] + b)."""
        adapter = self.adapters[str(index)]
        alpha = self._blend_alpha()
        if self.adapter == "concat_relu":
            if (h.dim() == 2) != (index in self.vector_blocks):
                expected = "a vector [B, C]" if index in self.vector_blocks else "a feature map [B, C, *S]"
                raise ValueError(f"blocks[{index}] must return {expected} for its concat_relu adapter (vector_blocks="
                                 f"{self.vector_blocks}), got shape {list(h.shape)}")
            return alpha * h + (1.0 - alpha) * adapter(h, context)
        gate_logits = adapter(context).to(h.dtype)
        # Looked up on the package at call time: the public op (and whatever backend it picks) applies the gate.
        if isinstance(alpha, float):
            return fbkernels.context_gate(h, gate_logits, alpha, backend=self.backend)
        # The op takes alpha as a float: a learnable alpha blends outside it, with the op's pure gate (alpha 0).
        return alpha * h + (1.0 - alpha) * fbkernels.context_gate(h, gate_logits, 0.0, backend=self.backend)

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
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a batched torch.Tensor [B, ...], got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError(f"x must be a batched torch.Tensor [B, ...], got shape {list(x.shape)}")

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
    """A CNN with contextual backpropagation loops: ``backbone="paper"`` a ``StandardCNN`` (the paper's text;
    defaults T=2, alpha=0), ``"authors"`` a ``SmallCNN`` (the authors' code's network).

    The backbone is built first, so under the same seed its initial weights equal the ``StandardCNN``'s
    (``SmallCNN``'s) with the same arguments. ``widths`` None takes the backbone's default ((64, 128, 256,
    512) or (32, 64, 128)); ``pooled_size`` is the SmallCNN's (None: 8). The SmallCNN's last block outputs
    the hidden FC vector, so it is a vector block for the concat_relu adapter. Every other argument is
    ``ContextualLoops``'s. forward(x) -> [y(0), y(1), ..., y(steps)], each [B, num_classes].
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
        widths: Sequence[int] | None = None,
        hidden: int = 256,
        dropout: float = 0.0,
        gated_blocks: Sequence[int] | None = None,
        backbone: str = "paper",
        pooled_size: int | None = None,
        context_map: str = "linear_tanh",
        adapter: str = "sigmoid_gate",
        learn_alpha: bool = False,
    ):
        network = build_backbone(backbone, in_channels, num_classes, widths=widths, hidden=hidden, dropout=dropout,
                                 pooled_size=pooled_size)
        super().__init__(
            network.blocks,
            network.head,
            network.block_channels,
            num_classes,
            steps=steps,
            alpha=alpha,
            context_dim=context_dim,
            mode=mode,
            gated_blocks=gated_blocks,
            backend=backend,
            context_map=context_map,
            adapter=adapter,
            learn_alpha=learn_alpha,
            vector_blocks=network.vector_blocks,
        )
        self.backbone = backbone
        self.in_channels, self.widths, self.hidden = in_channels, network.widths, hidden

    def _check_input(self, x) -> None:
        check_input(x, in_channels=self.in_channels, spatial_dims=2)
