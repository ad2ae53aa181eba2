"""Evaluation metrics shared by the experiments: confusion counts, F1 of one class, accuracy, random baseline.

Predictions and targets are integer class-index tensors of the same shape (any shape: [B] for
classification, [B, H, W] for segmentation); counts are pooled over every element, so an F1 over a
test set is the F1 of all its pixels together (micro average), not a mean of per-image F1s.
``per_image_counts`` and ``image_averaged_f1`` give the other reading, the authors' evaluation of the Feedback
U-Net (docs/experiments.md section A): precision and recall per image, averaged over the images, and the F1 of
those two means.
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
        precision, recall = self.precision(), self.recall()
        return 2.0 * precision * recall / (precision + recall + eps)

    def precision(self) -> float:
        """tp / (tp + fp), 0 when nothing is predicted positive."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    def recall(self) -> float:
        """tp / (tp + fn), 0 when nothing is positive."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0


def binary_counts(pred: Tensor, target: Tensor, positive: int = 1) -> BinaryCounts:
    """Confusion counts of class ``positive`` for integer predictions and targets of the same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    is_pred, is_true = pred == positive, target == positive
    tp = int((is_pred & is_true).sum())
    return BinaryCounts(tp=tp, fp=int(is_pred.sum()) - tp, fn=int(is_true.sum()) - tp)


def per_image_counts(pred: Tensor, target: Tensor, positive: int = 1) -> list[BinaryCounts]:
    """Confusion counts of class ``positive`` for each image: pred, target [N, ...] -> N BinaryCounts."""
    if pred.shape != target.shape or pred.dim() < 1:
        raise ValueError(f"pred and target must have the same shape [N, ...], got {tuple(pred.shape)} and {tuple(target.shape)}")
    is_pred, is_true = (pred == positive).flatten(1), (target == positive).flatten(1)
    tp = (is_pred & is_true).sum(1).tolist()
    predicted, actual = is_pred.sum(1).tolist(), is_true.sum(1).tolist()
    return [BinaryCounts(tp=a, fp=p - a, fn=t - a) for a, p, t in zip(tp, predicted, actual)]


def image_averaged_f1(counts, eps: float = 1e-8) -> dict:
    """{"precision", "recall", "f1"}: the mean over images of the per-image precision and recall, and
    2 P R / (P + R + eps) of those means (the authors' averaging; 0 / 0 read as 0 per image, where their code
    adds 1e-3 to each denominator). NaNs for no images."""
    counts = list(counts)
    if not counts:
        return {"precision": math.nan, "recall": math.nan, "f1": math.nan}
    precision = sum(c.precision() for c in counts) / len(counts)
    recall = sum(c.recall() for c in counts) / len(counts)
    return {"precision": precision, "recall": recall, "f1": 2.0 * precision * recall / (precision + recall + eps)}


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


# Two-sided 95% quantiles of Student's t distribution, t_{0.975}(df) for df = 1..30; beyond 30 the
# interval uses the normal quantile's t-approximation below (error < 0.5% of the half-width).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """t_{0.975}(df): the factor of the standard error in a two-sided 95% confidence interval of a mean."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion of t around the normal quantile z_{0.975}
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci95(values) -> dict:
    """{"mean", "std", "n", "ci95": [low, high]} of a list of floats; the 95% interval of the mean from Student's t
    (NaN bounds for fewer than 2 values)."""
    values = [float(v) for v in values]  # once: a generator read by mean_std would be empty when counted
    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return {"mean": mean, "std": std, "n": n, "ci95": [math.nan, math.nan]}
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci95": [mean - half, mean + half]}


def paired_difference(a, b) -> dict:
    """Statistics of the paired differences a[i] - b[i] (runs sharing seed i): mean, std, n, 95% CI and the
    two-sided paired t statistic and p-value (p only when scipy is installed, else NaN)."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) != len(b):
        raise ValueError(f"a and b must pair up, got {len(a)} and {len(b)} values")
    diffs = [x - y for x, y in zip(a, b)]
    out = mean_ci95(diffs)
    n, mean, std = out["n"], out["mean"], out["std"]
    if n < 2:
        out.update(t=math.nan, p=math.nan)
    elif std == 0.0:
        out.update(t=math.copysign(math.inf, mean) if mean else math.nan, p=0.0 if mean else 1.0)
    else:
        t = mean / (std / math.sqrt(n))
        try:
            from scipy import stats

            p = float(2 * stats.t.sf(abs(t), n - 1))
        except ImportError:
            p = math.nan
        out.update(t=t, p=p)
    return out
