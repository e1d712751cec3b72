"""Stateless Batch Normalization in three stages: the only module that does the math.

Per channel (docs/math.md): (1) :func:`moments` of a part of the batch, (2)
:func:`combine_moments` of the parts, (3) the element-wise pass, :func:`forward_train` (with
``stats=`` when x is one part of the normalization batch) or :func:`forward_eval`. Backward
likewise: :func:`backward_sums` per part, added up over the parts, then
:func:`backward_input`; :func:`backward` is both for a batch that is one part. Single-process,
synchronized and ghost-batch BatchNorm and PreciseBN are these stages combined differently.

x is (N, C, *spatial) with the channel axis at ``axis`` (``axis=-1``: channels-last); each
channel sees ``m = x.size // C`` values. Conventions (docs/conventions.md): ``invstd = 1 /
sqrt(var + eps)``, eps 1e-5; training normalizes with the *biased* batch variance; output
dtype and memory layout = x's; float16 is computed in float32, small inputs in float64;
per-channel results are float64; inputs are never modified. How memory is walked lives in
``_layout`` and changes no result beyond rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _layout, _validate
from batchnorm._cache import BatchNormCache
from batchnorm._exact import Moments, combine
from batchnorm._layout import propagating

__all__ = [
    "BatchNormCache",
    "Moments",
    "backward",
    "backward_input",
    "backward_sums",
    "combine_moments",
    "double_backward",
    "forward_eval",
    "forward_train",
    "moments",
]

Array = NDArray[np.floating[Any]]
Vector = NDArray[np.float64]

# --- stage 1: the statistics of one part ---------------------------------------------------------


@propagating
def moments(x: ArrayLike, *, axis: int = 1) -> Moments:
    """Per-channel mean, biased variance and count of x: one part's statistics.

    x is (N, C, *spatial) float with any number of values per channel, 0 included (then mean
    and var are 0). ``var = sum((x - mean)**2) / m`` (biased), computed from shifted data,
    never as E[x^2] - E[x]^2, exactly as :func:`forward_train` computes it. Returns a
    :class:`Moments`: the tuple ``(mean, var, count)`` (float64 (C,), float64 (C,), int) with
    ``.mean_lo``, what rounding left of the mean, which :func:`combine_moments` and
    ``forward_train(stats=...)`` use to stay exact at any offset (docs/math.md). PyTorch's
    counterpart: ``torch.batch_norm_stats`` (which returns invstd instead of var).

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm import functional as F
    >>> F.moments(np.array([[1.0, 10.0], [3.0, 30.0]]))
    (array([ 2., 20.]), array([  1., 100.]), 2)
    """
    xa = _validate.float_array(x)
    return _measure(xa, _validate.channel_axis(xa.shape, axis))[0]


# --- stage 2: combining parts --------------------------------------------------------------------


def combine_moments(
    means: ArrayLike,
    vars: ArrayLike,
    counts: Sequence[int] | ArrayLike,
    *,
    means_lo: ArrayLike | None = None,
) -> Moments:
    """The mean, biased variance and count of the union of any number of parts, from theirs.

    ``means`` and ``vars`` are (k, C): each part's mean and *biased* variance (:func:`moments`);
    ``counts`` holds k ints >= 0 (a part with count 0 gets no weight); ``means_lo``, optional
    (k, C), each part's ``mean_lo`` (:class:`Moments`), keeps the result exact at any offset
    (None: zeros). Returns a :class:`Moments`: float64 (C,) mean and var and the total count,
    all 0 when every part is empty, with the combined ``mean_lo``.

    Notes
    -----
    With ``n = sum(counts)`` and weights ``w_i = counts_i / n``::

        mean = sum_i w_i * mean_i
        var  = sum_i w_i * (var_i + (mean_i - mean)**2)

    the within-part variances plus the spread of the part means (Chan, Golub and LeVeque,
    1979): the variance of the concatenated data, not an average of variances. Each part's
    mean is taken as ``means_i + means_lo_i`` and measured from a reference part's mean with
    TwoSum, so only small centred quantities are rounded and the result keeps the parts'
    accuracy whatever the offset (docs/math.md, "Exact at any offset"). The sums run over the
    parts in the order given, so the same inputs give bitwise the same result on every worker.
    A single non-empty part is returned as it is. PyTorch's counterpart is
    ``torch.batch_norm_gather_stats_with_counts``.

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm import functional as F
    >>> F.combine_moments([[0.0], [2.0]], [[1.0], [1.0]], [2, 2])
    (array([1.]), array([2.]), 4)
    """
    mu, sigma2, parts = _validate.parts(means, vars, counts)
    lo = np.zeros_like(mu) if means_lo is None else _validate.parts_lo(means_lo, mu.shape)
    return _combine(mu, sigma2, parts, lo)


def _combine(mu: Vector, sigma2: Vector, parts: list[int], lo: Vector) -> Moments:
    """:func:`combine_moments` of checked parts: float64 (k, C) arrays and k ints >= 0 (the
    synchronized forward's, each checked on its own rank)."""
    total = sum(parts)
    nonempty = [i for i, n in enumerate(parts) if n]  # empty parts take no part at all
    if not nonempty:
        return Moments(np.zeros(mu.shape[1]), np.zeros(mu.shape[1]), 0)
    if len(nonempty) < len(parts):
        mu, sigma2, lo = mu[nonempty], sigma2[nonempty], lo[nonempty]
    n = np.array([parts[i] for i in nonempty], dtype=np.float64)[:, None]
    mean, mean_lo, m2 = combine(mu, lo, sigma2 * n, n)
    m2 /= float(total)
    return Moments(mean, sigma2[0].copy() if len(nonempty) == 1 else m2, total, mean_lo)


# --- stage 3: the element-wise pass --------------------------------------------------------------


@propagating
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
        The batch ((B, L) to (N, C, D, H, W); channels-last with ``axis=-1``), or with
        ``stats`` one part of it (then any N, 0 and 1 included).
    gamma, beta : array_like of shape (C,), optional
        Scale and shift; None means 1 and 0, and the matching gradient is then None.
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
        The normalization batch's ``mean``, biased ``var`` and ``count``; what backward needs.

    Raises
    ------
    TypeError
        x is not float16/32/64, or gamma/beta are not real arrays.
    ValueError
        x has fewer than 2 dims, the batch fewer than 2 values per channel, gamma/beta have
        the wrong length or are not finite, or eps <= 0.

    Notes
    -----
    With m values per channel::

        mean = sum(x) / m
        var  = sum((x - mean)**2) / m                     # biased
        xhat = (x - mean) / sqrt(var + eps)
        y    = gamma * xhat + beta

    var is computed from shifted data with the correction of Chan, Golub and LeVeque (never as
    E[x^2] - E[x]^2), summed in float64. NaN or inf in x propagates to y and the statistics
    (:class:`batchnorm.BatchNorm` refuses to record them). PyTorch's counterpart of this
    element-wise pass: ``batch_norm_elemt``. Reference: S. Ioffe and C. Szegedy, "Batch
    Normalization", ICML 2015, Algorithm 1.

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
        mean, var, count, mean_lo = _validate.batch_stats(
            stats, xa.shape[ax], xa.size // xa.shape[ax]
        )
        data, shift = _layout.centre_on(x3, cdt, mean)
        resid = (mean - shift) + mean_lo  # mean - shift is exact: shift is mean rounded
    part = _Centred(xa, ax, x3, moved, data, shift)
    return _normalize(part, mean, var, count, resid, g, b, eps_f)


class _Centred(NamedTuple):
    """x as (P, C, S) and centred, ``data = x - shift``, between stages 1 and 3."""

    xa: Array
    ax: int
    x3: Array
    moved: bool
    data: Array
    shift: Vector


def _normalize(
    part: _Centred, mean: Vector, var: Vector, count: int, resid: Vector, g: Any, b: Any,
    eps: float,
) -> tuple[Array, BatchNormCache]:  # fmt: skip
    """Stage 3 on a centred part; resid is the normalization mean measured from the shift."""
    invstd = 1.0 / np.sqrt(var + eps)
    scale = invstd if g is None else g * invstd
    # y = scale * (x - mean) + beta: from x itself while every mean lies within a standard
    # deviation of 0 (fewest roundings), else from data = x - shift (no cancellation against
    # a large offset).
    x3, data = part.x3, part.data
    from_x = data.dtype == x3.dtype and bool((mean * mean <= var).all())
    source, ref = (x3, mean) if from_x else (data, resid)
    offset = -ref * scale if b is None else b - ref * scale
    xa, ax = part.xa, part.ax
    y = _layout.scale_shift(source, scale, offset, xa.dtype)
    cache = BatchNormCache(
        mean, var, count, invstd, True, eps, ax, xa.shape, xa.dtype, g, b is not None,
        _data=data, _shift=part.shift, _resid=resid, _moved=part.moved,
    )  # fmt: skip
    return _layout.restore(y, xa.shape, ax, part.moved), cache


def _measure(xa: Array, ax: int) -> tuple[Moments, _Centred | None]:
    """Stage 1 on checked x, keeping the centred data for :func:`_finish` (None for an empty
    part): a synchronized step reads x once for both stages, as a local one does."""
    count = _validate.eval_batch(xa.shape, ax)
    if count == 0:
        return Moments(np.zeros(xa.shape[ax]), np.zeros(xa.shape[ax]), 0), None
    x3, moved = _layout.pcs(xa, ax)
    data, shift, resid, var = _layout.centred_moments(x3, _validate.COMPUTE_DTYPES[xa.dtype], count)
    mean = shift + resid
    found = Moments(mean, var, count, (shift - mean) + resid)  # TwoSum's error, as in the cache
    return found, _Centred(xa, ax, x3, moved, data, shift)


@propagating
def _finish(
    part: _Centred | None, xa: Array, ax: int, g: Any, b: Any, eps: float, stats: Moments
) -> tuple[Array, BatchNormCache]:
    """Stage 3 of :func:`_measure`'s part with the whole batch's statistics, for gamma, beta
    and eps already checked (:func:`_affine`): the same result as ``forward_train(x, g, b,
    eps=eps, axis=ax, stats=stats)``."""
    if part is None:
        return forward_train(xa, g, b, eps=eps, axis=ax, stats=stats)
    mean, var, count = stats
    resid = (mean - part.shift) + stats.mean_lo  # the shift lies near the mean: exact
    return _normalize(part, mean, var, count, resid, g, b, eps)


@propagating
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

    x, gamma, beta, eps and axis are as for :func:`forward_train` (N = 0 is allowed here);
    ``mean`` and ``var`` (C,) are the statistics to normalize with, usually running statistics,
    var >= 0 and used as given (biased or unbiased is the caller's choice). Returns y (x's
    shape, dtype and memory layout) and the cache, whose mean and var are float64 copies.

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
        _data=data, _shift=np.zeros(len(mu)), _resid=mu, _moved=moved,
    )  # fmt: skip
    return _layout.restore(y, xa.shape, ax, moved), cache


