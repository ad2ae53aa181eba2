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


def test_paired_difference_edge_cases():
    assert math.isnan(metrics.paired_difference([1.0], [0.0])["ci95"][0])
    assert metrics.paired_difference([1.0, 2.0], [0.0, 1.0])["p"] == 0.0  # identical differences
    with pytest.raises(ValueError, match="pair up"):
        metrics.paired_difference([1.0, 2.0], [1.0])
