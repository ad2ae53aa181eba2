"""A small synthetic image classification set: the CBL quick preset's fallback when no real data is given.

Each class has a prototype, a smooth random pattern [channels, size, size] (a 4x4 Gaussian grid
upsampled bilinearly, unit variance) fixed by ``task_seed``, so every split poses the same task. An item
of class y is

    x = c * roll(P_y, shift_1) + m * roll(P_other, shift_2) + noise

with contrast c ~ U[0.5, 1.5], a distractor of another random class with weight m ~ U[0, max_distractor],
circular shifts of up to ``max_shift`` pixels per axis and Gaussian pixel noise N(0, noise). Items are
drawn once from ``seed`` (deterministic): (float32 [channels, size, size], int label), labels balanced.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .._settings import check_choice, check_int_setting, check_real_setting

__all__ = ["SyntheticClassification", "synthetic_classification", "SPLIT_SEEDS"]

# Distinct sample seeds per split (the task itself is fixed by task_seed).
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}


def _prototypes(num_classes: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.randn(num_classes, channels, 4, 4, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    smooth = smooth - smooth.mean(dim=(1, 2, 3), keepdim=True)
    return smooth / smooth.std(dim=(1, 2, 3), keepdim=True)


class SyntheticClassification(Dataset):
    """``num_samples`` items (float32 [channels, size, size], int label in 0..num_classes-1); see module doc."""

    def __init__(self, num_samples: int, *, num_classes: int = 10, channels: int = 3, size: int = 16,
                 noise: float = 1.0, max_shift: int = 3, max_distractor: float = 0.7, seed: int = 0,
                 task_seed: int = 1234):
        # Checked here under the user's names: torch's own errors (randperm of a float, random_ "from >= to" for a
        # negative max_shift) named none, and a NaN noise gave NaN images.
        for name, value, minimum in (("num_samples", num_samples, 0), ("num_classes", num_classes, 2),
                                     ("channels", channels, 1), ("size", size, 1), ("max_shift", max_shift, 0)):
            check_int_setting(name, value, minimum)
        if channels * size * size < 2:
            raise ValueError(f"need channels * size * size >= 2 (a one-value prototype has no unit variance), got "
                             f"channels={channels}, size={size}")
        check_real_setting("noise", noise, 0)
        check_real_setting("max_distractor", max_distractor, 0)
        task = torch.Generator().manual_seed(task_seed)
        prototypes = _prototypes(num_classes, channels, size, task)
        gen = torch.Generator().manual_seed(seed)
        labels = torch.arange(num_samples) % num_classes
        labels = labels[torch.randperm(num_samples, generator=gen)]
        others = (labels + torch.randint(1, num_classes, (num_samples,), generator=gen)) % num_classes
        contrast = torch.empty(num_samples, 1, 1, 1).uniform_(0.5, 1.5, generator=gen)
        distractor = torch.empty(num_samples, 1, 1, 1).uniform_(0.0, max_distractor, generator=gen)
        shifts = torch.randint(-max_shift, max_shift + 1, (num_samples, 4), generator=gen)
        images = torch.empty(num_samples, channels, size, size)
        for i in range(num_samples):
            target = prototypes[labels[i]].roll((int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
            other = prototypes[others[i]].roll((int(shifts[i, 2]), int(shifts[i, 3])), dims=(1, 2))
            images[i] = contrast[i] * target + distractor[i] * other
        images += noise * torch.randn(images.shape, generator=gen)
        self.images, self.labels = images, labels
        self.num_classes, self.in_channels, self.size = num_classes, channels, size
        self.classes = tuple(f"class_{c}" for c in range(num_classes))

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def synthetic_classification(split: str, num_samples: int, *, seed: int = 0, **kwargs) -> SyntheticClassification:
    """The ``split`` ("train" | "val" | "test") of the synthetic task: sample seed = 1000 * seed + split offset."""
    check_choice("split", split, SPLIT_SEEDS)
    return SyntheticClassification(num_samples, seed=1000 * seed + SPLIT_SEEDS[split], **kwargs)
