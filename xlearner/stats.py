"""Means and confidence intervals over seeds: Student-t intervals, paired differences.

A run trained once per seed gives each report row a sample of scores; the interval of
its mean is the t-interval ``mean +- t(1 - alpha/2, n - 1) * sd / sqrt(n)``. A comparison
of two rows pairs their scores by seed (same data, same initial randomness where the
variants share it), so its interval is the t-interval of the per-seed differences,
which is narrower than comparing two unpaired intervals when the seeds move both rows
the same way.

The t quantile comes from the closed form of the t distribution's CDF for an integer
number of degrees of freedom (Abramowitz & Stegun 26.7.3-4), inverted by bisection: no
scipy needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from statistics import fmean, stdev

CONFIDENCE = 0.95
_BISECTION_STEPS = 200


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values and its two-sided confidence interval (``None`` below two
    values: one seed says nothing about the spread)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else self.high - self.mean

    def as_dict(self) -> dict:
        return asdict(self)


def t_central_probability(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with ``df`` (integer >= 1) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be an integer >= 1; got {df!r}")
    t = abs(t)
    theta = math.atan(t / math.sqrt(df))
    cos2, sin = math.cos(theta) ** 2, math.sin(theta)
    total = 0.0
    if df % 2 == 1:  # 2/pi * (theta + sin * (cos + 2/3 cos^3 + ... up to cos^(df-2)))
        term = math.cos(theta)
        for j in range((df - 1) // 2):
            total += term
            term *= cos2 * (2 * j + 2) / (2 * j + 3)
        return 2 / math.pi * (theta + sin * total)
    term = 1.0  # sin * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
    for j in range(df // 2):
        total += term
        term *= cos2 * (2 * j + 1) / (2 * j + 2)
    return sin * total


def t_quantile(confidence: float, df: int) -> float:
    """The ``t`` with P(|T| < t) = ``confidence``: the multiplier of a two-sided interval
    (the ``1 - (1 - confidence)/2`` quantile; 12.706 for 95% and one degree of freedom)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence!r}")
    low, high = 0.0, 1.0
    while t_central_probability(high, df) < confidence:
        high *= 2.0
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if t_central_probability(middle, df) < confidence:
            low = middle
        else:
            high = middle
        if high - low < 1e-12:
            break
    return (low + high) / 2


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` and its t-interval."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval needs at least one value")
    mean, n = fmean(values), len(values)
    if n < 2:
        return Interval(mean, None, None, n, confidence)
    half = t_quantile(confidence, n - 1) * stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, confidence)


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE
) -> Interval:
    """``a - b`` paired by seed (the keys both have): the mean difference and its t-interval."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("paired_difference needs at least one seed measured in both")
    return mean_interval([a[s] - b[s] for s in seeds], confidence)
