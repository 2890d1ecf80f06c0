"""Intervals over seeds, as docs/results.md reports them: a mean with its t interval, and paired
differences between two methods run on the same seeds (the same splits).

With ``n`` values of sample standard deviation ``s``, the 95% interval of the mean is
``mean ± t(0.975, n - 1) * s / sqrt(n)``. A paired difference takes, for every seed both methods
ran, ``d = a - b`` and gives the same interval over the ``d``, with wins, ties and losses counted
in the metric's own direction.

Example:
    >>> mean_ci([0.80, 0.82, 0.84]).half_width      # t(0.975, 2) * 0.02 / sqrt(3)
    0.0496...
    >>> paired({0: 0.9, 1: 0.8}, {0: 0.7, 1: 0.8}).wins
    1
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and its confidence interval (``nan`` bounds when ``n < 2``)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def format(self, digits: int = 4, scale: float = 1.0) -> str:
        """``mean ± half width``, e.g. ``0.8200 ± 0.0496`` (``mean`` alone for one value)."""
        if self.n == 0:
            return ""
        if self.n < 2:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.half_width * scale:.{digits}f}"


@dataclass(frozen=True)
class Paired(Interval):
    """A paired difference ``a - b`` over the seeds both ran, with wins, ties and losses of ``a``."""

    wins: int = 0
    ties: int = 0
    losses: int = 0

    @property
    def record(self) -> str:
        """``wins/ties/losses``."""
        return f"{self.wins}/{self.ties}/{self.losses}"


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` and its two-sided t interval.

    Args:
        values: one value per seed.
        confidence: the interval's coverage (0.95 gives the 95% interval).

    Returns:
        The :class:`Interval`; its bounds are ``nan`` for fewer than two values and ``nan``
        everywhere for none.
    """
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = math.fsum(values) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1)
    from scipy import stats

    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired(
    a: Mapping[Hashable, float],
    b: Mapping[Hashable, float],
    higher_is_better: bool = True,
    tie: float = 0.0,
    confidence: float = CONFIDENCE,
) -> Paired:
    """The paired difference ``a - b`` over the seeds present in both.

    Args:
        a: seed -> value of the method compared.
        b: seed -> value of the baseline.
        higher_is_better: the metric's direction; a win is a better value of ``a``.
        tie: differences with ``|d| <= tie`` count as ties.
        confidence: the interval's coverage.

    Returns:
        The :class:`Paired` interval and record (``n`` is the number of common seeds).
    """
    diffs = [a[s] - b[s] for s in a if s in b]
    ci = mean_ci(diffs, confidence)
    sign = 1.0 if higher_is_better else -1.0
    wins = sum(1 for d in diffs if sign * d > tie)
    losses = sum(1 for d in diffs if sign * d < -tie)
    return Paired(ci.mean, ci.low, ci.high, ci.n, wins, len(diffs) - wins - losses, losses)
