"""Checks of the BatchNorm layer: its options, its input, its warnings, folding."""

from __future__ import annotations

import functools
import numbers
import sys
from collections.abc import Callable
from typing import Any, ParamSpec

import numpy as np
from numpy.typing import NDArray

from batchnorm._validate.kernels import channel_axis, channel_list, float_array, per_channel

__all__ = [
    "backward_before_forward",
    "finite_statistics",
    "finite_values",
    "flag",
    "float16_overflow",
    "fold_target",
    "fold_weight",
    "foldable",
    "folded_range",
    "layer_channels",
    "layer_input",
    "momentum_value",
    "num_features",
    "positional_eps",
    "pytorch_momentum",
    "refuse_num_dims",
    "running_buffers",
    "wrong_channels",
]


_P = ParamSpec("_P")


def refuse_num_dims(init: Callable[_P, None]) -> Callable[_P, None]:
    """Check the positional eps of ``__init__(self, num_features, eps, ...)``: only a positional
    int >= 1 is refused (d2l's ``BatchNorm(num_features, num_dims)``); ``eps=4`` by keyword
    means what it says."""

    @functools.wraps(init)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> None:
        if len(args) > 2:
            positional_eps(args[2])
        init(*args, **kwargs)

    return checked


def num_features(value: Any) -> int:
    """Check the layer's channel count: TypeError for a non-int, ValueError for one < 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"num_features must be a positive int, the number of channels C; got {value!r} "
            f"({type(value).__name__}). Pass an int, e.g. BatchNorm(64)."
        )
    if value <= 0:
        raise ValueError(
            f"num_features must be a positive int, the number of channels C; got {value!r}."
        )
    if int(value) > sys.maxsize:
        raise ValueError(
            f"num_features={value!r} is more channels than a NumPy array can hold (at most "
            f"{sys.maxsize}); pass the number of channels C of your data."
        )
    return int(value)


def positional_eps(value: Any) -> None:
    """Refuse an int >= 1 given positionally as eps: d2l's num_dims, not an eps."""
    if not isinstance(value, bool) and isinstance(value, numbers.Integral) and int(value) >= 1:
        raise TypeError(
            f"eps was given positionally as the int {value!r}: BatchNorm(num_features, eps, "
            f"momentum) takes eps second, so BatchNorm(C, {value!r}) would set eps={value!r}. "
            "This looks like d2l's BatchNorm(num_features, num_dims); no num_dims is needed "
            "here (the input's rank decides): write BatchNorm(C). A float eps works as usual, "
            f"e.g. BatchNorm(C, 1e-3); to really use this eps, pass eps={value!r} by keyword."
        )


def momentum_value(value: Any) -> float | None:
    """Check momentum: a float in [0, 1] (weight of the old running value) or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"momentum must be a float in [0, 1] or None; got {value!r}.")
    m = float(value)
    if not 0.0 <= m <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] or None; got {value!r}. Here momentum is the weight of "
            "the OLD running value (running = momentum * running + (1 - momentum) * batch), so "
            "PyTorch's momentum=0.1 is momentum=0.9 here; None keeps a cumulative average."
        )
    return m


def pytorch_momentum(value: float) -> str:
    """The warning for a momentum below 0.5: most likely PyTorch's convention."""
    return (
        f"momentum={value!r} weights the OLD running value here (running = momentum * running + "
        f"(1 - momentum) * batch_statistic), so each batch statistic gets weight {1.0 - value:g} "
        "and the running statistics follow the last batches closely. PyTorch's momentum "
        f"weights the new value: PyTorch's momentum={value!r} "
        f"is momentum={1.0 - value:g} here. If {value!r} is what you mean, silence this with "
        'warnings.filterwarnings("ignore", message="momentum=").'
    )


def float16_overflow(channels: NDArray[np.intp], gamma: Any, beta: Any) -> str:
    """The warning for a float16 layer output that overflowed to inf."""
    largest = [
        f"max |{name}| = {float(np.max(np.abs(v))):.3g}"
        for name, v in (("gamma", gamma), ("beta", beta))
        if v is not None and v.size
    ]
    return (
        f"the float16 output of channels {channel_list(channels)} overflowed to inf: "
        "gamma * xhat + beta is computed in float32 but exceeds float16's largest value, "
        f"65504 ({', '.join(largest) or 'no affine parameters'}). Pass float32 input "
        "(x.astype(np.float32)), or check gamma and beta."
    )


def flag(value: Any, name: str) -> bool:
    """Check a boolean option."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False; got {value!r}.")
    return bool(value)


def layer_input(x: Any, num_channels: int, axis: int) -> NDArray[np.floating[Any]]:
    """Check a layer's input: float dtype, rank >= 2, and num_channels on the channel axis."""
    arr = float_array(x)
    ax = channel_axis(arr.shape, axis)
    if arr.shape[ax] != num_channels:
        raise wrong_channels(arr.shape, num_channels, axis)
    return arr


