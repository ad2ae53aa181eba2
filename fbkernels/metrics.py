"""Evaluation metrics shared by the experiments: confusion counts, F1 of one class, accuracy, random baseline.

Predictions and targets are integer class-index tensors of the same shape (any shape: [B] for
classification, [B, H, W] for segmentation); counts are pooled over every element, so an F1 over a
test set is the F1 of all its pixels together (micro average), not a mean of per-image F1s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


@dataclass
class BinaryCounts:
    """True positives, false positives and false negatives of one class, pooled over many elements."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: "BinaryCounts") -> "BinaryCounts":
        return BinaryCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def f1(self, eps: float = 1e-8) -> float:
        """2 p r / (p + r + eps), with p = tp / (tp + fp) and r = tp / (tp + fn) (0 / 0 read as 0)."""
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        return 2.0 * precision * recall / (precision + recall + eps)


def binary_counts(pred: Tensor, target: Tensor, positive: int = 1) -> BinaryCounts:
    """Confusion counts of class ``positive`` for integer predictions and targets of the same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    is_pred, is_true = pred == positive, target == positive
    tp = int((is_pred & is_true).sum())
    return BinaryCounts(tp=tp, fp=int(is_pred.sum()) - tp, fn=int(is_true.sum()) - tp)


def f1_score(pred: Tensor, target: Tensor, positive: int = 1, eps: float = 1e-8) -> float:
    """F1 of class ``positive``: 2 p r / (p + r + eps) over all elements of pred/target (class indices)."""
    return binary_counts(pred, target, positive).f1(eps)


def accuracy(pred: Tensor, target: Tensor) -> float:
    """Fraction of elements where the predicted class index equals the target."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return float((pred == target).float().mean()) if target.numel() else 0.0


def class_prior(targets: Tensor, positive: int = 1) -> float:
    """Fraction of elements of ``targets`` that belong to class ``positive``."""
    return float((targets == positive).float().mean()) if targets.numel() else 0.0


def random_baseline_f1(test_prior: float, predict_prior: float | None = None, eps: float = 1e-8) -> float:
    """Expected F1 of a predictor that labels each element positive at random with probability ``predict_prior``.

    Its expected precision is the test set's positive fraction ``test_prior`` and its expected recall is
    ``predict_prior`` (the class prior the predictor knows; by default the test prior itself), so the F1 is
    2 p q / (p + q + eps): with one prior for both, simply that prior.
    """
    q = test_prior if predict_prior is None else predict_prior
    return 2.0 * test_prior * q / (test_prior + q + eps)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) of a list of floats."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)
