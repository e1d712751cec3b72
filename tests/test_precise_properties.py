"""PopulationStats and precise_bn do not care how the data is cut into batches (hypothesis).

Whatever the split, the order of the batches, or the route the pieces take (update, moments,
merges of partial results), the pooled mean and variance are those of the whole data set.
"""

from __future__ import annotations

import itertools

import numpy as np
from helpers import reduce_axes
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm as bn

SETTINGS = settings(max_examples=50, deadline=None)
RTOL = 1e-12


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    # Relative to the size of the values, so that a mean near zero is no problem.
    scale = float(np.max(np.abs(expected))) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale)


@st.composite
def datasets(draw):
    """(x, axis): rows of a 2-D, 3-D, 4-D or channels-last data set, per-channel location
    and spread far from 0 and 1, to be split along axis 0."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(2, 40))
    c = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["2-D", "3-D", "4-D", "channels-last"]))
    shape, axis = {
        "2-D": ((n, c), 1),
        "3-D": ((n, c, 3), 1),
        "4-D": ((n, c, 2, 3), 1),
        "channels-last": ((n, 2, 3, c), -1),
    }[layout]
    pshape = [1] * len(shape)
    pshape[axis] = c
    loc = rng.uniform(-100.0, 100.0, c).reshape(pshape)
    spread = np.exp(rng.uniform(-3.0, 3.0, c)).reshape(pshape)
    return rng.standard_normal(shape) * spread + loc, axis


def _split(data: st.DataObject, n: int) -> list[slice]:
    """Consecutive row ranges covering 0..n, cut where hypothesis says (some may be empty)."""
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=7), label="cuts"))
    bounds = [0, *cuts, n]
    return [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]


def _order(data: st.DataObject, k: int) -> list[int]:
    return data.draw(st.permutations(range(k)), label="order")


def _check(stats: bn.PopulationStats, x: np.ndarray, axis: int) -> None:
    axes = reduce_axes(x.ndim, axis)
    assert stats.count == x.size // x.shape[axis]
    _assert_close(stats.mean, x.mean(axis=axes))
    _assert_close(stats.var(unbiased=False), x.var(axis=axes))
    _assert_close(stats.var(unbiased=True), x.var(axis=axes, ddof=1))


@SETTINGS
@given(datasets(), st.data())
def test_any_split_in_any_order_gives_the_statistics_of_the_whole(dataset, data):
    x, axis = dataset
    parts = [x[s] for s in _split(data, len(x))]
    stats = bn.PopulationStats(x.shape[axis])
    for i in _order(data, len(parts)):
        stats.update(parts[i], axis=axis)
    assert stats.num_batches == sum(len(p) > 0 for p in parts)
    _check(stats, x, axis)


@SETTINGS
@given(datasets(), st.data())
def test_two_splits_agree_with_each_other(dataset, data):
    x, axis = dataset
    c = x.shape[axis]
    a, b = bn.PopulationStats(c), bn.PopulationStats(c)
    for s in _split(data, len(x)):
        a.update(x[s], axis=axis)
    shuffled = x[_order(data, len(x))]  # rows in another order, cut elsewhere
    for s in _split(data, len(x)):
        b.update(shuffled[s], axis=axis)
    assert a.count == b.count
    _assert_close(a.mean, b.mean)
    _assert_close(a.var(), b.var())


@SETTINGS
@given(datasets(), st.integers(1, 4), st.data())
def test_merging_partial_results_equals_one_pass(dataset, workers, data):
    # Batches dealt out to workers, each its own PopulationStats, merged in any order.
    x, axis = dataset
    c = x.shape[axis]
    partial = [bn.PopulationStats(c) for _ in range(workers)]
    for s in _split(data, len(x)):
        partial[data.draw(st.integers(0, workers - 1), label="worker")].update(x[s], axis=axis)
    order = _order(data, workers)
    total = partial[order[0]]
    for i in order[1:]:
        total.merge(partial[i])
    _check(total, x, axis)


@SETTINGS
@given(datasets(), st.data())
def test_moments_route_equals_update(dataset, data):
    x, axis = dataset
    c = x.shape[axis]
    direct, by_moments = bn.PopulationStats(c), bn.PopulationStats(c)
    for s in _split(data, len(x)):
        part = x[s]
        direct.update(part, axis=axis)
        if len(part):
            axes = reduce_axes(x.ndim, axis)
            count = part.size // c
            by_moments.update_from_moments(part.mean(axis=axes), part.var(axis=axes), count)
    assert by_moments.count == direct.count
    _assert_close(by_moments.mean, direct.mean)
    _assert_close(by_moments.var(), direct.var())
    _check(by_moments, x, axis)


@SETTINGS
@given(datasets(), st.data(), st.booleans(), st.sampled_from(["train", "sequential"]))
def test_precise_bn_on_one_layer_gives_the_statistics_of_all_batches(dataset, data, unbiased, mode):
    x, axis = dataset
    c = x.shape[axis]
    # Training-mode forward needs 2 values per channel: drop batches that have fewer.
    parts = [x[s] for s in _split(data, len(x))]
    parts = [p for p in parts if p.size // c >= 2]
    if not parts:
        parts = [x]
    layer = bn.BatchNorm(c, momentum=0.5, unbiased=unbiased, axis=axis)
    layer.eval()
    summary = bn.precise_bn(layer, parts, len(parts), mode=mode)
    whole = np.concatenate(parts)
    axes = reduce_axes(x.ndim, axis)
    assert summary[0].values == whole.size // c
    assert (summary[0].calls, summary[0].batches) == (len(parts), len(parts))
    _assert_close(layer.running_mean, whole.mean(axis=axes))
    _assert_close(layer.running_var, whole.var(axis=axes, ddof=1 if unbiased else 0))
    assert layer.training is False and layer.momentum == 0.5
    assert layer.num_batches_tracked == 0
