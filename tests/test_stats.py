"""jopd.report.stats against scipy and float64 formulas: t quantiles and CDF, t intervals over seeds, paired
differences, the unbiased pass@k estimator."""

from __future__ import annotations

import math
from math import comb

import numpy as np
import pytest

from jopd.report import stats

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 12, 30, 250, 10_000])
def test_t_quantile_and_cdf_match_scipy(df: int) -> None:
    for p in (0.5, 0.51, 0.6, 0.75, 0.9, 0.95, 0.975, 0.99, 0.995, 0.9995, 0.025, 0.001):
        assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9, abs=1e-12)
    for t in (-40.0, -3.1, -1.0, -0.2, 0.0, 0.3, 1.7, 2.5, 12.0, 300.0):
        assert stats.t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), rel=1e-10, abs=1e-14)


def test_t_functions_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="p must be"):
        stats.t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_cdf(1.0, 0)


@pytest.mark.parametrize("n", [2, 3, 5, 20])
def test_mean_interval_matches_scipy_t_interval(n: int) -> None:
    rng = np.random.default_rng(n)
    values = rng.normal(0.6, 0.05, n)
    for confidence in (0.9, 0.95, 0.99):
        iv = stats.mean_interval(values.tolist(), confidence)
        low, high = scipy_stats.t.interval(confidence, n - 1, loc=values.mean(), scale=scipy_stats.sem(values))
        assert iv.mean == pytest.approx(values.mean(), rel=1e-12)
        assert iv.low == pytest.approx(low, rel=1e-9) and iv.high == pytest.approx(high, rel=1e-9)
        assert iv.sd == pytest.approx(values.std(ddof=1), rel=1e-12)
        assert iv.se == pytest.approx(scipy_stats.sem(values), rel=1e-12)
        assert iv.contains(values.mean()) and not iv.contains(high + 1e-6)


def test_mean_interval_of_one_value_has_no_width() -> None:
    iv = stats.mean_interval([0.7])
    assert iv.mean == 0.7 and iv.half_width is None and iv.low is None and iv.contains(0.7) is None
    assert iv.format() == "0.700"
    with pytest.raises(ValueError, match="at least one"):
        stats.mean_interval([])


def test_paired_interval_is_the_interval_of_the_differences() -> None:
    rng = np.random.default_rng(3)
    old = rng.uniform(0.3, 0.6, 4)
    new = old + rng.normal(0.05, 0.01, 4)
    iv = stats.paired_interval(new.tolist(), old.tolist())
    res = scipy_stats.ttest_rel(new, old)
    ci = res.confidence_interval(0.95)
    assert iv.mean == pytest.approx((new - old).mean(), rel=1e-12)
    assert iv.low == pytest.approx(ci.low, rel=1e-9) and iv.high == pytest.approx(ci.high, rel=1e-9)
    # The paired t statistic is mean / se.
    assert iv.mean / iv.se == pytest.approx(res.statistic, rel=1e-9)
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_interval([1.0], [1.0, 2.0])


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    for n in (1, 2, 4, 8, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert stats.pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    assert stats.pass_at_k(4, 0, 4) == 0.0 and stats.pass_at_k(4, 1, 4) == 1.0
    assert stats.pass_at_k(4, 2, 1) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        stats.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        stats.pass_at_k(4, 1, 5)


def test_pass_at_k_is_unbiased_by_simulation() -> None:
    """E[pass@k estimate from n samples] = 1 - (1 - p)^k for a prompt solved with probability p."""
    rng = np.random.default_rng(0)
    n, k, p = 8, 4, 0.3
    counts = rng.binomial(n, p, size=200_000)
    table = np.array([stats.pass_at_k(n, c, k) for c in range(n + 1)])
    est = table[counts].mean()
    assert est == pytest.approx(1 - (1 - p) ** k, abs=3e-3)


def test_pass_at_k_estimate_interval_over_prompts() -> None:
    counts = [0, 1, 4, 2, 3, 4, 0, 1]
    iv = stats.pass_at_k_estimate(counts, 4, 2)
    per = np.array([1 - comb(4 - c, 2) / comb(4, 2) for c in counts])
    low, high = scipy_stats.t.interval(0.95, len(per) - 1, loc=per.mean(), scale=scipy_stats.sem(per))
    assert iv.mean == pytest.approx(per.mean()) and iv.low == pytest.approx(low) and iv.high == pytest.approx(high)
    assert stats.pass_at_k_estimate(counts, 4, 1).mean == pytest.approx(np.mean(counts) / 4)


def test_compare_accuracy_paired_standard_errors() -> None:
    new, old = [1.0, 0.75, 0.5, 1.0], [0.5, 0.75, 0.25, 0.5]
    diff = np.subtract(new, old)
    z = diff.mean() / (diff.std(ddof=1) / math.sqrt(len(diff)))
    text = stats.compare_accuracy(float(np.mean(new)), float(np.mean(old)), 4, new, old)
    assert f"{z:.1f} paired standard errors on 4 prompts" in text and text.startswith("improved")
