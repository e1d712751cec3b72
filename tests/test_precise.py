"""Tests of PopulationStats and precise_bn (src/batchnorm/precise.py).

Every statistic is checked against a brute force: the layers are run by hand, in NumPy, the
inputs each BatchNorm receives are concatenated, and np.mean / np.var of that concatenation is
what the running statistics must hold.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from helpers import examples_nn, reduce_axes

import batchnorm as bn

nn = examples_nn()  # examples/nn.py is not part of the package

RTOL = 1e-12
Array = np.ndarray


# --- NumPy brute force ----------------------------------------------------------------------------


def _per_channel(v: Array, ndim: int, axis: int) -> Array:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _np_stats(xs: Sequence[Array], axis: int, ddof: int = 0) -> tuple[Array, Array]:
    """Mean and variance per channel of the concatenation of xs (batch axis 0)."""
    x = np.concatenate(xs, axis=0)
    axes = reduce_axes(x.ndim, axis)
    return x.mean(axis=axes), x.var(axis=axes, ddof=ddof)


def _normalize(x: Array, mean: Array, var: Array, layer: bn.BatchNorm) -> Array:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, written out in NumPy."""
    ax = layer.axis

    def r(v: Array) -> Array:
        return _per_channel(v, x.ndim, ax)

    y = (x - r(mean)) / np.sqrt(r(var) + layer.eps)
    if layer.gamma is not None and layer.beta is not None:
        y = y * r(layer.gamma) + r(layer.beta)
    return y


def _batch_normalize(x: Array, layer: bn.BatchNorm) -> Array:
    axes = reduce_axes(x.ndim, layer.axis)
    return _normalize(x, x.mean(axis=axes), x.var(axis=axes), layer)


def _assert_close(actual: Array, expected: Array, rtol: float = RTOL) -> None:
    # Relative to the size of the values, so that a mean near zero is no problem.
    scale = float(np.max(np.abs(expected))) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _assert_stats(layer: bn.BatchNorm, inputs: Sequence[Array]) -> None:
    """running_mean/var are the statistics of the concatenated inputs (var per `unbiased`)."""
    mean, var = _np_stats(inputs, layer.axis, ddof=1 if layer.unbiased else 0)
    assert layer.running_mean is not None and layer.running_var is not None
    _assert_close(layer.running_mean, mean)
    _assert_close(layer.running_var, var)


# --- models -------------------------------------------------------------------------------------


class Chain:
    """x -> stage[0] -> norms[0] -> stage[1] -> norms[1] -> ...; stages are fixed functions."""

    def __init__(self, stages: list[Callable[[Array], Array]], norms: list[bn.BatchNorm]):
        self.stages = stages
        self.norms = norms

    def __call__(self, x: Array) -> Array:
        for stage, norm in zip(self.stages, self.norms, strict=True):
            x = norm(stage(x))
        return x

    def brute_train(self, batches: Sequence[Array]) -> list[list[Array]]:
        """Every layer's inputs per batch, each layer normalizing with batch statistics."""
        seen: list[list[Array]] = [[] for _ in self.norms]
        for x in batches:
            h = x
            for k, (stage, norm) in enumerate(zip(self.stages, self.norms, strict=True)):
                h = stage(h)
                seen[k].append(h)
                h = _batch_normalize(h, norm)
        return seen

    def brute_sequential(self, batches: Sequence[Array]) -> list[tuple[Array, Array]]:
        """Per layer k: population (mean, stored var), layers before k in eval mode with theirs."""
        result: list[tuple[Array, Array]] = []
        for k, norm in enumerate(self.norms):
            inputs = []
            for x in batches:
                h = x
                for j in range(k):
                    h = _normalize(self.stages[j](h), *result[j], self.norms[j])
                inputs.append(self.stages[k](h))
            result.append(_np_stats(inputs, norm.axis, ddof=1 if norm.unbiased else 0))
        return result


def _linear(rng: np.random.Generator, n_in: int, n_out: int) -> Callable[[Array], Array]:
    w = rng.normal(size=(n_in, n_out))
    b = rng.normal(3.0, 2.0, size=n_out)
    return lambda x: x @ w + b


def _relu_linear(rng: np.random.Generator, n_in: int, n_out: int) -> Callable[[Array], Array]:
    lin = _linear(rng, n_in, n_out)
    return lambda x: lin(np.maximum(x, 0.0))


def _norm(rng: np.random.Generator, c: int, **kwargs: Any) -> bn.BatchNorm:
    layer = bn.BatchNorm(c, **kwargs)
    # Parameters that are not 1 and 0, so that they matter for the following layers.
    if layer.gamma is not None and layer.beta is not None:
        layer.gamma[:] = rng.uniform(0.5, 2.0, c)
        layer.beta[:] = rng.normal(size=c)
    return layer


def mlp(seed: int = 0, **kwargs: Any) -> Chain:
    """Linear(5, 4) -> BN -> ReLU -> Linear(4, 3) -> BN."""
    rng = np.random.default_rng(seed)
    return Chain(
        [_linear(rng, 5, 4), _relu_linear(rng, 4, 3)],
        [_norm(rng, 4, **kwargs), _norm(rng, 3, **kwargs)],
    )


def convnet(seed: int = 0, **kwargs: Any) -> Chain:
    """Conv2d(2, 3, 3, padding=1) -> BN -> ReLU -> MaxPool -> Conv2d(3, 4, 3, padding=1) -> BN."""
    rng = np.random.default_rng(seed)
    conv1 = nn.Conv2d(2, 3, 3, padding=1, rng=rng)
    conv2 = nn.Conv2d(3, 4, 3, padding=1, rng=rng)
    conv1.bias[:] = [1.0, -2.0, 0.5]
    pool, relu = nn.MaxPool2d(2), nn.ReLU()
    return Chain(
        [conv1, lambda x: conv2(pool(relu(x)))],
        [_norm(rng, 3, **kwargs), _norm(rng, 4, **kwargs)],
    )


def channels_last_net(seed: int = 0, **kwargs: Any) -> Chain:
    """(N, H, W, 3) -> per-pixel linear -> BN(axis=-1) -> ReLU -> per-pixel linear -> BN."""
    rng = np.random.default_rng(seed)
    return Chain(
        [_linear(rng, 3, 4), _relu_linear(rng, 4, 2)],
        [_norm(rng, 4, axis=-1, **kwargs), _norm(rng, 2, axis=-1, **kwargs)],
    )


