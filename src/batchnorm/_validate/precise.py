"""Checks of PopulationStats, precise_bn and the gradient checks."""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from batchnorm._validate.kernels import channel_list

__all__ = [
    "batch_iterable",
    "eval_statistics",
    "fewer_batches",
    "has_running_stats",
    "layer_list",
    "layers_not_called",
    "never_called",
    "no_batches",
    "no_layers_found",
    "no_tqdm",
    "one_value_batch",
    "pooled_statistics",
    "population_count",
    "positive_count",
    "precise_mode",
    "same_population",
    "same_shapes",
]


def positive_count(value: Any, name: str) -> int:
    """Check a positive integer option such as num_batches_precise."""
    wrong_type = isinstance(value, bool) or not isinstance(value, numbers.Integral)
    if wrong_type or value <= 0:
        error = TypeError if wrong_type else ValueError
        raise error(f"{name} must be a positive int; got {value!r}.")
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
            f"pooling overflowed: the mean or variance of channels {channel_list(bad)} over "
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


def no_layers_found(frozen: int = 0, function: str | None = None) -> ValueError:
    """No BatchNorm to recompute; `function` names a model that is a function or method."""
    if function is not None:
        return ValueError(
            f"precise_bn found no BatchNorm layer: model is the {function}, and functions and "
            "methods are not searched (their layers live in closures, globals or the object "
            "they belong to). Pass the layers to recompute: precise_bn(model, batches, "
            "layers=[bn1, bn2, ...]), or pass an object whose attributes hold them."
        )
    skipped = (
        f" It skipped {frozen} frozen layer(s): name them in layers=[...] to recompute them."
        if frozen
        else ""
    )
    return ValueError(
        "precise_bn found no BatchNorm layer with running statistics to recompute. Pass "
        "layers=[...] explicitly, or keep the layers in attributes, lists, tuples or dicts of "
        f"the model so they can be found.{skipped}"
    )


def no_tqdm() -> str:
    return (
        "precise_bn(progress=True) needs tqdm for its progress bar: pip install tqdm (or "
        "pip install 'batchnorm[progress]'). Continuing without a progress bar."
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


def one_value_batch(index: int, shape: tuple[int, ...]) -> ValueError:
    """A batch of precise_bn's pass gave a layer one value per channel."""
    lower = f", or lower num_batches_precise to {index} to stop before it" if index > 0 else ""
    return ValueError(
        f"precise_bn: batch {index} (counting from 0) gave a BatchNorm layer input of shape "
        f"{shape}, 1 value per channel, which has no batch variance; nothing was changed. "
        "precise_bn needs batch statistics, so this batch cannot be used: drop it from "
        f"`batches` (a loader's last, shorter batch: drop_last=True){lower}."
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
