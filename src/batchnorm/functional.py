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

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

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


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _propagating(kernel: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a kernel with NumPy's "invalid value" and "overflow" warnings silenced.

    NaN and inf in the input propagate to the output by design (callers such as BatchNorm
    check the statistics), so the warnings NumPy raises on the way would only be noise, and
    errors under ``filterwarnings = error``. A new errstate per call keeps this thread-safe.
    """

    @functools.wraps(kernel)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with np.errstate(invalid="ignore", over="ignore"):
            return kernel(*args, **kwargs)

    return run


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
    # x - shift in the compute dtype, C-contiguous (P, C, S); owned by the cache. None for an
    # eval cache without gamma: its backward, dx = dy * invstd, needs no x.
    _data: Array | None
    # The per-channel value subtracted from x to make _data (float64, exact in the compute dtype).
    _shift: Vector

    def __repr__(self) -> str:
        mode = "train" if self.training else "eval"
        return (
            f"BatchNormCache({mode}, shape={self.shape}, dtype={self.dtype}, axis={self.axis}, "
            f"count={self.count}, eps={self.eps:g}, affine={self.gamma is not None})"
        )


@_propagating
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
    # Only dgamma needs x after this call, so only a call with gamma keeps a copy of it.
    if g is None:
        data = None
        y = _scale_shift(_contiguous(x3, cdt), scale, offset, xa.dtype)
    else:
        data, y = _copy_scale_shift(x3, cdt, scale, offset, xa.dtype)
    y = y.reshape(xa.shape)
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
        _data=data,
        _shift=np.zeros(num_channels),
    )
    return y, cache


@_propagating
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
    cdt = _validate.COMPUTE_DTYPES[cache.dtype]
    count = cache.count
    dy3 = _contiguous(_as_pcs(dya, cache.axis), cdt)
    g = cache.gamma
    invstd = cache.invstd
    a = invstd if g is None else g * invstd

    if data is None:  # eval mode without gamma: dx = dy * invstd, and dbeta if asked
        dbeta = _channel_sum(dy3) if cache.has_beta else None
        return _scale_shift(dy3, a, None, cache.dtype).reshape(cache.shape), None, dbeta

    # xhat = (data - ref) * invstd, where ref is the mean measured from data's origin.
    ref = cache.mean - cache._shift
    if cache.training:
        # ref is the small remainder of a shifted mean: no cancellation in the sum below.
        sum_dy, dot = _sum_and_dot(dy3, data)
        dot -= ref * sum_dy
    else:
        # data is x itself here and ref the given mean: centre first, then sum.
        ref_c = ref.astype(cdt)
        sum_dy, dot = _sum_and_dot(dy3, _subtract_per_channel(data, ref_c))
        dot -= (ref - ref_c) * sum_dy
    sum_dy_xhat = invstd * dot
    dbeta = sum_dy if cache.has_beta else None
    dgamma = None if g is None else sum_dy_xhat

    if not cache.training:
        return _scale_shift(dy3, a, None, cache.dtype).reshape(cache.shape), dgamma, dbeta
    # dx = a * dy + b * data + c with b = a * b1 and c = a * c1 (docs/math.md).
    b1 = -invstd * sum_dy_xhat / count
    c1 = -sum_dy / count - b1 * ref
    dx = _train_dx(data, dy3, a, b1, c1)
    return dx.astype(cache.dtype, copy=False).reshape(cache.shape), dgamma, dbeta


@_propagating
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


# --- helpers: views, layouts, slabs and per-channel reductions ----------------------------------
#
# x is handled as a (P, C, S) view: P = prod(shape[:axis]), S = prod(shape[axis+1:]). What makes
# the kernels fast in NumPy (before/after timings in docs/performance.md):
#
# * Few passes over memory. Centring costs one pass, not two: the shift comes from a small
#   leading sample of the batch, with a full-mean shift only when that sample was too far off
#   (_shifted_moments). dx is built in place in its own buffer, with no temporary of x's size.
# * Large arrays are processed in slabs of whole samples (_SLAB_BYTES), so that what one step
#   writes is still in cache when the next step reads it: centring and the sums of the centred
#   values share one trip to memory, and so do the four steps that build dx.
# * Element-wise work runs on long rows. NumPy runs `x * v` with a per-channel v broadcast as
#   (C, 1) over (P, C, S) 1.5x (S = 3136) to 2.2x (S = 49) slower than with an equally long v
#   of its own, and (B, C) data (S = 1) is the worst case. So the contiguous data is viewed as
#   (R, L) rows of k whole samples each, and every per-channel vector is expanded once to a
#   row of L values (_layout).
# * Per-channel sums are matrix-vector products with a ones vector, which BLAS runs at memory
#   speed; ndarray.sum with a float64 accumulator converts element by element, 2-4x slower.
#   Accuracy is kept by bounding how many terms BLAS adds in the compute dtype (at most
#   _BLAS_TERMS over P; over S as many as a feature map holds) and adding the rest in float64.

# Target row length (elements) of the element-wise view: long enough that the per-loop cost
# vanishes, short enough that the expanded per-channel rows stay in cache.
_ROW_LENGTH = 16384
# Largest expanded per-channel row (bytes of one sample, C * S values), and fewest rows the
# element-wise view must have, so that an expanded row costs at most 1/8 of x's memory.
_ROW_MAX_BYTES = 1 << 20
_MIN_ROWS = 8
# Largest number of rows BLAS sums in the compute dtype before float64 takes over.
_BLAS_TERMS = 256
# Largest run of one feature map summed in the compute dtype (bounds float32 rounding growth).
_ROW_TERMS = 4096
# Values per channel in the leading sample that estimates the shift.
_SHIFT_SAMPLE = 32
# Bytes of one array per slab; arrays up to _SLAB_MIN_BYTES are done in one piece.
_SLAB_BYTES = 1 << 20
_SLAB_MIN_BYTES = 16 << 20


def _shifted_moments(
    x3: Array, cdt: np.dtype[Any], count: int
) -> tuple[Array, Vector, Vector, Vector]:
    """Centre x3 (P, C, S) by a first mean estimate; return (data, shift, resid, var).

    ``data = x3 - shift`` in the compute dtype, C-contiguous, with ``shift`` (float64, exactly
    representable in cdt) a first estimate of the mean; ``resid`` is the exact remainder, so the
    mean is ``shift + resid``, and ``var`` the biased variance. Summing small centred values and
    correcting by the remainder (Chan, Golub and LeVeque's two-pass algorithm) avoids the
    cancellation of the one-pass E[x^2] - E[x]^2.

    The shift is the mean of the first ~_SHIFT_SAMPLE values of each channel, which saves a
    full pass over x. The correction ``var = E[data^2] - resid^2`` loses about
    log2(1 + resid^2 / var) bits, so at most one while every channel's sample mean lies within
    one standard deviation of its batch mean. When one does not (an ordered batch, an outlier
    up front), x is centred again on the batch mean just measured and the sums are redone, as
    the full two-pass algorithm would.
    """
    x3 = _contiguous(x3, cdt)
    p, _, s = x3.shape
    head = x3[: min(p, -(-_SHIFT_SAMPLE // s))]
    shift = (_channel_sum(head) / max(head.shape[0] * s, 1)).astype(cdt)
    data = np.empty_like(x3)
    resid, var = _centre(x3, shift, data, count)
    if (resid * resid > var).any():
        shift = (shift + resid).astype(cdt)
        resid, var = _centre(x3, shift, data, count)
    return data, shift.astype(np.float64), resid, np.maximum(var, 0.0)


def _centre(x3: Array, shift: Array, data: Array, count: int) -> tuple[Vector, Vector]:
    """data = x3 - shift; return the mean of data and its (unclipped) biased variance
    E[data^2] - mean^2, summing each slab while it is in cache."""
    sums = []
    for (_, d_slab), (x_view, d_view), (op,) in _slabs((x3, data), shift):
        np.subtract(x_view, op, out=d_view)
        sums.append((_channel_sum(d_slab), _channel_dot(d_slab, d_slab)))
    total, total_sq = _add_up(sums)
    resid = total / count
    return resid, total_sq / count - resid * resid


def _sum_and_dot(dy3: Array, data: Array) -> tuple[Vector, Vector]:
    """Per-channel sum(dy) and sum(dy * data), slab by slab."""
    sums = [
        (_channel_sum(dy_slab), _channel_dot(dy_slab, d_slab))
        for (dy_slab, d_slab), _, _ in _slabs((dy3, data))
    ]
    return _add_up(sums)


def _add_up(sums: list[tuple[Vector, Vector]]) -> tuple[Vector, Vector]:
    """Add up per-slab pairs of per-channel sums."""
    first, second = sums[0]
    for a, b in sums[1:]:
        first = first + a
        second = second + b
    return first, second


def _train_dx(data: Array, dy3: Array, a: Vector, b1: Vector, c1: Vector) -> Array:
    """dx = a * dy + (a * b1) * data + a * c1, evaluated as a * (data * b1 + dy + c1): four
    passes in place on dx (each slab's four while it is in cache), no temporary of x's size."""
    dx = np.empty_like(data)
    for _, (d_view, dy_view, dx_view), (a_op, b1_op, c1_op) in _slabs((data, dy3, dx), a, b1, c1):
        np.multiply(d_view, b1_op, out=dx_view)
        dx_view += dy_view
        dx_view += c1_op
        dx_view *= a_op
    return dx


def _scale_shift(a: Array, scale: Vector, offset: Vector | None, dtype: np.dtype[Any]) -> Array:
    """a * scale + offset per channel for C-contiguous (P, C, S) a, computed in a's dtype and
    returned in dtype: a multiply into a new array and an in-place add."""
    out = np.empty_like(a)
    if offset is None or a.nbytes <= _SLAB_MIN_BYTES:
        # One expanded vector alive at a time: with few samples one costs up to 1/8 of x.
        _apply(np.multiply, a, scale, out)
        if offset is not None:
            _apply(np.add, out, offset, out)
    else:  # slab by slab, adding while the product is in cache
        for _, (a_view, out_view), (scale_op, offset_op) in _slabs((a, out), scale, offset):
            np.multiply(a_view, scale_op, out=out_view)
            out_view += offset_op
    result: Array = out.astype(dtype, copy=False)
    return result


def _apply(op: np.ufunc, a: Array, vector: Vector | Array, out: Array) -> None:
    """out = op(a, vector) per channel, for C-contiguous (P, C, S) a and out."""
    for _, (a_view, out_view), (operand,) in _slabs((a, out), vector):
        op(a_view, operand, out=out_view)


def _copy_scale_shift(
    x3: Array, cdt: np.dtype[Any], scale: Vector, offset: Vector, dtype: np.dtype[Any]
) -> tuple[Array, Array]:
    """(a C-contiguous copy of x3 in cdt, x3 * scale + offset in dtype); for large arrays
    slab by slab, so that each slab of the copy is scaled while it is still in cache."""
    data = np.empty(x3.shape, cdt)
    if data.nbytes <= _SLAB_MIN_BYTES or not x3.flags.c_contiguous:
        np.copyto(data, x3)
        return data, _scale_shift(data, scale, offset, dtype)
    out = np.empty_like(data)
    for (d_slab, x_slab, _), (d_view, _, out_view), (scale_op, offset_op) in _slabs(
        (data, x3, out), scale, offset
    ):
        np.copyto(d_slab, x_slab)
        np.multiply(d_view, scale_op, out=out_view)
        out_view += offset_op
    result: Array = out.astype(dtype, copy=False)
    return data, result


def _slabs(
    arrays: tuple[Array, ...], *vectors: Vector | Array
) -> Iterator[tuple[tuple[Array, ...], tuple[Array, ...], list[Array]]]:
    """Walk same-shaped C-contiguous (P, C, S) arrays together, a slab of samples at a time.

    Yields (the arrays' (n, C, S) slabs, the same slabs in the element-wise view, the
    per-channel vectors as operands that broadcast against that view, in the first array's
    dtype). The view is chosen once for the whole arrays (_layout); arrays up to
    _SLAB_MIN_BYTES are one slab."""
    p, c, s = arrays[0].shape
    dtype = arrays[0].dtype
    mode, size = _layout(p, c, s, dtype.itemsize)
    ops = _per_channel(s, mode, size, dtype, *vectors)
    sample_bytes = c * s * dtype.itemsize
    if p * sample_bytes <= _SLAB_MIN_BYTES:
        yield arrays, _views(arrays, mode, size), ops
        return
    k = size // (c * s) if mode == "rows" else 1  # a slab holds whole rows
    step = max(1, _SLAB_BYTES // (sample_bytes * k)) * k
    for start in range(0, p, step):
        blocks = tuple([arr[start : start + step] for arr in arrays])
        yield blocks, _views(blocks, mode, size), ops


def _views(blocks: tuple[Array, ...], mode: str, size: int) -> tuple[Array, ...]:
    return tuple([b.reshape(-1, size) for b in blocks]) if mode == "rows" else blocks


def _as_pcs(x: Array, axis: int) -> Array:
    """View x as (P, C, S): P = prod(shape[:axis]), S = prod(shape[axis+1:]); copies only if
    x's memory layout does not allow the view."""
    shape = x.shape
    return x.reshape(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))


def _contiguous(a: Array, dtype: np.dtype[Any]) -> Array:
    """a itself when it is C-contiguous in dtype, else a C-contiguous copy in dtype."""
    result: Array = np.ascontiguousarray(a, dtype=dtype)
    return result


@functools.lru_cache(maxsize=64)
def _layout(p: int, c: int, s: int, itemsize: int) -> tuple[str, int]:
    """How element-wise work views C-contiguous (P, C, S) data, as (mode, size).

    * ("rows", L): rows of L = k * C * S values, k whole samples each (k the largest divisor
      of P with L <= _ROW_LENGTH and P / k >= _MIN_ROWS): every row has the same channel
      pattern, so one expanded row per vector serves them all. (B, C) data always takes
      rows: broadcasting a (C,) vector over B short rows is the slow case itself.
    * ("planes", 0): (C, 1) vectors broadcast over (P, C, S), when an expanded row would
      cost more than 1/_MIN_ROWS of x's memory (fewer than _MIN_ROWS samples) or more than
      _ROW_MAX_BYTES. NumPy runs these passes 1.5x (S = 3136) to 2.2x (S = 49) slower."""
    cs = c * s
    if cs > 0 and (s == 1 or (p >= _MIN_ROWS and cs * itemsize <= _ROW_MAX_BYTES)):
        most = min(p // _MIN_ROWS, _ROW_LENGTH // max(cs, 1))
        return "rows", cs * next((d for d in range(most, 1, -1) if p % d == 0), 1)
    return "planes", 0


def _per_channel(
    s: int, mode: str, size: int, dtype: np.dtype[Any], *vectors: Vector | Array
) -> list[Array]:
    """Per-channel vectors (n,) as operands in dtype: expanded to one row of `size` values
    (k repeats of each channel's value S times) in "rows" mode, else shaped (n, 1)."""
    if not vectors:
        return []
    stacked = np.array(vectors, dtype=dtype)
    if mode != "rows":
        return list(stacked[:, :, None])
    pattern = np.repeat(stacked, s, axis=1) if s > 1 else stacked  # one sample: (m, n * S)
    k = size // max(pattern.shape[1], 1)
    if k == 1:
        return list(pattern)
    expanded = np.empty((len(vectors), k, pattern.shape[1]), dtype)
    expanded[...] = pattern[:, None, :]
    return list(expanded.reshape(len(vectors), size))


def _subtract_per_channel(a: Array, vector: Array) -> Array:
    """a - vector per channel for C-contiguous (P, C, S) a, as a new array."""
    result = np.empty_like(a)
    _apply(np.subtract, a, vector, result)
    return result


def _ones(n: int, dtype: np.dtype[Any]) -> Array:
    """A read-only ones vector; the short ones (up to 64K values) are kept for reuse."""
    return _cached_ones(n, dtype) if n <= 1 << 16 else np.ones(n, dtype)


@functools.lru_cache(maxsize=16)
def _cached_ones(n: int, dtype: np.dtype[Any]) -> Array:
    ones: Array = np.ones(n, dtype)
    ones.flags.writeable = False
    return ones


@functools.lru_cache(maxsize=64)
def _blas_split(p: int) -> int:
    """k, the smallest divisor of P with P / k <= _BLAS_TERMS: sums over P run as BLAS sums of
    P / k rows in the compute dtype, then k partial sums added in float64. When no such
    divisor lies near P / _BLAS_TERMS (P prime, say), this returns 1 and the callers split P."""
    first = -(-p // _BLAS_TERMS)
    return next((k for k in range(first, min(p, 8 * first) + 1) if p % k == 0), 1)


def _channel_sum(a: Array) -> Vector:
    """Per-channel sum of contiguous (P, C, S) a in float32/float64, as float64 (C,)."""
    p, c, s = a.shape
    if a.size == 0:
        return np.zeros(c)
    if s == 1:
        k = _blas_split(p)
        if p // k > _BLAS_TERMS:  # no divisor fits: split off the last P % _BLAS_TERMS rows
            cut = p - p % _BLAS_TERMS
            return _channel_sum(a[:cut]) + _channel_sum(a[cut:])
        return _fold(_ones(p // k, a.dtype) @ a.reshape(p // k, k * c), c)
    parts = [piece @ _ones(piece.shape[-1], a.dtype) for piece in _pieces(a.reshape(p * c, s))]
    return _fold(_add_pieces(parts, p * c), c)


def _channel_dot(a: Array, b: Array) -> Vector:
    """Per-channel sum of a * b for contiguous (P, C, S) arrays, without a temporary of their
    size (einsum multiplies and adds in one loop), as float64 (C,)."""
    p, c, s = a.shape
    if a.size == 0:
        return np.zeros(c)
    if s == 1:
        k = _blas_split(p)
        if p // k > _BLAS_TERMS:
            cut = p - p % _BLAS_TERMS
            return _channel_dot(a[:cut], b[:cut]) + _channel_dot(a[cut:], b[cut:])
        rows = (p // k, k * c)
        return _fold(np.einsum("rl,rl->l", a.reshape(rows), b.reshape(rows)), c)
    pieces = zip(_pieces(a.reshape(p * c, s)), _pieces(b.reshape(p * c, s)), strict=True)
    parts = [np.einsum("...s,...s->...", u, v) for u, v in pieces]
    return _fold(_add_pieces(parts, p * c), c)


def _pieces(rows: Array) -> list[Array]:
    """(n, S) rows as views of at most _ROW_TERMS terms per row: (n, k, _ROW_TERMS) and the
    (n, S % _ROW_TERMS) rest. Summing each piece in the compute dtype and the pieces in
    float64 makes float32 rounding grow with the piece, not with the feature map."""
    s = rows.shape[1]
    if s <= _ROW_TERMS:
        return [rows]
    cut = s - s % _ROW_TERMS
    pieces = [rows[:, :cut].reshape(rows.shape[0], -1, _ROW_TERMS)]
    return [*pieces, rows[:, cut:]] if cut < s else pieces


def _add_pieces(parts: Sequence[Array], n: int) -> Array:
    """Per-row totals of the pieces' sums, in float64 when there is more than one piece."""
    if len(parts) == 1 and parts[0].ndim == 1:
        return parts[0]
    total: Array = np.add.reduce(
        [part.reshape(n, -1).sum(axis=1, dtype=np.float64) for part in parts]
    )
    return total


def _fold(partial: Array, c: int) -> Vector:
    """Add partial sums laid out as (n, C) per channel, in float64."""
    rows = partial.reshape(-1, c)
    total: Vector = (
        rows[0].astype(np.float64) if rows.shape[0] == 1 else rows.sum(axis=0, dtype=np.float64)
    )
    return total