def mlp_batches(sizes: Sequence[int] = (7, 3, 12, 5), seed: int = 1) -> list[Array]:
    rng = np.random.default_rng(seed)
    return [rng.normal(2.0, 3.0, size=(n, 5)) for n in sizes]


def image_batches(sizes: Sequence[int] = (3, 1, 5, 2), seed: int = 1) -> list[Array]:
    rng = np.random.default_rng(seed)
    return [rng.normal(1.0, 2.0, size=(n, 2, 6, 6)) for n in sizes]


def channels_last_batches(sizes: Sequence[int] = (3, 1, 4), seed: int = 1) -> list[Array]:
    rng = np.random.default_rng(seed)
    return [rng.normal(-1.0, 2.0, size=(n, 3, 4, 3)) for n in sizes]


NETS = {
    "2-D": (mlp, mlp_batches),
    "4-D": (convnet, image_batches),
    "channels-last": (channels_last_net, channels_last_batches),
}


def _state(layer: bn.BatchNorm) -> dict[str, Any]:
    """Everything precise_bn promises to restore, as copies, plus the array objects."""
    return {
        "training": layer.training,
        "momentum": layer.momentum,
        "num_batches_tracked": layer.num_batches_tracked,
        "arrays": {
            name: (getattr(layer, name), np.array(getattr(layer, name), copy=True))
            for name in ("gamma", "beta", "running_mean", "running_var")
            if getattr(layer, name) is not None
        },
    }


def _assert_restored(layer: bn.BatchNorm, before: dict[str, Any], stats: bool = True) -> None:
    """Same mode, momentum, counter; same array objects holding the same bits."""
    assert layer.training is before["training"]
    assert layer.momentum == before["momentum"]
    assert layer.num_batches_tracked == before["num_batches_tracked"]
    for name, (obj, value) in before["arrays"].items():
        assert getattr(layer, name) is obj, f"{name} was replaced by a new array"
        if stats or name in ("gamma", "beta"):
            assert np.array_equal(getattr(layer, name), value), f"{name} changed"


# --- PopulationStats ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((40, 3), 1), ((9, 3, 4, 5), 1), ((9, 4, 5, 3), -1), ((9, 3, 7), 1)],
    ids=["2-D", "4-D", "channels-last", "3-D"],
)
def test_population_stats_are_those_of_the_concatenated_data(shape, axis):
    rng = np.random.default_rng(0)
    c = shape[axis]
    x = rng.normal(size=shape) * _per_channel(np.array([0.1, 1.0, 10.0]), len(shape), axis)
    x = x + _per_channel(np.array([-5.0, 0.0, 100.0]), len(shape), axis)
    stats = bn.PopulationStats(c)
    cuts = [0, 1, 4, 4, 5, shape[0]]  # unequal batches, one of one row, one empty
    for lo, hi in itertools.pairwise(cuts):
        stats.update(x[lo:hi], axis=axis)
    axes = reduce_axes(len(shape), axis)
    assert stats.count == x.size // c
    assert stats.num_batches == 4  # the empty batch is not counted
    assert stats.mean.dtype == np.float64 and stats.var().dtype == np.float64
    assert stats.mean.shape == (c,)
    _assert_close(stats.mean, x.mean(axis=axes))
    _assert_close(stats.var(), x.var(axis=axes, ddof=1))
    _assert_close(stats.var(unbiased=True), x.var(axis=axes, ddof=1))
    _assert_close(stats.var(unbiased=False), x.var(axis=axes, ddof=0))


def test_population_stats_default_axis_is_1():
    x = np.random.default_rng(1).normal(size=(6, 2, 3))
    a, b = bn.PopulationStats(2), bn.PopulationStats(2)
    a.update(x)
    b.update(x, axis=1)
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.var(), b.var())


def test_population_stats_float32_input_is_pooled_in_float64():
    x = np.random.default_rng(2).normal(4.0, 2.0, size=(300, 3)).astype(np.float32)
    stats = bn.PopulationStats(3)
    for part in np.array_split(x, 7):
        stats.update(part)
    x64 = x.astype(np.float64)
    assert stats.mean.dtype == np.float64
    _assert_close(stats.mean, x64.mean(axis=0), rtol=1e-6)
    _assert_close(stats.var(), x64.var(axis=0, ddof=1), rtol=1e-5)


def test_population_stats_has_no_catastrophic_cancellation():
    # A mean 1e8 times the spread: E[x^2] - E[x]^2 would lose every digit here.
    x = np.random.default_rng(3).normal(1e8, 1.0, size=(1000, 2))
    stats = bn.PopulationStats(2)
    for part in np.array_split(x, 13):
        stats.update(part)
    _assert_close(stats.mean, x.mean(axis=0))
    np.testing.assert_allclose(stats.var(), x.var(axis=0, ddof=1), rtol=1e-6)


def test_population_stats_update_from_moments_takes_the_biased_variance():
    rng = np.random.default_rng(4)
    parts = [rng.normal(i, 1.0 + i, size=(n, 3)) for i, n in enumerate([2, 9, 1, 30])]
    stats = bn.PopulationStats(3)
    for p in parts:
        stats.update_from_moments(p.mean(axis=0), p.var(axis=0), len(p))
    mean, var = _np_stats(parts, 1, ddof=1)
    assert stats.count == 42 and stats.num_batches == 4
    _assert_close(stats.mean, mean)
    _assert_close(stats.var(), var)


def test_population_stats_update_from_moments_accepts_a_training_cache():
    x = np.random.default_rng(5).normal(size=(8, 3, 2, 2))
    _, cache = bn.forward_train(x)
    a, b = bn.PopulationStats(3), bn.PopulationStats(3)
    a.update_from_moments(cache.mean, cache.var, cache.count)
    b.update(x)
    _assert_close(a.mean, b.mean)
    _assert_close(a.var(), b.var())
    assert a.count == b.count == 32


