"""The machinery of precise_bn's measuring passes over a model: each layer's state saved before
and restored after, observers of its training-mode forward calls, modes, and a progress bar."""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from batchnorm import _validate
from batchnorm.functional import BatchNormCache
from batchnorm.layer import BatchNorm


@contextlib.contextmanager
def observing(layer: BatchNorm, callback: Callable[[BatchNormCache], None]) -> Iterator[None]:
    """Call `callback` with the cache of each training-mode forward of `layer` meanwhile."""
    layer._observers.append(callback)
    try:
        yield
    finally:
        layer._observers.remove(callback)


class Snapshot(NamedTuple):
    training: bool
    momentum: float | None
    num_batches_tracked: int | None
    arrays: dict[str, NDArray[np.float64]]
    caches: tuple[BatchNormCache | None, Any, Any]
    group: Any
    frozen: bool


def snapshot(layer: BatchNorm) -> Snapshot:
    """Mode, momentum, counter, parameters, running statistics, last caches, group, frozen."""
    names = ("gamma", "beta", "running_mean", "running_var")
    arrays = {n: getattr(layer, n).copy() for n in names if getattr(layer, n) is not None}
    caches = (layer._cache, layer._cache_group, layer._parts)
    return Snapshot(
        layer.training, layer.momentum, layer.num_batches_tracked, arrays, caches, layer.group,
        layer.frozen,
    )  # fmt: skip


def restore(layer: BatchNorm, state: Snapshot) -> None:
    """Put back what :func:`snapshot` saved (writes that cannot fail)."""
    layer.training = state.training
    layer.momentum = state.momentum
    layer.num_batches_tracked = state.num_batches_tracked
    for name, value in state.arrays.items():
        np.copyto(getattr(layer, name), value)
    layer._cache, layer._cache_group, layer._parts = state.caches
    layer.group, layer.frozen = state.group, state.frozen


def train_all(named: list[tuple[str, BatchNorm]]) -> None:
    for _, layer in named:
        layer.train()


def finish(layer: BatchNorm, stats: Any) -> None:
    """Put a measured layer in eval mode with its new statistics (restored by the caller)."""
    assert layer.running_mean is not None and layer.running_var is not None
    np.copyto(layer.running_mean, stats.mean)
    np.copyto(layer.running_var, stats.var(unbiased=layer.unbiased))
    layer.eval()


def progress_bar() -> Callable[..., Iterable[Any]] | None:
    """tqdm's progress bar, or None with a warning that says how to install it."""
    try:
        bar: Callable[..., Iterable[Any]] = importlib.import_module("tqdm.auto").tqdm
    except ImportError:
        warnings.warn(_validate.no_tqdm(), UserWarning, stacklevel=3)
        return None
    return bar
