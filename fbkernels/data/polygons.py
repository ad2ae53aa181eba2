"""Synthetic polygon segmentation data of the Feedback U-Net paper (docs/experiments.md, experiment A).

Each item is one irregular polygon on a blank image, generated as in the authors' code:

- N vertices (default 3) at angles 2 pi n / N around a centre drawn uniformly over the whole image
  (so the polygon may be cut by the border), no random rotation;
- a mean radius drawn uniformly in [size / 10, size / 4], each vertex's radius |Normal(mean, s)| with the
  spread s = 5 px at 512x512 as in the authors' code, scaled with the image by default
  (s = 5 * size / 512, so a 48x48 triangle is as irregular as a 512x512 one; ``radius_std`` in pixels overrides it);
- the polygon filled with 1 on a 0 background and copied to 3 channels;
- Gaussian noise N(0, sigma) added to every pixel and channel, then the whole (3, H, W) image min-max
  normalised to [0, 1].

Item ``i`` returns ``(image [3, H, W] float32, labels [H, W] int64)`` with labels 0 (background) and
1 (polygon). Everything is a function of (seed, i): the shapes never change; a test set's noise is
fixed by the seed; a training set (``train=True``) redraws its noise every epoch, as the authors' code
redraws it at every access, through ``set_epoch(epoch)`` (which ``fbkernels.train.fit`` calls), so runs
stay reproducible and resumable.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from .._settings import check_bool_setting, check_int_setting, check_real_setting

__all__ = ["PolygonDataset", "polygon_vertices", "rasterize_polygon", "default_radius_std"]

# The authors' per-vertex radius spread: 5 px on their 512x512 images.
_AUTHORS_RADIUS_STD, _AUTHORS_IMAGE_SIZE = 5.0, 512


def default_radius_std(image_size: int) -> float:
    """The per-vertex radius spread in pixels for ``image_size``: the authors' 5 px at 512, in proportion."""
    return _AUTHORS_RADIUS_STD * image_size / _AUTHORS_IMAGE_SIZE

# Stream tags: the shape, the fixed test noise and the per-epoch training noise of an item never share draws.
_SHAPE, _TEST_NOISE, _TRAIN_NOISE = 0, 1, 2


def polygon_vertices(rng: np.random.Generator, size: int, num_vertices: int = 3, radius_std: float = 5.0) -> np.ndarray:
    """(N, 2) array of (row, col) vertices of one random polygon in a ``size x size`` image."""
    mean_radius = rng.uniform(size / 10.0, size / 4.0)
    radii = np.abs(rng.normal(mean_radius, radius_std, size=num_vertices))
    centre = rng.uniform(0.0, size, size=2)
    angles = 2.0 * math.pi * np.arange(num_vertices) / num_vertices
    return np.stack([centre[0] + radii * np.sin(angles), centre[1] + radii * np.cos(angles)], axis=1)


def rasterize_polygon(vertices: np.ndarray, size: int) -> np.ndarray:
    """[size, size] uint8 mask, 1 where the pixel centre (row, col integer coordinates) lies inside the polygon.

    Even-odd rule: count the polygon edges crossed by a ray from each pixel centre towards +col.
    """
    rows = np.arange(size, dtype=np.float64)[:, None]
    cols = np.arange(size, dtype=np.float64)[None, :]
    inside = np.zeros((size, size), dtype=bool)
    n = len(vertices)
    for a in range(n):
        (r0, c0), (r1, c1) = vertices[a], vertices[(a + 1) % n]
        if r0 == r1:
            continue  # a horizontal edge is never crossed by a horizontal ray
        spans = (r0 > rows) != (r1 > rows)  # [size, 1]: the edge straddles this row
        crossing_col = c0 + (rows - r0) * (c1 - c0) / (r1 - r0)
        inside ^= spans & (cols < crossing_col)
    return inside.astype(np.uint8)


class PolygonDataset(Dataset):
    """``size`` noisy polygon images with per-pixel labels; see the module docstring for the generation.

    Args:
        size: number of items.
        image_size: height = width in pixels (the authors used 512).
        sigma: standard deviation of the Gaussian input noise (before min-max normalisation).
        seed: selects the shapes and noise; two datasets with different seeds share nothing.
        train: redraw the noise every epoch (``set_epoch``) instead of fixing it by the seed.
        num_vertices: the polygon's vertex count.
        radius_std: the per-vertex radius spread in pixels; None (default) scales the authors' 5 px at
            512x512 with the image, ``default_radius_std(image_size)`` = 5 * image_size / 512.
        channels: the number of identical input channels.
    """

    num_classes = 2

    def __init__(
        self,
        size: int,
        *,
        image_size: int = 64,
        sigma: float = 0.0,
        seed: int = 0,
        train: bool = False,
        num_vertices: int = 3,
        radius_std: float | None = None,
        channels: int = 3,
    ):
        check_real_setting("radius_std", radius_std, 0, optional=True)
        # Counts and the seed are ints: int() would silently truncate 10.7 items to 10 or seed 1.5 to 1, and a
        # negative seed would only fail at the first item (SeedSequence takes no negative entropy).
        for name, value, minimum in (("size", size, 0), ("image_size", image_size, 1), ("seed", seed, 0),
                                     ("num_vertices", num_vertices, 3), ("channels", channels, 1)):
            check_int_setting(name, value, minimum)
        # A NaN sigma failed the "sigma > 0" test in __getitem__ and gave noiseless images; inf gave NaN images.
        check_real_setting("sigma", sigma, 0)
        check_bool_setting("train", train)
        self.size, self.image_size, self.sigma, self.seed = int(size), int(image_size), float(sigma), int(seed)
        self.radius_std = default_radius_std(self.image_size) if radius_std is None else float(radius_std)
        self.train, self.num_vertices, self.channels = bool(train), int(num_vertices), int(channels)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the training noise of ``epoch`` (no effect on a test set, whose noise is fixed)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def _rng(self, *tags: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, *tags]))

    def mask(self, index: int) -> np.ndarray:
        """The noiseless [H, W] uint8 polygon mask of item ``index`` (its labels)."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size} items")
        vertices = polygon_vertices(self._rng(_SHAPE, index), self.image_size, self.num_vertices, self.radius_std)
        return rasterize_polygon(vertices, self.image_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        mask = self.mask(index)
        image = np.broadcast_to(mask.astype(np.float32), (self.channels, *mask.shape)).copy()
        if self.sigma > 0:
            rng = self._rng(_TRAIN_NOISE, index, self.epoch) if self.train else self._rng(_TEST_NOISE, index)
            image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(self.sigma)
        low, high = image.min(), image.max()
        # An image of one value (a polygon entirely outside the frame, no noise) stays constant at 0.
        image = (image - low) / (high - low) if high > low else image - low
        return torch.from_numpy(image), torch.from_numpy(mask.astype(np.int64))

    def labels(self) -> torch.Tensor:
        """All items' labels stacked: [size, H, W] int64 (no noise is generated)."""
        if self.size == 0:
            return torch.zeros((0, self.image_size, self.image_size), dtype=torch.int64)
        return torch.from_numpy(np.stack([self.mask(i) for i in range(self.size)]).astype(np.int64))

    def __repr__(self) -> str:
        return (f"PolygonDataset(size={self.size}, image_size={self.image_size}, sigma={self.sigma}, "
                f"seed={self.seed}, train={self.train}, radius_std={self.radius_std:g})")
