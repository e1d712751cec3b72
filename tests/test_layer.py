"""The BatchNorm layer: construction, training and eval forward, running statistics, backward,
modes, dtypes, and the promise that a failed call changes nothing.

Every expected value is computed here from its definition with np.mean / np.var, never by
calling the kernels the layer uses.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from helpers import layer_snapshot as snapshot

import batchnorm as bn
from batchnorm.gradcheck import numerical_gradient, relative_error

EPS = 1e-5

# (shape, channel axis): 2-D to 5-D, channels-first and channels-last.
SHAPES_AXES = [
    ((16, 3), 1),
    ((6, 3, 5), 1),
    ((4, 3, 4, 5), 1),
    ((3, 3, 2, 3, 4), 1),
    ((12, 3), -1),
    ((4, 4, 5, 3), -1),
]

# Layer options that change what a training step touches.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "momentum_none": {"momentum": None},
    "biased": {"unbiased": False},
    "no_affine": {"affine": False},
    "no_tracking": {"track_running_stats": False},
    "channels_last": {"axis": -1},
}


# --- helpers -------------------------------------------------------------------------------------


def reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis % ndim)


def per_channel(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Reshape a (C,) vector to broadcast against x along the channel axis."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def batch_stats(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Batch mean, biased batch variance and m, straight from the definition."""
    axes = reduce_axes(x.ndim, axis)
    return np.mean(x, axis=axes), np.var(x, axis=axes), x.size // x.shape[axis]


def make_input(rng: np.random.Generator, shape: tuple[int, ...], loc: float = 3.0) -> np.ndarray:
    return rng.normal(loc, 2.0, size=shape)


def channels_shape(c: int, axis: int, n: int = 6, spatial: tuple[int, ...] = (2,)) -> tuple:
    """A (N, C, *spatial) shape, or its channels-last version for axis=-1."""
    return (n, *spatial, c) if axis == -1 else (n, c, *spatial)


def trained_layer(c: int = 3, seed: int = 0, **options: Any) -> bn.BatchNorm:
    """A layer with non-trivial parameters and a few recorded batches."""
    rng = np.random.default_rng(seed)
    layer = bn.BatchNorm(c, **options)
    if layer.affine:
        layer.gamma[:] = rng.uniform(0.5, 2.0, c)
        layer.beta[:] = rng.normal(size=c)
    for _ in range(2):
        layer(make_input(rng, channels_shape(c, layer.axis)))
    return layer