def test_population_stats_merge_pools_two_populations():
    rng = np.random.default_rng(6)
    x, y = rng.normal(0.0, 1.0, size=(10, 4)), rng.normal(5.0, 3.0, size=(25, 4))
    a, b = bn.PopulationStats(4), bn.PopulationStats(4)
    a.update(x[:4])
    a.update(x[4:])
    b.update(y)
    b_mean, b_var, b_count = b.mean, b.var(), b.count
    a.merge(b)
    mean, var = _np_stats([x, y], 1, ddof=1)
    assert a.count == 35 and a.num_batches == 3
    _assert_close(a.mean, mean)
    _assert_close(a.var(), var)
    # The other one is left as it was.
    assert b.count == b_count
    assert np.array_equal(b.mean, b_mean) and np.array_equal(b.var(), b_var)


def test_population_stats_merge_with_itself_counts_everything_twice():
    x = np.random.default_rng(7).normal(size=(5, 2))
    stats = bn.PopulationStats(2)
    stats.update(x)
    stats.merge(stats)
    assert stats.count == 10 and stats.num_batches == 2
    _assert_close(stats.mean, x.mean(axis=0))
    _assert_close(stats.var(unbiased=False), x.var(axis=0))


def test_population_stats_merge_into_and_from_empty():
    x = np.random.default_rng(7).normal(size=(5, 2))
    full, empty = bn.PopulationStats(2), bn.PopulationStats(2)
    full.update(x)
    mean, var = full.mean, full.var()
    full.merge(bn.PopulationStats(2))
    assert full.count == 5
    assert np.array_equal(full.mean, mean) and np.array_equal(full.var(), var)
    empty.merge(full)
    assert empty.count == 5
    assert np.array_equal(empty.mean, mean) and np.array_equal(empty.var(), var)


def test_population_stats_empty_updates_add_nothing():
    x = np.random.default_rng(8).normal(size=(6, 3))
    stats = bn.PopulationStats(3)
    stats.update(np.empty((0, 3)))
    stats.update_from_moments(np.zeros(3), np.zeros(3), 0)
    assert stats.count == 0 and stats.num_batches == 0
    stats.update(x)
    mean, var = stats.mean, stats.var()
    stats.update(np.empty((0, 3, 4)))
    stats.update_from_moments(np.full(3, 1e9), np.full(3, 1e9), 0)
    assert stats.count == 6 and stats.num_batches == 1
    assert np.array_equal(stats.mean, mean) and np.array_equal(stats.var(), var)


def test_population_stats_one_value_has_a_biased_variance_only():
    stats = bn.PopulationStats(2)
    stats.update(np.array([[1.0, 2.0]]))
    assert np.array_equal(stats.mean, [1.0, 2.0])
    assert np.array_equal(stats.var(unbiased=False), [0.0, 0.0])
    with pytest.raises(ValueError, match="unbiased variance needs at least 2"):
        stats.var()


def test_population_stats_results_are_copies():
    stats = bn.PopulationStats(2)
    stats.update(np.array([[1.0, 2.0], [3.0, 6.0]]))
    stats.mean[:] = 99.0
    stats.var()[:] = 99.0
    assert np.array_equal(stats.mean, [2.0, 4.0])
    assert np.array_equal(stats.var(unbiased=False), [1.0, 4.0])
    # Moments passed in are copied too.
    mean, var = np.array([0.0, 0.0]), np.array([1.0, 1.0])
    fresh = bn.PopulationStats(2)
    fresh.update_from_moments(mean, var, 3)
    mean[:] = 50.0
    var[:] = 50.0
    assert np.array_equal(fresh.mean, [0.0, 0.0])


def test_population_stats_before_any_data_refuses_mean_and_var():
    stats = bn.PopulationStats(3)
    assert stats.count == 0
    with pytest.raises(ValueError, match="has seen 0"):
        _ = stats.mean
    for unbiased in (True, False):
        with pytest.raises(ValueError, match="has seen 0"):
            stats.var(unbiased=unbiased)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((4, 2), 1), ((4, 2, 3, 3), 1), ((4, 5, 5, 3), 1), ((4, 3, 5, 2), -1)],
    ids=["2-D", "4-D", "channels-last without axis=-1", "axis=-1 on channels-first"],
)
def test_population_stats_refuses_the_wrong_channel_count(shape, axis):
    stats = bn.PopulationStats(3)
    with pytest.raises(ValueError, match="expected 3 channels"):
        stats.update(np.zeros(shape), axis=axis)
    assert stats.count == 0


