"""Stateless Batch Normalization, as three stages: the only module that does the math.

A BatchNorm step is, per channel (docs/math.md):

1. statistics of a part of the batch: :func:`moments` (mean, biased var, count m);
2. a combination of the parts into the whole batch's statistics: :func:`combine_moments`;
3. an element-wise pass: :func:`forward_train` (``stats=`` the whole batch's statistics when x
   is one part of it) or :func:`forward_eval` (given statistics).

Backward has the same shape: :func:`backward_sums` (this part's ``sum(dy)`` and
``sum(dy * xhat)``), summed over the parts by the caller, then :func:`backward_input` (dx from
the whole batch's sums). :func:`backward` is both for a batch that is one part. Single-process
BatchNorm, synchronized BatchNorm, ghost batches and PreciseBN are these stages combined
differently; each stage is the float64 reference for one of PyTorch's native SyncBatchNorm ops.

Every function takes x of shape (N, C, *spatial) with the channel axis at `axis` (default 1,
``axis=-1`` for channels-last); each channel sees ``m = x.size // C`` values.

Conventions (docs/conventions.md):

* ``eps`` defaults to 1e-5 and is added to the variance: ``invstd = 1 / sqrt(var + eps)``.
* Training normalizes with the *biased* batch variance (divide by m); ``cache.var`` is that
  biased variance (multiply by m / (m - 1) for the unbiased one).
* Output dtype = input dtype; float16 is computed in float32 (small inputs in float64).
  Per-channel quantities (mean, var, sums, gradients of gamma and beta) are float64.
* Outputs keep the memory layout of x (channels-last strides in, channels-last strides out).
* Inputs are never modified, and the cache owns copies of everything backward needs.

How memory is walked (small inputs in a few whole-array operations, large ones streamed in
cache-sized slabs) lives in the private module ``_layout``; nothing there changes a result
beyond rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _layout, _validate

__all__ = [
    "BatchNormCache",
    "backward",
    "backward_input",
    "backward_sums",
    "combine_moments",
    "forward_eval",
    "forward_train",
    "merge_moments",
    "moments",
]

Array = NDArray[np.floating[Any]]
Vector = NDArray[np.float64]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _propagating(kernel: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a kernel with NumPy's "invalid value" and "overflow" warnings silenced: NaN and inf
    in the input propagate to the output by design (callers such as BatchNorm check the
    statistics), so those warnings would only be noise. A new errstate per call is thread-safe."""

    @functools.wraps(kernel)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with np.errstate(invalid="ignore", over="ignore"):
            return kernel(*args, **kwargs)

    return run


