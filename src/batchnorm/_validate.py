"""Input checks shared by every module: the one place where error messages are written.

Each message says what was expected, what arrived, and what to do about it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from numpy.typing import NDArray

#: Input dtype -> dtype the arithmetic runs in. float16 is computed in float32.
COMPUTE_DTYPES: dict[np.dtype[Any], np.dtype[Any]] = {
    np.dtype(np.float16): np.dtype(np.float32),
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
}


def float_array(x: Any, name: str = "x") -> NDArray[np.floating[Any]]:
    """Return `x` as a NumPy array of float16, float32 or float64 (no copy when it already is)."""
    if x is None:
        raise TypeError(f"{name} must be a floating-point array; got None.")
    arr = np.asarray(x)
    if arr.dtype not in COMPUTE_DTYPES:
        hint = (
            f"convert it first, e.g. {name}.astype(np.float32)"
            if arr.dtype.kind in "biuf"
            else "pass real-valued float16, float32 or float64 data"
        )
        raise TypeError(
            f"{name} must have dtype float16, float32 or float64; got dtype {arr.dtype}. "
            f"Batch normalization is defined for real floating-point data: {hint}."
        )
    return arr


def channel_axis(shape: tuple[int, ...], axis: Any, name: str = "x") -> int:
    """Check that `shape` is (N, C, *spatial)-like and return `axis` as a non-negative int."""
    if len(shape) < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions, (N, C) or (N, C, *spatial); got shape "
            f"{shape} ({len(shape)}-d). For a single sample add a batch axis, e.g. x[None]."
        )
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(
            f"axis must be an int (1 for (N, C, ...), -1 for channels-last); got {axis!r}."
        )
    ndim = len(shape)
    if not -ndim <= int(axis) < ndim:
        raise ValueError(
            f"axis {axis} is out of range for {name} of shape {shape}; "
            f"expected an int in [{-ndim}, {ndim - 1}] (1 for (N, C, ...), -1 for channels-last)."
        )
    return int(axis) % ndim


def eps_value(eps: Any) -> float:
    """Check that eps is a finite float > 0 and return it as a float."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive float such as 1e-5; got {eps!r}.")
    value = float(eps)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(
            f"eps must be a finite float > 0 (it keeps 1/sqrt(var + eps) finite); got {eps!r}. "
            "The usual value is 1e-5 (Keras uses 1e-3)."
        )
    return value


def per_channel(
    value: Any, name: str, num_channels: int, *, nonnegative: bool = False
) -> NDArray[np.float64]:
    """Return a per-channel vector as a fresh float64 array of shape (C,), checked."""
    if value is None:
        raise TypeError(f"{name} must be an array of shape ({num_channels},); got None.")
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        raise TypeError(
            f"{name} must hold real numbers (float or int); got dtype {arr.dtype}. "
            f"Pass a float array of shape ({num_channels},)."
        )
    if arr.shape != (num_channels,):
        raise ValueError(
            f"{name} must have shape ({num_channels},), one value per channel; got shape "
            f"{arr.shape}. Check that num_features / the channel axis match your data."
        )
    out = arr.astype(np.float64, copy=True)
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise ValueError(
            f"{name} must be finite; channels {_channel_list(bad)} hold NaN or inf. "
            "Check where these values came from before normalizing with them."
        )
    if nonnegative and (out < 0).any():
        neg = np.flatnonzero(out < 0)
        raise ValueError(
            f"{name} must be >= 0 (it is a variance); channels {_channel_list(neg)} are "
            "negative. Pass a biased or unbiased variance, not a log-variance or a std - mean."
        )
    return out


def training_batch(shape: tuple[int, ...], axis: int) -> int:
    """Check that a training batch has at least two values per channel; return that count."""
    num_channels = shape[axis]
    if num_channels == 0:
        raise ValueError(f"x has no channels: shape {shape} has size 0 on channel axis {axis}.")
    count = math.prod(shape) // num_channels
    if count == 0:
        raise ValueError(
            f"x holds no values per channel (shape {shape}): an empty batch has no batch "
            "statistics. Skip empty batches before calling forward in training mode."
        )
    if count == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training; got input of shape {shape}, "
            f"1 value for each of its {num_channels} channels, whose batch variance is 0 by "
            "definition. Use eval mode (running statistics) to normalize a single sample, or "
            "train with a larger batch. (N=1 is fine when the spatial size is > 1.)"
        )
    return count


def eval_batch(shape: tuple[int, ...], axis: int) -> int:
    """Return the number of values per channel of an eval-mode input (may be 0)."""
    if shape[axis] == 0:
        raise ValueError(f"x has no channels: shape {shape} has size 0 on channel axis {axis}.")
    return math.prod(shape) // shape[axis]


def upstream_gradient(dy: Any, shape: tuple[int, ...]) -> NDArray[np.floating[Any]]:
    """Check that dy is a float array of the forward input's shape."""
    arr = float_array(dy, "dy")
    if arr.shape != shape:
        raise ValueError(
            f"dy must have the shape of the forward input and output, {shape}; got {arr.shape}. "
            "Pass the gradient of the loss with respect to this forward call's output."
        )
    return arr


def cache_type(cache: Any, expected: type) -> None:
    """Check that backward received a cache made by forward_train or forward_eval."""
    if not isinstance(cache, expected):
        raise TypeError(
            f"cache must be the {expected.__name__} returned by forward_train or forward_eval; "
            f"got {type(cache).__name__}. Call y, cache = forward_train(...) first and pass "
            "that cache to backward(dy, cache)."
        )


def _channel_list(indices: NDArray[np.intp], limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    more = f" (and {indices.size - limit} more)" if indices.size > limit else ""
    return f"[{shown}]{more}"
