"""The one training loop both experiments use: seeded Adam training with checkpoint/resume and optional DDP.

- ``seed_everything(seed)``: Python, NumPy and torch (CPU and CUDA) generators; ``rank_seed(seed, rank)``
  the per-rank seed ``fit`` uses for them under DDP.
- ``step_loss(logits_list, target, weights=None)``: ``sum_t w_t * CE(logits_list[t], target)`` for
  [B, C] or [B, C, H, W] logits (a single logits tensor counts as a list of one).
- ``fit(model, train_set, *, loss_fn, epochs, batch_size, lr, ...) -> history``: Adam, optional StepLR
  halving, tqdm progress, per-epoch ``eval_fn(model, val_set)``, a checkpoint file written every epoch
  and resumed from at start, DistributedDataParallel under torchrun (``WORLD_SIZE > 1``).
- ``predict(model, dataset, *, batch_size, device)``: yields (output, target) batches on the CPU in
  eval mode without gradients; ``evaluate(...)`` turns them into loss / accuracy / F1 of one class.

Datasets yield ``(input, target)`` pairs. A dataset with a ``set_epoch(epoch)`` method (like
``fbkernels.data.PolygonDataset``, whose training noise is redrawn each epoch) is told the epoch
before the epoch starts, also inside a ``Subset`` or ``ConcatDataset``, so its randomness is a
function of (seed, epoch, index): identical across DDP ranks, DataLoader workers and resumed runs.
"""
from __future__ import annotations

import os
import random
import time
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from . import metrics
from ._settings import check_int_setting, check_real_setting

__all__ = [
    "seed_everything",
    "rank_seed",
    "step_loss",
    "final_output",
    "fit",
    "predict",
    "evaluate",
    "world_info",
    "is_main_process",
]


# ---------------------------------------------------------------- seeding and losses

def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch's CPU and CUDA generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def step_loss(logits_list: Sequence[Tensor] | Tensor, target: Tensor, weights: Sequence[float] | None = None) -> Tensor:
    """Per-step loss ``sum_t w_t * cross_entropy(logits_list[t], target)``; weights default to all 1.

    logits: [B, C] with target [B], or [B, C, H, W] with target [B, H, W] (class indices). Summing the
    steps and calling backward once costs one pass through the unrolled graph, not one per step.
    """
    if isinstance(logits_list, Tensor):
        logits_list = [logits_list]
    if len(logits_list) == 0:
        raise ValueError("logits_list must hold at least one logits tensor")
    if weights is None:
        weights = [1.0] * len(logits_list)
    if len(weights) != len(logits_list):
        raise ValueError(f"weights must have one entry per step ({len(logits_list)}), got {len(weights)}")
    total = None
    for w, logits in zip(weights, logits_list):
        term = float(w) * F.cross_entropy(logits, target)
        total = term if total is None else total + term
    return total


def final_output(output) -> Tensor:
    """The prediction to evaluate: the last step's logits of a per-step list, or the logits themselves."""
    return output[-1] if isinstance(output, (list, tuple)) else output


# ---------------------------------------------------------------- distributed helpers