def test_population_stats_refuses_non_float_and_1d_input():
    stats = bn.PopulationStats(3)
    with pytest.raises(TypeError, match="dtype"):
        stats.update(np.ones((4, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        stats.update(np.ones(3))
    assert stats.count == 0


def test_population_stats_merge_refuses_another_width_or_type():
    a = bn.PopulationStats(3)
    a.update(np.ones((2, 3)))
    b = bn.PopulationStats(4)
    b.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"PopulationStats\(3\)"):
        a.merge(b)
    with pytest.raises(ValueError, match="cannot be pooled"):
        a.merge(np.ones(3))  # type: ignore[arg-type]
    assert a.count == 2


@pytest.mark.parametrize(
    ("mean", "var", "match"),
    [
        ([0.0, 0.0, 0.0], [1.0, -1e-3, 1.0], "var must be >= 0"),
        ([0.0, np.nan, 0.0], [1.0, 1.0, 1.0], "mean must be finite"),
        ([0.0, 0.0, 0.0], [1.0, 1.0, np.nan], "var must be finite"),
        ([np.inf, 0.0, 0.0], [1.0, 1.0, 1.0], "mean must be finite"),
        ([0.0, 0.0], [1.0, 1.0, 1.0], r"mean must have shape \(3,\)"),
        ([0.0, 0.0, 0.0], [[1.0, 1.0, 1.0]], r"var must have shape \(3,\)"),
    ],
)
def test_population_stats_refuses_bad_moments_and_changes_nothing(mean, var, match):
    stats = bn.PopulationStats(3)
    stats.update(np.arange(6.0).reshape(2, 3))
    before = stats.mean, stats.var(), stats.count, stats.num_batches
    with pytest.raises(ValueError, match=match):
        stats.update_from_moments(np.array(mean), np.array(var), 5)
    assert (stats.count, stats.num_batches) == before[2:]
    assert np.array_equal(stats.mean, before[0]) and np.array_equal(stats.var(), before[1])


@pytest.mark.parametrize("count", [-1, 2.5, True, "3", None, np.float64(4.0)])
def test_population_stats_refuses_a_bad_count(count):
    stats = bn.PopulationStats(2)
    with pytest.raises(ValueError, match="count must be a non-negative int"):
        stats.update_from_moments(np.zeros(2), np.ones(2), count)
    assert stats.count == 0


def test_population_stats_accepts_numpy_integer_counts():
    stats = bn.PopulationStats(2)
    stats.update_from_moments(np.zeros(2), np.ones(2), np.int64(4))
    assert stats.count == 4 and isinstance(stats.count, int)


@pytest.mark.parametrize(
    ("c", "error"), [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError),
                     (None, TypeError)]
)  # fmt: skip
def test_population_stats_refuses_a_bad_width(c, error):
    with pytest.raises(error, match="num_features must be a positive int"):
        bn.PopulationStats(c)


def test_population_stats_repr_says_what_it_holds():
    stats = bn.PopulationStats(3)
    stats.update(np.ones((4, 3)))
    assert repr(stats) == "PopulationStats(3, count=4, num_batches=1)"


# --- precise_bn: exactness ----------------------------------------------------------------------


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("unbiased", [True, False])
def test_train_mode_gives_the_statistics_of_the_concatenated_inputs(net, unbiased):
    make, data = NETS[net]
    model, batches = make(unbiased=unbiased), data()
    expected = model.brute_train(batches)
    summary = bn.precise_bn(model, batches, num_batches_precise=len(batches))
    for layer, inputs in zip(model.norms, expected, strict=True):
        _assert_stats(layer, inputs)
    assert [s.layer for s in summary] == model.norms


def test_running_var_is_unbiased_or_biased_per_layer():
    rng = np.random.default_rng(0)
    a, b = bn.BatchNorm(2, unbiased=True), bn.BatchNorm(2, unbiased=False)
    model = Chain([lambda x: x, lambda x: x], [a, b])
    batches = [rng.normal(size=(n, 2)) for n in (3, 4, 5)]
    bn.precise_bn(model, batches, 3)
    x = np.concatenate(batches)
    _assert_close(a.running_var, x.var(axis=0, ddof=1))
    # b's input is a's output, normalized per batch in train mode.
    y = np.concatenate([_batch_normalize(xb, a) for xb in batches])
    _assert_close(b.running_var, y.var(axis=0, ddof=0))
    ratio = np.asarray(a.running_var) / x.var(axis=0, ddof=0)
    _assert_close(ratio, np.full(2, 12 / 11))


def test_statistics_are_not_an_average_of_batch_variances():
    # Two batches with the same spread around different means: the pooled variance is the
    # within-batch variance plus the variance of the batch means, 1 + 25 = 26.
    layer = bn.BatchNorm(1, unbiased=False)
    batches = [np.array([[0.0], [2.0]]), np.array([[10.0], [12.0]])]
    bn.precise_bn(layer, batches, 2)
    assert layer.running_mean is not None and layer.running_var is not None
    np.testing.assert_allclose(layer.running_mean, [6.0], rtol=1e-15)
    np.testing.assert_allclose(layer.running_var, [26.0], rtol=1e-15)


@pytest.mark.parametrize("mode", ["train", "sequential"])
def test_layers_without_affine_parameters(mode):
    model, batches = mlp(affine=False), mlp_batches()
    train_inputs = model.brute_train(batches)
    sequential = model.brute_sequential(batches)
    bn.precise_bn(model, batches, 4, mode=mode)
    for k, layer in enumerate(model.norms):
        assert layer.gamma is None and layer.beta is None
        if mode == "train":
            _assert_stats(layer, train_inputs[k])
        else:
            _assert_close(layer.running_mean, sequential[k][0])
            _assert_close(layer.running_var, sequential[k][1])


def test_float32_model_is_measured_in_float64():
    layer = bn.BatchNorm(3)
    rng = np.random.default_rng(1)
    batches = [rng.normal(3.0, 2.0, size=(n, 3, 4)).astype(np.float32) for n in (2, 5, 3)]
    bn.precise_bn(layer, batches, 3)
    mean, var = _np_stats([b.astype(np.float64) for b in batches], 1, ddof=1)
    assert layer.running_mean is not None and layer.running_var is not None
    assert layer.running_mean.dtype == np.float64
    _assert_close(layer.running_mean, mean, rtol=1e-6)
    _assert_close(layer.running_var, var, rtol=1e-5)


def test_only_the_first_num_batches_precise_batches_are_used():
    model, batches = mlp(), mlp_batches((4, 6, 5, 8, 3))
    expected = model.brute_train(batches[:3])
    source = iter(batches)
    summary = bn.precise_bn(model, source, num_batches_precise=3)
    for layer, inputs in zip(model.norms, expected, strict=True):
        _assert_stats(layer, inputs)
    assert all(s.batches == 3 for s in summary)
    # No batch beyond the third was taken from the iterator.
    assert next(source) is batches[3]


def test_works_on_the_examples_sequential():
    rng = np.random.default_rng(0)
    norm1, norm2 = bn.BatchNorm(4), bn.BatchNorm(3)
    lin1, lin2 = nn.Linear(5, 4, rng), nn.Linear(4, 3, rng)
    model = nn.Sequential(lin1, norm1, nn.ReLU(), lin2, norm2)
    batches = mlp_batches()
    inputs1, inputs2 = [], []
    for x in batches:
        h = lin1(x)
        inputs1.append(h)
        inputs2.append(lin2(np.maximum(_batch_normalize(h, norm1), 0.0)))
    summary = bn.precise_bn(model, batches, 4)
    _assert_stats(norm1, inputs1)
    _assert_stats(norm2, inputs2)
    assert [s.name for s in summary] == ["model.layers[1]", "model.layers[4]"]


def test_results_of_several_workers_pool_exactly():
    # The recipe of docs/precise_bn.md: each worker runs its own share; (mean, biased var, n)
    # per layer is all it takes to pool them.
    batches = mlp_batches((7, 3, 12, 5, 9, 4))
    reference = mlp()
    bn.precise_bn(reference, batches, 6)
    workers = [mlp(), mlp()]
    summaries = [
        bn.precise_bn(w, share, 3)
        for w, share in zip(workers, (batches[:3], batches[3:]), strict=True)
    ]
    for k, expected in enumerate(reference.norms):
        pooled = bn.PopulationStats(expected.num_features)
        for summary in summaries:
            s = summary[k]
            n = s.values
            pooled.update_from_moments(s.layer.running_mean, s.layer.running_var * (n - 1) / n, n)
        _assert_close(pooled.mean, expected.running_mean)
        _assert_close(pooled.var(unbiased=expected.unbiased), expected.running_var)


def test_model_may_be_a_function_when_layers_are_given():
    layer = bn.BatchNorm(2)
    batches = mlp_batches()

    def model(x: Array) -> Array:
        return layer(x[:, :2] * 3.0)

    summary = bn.precise_bn(model, batches, 4, layers=[layer])
    _assert_stats(layer, [x[:, :2] * 3.0 for x in batches])
    assert summary[0].name == "layers[0]"


def test_batches_may_be_any_objects_the_model_understands():
    layer = bn.BatchNorm(2)
    batches = [{"image": x[:, :2], "label": 0} for x in mlp_batches()]

    class Model:
        def __init__(self) -> None:
            self.norm = layer

        def __call__(self, batch: dict[str, Any]) -> Array:
            return self.norm(batch["image"])

    bn.precise_bn(Model(), batches, 4)
    _assert_stats(layer, [b["image"] for b in batches])


# --- precise_bn: summary and layers reused ------------------------------------------------------


def test_summary_says_what_was_done_to_each_layer():
    model, batches = mlp(), mlp_batches()
    summary = bn.precise_bn(model, batches, num_batches_precise=4)
    rows = sum(len(x) for x in batches)
    assert len(summary) == 2
    for i, s in enumerate(summary):
        assert isinstance(s, bn.precise.LayerSummary)
        assert s.name == f"model.norms[{i}]"
        assert s.layer is model.norms[i]
        assert (s.values, s.calls, s.batches) == (rows, 4, 4)
    name, layer, values, calls, batches_used = summary[0]
    assert (name, layer, values, calls, batches_used) == tuple(summary[0])


def test_summary_counts_spatial_values_per_channel():
    model, batches = convnet(), image_batches()
    summary = bn.precise_bn(model, batches, 4)
    n = sum(len(x) for x in batches)
    assert [s.values for s in summary] == [n * 6 * 6, n * 3 * 3]


@pytest.mark.parametrize("mode", ["train", "sequential"])
def test_a_layer_called_twice_per_forward_counts_both_calls(mode):
    rng = np.random.default_rng(0)
    shared = _norm(rng, 3)
    lin1, lin2 = _linear(rng, 5, 3), _relu_linear(rng, 3, 3)
    model = Chain([lin1, lin2], [shared, shared])
    batches = mlp_batches()
    expected = model.brute_train(batches)
    summary = bn.precise_bn(model, batches, 4, mode=mode)
    assert len(summary) == 1
    rows = sum(len(x) for x in batches)
    assert (summary[0].calls, summary[0].batches, summary[0].values) == (8, 4, 2 * rows)
    _assert_stats(shared, expected[0] + expected[1])


# --- precise_bn: finding the layers -------------------------------------------------------------


class Zoo:
    """BatchNorm layers hidden in attributes, lists, tuples, dicts and plain objects."""

    def __init__(self) -> None:
        self.a = bn.BatchNorm(2)
        self.group = [bn.BatchNorm(2), (bn.BatchNorm(2), {"deep": bn.BatchNorm(2), 3: self.a})]
        self.inner = Holder()
        self.inner.norm = bn.BatchNorm(2)
        self.inner.parent = self  # a reference cycle
        self.loop: list[Any] = []
        self.loop.append(self.loop)  # a list that contains itself
        self.by_name = {"same": self.group[0], "other": self.inner.norm}
        self.frozen = bn.BatchNorm(2, track_running_stats=False)
        self.weights = np.ones((2, 2))
        self.text, self.number, self.nothing = "bn", 3, None

    def all_norms(self) -> list[bn.BatchNorm]:
        return [self.a, self.group[0], self.group[1][0], self.group[1][1]["deep"], self.inner.norm]

    def __call__(self, x: Array) -> Array:
        for i, layer in enumerate(self.all_norms()):
            layer(x * (i + 1) + i)
        return self.frozen(x)


class Holder:
    pass


def test_finds_every_layer_once_through_attributes_lists_tuples_and_dicts():
    model = Zoo()
    batches = [b[:, :2] for b in mlp_batches()]
    summary = bn.precise_bn(model, batches, 4)
    found = [s.layer for s in summary]
    assert len(found) == 5
    assert {id(x) for x in found} == {id(x) for x in model.all_norms()}
    assert {s.name for s in summary} == {
        "model.a",
        "model.group[0]",
        "model.group[1][0]",
        "model.group[1][1]['deep']",
        "model.inner.norm",
    }
    for i, layer in enumerate(model.all_norms()):
        _assert_stats(layer, [x * (i + 1) + i for x in batches])
        assert summary[found.index(layer)].calls == 4


def test_the_model_itself_may_be_a_batchnorm():
    layer = bn.BatchNorm(5)
    batches = mlp_batches()
    summary = bn.precise_bn(layer, batches, 4)
    assert summary[0].name == "model" and summary[0].layer is layer
    _assert_stats(layer, batches)


def test_no_batchnorm_found_is_an_error():
    with pytest.raises(ValueError, match="found no BatchNorm"):
        bn.precise_bn(lambda x: x, mlp_batches(), 4)

    class Plain:
        def __init__(self) -> None:
            self.w = np.ones(3)
            self.items = [1, "a", None]
            self.norm = bn.BatchNorm(5, track_running_stats=False)

        def __call__(self, x: Array) -> Array:
            return self.norm(x)

    with pytest.raises(ValueError, match="found no BatchNorm"):
        bn.precise_bn(Plain(), mlp_batches(), 4)
    with pytest.raises(ValueError, match="found no BatchNorm"):
        bn.precise_bn(lambda x: x, mlp_batches(), 4, layers=[])


def test_explicit_layers_leave_the_others_untouched():
    model, batches = mlp(), mlp_batches()
    first, second = model.norms
    second.eval()
    other = _state(second)
    expected = model.brute_train(batches)
    summary = bn.precise_bn(model, batches, 4, layers=[first])
    assert [s.layer for s in summary] == [first]
    _assert_stats(first, expected[0])
    _assert_restored(second, other)


@pytest.mark.parametrize("mode", ["train", "sequential"])
def test_explicit_layers_leave_training_mode_others_untouched(mode):
    model, batches = mlp(), mlp_batches()
    second = model.norms[1]
    other = _state(second)
    bn.precise_bn(model, batches, 4, layers=[model.norms[0]], mode=mode)
    _assert_restored(second, other)


def test_explicit_duplicates_are_measured_once():
    model, batches = mlp(), mlp_batches()
    first = model.norms[0]
    expected = model.brute_train(batches)
    summary = bn.precise_bn(model, batches, 4, layers=[first, first])
    assert len(summary) == 1 and summary[0].calls == 4
    _assert_stats(first, expected[0])


def test_a_chosen_layer_the_model_never_calls_warns_and_keeps_its_statistics():
    model, batches = mlp(), mlp_batches()
    idle = _norm(np.random.default_rng(9), 4)
    idle.running_mean[:] = [1.0, 2.0, 3.0, 4.0]  # type: ignore[index]
    idle_before = _state(idle)
    expected = model.brute_train(batches)
    with pytest.warns(UserWarning, match=r"layers\[1\] was never called") as record:
        summary = bn.precise_bn(model, batches, 4, layers=[model.norms[0], idle])
    assert record[0].filename == __file__
    assert [s.layer for s in summary] == [model.norms[0]]
    _assert_restored(idle, idle_before)
    _assert_stats(model.norms[0], expected[0])


@pytest.mark.parametrize("mode", ["train", "sequential"])
def test_no_chosen_layer_called_is_an_error_and_changes_nothing(mode):
    model, batches = mlp(), mlp_batches()
    idle = bn.BatchNorm(4)
    before = _state(idle)
    with pytest.raises(ValueError, match="was called by model"):
        bn.precise_bn(model, batches, 4, layers=[idle], mode=mode)
    _assert_restored(idle, before)


def test_track_running_stats_false_chosen_explicitly_is_an_error():
    model, batches = mlp(), mlp_batches()
    stateless = bn.BatchNorm(4, track_running_stats=False)
    before = _state(model.norms[0])
    with pytest.raises(ValueError, match=r"layers\[1\] has track_running_stats=False"):
        bn.precise_bn(model, batches, 4, layers=[model.norms[0], stateless])
    _assert_restored(model.norms[0], before)


@pytest.mark.parametrize(
    ("layers", "error", "match"),
    [
        (bn.BatchNorm(4), TypeError, "wrap one in a list"),
        ([bn.BatchNorm(4), "bn"], TypeError, r"layers\[1\] is a str"),
        ([nn.ReLU()], TypeError, "not a BatchNorm"),
    ],
)
def test_layers_must_be_an_iterable_of_batchnorm(layers, error, match):
    with pytest.raises(error, match=match):
        bn.precise_bn(lambda x: x, mlp_batches(), 4, layers=layers)


@pytest.mark.parametrize(
    ("n", "error"),
    [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError), ("10", TypeError),
     ("x", TypeError), (None, TypeError)],
)  # fmt: skip
def test_num_batches_precise_must_be_a_positive_int(n, error):
    model = mlp()
    before = [_state(x) for x in model.norms]
    with pytest.raises(error, match="num_batches_precise must be a positive int"):
        bn.precise_bn(model, mlp_batches(), n)
    for layer, state in zip(model.norms, before, strict=True):
        _assert_restored(layer, state)