class Witness:
    """A layer after forward(x0) and backward(dy0), to check that a failure changes nothing."""

    def __init__(self, layer: bn.BatchNorm, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        shape = channels_shape(layer.num_features, layer.axis)
        self.layer = layer
        self.y0 = layer(make_input(rng, shape))
        self.dy0 = rng.normal(size=shape)
        self.dx0 = layer.backward(self.dy0)
        self.before = snapshot(layer)

    def assert_unchanged(self) -> None:
        assert snapshot(self.layer) == self.before
        # The previous forward can still be differentiated, with the same result.
        dx = self.layer.backward(self.dy0)
        assert dx.tobytes() == self.dx0.tobytes()
        assert snapshot(self.layer) == self.before


# --- construction --------------------------------------------------------------------------------


def test_defaults() -> None:
    layer = bn.BatchNorm(4)
    assert (layer.num_features, layer.eps, layer.momentum) == (4, 1e-5, 0.9)
    assert layer.affine and layer.track_running_stats and layer.unbiased
    assert layer.axis == 1
    assert layer.training is True
    for name, value in [("gamma", 1.0), ("beta", 0.0), ("running_mean", 0.0), ("running_var", 1.0)]:
        arr = getattr(layer, name)
        assert arr.dtype == np.float64, name
        assert arr.shape == (4,), name
        assert np.all(arr == value), name
    assert layer.num_batches_tracked == 0
    assert isinstance(layer.num_batches_tracked, int)
    assert layer.dgamma is None and layer.dbeta is None


def test_parameters_and_buffers_are_separate_arrays() -> None:
    layer = bn.BatchNorm(3)
    arrays = [layer.gamma, layer.beta, layer.running_mean, layer.running_var]
    for i, a in enumerate(arrays):
        for b in arrays[i + 1 :]:
            assert not np.shares_memory(a, b)


def test_no_affine_and_no_tracking_have_none() -> None:
    layer = bn.BatchNorm(3, affine=False, track_running_stats=False)
    assert layer.gamma is None and layer.beta is None
    assert layer.running_mean is None and layer.running_var is None
    assert layer.num_batches_tracked is None


@pytest.mark.parametrize(
    ("kwargs", "accepted"),
    [
        ({"num_features": np.int64(5)}, ("num_features", 5)),
        ({"num_features": 2, "eps": 1}, ("eps", 1.0)),
        ({"num_features": 2, "eps": np.float32(1e-3)}, ("eps", float(np.float32(1e-3)))),
        ({"num_features": 2, "momentum": 0}, ("momentum", 0.0)),
        ({"num_features": 2, "momentum": 1.0}, ("momentum", 1.0)),
        ({"num_features": 2, "momentum": None}, ("momentum", None)),
        ({"num_features": 2, "momentum": np.float64(0.5)}, ("momentum", 0.5)),
        ({"num_features": 2, "affine": np.bool_(False)}, ("affine", False)),
        ({"num_features": 2, "axis": -1}, ("axis", -1)),
        ({"num_features": 2, "axis": np.int32(3)}, ("axis", 3)),
    ],
)
@pytest.mark.filterwarnings("ignore:momentum=:UserWarning")  # momentum=0: accepted, with a warning
def test_constructor_accepts(kwargs: dict[str, Any], accepted: tuple[str, Any]) -> None:
    layer = bn.BatchNorm(**kwargs)
    name, value = accepted
    stored = getattr(layer, name)
    assert stored == value
    assert type(stored) is type(value)


@pytest.mark.parametrize(
    ("kwargs", "error", "allowed"),
    [
        ({"num_features": 0}, ValueError, "positive int"),
        ({"num_features": -3}, ValueError, "positive int"),
        ({"num_features": 2.0}, TypeError, "positive int"),
        ({"num_features": 3.0}, TypeError, "positive int"),
        ({"num_features": True}, TypeError, "positive int"),
        ({"num_features": "3"}, TypeError, "positive int"),
        ({"num_features": {}}, TypeError, "positive int"),
        ({"num_features": None}, TypeError, "positive int"),
        ({"eps": 0.0}, ValueError, "> 0"),
        ({"eps": -1e-5}, ValueError, "> 0"),
        ({"eps": float("nan")}, ValueError, "> 0"),
        ({"eps": float("inf")}, ValueError, "> 0"),
        ({"eps": "1e-5"}, TypeError, "positive float"),
        ({"eps": True}, TypeError, "positive float"),
        ({"momentum": -0.1}, ValueError, r"\[0, 1\]"),
        ({"momentum": 1.5}, ValueError, r"\[0, 1\]"),
        ({"momentum": float("nan")}, ValueError, r"\[0, 1\]"),
        ({"momentum": "0.9"}, TypeError, r"\[0, 1\] or None"),
        ({"momentum": False}, TypeError, r"\[0, 1\] or None"),
        ({"affine": 1}, TypeError, "affine must be True or False"),
        ({"affine": None}, TypeError, "affine must be True or False"),
        ({"track_running_stats": "yes"}, TypeError, "track_running_stats must be True or False"),
        ({"unbiased": 0}, TypeError, "unbiased must be True or False"),
        ({"axis": 1.0}, TypeError, "axis must be an int"),
        ({"axis": True}, TypeError, "axis must be an int"),
        ({"axis": "1"}, TypeError, "axis must be an int"),
    ],
)
def test_constructor_rejects(kwargs: dict[str, Any], error: Any, allowed: str) -> None:
    kwargs = {"num_features": 3, **kwargs}
    with pytest.raises(error, match=allowed):
        bn.BatchNorm(**kwargs)


def test_momentum_error_explains_the_pytorch_mapping() -> None:
    with pytest.raises(ValueError, match=r"PyTorch's momentum=0\.1 is momentum=0\.9"):
        bn.BatchNorm(3, momentum=2.0)


def test_repr_names_the_options_and_mode() -> None:
    layer = bn.BatchNorm(7, momentum=None, affine=False, axis=-1)
    text = repr(layer)
    assert text.startswith("BatchNorm(7,")
    for part in ["momentum=None", "affine=False", "axis=-1", "mode=train"]:
        assert part in text
    assert "mode=eval" in repr(layer.eval())
    assert "momentum=0.9" in repr(bn.BatchNorm(2))


# --- mode ----------------------------------------------------------------------------------------


def test_train_and_eval_return_the_layer() -> None:
    layer = bn.BatchNorm(2)
    assert layer.eval() is layer and layer.training is False
    assert layer.train() is layer and layer.training is True
    assert layer.train(False) is layer and layer.training is False
    assert layer.train(np.bool_(True)).training is True


def test_train_rejects_non_bool_mode() -> None:
    layer = bn.BatchNorm(2)
    with pytest.raises(TypeError, match="mode must be True or False"):
        layer.train("eval")  # type: ignore[arg-type]
    assert layer.training is True


def test_two_layers_have_independent_modes() -> None:
    a, b = bn.BatchNorm(2), bn.BatchNorm(2)
    a.eval()
    assert a.training is False and b.training is True


# --- training forward ----------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
def test_training_forward_uses_batch_statistics(shape: tuple[int, ...], axis: int) -> None:
    rng = np.random.default_rng(10)
    c = shape[axis]
    layer = bn.BatchNorm(c, axis=axis)
    layer.gamma[:] = rng.uniform(0.5, 2.0, c)
    layer.beta[:] = rng.normal(size=c)
    x = make_input(rng, shape)
    y = layer(x)
    mean, var, _ = batch_stats(x, axis)
    expected = (x - per_channel(mean, x.ndim, axis)) / np.sqrt(
        per_channel(var, x.ndim, axis) + EPS
    ) * per_channel(layer.gamma, x.ndim, axis) + per_channel(layer.beta, x.ndim, axis)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-13)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_forward_is_call() -> None:
    x = make_input(np.random.default_rng(2), (8, 3))
    a, b = bn.BatchNorm(3), bn.BatchNorm(3)
    assert np.array_equal(a(x), b.forward(x))
    assert snapshot(a) == snapshot(b)


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("momentum", [0.9, 0.5, 0.0, 1.0])
def test_running_statistics_update(
    shape: tuple[int, ...], axis: int, unbiased: bool, momentum: float
) -> None:
    rng = np.random.default_rng(11)
    c = shape[axis]
    layer = bn.BatchNorm(c, momentum=momentum, unbiased=unbiased, axis=axis)
    mean_ref, var_ref = np.zeros(c), np.ones(c)
    for step in range(1, 4):
        x = make_input(rng, shape, loc=float(step))
        layer(x)
        mean, var, m = batch_stats(x, axis)
        batch_var = var * m / (m - 1) if unbiased else var
        # momentum weights the OLD running value.
        mean_ref = momentum * mean_ref + (1 - momentum) * mean
        var_ref = momentum * var_ref + (1 - momentum) * batch_var
        np.testing.assert_allclose(layer.running_mean, mean_ref, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(layer.running_var, var_ref, rtol=1e-13)
        assert layer.num_batches_tracked == step
        assert layer.running_mean.dtype == np.float64 == layer.running_var.dtype


@pytest.mark.filterwarnings("ignore:momentum=0.0 weights the OLD")
def test_momentum_one_keeps_and_zero_replaces() -> None:
    rng = np.random.default_rng(12)
    x = make_input(rng, (10, 3))
    frozen = bn.BatchNorm(3, momentum=1.0)
    frozen(x)
    assert np.array_equal(frozen.running_mean, np.zeros(3))
    assert np.array_equal(frozen.running_var, np.ones(3))
    assert frozen.num_batches_tracked == 1
    latest = bn.BatchNorm(3, momentum=0.0, unbiased=False)
    latest(make_input(rng, (10, 3)))
    latest(x)
    mean, var, _ = batch_stats(x, 1)
    np.testing.assert_allclose(latest.running_mean, mean, rtol=1e-15)
    np.testing.assert_allclose(latest.running_var, var, rtol=1e-15)


@pytest.mark.parametrize("unbiased", [True, False])
def test_momentum_none_is_the_cumulative_average(unbiased: bool) -> None:
    rng = np.random.default_rng(13)
    layer = bn.BatchNorm(4, momentum=None, unbiased=unbiased)
    means, variances = [], []
    for step in range(1, 6):
        x = make_input(rng, (5 + step, 4, 3), loc=float(step))  # batches of different sizes
        layer(x)
        mean, var, m = batch_stats(x, 1)
        means.append(mean)
        variances.append(var * m / (m - 1) if unbiased else var)
        # Every batch counts equally; the initial 0 and 1 are forgotten after the first one.
        np.testing.assert_allclose(layer.running_mean, np.mean(means, axis=0), rtol=1e-14)
        np.testing.assert_allclose(layer.running_var, np.mean(variances, axis=0), rtol=1e-14)
        assert layer.num_batches_tracked == step


@pytest.mark.parametrize(
    ("shape", "momentum"),
    [((32, 5), 0.9), ((64, 3, 6), 0.9), ((16, 4, 5, 5), 0.9), ((20, 4), 0.7)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_textbook_recursion(shape: tuple[int, ...], momentum: float, seed: int) -> None:
    """unbiased=False is the recursion of cs231n's batchnorm_forward (and Keras'), step by step.

    The batch mean is summed in a different order than np.mean does, so the running
    statistics agree to the last bit or two (relative 1e-15), not always bit for bit.
    """
    rng = np.random.default_rng(seed)
    c = shape[1]
    axes = reduce_axes(len(shape), 1)
    layer = bn.BatchNorm(c, eps=1e-5, momentum=momentum, unbiased=False)
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
    layer.gamma[:], layer.beta[:] = gamma, beta
    running_mean, running_var = np.zeros(c), np.ones(c)
    b = [1] * len(shape)
    b[1] = c
    for _ in range(5):
        x = rng.normal(3.0, 2.0, size=shape)
        y = layer(x)

        sample_mean = np.mean(x, axis=axes)
        sample_var = np.var(x, axis=axes)
        x_hat = (x - sample_mean.reshape(b)) / np.sqrt(sample_var.reshape(b) + 1e-5)
        out = gamma.reshape(b) * x_hat + beta.reshape(b)
        running_mean = momentum * running_mean + (1 - momentum) * sample_mean
        running_var = momentum * running_var + (1 - momentum) * sample_var

        np.testing.assert_allclose(layer.running_mean, running_mean, rtol=1e-15, atol=0)
        np.testing.assert_allclose(layer.running_var, running_var, rtol=1e-15, atol=0)
        np.testing.assert_allclose(y, out, rtol=0, atol=1e-14)


def test_training_forward_does_not_depend_on_running_statistics() -> None:
    x = make_input(np.random.default_rng(14), (9, 3))
    a, b = bn.BatchNorm(3), bn.BatchNorm(3)
    b.running_mean[:] = [5.0, -5.0, 1.0]
    b.running_var[:] = [9.0, 0.1, 2.0]
    assert np.array_equal(a(x), b(x))


# --- eval forward --------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
@pytest.mark.parametrize("affine", [True, False])
def test_eval_forward_uses_running_statistics(
    shape: tuple[int, ...], axis: int, affine: bool
) -> None:
    rng = np.random.default_rng(15)
    c = shape[axis]
    layer = trained_layer(c, seed=15, affine=affine, axis=axis).eval()
    before = snapshot(layer)
    x = make_input(rng, shape)
    y = layer(x)
    gamma = layer.gamma if affine else np.ones(c)
    beta = layer.beta if affine else np.zeros(c)
    scale = gamma / np.sqrt(layer.running_var + EPS)
    expected = per_channel(scale, x.ndim, axis) * (
        x - per_channel(layer.running_mean, x.ndim, axis)
    ) + per_channel(beta, x.ndim, axis)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-13)
    assert snapshot(layer) == before  # eval records nothing


def test_eval_normalizes_a_single_sample() -> None:
    layer = trained_layer(3).eval()
    x = np.array([[1.0, 2.0, 3.0]])
    y = layer(x)
    expected = (x - layer.running_mean) / np.sqrt(layer.running_var + EPS) * layer.gamma
    np.testing.assert_allclose(y, expected + layer.beta, rtol=1e-14)


def test_fresh_layer_in_eval_mode_is_nearly_identity() -> None:
    x = make_input(np.random.default_rng(16), (4, 3))
    y = bn.BatchNorm(3).eval()(x)
    np.testing.assert_allclose(y, x / np.sqrt(1 + EPS), rtol=1e-15)


def test_no_tracking_always_uses_batch_statistics() -> None:
    rng = np.random.default_rng(17)
    layer = bn.BatchNorm(3, track_running_stats=False)
    x = make_input(rng, (8, 3, 4))
    y_train = layer(x)
    y_eval = layer.eval()(x)
    assert np.array_equal(y_train, y_eval)
    mean, var, _ = batch_stats(x, 1)
    expected = (x - mean[:, None]) / np.sqrt(var[:, None] + EPS)
    np.testing.assert_allclose(y_eval, expected, atol=1e-13)
    assert layer.running_mean is None and layer.running_var is None
    assert layer.num_batches_tracked is None


def test_no_affine_output_is_plain_normalization() -> None:
    x = make_input(np.random.default_rng(18), (10, 2, 3))
    y = bn.BatchNorm(2, affine=False)(x)
    mean, var, _ = batch_stats(x, 1)
    np.testing.assert_allclose(y, (x - mean[:, None]) / np.sqrt(var[:, None] + EPS), atol=1e-13)


# --- dtypes and inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_output_dtype_is_input_dtype_and_state_stays_float64(dtype: type, training: bool) -> None:
    rng = np.random.default_rng(19)
    layer = trained_layer(3).train(training)
    x = make_input(rng, (8, 3, 2)).astype(dtype)
    y = layer(x)
    assert y.dtype == dtype
    dx = layer.backward(np.ones_like(x))
    assert dx.dtype == dtype
    for name in ["gamma", "beta", "running_mean", "running_var", "dgamma", "dbeta"]:
        assert getattr(layer, name).dtype == np.float64, name
    # float16 and float32 results agree with the float64 computation to their precision.
    ref = trained_layer(3).train(training)(x.astype(np.float64))
    # One rounding of y to the output dtype: half an ulp at |y| < 8.
    tol = {np.float16: 4e-3, np.float32: 1e-6, np.float64: 1e-14}[dtype]
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=0, atol=tol)


def test_list_input_is_accepted() -> None:
    layer = bn.BatchNorm(2)
    y = layer([[1.0, 2.0], [3.0, 6.0]])
    np.testing.assert_allclose(y, [[-1.0, -1.0], [1.0, 1.0]], atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_forward_and_backward_do_not_mutate_or_alias(training: bool) -> None:
    rng = np.random.default_rng(20)
    layer = trained_layer(3).train(training)
    x = make_input(rng, (6, 3, 4))
    x_copy = x.copy()
    y = layer(x)
    assert np.array_equal(x, x_copy)
    assert not np.shares_memory(x, y)
    dy = rng.normal(size=x.shape)
    dy_copy = dy.copy()
    dx = layer.backward(dy)
    assert np.array_equal(dy, dy_copy)
    assert not np.shares_memory(dx, dy)
    # Mutating x, y or dy afterwards does not change a later backward.
    x[:] = 0.0
    y[:] = 0.0
    dy_again = dy.copy()
    dy[:] = 7.0
    assert np.array_equal(layer.backward(dy_again), dx)


def test_non_contiguous_input_gives_the_same_result() -> None:
    rng = np.random.default_rng(21)
    base = make_input(rng, (6, 8, 3))
    x = base[:, ::2, :].transpose(0, 2, 1)  # (6, 3, 4), a strided view
    assert not x.flags.c_contiguous
    a, b = bn.BatchNorm(3), bn.BatchNorm(3)
    np.testing.assert_allclose(a(x), b(np.ascontiguousarray(x)), rtol=0, atol=1e-14)
    np.testing.assert_allclose(a.running_var, b.running_var, rtol=1e-15)


# --- backward ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
@pytest.mark.parametrize("affine", [True, False])
def test_training_backward_formula(shape: tuple[int, ...], axis: int, affine: bool) -> None:
    rng = np.random.default_rng(22)
    c = shape[axis]
    layer = trained_layer(c, seed=22, affine=affine, axis=axis)
    x = make_input(rng, shape)
    dy = rng.normal(size=shape)
    layer(x)
    dx = layer.backward(dy)

    axes = reduce_axes(x.ndim, axis)
    mean, var, m = batch_stats(x, axis)
    invstd = 1.0 / np.sqrt(var + EPS)
    xhat = (x - per_channel(mean, x.ndim, axis)) * per_channel(invstd, x.ndim, axis)
    gamma = layer.gamma if affine else np.ones(c)
    sum_dy = dy.sum(axis=axes)
    sum_dy_xhat = (dy * xhat).sum(axis=axes)
    expected = per_channel(gamma * invstd / m, x.ndim, axis) * (
        m * dy - per_channel(sum_dy, x.ndim, axis) - xhat * per_channel(sum_dy_xhat, x.ndim, axis)
    )
    assert relative_error(dx, expected) < 1e-12
    if affine:
        np.testing.assert_allclose(layer.dgamma, sum_dy_xhat, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.dbeta, sum_dy, rtol=1e-12, atol=1e-12)
    else:
        assert layer.dgamma is None and layer.dbeta is None


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
def test_eval_backward_is_frozen_batchnorm(shape: tuple[int, ...], axis: int) -> None:
    rng = np.random.default_rng(23)
    c = shape[axis]
    layer = trained_layer(c, seed=23, axis=axis).eval()
    x = make_input(rng, shape)
    dy = rng.normal(size=shape)
    layer(x)
    dx = layer.backward(dy)
    invstd = 1.0 / np.sqrt(layer.running_var + EPS)
    expected = dy * per_channel(layer.gamma * invstd, x.ndim, axis)
    np.testing.assert_allclose(dx, expected, rtol=1e-14, atol=1e-15)
    axes = reduce_axes(x.ndim, axis)
    xhat = (x - per_channel(layer.running_mean, x.ndim, axis)) * per_channel(invstd, x.ndim, axis)
    np.testing.assert_allclose(layer.dgamma, (dy * xhat).sum(axis=axes), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.dbeta, dy.sum(axis=axes), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("options", [{}, {"axis": -1}, {"affine": False}])
def test_backward_matches_finite_differences(training: bool, options: dict[str, Any]) -> None:
    rng = np.random.default_rng(24)
    layer = trained_layer(3, seed=24, **options).train(training)
    shape = channels_shape(3, layer.axis, n=4, spatial=(2,))
    x = make_input(rng, shape)
    dy = rng.normal(size=shape)
    layer(x)
    dx = layer.backward(dy)
    numeric = numerical_gradient(layer.forward, x, dy)
    assert relative_error(dx, numeric) < 1e-7
    if layer.affine:
        grads = {"gamma": layer.dgamma, "beta": layer.dbeta}
        for name, analytic in grads.items():
            original = getattr(layer, name).copy()

            def f(value: np.ndarray, name: str = name) -> np.ndarray:
                setattr(layer, name, value)
                return layer.forward(x)

            numeric_p = numerical_gradient(f, original, dy)
            setattr(layer, name, original)
            assert relative_error(analytic, numeric_p) < 1e-7, name


def test_backward_twice_gives_the_same_result() -> None:
    rng = np.random.default_rng(25)
    layer = bn.BatchNorm(3)
    layer(make_input(rng, (5, 3)))
    dy = rng.normal(size=(5, 3))
    first = layer.backward(dy), layer.dgamma.copy(), layer.dbeta.copy()
    second = layer.backward(dy), layer.dgamma, layer.dbeta
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a, b)


def test_backward_differentiates_the_latest_forward() -> None:
    rng = np.random.default_rng(26)
    layer = trained_layer(3)
    x1, x2 = make_input(rng, (5, 3)), make_input(rng, (7, 3))
    layer(x1)
    layer.eval()(x2)
    dy = rng.normal(size=(7, 3))
    expected = dy * layer.gamma / np.sqrt(layer.running_var + EPS)
    np.testing.assert_allclose(layer.backward(dy), expected, rtol=1e-14)
    with pytest.raises(ValueError, match="shape"):
        layer.backward(rng.normal(size=(5, 3)))


def test_backward_before_forward() -> None:
    layer = bn.BatchNorm(3)
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match=r"before forward\(\)"):
        layer.backward(np.ones((4, 3)))
    assert snapshot(layer) == before


def test_backward_before_forward_also_after_failed_forward() -> None:
    layer = bn.BatchNorm(3)
    with pytest.raises(ValueError):
        layer(np.ones((4, 5)))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((4, 3)))