def world_info() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from torchrun's environment variables; (1, 0, 0) otherwise."""
    return (
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def is_main_process() -> bool:
    """True on rank 0 (and always outside torchrun): the process that prints, plots and writes files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return world_info()[1] == 0


def _setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Under torchrun: start the process group if needed and bind CUDA ranks to their local GPU."""
    world_size, rank, local_rank = world_info()
    if world_size <= 1:
        return 1, 0, device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_world_size(), dist.get_rank(), device


# ---------------------------------------------------------------- checkpoints

def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s global generators: ``seed`` on rank 0, a distinct derived seed elsewhere.

    Derived through NumPy's SeedSequence rather than seed + rank, so that rank 1 of seed s does not
    replay rank 0 of seed s + 1.
    """
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] % 2**63)


def _restore_rng_state(state: dict, seed: int, rank: int, world_size: int) -> None:
    per_rank = state.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == world_size:
        _set_rng_state(per_rank[rank])
    elif per_rank is None and "rng" in state and world_size == 1:
        _set_rng_state(state["rng"])  # a checkpoint written before per-rank states
    else:
        # Resumed on another number of ranks: no saved stream for this rank, start a fresh distinct one.
        fresh = np.random.SeedSequence([seed, rank, state["epoch"]]).generate_state(1, np.uint64)[0]
        seed_everything(int(fresh % 2**63))


def _save_checkpoint(path: str, **state) -> None:
    # Write then rename: a run killed mid-save leaves the previous checkpoint intact.
    tmp = f"{path}.tmp"
    try:
        torch.save(state, tmp)
    except BaseException:
        # A save that fails (an eval dict that does not pickle, a full disk) leaves no partial file behind.
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


# ---------------------------------------------------------------- training

def _check_resumed_settings(checkpoint: str, saved: dict | None, settings: dict) -> None:
    """Refuse to resume a checkpoint written with other settings: the optimizer's and scheduler's saved state
    would silently replace the lr and halving asked for, and the data order and clipping would change mid-run.
    A checkpoint from before the settings were saved is resumed as it is."""
    if saved is None:
        return
    changed = [f"{name}={settings[name]!r} (checkpoint: {saved[name]!r})" for name in settings
               if name in saved and saved[name] != settings[name]]
    if changed:
        raise ValueError(f"checkpoint {checkpoint!r} was written by a run with other settings: {', '.join(changed)}. "
                         f"Resume with the checkpoint's settings, or give a new checkpoint path to start a new run")


def _set_dataset_epoch(dataset: Dataset, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on ``dataset`` and on every dataset inside it (through ``Subset`` and
    ``ConcatDataset``, which have no ``set_epoch`` of their own: a PolygonDataset wrapped in them would otherwise
    repeat the noise of epoch 0 every epoch)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    elif isinstance(dataset, Subset):
        _set_dataset_epoch(dataset.dataset, epoch)
    elif isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            _set_dataset_epoch(part, epoch)


def fit(
    model: nn.Module,
    train_set: Dataset,
    *,
    loss_fn: Callable[[object, Tensor], Tensor],
    epochs: int,
    batch_size: int,
    lr: float,
    lr_halve_every: int | None = None,
    val_set: Dataset | None = None,
    eval_fn: Callable[[nn.Module, Dataset], dict] | None = None,
    device="cpu",
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    desc: str = "train",
    leave: bool = True,
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    num_workers: int = 0,
    find_unused_parameters: bool | None = None,
) -> dict:
    """Train ``model`` with Adam on ``train_set`` for ``epochs`` epochs; returns the history.

    Each batch: ``loss_fn(model(x), y).backward()`` then an optimizer step (gradient norm clipped to
    ``grad_clip`` > 0 if given). The learning rate halves every ``lr_halve_every`` epochs (StepLR; None or
    0: constant). After each epoch ``eval_fn(model, val_set)`` (a dict of floats) is recorded (give both or
    neither), and the checkpoint file (model, optimizer, scheduler, epoch, RNG states, history) is rewritten;
    an existing checkpoint is resumed from, so a rerun of an interrupted call continues where it stopped (or
    trains on, with more ``epochs``); a checkpoint written with another ``lr``, ``lr_halve_every``,
    ``weight_decay``, ``grad_clip``, ``batch_size`` or ``seed`` is refused with a ValueError.
    Under torchrun the model is wrapped in DistributedDataParallel and the data sharded by a
    DistributedSampler; only rank 0 shows progress and writes the checkpoint (``desc`` labels the bar;
    ``leave=False`` clears it when done). The model is left on ``device``.

    DDP must be told when some parameters get no gradient (CBL-CNN in "state" mode or with steps=0),
    else it waits for their reduction and fails at the next step. ``find_unused_parameters=None`` asks
    the model (``model.unused_parameter_names()``, which the fbkernels CBL models define) and otherwise
    keeps DDP's default (False: no extra graph traversal per step); pass True for a model of your own
    whose forward leaves parameters unused.

    Randomness: the data order (the sampler's shuffle) is one function of (seed >= 0, epoch) shared by every
    rank, while the global generators (dropout masks, random augmentation, DataLoader worker seeds) are
    seeded per rank, so the ranks draw different masks for their different samples; rank 0 (and a
    single-process run) uses ``seed`` itself. The checkpoint keeps every rank's generator states.

    history = {"train_loss": [mean loss per epoch], "val": [eval dict per epoch], "epochs_run": n,
               "epoch_seconds": [wall time per epoch]}
    """
    check_int_setting("epochs", epochs, 0)
    check_int_setting("batch_size", batch_size, 1)
    check_real_setting("lr", lr, 0, exclusive=True)
    # StepLR takes any step size: a negative one halves the rate every epoch (epoch % -1 == 0), a float at
    # multiples of it. 0 and None keep the rate constant.
    check_int_setting("lr_halve_every", lr_halve_every, 0, optional=True)
    # clip_grad_norm_ scales the gradients by grad_clip / norm: a negative bound reverses them (gradient
    # ascent), 0 zeroes them (no training).
    check_real_setting("grad_clip", grad_clip, 0, exclusive=True, optional=True)
    check_real_setting("weight_decay", weight_decay, 0)
    # Validation needs both: with one of them the epochs' evaluation was skipped without a word.
    if (val_set is None) != (eval_fn is None):
        given, missing = ("val_set", "eval_fn") if eval_fn is None else ("eval_fn", "val_set")
        raise ValueError(f"{given} was given without {missing}: per-epoch validation needs both (or neither)")
    # A negative seed ran on one process but failed under DDP, where ranks > 0 derive theirs (rank_seed).
    check_int_setting("seed", seed, 0)
    world_size, rank, device = _setup_distributed(torch.device(device))
    main = rank == 0
    seed_everything(rank_seed(seed, rank))
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, lr_halve_every, gamma=0.5) if lr_halve_every else None
    history = {"train_loss": [], "val": [], "epochs_run": 0, "epoch_seconds": []}

    # What the optimisation depends on besides the epoch count (which a rerun may raise to train on).
    settings = dict(lr=float(lr), lr_halve_every=lr_halve_every or 0, weight_decay=float(weight_decay),
                    grad_clip=None if grad_clip is None else float(grad_clip), batch_size=int(batch_size), seed=int(seed))
    checkpoint = os.fspath(checkpoint) if checkpoint is not None else None
    # Found now rather than by the first save, after a whole epoch of training. Every rank checks (they all
    # read the file to resume), so none is left waiting for a rank 0 that failed.
    if checkpoint is not None and not os.path.isdir(os.path.dirname(checkpoint) or "."):
        raise FileNotFoundError(f"checkpoint {checkpoint!r}: its directory {os.path.dirname(checkpoint)!r} does not exist")
    if checkpoint is not None and os.path.exists(checkpoint):
        # Our own file: it holds NumPy RNG state, which weights_only loading refuses.
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        _check_resumed_settings(checkpoint, state.get("settings"), settings)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        _restore_rng_state(state, seed, rank, world_size)

    start_epoch = history["epochs_run"]
    if start_epoch > epochs and main:
        # A longer run's file: nothing is trained, and what comes back has more epochs than were asked for.
        warnings.warn(f"checkpoint {checkpoint!r} holds {start_epoch} epochs, more than epochs={epochs}: nothing is "
                      f"trained, and the model and history returned are those of {start_epoch} epochs", stacklevel=2)
    train_model = model
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        if find_unused_parameters is None:
            declared = getattr(model, "unused_parameter_names", None)
            find_unused_parameters = bool(declared()) if callable(declared) else False
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
        )

    # The sampler's order depends only on (seed, epoch): a resumed run replays the same batches.
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(
        train_set, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    bar = None
    if progress and main and epochs > start_epoch:
        from tqdm.auto import tqdm

        bar = tqdm(total=(epochs - start_epoch) * len(loader), desc=desc, dynamic_ncols=True, leave=leave)

    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        _set_dataset_epoch(train_set, epoch)
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        for i, (x, y) in enumerate(loader):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            loss = loss_fn(train_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            loss_sum += loss.detach().double() * x.shape[0]
            count += x.shape[0]
            if bar is not None:
                bar.update(1)
                if i % 10 == 0 or i == len(loader) - 1:  # .item() syncs a GPU: not every batch
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss_sum / count):.4f}")
        if world_size > 1:
            totals = torch.stack([loss_sum, count])
            dist.all_reduce(totals)
            loss_sum, count = totals[0], totals[1]
        if scheduler is not None:
            scheduler.step()
        history["train_loss"].append(float(loss_sum / count) if float(count) > 0 else float("nan"))
        if eval_fn is not None and val_set is not None:
            history["val"].append(eval_fn(model, val_set))
        history["epoch_seconds"].append(time.perf_counter() - started)
        history["epochs_run"] = epoch + 1
        if checkpoint is not None:
            rng_per_rank = [_rng_state()]
            if world_size > 1:  # every rank's generators, so a resumed run continues each rank's own stream
                rng_per_rank = [None] * world_size
                dist.all_gather_object(rng_per_rank, _rng_state())
            if main:
                _save_checkpoint(
                    checkpoint,
                    model=model.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict() if scheduler is not None else None,
                    epoch=epoch + 1,
                    rng_per_rank=rng_per_rank,
                    history=history,
                    settings=settings,
                )
            if world_size > 1:  # no rank goes on (or resumes in a next fit call) before the file is complete
                dist.barrier()
        if bar is not None and history["val"]:
            # Val keys are prefixed so a "loss" in the eval dict does not clash with the training loss.
            bar.set_postfix(epoch=epoch + 1, loss=f"{history['train_loss'][-1]:.4f}",
                            **{f"val_{k}": f"{v:.4f}" for k, v in history["val"][-1].items()})
    if bar is not None:
        bar.close()
    return history


# ---------------------------------------------------------------- prediction and evaluation

def predict(model: nn.Module, dataset: Dataset, *, batch_size: int = 8, device="cpu") -> Iterator[tuple[object, Tensor]]:
    """Yield ``(model(x), y)`` per batch, in dataset order, on the CPU, in eval mode and without gradients.

    The output keeps the model's structure (a tensor, or a list of per-step tensors). The model's
    training mode is restored when the iteration ends.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                out = model(x.to(device))
                if isinstance(out, (list, tuple)):
                    out = [o.cpu() for o in out]
                else:
                    out = out.cpu()
                yield out, y
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 8,
    device="cpu",
    loss_fn: Callable[[object, Tensor], Tensor] | None = None,
    positive_class: int | None = None,
    output_fn: Callable[[object], Tensor] = final_output,
) -> dict:
    """Metrics of ``model`` on ``dataset``: {"accuracy", "loss" if loss_fn, "f1" if positive_class is set}.

    Predictions are the argmax over dim 1 of ``output_fn(output)`` (default: the last step's logits);
    accuracy and F1 (of ``positive_class``) pool every sample/pixel of the dataset; the loss is the
    sample-weighted mean of ``loss_fn(output, y)`` over batches.
    """
    counts = metrics.BinaryCounts()
    correct = total = 0
    loss_sum = 0.0
    for out, y in predict(model, dataset, batch_size=batch_size, device=device):
        pred = output_fn(out).argmax(dim=1)
        correct += int((pred == y).sum())
        total += y.numel()
        if positive_class is not None:
            counts = counts + metrics.binary_counts(pred, y, positive_class)
        if loss_fn is not None:
            loss_sum += float(loss_fn(out, y)) * y.shape[0]
    result = {"accuracy": correct / total if total else 0.0}
    if loss_fn is not None:
        result["loss"] = loss_sum / len(dataset) if len(dataset) else 0.0
    if positive_class is not None:
        result["f1"] = counts.f1()
    return result