def test_mode_must_be_train_or_sequential():
    with pytest.raises(ValueError, match="mode must be one of"):
        bn.precise_bn(mlp(), mlp_batches(), 4, mode="eval")


# --- precise_bn: what is restored ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "sequential"])
def test_everything_but_the_statistics_is_restored_bit_for_bit(mode):
    model, batches = convnet(momentum=None), image_batches()
    first, second = model.norms
    first.eval()
    first.num_batches_tracked = 17
    second.momentum = 0.7
    second.num_batches_tracked = 3
    before = [_state(x) for x in model.norms]
    bn.precise_bn(model, batches, 4, mode=mode)
    for layer, state in zip(model.norms, before, strict=True):
        _assert_restored(layer, state, stats=False)
    assert first.training is False and first.momentum is None
    assert second.training is True and second.momentum == 0.7


def test_a_layer_in_eval_mode_is_recomputed_and_stays_in_eval_mode():
    model, batches = mlp(), mlp_batches()
    for layer in model.norms:
        layer.eval()
    expected = model.brute_train(batches)  # the pass normalizes with batch statistics
    bn.precise_bn(model, batches, 4)
    for layer, inputs in zip(model.norms, expected, strict=True):
        assert layer.training is False
        _assert_stats(layer, inputs)


def test_the_last_forward_pass_is_kept_for_backward():
    model, batches = mlp(), mlp_batches()
    layer = model.norms[1]
    x = np.random.default_rng(3).normal(size=(6, 3))
    dy = np.random.default_rng(4).normal(size=(6, 3))
    layer(x)
    dx = layer.backward(dy)
    bn.precise_bn(model, batches, 4)
    np.testing.assert_array_equal(layer.backward(dy), dx)