@pytest.mark.parametrize(
    ("dy", "error", "match"),
    [
        (np.ones((6, 3)), ValueError, r"dy must have the shape .*\(6, 3, 2\)"),
        (np.ones((6, 3, 2, 1)), ValueError, "dy must have the shape"),
        (np.ones((6, 2, 3)), ValueError, "dy must have the shape"),
        (np.ones((6, 3, 2), dtype=np.int64), TypeError, "dy must have dtype"),
        (None, TypeError, "dy must be"),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_bad_dy_changes_nothing(dy: Any, error: type, match: str, training: bool) -> None:
    witness = Witness(trained_layer(3).train(training))
    with pytest.raises(error, match=match):
        witness.layer.backward(dy)
    witness.assert_unchanged()


# --- a failed call changes nothing ---------------------------------------------------------------


def _bad_inputs(c: int, axis: int) -> dict[str, tuple[Any, type, str]]:
    """name -> (x, error, message pattern) for a layer with c channels on `axis`."""
    rng = np.random.default_rng(27)
    good = make_input(rng, channels_shape(c, axis, n=6, spatial=(3,)))

    def poisoned(value: float, channels: list[int]) -> np.ndarray:
        x = np.moveaxis(good.copy(), axis, 0)  # a view with the channels first
        for ch in channels:
            x[ch].flat[2] = value
        return np.ascontiguousarray(np.moveaxis(x, 0, axis))

    ch_last = axis == -1
    return {
        "too_many_channels": (
            make_input(rng, channels_shape(c + 1, axis)),
            ValueError,
            rf"{c} channels.*\(6, 2, {c + 1}\)" if ch_last else rf"{c} channels.*\(6, {c + 1}, 2\)",
        ),
        "too_few_channels": (
            make_input(rng, channels_shape(c - 1, axis)),
            ValueError,
            rf"{c} channels",
        ),
        "rank_1": (make_input(rng, (c,)), ValueError, "at least 2 dimensions"),
        "rank_0": (np.float64(1.0), ValueError, "at least 2 dimensions"),
        "one_value_per_channel": (
            make_input(rng, (1, c)),
            ValueError,
            "more than 1 value per channel",
        ),
        "one_value_per_channel_4d": (
            make_input(rng, (1, 1, 1, c) if ch_last else (1, c, 1, 1)),
            ValueError,
            "more than 1 value per channel",
        ),
        "empty_batch": (np.empty((0, c)), ValueError, "no values per channel"),
        "int_input": (np.ones((4, c), dtype=np.int64), TypeError, "float16, float32 or float64"),
        "bool_input": (np.ones((4, c), dtype=bool), TypeError, "float16, float32 or float64"),
        "complex_input": (good.astype(np.complex128), TypeError, "float16, float32 or float64"),
        "none_input": (None, TypeError, "floating-point array"),
        "nan": (poisoned(np.nan, [1]), FloatingPointError, r"channels \[1\]"),
        "inf": (poisoned(np.inf, [2]), FloatingPointError, r"channels \[2\]"),
        "minus_inf": (poisoned(-np.inf, [0]), FloatingPointError, r"channels \[0\]"),
        "nan_two_channels": (poisoned(np.nan, [0, 2]), FloatingPointError, r"channels \[0, 2\]"),
        # Large enough for the streaming regime, which computes float32 in float32 (small
        # inputs are computed in float64, where these values square without overflow).
        "float32_overflow": (
            (make_input(rng, (12000, c)) * 1e37).astype(np.float32),
            FloatingPointError,
            r"channels \[0, 1, 2\]",
        ),
    }


BAD_INPUT_NAMES = list(_bad_inputs(3, 1))


def _call_quietly(layer: bn.BatchNorm, x: Any) -> None:
    # inf input or an overflowing float32 variance may make NumPy warn on the way to the error;
    # the warning is not what is tested here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        layer(x)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", BAD_INPUT_NAMES)
def test_failed_training_step_changes_nothing(config: str, case: str) -> None:
    options = CONFIGS[config]
    layer = trained_layer(3, **options)
    x, error, match = _bad_inputs(3, layer.axis)[case]
    witness = Witness(layer)
    with pytest.raises(error, match=match):
        _call_quietly(layer, x)
    witness.assert_unchanged()
    # And the layer still trains normally afterwards, like an untouched copy.
    twin = trained_layer(3, **options)
    Witness(twin)
    x_ok = make_input(np.random.default_rng(99), channels_shape(3, layer.axis))
    assert np.array_equal(layer(x_ok), twin(x_ok))
    assert snapshot(layer) == snapshot(twin)


@pytest.mark.parametrize(
    "case",
    [
        "too_many_channels",
        "rank_1",
        "empty_batch",
        "int_input",
        "complex_input",
        "none_input",
    ],
)
def test_failed_eval_step_changes_nothing(case: str) -> None:
    layer = trained_layer(3).eval()
    x, error, _ = _bad_inputs(3, 1)[case]
    if case == "empty_batch":
        # Eval mode has no batch statistics to compute: an empty batch is fine.
        y = layer(x)
        assert y.shape == (0, 3)
        return
    witness = Witness(layer)
    with pytest.raises(error):
        layer(x)
    witness.assert_unchanged()


def test_eval_mode_passes_nan_through_without_raising() -> None:
    layer = trained_layer(3).eval()
    x = np.ones((4, 3))
    x[1, 2] = np.nan
    before = snapshot(layer)
    y = layer(x)
    assert np.isnan(y[1, 2]) and np.isfinite(np.delete(y.reshape(-1), 5)).all()
    assert snapshot(layer) == before


def test_nan_error_message_is_diagnostic() -> None:
    x = np.ones((4, 3))
    x[0, 1] = np.nan
    with pytest.raises(FloatingPointError) as info:
        bn.BatchNorm(3)(x)
    message = str(info.value)
    assert "[1]" in message and "unchanged" in message


def test_batch_of_one_message_suggests_eval_mode() -> None:
    with pytest.raises(ValueError, match="eval mode") as info:
        bn.BatchNorm(3)(np.ones((1, 3)))
    assert "(1, 3)" in str(info.value)


def test_batch_of_one_is_fine_with_spatial_size() -> None:
    layer = bn.BatchNorm(2)
    y = layer(make_input(np.random.default_rng(28), (1, 2, 3, 3)))
    assert y.shape == (1, 2, 3, 3) and layer.num_batches_tracked == 1


# --- float16 output overflow ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval", "ghost", "frozen"])
def test_a_float16_output_that_overflows_warns(mode: str) -> None:
    rng = np.random.default_rng(40)
    x = rng.normal(size=(8, 3, 2)).astype(np.float16)
    ghost = 4 if mode == "ghost" else None
    layer = bn.BatchNorm(3, ghost_batch_size=ghost, frozen=mode == "frozen")
    layer.gamma[:] = [1.0, 1e5, 1.0]  # |y| ~ 1e5 > 65504 in channel 1
    if mode == "eval":
        layer.eval()
    before = layer.state_dict()
    with pytest.warns(RuntimeWarning, match=r"float16 output of channels \[1\] overflowed") as rec:
        y = layer(x)
    assert "65504" in str(rec[0].message) and "max |gamma| = 1e+05" in str(rec[0].message)
    assert rec[0].filename == __file__
    assert y.dtype == np.float16 and np.isinf(y[:, 1]).any() and np.isfinite(y[:, [0, 2]]).all()
    # The warning comes before any state is written: as an error it leaves the layer as it was.
    fresh = bn.BatchNorm(3)
    fresh.gamma[:] = layer.gamma
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning):
            fresh(x)
    assert fresh.num_batches_tracked == 0 and np.array_equal(fresh.running_mean, np.zeros(3))
    if mode in ("eval", "frozen"):
        assert all(np.array_equal(v, before[k]) for k, v in layer.state_dict().items())


def test_float16_without_overflow_and_inf_input_do_not_warn() -> None:
    x = np.random.default_rng(41).normal(size=(8, 3)).astype(np.float16)
    layer = bn.BatchNorm(3)
    layer.gamma[:] = 1e4  # |y| < 65504: no overflow
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
        x[0, 0] = np.inf  # an inf that was already in x is propagated, not an overflow
        y = layer.eval()(x)
    assert np.isinf(y[0, 0])
