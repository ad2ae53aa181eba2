"""CIFAR-10 reader for the standard "python version" batches (no download).

``cifar10(root, split)`` reads ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` from
``root/cifar-10-batches-py/`` or from ``root`` itself. Each file is a pickled dict with ``b"data"``
(uint8 [N, 3072], the 1024 red, then green, then blue values of a 32x32 image in row-major order) and
``b"labels"`` (N ints in 0..9). Splits: "train" (45,000) and "val" (5,000) are a stratified split of
the 50,000 training images (per class a fixed-seed permutation, 10% of the class to validation:
500 per class on the full set, proportionally fewer on smaller files), "test" is ``test_batch``.
Items are (normalised float32 image [3, 32, 32], int label).
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from torch.utils.data import Dataset

from .._settings import check_bool_setting, check_choice, check_real_setting

__all__ = ["CIFAR10", "cifar10", "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "stratified_split"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
VAL_FRACTION = 5_000 / 50_000
SPLITS = ("train", "val", "test")


def _find_batches_dir(root) -> str:
    root = os.fspath(root)
    for candidate in (os.path.join(root, "cifar-10-batches-py"), root):
        if os.path.isfile(os.path.join(candidate, TEST_FILE)) or os.path.isfile(os.path.join(candidate, TRAIN_FILES[0])):
            return candidate
    if not os.path.isdir(root):
        raise FileNotFoundError(f"CIFAR-10 root {root!r} does not exist")
    raise FileNotFoundError(
        f"no CIFAR-10 python batches under {root!r}: expected {', '.join(TRAIN_FILES)} and {TEST_FILE} "
        f"in {os.path.join(root, 'cifar-10-batches-py')!r} or in {root!r} itself"
    )


def _read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) of one pickled batch file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR-10 batch file {path!r} is missing")
    try:
        with open(path, "rb") as file:
            batch = pickle.load(file, encoding="bytes")
    except Exception as error:  # a truncated or foreign file: unpickling fails in many ways
        raise ValueError(f"{path!r} is not a CIFAR-10 python batch (unpickling failed: {error})") from error
    if not isinstance(batch, dict):
        raise ValueError(f"{path!r} is not a CIFAR-10 python batch: expected a pickled dict, got {type(batch).__name__}")
    # Files written by Python 3 tools may use str keys; the official ones use bytes.
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path!r} is not a CIFAR-10 python batch: it needs 'data' and 'labels' entries, has {list(batch)}")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path!r}: 'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
    # Class indices: a float label (0.5) would be truncated by astype(int64), a bool counted as class 0 or 1.
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path!r}: 'labels' must be integer class indices in 0..9, got dtype {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path!r}: 'labels' must hold one label per image ({data.shape[0]}), got shape {list(labels.shape)}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path!r}: labels must be in 0..9, got range {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def stratified_split(labels: np.ndarray, val_fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_indices, val_indices), sorted: per class a seeded permutation, round(n_c * val_fraction)
    of its n_c items to validation (at least one when the class has two or more items)."""
    # Outside [0, 1] the clamp below would silently turn any fraction into "one item" or "all but one".
    check_real_setting("val_fraction", val_fraction, 0, maximum=1)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        permuted = members[rng.permutation(members.size)]
        n_val = int(round(members.size * val_fraction))
        if members.size >= 2:
            n_val = min(max(n_val, 1), members.size - 1)
        else:
            n_val = 0
        val.append(permuted[:n_val])
        train.append(permuted[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class CIFAR10(Dataset):
    """CIFAR-10 split as a Dataset of (float32 [3, 32, 32] normalised with CIFAR10_MEAN/STD, int label).

    augment (train only by default): random crop 32x32 from the 4-pixel zero-padded image and random
    horizontal flip, drawn from torch's global RNG (seeded per DataLoader worker by PyTorch).
    """

    def __init__(self, root, split: str = "train", *, augment: bool | None = None, seed: int = 0,
                 val_fraction: float = VAL_FRACTION):
        check_choice("split", split, SPLITS)
        check_bool_setting("augment", augment, optional=True)  # bool("no") is True
        directory = _find_batches_dir(root)
        if split == "test":
            images, labels = _read_batch(os.path.join(directory, TEST_FILE))
        else:
            parts = [_read_batch(os.path.join(directory, name)) for name in TRAIN_FILES]
            images = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            train_idx, val_idx = stratified_split(labels, val_fraction, seed)
            keep = train_idx if split == "train" else val_idx
            images, labels = images[keep], labels[keep]
        self.root, self.split = directory, split
        self.augment = (split == "train") if augment is None else bool(augment)
        self.images = torch.from_numpy(np.ascontiguousarray(images))  # uint8 [N, 3, 32, 32]
        self.labels = torch.from_numpy(labels)
        self.classes = CIFAR10_CLASSES
        self.num_classes, self.in_channels = len(CIFAR10_CLASSES), 3
        self._mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        self._std = torch.tensor(CIFAR10_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = (self.images[index].to(torch.float32) / 255.0 - self._mean) / self._std
        if self.augment:
            # Pad after normalising, so the border is 0 in the normalised space (the mean colour).
            padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            image = padded[:, top:top + 32, left:left + 32]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return image.contiguous(), int(self.labels[index])


def cifar10(root, split: str = "train", *, augment: bool | None = None, seed: int = 0) -> CIFAR10:
    """The CIFAR-10 ``split`` ("train" | "val" | "test") read from ``root``; see ``CIFAR10``."""
    return CIFAR10(root, split, augment=augment, seed=seed)
