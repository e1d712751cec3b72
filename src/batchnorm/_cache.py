"""The record that links a forward call to its backward (private; public as
``batchnorm.BatchNormCache``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.floating[Any]]
Vector = NDArray[np.float64]


@dataclass(frozen=True, eq=False, repr=False, init=False)
class BatchNormCache:
    """What the backward stages need from one forward call, and the statistics it used.

    Attributes
    ----------
    mean, var : ndarray of shape (C,), float64
        The statistics x was normalized with: after :func:`~batchnorm.forward_train` the mean
        and the *biased* variance of the whole normalization batch (x itself, or the batch
        given by ``stats=``); after :func:`~batchnorm.forward_eval` the given statistics.
    count : int
        m, the number of values per channel of the whole normalization batch.
    invstd : ndarray of shape (C,), float64
        ``1 / sqrt(var + eps)``.
    training : bool
        True for a cache from forward_train, False for forward_eval.
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
    mean_lo : ndarray of shape (C,), float64
        What rounding left of the mean: ``mean + mean_lo`` is the mean to about 2^-104
        relative (zeros after forward_eval). :class:`~batchnorm.PopulationStats` takes it
        with ``update_from_moments(..., mean_lo=cache.mean_lo)``.
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
    # The mean minus _shift, exact to rounding of its own size (not of the mean's): the xhat
    # of backward is (_data - _resid) * invstd.
    _resid: Vector
    # Whether (P, C, S) was taken channels-last (_layout.pcs), so that dx keeps x's layout.
    _moved: bool

    def __init__(
        self, mean: Vector, var: Vector, count: int, invstd: Vector, training: bool, eps: float,
        axis: int, shape: tuple[int, ...], dtype: np.dtype[Any], gamma: Vector | None,
        has_beta: bool, _data: Array | None, _shift: Vector, _resid: Vector, _moved: bool,
    ) -> None:  # fmt: skip
        # The generated __init__ of a frozen dataclass sets the 15 fields one by one through
        # object.__setattr__: twice the time of this, a few us of every small training step.
        self.__dict__.update(
            mean=mean, var=var, count=count, invstd=invstd, training=training, eps=eps,
            axis=axis, shape=shape, dtype=dtype, gamma=gamma, has_beta=has_beta, _data=_data,
            _shift=_shift, _resid=_resid, _moved=_moved,
        )  # fmt: skip

    @property
    def mean_lo(self) -> Vector:
        # Without stats= the mean is fl(shift + resid) and this is TwoSum's error term (exact
        # while |resid| <= |shift|; else the mean is of resid's size and needs no remainder);
        # with stats= shift is the given mean rounded and this gives back its mean_lo.
        lo: Vector = (self._shift - self.mean) + self._resid
        return lo

    def __repr__(self) -> str:
        mode = "train" if self.training else "eval"
        return (
            f"BatchNormCache({mode}, shape={self.shape}, dtype={self.dtype}, axis={self.axis}, "
            f"count={self.count}, eps={self.eps:g}, affine={self.gamma is not None})"
        )
