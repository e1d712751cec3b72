"""A BatchNorm layer's state as data (private): state dicts with PyTorch's keys, and the .npz
files of ``BatchNorm.save`` and ``BatchNorm.load``, read without ever unpickling.

Everything is checked before anything is written to a layer, so a refused state or file leaves
the layer as it was. This module sits below :mod:`batchnorm.layer` and never imports it: it
knows a layer only by the attributes of :class:`Layer`, and the layer passes in its file format,
extra entries and constructor.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from batchnorm import _validate


class Layer(Protocol):
    """What this module reads and writes on a BatchNorm layer."""

    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    unbiased: bool
    axis: int
    training: bool
    ghost_batch_size: int | None
    frozen: bool
    gamma: NDArray[np.float64] | None
    beta: NDArray[np.float64] | None
    running_mean: NDArray[np.float64] | None
    running_var: NDArray[np.float64] | None
    num_batches_tracked: int | None

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> LoadResult: ...

    def train(self, mode: bool = True) -> Any: ...


_L = TypeVar("_L", bound=Layer)

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


def _state_keys(layer: Layer) -> tuple[str, ...]:
    affine = ("weight", "bias") if layer.affine else ()
    tracked = ("running_mean", "running_var", "num_batches_tracked")
    return affine + (tracked if layer.track_running_stats else ())


def _targets(layer: Layer) -> dict[str, Any]:
    return {
        "weight": layer.gamma,
        "bias": layer.beta,
        "running_mean": layer.running_mean,
        "running_var": layer.running_var,
        "num_batches_tracked": layer.num_batches_tracked,
    }


def state_dict(layer: Layer) -> dict[str, NDArray[Any]]:
    values = _targets(layer)
    return {
        key: np.array(values[key], dtype=np.int64 if key == "num_batches_tracked" else np.float64)
        for key in _state_keys(layer)
    }


def load_state_dict(layer: Layer, state: Mapping[str, Any], strict: bool) -> LoadResult:
    expected = _state_keys(layer)
    nothing_loaded = _validate.state_keys(state, expected, strict)
    checked: dict[str, Any] = {}
    for key in expected:
        if key not in state:
            continue
        if key == "num_batches_tracked":
            checked[key] = _validate.state_counter(state[key])
        else:
            checked[key] = _validate.state_vector(state[key], key, layer.num_features)
    if nothing_loaded is not None:  # after the checks: they raise for any bad matching key
        warnings.warn(nothing_loaded, UserWarning, stacklevel=3)
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


def npz_path(path: str | os.PathLike[str]) -> Path:
    """The file save() writes for `path`: NumPy appends ``.npz`` when the name lacks it."""
    target = Path(path)
    return target if target.suffix == ".npz" else target.with_name(target.name + ".npz")


def save(layer: Layer, path: str | os.PathLike[str], fmt: str, extra: Mapping[str, Any]) -> Path:
    """Write `layer` under the format name `fmt`, with a subclass's `extra` entries."""
    target = npz_path(path)
    entries: dict[str, Any] = {
        "format": np.array(fmt),
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
    entries.update(extra)
    entries.update(state_dict(layer))
    np.savez(target, **entries)
    return target


def load(
    path: str | os.PathLike[str],
    fmt: str,
    config_keys: tuple[str, ...],
    build: Callable[..., _L],
) -> _L:
    """Read a file save() wrote under the format name `fmt`; ``build(entry, num_features,
    **config)`` makes the layer (a subclass reads its own entries through `entry`)."""
    path = _existing(path)
    arrays = _read_npz(path)
    found = arrays.get("format")
    if found is None or found.shape != () or str(found) != fmt:
        raise _validate.saved_format(path, fmt, None if found is None else str(found))
    unknown = sorted(set(arrays) - {"format", *_validate.STATE_KEYS, *config_keys})
    if unknown:
        raise _validate.saved_file(path, f"it holds unknown entries {unknown}")
    try:
        # Each entry must have the dtype kind save() writes: a file is refused, never
        # reinterpreted (a string eps, a bool axis).
        entry = functools.partial(_validate.saved_scalar, arrays)
        num_features = int(entry("config_num_features", "iu"))
        for key in _validate.STATE_KEYS[:4]:
            # Check the width against the saved vectors before allocating any state.
            if key in arrays:
                _validate.saved_width(key, arrays[key].shape, num_features)
        layer = build(entry, num_features, **options(arrays))
        state = {k: v for k, v in arrays.items() if k in _validate.STATE_KEYS}
        layer.load_state_dict(state, strict=True)
        layer.train(bool(entry("config_training", "b")))
    except (KeyError, TypeError, ValueError) as err:
        raise _validate.saved_file(path, str(err)) from err
    return layer


def options(arrays: dict[str, Any]) -> dict[str, Any]:
    """A BatchNorm's constructor options from the ``config_*`` entries save() wrote, each
    checked for the dtype kind save() gives it (KeyError, TypeError or ValueError if not)."""
    entry = functools.partial(_validate.saved_scalar, arrays)
    momentum = float(entry("config_momentum", "f"))
    # Files written before ghost batches and freezing existed hold neither entry.
    ghost = "config_ghost_batch_size" in arrays and int(entry("config_ghost_batch_size", "iu"))
    return {
        "eps": float(entry("config_eps", "f")),
        "momentum": None if math.isnan(momentum) else momentum,
        "affine": bool(entry("config_affine", "b")),
        "track_running_stats": bool(entry("config_track_running_stats", "b")),
        "unbiased": bool(entry("config_unbiased", "b")),
        "axis": int(entry("config_axis", "iu")),
        "ghost_batch_size": ghost or None,
        "frozen": "config_frozen" in arrays and bool(entry("config_frozen", "b")),
    }


def _existing(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """`path`, or the name save() gave it: save("bn1") writes bn1.npz, so load("bn1") reads it."""
    if os.path.exists(path):
        return path
    target = npz_path(path)
    if target.exists():
        return target
    raise _validate.no_saved_file(path, target)


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