class Boom(Exception):
    pass


class Exploding:
    """Wraps a model; raises on the `at`-th call (1-based), counting every call."""

    def __init__(self, model: Chain, at: int, error: BaseException | None = None) -> None:
        self.model = model
        self.at = at
        self.calls = 0
        self.error = error or Boom(f"batch {at}")

    def __call__(self, x: Array) -> Array:
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return self.model(x)


@pytest.mark.parametrize(
    ("mode", "at"),
    [("train", 1), ("train", 3), ("sequential", 2), ("sequential", 6)],
    ids=["train-first", "train-third", "sequential-first-pass", "sequential-second-pass"],
)
def test_an_exception_restores_everything_and_propagates(mode, at):
    model, batches = mlp(), mlp_batches()
    model.norms[0].eval()
    model.norms[1].momentum = None
    for layer in model.norms:
        layer.running_mean[:] = 7.0  # type: ignore[index]
        layer.running_var[:] = 0.5  # type: ignore[index]
        layer.num_batches_tracked = 11
    x = np.random.default_rng(3).normal(size=(6, 3))
    dy = np.random.default_rng(4).normal(size=(6, 3))
    model.norms[1](x)
    dx = model.norms[1].backward(dy)
    before = [_state(layer) for layer in model.norms]
    exploding = Exploding(model, at)
    with pytest.raises(Boom, match=f"batch {at}"):
        bn.precise_bn(exploding, batches, 4, layers=model.norms, mode=mode)
    assert exploding.calls == at
    for layer, state in zip(model.norms, before, strict=True):
        _assert_restored(layer, state)
        assert not layer._observers  # nothing left listening to the layer
    np.testing.assert_array_equal(model.norms[1].backward(dy), dx)
    # And the layers still work: a second, clean run gives the exact statistics.
    expected = model.brute_train(batches)
    bn.precise_bn(model, batches, 4)
    for layer, inputs in zip(model.norms, expected, strict=True):
        _assert_stats(layer, inputs)