@dataclass(frozen=True, eq=False, repr=False)
class BatchNormCache:
    """What the backward stages need from one forward call, and the statistics it used.

    Attributes
    ----------
    mean, var : ndarray of shape (C,), float64
        The statistics x was normalized with: after :func:`forward_train` the mean and the
        *biased* variance of the whole normalization batch (x itself, or the batch given by
        ``stats=``); after :func:`forward_eval` the given statistics.
    count : int
        m, the number of values per channel of the whole normalization batch.
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
    # x - shift as (P, C, S) in the working dtype, owned by the cache; None for an eval cache
    # without gamma, whose backward (dx = dy * invstd) needs no x.
    _data: Array | None
    # The per-channel value subtracted from x to make _data (float64, exact in its dtype).
    _shift: Vector
    # Whether (P, C, S) was taken channels-last (_layout.pcs), so dx keeps x's layout.
    _moved: bool

    def __repr__(self) -> str:
        mode = "train" if self.training else "eval"
        return (
            f"BatchNormCache({mode}, shape={self.shape}, dtype={self.dtype}, axis={self.axis}, "
            f"count={self.count}, eps={self.eps:g}, affine={self.gamma is not None})"
        )


# --- stage 1: the statistics of one part ---------------------------------------------------------


@_propagating
def moments(x: ArrayLike, *, axis: int = 1) -> tuple[Vector, Vector, int]:
    """Per-channel mean, biased variance and count of x: one part's statistics.

    Parameters
    ----------
    x : array_like of shape (N, C, *spatial), float
        Any number of values per channel, 0 included (an empty part: mean and var 0, count 0).
    axis : int, default 1
        The channel axis.

    Returns
    -------
    mean, var : ndarray of shape (C,), float64
        ``var`` is biased: ``sum((x - mean)**2) / m``, computed from shifted data (never as
        E[x^2] - E[x]^2), exactly as :func:`forward_train` computes it.
    count : int
        m, the number of values per channel.

    Notes
    -----
    PyTorch's counterpart is ``torch.batch_norm_stats`` (which returns invstd instead of var).

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm import functional as F
    >>> F.moments(np.array([[1.0, 10.0], [3.0, 30.0]]))
    (array([ 2., 20.]), array([  1., 100.]), 2)
    """
    xa = _validate.float_array(x)
    ax = _validate.channel_axis(xa.shape, axis)
    count = _validate.eval_batch(xa.shape, ax)
    if count == 0:
        return np.zeros(xa.shape[ax]), np.zeros(xa.shape[ax]), 0
    x3, _ = _layout.pcs(xa, ax)
    _, shift, resid, var = _layout.centred_moments(x3, _validate.COMPUTE_DTYPES[xa.dtype], count)
    return shift + resid, var, count


# --- stage 2: combining parts --------------------------------------------------------------------


def combine_moments(
    means: ArrayLike, vars: ArrayLike, counts: Sequence[int] | ArrayLike
) -> tuple[Vector, Vector, int]:
    """The mean, biased variance and count of the union of any number of parts, from theirs.

    Parameters
    ----------
    means, vars : array_like of shape (k, C)
        Each part's per-channel mean and *biased* variance (:func:`moments`).
    counts : sequence of k ints >= 0
        Each part's count m. A part with count 0 gets no weight.

    Returns
    -------
    mean, var : ndarray of shape (C,), float64
    count : int
        The total count; all three are 0 when every part is empty.

    Notes
    -----
    With ``n = sum(counts)`` and weights ``w_i = counts_i / n``::

        mean = sum_i w_i * mean_i
        var  = sum_i w_i * (var_i + (mean_i - mean)**2)

    the within-part variances plus the spread of the part means (Chan, Golub and LeVeque,
    1979): the variance of the concatenated data, not an average of variances. The sums run
    over the parts in the order given, so the same inputs give bitwise the same result on
    every worker. A single non-empty part is returned as it is. PyTorch's counterpart is
    ``torch.batch_norm_gather_stats_with_counts``.

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm import functional as F
    >>> F.combine_moments([[0.0], [2.0]], [[1.0], [1.0]], [2, 2])
    (array([1.]), array([2.]), 4)
    """
    mu, sigma2, parts = _validate.parts(means, vars, counts)
    total = sum(parts)
    nonempty = [i for i, n in enumerate(parts) if n]
    if len(nonempty) <= 1:
        if not nonempty:
            return np.zeros(mu.shape[1]), np.zeros(mu.shape[1]), 0
        return mu[nonempty[0]].copy(), sigma2[nonempty[0]].copy(), total
    weights = np.array(parts, dtype=np.float64)[:, None] / total
    mean: Vector = (weights * mu).sum(axis=0)
    spread = mu - mean
    var: Vector = (weights * (sigma2 + spread * spread)).sum(axis=0)
    return mean, var, total


def merge_moments(
    mean_a: Vector, var_a: Vector, count_a: int, mean_b: Vector, var_b: Vector, count_b: int
) -> tuple[Vector, Vector, int]:
    """:func:`combine_moments` of two parts, a then b."""
    return combine_moments((mean_a, mean_b), (var_a, var_b), (count_a, count_b))


# --- stage 3: the element-wise pass --------------------------------------------------------------


@_propagating
def forward_train(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    eps: float = 1e-5,
    axis: int = 1,
    stats: tuple[ArrayLike, ArrayLike, int] | None = None,
) -> tuple[Array, BatchNormCache]:
    """Normalize x with batch statistics (training mode).

    Parameters
    ----------
    x : array_like of shape (N, C, *spatial), float16, float32 or float64
        The batch, or with ``stats`` one part of it (then any N, 0 and 1 included).
        (B, L), (N, C, L), (N, C, H, W) and (N, C, D, H, W) all work; with ``axis=-1``,
        (N, *spatial, C) channels-last data too.
    gamma, beta : array_like of shape (C,), optional
        Per-channel scale and shift. None means no scale (1) or no shift (0); the matching
        gradient from :func:`backward` is then None.
    eps : float, default 1e-5
        Added to the variance before the square root.
    axis : int, default 1
        The channel axis.
    stats : (mean, var, count), optional
        The whole normalization batch's mean, *biased* variance and count m (at least 2, and
        at least x's own), as :func:`combine_moments` gives them. None: x's own statistics.

    Returns
    -------
    y : ndarray, same shape, dtype and memory layout as x
    cache : BatchNormCache
        Holds ``mean``, the biased ``var`` and ``count`` of the normalization batch, so callers
        can update running statistics, and what backward needs.

    Raises
    ------
    TypeError
        x is not float16/32/64, or gamma/beta are not real arrays.
    ValueError
        x has fewer than 2 dims, the batch holds fewer than 2 values per channel, gamma/beta
        have the wrong length or are not finite, or eps <= 0.

    Notes
    -----
    With m values per channel::

        mean = sum(x) / m
        var  = sum((x - mean)**2) / m                     # biased
        xhat = (x - mean) / sqrt(var + eps)
        y    = gamma * xhat + beta

    The variance is computed from shifted data with the correction of Chan, Golub and LeVeque
    (never as E[x^2] - E[x]^2), with per-channel sums accumulated in float64. y is computed
    from x itself while every channel's mean is within one standard deviation of 0 (fewest
    roundings), else from the centred copy (no cancellation against a large offset). NaN or inf
    in x propagates to y and to the statistics; :class:`batchnorm.BatchNorm` refuses to record
    such statistics. PyTorch's counterpart of the element-wise pass is ``batch_norm_elemt``.

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
    g, b = _affine(gamma, beta, xa.shape[ax])
    cdt = _validate.COMPUTE_DTYPES[xa.dtype]
    x3, moved = _layout.pcs(xa, ax)
    if stats is None:
        count = _validate.training_batch(xa.shape, ax)
        data, shift, resid, var = _layout.centred_moments(x3, cdt, count)
        mean = shift + resid
    else:
        mean, var, count = _validate.batch_stats(stats, xa.shape[ax], xa.size // xa.shape[ax])
        data, shift = _layout.centre_on(x3, cdt, mean)
        resid = mean - shift
    invstd = 1.0 / np.sqrt(var + eps_f)
    scale = invstd if g is None else g * invstd

    # y = scale * (x - mean) + beta, from x when that is as exact, else from data = x - shift.
    from_x = data.dtype == x3.dtype and bool(np.all(mean * mean <= var))
    source, ref = (x3, mean) if from_x else (data, resid)
    offset = -ref * scale if b is None else b - ref * scale
    y = _layout.scale_shift(source, scale, offset, xa.dtype)
    cache = BatchNormCache(
        mean, var, count, invstd, True, eps_f, ax, xa.shape, xa.dtype, g, b is not None,
        _data=data, _shift=shift, _moved=moved,
    )  # fmt: skip
    return _layout.restore(y, xa.shape, ax, moved), cache


@_propagating
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
    y : ndarray, same shape, dtype and memory layout as x
    cache : BatchNormCache
        For :func:`backward`; ``cache.mean`` and ``cache.var`` are float64 copies of the given
        statistics. N = 0 is allowed here (an empty y).

    Notes
    -----
    ``y = gamma * (x - mean) / sqrt(var + eps) + beta``, evaluated as one multiply and one
    add per element: ``y = x * scale + (beta - mean * scale)`` with ``scale = gamma / sqrt(var
    + eps)``. The statistics are constants, so backward is ``dx = dy * gamma / sqrt(var +
    eps)``. Only dgamma needs x afterwards, so only a call with gamma keeps a copy of it.

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
    g, b = _affine(gamma, beta, xa.shape[ax])
    mu = _validate.per_channel(mean, "mean", xa.shape[ax])
    sigma2 = _validate.per_channel(var, "var", xa.shape[ax], nonnegative=True)
    x3, moved = _layout.pcs(xa, ax)

    invstd = 1.0 / np.sqrt(sigma2 + eps_f)
    scale = invstd if g is None else g * invstd
    offset = -mu * scale if b is None else b - mu * scale
    data, y = _layout.normalize_eval(x3, _validate.COMPUTE_DTYPES[xa.dtype], scale, offset,
                                     xa.dtype, keep=g is not None)  # fmt: skip
    cache = BatchNormCache(
        mu, sigma2, count, invstd, False, eps_f, ax, xa.shape, xa.dtype, g, b is not None,
        _data=data, _shift=np.zeros_like(mu), _moved=moved,
    )  # fmt: skip
    return _layout.restore(y, xa.shape, ax, moved), cache


def _affine(gamma: ArrayLike | None, beta: ArrayLike | None, c: int) -> tuple[Any, Any]:
    g = None if gamma is None else _validate.per_channel(gamma, "gamma", c)
    b = None if beta is None else _validate.per_channel(beta, "beta", c)
    return g, b


# --- backward: this part's sums, then dx from the whole batch's sums ------------------------------


@_propagating
def backward_sums(dy: ArrayLike, cache: BatchNormCache) -> tuple[Vector, Vector]:
    """This part's per-channel ``sum(dy)`` and ``sum(dy * xhat)``, float64 (C,) each.

    Summed over every part of the normalization batch (in any fixed order), they are what
    :func:`backward_input` needs; with affine parameters they are this part's contributions
    to dbeta and dgamma. PyTorch's counterpart is ``batch_norm_backward_reduce``.

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm import functional as F
    >>> y, cache = F.forward_train(np.array([[1.0], [3.0]]), eps=1e-12)
    >>> F.backward_sums(np.array([[1.0], [2.0]]), cache)
    (array([3.]), array([1.]))
    """
    _validate.cache_type(cache, BatchNormCache)
    return _sums(_gradient(dy, cache), cache)


@_propagating
def backward_input(
    dy: ArrayLike, cache: BatchNormCache, sum_dy: ArrayLike, sum_dy_xhat: ArrayLike
) -> Array:
    """dx of this part from the whole normalization batch's sums.

    Parameters
    ----------
    dy : array_like, shape and float dtype of this part's forward input
    cache : BatchNormCache
        This part's cache.
    sum_dy, sum_dy_xhat : array_like of shape (C,)
        :func:`backward_sums` added up over every part of the batch.

    Returns
    -------
    dx : ndarray, same shape, dtype and memory layout as x

    Notes
    -----
    ``dx = gamma * invstd / m * (m * dy - sum_dy - xhat * sum_dy_xhat)`` with m the whole
    batch's count; evaluated as ``a * (x' * b1 + dy + c1)`` per channel on the cached centred
    copy x'. After :func:`forward_eval` the statistics are constants and ``dx = gamma * invstd
    * dy`` (the sums are not used). PyTorch's counterpart is ``batch_norm_backward_elemt``.
    """
    _validate.cache_type(cache, BatchNormCache)
    dy3 = _gradient(dy, cache)
    c = len(cache.mean)
    sums = (
        _validate.channel_sums(sum_dy, "sum_dy", c),
        _validate.channel_sums(sum_dy_xhat, "sum_dy_xhat", c),
    )
    return _input(dy3, cache, *sums)


@_propagating
def backward(dy: ArrayLike, cache: BatchNormCache) -> tuple[Array, Vector | None, Vector | None]:
    """Gradients of the loss with respect to x, gamma and beta: :func:`backward_sums` then
    :func:`backward_input` with this batch's own sums.

    Parameters
    ----------
    dy : array_like, shape and float dtype of the forward input
        The gradient of the loss with respect to y.
    cache : BatchNormCache
        From :func:`forward_train` or :func:`forward_eval`; it is not modified, so backward
        may be called on it more than once.

    Returns
    -------
    dx : ndarray, same shape, dtype and memory layout as x
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
    docs/math.md for the derivation. After ``forward_train(..., stats=...)`` these are this
    part's dgamma and dbeta, but dx needs the whole batch's sums: use the two stages.

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
    dy3 = _gradient(dy, cache)
    if cache._data is None:  # eval mode without gamma: dx = dy * invstd, and dbeta if asked
        dbeta = _layout.channel_sum(dy3) if cache.has_beta else None
        return _input(dy3, cache, None, None), None, dbeta
    sum_dy, sum_dy_xhat = _sums(dy3, cache)
    dx = _input(dy3, cache, sum_dy, sum_dy_xhat)
    dgamma = None if cache.gamma is None else sum_dy_xhat
    return dx, dgamma, sum_dy if cache.has_beta else None


def _gradient(dy: ArrayLike, cache: BatchNormCache) -> Array:
    """dy checked against the cache and viewed as (P, C, S) in the cache's working dtype."""
    dya = _validate.upstream_gradient(dy, cache.shape)
    cdt = _validate.COMPUTE_DTYPES[cache.dtype]
    work = _layout.working_dtype(dya.size, cdt) if cache._data is None else cache._data.dtype
    return _layout.like(dya, cache.axis, cache._moved, work)


def _sums(dy3: Array, cache: BatchNormCache) -> tuple[Vector, Vector]:
    # xhat = (data - ref) * invstd, ref the mean measured from data's origin.
    if cache._data is None:
        raise _validate.sums_need_data()
    ref = cache.mean - cache._shift
    sum_dy, dot = _layout.sums(dy3, cache._data, ref, centred=cache.training)
    return sum_dy, cache.invstd * dot


def _input(dy3: Array, cache: BatchNormCache, sum_dy: Any, sum_dy_xhat: Any) -> Array:
    a = cache.invstd if cache.gamma is None else cache.gamma * cache.invstd
    if not cache.training:
        dx3 = _layout.scale_shift(dy3, a, None, cache.dtype)
    else:
        # dx = a * dy + b * data + c with b = a * b1, c = a * c1 (docs/math.md).
        assert cache._data is not None
        m = cache.count
        b1 = -cache.invstd * sum_dy_xhat / m
        c1 = -sum_dy / m - b1 * (cache.mean - cache._shift)
        dx3 = _layout.train_dx(cache._data, dy3, a, b1, c1, cache.dtype)
    return _layout.restore(dx3, cache.shape, cache.axis, cache._moved)
