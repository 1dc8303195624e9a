"""The statistics of ``aplot-kernels train`` against SciPy: Student's t, summaries, paired t-intervals; seeds parsing."""

from __future__ import annotations

import random
import statistics

import pytest

from aplot_kernels.train import stats
from aplot_kernels.train.run import parse_seeds

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 13, 32, 101])
def test_t_distribution_matches_scipy(df):
    rng = random.Random(df)
    for t in [0.0, 1e-3, 0.7, 2.0, 12.0] + [rng.uniform(0, 6) for _ in range(5)]:
        assert stats.t_two_sided_mass(t, df) == pytest.approx(2 * scipy_stats.t.cdf(t, df) - 1, abs=1e-12)
    for level in (0.5, 0.9, 0.95, 0.99):
        assert stats.t_quantile(level, df) == pytest.approx(scipy_stats.t.ppf(0.5 + level / 2, df), rel=1e-9)


def test_summarize_skips_missing_values():
    rng = random.Random(0)
    xs = [rng.gauss(0.8, 0.05) for _ in range(7)]
    out = stats.summarize(xs[:3] + [None, float("nan")] + xs[3:])
    assert out["n"] == 7
    assert out["mean"] == pytest.approx(statistics.fmean(xs), rel=1e-12)
    assert out["sd"] == pytest.approx(statistics.stdev(xs), rel=1e-12)
    assert (out["min"], out["max"]) == (min(xs), max(xs))
    assert stats.summarize([None])["mean"] is None
    assert stats.summarize([0.5])["sd"] is None


@pytest.mark.parametrize("n", [2, 3, 5, 11])
def test_paired_interval_matches_scipy_ttest_rel(n):
    rng = random.Random(n)
    base = [rng.uniform(0.7, 0.9) for _ in range(n)]
    other = [b + rng.gauss(0.01, 0.02) for b in base]
    out = stats.paired_difference(base, other, level=0.95)
    ci = scipy_stats.ttest_rel(other, base).confidence_interval(0.95)
    assert out["n"] == n
    assert out["mean"] == pytest.approx(statistics.fmean(o - b for o, b in zip(other, base)), rel=1e-12)
    assert out["lo"] == pytest.approx(ci.low, rel=1e-9, abs=1e-12)
    assert out["hi"] == pytest.approx(ci.high, rel=1e-9, abs=1e-12)


def test_paired_difference_drops_seeds_with_a_missing_value():
    base, other = [10, None, 30, 20], [20, 40, None, 50]
    out = stats.paired_difference(base, other)
    assert out["n"] == 2 and out["mean"] == 20
    ci = scipy_stats.ttest_rel([20, 50], [10, 20]).confidence_interval(0.95)
    assert out["lo"] == pytest.approx(ci.low) and out["hi"] == pytest.approx(ci.high)
    one = stats.paired_difference([1.0, None], [2.0, 3.0])
    assert one["n"] == 1 and one["mean"] == 1.0 and one["lo"] is None and one["hi"] is None
    with pytest.raises(ValueError, match="baseline"):
        stats.paired_difference([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="df"):
        stats.t_quantile(0.95, 0)
    with pytest.raises(ValueError, match="level"):
        stats.t_quantile(1.0, 3)


def test_parse_seeds():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("4,1") == [4, 1]
    assert parse_seeds("7,") == [7]
    for bad in ("0", "", "a", "1,1", "-1,2"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)
