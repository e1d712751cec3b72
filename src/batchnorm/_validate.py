"""Input checks shared by every module: the one place where error messages are written.

Each message says what was expected, what arrived, and what to do about it.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ParamSpec

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
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(
            f"axis must be an int (1 for (N, C, ...), -1 for channels-last); got {axis!r}."
        )
    return int(axis)


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
    if not np.isfinite(out).all():
        bad = np.flatnonzero(~np.isfinite(out))
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


# --- the BatchNorm layer ---------------------------------------------------------------------


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
    """Check the layer's channel count."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
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
        raise _wrong_channels(arr.shape, num_channels, axis)
    return arr


def layer_channels(x: Any, num_channels: int, axis: int) -> None:
    """Check only that a layer's input has num_channels on its channel axis; the kernel the
    layer calls checks everything else (dtype, rank, values), once."""
    shape = np.shape(x)
    if len(shape) >= 2 and -len(shape) <= axis < len(shape) and shape[axis] != num_channels:
        raise _wrong_channels(shape, num_channels, axis)


def _wrong_channels(shape: tuple[int, ...], num_channels: int, axis: int) -> ValueError:
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
    bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))
    if bad.size:
        raise FloatingPointError(
            f"the batch statistics of channels {_channel_list(bad)} are not finite (NaN or inf "
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


STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def state_keys(state: Any, expected: tuple[str, ...], strict: bool) -> None:
    """Check the keys of a state dict against the ones this layer has.

    Keys such as ``bn1.running_mean`` are a whole model's state: the error says which prefixes
    were found and how to strip one. A non-strict load that would match no key at all is an
    error too, instead of a load that silently does nothing.
    """
    if not hasattr(state, "keys") or not hasattr(state, "__getitem__"):
        raise TypeError(
            f"state must be a mapping such as the dict from state_dict(); got "
            f"{type(state).__name__}."
        )
    given = set(state.keys())
    missing = [k for k in expected if k not in given]
    unexpected = sorted(str(k) for k in given - set(expected))
    prefixes = _model_prefixes(unexpected, expected)
    if prefixes and (strict or len(missing) == len(expected)):
        example = prefixes[0]
        shown = ", ".join(repr(p) for p in prefixes[:5])
        more = f" (and {len(prefixes) - 5} more)" if len(prefixes) > 5 else ""
        sample = next(k for k in unexpected if k.startswith(example))
        raise ValueError(
            f"state does not match this layer: missing keys {missing}. Its keys, such as "
            f"{sample!r}, are a whole model's: this layer's names {list(expected)} appear "
            f"behind the prefixes {shown}{more}. Select one layer's entries and strip its "
            f"prefix, e.g. layer.load_state_dict({{k.removeprefix({example!r}): v for k, v in "
            f"state.items() if k.startswith({example!r})}}). strict=False would load none of "
            "these keys."
        )
    if strict and (missing or unexpected):
        raise ValueError(
            f"state does not match this layer: missing keys {missing}, unexpected keys "
            f"{unexpected}; expected exactly {list(expected)}. Use strict=False to load the "
            "matching keys only (affine=False has no weight/bias, track_running_stats=False "
            "has no running statistics)."
        )
    if expected and len(missing) == len(expected):
        what = (
            f"none of the keys {unexpected[:10]} is one of this layer's keys {list(expected)}"
            if unexpected
            else "state is empty"
        )
        raise ValueError(
            f"strict=False would load nothing: {what}. Pass the state of a BatchNorm "
            "(layer.state_dict(), or a PyTorch BatchNorm's state converted to NumPy)."
        )


def _model_prefixes(keys: list[str], expected: tuple[str, ...]) -> list[str]:
    """Prefixes p such that p + name is a key for a name of the layer ('bn1.' for
    'bn1.running_mean'), those covering the most names first."""
    covered: dict[str, int] = {}
    for key in keys:
        for name in expected:
            if key.endswith("." + name) and len(key) > len(name) + 1:
                prefix = key[: -len(name)]
                covered[prefix] = covered.get(prefix, 0) + 1
    return sorted(covered, key=lambda p: (-covered[p], p))


def state_vector(value: Any, key: str, num_channels: int) -> NDArray[np.float64]:
    """Check one per-channel entry of a state dict and return a float64 copy."""
    try:
        arr = np.asarray(value)
    except Exception as err:  # e.g. a tensor that requires grad
        raise TypeError(
            f"state[{key!r}] could not be converted to a NumPy array ({err}). Convert tensors "
            "first: {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}."
        ) from err
    return per_channel(arr, f"state[{key!r}]", num_channels, nonnegative=key == "running_var")


def state_counter(value: Any) -> int:
    """Check num_batches_tracked: a non-negative integer (0-d or a size-1 array)."""
    try:
        arr = np.asarray(value)
    except Exception as err:
        raise TypeError(
            f"state['num_batches_tracked'] must be an int such as 3; got {type(value).__name__}, "
            f"which NumPy cannot convert ({err})."
        ) from err
    # state_dict() and save() store the counter as int64: a larger value could not go back.
    limit = int(np.iinfo(np.int64).max)
    if arr.size != 1 or arr.dtype.kind not in "iu" or not 0 <= int(arr.reshape(())) <= limit:
        value = (
            f" holding {int(arr.reshape(()))}" if arr.size == 1 and arr.dtype.kind in "iu" else ""
        )
        raise ValueError(
            "state['num_batches_tracked'] must be one non-negative integer, at most 2**63 - 1 "
            f"(it is stored as int64); got {arr.dtype} array of shape {arr.shape}{value}."
        )
    return int(arr.reshape(()))


def saved_file(path: Any, problem: str) -> ValueError:
    """The error for a file that BatchNorm.load cannot trust."""
    return ValueError(
        f"{path} is not a valid BatchNorm file: {problem}. BatchNorm.load reads only .npz "
        "files written by BatchNorm.save (never pickled objects)."
    )


_ENTRY_KINDS = {"f": "float", "iu": "integer", "b": "bool"}


def saved_scalar(arrays: Mapping[str, NDArray[Any]], key: str, kinds: str) -> Any:
    """One 0-d entry of a file written by BatchNorm.save, of the dtype kind save writes."""
    if key not in arrays:
        raise ValueError(f"its {key!r} entry is missing")
    value = arrays[key]
    if value.shape != () or value.dtype.kind not in kinds:
        raise ValueError(
            f"its {key!r} entry must be a 0-d {_ENTRY_KINDS[kinds]} array; got {value.dtype} of "
            f"shape {value.shape}"
        )
    return value.item()


def saved_width(key: str, shape: tuple[int, ...], num_features: int) -> None:
    """A saved per-channel vector must have num_features values."""
    if shape != (num_features,):
        raise ValueError(f"{key} has shape {shape} but num_features is {num_features}")


# --- folding -----------------------------------------------------------------------------------


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
            f"the folded weight or bias of output channels {_channel_list(bad)} overflows "
            f"{weight.dtype} (weight * gamma / sqrt(running_var + eps) is out of its range). "
            "Fold in float64: pass weight.astype(np.float64) (and check running_var for "
            "values near 0)."
        )


