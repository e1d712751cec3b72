"""Checks of a BatchNorm layer's state as data: state dicts with PyTorch's keys, and the .npz
files of ``BatchNorm.save`` that ``BatchNorm.load`` reads."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from batchnorm._validate.kernels import per_channel

__all__ = [
    "ENTRY_KINDS",
    "STATE_KEYS",
    "model_prefixes",
    "no_saved_file",
    "saved_file",
    "saved_format",
    "saved_scalar",
    "saved_width",
    "state_counter",
    "state_keys",
    "state_vector",
]


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
