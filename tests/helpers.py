"""Helpers shared by the test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import batchnorm as bn

CONFIG = (
    "num_features",
    "eps",
    "momentum",
    "affine",
    "track_running_stats",
    "unbiased",
    "axis",
    "ghost_batch_size",
    "frozen",
)
STATE = ("gamma", "beta", "running_mean", "running_var", "num_batches_tracked", "training")


def raw(value: Any) -> Any:
    """An array as (dtype, shape, bytes), so that == means equal bit for bit; else the value."""
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    return value


def layer_snapshot(layer: bn.BatchNorm, *, gradients: bool = True) -> dict[str, Any]:
    """Every attribute of a layer's configuration and state (and gradients), bit for bit."""
    names = CONFIG + STATE + (("dgamma", "dbeta") if gradients else ())
    return {name: raw(getattr(layer, name)) for name in names}


def load_module(name: str, path: Path) -> ModuleType:
    """The Python file at `path` (a script, a check module: not importable by name), loaded
    once per test session as module `name`."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def examples_nn() -> ModuleType:
    """examples/nn.py (not part of the package)."""
    return load_module("examples_nn", Path(__file__).resolve().parents[1] / "examples" / "nn.py")


def param_shape(ndim: int, axis: int) -> list[int]:
    """The shape that broadcasts a (C,) vector against an ndim array with channels at axis."""
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """Every axis but the channel axis: the axes a BatchNorm's statistics reduce over."""
    return tuple(i for i in range(ndim) if i != axis % ndim)