# --- PreciseBN ---------------------------------------------------------------------------------


def value_count(count: Any) -> int:
    """Check the number of values per channel behind a set of moments."""
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
        raise ValueError(f"count must be a non-negative int (values per channel); got {count!r}.")
    return int(count)


def positive_count(value: Any, name: str) -> int:
    """Check a positive integer option such as num_batches_precise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")
    return int(value)


def same_population(num_channels: int, other: Any) -> None:
    """Check that PopulationStats.merge received a PopulationStats of the same width."""
    width = getattr(other, "num_features", None)
    if type(other).__name__ != "PopulationStats" or width != num_channels:
        raise ValueError(
            f"merge needs another PopulationStats({num_channels}); got {other!r}. Statistics "
            "of different channel counts cannot be pooled."
        )


def population_count(count: int, needed: int) -> None:
    """Check that enough values were seen for a mean (1) or an unbiased variance (2)."""
    if count < needed:
        what = "a mean" if needed == 1 else "an unbiased variance"
        raise ValueError(
            f"{what} needs at least {needed} value(s) per channel; this PopulationStats has seen "
            f"{count}. Call update(x) with data first (var(unbiased=False) needs one value)."
        )


def precise_mode(mode: Any, modes: tuple[str, ...]) -> None:
    """Check precise_bn's mode."""
    if mode not in modes:
        raise ValueError(f"mode must be one of {list(modes)}; got {mode!r}.")


