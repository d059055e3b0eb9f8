"""Intervals over seeds (xlearner/stats.py): hand-computed values and scipy."""

from __future__ import annotations

import math

import pytest

from xlearner.stats import (
    Interval,
    mean_interval,
    paired_difference,
    t_central_probability,
    t_quantile,
)


@pytest.mark.parametrize(
    ("df", "quantile"),
    # the 97.5% quantiles of Student's t as every table prints them
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)],
)
def test_t_quantile_matches_the_printed_table(df, quantile):
    assert t_quantile(0.95, df) == pytest.approx(quantile, abs=5e-4)


def test_t_distribution_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 7, 10, 29, 100):
        for t in (0.1, 0.7, 1.3, 2.5, 6.0):
            expected = stats.t.cdf(t, df) - stats.t.cdf(-t, df)
            assert t_central_probability(t, df) == pytest.approx(expected, abs=1e-12)
        for confidence in (0.8, 0.9, 0.95, 0.99):
            expected = stats.t.ppf(1 - (1 - confidence) / 2, df)
            assert t_quantile(confidence, df) == pytest.approx(expected, rel=1e-9)


def test_closed_forms_for_one_and_two_degrees_of_freedom():
    # df=1 is Cauchy: P(|T| < t) = 2 atan(t) / pi; df=2: t / sqrt(2 + t^2)
    assert t_central_probability(1.0, 1) == pytest.approx(0.5)
    assert t_central_probability(3.0, 2) == pytest.approx(3 / math.sqrt(11))


def test_mean_interval_by_hand():
    # 54, 55, 57: mean 55.333, sd 1.5275, t(0.975, 2) = 4.3027 -> half-width 3.7946
    interval = mean_interval([54.0, 55.0, 57.0])
    assert interval.mean == pytest.approx(55.3333, abs=1e-4)
    assert interval.half_width == pytest.approx(4.302653 * 1.527525 / math.sqrt(3), abs=1e-5)
    assert interval.low == pytest.approx(55.3333 - 3.79462, abs=1e-4)
    assert interval.n == 3 and interval.confidence == 0.95


def test_mean_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    values = [48.8, 51.0, 53.9, 50.2, 49.5]
    low, high = stats.t.interval(
        0.95, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values)
    )
    interval = mean_interval(values)
    assert (interval.low, interval.high) == (pytest.approx(low), pytest.approx(high))


def test_one_value_has_no_interval_and_equal_values_a_point():
    assert mean_interval([52.0]) == Interval(52.0, None, None, 1)
    same = mean_interval([50.0, 50.0, 50.0])
    assert same.low == same.high == 50.0
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])


def test_paired_difference_pairs_by_seed():
    # the same seeds move both rows: paired, the difference is certain; unpaired, it is not
    a = {0: 55.0, 1: 60.0, 2: 50.0}
    b = {2: 48.0, 0: 53.0, 1: 58.0, 7: 99.0}  # seed 7 has no partner: left out
    diff = paired_difference(a, b)
    assert diff == Interval(2.0, 2.0, 2.0, 3)
    wide = mean_interval(a.values())
    assert wide.low < mean_interval([53.0, 58.0, 48.0]).high  # the unpaired intervals overlap


def test_paired_difference_by_hand_and_against_scipy():
    a, b = {0: 55.7, 1: 53.8, 2: 56.1}, {0: 51.0, 1: 52.0, 2: 52.9}
    # differences 4.7, 1.8, 3.2: mean 3.2333, sd 1.4503, half-width 4.3027 * 1.4503 / sqrt(3)
    diff = paired_difference(a, b)
    assert diff.mean == pytest.approx(3.23333, abs=1e-5)
    assert diff.half_width == pytest.approx(4.302653 * 1.450287 / math.sqrt(3), abs=1e-4)
    stats = pytest.importorskip("scipy.stats")
    result = stats.ttest_rel([a[s] for s in a], [b[s] for s in a])
    low, high = result.confidence_interval(0.95)
    assert (diff.low, diff.high) == (pytest.approx(low), pytest.approx(high))
    with pytest.raises(ValueError, match="at least one seed"):
        paired_difference({0: 1.0}, {1: 1.0})


@pytest.mark.parametrize("df", [0, -1, 1.5])
def test_degrees_of_freedom_must_be_a_positive_integer(df):
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_central_probability(1.0, df)
