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


def examples_nn() -> ModuleType:
    """examples/nn.py (not part of the package), loaded by path once per test session."""
    if "examples_nn" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "examples" / "nn.py"
        spec = importlib.util.spec_from_file_location("examples_nn", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["examples_nn"] = module
        spec.loader.exec_module(module)
    return sys.modules["examples_nn"]


def param_shape(ndim: int, axis: int) -> list[int]:
    """The shape that broadcasts a (C,) vector against an ndim array with channels at axis."""
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    """Every axis but the channel axis: the axes a BatchNorm's statistics reduce over."""
    return tuple(i for i in range(ndim) if i != axis % ndim)