def layer_channels(x: Any, num_channels: int, axis: int) -> None:
    """Check only that a layer's input has num_channels on its channel axis; the kernel the
    layer calls checks everything else (dtype, rank, values), once."""
    shape = x.shape if isinstance(x, np.ndarray) else np.shape(x)
    if len(shape) >= 2 and -len(shape) <= axis < len(shape) and shape[axis] != num_channels:
        raise wrong_channels(shape, num_channels, axis)


def running_buffers(mean: Any, var: Any, num_channels: int) -> None:
    """Check the running statistics a training step will update in place: assigned by hand
    (``layer.running_mean = ...``) they may be anything."""
    for name, value in (("running_mean", mean), ("running_var", var)):
        error: type[Exception]
        if not isinstance(value, np.ndarray):
            error, what = TypeError, type(value).__name__
        elif value.dtype.kind != "f":
            error, what = TypeError, f"an array of dtype {value.dtype}"
        elif value.shape != (num_channels,) or not value.flags.writeable:
            shape = f"an array of shape {value.shape}"
            error, what = ValueError, shape + ("" if value.flags.writeable else ", read-only")
        else:
            continue
        raise error(
            f"layer.{name} must be a writeable float array of shape ({num_channels},), one value "
            f"per channel, which each training step updates in place; got {what}. Assign "
            f"np.array(values, dtype=np.float64), or use load_state_dict, which converts."
        )


def wrong_channels(shape: tuple[int, ...], num_channels: int, axis: int) -> ValueError:
    return ValueError(
        f"expected {num_channels} channels (num_features) on axis {axis}; got input of "
        f"shape {shape} with {shape[axis]} there. Check num_features, or pass "
        "axis=-1 for channels-last data."
    )


def finite_statistics(
    mean: NDArray[np.float64],
    var: NDArray[np.float64],
    unchanged: str = "the running statistics were left unchanged",
) -> None:
    """Refuse batch statistics that are NaN or inf before they are recorded anywhere."""
    finite = np.isfinite(mean)
    finite &= np.isfinite(var)
    if np.count_nonzero(finite) < finite.size:  # half the time of a search at this size
        bad = np.flatnonzero(~finite)
        raise FloatingPointError(
            f"the batch statistics of channels {channel_list(bad)} are not finite (NaN or inf "
            f"in x, or a variance that overflowed); {unchanged}. Check the input and the "
            "preceding layers (a diverging learning rate is a common cause); values above ~1e19 "
            "overflow the variance in float32 (use float64), above ~1e154 in float64."
        )


def finite_values(arr: NDArray[Any], name: str) -> None:
    """Refuse an array holding NaN or inf where no meaningful result can come from it."""
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} must be finite; {int(bad.sum())} of its {arr.size} values are NaN or inf "
            f"(the first at index {first}). Check where these values came from."
        )


def backward_before_forward() -> RuntimeError:
    """The error for BatchNorm.backward called with no forward pass to differentiate."""
    return RuntimeError(
        "backward() was called before forward(): there is no cached forward pass. "
        "Call y = layer(x) first, then dx = layer.backward(dy)."
    )


def foldable(training: bool, track_running_stats: bool) -> None:
    """Only an eval-mode layer with running statistics is a fixed affine map that can be folded."""
    if training:
        raise ValueError(
            "cannot fold a BatchNorm in training mode: it normalizes with each batch's own "
            "statistics, which no fixed weights reproduce. Call layer.eval() first."
        )
    if not track_running_stats:
        raise ValueError(
            "cannot fold a BatchNorm with track_running_stats=False: it always uses batch "
            "statistics and has no running statistics to fold."
        )


def fold_target(layer: Any, expected: type) -> None:
    """Check that fold_batchnorm received a BatchNorm layer."""
    if not isinstance(layer, expected):
        raise TypeError(
            f"layer must be the {expected.__name__} that follows the linear or conv layer; got "
            f"{type(layer).__name__}. Call fold_batchnorm(weight, bias, bn_layer)."
        )


def fold_weight(weight: Any, bias: Any, num_channels: int) -> tuple[NDArray[Any], NDArray[Any]]:
    """Check the weight (C_out, ...) and optional bias (C_out,) of the layer before a BatchNorm."""
    w = float_array(weight, "weight")
    if w.ndim < 2 or w.shape[0] != num_channels:
        raise ValueError(
            f"weight must have shape (out_features, in_features) or (C_out, C_in, kh, kw) with "
            f"{num_channels} outputs, one per BatchNorm channel; got shape {w.shape}."
        )
    finite_values(w, "weight")
    b = np.zeros(num_channels) if bias is None else per_channel(bias, "bias", num_channels)
    return w, b


def folded_range(weight: NDArray[Any], bias: NDArray[Any]) -> None:
    """Refuse a folded weight or bias that overflowed the weight's dtype."""
    rows = weight.reshape(weight.shape[0], -1)
    bad = np.flatnonzero(~(np.isfinite(rows).all(axis=1) & np.isfinite(bias)))
    if bad.size:
        raise FloatingPointError(
            f"the folded weight or bias of output channels {channel_list(bad)} overflows "
            f"{weight.dtype} (weight * gamma / sqrt(running_var + eps) is out of its range). "
            "Fold in float64: pass weight.astype(np.float64) (and check running_var for "
            "values near 0)."
        )