def layer_list(layers: Any, expected: type) -> list[Any]:
    """Check that `layers` is an iterable of BatchNorm layers and return it as a list."""
    if isinstance(layers, expected):
        raise TypeError("layers must be an iterable of BatchNorm layers: wrap one in a list.")
    try:
        items = list(layers)
    except TypeError as err:
        raise TypeError(
            f"layers must be an iterable of BatchNorm layers, such as a list; got "
            f"{type(layers).__name__}. Pass layers=None to recompute every BatchNorm found."
        ) from err
    for i, item in enumerate(items):
        if not isinstance(item, expected):
            raise TypeError(f"layers[{i}] is a {type(item).__name__}, not a BatchNorm layer.")
    return items


def batch_iterable(batches: Any) -> Iterator[Any]:
    """Check that precise_bn's `batches` can be iterated; return an iterator over it."""
    try:
        return iter(batches)
    except TypeError as err:
        raise TypeError(
            f"batches must be an iterable of model inputs (a list, a generator, a data "
            f"loader); got {type(batches).__name__}. For a single batch pass [batch]."
        ) from err


def pooled_statistics(mean: NDArray[np.float64], var: NDArray[np.float64]) -> None:
    """Refuse pooled statistics that overflowed when two sets of moments were merged."""
    bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))
    if bad.size:
        raise FloatingPointError(
            f"pooling overflowed: the mean or variance of channels {_channel_list(bad)} over "
            "all the data seen is beyond float64's range (means ~1e154 apart or more); this "
            "PopulationStats was left unchanged. Rescale the data."
        )


def has_running_stats(track_running_stats: bool, name: str) -> None:
    """PreciseBN recomputes running statistics: the layer must keep them."""
    if not track_running_stats:
        raise ValueError(
            f"{name} has track_running_stats=False: it keeps no running statistics for "
            "precise_bn to recompute (it always normalizes with batch statistics)."
        )


def no_layers_found() -> ValueError:
    return ValueError(
        "precise_bn found no BatchNorm layer with running statistics to recompute. Pass "
        "layers=[...] explicitly, or keep the layers in attributes, lists, tuples or dicts of "
        "the model so they can be found."
    )


def no_batches() -> ValueError:
    return ValueError(
        "precise_bn received no batches: `batches` was empty (or an exhausted iterator). "
        "Nothing was changed. Pass an iterable that yields at least one batch."
    )


def fewer_batches(wanted: int, used: int, pooled: bool = False) -> str:
    seen = (
        "the statistics are those of every rank's batches" if pooled
        else f"the statistics are those of these {used} batches"
    )  # fmt: skip
    return (
        f"precise_bn: asked for num_batches_precise={wanted} batches but the data "
        f"{'of this rank ' if pooled else ''}gave only {used}; {seen}."
    )


def never_called(name: str) -> str:
    return (
        f"precise_bn: {name} was never called by model(batch); its running statistics were "
        "left as they were."
    )


def layers_not_called(names: list[str]) -> ValueError:
    return ValueError(
        f"none of the chosen BatchNorm layers ({', '.join(names)}) was called by model(batch); "
        "nothing was changed. Check that model(batch) runs these layers."
    )


# --- gradient checks -----------------------------------------------------------------------------


def eval_statistics(mean: Any, var: Any) -> None:
    """check_gradients(training=False) evaluates with given statistics: both must be given."""
    if mean is None or var is None:
        missing = " and ".join(name for name, v in (("mean", mean), ("var", var)) if v is None)
        raise ValueError(
            "check_gradients(training=False) needs mean= and var= to evaluate with; "
            f"{missing} missing. Pass the statistics to normalize with, e.g. "
            "mean=layer.running_mean, var=layer.running_var."
        )


