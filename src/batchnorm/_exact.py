"""Error-free float64 arithmetic for combining statistics (private; ``Moments`` is public as
``batchnorm.functional.Moments``).

A mean rounded to one float64 keeps only the digits of its largest part: for data at offset
1e8 with standard deviation 1, about 8 of its 16 digits describe the offset, and x - mean
then has only 8 correct digits left. So wherever statistics travel (from one part of a batch
to the combination of the parts, from the forward to the backward, from batch to population)
the mean travels as an unevaluated sum ``hi + lo`` of two float64s: ``hi`` the mean rounded,
``lo`` what rounding left, exact to about 2^-104 of the mean. TwoSum (Knuth; Møller 1965)
turns one floating-point addition into such a pair without any error, and every combination
below is built from it, so that the digits below hi's last bit are never lost.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from batchnorm import _validate

Vector = NDArray[np.float64]
#: A running total: (count, mean hi, mean lo, m2 hi, m2 lo), m2 the sum of squared deviations.
Total = tuple[int, Vector, Vector, Vector, Vector]


class Moments(tuple):  # type: ignore[type-arg]
    """``(mean, var, count)``: a part's or a whole batch's per-channel statistics.

    A 3-tuple, unpacked as ``mean, var, count = F.moments(x)``, that also carries
    ``mean_lo``: the float64 (C,) remainder of the mean below ``mean``'s last bit, so that
    ``mean + mean_lo`` is the mean to about 2^-104 relative. :func:`~batchnorm.functional.
    combine_moments` and ``forward_train(stats=...)`` read it when they are given a Moments
    (or a 4-tuple ``(mean, var, count, mean_lo)``), which keeps hand-chained stages as exact as
    the single-call kernels at any offset; a plain 3-tuple works as ``mean_lo = 0``.
    """

    mean_lo: Vector

    def __new__(
        cls, mean: Vector, var: Vector, count: int, mean_lo: Vector | None = None
    ) -> Moments:
        self: Moments = super().__new__(cls, (mean, var, count))
        self.mean_lo = np.zeros_like(mean) if mean_lo is None else mean_lo
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # copy and pickle keep mean_lo
        return (*self, self.mean_lo)

    @property
    def mean(self) -> Vector:
        """The per-channel mean, rounded to float64."""
        result: Vector = self[0]
        return result

    @property
    def var(self) -> Vector:
        """The per-channel biased variance."""
        result: Vector = self[1]
        return result

    @property
    def count(self) -> int:  # type: ignore[override]  # a field, as in a namedtuple
        """Values per channel."""
        result: int = self[2]
        return result


def two_sum(a: Any, b: Any) -> tuple[Any, Any]:
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (TwoSum, six operations)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def combine(hi: Vector, lo: Vector, m2: Vector, counts: Vector) -> tuple[Vector, Vector, Vector]:
    """The mean (hi, lo) and sum of squared deviations of k non-empty parts, from theirs.

    ``hi``, ``lo``, ``m2`` are (k, C): each part's mean as hi + lo and its sum of squared
    deviations from its own mean (count * biased var); ``counts`` (k, 1) float64, all > 0.
    Around a reference r (the first largest part's hi), every part's offset
    ``d_i = (hi_i - r) + lo_i`` is formed by TwoSum, so it is exact to rounding of its own
    size however large r is; the mean is ``r + D`` with ``D = sum n_i d_i / n`` (as a TwoSum
    pair), and ``m2 = sum m2_i + sum n_i (d_i - D)^2``: only small, centred quantities are
    ever rounded. Rows are added in order, so equal inputs give bitwise equal results.
    """
    k = hi.shape[0]
    if k == 1:
        return hi[0].copy(), lo[0].copy(), m2[0].copy()
    r = hi[int(np.argmax(counts[:, 0]))]
    d, err = two_sum(hi, -r)
    err += lo
    d += err  # (k, C) offsets from r, each exact to its own rounding
    n = float(counts.sum())
    spread = counts * d
    big_d = spread.sum(axis=0)
    big_d /= n
    d -= big_d
    d *= d
    d *= counts
    total = m2.sum(axis=0)
    total += d.sum(axis=0)
    mean_hi, mean_lo = two_sum(r, big_d)
    return mean_hi, mean_lo, total


def accumulate(acc: Total, part: Total) -> Total:
    """Add one part to a running total, both as (n, mean hi, mean lo, m2 hi, m2 lo).

    For totals that take in many parts one after another (a population over hundreds of
    batches): Chan, Golub and LeVeque's pairwise update, with the mean and the sum of squared
    deviations each kept as a TwoSum pair, so that rounding does not accumulate with the number
    of parts. The mean moves by ``d * n_b / n`` with ``d = mean_b - mean_a`` formed exactly,
    and m2 by ``m2_b + d^2 * n_a * n_b / n``.
    """
    n_a, hi_a, lo_a, m2hi_a, m2lo_a = acc
    n_b, hi_b, lo_b, m2hi_b, m2lo_b = part
    if n_b == 0:
        return acc
    if n_a == 0:
        return part
    n = n_a + n_b
    d, err = two_sum(hi_b, -hi_a)
    d += err + (lo_b - lo_a)
    hi, e = two_sum(hi_a, d * (n_b / n))
    hi, lo = two_sum(hi, e + lo_a)
    between = d * d * (n_a * n_b / n)
    m2, e1 = two_sum(m2hi_a, m2hi_b)
    m2, e2 = two_sum(m2, between)
    m2, m2lo = two_sum(m2, e1 + e2 + m2lo_a + m2lo_b)
    return n, hi, lo, m2, m2lo


def check_total(total: Total) -> None:
    """Refuse a total whose mean or variance overflowed (FloatingPointError)."""
    _, hi, lo, m2, m2_lo = total
    with np.errstate(over="ignore", invalid="ignore"):
        _validate.pooled_statistics(hi + lo, m2 + m2_lo)
