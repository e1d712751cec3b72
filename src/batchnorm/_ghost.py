"""A training batch as consecutive parts along axis 0: the machinery of ghost batches.

``BatchNorm(ghost_batch_size=k)`` normalizes each run of k samples with its own statistics
(Hoffer, Hubara and Soudry, "Train longer, generalize better", 2017). This module only splits
the batch, puts the parts' outputs back together and adds up their gradients; the math of each
part is :mod:`batchnorm.functional`'s, called by the layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _validate
from batchnorm.functional import BatchNormCache

Array = NDArray[np.floating[Any]]
Vector = NDArray[np.float64]
Gradients = tuple[Array, Vector | None, Vector | None]


class Part(NamedTuple):
    """One normalization batch of a training forward: its cache, and for BatchRenorm the
    correction (r, d) that backward treats as constants (None for BatchNorm)."""

    cache: BatchNormCache
    r: Vector | None = None
    d: Vector | None = None


def spans(shape: tuple[int, ...], axis: int, k: int | None) -> list[tuple[int, int]]:
    """[start, stop) along axis 0 of each ghost batch of k samples (the last may be shorter).

    k None: the whole batch is one part (its own checks apply later). Every ghost batch must
    hold two values per channel; this is checked before anything is computed.
    """
    n = shape[0]
    k = _validate.ghost_batch_size(k)  # also when the attribute was set by hand
    if k is None:
        return [(0, n)]
    ax = _validate.channel_axis(shape, axis)
    _validate.ghost_axis(shape, ax)
    per_sample = math.prod(shape) // (n * shape[ax]) if n and shape[ax] else 0
    bounds = [(lo, min(lo + k, n)) for lo in range(0, n, k)] or [(0, 0)]
    for index, (lo, hi) in enumerate(bounds):
        if (hi - lo) * per_sample < 2:
            _validate.ghost_too_small(shape, k, index, len(bounds), lo, hi)
    return bounds


def join(x: Array, outputs: Sequence[Array], bounds: Sequence[tuple[int, int]]) -> Array:
    """The parts' outputs in one array of x's shape, dtype and memory layout."""
    if len(outputs) == 1:
        return outputs[0]
    y = np.empty_like(x)
    for (lo, hi), part in zip(bounds, outputs, strict=True):
        y[lo:hi] = part
    return y


def backward(
    dy: ArrayLike, parts: Sequence[Part], step: Callable[[Array, Part], Gradients]
) -> Gradients:
    """dx of every part in place, and dgamma and dbeta added up over the parts in order."""
    first = parts[0].cache
    sizes = [part.cache.shape[0] for part in parts]
    dya = _validate.upstream_gradient(dy, (sum(sizes), *first.shape[1:]))
    dx = np.empty_like(dya, dtype=first.dtype)
    dgamma: Vector | None = None
    dbeta: Vector | None = None
    lo = 0
    for size, part in zip(sizes, parts, strict=True):
        dx[lo : lo + size], g, b = step(dya[lo : lo + size], part)
        dgamma = g if dgamma is None or g is None else dgamma + g
        dbeta = b if dbeta is None or b is None else dbeta + b
        lo += size
    return dx, dgamma, dbeta
