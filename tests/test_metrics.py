"""fbkernels.metrics: the statistics the experiments report, against scipy."""
import math

import pytest

from fbkernels import metrics

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30, 31, 45, 200])
def test_t_quantile_matches_scipy(df):
    assert metrics.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=2e-4)


def test_paired_difference_matches_scipy():
    a, b = [0.61, 0.72, 0.55, 0.80, 0.47], [0.58, 0.60, 0.57, 0.66, 0.40]
    out = metrics.paired_difference(a, b)
    reference = stats.ttest_rel(a, b)
    assert out["t"] == pytest.approx(reference.statistic)
    assert out["p"] == pytest.approx(reference.pvalue)
    low, high = stats.t.interval(0.95, len(a) - 1, loc=out["mean"], scale=stats.sem([x - y for x, y in zip(a, b)]))
    assert out["ci95"] == pytest.approx([low, high], rel=1e-3)


def test_mean_ci95_of_any_iterable():
    # A generator is read once: it used to give the mean of the values with n = 0 and no interval.
    values = [0.61, 0.72, 0.55, 0.80, 0.47]
    assert metrics.mean_ci95(v for v in values) == metrics.mean_ci95(values)
    assert metrics.mean_ci95(iter(values))["n"] == 5


def test_paired_difference_edge_cases():
    assert math.isnan(metrics.paired_difference([1.0], [0.0])["ci95"][0])
    assert metrics.paired_difference([1.0, 2.0], [0.0, 1.0])["p"] == 0.0  # identical differences
    with pytest.raises(ValueError, match="pair up"):
        metrics.paired_difference([1.0, 2.0], [1.0])


def test_per_image_counts_and_image_averaged_f1_by_hand():
    import torch

    # Image 0: 2 true positives, 1 false positive, 1 false negative -> p = 2/3, r = 2/3.
    # Image 1: nothing predicted, 2 positives -> p = 0 (0/0), r = 0.
    pred = torch.tensor([[[1, 1], [1, 0]], [[0, 0], [0, 0]]])
    target = torch.tensor([[[1, 1], [0, 1]], [[1, 0], [0, 1]]])
    counts = metrics.per_image_counts(pred, target)
    assert counts == [metrics.BinaryCounts(2, 1, 1), metrics.BinaryCounts(0, 0, 2)]
    averaged = metrics.image_averaged_f1(counts)
    assert averaged["precision"] == pytest.approx(1 / 3) and averaged["recall"] == pytest.approx(1 / 3)
    assert averaged["f1"] == pytest.approx(1 / 3)
    # The pooled F1 of the same pixels differs: tp = 2, fp = 1, fn = 3 -> p = 2/3, r = 2/5, F1 = 1/2.
    assert metrics.f1_score(pred, target) == pytest.approx(0.5)
    assert (counts[0] + counts[1]).f1() == pytest.approx(metrics.f1_score(pred, target))
    assert math.isnan(metrics.image_averaged_f1([])["f1"])
    with pytest.raises(ValueError, match="same shape"):
        metrics.per_image_counts(pred, target[:1])