def same_shapes(actual: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """relative_error compares arrays element by element: their shapes must agree."""
    if actual != expected:
        raise ValueError(
            f"relative_error needs equal shapes; got {actual} and {expected}. "
            "Compare each gradient with the numerical gradient of the same array."
        )


# --- the stages (functional.py) -------------------------------------------------------------------


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


def batch_stats(
    stats: Any, num_channels: int, local_count: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], int]:
    """Check forward_train's stats=(mean, var, count) of the whole normalization batch."""
    if not isinstance(stats, tuple | list) or len(stats) != 3:
        raise TypeError(
            "stats must be a (mean, var, count) tuple of the whole normalization batch, as "
            f"combine_moments returns it; got {type(stats).__name__}."
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
    return mean, var, count


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


# --- distributed ---------------------------------------------------------------------------------

#: Exception types a rank reports to the others in its status flag (code = index + 1); any
#: other exception is reported as a RuntimeError.
RANK_ERRORS: tuple[type[Exception], ...] = (TypeError, ValueError, FloatingPointError)


def group_value(group: Any, optional: bool = True) -> Any:
    """Check a group of workers: integer rank and size with 0 <= rank < size, and allgather."""
    if group is None and optional:
        return None
    rank, size = getattr(group, "rank", None), getattr(group, "size", None)
    ints = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (rank, size))
    valid = ints and 0 <= int(rank) < int(size)  # type: ignore[arg-type]
    if not valid or not callable(getattr(group, "allgather", None)):
        raise TypeError(
            "group must be a group of workers with integer `rank` and `size` (0 <= rank < size) "
            "and a method `allgather(array) -> list of every rank's array in rank order`, such "
            f"as batchnorm.distributed.MPIGroup() or thread_groups(n)[r]; got {group!r}."
        )
    return group


def gathered(parts: Any, size: int) -> list[NDArray[np.float64]]:
    """Check what a group's allgather returned: one float64 vector per rank."""
    if not isinstance(parts, list | tuple) or len(parts) != size:
        raise RuntimeError(
            f"group.allgather must return a list with one array per rank ({size}); got "
            f"{type(parts).__name__} of length {len(parts) if hasattr(parts, '__len__') else '?'}."
            " Check the group's allgather implementation."
        )
    return [np.asarray(p, dtype=np.float64).ravel() for p in parts]


def rank_failed(kind: type[Exception], failed: list[int], size: int, what: str) -> Exception:
    """The error a rank raises when another rank of its group could not take part in a step."""
    who = f"rank {failed[0]}" if len(failed) == 1 else f"ranks {failed}"
    return kind(
        f"{who} of this group of {size} raised {kind.__name__} in {what}, so every rank stops "
        "here; this rank's input was accepted and nothing was changed on any rank. See the "
        f"error raised on {who} for the cause."
    )


def group_widths(widths: list[int], what: str) -> ValueError:
    return ValueError(
        f"the ranks of this group disagree on the number of channels in {what}: {widths}, "
        "rank by rank. Every rank must run the same layer on data with the same C; nothing "
        "was changed on any rank."
    )


def group_parts(parts: list[int], what: str) -> ValueError:
    return ValueError(
        f"the ranks of this group disagree on how many sets of statistics take part in {what}: "
        f"{parts}, rank by rank. Every rank must measure the same layers of the same model; "
        "nothing was changed on any rank."
    )


def group_batch(counts: list[int]) -> ValueError:
    return ValueError(
        "Expected more than 1 value per channel in the whole synchronized batch when training; "
        f"the ranks of this group hold {counts} values per channel ({sum(counts)} in all), whose "
        "batch variance is 0 or undefined. Train with larger batches, or use eval mode; "
        "nothing was changed on any rank."
    )


def thread_group_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"thread_groups needs a positive int size (the number of threads); "
                         f"got {size!r}.")  # fmt: skip
    return int(size)


