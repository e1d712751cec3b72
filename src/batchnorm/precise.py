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
import itertools
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _exact, _exchange, _pass, _validate, _walk
from batchnorm.functional import BatchNormCache, moments
from batchnorm.layer import BatchNorm

__all__ = ["MODES", "LayerSummary", "PopulationStats", "precise_bn"]

Vector = NDArray[np.float64]

#: ``"train"``: one pass, every layer normalizing with batch statistics, as in training.
#: ``"sequential"``: one pass per layer in forward order, finished layers in eval mode.
MODES = ("train", "sequential")


class PopulationStats:
    """Exact count, mean and variance per channel of every value seen, in float64.

    Batches are combined with the parallel formula of Chan, Golub and LeVeque: the pooled
    variance is the count-weighted mean of the within-batch variances *plus* the variance of
    the batch means, so the result is the variance of the concatenated data, whatever the
    split into batches and their order (up to rounding). The mean and the sum of squared
    deviations are each kept as a float64 pair hi + lo (TwoSum), so that rounding grows neither
    with the offset of the data nor with the number of batches: within a few units of 2^-52 of
    exact arithmetic at offsets up to 1e8 (docs/math.md, "Exact at any offset").

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
        # The total as (count, mean hi, mean lo, m2 hi, m2 lo): the mean and the sum of squared
        # deviations each as an unevaluated sum of two float64s (_exact), so that neither
        # loses digits to the offset nor to the number of batches.
        zeros = np.zeros(self.num_features)
        self._total: _exact.Total = (0, zeros, zeros, zeros, zeros)

    def update(self, x: ArrayLike, axis: int = 1) -> None:
        """Add every value of x (N, C, *spatial) to its channel; an empty x adds nothing.

        Raises FloatingPointError, and adds nothing, when x holds NaN or inf or a channel's
        variance overflows.
        """
        xa = _validate.layer_input(x, self.num_features, axis)
        if xa.size:
            part = moments(xa, axis=axis)
            _validate.finite_statistics(
                part.mean, part.var, "this PopulationStats was left unchanged"
            )
            self._add(part.mean, part.var, part.count, part.mean_lo)

    def update_from_moments(
        self, mean: ArrayLike, var: ArrayLike, count: int, *, mean_lo: ArrayLike | None = None
    ) -> None:
        """Add a batch given by its per-channel mean, *biased* variance and count m.

        For instance ``cache.mean, cache.var, cache.count`` of :func:`batchnorm.forward_train`.
        ``mean_lo`` (C,), optional: what rounding left of the mean (``cache.mean_lo``, or a
        :class:`~batchnorm.functional.Moments`' ``mean_lo``), which keeps the population mean
        and variance exact when the data sit far from zero.
        """
        batch_count = _validate.value_count(count)
        batch_mean = _validate.per_channel(mean, "mean", self.num_features)
        batch_var = _validate.per_channel(var, "var", self.num_features, nonnegative=True)
        lo = (
            None
            if mean_lo is None
            else _validate.per_channel(mean_lo, "mean_lo", self.num_features)
        )
        if batch_count:
            self._add(batch_mean, batch_var, batch_count, lo)

    def merge(self, other: PopulationStats) -> None:
        """Add everything another PopulationStats (for example another worker's) has seen."""
        _validate.same_population(self.num_features, other)
        self._accumulate(other._total, other.num_batches)

    def allreduce(self, group: _exchange.Group) -> None:
        """Make every rank of `group` hold the statistics of everything every rank has seen.

        Every rank calls this together (one allgather); the ranks' statistics are pooled in
        rank order, so every rank ends with bitwise the same statistics and counts. A rank that
        saw nothing takes part. Raises on every rank, changing nothing, when the ranks' channel
        counts differ or the pooled statistics overflow.

        >>> import numpy as np, batchnorm as bn
        >>> stats = bn.PopulationStats(2)
        >>> stats.update(np.ones((3, 2)))
        >>> stats.allreduce(bn.distributed.thread_groups(1)[0])    # one rank: nothing to add
        >>> stats.count
        3
        """
        checked = _validate.group_value(group, False)
        (pooled,), tallies = _exchange.pool(
            checked, [self._total], [self.num_batches], what="PopulationStats.allreduce"
        )
        _exact.check_total(pooled)
        self._total, self.count = pooled, pooled[0]
        self.num_batches = sum(t[0] for t in tallies)

    def _add(self, mean: Vector, var: Vector, count: int, mean_lo: Vector | None) -> None:
        lo = np.zeros_like(mean) if mean_lo is None else mean_lo
        # float(count): NumPy 1.24 makes an object array of an array times a huge Python int.
        self._accumulate((count, mean, lo, var * float(count), np.zeros_like(var)), 1)

    def _accumulate(self, part: _exact.Total, n: int) -> None:
        # Finite inputs can still pool to inf (means ~1e154 apart): refused, nothing changes.
        with np.errstate(over="ignore", invalid="ignore"):
            total = _exact.accumulate(self._total, part)
        _exact.check_total(total)
        self._total, self.count = total, total[0]
        self.num_batches += n

    @property
    def mean(self) -> NDArray[np.float64]:
        """The mean of every value seen, per channel (a copy)."""
        _validate.population_count(self.count, 1)
        result: Vector = self._total[1].copy()
        return result

    @property
    def mean_lo(self) -> Vector:
        """What rounding left of :attr:`mean`: ``mean + mean_lo`` is the mean of every value
        seen to about 2^-104 relative (a copy)."""
        _validate.population_count(self.count, 1)
        result: Vector = self._total[2].copy()
        return result

    def var(self, unbiased: bool = True) -> NDArray[np.float64]:
        """The variance of every value seen, per channel (a copy).

        ``unbiased=True`` divides the sum of squared deviations by count - 1, False by count.
        """
        unbiased = _validate.flag(unbiased, "unbiased")
        _validate.population_count(self.count, 2 if unbiased else 1)
        _, _, _, m2, m2_lo = self._total
        result: Vector = (m2 + m2_lo) / float(self.count - 1 if unbiased else self.count)
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
    group: _exchange.Group | None = None,
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
        ``model`` through attributes (``__slots__`` too), lists, tuples and dicts (each once;
        cycles are safe), except frozen ones. A frozen layer named here is recomputed like any
        other (batch statistics during the pass) and stays frozen.
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
    group : group of workers, optional
        Pool over every rank of a group (:mod:`batchnorm.distributed`), each calling
        precise_bn with its own batches (``num_batches_precise`` per rank; any number, none
        included). During the pass layers use this rank's batch statistics and never
        communicate; afterwards each layer's statistics are pooled in rank order (sequential
        mode: after each layer's pass), the same bits on every rank. An error on one rank is
        raised on every rank, with every layer restored.

    Returns
    -------
    list of LayerSummary, one per layer that was called, in the order the layers were found

    Raises
    ------
    TypeError
        ``batches`` or ``layers`` is not iterable, or ``layers`` holds something else than
        BatchNorm layers.
    ValueError
        No batches (with a group: on no rank), no BatchNorm found, or no chosen layer was
        called by the model (on any rank). Nothing is changed then.
    FloatingPointError
        A layer saw NaN or inf (or an overflowing variance) in its input. Every layer is
        restored as it was; so is any error raised by ``model``.

    Warns
    -----
    UserWarning
        Fewer batches than ``num_batches_precise`` on this rank (then the statistics of what
        was seen), a chosen layer the model never called (its statistics are left as they
        were), or ``progress=True`` without tqdm.

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
    group = _validate.group_value(group)
    named = _walk.find_layers(model) if layers is None else _walk.named_layers(layers)
    bar = _pass.progress_bar() if progress else None
    # Every reachable BatchNorm is restored, not only the chosen ones: one left out of `layers`
    # but in training mode would otherwise record the pass in its running statistics.
    chosen = {id(layer) for _, layer in named}
    others = [layer for _, layer in _walk.reachable(model) if id(layer) not in chosen]
    protected = [layer for _, layer in named] + others
    saved = [_pass.snapshot(layer) for layer in protected]
    try:
        for layer in protected:  # no communication during the pass: pooled afterwards
            layer.group = None
        for _, layer in named:  # a frozen layer named in `layers` is measured like any other
            layer.frozen = False
        if mode == "train":
            _pass.train_all(named)
            results, used = _measure(model, batches, wanted, named, range(len(named)), bar,
                                     group=group)  # fmt: skip
        else:
            results, used = _sequential(model, batches, wanted, named, bar, group)
    finally:
        for layer, state in zip(protected, saved, strict=True):
            _pass.restore(layer, state)
    if used < wanted:
        warnings.warn(
            _validate.fewer_batches(wanted, used, group is not None), UserWarning, stacklevel=2
        )
    summaries = []
    for index, (name, layer) in enumerate(named):
        if index not in results:
            warnings.warn(_validate.never_called(name), UserWarning, stacklevel=2)
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
    group: _exchange.Group | None = None,
) -> tuple[dict[int, tuple[PopulationStats, int, int]], int]:
    """Run up to `wanted` batches, pooling the statistics of the `measured` layers.

    Returns {layer index: (stats, calls, batches used)} for the layers that were called, and
    the batches this rank used; appends layer indices to `order` in the order of their first
    call. With a group, stats, calls, batches and order are every rank's, pooled.
    """
    stats = {i: PopulationStats(named[i][1].num_features) for i in measured}
    calls = dict.fromkeys(stats, 0)

    def observer(index: int) -> Callable[[BatchNormCache], None]:
        def observe(cache: BatchNormCache) -> None:
            # The layer has checked these statistics (finite, float64): merge them directly.
            stats[index]._add(cache.mean, cache.var, cache.count, cache.mean_lo)
            if order is not None and calls[index] == 0:
                order.append(index)
            calls[index] += 1

        return observe

    used = 0
    items: Iterable[Any] = itertools.islice(batches, wanted)
    if bar is not None:
        items = bar(items, total=wanted, desc=description)
    failure: Exception | None = None
    with contextlib.ExitStack() as stack:
        for i in stats:
            stack.enter_context(_pass.observing(named[i][1], observer(i)))
        try:
            for batch in items:
                model(batch)
                used += 1
        except Exception as err:
            failure = err  # with a group: raised after telling the other ranks, in _pool
            if isinstance(err, _validate.OneValuePerChannel):  # say which batch, and what to do
                failure = _validate.one_value_batch(used, err.shape)
                if group is None:
                    raise failure from err
                failure.__cause__ = err
            elif group is None:
                raise
    total = used if group is None else _pool(group, stats, calls, used, order, failure)
    if total == 0:
        raise _validate.no_batches() if group is None else _validate.precise_group_batches()
    if not any(calls.values()):
        raise _validate.layers_not_called([named[i][0] for i in stats])
    return {i: (stats[i], calls[i], total) for i in stats if calls[i]}, used


def _pool(
    group: _exchange.Group,
    stats: dict[int, PopulationStats],
    calls: dict[int, int],
    used: int,
    order: list[int] | None,
    failure: Exception | None,
) -> int:
    """Replace stats, calls and order by every rank's, pooled in rank order; return every
    rank's batches. Raises on every rank if a rank failed or the pooled statistics overflow."""
    parts = [s._total for s in stats.values()]
    tally = [used, *calls.values(), *(order or [])]
    pooled, tallies = _exchange.pool(group, parts, tally, failure, "precise_bn")
    for total in pooled:
        _exact.check_total(total)
    for j, (i, total) in enumerate(zip(stats, pooled, strict=True), start=1):
        stats[i]._total, stats[i].count = total, total[0]
        calls[i] = stats[i].num_batches = sum(t[j] for t in tallies)
    if order is not None:  # the first rank that called any layer gives the forward order
        k = 1 + len(stats)
        order[:] = next((t[k:] for t in tallies if len(t) > k), [])
    return sum(t[0] for t in tallies)


def _sequential(
    model: Callable[[Any], Any],
    batches: Iterable[Any],
    wanted: int,
    named: list[tuple[str, BatchNorm]],
    bar: Callable[..., Iterable[Any]] | None,
    group: _exchange.Group | None,
) -> tuple[dict[int, tuple[PopulationStats, int, int]], int]:
    """Measure layers one at a time in forward order; finished layers switch to eval mode."""
    kept = list(itertools.islice(batches, wanted))
    _pass.train_all(named)
    order: list[int] = []
    # The first pass measures every layer; only the first layer in forward order keeps its
    # result, since its input does not depend on any other BatchNorm's statistics.
    everything = range(len(named))
    first, used = _measure(model, kept, wanted, named, everything, bar, order, "layer 1", group)
    results = {order[0]: first[order[0]]}
    for step, index in enumerate(order[1:], start=2):
        done = order[step - 2]
        _pass.finish(named[done][1], results[done][0])
        again, _ = _measure(model, kept, wanted, named, [index], bar, None, f"layer {step}", group)
        results.update(again)
    return results, used
