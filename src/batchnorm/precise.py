"""PreciseBN: replace moving-average statistics with exact population statistics.

Running statistics kept by an exponential moving average trail a network whose weights keep
changing. After training, :func:`precise_bn` freezes the weights, runs the model over
``num_batches_precise`` batches, and sets every BatchNorm layer's running_mean and running_var
to the exact mean and variance of all the values that layer received (Wu and Johnson,
"Rethinking 'Batch' in BatchNorm", 2021). :class:`PopulationStats` does the exact, mergeable
bookkeeping. See docs/precise_bn.md.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import numbers
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _validate
from batchnorm.functional import BatchNormCache, merge_moments, moments
from batchnorm.layer import BatchNorm

__all__ = ["MODES", "LayerSummary", "PopulationStats", "precise_bn"]

#: ``"train"``: one pass, every layer normalizing with batch statistics, as in training.
#: ``"sequential"``: one pass per layer in forward order, finished layers in eval mode.
MODES = ("train", "sequential")


class PopulationStats:
    """Exact count, mean and variance per channel of every value seen, in float64.

    Batches are combined with the parallel formula of Chan, Golub and LeVeque: the pooled
    variance is the count-weighted mean of the within-batch variances *plus* the variance of
    the batch means, so the result is the variance of the concatenated data, whatever the
    split into batches and their order (up to rounding).

    Parameters
    ----------
    num_features : int
        C, the number of channels.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> x = np.random.default_rng(0).normal(size=(100, 3))
    >>> stats = bn.PopulationStats(3)
    >>> stats.update(x[:30]); stats.update(x[30:])
    >>> bool(np.allclose(stats.mean, x.mean(axis=0))), stats.count
    (True, 100)
    >>> bool(np.allclose(stats.var(unbiased=False), x.var(axis=0)))
    True
    """

    def __init__(self, num_features: int) -> None:
        self.num_features = _validate.num_features(num_features)
        self.count = 0
        self.num_batches = 0
        self._mean: NDArray[np.float64] = np.zeros(self.num_features)
        self._var: NDArray[np.float64] = np.zeros(self.num_features)

    def update(self, x: ArrayLike, axis: int = 1) -> None:
        """Add every value of x (N, C, *spatial) to its channel; an empty x adds nothing.

        Raises FloatingPointError, and adds nothing, when x holds NaN or inf or a channel's
        variance overflows.
        """
        xa = _validate.layer_input(x, self.num_features, axis)
        if xa.size:
            mean, var, count = moments(xa, axis=axis)
            _validate.finite_statistics(mean, var, "this PopulationStats was left unchanged")
            self._merge(mean, var, count, 1)

    def update_from_moments(self, mean: ArrayLike, var: ArrayLike, count: int) -> None:
        """Add a batch given by its per-channel mean, *biased* variance and count m.

        For instance ``cache.mean, cache.var, cache.count`` of :func:`batchnorm.forward_train`.
        """
        batch_count = _validate.value_count(count)
        batch_mean = _validate.per_channel(mean, "mean", self.num_features)
        batch_var = _validate.per_channel(var, "var", self.num_features, nonnegative=True)
        if batch_count:
            self._merge(batch_mean, batch_var, batch_count, 1)

    def merge(self, other: PopulationStats) -> None:
        """Add everything another PopulationStats (for example another worker's) has seen."""
        _validate.same_population(self.num_features, other)
        self._merge(other._mean, other._var, other.count, other.num_batches)

    def _merge(
        self, mean: NDArray[np.float64], var: NDArray[np.float64], count: int, n: int
    ) -> None:
        # Finite inputs can still pool to inf (means ~1e154 apart): refused, nothing changes.
        with np.errstate(over="ignore", invalid="ignore"):
            pooled = merge_moments(self._mean, self._var, self.count, mean, var, count)
        _validate.pooled_statistics(pooled[0], pooled[1])
        self._mean, self._var, self.count = pooled
        self.num_batches += n

    @property
    def mean(self) -> NDArray[np.float64]:
        """The mean of every value seen, per channel (a copy)."""
        _validate.population_count(self.count, 1)
        result: NDArray[np.float64] = self._mean.copy()
        return result

    def var(self, unbiased: bool = True) -> NDArray[np.float64]:
        """The variance of every value seen, per channel (a copy).

        ``unbiased=True`` divides the sum of squared deviations by count - 1, False by count.
        """
        unbiased = _validate.flag(unbiased, "unbiased")
        _validate.population_count(self.count, 2 if unbiased else 1)
        scale = self.count / (self.count - 1) if unbiased else 1.0
        result: NDArray[np.float64] = self._var * scale
        return result

    def __repr__(self) -> str:
        return (
            f"PopulationStats({self.num_features}, count={self.count}, "
            f"num_batches={self.num_batches})"
        )


class LayerSummary(NamedTuple):
    """What :func:`precise_bn` did to one layer."""

    name: str
    """Where the layer was found, e.g. ``model.layers[2]``."""
    layer: BatchNorm
    values: int
    """Values seen per channel (over every call and batch)."""
    calls: int
    """Forward calls of the layer that were counted."""
    batches: int
    """Batches run through the model while the layer was being measured."""


def precise_bn(
    model: Callable[[Any], Any],
    batches: Iterable[Any],
    num_batches_precise: int = 200,
    *,
    layers: Iterable[BatchNorm] | None = None,
    progress: bool = False,
    mode: str = "train",
) -> list[LayerSummary]:
    """Set BatchNorm running statistics to the exact population statistics of the data.

    Parameters
    ----------
    model : callable
        ``model(batch)`` runs the network forward. Its weights are not touched; only the
        running statistics of the chosen layers change.
    batches : iterable
        Any iterable; each item is passed to ``model`` as it is. The first
        ``num_batches_precise`` items are used. ``mode="sequential"`` keeps them in memory to
        run them once per layer.
    num_batches_precise : int, default 200
        How many batches to use. About 10^3 to 10^4 samples in all are reported to suffice.
    layers : iterable of BatchNorm, optional
        The layers to recompute. None: every BatchNorm with running statistics reachable from
        ``model`` through attributes, lists, tuples and dicts (each once; cycles are safe),
        except frozen ones. A frozen layer named here is recomputed like any other (batch
        statistics during the pass) and stays frozen.
    progress : bool, default False
        Show a progress bar (needs tqdm: ``pip install tqdm`` or the ``progress`` extra).
    mode : {"train", "sequential"}, default "train"
        ``"train"``: one pass in which the layers normalize with batch statistics, as in
        training; each layer gets the statistics of the inputs it receives then.
        ``"sequential"``: layers are measured one at a time in forward order, each finished
        layer switching to eval mode with its new statistics, so every layer's statistics
        describe the inputs it receives at inference. One pass per layer.

        BatchNorm layers left out of ``layers`` keep their mode during the pass and are
        restored afterwards (when reachable from ``model`` as above).

    Returns
    -------
    list of LayerSummary
        One per layer that was called, in the order the layers were found.

    Raises
    ------
    TypeError
        ``batches`` or ``layers`` is not iterable, or ``layers`` holds something else than
        BatchNorm layers.
    ValueError
        No batches, no BatchNorm found, or no chosen layer was called by the model. Nothing
        is changed then.
    FloatingPointError
        A layer saw NaN or inf (or an overflowing variance) in its input. Every layer is
        restored as it was; so is any error raised by ``model``.

    Warns
    -----
    UserWarning
        Fewer batches than ``num_batches_precise`` (then the statistics of what was seen), a
        chosen layer the model never called (its statistics are left as they were), or
        ``progress=True`` without tqdm.

    Notes
    -----
    Afterwards, ``running_mean`` is the mean and ``running_var`` the variance (unbiased or not
    per the layer's ``unbiased``) of every value the layer saw, over every call and batch,
    pooled exactly by :class:`PopulationStats`. Each layer's mode, momentum, parameters,
    num_batches_tracked and last cached forward pass are restored in a ``finally`` block, so
    also when ``model`` raises; then the running statistics are the old ones too.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> layer = bn.BatchNorm(2)
    >>> data = [np.random.default_rng(i).normal(3.0, 2.0, size=(50, 2)) for i in range(4)]
    >>> summary = bn.precise_bn(layer, data, num_batches_precise=4)
    >>> summary[0].values, summary[0].batches
    (200, 4)
    >>> bool(np.allclose(layer.running_mean, np.concatenate(data).mean(axis=0)))
    True
    """
    # More than sys.maxsize batches (islice's limit) means "all of them" in practice.
    wanted = min(_validate.positive_count(num_batches_precise, "num_batches_precise"), sys.maxsize)
    _validate.precise_mode(mode, MODES)
    batches = _validate.batch_iterable(batches)
    named = _find_layers(model) if layers is None else _named_layers(layers)
    bar = _progress_bar() if progress else None
    # Every reachable BatchNorm is restored afterwards, not only the chosen ones: a layer left
    # out of `layers` but in training mode would otherwise record the pass in its running
    # statistics.
    chosen = {id(layer) for _, layer in named}
    others = [layer for _, layer in _reachable(model) if id(layer) not in chosen]
    protected = [layer for _, layer in named] + others
    saved = [_snapshot(layer) for layer in protected]
    thawed = [layer for _, layer in named if layer.frozen]
    try:
        for layer in thawed:
            layer.frozen = False
        if mode == "train":
            _train_all(named)
            results = _measure(model, batches, wanted, named, range(len(named)), bar)
        else:
            results = _sequential(model, batches, wanted, named, bar)
    finally:
        for layer in thawed:
            layer.frozen = True
        for layer, state in zip(protected, saved, strict=True):
            _restore(layer, state)
    used = max(batches_used for _, _, batches_used in results.values())
    if used < wanted:
        warnings.warn(
            f"precise_bn: asked for num_batches_precise={wanted} batches but the data gave only "
            f"{used}; the statistics are those of these {used} batches.",
            UserWarning,
            stacklevel=2,
        )
    summaries = []
    for index, (name, layer) in enumerate(named):
        if index not in results:
            warnings.warn(
                f"precise_bn: {name} was never called by model(batch); its running statistics "
                "were left as they were.",
                UserWarning,
                stacklevel=2,
            )
            continue
        stats, calls, used = results[index]
        assert layer.running_mean is not None and layer.running_var is not None
        np.copyto(layer.running_mean, stats.mean)
        np.copyto(layer.running_var, stats.var(unbiased=layer.unbiased))
        summaries.append(LayerSummary(name, layer, stats.count, calls, used))
    return summaries


def _measure(
    model: Callable[[Any], Any],
    batches: Iterable[Any],
    wanted: int,
    named: list[tuple[str, BatchNorm]],
    measured: Iterable[int],
    bar: Callable[..., Iterable[Any]] | None,
    order: list[int] | None = None,
    description: str = "precise_bn",
) -> dict[int, tuple[PopulationStats, int, int]]:
    """Run up to `wanted` batches, pooling the statistics of the `measured` layers.

    Returns {layer index: (stats, calls, batches used)} for the layers that were called, and
    appends layer indices to `order` in the order of their first call.
    """
    stats = {i: PopulationStats(named[i][1].num_features) for i in measured}
    calls = dict.fromkeys(stats, 0)

    def observer(index: int) -> Callable[[BatchNormCache], None]:
        def observe(cache: BatchNormCache) -> None:
            # The layer has checked these statistics (finite, float64): merge them directly.
            stats[index]._merge(cache.mean, cache.var, cache.count, 1)
            if order is not None and calls[index] == 0:
                order.append(index)
            calls[index] += 1

        return observe

    used = 0
    items: Iterable[Any] = itertools.islice(batches, wanted)
    if bar is not None:
        items = bar(items, total=wanted, desc=description)
    with contextlib.ExitStack() as stack:
        for i in stats:
            stack.enter_context(_observing(named[i][1], observer(i)))
        for batch in items:
            model(batch)
            used += 1
    if used == 0:
        raise _validate.no_batches()
    if not any(calls.values()):
        raise _validate.layers_not_called([named[i][0] for i in stats])
    return {i: (stats[i], calls[i], used) for i in stats if calls[i]}


def _sequential(
    model: Callable[[Any], Any],
    batches: Iterable[Any],
    wanted: int,
    named: list[tuple[str, BatchNorm]],
    bar: Callable[..., Iterable[Any]] | None,
) -> dict[int, tuple[PopulationStats, int, int]]:
    """Measure layers one at a time in forward order; finished layers switch to eval mode."""
    kept = list(itertools.islice(batches, wanted))
    _train_all(named)
    order: list[int] = []
    # The first pass measures every layer; only the first layer in forward order keeps its
    # result, since its input does not depend on any other BatchNorm's statistics.
    first = _measure(model, kept, wanted, named, range(len(named)), bar, order, "layer 1")
    results = {order[0]: first[order[0]]}
    for step, index in enumerate(order[1:], start=2):
        done = order[step - 2]
        _finish(named[done][1], results[done][0])
        again = _measure(model, kept, wanted, named, [index], bar, None, f"layer {step}")
        results.update(again)
    return results


def _finish(layer: BatchNorm, stats: PopulationStats) -> None:
    """Put a measured layer in eval mode with its new statistics (restored by the caller)."""
    assert layer.running_mean is not None and layer.running_var is not None
    np.copyto(layer.running_mean, stats.mean)
    np.copyto(layer.running_var, stats.var(unbiased=layer.unbiased))
    layer.eval()


def _train_all(named: list[tuple[str, BatchNorm]]) -> None:
    for _, layer in named:
        layer.train()


@contextlib.contextmanager
def _observing(layer: BatchNorm, callback: Callable[[BatchNormCache], None]) -> Iterator[None]:
    layer._observers.append(callback)
    try:
        yield
    finally:
        layer._observers.remove(callback)


def _progress_bar() -> Callable[..., Iterable[Any]] | None:
    """tqdm's progress bar, or None with a warning that says how to install it."""
    try:
        bar: Callable[..., Iterable[Any]] = importlib.import_module("tqdm.auto").tqdm
    except ImportError:
        warnings.warn(
            "precise_bn(progress=True) needs tqdm for its progress bar: pip install tqdm (or "
            "pip install 'batchnorm[progress]'). Continuing without a progress bar.",
            UserWarning,
            stacklevel=3,
        )
        return None
    return bar


# --- finding the layers, saving and restoring their state ---------------------------------------


def _named_layers(layers: Iterable[BatchNorm]) -> list[tuple[str, BatchNorm]]:
    """The explicitly chosen layers, checked, without duplicates."""
    named: list[tuple[str, BatchNorm]] = []
    seen: set[int] = set()
    for i, layer in enumerate(_validate.layer_list(layers, BatchNorm)):
        if id(layer) not in seen:
            seen.add(id(layer))
            _validate.has_running_stats(layer.track_running_stats, f"layers[{i}]")
            named.append((f"layers[{i}]", layer))
    if not named:
        raise _validate.no_layers_found()
    return named


_OPAQUE = (types.ModuleType, type, types.FunctionType, types.MethodType, types.BuiltinFunctionType)


def _find_layers(model: Any) -> list[tuple[str, BatchNorm]]:
    """Every BatchNorm with running statistics that is not frozen, reachable from model, depth
    first, each once."""
    found = [
        (path, layer)
        for path, layer in _reachable(model)
        if layer.track_running_stats and not layer.frozen
    ]
    if not found:
        raise _validate.no_layers_found()
    return found


def _reachable(model: Any) -> list[tuple[str, BatchNorm]]:
    """Every BatchNorm reachable from model through attributes, lists, tuples and dicts."""
    found: list[tuple[str, BatchNorm]] = []
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("model", model)]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        children: list[tuple[str, Any]] = []
        if isinstance(obj, BatchNorm):
            found.append((path, obj))
        elif isinstance(obj, dict):
            children = [(f"{path}[{key!r}]", value) for key, value in obj.items()]
        elif isinstance(obj, list | tuple):
            children = [(f"{path}[{i}]", value) for i, value in enumerate(obj)]
        elif hasattr(obj, "__dict__") and not isinstance(obj, _OPAQUE):
            children = [(f"{path}.{name}", value) for name, value in vars(obj).items()]
        # Containers and plain objects only: skip numbers, strings and arrays early.
        children = [(p, c) for p, c in children if not _is_leaf(c)]
        stack.extend(reversed(children))
    return found


def _is_leaf(obj: Any) -> bool:
    return isinstance(obj, numbers.Number | str | bytes | np.ndarray) or obj is None


class _Snapshot(NamedTuple):
    training: bool
    momentum: float | None
    num_batches_tracked: int | None
    arrays: dict[str, NDArray[np.float64]]
    cache: BatchNormCache | None
    parts: tuple[Any, ...]


def _snapshot(layer: BatchNorm) -> _Snapshot:
    names = ("gamma", "beta", "running_mean", "running_var")
    arrays = {n: getattr(layer, n).copy() for n in names if getattr(layer, n) is not None}
    return _Snapshot(
        layer.training, layer.momentum, layer.num_batches_tracked, arrays, layer._cache,
        layer._parts,
    )  # fmt: skip


def _restore(layer: BatchNorm, state: _Snapshot) -> None:
    layer.training = state.training
    layer.momentum = state.momentum
    layer.num_batches_tracked = state.num_batches_tracked
    for name, value in state.arrays.items():
        np.copyto(getattr(layer, name), value)
    layer._cache = state.cache
    layer._parts = state.parts
