"""Checks of arrays and of the arguments of the kernels and their stages (functional.py)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "COMPUTE_DTYPES",
    "OneValuePerChannel",
    "axis_value",
    "batch_stats",
    "cache_type",
    "channel_axis",
    "channel_list",
    "channel_sums",
    "dx_weight",
    "eps_value",
    "eval_batch",
    "float_array",
    "no_masked_values",
    "parameter_weight",
    "parts",
    "parts_lo",
    "per_channel",
    "positive_float",
    "sums_need_data",
    "training_batch",
    "upstream_gradient",
    "value_count",
    "whole_batch_cache",
]


#: Input dtype -> dtype the arithmetic runs in. float16 is computed in float32.
COMPUTE_DTYPES: dict[np.dtype[Any], np.dtype[Any]] = {
    np.dtype(np.float16): np.dtype(np.float32),
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
}


def float_array(x: Any, name: str = "x") -> NDArray[np.floating[Any]]:
    """Return `x` as a NumPy array of float16, float32 or float64 (no copy when it already is).

    Data in the other byte order (big-endian here, as some file formats store it) is converted
    to the machine's own, which is what NumPy's operations return for it as well."""
    if x is None:
        raise TypeError(f"{name} must be a floating-point array; got None.")
    if type(x) is not np.ndarray:  # a masked array is a subclass
        no_masked_values(x, name)
    arr = np.asarray(x)
    if arr.dtype not in COMPUTE_DTYPES and arr.dtype.newbyteorder("=") in COMPUTE_DTYPES:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype not in COMPUTE_DTYPES:
        convert = (
            f"{name}.astype(np.float32)"
            if isinstance(x, np.ndarray)
            else f"np.asarray({name}, dtype=np.float32)"
        )
        hint = (
            f"convert it first, e.g. {convert}"
            if arr.dtype.kind in "biuf"
            else "pass real-valued float16, float32 or float64 data"
        )
        raise TypeError(
            f"{name} must have dtype float16, float32 or float64; got dtype {arr.dtype}. "
            f"Batch normalization is defined for real floating-point data: {hint}."
        )
    return arr


def no_masked_values(value: Any, name: str) -> None:
    """Refuse a masked array with masked values: converting it to an ndarray, as every NumPy
    function without masked support does, would use what lies under the mask as data."""
    if isinstance(value, np.ma.MaskedArray) and np.ma.is_masked(value):
        count = int(np.count_nonzero(value.mask))
        raise ValueError(
            f"{name} is a masked array with {count} masked value(s); batch normalization has "
            "no notion of a mask and would use the values under it as data. Pass "
            f"{name}.filled(value) to choose what they are, or leave out the masked samples."
        )


def channel_axis(shape: tuple[int, ...], axis: Any, name: str = "x") -> int:
    """Check that `shape` is (N, C, *spatial)-like and return `axis` as a non-negative int."""
    if len(shape) < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions, (N, C) or (N, C, *spatial); got shape "
            f"{shape} ({len(shape)}-d). For a single sample add a batch axis, e.g. x[None]."
        )
    axis = axis_value(axis)
    ndim = len(shape)
    if not -ndim <= int(axis) < ndim:
        raise ValueError(
            f"axis {axis} is out of range for {name} of shape {shape}; "
            f"expected an int in [{-ndim}, {ndim - 1}] (1 for (N, C, ...), -1 for channels-last)."
        )
    return int(axis) % ndim


def axis_value(axis: Any) -> int:
    """Check that axis is an int (not a bool) and return it."""
    if type(axis) is int:  # the common case, without the slower ABC check
        return axis
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(
            f"axis must be an int (1 for (N, C, ...), -1 for channels-last); got {axis!r}."
        )
    return int(axis)


def eps_value(eps: Any) -> float:
    """Check that eps is a finite float > 0 and return it as a float."""
    if type(eps) is float and eps > 0.0 and math.isfinite(eps):  # the common case, fast
        return eps
    return positive_float(
        eps,
        "eps",
        "it keeps 1/sqrt(var + eps) finite",
        "The usual value is 1e-5 (Keras uses 1e-3).",
    )


def positive_float(value: Any, name: str, role: str, advice: str) -> float:
    """Check that `value` is a finite real > 0 (TypeError if not a real number, ValueError if
    not finite and positive) and return it as a float; `role` says what it is for."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive float such as 1e-5; got {value!r}.")
    result = float(value)
    if not (result > 0.0 and math.isfinite(result)):
        raise ValueError(f"{name} must be a finite float > 0 ({role}); got {value!r}. {advice}")
    return result


