"""Fold an eval-mode BatchNorm into the linear or convolution layer before it.

In eval mode BatchNorm is a fixed per-channel affine map, so ``BN(W x + b)`` equals
``W' x + b'`` with::

    scale = gamma / sqrt(running_var + eps)
    W'    = W * scale           (row c of W, or filter c of a conv, times scale[c])
    b'    = (b - running_mean) * scale + beta

This removes the BatchNorm from an inference graph. Folding is only valid in eval mode: in
training mode BatchNorm uses each batch's own statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _validate
from batchnorm.layer import BatchNorm

__all__ = ["fold_batchnorm"]


def fold_batchnorm(
    weight: ArrayLike, bias: ArrayLike | None, layer: BatchNorm
) -> tuple[NDArray[np.floating[Any]], NDArray[np.floating[Any]]]:
    """Return the weight and bias of a layer equal to (linear or conv) followed by ``layer``.

    Parameters
    ----------
    weight : array_like, float
        (out_features, in_features) for a linear layer ``y = x @ W.T + b``, or
        (C_out, C_in, kh, kw) for a convolution (any (C_out, ...) works): axis 0 must match
        the BatchNorm's channels.
    bias : array_like of shape (C_out,), or None for a layer without bias
    layer : BatchNorm
        In eval mode, with running statistics.

    Returns
    -------
    weight, bias : ndarray
        New arrays (the inputs are not modified), in weight's dtype; the bias is always
        returned, also when the original layer had none.

    Raises
    ------
    TypeError
        ``layer`` is not a BatchNorm, or weight or bias is not a real float/int array.
    ValueError
        The layer is in training mode or keeps no running statistics, the shapes do not
        match, or weight or bias holds NaN or inf.
    FloatingPointError
        The folded weight or bias overflows weight's dtype (fold in float64 then).

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> layer = bn.BatchNorm(2).eval()
    >>> layer.running_mean[:] = [1.0, -1.0]
    >>> w, b = bn.fold.fold_batchnorm(np.eye(2), None, layer)
    >>> np.round(b, 4)
    array([-1.,  1.])
    """
    _validate.fold_target(layer, BatchNorm)
    _validate.foldable(layer.training, layer.track_running_stats)
    w, b = _validate.fold_weight(weight, bias, layer.num_features)
    assert layer.running_mean is not None and layer.running_var is not None
    # A result beyond the range of weight's dtype becomes inf here, and is refused below.
    with np.errstate(over="ignore", invalid="ignore"):
        scale = 1.0 / np.sqrt(layer.running_var + layer.eps)
        if layer.gamma is not None:
            scale = layer.gamma * scale
        shift = (
            -layer.running_mean * scale
            if layer.beta is None
            else layer.beta - layer.running_mean * scale
        )
        new_weight = (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype, copy=False)
        new_bias = (b * scale + shift).astype(w.dtype, copy=False)
    _validate.folded_range(new_weight, new_bias)
    return new_weight, new_bias
