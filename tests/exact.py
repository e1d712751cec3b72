"""BatchNorm in 60-digit decimal arithmetic: the reference the exactness tests measure against.

Every float64 converts to a Decimal exactly, and at 60 significant digits the sums of these
tests' inputs (at most ~10^5 values, offsets up to 1e8) are exact to far below 2^-52 of any
result, so the only rounding left is the final conversion to float64. Errors are reported in
units of 2^-52 (float64's machine epsilon): normwise for arrays, and for a per-channel sum
relative to the sum of its terms' magnitudes (the bound a summation can promise).
"""

from __future__ import annotations

import decimal
from typing import Any

import numpy as np

UNIT = 2.0**-52
_PREC = 60


def _columns(a: Any, axis: int) -> np.ndarray:
    """a as an (m, C) object array of exact Decimals, channels last."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    flat = a.reshape(-1, a.shape[-1])
    return np.vectorize(decimal.Decimal, otypes=[object])(flat)


def _back(cols: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    axis %= len(shape)
    moved = [*shape[:axis], *shape[axis + 1 :], shape[axis]]
    return np.moveaxis(cols.astype(np.float64).reshape(moved), -1, axis)


def _per_channel(v: Any, c: int, default: int) -> np.ndarray:
    if v is None:
        return np.array([decimal.Decimal(default)] * c, dtype=object)
    return np.array([decimal.Decimal(float(t)) for t in np.asarray(v, np.float64)], dtype=object)


def statistics(x: Any, *, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The exact per-channel mean and biased variance of x, as (C,) object arrays of Decimal."""
    with decimal.localcontext() as ctx:
        ctx.prec = _PREC
        cols = _columns(x, axis)
        m = decimal.Decimal(cols.shape[0])
        mean = cols.sum(axis=0) / m
        centred = cols - mean
        return mean, (centred * centred).sum(axis=0) / m


def forward_backward(
    x: Any, dy: Any, gamma: Any = None, beta: Any = None, *, eps: float = 1e-5, axis: int = 1
) -> dict[str, Any]:
    """The exact training-mode y, dx, dgamma, dbeta of BatchNorm (biased variance), rounded to
    float64 once, with each gradient sum's scale (the sum of its terms' magnitudes)."""
    x = np.asarray(x, dtype=np.float64)
    with decimal.localcontext() as ctx:
        ctx.prec = _PREC
        cols, dys = _columns(x, axis), _columns(dy, axis)
        m = decimal.Decimal(cols.shape[0])
        mean = cols.sum(axis=0) / m
        centred = cols - mean
        var = (centred * centred).sum(axis=0) / m
        invstd = np.array([1 / (v + decimal.Decimal(eps)).sqrt() for v in var], dtype=object)
        g = _per_channel(gamma, cols.shape[1], 1)
        b = _per_channel(beta, cols.shape[1], 0)
        xhat = centred * invstd
        y = g * xhat + b
        terms = dys * xhat
        sum_dy, sum_dy_xhat = dys.sum(axis=0), terms.sum(axis=0)
        dx = g * invstd / m * (m * dys - sum_dy - xhat * sum_dy_xhat)
        return {
            "y": _back(y, x.shape, axis),
            "dx": _back(dx, x.shape, axis),
            "dgamma": sum_dy_xhat.astype(np.float64),
            "dbeta": sum_dy.astype(np.float64),
            "dgamma_scale": np.abs(terms).sum(axis=0).astype(np.float64),
            "dbeta_scale": np.abs(dys).sum(axis=0).astype(np.float64),
            "mean": mean.astype(np.float64),
            "var": var.astype(np.float64),
        }


def units(actual: Any, exact: Any) -> float:
    """Normwise error of an array in units of 2^-52: max|a - e| / max|e| / 2^-52."""
    a, e = np.asarray(actual, np.float64), np.asarray(exact, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = float(np.max(np.abs(e)))
    return float(np.max(np.abs(a - e))) / scale / UNIT if scale else float(np.max(np.abs(a)))


def sum_units(actual: Any, exact: Any, scale: Any) -> float:
    """Error of per-channel sums relative to the sum of their terms' magnitudes, in units of
    2^-52 (the largest over the channels)."""
    a, e, s = (np.asarray(v, np.float64) for v in (actual, exact, scale))
    return float(np.max(np.abs(a - e) / np.where(s > 0, s, 1.0))) / UNIT


def relative_units(actual: Any, exact: Any) -> float:
    """Largest elementwise relative error in units of 2^-52 (for means and variances)."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(exact, dtype=object)
    with decimal.localcontext() as ctx:
        ctx.prec = _PREC
        err = [
            abs(decimal.Decimal(float(u)) - v) / abs(v) if v else abs(decimal.Decimal(float(u)))
            for u, v in zip(a.ravel(), e.ravel(), strict=True)
        ]
    return float(max(err)) / UNIT