def test_a_keyboard_interrupt_restores_everything():
    model, batches = mlp(), mlp_batches()
    model.norms[1].eval()
    before = [_state(layer) for layer in model.norms]
    with pytest.raises(KeyboardInterrupt):
        bn.precise_bn(Exploding(model, 2, KeyboardInterrupt()), batches, 4, mode="sequential")
    for layer, state in zip(model.norms, before, strict=True):
        _assert_restored(layer, state)


def test_a_batch_of_one_sample_is_refused_as_in_training_and_restores_everything():
    model, batches = mlp(), mlp_batches((5, 4, 1, 6))
    model.norms[0].eval()
    before = [_state(layer) for layer in model.norms]
    with pytest.raises(ValueError, match=r"batch 2 .* 1 value per channel"):
        bn.precise_bn(model, batches, 4)
    for layer, state in zip(model.norms, before, strict=True):
        _assert_restored(layer, state)


def test_a_batchnorm_error_in_the_pass_restores_everything():
    model, batches = mlp(), mlp_batches()
    batches[2] = batches[2].copy()
    batches[2][0, 0] = np.nan  # the first layer refuses non-finite batch statistics
    before = [_state(layer) for layer in model.norms]
    with pytest.raises(FloatingPointError, match="not finite"):
        bn.precise_bn(model, batches, 4)
    for layer, state in zip(model.norms, before, strict=True):
        _assert_restored(layer, state)


# --- precise_bn: too few batches ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "sequential"])
def test_fewer_batches_than_asked_warns_and_uses_what_was_seen(mode):
    model, batches = mlp(), mlp_batches()
    expected = model.brute_train(batches)
    with pytest.warns(UserWarning, match=r"num_batches_precise=10 .* only 4") as record:
        summary = bn.precise_bn(model, iter(batches), num_batches_precise=10, mode=mode)
    assert len(record) == 1
    assert record[0].filename == __file__  # the warning points at the caller
    assert [s.batches for s in summary] == [4, 4]
    _assert_stats(model.norms[0], expected[0])
    if mode == "train":
        _assert_stats(model.norms[1], expected[1])


def test_exactly_enough_batches_does_not_warn(recwarn):
    bn.precise_bn(mlp(), mlp_batches(), num_batches_precise=4)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("mode", ["train", "sequential"])
@pytest.mark.parametrize(
    "empty",
    [lambda: [], lambda: (), lambda: iter([]), lambda: (x for x in [])],
    ids=["list", "tuple", "iterator", "generator"],
)
def test_no_batches_is_an_error_and_changes_nothing(mode, empty):
    model = mlp()
    model.norms[0].eval()
    before = [_state(x) for x in model.norms]
    with pytest.raises(ValueError, match="no batches"):
        bn.precise_bn(model, empty(), 4, mode=mode)
    for layer, state in zip(model.norms, before, strict=True):
        _assert_restored(layer, state)


def test_an_exhausted_iterator_is_no_batches():
    source = iter(mlp_batches())
    list(source)
    with pytest.raises(ValueError, match="exhausted iterator"):
        bn.precise_bn(mlp(), source, 4)


# --- precise_bn: progress bar -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "sequential"])
def test_progress_bar_with_tqdm(mode, capsys):
    pytest.importorskip("tqdm")
    model, batches = mlp(), mlp_batches()
    expected = model.brute_train(batches)
    bn.precise_bn(model, batches, 4, progress=True, mode=mode)
    err = capsys.readouterr().err
    assert "4/4" in err
    _assert_stats(model.norms[0], expected[0])
    if mode == "train":
        _assert_stats(model.norms[1], expected[1])
        assert "precise_bn" in err
    else:
        assert "layer 1" in err and "layer 2" in err


def test_progress_without_tqdm_warns_and_still_works(monkeypatch):
    # None in sys.modules makes `import tqdm.auto` raise ImportError, as if it were missing.
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    model, batches = mlp(), mlp_batches()
    expected = model.brute_train(batches)
    with pytest.warns(UserWarning, match="pip install tqdm") as record:
        summary = bn.precise_bn(model, batches, 4, progress=True)
    assert record[0].filename == __file__  # the warning points at the caller
    assert len(summary) == 2
    for layer, inputs in zip(model.norms, expected, strict=True):
        _assert_stats(layer, inputs)


# --- precise_bn: sequential mode ----------------------------------------------------------------


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("unbiased", [True, False])
def test_sequential_mode_matches_the_layer_by_layer_brute_force(net, unbiased):
    make, data = NETS[net]
    model, batches = make(unbiased=unbiased), data()
    expected = model.brute_sequential(batches)
    summary = bn.precise_bn(model, batches, len(batches), mode="sequential")
    for layer, (mean, var) in zip(model.norms, expected, strict=True):
        _assert_close(layer.running_mean, mean)
        _assert_close(layer.running_var, var)
        assert layer.training is True
    assert [s.layer for s in summary] == model.norms


def test_sequential_mode_three_layers():
    rng = np.random.default_rng(5)
    model = Chain(
        [_linear(rng, 5, 4), _relu_linear(rng, 4, 4), _relu_linear(rng, 4, 2)],
        [_norm(rng, 4), _norm(rng, 4, unbiased=False), _norm(rng, 2)],
    )
    batches = mlp_batches((2, 3, 2, 4, 3))
    expected = model.brute_sequential(batches)
    bn.precise_bn(model, batches, 5, mode="sequential")
    for layer, (mean, var) in zip(model.norms, expected, strict=True):
        _assert_close(layer.running_mean, mean)
        _assert_close(layer.running_var, var)