def _affine(gamma: ArrayLike | None, beta: ArrayLike | None, c: int) -> tuple[Any, Any]:
    g = None if gamma is None else _validate.per_channel(gamma, "gamma", c)
    b = None if beta is None else _validate.per_channel(beta, "beta", c)
    return g, b


# --- backward: this part's sums, then dx from the whole batch's sums ------------------------------


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
    return _part_sums(dy, cache)[1]


@propagating
def _part_sums(dy: ArrayLike, cache: BatchNormCache) -> tuple[Array, tuple[Vector, Vector]]:
    """:func:`backward_sums`, keeping dy checked and converted for :func:`_part_input`: a
    synchronized backward reads dy once for both stages, as a local one does."""
    _validate.cache_type(cache, BatchNormCache)
    dy3 = _gradient(dy, cache)
    return dy3, _sums(dy3, cache)


@propagating
def _part_input(dy3: Array, cache: BatchNormCache, sum_dy: Vector, sum_dy_xhat: Vector) -> Array:
    """:func:`backward_input` of :func:`_part_sums`'s dy with checked (C,) float64 sums."""
    return _input(dy3, cache, sum_dy, sum_dy_xhat)


@propagating
def backward_input(
    dy: ArrayLike, cache: BatchNormCache, sum_dy: ArrayLike, sum_dy_xhat: ArrayLike
) -> Array:
    """dx of this part from the whole normalization batch's sums.

    dy and cache are this part's; ``sum_dy`` and ``sum_dy_xhat`` (C,) are :func:`backward_sums`
    added up over every part of the batch. Returns dx with x's shape, dtype and memory layout:
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


@propagating
def backward(dy: ArrayLike, cache: BatchNormCache) -> tuple[Array, Vector | None, Vector | None]:
    """Gradients of the loss with respect to x, gamma and beta: :func:`backward_sums` then
    :func:`backward_input` with this batch's own sums.

    dy has the shape of the forward input; the cache (from :func:`forward_train` or
    :func:`forward_eval`) is not modified, so backward may be called on it more than once.
    Returns dx (x's shape, dtype and memory layout), then dgamma and dbeta, float64 (C,), each
    None when forward had no gamma or beta.

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


# --- second derivatives: the gradients of a function of backward's outputs ------------------------


@propagating
def double_backward(
    g_dx: ArrayLike,
    g_dgamma: ArrayLike | None,
    g_dbeta: ArrayLike | None,
    dy: ArrayLike,
    cache: BatchNormCache,
) -> tuple[Array, Vector | None, Array]:
    """Gradients of ``<g_dx, dx> + <g_dgamma, dgamma> + <g_dbeta, dbeta>`` with respect to x,
    gamma and dy, where ``dx, dgamma, dbeta = backward(dy, cache)``.

    What autograd needs to differentiate through :func:`backward`: gradient penalties, double
    backpropagation, meta-learning. PyTorch's counterpart is ``batchnorm_double_backward``.

    Parameters
    ----------
    g_dx : array_like, x's shape, float16, float32 or float64
        The weight of dx (the upstream gradient of dx).
    g_dgamma, g_dbeta : array_like of shape (C,), or None
        The weights of dgamma and dbeta; None means 0. Must be None when forward had no gamma
        (no beta), since backward then returns no dgamma (dbeta).
    dy : array_like, x's shape
        The dy given to backward.
    cache : BatchNormCache
        From :func:`forward_train` of a whole batch (the statistics are functions of x) or
        :func:`forward_eval` (the statistics are constants). Not modified.

    Returns
    -------
    gx : ndarray, x's shape, dtype and memory layout
    ggamma : ndarray of shape (C,), float64, or None when forward had no gamma
    gdy : ndarray, x's shape, dtype and memory layout

    Raises
    ------
    TypeError
        cache is not a BatchNormCache, or g_dx or dy are not float arrays.
    ValueError
        g_dx or dy do not have x's shape, g_dgamma or g_dbeta do not have shape (C,) or weight
        a gradient backward does not return, or cache is of one part (``stats=``).

    Notes
    -----
    Per channel, with ``u = g_dx``, ``a = g_dgamma``, ``b = g_dbeta``, ``s = invstd``
    (``gamma`` = 1 without gamma) and means over the m values of the channel::

        dyc    = dy - mean(dy) - xhat * mean(dy * xhat)    # dx = gamma * s * dyc
        uc     = u - mean(u) - xhat * mean(u * xhat)
        gdy    = gamma * s * uc + a * xhat + b
        ggamma = s * sum(u * dyc)
        gx     = s * (a - gamma * s * mean(u * xhat)) * dyc
                 - gamma * s**2 * (mean(dy * xhat) * uc + mean(u * dyc) * xhat)

    in training mode. In eval mode ``gdy`` is ``gamma * s * u + a * xhat + b``, ``ggamma =
    s * sum(u * dy)`` and ``gx = a * s * dy``. docs/math.md derives both; all of it is
    computed in float64 and eps is kept exactly.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> from batchnorm import functional as F
    >>> x = np.array([[0.0], [1.0], [5.0]])
    >>> y, cache = bn.forward_train(x, np.ones(1), np.zeros(1))
    >>> dy = np.array([[1.0], [0.0], [-1.0]])
    >>> grads = F.double_backward(np.ones_like(x), None, None, dy, cache)
    >>> [bool(np.abs(g).max() < 1e-12) for g in grads]  # sum(dx) = 0 whatever x, gamma, dy
    [True, True, True]
    >>> _, _, gdy = F.double_backward(np.zeros_like(x), None, np.ones(1), dy, cache)
    >>> gdy.ravel()  # the gradient of dbeta = sum(dy) with respect to dy
    array([1., 1., 1.])
    """
    _validate.cache_type(cache, BatchNormCache)
    c, shape = len(cache.mean), cache.shape
    u3 = _in_float64(_validate.dx_weight(g_dx, shape), cache)
    dy3 = _in_float64(_validate.upstream_gradient(dy, shape), cache)
    a = _validate.parameter_weight(g_dgamma, "g_dgamma", "gamma", cache.gamma is not None, c)
    b = _validate.parameter_weight(g_dbeta, "g_dbeta", "beta", cache.has_beta, c)
    gamma = np.ones(c) if cache.gamma is None else cache.gamma
    s = cache.invstd
    if not cache.training:  # the statistics are constants: backward is linear in dy
        gdy3 = u3 * (gamma * s)[:, None] + b[:, None]
        if cache.gamma is not None:  # only dgamma involves x
            gdy3 += _xhat3(cache) * a[:, None]
        gx3 = dy3 * (a * s)[:, None]
        ggamma = s * _channel_sums(u3, dy3)[1]
    else:
        _validate.whole_batch_cache(cache.count, shape, cache.axis)
        xhat3, m = _xhat3(cache), cache.count
        dyc3, mean_dy_xhat = _project(dy3, xhat3, m)
        uc3, mean_u_xhat = _project(u3, xhat3, m)
        sum_u_dyc = _channel_sums(u3, dyc3)[1]
        gdy3 = uc3 * (gamma * s)[:, None] + xhat3 * a[:, None] + b[:, None]
        gx3 = dyc3 * (s * (a - gamma * s * mean_u_xhat))[:, None]
        gx3 -= uc3 * (gamma * s * s * mean_dy_xhat)[:, None]
        gx3 -= xhat3 * (gamma * s * s * sum_u_dyc / m)[:, None]
        ggamma = s * sum_u_dyc
    return (
        _layout.restore(gx3.astype(cache.dtype, copy=False), shape, cache.axis, cache._moved),
        None if cache.gamma is None else ggamma,
        _layout.restore(gdy3.astype(cache.dtype, copy=False), shape, cache.axis, cache._moved),
    )


def _project(v3: Array, xhat3: Array, m: int) -> tuple[Array, Vector]:
    """(v - mean(v) - xhat * mean(v * xhat), mean(v * xhat)) per channel: v with its
    components along the constant vector and along xhat taken out, as backward does to dy."""
    total, dot = _channel_sums(v3, xhat3)
    mean_v_xhat = dot / m
    vc3 = v3 - (total / m)[:, None]
    vc3 -= xhat3 * mean_v_xhat[:, None]
    return vc3, mean_v_xhat


def _xhat3(cache: BatchNormCache) -> Array:
    """xhat = (x - mean) * invstd as a (P, C, S) float64 array, from the cache's centred copy
    of x. The one place outside the first-order kernels that reads how the cache holds x."""
    assert cache._data is not None
    xhat3 = cache._data.astype(np.float64)  # a copy: the cache is never modified
    xhat3 -= cache._resid[:, None]  # the mean, measured from data's origin, kept exact
    xhat3 *= cache.invstd[:, None]
    return xhat3


def _in_float64(a: Array, cache: BatchNormCache) -> Array:
    """An array of x's shape as the C-contiguous (P, C, S) float64 array matching x's."""
    return _layout.like(a, cache.axis, cache._moved, np.dtype(np.float64))


def _channel_sums(v3: Array, w3: Array) -> tuple[Vector, Vector]:
    """Per-channel sum(v) and sum(v * w) of (P, C, S) float64 arrays."""
    return _layout.sums(v3, w3, np.zeros(v3.shape[1]), centred=True)


def _gradient(dy: ArrayLike, cache: BatchNormCache) -> Array:
    """dy checked against the cache and viewed as (P, C, S) in the cache's working dtype."""
    dya = _validate.upstream_gradient(dy, cache.shape)
    cdt = _validate.COMPUTE_DTYPES[cache.dtype]
    work = _layout.working_dtype(dya.size, cdt) if cache._data is None else cache._data.dtype
    return _layout.like(dya, cache.axis, cache._moved, work)


def _sums(dy3: Array, cache: BatchNormCache) -> tuple[Vector, Vector]:
    # xhat = (data - resid) * invstd, resid the mean measured from data's origin.
    if cache._data is None:
        raise _validate.sums_need_data()
    sum_dy, dot = _layout.sums(dy3, cache._data, cache._resid, centred=cache.training)
    return sum_dy, cache.invstd * dot


def _input(dy3: Array, cache: BatchNormCache, sum_dy: Any, sum_dy_xhat: Any) -> Array:
    a = cache.invstd if cache.gamma is None else cache.gamma * cache.invstd
    if not cache.training:
        dx3 = _layout.scale_shift(dy3, a, None, cache.dtype)
    else:
        # dx = a * dy + b * data + c with b = a * b1, c = a * c1 (docs/math.md).
        assert cache._data is not None
        m = cache.count
        b1 = cache.invstd * sum_dy_xhat
        b1 /= -m  # in place, and dividing by -m: the values of the textbook order, fewer calls
        c1 = sum_dy / -m
        c1 -= b1 * cache._resid
        dx3 = _layout.train_dx(cache._data, dy3, a, b1, c1, cache.dtype)
    return _layout.restore(dx3, cache.shape, cache.axis, cache._moved)
