"""Stateless Batch Normalization kernels: the only module that does the math.

Every function takes x of shape (N, C, *spatial) with the channel axis at `axis` (default 1,
``axis=-1`` for channels-last). Statistics are per channel, over every other axis, so each
channel sees ``m = x.size // C`` values. See docs/math.md for the derivations.

Conventions (docs/conventions.md):

* ``eps`` defaults to 1e-5 and is added to the variance: ``invstd = 1 / sqrt(var + eps)``.
* Training normalizes with the *biased* batch variance (divide by m), as in the paper and in
  PyTorch, Keras and cs231n. ``cache.var`` is that biased variance; multiply by m / (m - 1) for
  the unbiased one.
* Output dtype = input dtype; float16 is computed in float32. Per-channel quantities (mean,
  var, gradients of gamma and beta) are float64.
* Inputs are never modified, and the cache owns copies of everything backward needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _validate

__all__ = [
    "BatchNormCache",
    "backward",
    "forward_eval",
    "forward_train",
    "merge_moments",
    "moments",
]

Array = NDArray[np.floating[Any]]
Vector = NDArray[np.float64]


@dataclass(frozen=True, eq=False, repr=False)
class BatchNormCache:
    """What :func:`backward` needs from one forward call, and the statistics it used.

    Attributes
    ----------
    mean, var : ndarray of shape (C,), float64
        The statistics x was normalized with. After :func:`forward_train` these are the batch
        mean and the *biased* batch variance (divide by m); after :func:`forward_eval` they are
        the given ``mean`` and ``var``.
    count : int
        m, the number of values per channel: ``x.size // C``.
    invstd : ndarray of shape (C,), float64
        ``1 / sqrt(var + eps)``.
    training : bool
        True for a cache from :func:`forward_train`, False for :func:`forward_eval`.
    eps : float
    axis : int
        The channel axis, as a non-negative int.
    shape : tuple of int
        The shape of x (and of y, dy and dx).
    dtype : numpy.dtype
        The dtype of x (and of y and dx).
    gamma : ndarray of shape (C,), float64, or None
        A copy of the scale, or None for a call without gamma.
    has_beta : bool
        Whether beta was given (then backward returns dbeta, else None).
    """

    mean: Vector
    var: Vector
    count: int
    invstd: Vector
    training: bool
    eps: float
    axis: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    gamma: Vector | None
    has_beta: bool
    # x - shift in the compute dtype, shaped (P, C, S); owned by the cache.
    _data: Array
    # The per-channel value subtracted from x to make _data (float64, exact in the compute dtype).
    _shift: Vector

    def __repr__(self) -> str:
        mode = "train" if self.training else "eval"
        return (
            f"BatchNormCache({mode}, shape={self.shape}, dtype={self.dtype}, axis={self.axis}, "
            f"count={self.count}, eps={self.eps:g}, affine={self.gamma is not None})"
        )


def forward_train(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[Array, BatchNormCache]:
    """Normalize x with its own batch statistics (training mode).

    Parameters
    ----------
    x : array_like of shape (N, C, *spatial), float16, float32 or float64
        The batch. (B, L), (N, C, L), (N, C, H, W) and (N, C, D, H, W) all work; with
        ``axis=-1``, (N, *spatial, C) channels-last data too.
    gamma, beta : array_like of shape (C,), optional
        Per-channel scale and shift. None means no scale (1) or no shift (0); the matching
        gradient from :func:`backward` is then None.
    eps : float, default 1e-5
        Added to the variance before the square root.
    axis : int, default 1
        The channel axis.

    Returns
    -------
    y : ndarray, same shape and dtype as x
    cache : BatchNormCache
        Holds ``mean``, the biased ``var`` and ``count`` (m) per channel, so callers can update
        running statistics, and what :func:`backward` needs.

    Raises
    ------
    TypeError
        x is not float16/32/64, or gamma/beta are not real arrays.
    ValueError
        x has fewer than 2 dims, a channel holds fewer than 2 values, gamma/beta have the wrong
        length or are not finite, or eps <= 0.

    Notes
    -----
    With m values per channel::

        mean = sum(x) / m
        var  = sum((x - mean)**2) / m                     # biased
        xhat = (x - mean) / sqrt(var + eps)
        y    = gamma * xhat + beta

    The variance is computed from shifted data with the two-pass correction of Chan, Golub
    and LeVeque (never as E[x^2] - E[x]^2), with per-channel sums accumulated in float64.
    NaN or inf in x propagates to y and to the statistics; :class:`batchnorm.BatchNorm`
    refuses to record such statistics.

    Reference: S. Ioffe and C. Szegedy, "Batch Normalization", ICML 2015, Algorithm 1.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, cache = bn.forward_train(x, eps=0.0001)
    >>> np.round(y, 3)
    array([[-1., -1.],
           [ 1.,  1.]])
    >>> cache.mean, cache.var, cache.count
    (array([ 2., 20.]), array([  1., 100.]), 2)
    """
    xa = _validate.float_array(x)
    ax = _validate.channel_axis(xa.shape, axis)
    eps_f = _validate.eps_value(eps)
    count = _validate.training_batch(xa.shape, ax)
    num_channels = xa.shape[ax]
    g = None if gamma is None else _validate.per_channel(gamma, "gamma", num_channels)
    b = None if beta is None else _validate.per_channel(beta, "beta", num_channels)
    cdt = _validate.COMPUTE_DTYPES[xa.dtype]
    x3 = _as_pcs(xa, ax)

    data, shift, resid, var = _shifted_moments(x3, cdt, count)
    mean = shift + resid
    invstd = 1.0 / np.sqrt(var + eps_f)

    scale = invstd if g is None else g * invstd
    offset = -resid * scale if b is None else b - resid * scale
    y = _scale_shift(data, scale, offset, xa.dtype).reshape(xa.shape)
    cache = BatchNormCache(
        mean=mean,
        var=var,
        count=count,
        invstd=invstd,
        training=True,
        eps=eps_f,
        axis=ax,
        shape=xa.shape,
        dtype=xa.dtype,
        gamma=g,
        has_beta=b is not None,
        _data=data,
        _shift=shift,
    )
    return y, cache


def forward_eval(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    mean: ArrayLike,
    var: ArrayLike,
    *,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[Array, BatchNormCache]:
    """Normalize x with given statistics (inference mode, or frozen BatchNorm).

    Parameters
    ----------
    x : array_like of shape (N, C, *spatial), float16, float32 or float64
    gamma, beta : array_like of shape (C,) or None
        Per-channel scale and shift; None means 1 and 0.
    mean, var : array_like of shape (C,)
        The statistics to normalize with, usually running statistics; var must be >= 0 and is
        used as given (whether it is biased or unbiased is the caller's choice).
    eps : float, default 1e-5
    axis : int, default 1

    Returns
    -------
    y : ndarray, same shape and dtype as x
    cache : BatchNormCache
        For :func:`backward`; ``cache.mean`` and ``cache.var`` are float64 copies of the given
        statistics. N = 0 is allowed here (an empty y).

    Notes
    -----
    ``y = gamma * (x - mean) / sqrt(var + eps) + beta``, evaluated as one multiply and one
    add per element: ``y = x * scale + (beta - mean * scale)`` with ``scale = gamma / sqrt(var
    + eps)``. In eval mode the statistics are constants, so backward is
    ``dx = dy * gamma / sqrt(var + eps)``.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> x = np.array([[0.0], [4.0]])
    >>> y, _ = bn.forward_eval(x, None, None, mean=[2.0], var=[4.0], eps=1e-12)
    >>> y
    array([[-1.],
           [ 1.]])
    """
    xa = _validate.float_array(x)
    ax = _validate.channel_axis(xa.shape, axis)
    eps_f = _validate.eps_value(eps)
    count = _validate.eval_batch(xa.shape, ax)
    num_channels = xa.shape[ax]
    g = None if gamma is None else _validate.per_channel(gamma, "gamma", num_channels)
    b = None if beta is None else _validate.per_channel(beta, "beta", num_channels)
    mu = _validate.per_channel(mean, "mean", num_channels)
    sigma2 = _validate.per_channel(var, "var", num_channels, nonnegative=True)
    cdt = _validate.COMPUTE_DTYPES[xa.dtype]
    x3 = _as_pcs(xa, ax)

    invstd = 1.0 / np.sqrt(sigma2 + eps_f)
    scale = invstd if g is None else g * invstd
    offset = -mu * scale if b is None else b - mu * scale
    y = _scale_shift(x3, scale, offset, xa.dtype).reshape(xa.shape)
    cache = BatchNormCache(
        mean=mu,
        var=sigma2,
        count=count,
        invstd=invstd,
        training=False,
        eps=eps_f,
        axis=ax,
        shape=xa.shape,
        dtype=xa.dtype,
        gamma=g,
        has_beta=b is not None,
        _data=np.array(x3, dtype=cdt, order="C", copy=True),
        _shift=np.zeros(num_channels),
    )
    return y, cache


def backward(dy: ArrayLike, cache: BatchNormCache) -> tuple[Array, Vector | None, Vector | None]:
    """Gradients of the loss with respect to x, gamma and beta.

    Parameters
    ----------
    dy : array_like, shape and float dtype of the forward input
        The gradient of the loss with respect to y.
    cache : BatchNormCache
        From :func:`forward_train` or :func:`forward_eval`; it is not modified, so backward
        may be called on it more than once.

    Returns
    -------
    dx : ndarray, same shape and dtype as x
    dgamma : ndarray of shape (C,), float64, or None when forward had no gamma
    dbeta : ndarray of shape (C,), float64, or None when forward had no beta

    Notes
    -----
    With sums over the m values of each channel::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx     = gamma * invstd / m * (m * dy - sum(dy) - xhat * sum(dy * xhat))   # training
        dx     = gamma * invstd * dy                                               # eval

    The training formula includes the paths through the batch mean and variance; see
    docs/math.md for the derivation. It is evaluated as ``dx = a * dy + b * x' + c`` with
    per-channel a, b, c, where x' is the cached centred input.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    >>> y, cache = bn.forward_train(x, gamma=np.ones(2), beta=np.zeros(2))
    >>> dx, dgamma, dbeta = bn.backward(np.ones_like(y), cache)
    >>> dbeta, bool(np.abs(dx).max() < 1e-12)    # a constant dy does not change y: dx is 0
    (array([3., 3.]), True)
    """
    _validate.cache_type(cache, BatchNormCache)
    dya = _validate.upstream_gradient(dy, cache.shape)
    data = cache._data
    cdt = data.dtype
    count = cache.count
    dy3 = _as_pcs(dya, cache.axis)
    if dy3.dtype != cdt:
        dy3 = dy3.astype(cdt)
    g = cache.gamma
    invstd = cache.invstd
    a = invstd if g is None else g * invstd

    sum_dy = _channel_sum(dy3, cdt)
    dbeta = sum_dy if cache.has_beta else None
    if not cache.training and g is None:
        return _scale_shift(dy3, a, None, cache.dtype).reshape(cache.shape), None, dbeta

    # xhat = (data - ref) * invstd, where ref is the mean measured from data's origin.
    ref = cache.mean - cache._shift
    if cache.training:
        # ref is the small remainder of a shifted mean: no cancellation in the sum below.
        dot = _channel_dot(dy3, data) - ref * sum_dy
    else:
        ref_c = ref.astype(cdt)
        centred = np.subtract(data, ref_c[:, None], dtype=cdt)
        dot = _channel_dot(dy3, centred) - (ref - ref_c) * sum_dy
    sum_dy_xhat = invstd * dot
    dgamma = None if g is None else sum_dy_xhat

    if not cache.training:
        return _scale_shift(dy3, a, None, cache.dtype).reshape(cache.shape), dgamma, dbeta
    b = -a * invstd * sum_dy_xhat / count
    c = -a * sum_dy / count - b * ref
    dx = _scale_shift(dy3, a, None, cdt)
    dx += _scale_shift(data, b, c, cdt)
    return dx.astype(cache.dtype, copy=False).reshape(cache.shape), dgamma, dbeta


def moments(x: ArrayLike, *, axis: int = 1) -> tuple[Vector, Vector, int]:
    """Per-channel mean, biased variance and count of x, as :func:`forward_train` computes them.

    Parameters
    ----------
    x : array_like of shape (N, C, *spatial), float
        At least one value per channel (one value gives variance 0).
    axis : int, default 1
        The channel axis.

    Returns
    -------
    mean, var : ndarray of shape (C,), float64
        ``var`` is biased: ``sum((x - mean)**2) / m``.
    count : int
        m, the number of values per channel.
    """
    xa = _validate.float_array(x)
    ax = _validate.channel_axis(xa.shape, axis)
    count = _validate.statistics_batch(xa.shape, ax)
    cdt = _validate.COMPUTE_DTYPES[xa.dtype]
    _, shift, resid, var = _shifted_moments(_as_pcs(xa, ax), cdt, count)
    return shift + resid, var, count


def merge_moments(
    mean_a: Vector, var_a: Vector, count_a: int, mean_b: Vector, var_b: Vector, count_b: int
) -> tuple[Vector, Vector, int]:
    """Mean, biased variance and count of the union of two sets, from theirs (Chan et al.).

    ``var = (count_a * var_a + count_b * var_b + delta**2 * count_a * count_b / n) / n`` with
    ``delta = mean_b - mean_a`` and ``n = count_a + count_b``: the within-set variances plus the
    spread of the set means. Exact (up to rounding) whatever the split, unlike an average of
    per-batch variances. Reference: T. F. Chan, G. H. Golub and R. J. LeVeque, "Updating
    formulae and a pairwise algorithm for computing sample variances", 1979.
    """
    total = count_a + count_b
    if count_b == 0:
        return mean_a.copy(), var_a.copy(), count_a
    if count_a == 0:
        return mean_b.copy(), var_b.copy(), count_b
    delta = mean_b - mean_a
    weight_b = count_b / total
    mean = mean_a + delta * weight_b
    var = (
        var_a * (count_a / total) + var_b * weight_b + delta * delta * (count_a * weight_b / total)
    )
    return mean, var, total


# --- helpers: (N, C, *) <-> (P, C, S) views and per-channel reductions -------------------------


def _shifted_moments(
    x3: Array, cdt: np.dtype[Any], count: int
) -> tuple[Array, Vector, Vector, Vector]:
    """Centre x3 (P, C, S) by a first mean estimate; return (data, shift, resid, var).

    ``data = x3 - shift`` in the compute dtype, with ``shift`` (float64, exactly representable in
    cdt) a first estimate of the mean; ``resid`` is the exact remainder, so the mean is
    ``shift + resid``, and ``var`` the biased variance. Summing small centred values and
    correcting by the remainder (Chan, Golub and LeVeque's two-pass algorithm) avoids the
    cancellation of the one-pass E[x^2] - E[x]^2.
    """
    shift = (_channel_sum(x3, cdt) / count).astype(cdt)
    data = np.subtract(x3, shift[:, None], dtype=cdt)
    resid = _channel_sum(data, cdt) / count
    var = np.maximum(_channel_dot(data, data) / count - resid * resid, 0.0)
    return data, shift.astype(np.float64), resid, var


def _as_pcs(x: Array, axis: int) -> Array:
    """View x as (P, C, S): P = prod(shape[:axis]), S = prod(shape[axis+1:]); copies only if
    x's memory layout does not allow the view."""
    shape = x.shape
    return x.reshape(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))


def _channel_sum(a: Array, dtype: np.dtype[Any]) -> Vector:
    """Per-channel sum of a (P, C, S) array, accumulated in float64 across P.

    The inner reduction runs over the contiguous S axis (NumPy's pairwise summation)."""
    if a.shape[2] == 1:
        total = a[:, :, 0].sum(axis=0, dtype=np.float64)
    else:
        total = a.sum(axis=2, dtype=dtype).sum(axis=0, dtype=np.float64)
    return np.asarray(total, dtype=np.float64)


def _channel_dot(a: Array, b: Array) -> Vector:
    """Per-channel sum of a * b for (P, C, S) arrays, without an input-sized temporary."""
    if a.shape[2] == 1:
        total = np.einsum("pc,pc->c", a[:, :, 0], b[:, :, 0])
    else:
        total = np.einsum("pcs,pcs->pc", a, b).sum(axis=0, dtype=np.float64)
    return np.asarray(total, dtype=np.float64)


def _scale_shift(a: Array, scale: Vector, offset: Vector | None, dtype: np.dtype[Any]) -> Array:
    """Return a * scale + offset per channel for (P, C, S) a, in a's dtype, then cast to dtype."""
    cdt = _validate.COMPUTE_DTYPES[np.dtype(a.dtype)]
    out = np.multiply(a, scale.astype(cdt)[:, None], dtype=cdt)
    if offset is not None:
        out += offset.astype(cdt)[:, None]
    result: Array = out.astype(dtype, copy=False)
    return result
