"""A BatchNorm layer's state as data (private): state dicts with PyTorch's keys, and the .npz
files of ``BatchNorm.save`` and ``BatchNorm.load``, read without ever unpickling.

Everything is checked before anything is written to a layer, so a refused state or file leaves
the layer as it was.
"""

from __future__ import annotations

import functools
import math
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
from numpy.typing import NDArray

from batchnorm import _validate

if TYPE_CHECKING:
    from batchnorm.layer import BatchNorm

_L = TypeVar("_L", bound="BatchNorm")

#: The configuration entries BatchNorm.save writes, besides "format" and the state.
CONFIG_KEYS = tuple(
    f"config_{name}"
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats",
                 "unbiased", "axis", "training", "ghost_batch_size", "frozen")
)  # fmt: skip
# A saved layer holds a few (C,) vectors; a member declaring more bytes than this (16M float64
# channels) is not one of our files, and is refused before anything is allocated for it.
_MAX_MEMBER_BYTES = 1 << 27


class LoadResult(NamedTuple):
    """Keys of a non-strict :meth:`BatchNorm.load_state_dict` that were not both present."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _state_keys(layer: BatchNorm) -> tuple[str, ...]:
    affine = ("weight", "bias") if layer.affine else ()
    tracked = ("running_mean", "running_var", "num_batches_tracked")
    return affine + (tracked if layer.track_running_stats else ())


def _targets(layer: BatchNorm) -> dict[str, Any]:
    return {
        "weight": layer.gamma,
        "bias": layer.beta,
        "running_mean": layer.running_mean,
        "running_var": layer.running_var,
        "num_batches_tracked": layer.num_batches_tracked,
    }


def state_dict(layer: BatchNorm) -> dict[str, NDArray[Any]]:
    values = _targets(layer)
    return {
        key: np.array(values[key], dtype=np.int64 if key == "num_batches_tracked" else np.float64)
        for key in _state_keys(layer)
    }


def load_state_dict(layer: BatchNorm, state: Mapping[str, Any], strict: bool) -> LoadResult:
    expected = _state_keys(layer)
    _validate.state_keys(state, expected, strict)
    checked: dict[str, Any] = {}
    for key in expected:
        if key not in state:
            continue
        if key == "num_batches_tracked":
            checked[key] = _validate.state_counter(state[key])
        else:
            checked[key] = _validate.state_vector(state[key], key, layer.num_features)
    # Everything is valid: now load it all (writes that cannot fail).
    targets = _targets(layer)
    for key, value in checked.items():
        if key == "num_batches_tracked":
            layer.num_batches_tracked = value
        else:
            np.copyto(targets[key], value)
    return LoadResult(
        missing_keys=[k for k in expected if k not in state],
        unexpected_keys=sorted(str(k) for k in state if k not in expected),
    )


def save(layer: BatchNorm, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    if target.suffix != ".npz":
        target = target.with_name(target.name + ".npz")
    entries: dict[str, Any] = {
        "format": np.array(layer._format),
        "config_num_features": np.array(layer.num_features),
        "config_eps": np.array(layer.eps),
        "config_momentum": np.array(np.nan if layer.momentum is None else layer.momentum),
        "config_affine": np.array(layer.affine),
        "config_track_running_stats": np.array(layer.track_running_stats),
        "config_unbiased": np.array(layer.unbiased),
        "config_axis": np.array(layer.axis),
        "config_training": np.array(layer.training),
        "config_ghost_batch_size": np.array(layer.ghost_batch_size or 0),
        "config_frozen": np.array(layer.frozen),
    }
    entries.update(layer._extra_entries())
    entries.update(state_dict(layer))
    np.savez(target, **entries)
    return target


def load(cls: type[_L], path: str | os.PathLike[str]) -> _L:
    arrays = _read_npz(path)
    if arrays.get("format") is None or str(arrays["format"]) != cls._format:
        raise _validate.saved_file(path, f"its 'format' entry is not {cls._format!r}")
    unknown = sorted(set(arrays) - {"format", *_validate.STATE_KEYS, *cls._config_keys})
    if unknown:
        raise _validate.saved_file(path, f"it holds unknown entries {unknown}")
    try:
        # Each entry must have the dtype kind save() writes: a file is refused, never
        # reinterpreted (a string eps, a bool axis).
        entry = functools.partial(_validate.saved_scalar, arrays)
        momentum = float(entry("config_momentum", "f"))
        num_features = int(entry("config_num_features", "iu"))
        for key in _validate.STATE_KEYS[:4]:
            # Check the width against the saved vectors before allocating any state.
            if key in arrays:
                _validate.saved_width(key, arrays[key].shape, num_features)
        # Files written before ghost batches and freezing existed hold neither entry.
        ghost = "config_ghost_batch_size" in arrays and int(entry("config_ghost_batch_size", "iu"))
        layer = cls._from_config(
            entry,
            num_features,
            eps=float(entry("config_eps", "f")),
            momentum=None if math.isnan(momentum) else momentum,
            affine=bool(entry("config_affine", "b")),
            track_running_stats=bool(entry("config_track_running_stats", "b")),
            unbiased=bool(entry("config_unbiased", "b")),
            axis=int(entry("config_axis", "iu")),
            ghost_batch_size=ghost or None,
            frozen="config_frozen" in arrays and bool(entry("config_frozen", "b")),
        )
        state = {k: v for k, v in arrays.items() if k in _validate.STATE_KEYS}
        layer.load_state_dict(state, strict=True)
        layer.train(bool(entry("config_training", "b")))
    except (KeyError, TypeError, ValueError) as err:
        raise _validate.saved_file(path, str(err)) from err
    assert isinstance(layer, cls)
    return layer


def _read_npz(path: str | os.PathLike[str]) -> dict[str, NDArray[Any]]:
    """Read every array of an .npz file, checking each header before reading its data."""
    arrays: dict[str, NDArray[Any]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy") or info.filename[:-4] in arrays:
                    raise ValueError(f"unexpected or repeated member {info.filename!r}")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(member)
                if dtype.hasobject:
                    raise ValueError(f"{info.filename!r} holds Python objects")
                if math.prod(shape) * dtype.itemsize > _MAX_MEMBER_BYTES:
                    raise ValueError(
                        f"{info.filename!r} declares a {dtype} array of shape {shape}, "
                        "far larger than any saved layer"
                    )
                with archive.open(info) as member:
                    arrays[info.filename[:-4]] = np.lib.format.read_array(
                        member, allow_pickle=False
                    )
    except FileNotFoundError:
        raise
    except Exception as err:
        # A damaged archive fails in many ways besides BadZipFile (an unknown compression
        # method, the encryption flag, a zlib error, ...); whatever the way, the file is not
        # one BatchNorm.save wrote.
        raise _validate.saved_file(path, f"{type(err).__name__}: {err}") from err
    return arrays