class Recorder:
    """Wraps a Chain and records, at every call, each layer's mode and running_mean."""

    def __init__(self, model: Chain) -> None:
        self.model = model
        self.log: list[list[tuple[bool, Array]]] = []

    def __call__(self, x: Array) -> Array:
        self.log.append([(n.training, np.array(n.running_mean)) for n in self.model.norms])
        return self.model(x)


def test_sequential_mode_measures_in_forward_order_finished_layers_in_eval_mode():
    rng = np.random.default_rng(2)
    model = Chain(
        [_linear(rng, 5, 4), _relu_linear(rng, 4, 4), _relu_linear(rng, 4, 3)],
        [_norm(rng, 4), _norm(rng, 4), _norm(rng, 3)],
    )
    # Found in another order than the forward order: sequential mode follows the forward.
    recorder = Recorder(model)
    layers = [model.norms[2], model.norms[0], model.norms[1]]
    batches = mlp_batches()
    summary = bn.precise_bn(recorder, batches, 4, layers=layers, mode="sequential")
    assert len(recorder.log) == 3 * len(batches)  # one pass per layer
    assert [s.layer for s in summary] == layers  # reported in the order given
    final = [np.array(n.running_mean) for n in model.norms]
    for step in range(3):
        for call in recorder.log[4 * step : 4 * (step + 1)]:
            for k, (training, running_mean) in enumerate(call):
                if k < step:  # finished: eval mode with its new statistics
                    assert training is False
                    np.testing.assert_array_equal(running_mean, final[k])
                else:
                    assert training is True


def test_sequential_mode_takes_a_one_shot_generator():
    model, batches = mlp(), mlp_batches()
    expected = model.brute_sequential(batches)
    consumed = []

    def stream() -> Iterator[Array]:
        for x in batches:
            consumed.append(1)
            yield x

    summary = bn.precise_bn(model, stream(), 4, mode="sequential")
    assert len(consumed) == 4  # read once, kept for the second pass
    assert [s.batches for s in summary] == [4, 4]
    for layer, (mean, var) in zip(model.norms, expected, strict=True):
        _assert_close(layer.running_mean, mean)
        _assert_close(layer.running_var, var)


def test_sequential_and_train_modes_differ_after_the_first_layer_for_small_batches():
    batches = mlp_batches((3,) * 8, seed=4)
    train_model, seq_model = mlp(seed=3), mlp(seed=3)
    bn.precise_bn(train_model, batches, 8, mode="train")
    bn.precise_bn(seq_model, batches, 8, mode="sequential")
    first_t, second_t = train_model.norms
    first_s, second_s = seq_model.norms
    # The first layer's inputs do not depend on any BatchNorm: the same in both modes.
    _assert_close(first_s.running_mean, first_t.running_mean)
    _assert_close(first_s.running_var, first_t.running_var)
    # The second one sees the first normalized by 3-sample batch statistics in train mode,
    # by the population statistics in sequential mode (as at inference).
    diff_mean = np.abs(second_s.running_mean - second_t.running_mean)
    diff_var = np.abs(second_s.running_var - second_t.running_var) / second_t.running_var
    assert diff_mean.max() > 0.05
    assert diff_var.max() > 0.05
    # Each is right for its own definition.
    _assert_stats(second_t, train_model.brute_train(batches)[1])
    mean, var = seq_model.brute_sequential(batches)[1]
    _assert_close(second_s.running_mean, mean)
    _assert_close(second_s.running_var, var)


def test_sequential_statistics_describe_the_eval_mode_inputs():
    # What sequential mode is for: after it, every layer's statistics are those of the inputs
    # it receives when the whole model runs in eval mode on the same data.
    model, batches = mlp(seed=6), mlp_batches((3,) * 6, seed=7)
    bn.precise_bn(model, batches, 6, mode="sequential")
    for layer in model.norms:
        layer.eval()
    seen: list[list[Array]] = [[], []]
    for x in batches:
        h = model.stages[0](x)
        seen[0].append(h)
        seen[1].append(model.stages[1](model.norms[0](h)))
    for layer, inputs in zip(model.norms, seen, strict=True):
        layer.train()
        _assert_stats(layer, inputs)


def test_sequential_mode_with_a_single_layer_equals_train_mode():
    a, b = bn.BatchNorm(5), bn.BatchNorm(5)
    batches = mlp_batches()
    bn.precise_bn(a, batches, 4, mode="train")
    bn.precise_bn(b, batches, 4, mode="sequential")
    np.testing.assert_array_equal(a.running_mean, b.running_mean)
    np.testing.assert_array_equal(a.running_var, b.running_var)


def test_a_function_as_model_is_not_searched_and_the_error_says_so():
    model = mlp()

    def forward(x: Array) -> Array:
        return model(x)

    for function, shown in [(forward, "function"), (model.__call__, "method")]:
        with pytest.raises(ValueError, match=f"model is the {shown} ") as info:
            bn.precise_bn(function, mlp_batches(), 4)
        assert "functions and methods are not searched" in str(info.value)
        assert "layers=[" in str(info.value)
    summary = bn.precise_bn(forward, mlp_batches(), 4, layers=model.norms)  # the remedy works
    assert [s.layer for s in summary] == model.norms


@pytest.mark.parametrize("mode", ["train", "sequential"])
@pytest.mark.parametrize("grouped", [False, True])
def test_a_one_sample_batch_is_named_with_its_index(mode, grouped):
    model = mlp()
    before = [_state(x) for x in model.norms]
    batches = mlp_batches(sizes=(7, 3, 1, 5))
    group = bn.distributed.thread_groups(1)[0] if grouped else None
    with pytest.raises(ValueError, match=r"^precise_bn: batch 2 \(counting from 0\)") as info:
        bn.precise_bn(model, batches, 4, mode=mode, group=group)
    message = str(info.value)
    assert "shape (1, 4)" in message
    assert "drop it from `batches`" in message
    assert "lower num_batches_precise to 2" in message
    assert "eval mode" not in message  # the training-mode advice does not apply here
    assert "Expected more than 1 value per channel" in str(info.value.__cause__)
    for layer, state in zip(model.norms, before, strict=True):
        _assert_restored(layer, state)
    with pytest.raises(ValueError, match=r"batch 0 .*drop_last=True\)\.$"):
        bn.precise_bn(model, mlp_batches(sizes=(1, 5)), 2)