def timeout_value(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not float(timeout) > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None; got {timeout!r}.")
    return float(timeout)


def group_broken(rank: int, size: int, timeout: float | None) -> RuntimeError:
    waited = "timed out" if timeout is None else f"waited {timeout:g} s and timed out"
    return RuntimeError(
        f"thread group rank {rank} of {size}: allgather was aborted or {waited} waiting for the "
        "other ranks (one of them probably raised or stopped calling). This group is now broken; "
        "create new ones with thread_groups(size)."
    )


def mpi_missing(err: ImportError) -> ImportError:
    return ImportError(
        f"MPIGroup needs mpi4py and an MPI runtime ({err}). Install them with "
        "pip install 'batchnorm[mpi]' (mpi4py and MPICH from PyPI), then launch with "
        "mpiexec -n 4 python your_script.py. For threads of one process use thread_groups(n)."
    )


def precise_group_batches() -> ValueError:
    return ValueError(
        "precise_bn received no batches on any rank of the group: every rank's `batches` was "
        "empty (or an exhausted iterator). Nothing was changed. Pass at least one batch on some "
        "rank (ranks without batches are fine when another rank has some)."
    )


# --- variants ------------------------------------------------------------------------------------


def ghost_batch_size(value: Any) -> int | None:
    """Check ghost_batch_size: None (the whole batch) or a positive int k."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"ghost_batch_size must be None (normalize over the whole batch) or a positive int k, "
            f"the number of samples per ghost batch; got {value!r}."
        )
    return int(value)


def ghost_axis(shape: tuple[int, ...], axis: int) -> None:
    """Ghost batches split axis 0, which must then not be the channel axis."""
    if axis == 0:
        raise ValueError(
            f"ghost batches split axis 0 into runs of samples, but axis 0 is the channel axis "
            f"here (input of shape {shape}). Put the samples on axis 0, or pass "
            "ghost_batch_size=None."
        )


def ghost_too_small(
    shape: tuple[int, ...], k: int, index: int, total: int, lo: int, hi: int
) -> None:
    """A ghost batch with fewer than two values per channel has no batch variance."""
    raise ValueError(
        f"ghost batch {index + 1} of {total} (samples {lo}..{hi - 1} of input of shape {shape}, "
        f"ghost_batch_size={k}) holds fewer than 2 values per channel, so it has no batch "
        "variance; nothing was changed. Use a batch size whose last ghost batch keeps at least "
        "2 samples (or spatial size > 1), or a larger ghost_batch_size."
    )


def no_group(name: str) -> None:
    """Variants computed per worker do not combine with a group (synchronized BatchNorm)."""
    raise ValueError(
        f"{name} cannot be combined with a group (synchronized BatchNorm across workers): this "
        "combination is not supported; nothing was changed. Set layer.group = None, or use "
        "plain BatchNorm with the group."
    )


def frozen_needs_running_stats() -> ValueError:
    return ValueError(
        "a frozen BatchNorm normalizes with its running statistics, but this layer has "
        "track_running_stats=False and keeps none. Create it with track_running_stats=True "
        "(the default) and load the statistics to freeze."
    )


def renorm_limits(rmax: Any, dmax: Any) -> tuple[float, float]:
    """Check BatchRenorm's clipping limits: rmax >= 1 and dmax >= 0 (inf: no clipping)."""
    for name, value in (("rmax", rmax), ("dmax", dmax)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise TypeError(f"{name} must be a float (math.inf: no clipping); got {value!r}.")
    if not (float(rmax) >= 1.0 and float(dmax) >= 0.0):
        raise ValueError(
            f"BatchRenorm needs rmax >= 1 and dmax >= 0 (r is clipped to [1/rmax, rmax], d to "
            f"[-dmax, dmax]); got rmax={rmax!r}, dmax={dmax!r}. rmax=1, dmax=0 is BatchNorm; "
            "the paper raises them gradually to 3 and 5; math.inf switches clipping off."
        )
    return float(rmax), float(dmax)


def renorm_needs_running_stats() -> ValueError:
    return ValueError(
        "BatchRenorm corrects the batch statistics towards its running statistics, so it "
        "always keeps them: track_running_stats must be True. Use BatchNorm("
        "track_running_stats=False) for batch statistics only."
    )
