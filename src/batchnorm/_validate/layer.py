"""Checks of the BatchNorm layer: its options, its input, its state and saved files, folding."""

from __future__ import annotations

import functools
import numbers
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec

import numpy as np
from numpy.typing import NDArray

from batchnorm._validate.kernels import channel_axis, channel_list, float_array, per_channel

__all__ = [
    "ENTRY_KINDS",
    "STATE_KEYS",
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
    "model_prefixes",
    "momentum_value",
    "no_saved_file",
    "num_features",
    "positional_eps",
    "pytorch_momentum",
    "refuse_num_dims",
    "saved_file",
    "saved_format",
    "saved_scalar",
    "saved_width",
    "state_counter",
    "state_keys",
    "state_vector",
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
    shape = np.shape(x)
    if len(shape) >= 2 and -len(shape) <= axis < len(shape) and shape[axis] != num_channels:
        raise wrong_channels(shape, num_channels, axis)


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
    bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))
    if bad.size:
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


STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def state_keys(state: Any, expected: tuple[str, ...], strict: bool) -> str | None:
    """Check the keys of a state dict against the ones this layer has.

    Keys such as ``bn1.running_mean`` are a whole model's state: the message says which
    prefixes were found and how to strip one. A strict load raises; a non-strict load of which
    no key matches loads nothing, as PyTorch's does, and gets the message back as a warning to
    give (None: nothing to warn about).
    """
    if not hasattr(state, "keys") or not hasattr(state, "__getitem__"):
        raise TypeError(
            f"state must be a mapping such as the dict from state_dict(); got "
            f"{type(state).__name__}."
        )
    given = set(state.keys())
    missing = [k for k in expected if k not in given]
    unexpected = sorted(str(k) for k in given - set(expected))
    prefixes = model_prefixes(unexpected, expected)
    nothing = bool(expected) and len(missing) == len(expected)
    if prefixes and strict:
        raise ValueError(
            f"state does not match this layer: missing keys {missing}. "
            + _prefix_hint(prefixes, unexpected, expected)
            + " strict=False would load none of these keys."
        )
    if strict and (missing or unexpected):
        raise ValueError(
            f"state does not match this layer: missing keys {missing}, unexpected keys "
            f"{unexpected}; expected exactly {list(expected)}. Use strict=False to load the "
            "matching keys only (affine=False has no weight/bias, track_running_stats=False "
            "has no running statistics)."
        )
    if not nothing:
        return None
    if prefixes:
        return (
            "load_state_dict(strict=False) loaded nothing: no key of state is one of this "
            "layer's. " + _prefix_hint(prefixes, unexpected, expected)
        )
    what = (
        f"none of the keys {unexpected[:10]} is one of this layer's keys {list(expected)}"
        if unexpected
        else "state is empty"
    )
    return (
        f"load_state_dict(strict=False) loaded nothing: {what}; every key is reported missing "
        "and the layer is unchanged. Pass the state of a BatchNorm (layer.state_dict(), or a "
        "PyTorch BatchNorm's state converted to NumPy)."
    )


def _prefix_hint(prefixes: list[str], unexpected: list[str], expected: tuple[str, ...]) -> str:
    """How to load one layer's entries out of a whole model's state."""
    example = prefixes[0]
    shown = ", ".join(repr(p) for p in prefixes[:5])
    more = f" (and {len(prefixes) - 5} more)" if len(prefixes) > 5 else ""
    sample = next(k for k in unexpected if k.startswith(example))
    return (
        f"Its keys, such as {sample!r}, are a whole model's: this layer's names "
        f"{list(expected)} appear behind the prefixes {shown}{more}. Select one layer's "
        f"entries and strip its prefix, e.g. layer.load_state_dict({{k.removeprefix("
        f"{example!r}): v for k, v in state.items() if k.startswith({example!r})}})."
    )


def model_prefixes(keys: list[str], expected: tuple[str, ...]) -> list[str]:
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


def saved_format(path: Any, expected: str, found: str | None) -> ValueError:
    """The error for a file whose 'format' entry is not the loader's: name the class that
    wrote it and the loader that reads it."""
    writer = re.fullmatch(r"batchnorm\.(\w+)/\d+", found or "")
    reader = re.fullmatch(r"batchnorm\.(\w+)/\d+", expected)
    if writer is None or reader is None or writer[1] == reader[1]:
        problem = "it has no 'format' entry"
        if found is not None:
            problem = f"its 'format' entry is {found!r}"
        return saved_file(path, f"{problem}, not {expected!r}")
    return ValueError(
        f"{path} was written by {writer[1]}.save (format {found!r}), and {reader[1]}.load reads "
        f"only {reader[1]} files (format {expected!r}). Read it with "
        f"batchnorm.{writer[1]}.load(path)."
    )


def no_saved_file(path: Any, npz: Any) -> FileNotFoundError:
    """The error for a layer file that exists neither as named nor with save()'s .npz suffix."""
    also = "" if str(npz) == str(path) else f" (nor {str(npz)!r}, the name save() gives it)"
    return FileNotFoundError(
        f"no such file: {str(path)!r}{also}. Pass the path that layer.save() returned."
    )


ENTRY_KINDS = {"f": "float", "iu": "integer", "b": "bool"}


def saved_scalar(arrays: Mapping[str, NDArray[Any]], key: str, kinds: str, *default: Any) -> Any:
    """One 0-d entry of a file written by BatchNorm.save, of the dtype kind save writes; a
    missing entry is an error unless a default is given (an entry older files lack)."""
    if key not in arrays:
        if default:
            return default[0]
        raise ValueError(f"its {key!r} entry is missing")
    value = arrays[key]
    if value.shape != () or value.dtype.kind not in kinds:
        raise ValueError(
            f"its {key!r} entry must be a 0-d {ENTRY_KINDS[kinds]} array; got {value.dtype} of "
            f"shape {value.shape}"
        )
    return value.item()


def saved_width(key: str, shape: tuple[int, ...], num_features: int) -> None:
    """A saved per-channel vector must have num_features values."""
    if shape != (num_features,):
        raise ValueError(f"{key} has shape {shape} but num_features is {num_features}")


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