def per_channel(
    value: Any, name: str, num_channels: int, *, nonnegative: bool = False
) -> NDArray[np.float64]:
    """Return a per-channel vector as a fresh float64 array of shape (C,), checked."""
    if value is None:
        raise TypeError(f"{name} must be an array of shape ({num_channels},); got None.")
    if type(value) is not np.ndarray:  # a masked array is a subclass
        no_masked_values(value, name)
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
    finite = np.isfinite(out)
    if np.count_nonzero(finite) < out.size:  # half the time of finite.all() at this size
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{name} must be finite; channels {channel_list(bad)} hold NaN or inf. "
            "Check where these values came from before normalizing with them."
        )
    if nonnegative and (out < 0).any():
        neg = np.flatnonzero(out < 0)
        raise ValueError(
            f"{name} must be >= 0 (it is a variance); channels {channel_list(neg)} are "
            "negative. Pass a biased or unbiased variance, not a log-variance or a std - mean."
        )
    return out


class OneValuePerChannel(ValueError):
    """A training batch with one value per channel (its shape in ``shape``): callers that know
    more (precise_bn knows which batch) can say more."""

    def __init__(self, message: str, shape: tuple[int, ...]) -> None:
        super().__init__(message)
        self.shape = shape


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
        raise OneValuePerChannel(
            f"Expected more than 1 value per channel when training; got input of shape {shape}, "
            f"1 value for each of its {num_channels} channels, whose batch variance is 0 by "
            "definition. Use eval mode (running statistics) to normalize a single sample, or "
            "train with a larger batch. (N=1 is fine when the spatial size is > 1.)",
            shape,
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


def channel_list(indices: NDArray[np.intp], limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    more = f" (and {indices.size - limit} more)" if indices.size > limit else ""
    return f"[{shown}]{more}"


def value_count(count: Any) -> int:
    """Check the number of values per channel behind a set of moments."""
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
        raise ValueError(f"count must be a non-negative int (values per channel); got {count!r}.")
    return int(count)


def parts(
    means: Any, variances: Any, counts: Any
) -> tuple[NDArray[np.float64], NDArray[np.float64], list[int]]:
    """Check combine_moments' inputs: (k, C) means and variances, k counts >= 0."""
    mu, sigma2 = np.asarray(means), np.asarray(variances)
    if not isinstance(counts, Iterable):
        raise TypeError(f"counts must be a sequence of ints >= 0, one per part; got {counts!r}.")
    parts_counts = [value_count(n) for n in counts]
    k = len(parts_counts)
    for name, arr in (("means", mu), ("vars", sigma2)):
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"{name} must hold real numbers; got dtype {arr.dtype}.")
        if arr.ndim != 2 or arr.shape[0] != k or arr.shape[1] == 0:
            raise ValueError(
                f"{name} must have shape (k, C): one row of per-channel values for each of the "
                f"k = {k} counts; got shape {arr.shape}. Stack the parts' vectors, e.g. "
                "np.stack([mean_a, mean_b])."
            )
    if mu.shape != sigma2.shape:
        raise ValueError(f"means and vars must have the same shape; got {mu.shape} and "
                         f"{sigma2.shape}.")  # fmt: skip
    if (sigma2 < 0).any():
        raise ValueError("vars must be >= 0 (biased variances, as moments() returns them).")
    return mu.astype(np.float64), sigma2.astype(np.float64), parts_counts


def parts_lo(value: Any, shape: tuple[int, ...]) -> NDArray[np.float64]:
    """Check combine_moments' means_lo: finite reals of the means' shape (k, C)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"means_lo must hold real numbers; got dtype {arr.dtype}.")
    if arr.shape != shape:
        raise ValueError(
            f"means_lo must have the shape of means, {shape}: each part's mean_lo (what "
            f"moments() returns as .mean_lo), stacked; got shape {arr.shape}."
        )
    out = arr.astype(np.float64)
    if not np.isfinite(out).all():
        raise ValueError("means_lo must be finite; it holds NaN or inf.")
    return out


def batch_stats(
    stats: Any, num_channels: int, local_count: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], int, NDArray[np.float64]]:
    """Check forward_train's stats=(mean, var, count[, mean_lo]) of the whole normalization
    batch; a Moments (what moments and combine_moments return) brings its mean_lo along."""
    if not isinstance(stats, tuple | list) or len(stats) not in (3, 4):
        size = f" of length {len(stats)}" if isinstance(stats, tuple | list) else ""
        raise TypeError(
            "stats must be a (mean, var, count) tuple of the whole normalization batch, as "
            "combine_moments returns it, or (mean, var, count, mean_lo); got "
            f"{type(stats).__name__}{size}."
        )
    mean = per_channel(stats[0], "stats mean", num_channels)
    var = per_channel(stats[1], "stats var", num_channels, nonnegative=True)
    count = value_count(stats[2])
    if count < 2 or count < local_count:
        raise ValueError(
            f"stats count must be the whole normalization batch's number of values per channel: "
            f"at least 2 and at least this part's {local_count}; got {count}. Pass the count "
            "that combine_moments returned for all the parts together."
        )
    lo = stats[3] if len(stats) == 4 else getattr(stats, "mean_lo", None)
    mean_lo = np.zeros(num_channels) if lo is None else per_channel(lo, "mean_lo", num_channels)
    return mean, var, count, mean_lo


def channel_sums(value: Any, name: str, num_channels: int) -> NDArray[np.float64]:
    """Check a per-channel sum given to backward_input (NaN allowed: it propagates to dx)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf" or arr.shape != (num_channels,):
        raise ValueError(
            f"{name} must be a real array of shape ({num_channels},), as backward_sums returns "
            f"it (added up over the parts); got dtype {arr.dtype}, shape {arr.shape}."
        )
    return arr.astype(np.float64, copy=False)


def sums_need_data() -> ValueError:
    return ValueError(
        "backward_sums needs sum(dy * xhat), which needs x, and this cache (from forward_eval "
        "without gamma) keeps no copy of x, since its own backward needs none. Pass "
        "gamma=np.ones(C) to forward_eval to keep one."
    )


def dx_weight(value: Any, shape: tuple[int, ...]) -> NDArray[np.floating[Any]]:
    """Check double_backward's g_dx: a float array of the forward input's shape."""
    arr = float_array(value, "g_dx")
    if arr.shape != shape:
        raise ValueError(
            f"g_dx must have the shape of the forward input x (and of dx), {shape}; got "
            f"{arr.shape}. It weights dx in <g_dx, dx> + <g_dgamma, dgamma> + <g_dbeta, dbeta>, "
            "the scalar that double_backward differentiates."
        )
    return arr


def parameter_weight(
    value: Any, name: str, parameter: str, present: bool, num_channels: int
) -> NDArray[np.float64]:
    """Check double_backward's g_dgamma or g_dbeta: None (read as 0) or a real (C,) array
    (NaN allowed: it propagates); a weight for a gradient that backward does not return is
    refused."""
    if value is None:
        return np.zeros(num_channels)
    if not present:
        raise ValueError(
            f"{name} must be None: the forward call had no {parameter}, so backward returns "
            f"d{parameter} = None and there is nothing for {name} to weight. Pass {name}=None, "
            f"or give {parameter} to forward."
        )
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf" or arr.shape != (num_channels,):
        raise ValueError(
            f"{name} must be None or a real array of shape ({num_channels},), the weight of "
            f"d{parameter} (one value per channel); got dtype {arr.dtype}, shape {arr.shape}."
        )
    return arr.astype(np.float64)


def whole_batch_cache(count: int, shape: tuple[int, ...], axis: int) -> None:
    """Check that a training cache is that of a whole normalization batch, not of one part."""
    local = math.prod(shape) // shape[axis]
    if count != local:
        raise ValueError(
            f"double_backward needs the cache of a whole normalization batch; this one holds "
            f"{local} of the batch's {count} values per channel (forward_train(..., stats=...)), "
            "and the second derivatives of one part involve the data of every other part. Call "
            "forward_train on the whole batch and pass that cache."
        )
