"""The functional kernels: values, caches, dtypes, memory layouts, mutation safety, numerics."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import param_shape, reduce_axes
from normwise import normwise_error

import batchnorm as bn
from batchnorm.gradcheck import check_gradients

# (shape, channel axis): 2-D to 5-D, channels-first, channels-last and one unusual axis.
SHAPES_AXES = [
    ((8, 3), 1),
    ((4, 3, 5), 1),
    ((3, 4, 2, 3), 1),
    ((2, 3, 2, 3, 2), 1),
    ((6, 4), -1),
    ((3, 2, 4, 3), -1),
    ((2, 3, 2, 2, 3), -1),
    ((5, 2, 4), 0),
    ((2, 3, 4), 2),
]
FLOAT_DTYPES = [np.float16, np.float32, np.float64]


def _reference_forward(x, gamma, beta, eps, axis, mean=None, var=None):
    """Textbook float64 BatchNorm with explicit broadcasting; batch statistics when mean is None."""
    x = np.asarray(x, dtype=np.float64)
    axes = reduce_axes(x.ndim, axis)
    pshape = param_shape(x.ndim, axis)
    if mean is None:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    xhat = (x - np.reshape(mean, pshape)) / np.sqrt(np.reshape(var, pshape) + eps)
    g = 1.0 if gamma is None else np.reshape(gamma, pshape)
    b = 0.0 if beta is None else np.reshape(beta, pshape)
    return g * xhat + b


def _reference_backward_train(dy, x, gamma, eps, axis):
    """Backprop through the staged graph (mean -> var -> xhat -> y), not the compact formula."""
    x = np.asarray(x, dtype=np.float64)
    axes = reduce_axes(x.ndim, axis)
    pshape = param_shape(x.ndim, axis)
    m = x.size // x.shape[axis]
    mu = x.mean(axis=axes, keepdims=True)
    xc = x - mu
    var = (xc**2).mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = xc * invstd
    g = 1.0 if gamma is None else np.reshape(gamma, pshape)
    dxhat = dy * g
    dvar = np.sum(dxhat * xc, axis=axes, keepdims=True) * -0.5 * invstd**3
    dmu = -np.sum(dxhat * invstd, axis=axes, keepdims=True) + dvar * np.mean(
        -2.0 * xc, axis=axes, keepdims=True
    )
    dx = dxhat * invstd + dvar * 2.0 * xc / m + dmu / m
    return dx, np.sum(dy * xhat, axis=axes), np.sum(dy, axis=axes)


def _data(shape, axis, seed=0, dtype=np.float64):
    """Well-conditioned data with a different mean and spread in every channel."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    pshape = param_shape(len(shape), axis)
    loc = rng.uniform(-3.0, 3.0, c).reshape(pshape)
    scale = rng.uniform(0.5, 2.0, c).reshape(pshape)
    x = (rng.standard_normal(shape) * scale + loc).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, c)
    beta = rng.standard_normal(c)
    mean = rng.standard_normal(c)
    var = rng.uniform(0.5, 2.0, c)
    return x, dy, gamma, beta, mean, var


# --- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
@pytest.mark.parametrize("affine", [True, False])
def test_forward_train_matches_textbook(shape, axis, affine):
    x, _, gamma, beta, _, _ = _data(shape, axis)
    g, b = (gamma, beta) if affine else (None, None)
    y, cache = bn.forward_train(x, g, b, eps=1e-3, axis=axis)
    assert y.shape == x.shape
    assert normwise_error(y, _reference_forward(x, g, b, 1e-3, axis)) < 1e-13
    axes = reduce_axes(x.ndim, axis)
    np.testing.assert_allclose(cache.mean, x.mean(axis=axes), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(cache.var, x.var(axis=axes), rtol=1e-13)
    np.testing.assert_allclose(cache.invstd, 1.0 / np.sqrt(x.var(axis=axes) + 1e-3), rtol=1e-13)
    assert cache.count == x.size // shape[axis]


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
@pytest.mark.parametrize("affine", [True, False])
def test_forward_eval_matches_textbook(shape, axis, affine):
    x, _, gamma, beta, mean, var = _data(shape, axis, seed=1)
    g, b = (gamma, beta) if affine else (None, None)
    y, cache = bn.forward_eval(x, g, b, mean, var, eps=1e-3, axis=axis)
    expected = _reference_forward(x, g, b, 1e-3, axis, mean=mean, var=var)
    assert normwise_error(y, expected) < 1e-13
    np.testing.assert_array_equal(cache.mean, mean)
    np.testing.assert_array_equal(cache.var, var)
    assert cache.count == x.size // shape[axis]


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
@pytest.mark.parametrize("affine", [True, False])
def test_backward_train_matches_staged_graph(shape, axis, affine):
    x, dy, gamma, beta, _, _ = _data(shape, axis, seed=2)
    g, b = (gamma, beta) if affine else (None, None)
    _, cache = bn.forward_train(x, g, b, eps=1e-3, axis=axis)
    dx, dgamma, dbeta = bn.backward(dy, cache)
    ref_dx, ref_dgamma, ref_dbeta = _reference_backward_train(dy, x, g, 1e-3, axis)
    assert dx.shape == x.shape
    assert normwise_error(dx, ref_dx) < 1e-12
    if affine:
        assert normwise_error(dgamma, ref_dgamma) < 1e-12
        assert normwise_error(dbeta, ref_dbeta) < 1e-12
    else:
        assert dgamma is None
        assert dbeta is None


@pytest.mark.parametrize(("shape", "axis"), SHAPES_AXES)
@pytest.mark.parametrize("affine", [True, False])
def test_backward_eval_is_the_constant_statistics_gradient(shape, axis, affine):
    x, dy, gamma, beta, mean, var = _data(shape, axis, seed=3)
    g, b = (gamma, beta) if affine else (None, None)
    _, cache = bn.forward_eval(x, g, b, mean, var, eps=1e-3, axis=axis)
    dx, dgamma, dbeta = bn.backward(dy, cache)
    pshape = param_shape(x.ndim, axis)
    invstd = 1.0 / np.sqrt(var + 1e-3)
    scale = invstd if g is None else g * invstd
    assert normwise_error(dx, dy * scale.reshape(pshape)) < 1e-14
    if affine:
        xhat = (x - mean.reshape(pshape)) * invstd.reshape(pshape)
        axes = reduce_axes(x.ndim, axis)
        assert normwise_error(dgamma, np.sum(dy * xhat, axis=axes)) < 1e-12
        assert normwise_error(dbeta, np.sum(dy, axis=axes)) < 1e-13
    else:
        assert dgamma is None
        assert dbeta is None


# --- gradients against central differences (float64) ----------------------------------------

# Small enough for two forward calls per element: 2-D to 5-D, channels first and last.
GRAD_SHAPES = [((12, 3), 1), ((4, 3, 5), 1), ((3, 2, 3, 4), 1), ((2, 3, 2, 2, 3), 1)]
GRAD_SHAPES += [((12, 3), -1), ((3, 5, 3), -1), ((2, 3, 4, 3), -1), ((2, 2, 3, 2, 3), -1)]


@pytest.mark.parametrize(("shape", "axis"), GRAD_SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradients_match_finite_differences(shape, axis, training, affine):
    x, _, gamma, beta, mean, var = _data(shape, axis, seed=100 + len(shape))
    g, b = (gamma, beta) if affine else (None, None)
    stats = {} if training else {"mean": mean, "var": var}
    errors = check_gradients(x, g, b, training=training, axis=axis, seed=7, **stats)
    assert set(errors) == ({"dx", "dgamma", "dbeta"} if affine else {"dx"})
    # Elementwise relative errors (cs231n's): an entry of dx near zero carries the finite
    # differences' absolute error of ~1e-10, so dx reaches ~2e-7 on a correct gradient.
    for name, err in errors.items():
        assert err < (1e-6 if name == "dx" else 1e-9), (name, err)


@pytest.mark.parametrize("training", [True, False])
def test_gamma_without_beta_and_beta_without_gamma(training):
    x, dy, gamma, beta, mean, var = _data((6, 3), 1, seed=4)
    stats = () if training else (mean, var)
    fwd = bn.forward_train if training else bn.forward_eval

    y_g, cache_g = fwd(x, gamma, None, *stats)
    y_b, cache_b = fwd(x, None, beta, *stats)
    y_0, _ = fwd(x, None, None, *stats)
    np.testing.assert_allclose(y_g, y_0 * gamma, rtol=1e-14)
    np.testing.assert_allclose(y_b, y_0 + beta, rtol=1e-14, atol=1e-15)

    _, dgamma, dbeta = bn.backward(dy, cache_g)
    assert dgamma is not None
    assert dbeta is None
    _, dgamma, dbeta = bn.backward(dy, cache_b)
    assert dgamma is None
    np.testing.assert_allclose(dbeta, dy.sum(axis=0), rtol=1e-14)


def test_docstring_example_values():
    y, cache = bn.forward_train([[1.0, 10.0], [3.0, 30.0]], eps=1e-4)
    np.testing.assert_allclose(y, [[-1.0, -1.0], [1.0, 1.0]], atol=1e-3)
    np.testing.assert_array_equal(cache.mean, [2.0, 20.0])
    np.testing.assert_array_equal(cache.var, [1.0, 100.0])
    assert cache.count == 2


def test_training_normalizes_with_biased_variance():
    x = np.array([[0.0], [2.0], [4.0], [6.0]])
    y, cache = bn.forward_train(x, eps=1e-12)
    np.testing.assert_allclose(cache.var, [5.0])  # sum of squares 20 over m = 4, not m - 1
    np.testing.assert_allclose(np.mean(y**2), 1.0, rtol=1e-10)


def test_eval_with_batch_statistics_equals_train():
    x, _, gamma, beta, _, _ = _data((4, 3, 5, 2), 1, seed=5)
    y_train, cache = bn.forward_train(x, gamma, beta)
    y_eval, _ = bn.forward_eval(x, gamma, beta, cache.mean, cache.var)
    np.testing.assert_allclose(y_eval, y_train, rtol=1e-12, atol=1e-13)


def test_cache_fields():
    x, _, gamma, beta, _, _ = _data((3, 2, 4, 5), -1, seed=6)
    _, cache = bn.forward_train(x, gamma, None, eps=2e-5, axis=-1)
    assert cache.training is True
    assert cache.eps == 2e-5
    assert isinstance(cache.eps, float)
    assert cache.axis == 3
    assert cache.shape == (3, 2, 4, 5)
    assert cache.dtype == np.float64
    assert cache.count == 24
    np.testing.assert_array_equal(cache.gamma, gamma)
    assert cache.has_beta is False
    assert "train" in repr(cache)

    _, cache = bn.forward_eval(x.astype(np.float32), None, beta, [0.0] * 5, [1] * 5, axis=-1)
    assert cache.training is False
    assert cache.gamma is None
    assert cache.has_beta is True
    assert cache.dtype == np.float32
    assert "eval" in repr(cache)


def test_array_like_inputs_are_accepted():
    x = [[0.0, 1.0], [2.0, 5.0], [4.0, 3.0]]
    y_list, _ = bn.forward_train(x, [1, 2], (0, 1))
    y_arr, _ = bn.forward_train(np.array(x), np.array([1.0, 2.0]), np.array([0.0, 1.0]))
    np.testing.assert_array_equal(y_list, y_arr)


@pytest.mark.parametrize("axis", [np.int64(1), np.intp(-1)])
def test_numpy_integer_axis(axis):
    x, _, _, _, _, _ = _data((4, 3, 3), 1, seed=7)
    y, cache = bn.forward_train(x, axis=axis)
    y_ref, _ = bn.forward_train(x, axis=int(axis))
    np.testing.assert_array_equal(y, y_ref)
    assert type(cache.axis) is int


def test_single_sample_with_spatial_extent_trains():
    x, dy, gamma, beta, _, _ = _data((1, 3, 2, 2), 1, seed=8)
    y, cache = bn.forward_train(x, gamma, beta)
    assert cache.count == 4
    assert normwise_error(y, _reference_forward(x, gamma, beta, 1e-5, 1)) < 1e-13
    dx, _, _ = bn.backward(dy, cache)
    assert normwise_error(dx, _reference_backward_train(dy, x, gamma, 1e-5, 1)[0]) < 1e-12


def test_eval_accepts_a_single_sample_and_an_empty_batch():
    _, _, gamma, beta, mean, var = _data((2, 3), 1, seed=9)
    y1, _ = bn.forward_eval(np.ones((1, 3)), gamma, beta, mean, var)
    assert y1.shape == (1, 3)

    x0 = np.empty((0, 3, 2))
    y0, cache = bn.forward_eval(x0, gamma, beta, mean, var)
    assert y0.shape == (0, 3, 2)
    assert y0.dtype == np.float64
    dx, dgamma, dbeta = bn.backward(np.empty((0, 3, 2)), cache)
    assert dx.shape == (0, 3, 2)
    np.testing.assert_array_equal(dgamma, np.zeros(3))
    np.testing.assert_array_equal(dbeta, np.zeros(3))


def test_constant_channel_gives_beta_and_finite_gradients():
    x, dy, gamma, beta, _, _ = _data((5, 3, 4), 1, seed=10)
    x[:, 1] = 0.7
    y, cache = bn.forward_train(x, gamma, beta)
    assert 0.0 <= cache.var[1] < 1e-30
    np.testing.assert_allclose(y[:, 1], beta[1], rtol=0, atol=1e-12)
    dx, dgamma, _ = bn.backward(dy, cache)
    assert np.isfinite(dx).all()
    assert abs(dgamma[1]) < 1e-12
    # With xhat = 0 only the mean path is left: dx = gamma * invstd * (dy - mean(dy)).
    expected = gamma[1] * cache.invstd[1] * (dy[:, 1] - dy[:, 1].mean())
    np.testing.assert_allclose(dx[:, 1], expected, rtol=1e-10, atol=1e-10)


def test_nan_propagates_to_its_channel_only():
    x, _, gamma, beta, _, _ = _data((6, 3, 2), 1, seed=11)
    x_nan = x.copy()
    x_nan[2, 0, 1] = np.nan
    y, cache = bn.forward_train(x_nan, gamma, beta)
    y_ref, _ = bn.forward_train(x, gamma, beta)
    assert np.isnan(y[:, 0]).all()
    assert np.isnan(cache.mean[0])
    assert np.isnan(cache.var[0])
    np.testing.assert_allclose(y[:, 1:], y_ref[:, 1:], rtol=1e-15, atol=0)


# --- dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_output_dtype_is_input_dtype(dtype, training):
    x, dy, gamma, beta, mean, var = _data((4, 3, 5), 1, seed=12, dtype=dtype)
    if training:
        y, cache = bn.forward_train(x, gamma, beta)
    else:
        y, cache = bn.forward_eval(x, gamma, beta, mean, var)
    dx, dgamma, dbeta = bn.backward(dy, cache)
    assert y.dtype == dtype
    assert dx.dtype == dtype
    assert cache.dtype == dtype
    for per_channel in (cache.mean, cache.var, cache.invstd, cache.gamma, dgamma, dbeta):
        assert per_channel.dtype == np.float64
        assert per_channel.shape == (3,)


@pytest.mark.parametrize("dy_dtype", FLOAT_DTYPES)
def test_dx_dtype_follows_x_not_dy(dy_dtype):
    x, dy, gamma, beta, _, _ = _data((4, 3), 1, seed=13, dtype=np.float32)
    _, cache = bn.forward_train(x, gamma, beta)
    dx, _, _ = bn.backward(dy.astype(dy_dtype), cache)
    assert dx.dtype == np.float32


def _within_one_spacing(a16: np.ndarray, b32: np.ndarray) -> None:
    assert a16.dtype == np.float16
    gap = np.abs(a16.astype(np.float32) - b32)
    assert (gap <= np.spacing(np.abs(a16)).astype(np.float32)).all()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("shape", "axis"), [((16, 4), 1), ((4, 3, 5, 6), 1), ((2, 5, 3), -1)])
def test_float16_is_computed_in_float32(training, shape, axis):
    x, dy, gamma, beta, mean, var = _data(shape, axis, seed=14, dtype=np.float16)
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    if training:
        y16, c16 = bn.forward_train(x, gamma, beta, axis=axis)
        y32, c32 = bn.forward_train(x32, gamma, beta, axis=axis)
    else:
        y16, c16 = bn.forward_eval(x, gamma, beta, mean, var, axis=axis)
        y32, c32 = bn.forward_eval(x32, gamma, beta, mean, var, axis=axis)
    # Equal up to the double rounding of y32.astype(float16) (small inputs are computed in
    # float64, so y32 is itself rounded once already): at most one float16 spacing apart.
    _within_one_spacing(y16, y32)
    np.testing.assert_array_equal(c16.mean, c32.mean)
    np.testing.assert_array_equal(c16.var, c32.var)
    dx16, dgamma16, dbeta16 = bn.backward(dy, c16)
    dx32, dgamma32, dbeta32 = bn.backward(dy32, c32)
    _within_one_spacing(dx16, dx32)
    np.testing.assert_array_equal(dgamma16, dgamma32)
    np.testing.assert_array_equal(dbeta16, dbeta32)


def test_float16_accuracy_against_float64():
    x, _, gamma, beta, _, _ = _data((32, 4, 8), 1, seed=15, dtype=np.float16)
    y16, c16 = bn.forward_train(x, gamma, beta)
    y64, c64 = bn.forward_train(x.astype(np.float64), gamma, beta)
    assert normwise_error(y16, y64) < 2e-3  # float16 rounding of the output, ~ 2**-11
    np.testing.assert_allclose(c16.var, c64.var, rtol=1e-5)


def test_integer_gamma_beta_and_statistics_become_float64():
    x = np.random.default_rng(16).standard_normal((5, 3))
    _, cache = bn.forward_eval(x, [1, 2, 3], np.array([0, 1, 2], np.int32), [0, 0, 0], [1, 2, 3])
    assert cache.gamma.dtype == np.float64
    assert cache.mean.dtype == np.float64
    assert cache.var.dtype == np.float64


# --- inputs are not mutated, and the cache owns what backward needs ---------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_inputs_are_not_mutated(training, dtype):
    x, dy, gamma, beta, mean, var = _data((4, 3, 2, 2), 1, seed=17, dtype=dtype)
    copies = [a.copy() for a in (x, dy, gamma, beta, mean, var)]
    if training:
        _, cache = bn.forward_train(x, gamma, beta)
    else:
        _, cache = bn.forward_eval(x, gamma, beta, mean, var)
    bn.backward(dy, cache)
    for arr, copy in zip((x, dy, gamma, beta, mean, var), copies, strict=True):
        np.testing.assert_array_equal(arr, copy)
        assert arr.dtype == copy.dtype


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(("shape", "axis"), [((6, 3), 1), ((3, 2, 4, 3), 1), ((3, 4, 2), -1)])
def test_backward_unaffected_by_mutating_inputs_and_outputs(training, dtype, shape, axis):
    x, dy, gamma, beta, mean, var = _data(shape, axis, seed=18, dtype=dtype)
    args = () if training else (mean, var)
    fwd = bn.forward_train if training else bn.forward_eval

    _, fresh_cache = fwd(x.copy(), gamma.copy(), beta.copy(), *[a.copy() for a in args], axis=axis)
    expected = bn.backward(dy, fresh_cache)

    y, cache = fwd(x, gamma, beta, *args, axis=axis)
    for arr in (x, y, gamma, beta, *args):
        arr[...] = 123.0
    got = bn.backward(dy, cache)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("training", [True, False])
def test_backward_twice_gives_the_same_result(training):
    x, dy, gamma, beta, mean, var = _data((4, 3, 5), 1, seed=19)
    if training:
        _, cache = bn.forward_train(x, gamma, beta)
    else:
        _, cache = bn.forward_eval(x, gamma, beta, mean, var)
    fields = {k: np.copy(getattr(cache, k)) for k in ("mean", "var", "invstd", "gamma")}
    first = bn.backward(dy, cache)
    second = bn.backward(dy, cache)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    for name, before in fields.items():
        np.testing.assert_array_equal(getattr(cache, name), before)
    # Mutating the returned gradients does not reach the cache either.
    first[0][...] = 0.0
    np.testing.assert_array_equal(bn.backward(dy, cache)[0], second[0])


# --- memory layouts ---------------------------------------------------------------------------


_BIG = np.random.default_rng(20).standard_normal((8, 3, 10, 12)) * 2.0 + 1.0
LAYOUTS = {
    "fortran": np.asfortranarray(_BIG[:4, :, :5, :6]),
    "strided": _BIG[::2, :, ::2, ::3],
    "transposed": _BIG[:6, :, :5, :4].transpose(0, 1, 3, 2),
    "negative-stride": _BIG[:4, ::-1, :5, 6:0:-1],
    "2d-transposed": np.ascontiguousarray(_BIG[0, 0, :5, :6]).T,
    "2d-strided": _BIG[:, 0, ::2, 1],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("axis", [1, -1])
def test_non_contiguous_input_matches_contiguous_copy(layout, training, axis):
    x = LAYOUTS[layout]
    assert not x.flags.c_contiguous
    c = x.shape[axis]
    rng = np.random.default_rng(21)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    dy = np.asfortranarray(rng.standard_normal(x.shape))
    xc, dyc = np.ascontiguousarray(x), np.ascontiguousarray(dy)
    if training:
        y, cache = bn.forward_train(x, gamma, beta, axis=axis)
        y_ref, cache_ref = bn.forward_train(xc, gamma, beta, axis=axis)
    else:
        y, cache = bn.forward_eval(x, gamma, beta, mean, var, axis=axis)
        y_ref, cache_ref = bn.forward_eval(xc, gamma, beta, mean, var, axis=axis)
    np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=1e-13)
    for got, want in zip(bn.backward(dy, cache), bn.backward(dyc, cache_ref), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 3), (3, 4, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)])
def test_channels_last_equals_moveaxis(training, shape):
    x, dy, gamma, beta, mean, var = _data(shape, 1, seed=22)
    stats = () if training else (mean, var)
    fwd = bn.forward_train if training else bn.forward_eval
    y, cache = fwd(x, gamma, beta, *stats)
    dx, dgamma, dbeta = bn.backward(dy, cache)

    last = np.moveaxis(x, 1, -1)
    y_l, cache_l = fwd(last, gamma, beta, *stats, axis=-1)
    dx_l, dgamma_l, dbeta_l = bn.backward(np.moveaxis(dy, 1, -1), cache_l)
    np.testing.assert_allclose(np.moveaxis(y_l, -1, 1), y, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.moveaxis(dx_l, -1, 1), dx, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dgamma_l, dgamma, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dbeta_l, dbeta, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(cache_l.mean, cache.mean, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(cache_l.var, cache.var, rtol=1e-13)


# --- numerics ---------------------------------------------------------------------------------

OFFSET_SHAPES = [(32, 64, 16, 16), (256, 64)]


def _offset_float32(shape, seed):
    """float32 values 1e4 +- 1: the mean is 1e4 times the spread."""
    rng = np.random.default_rng(seed)
    return (1e4 + rng.uniform(-1.0, 1.0, shape)).astype(np.float32)


@pytest.mark.parametrize("shape", OFFSET_SHAPES)
def test_float32_with_large_offset_is_accurate(shape):
    x = _offset_float32(shape, 23)
    x64 = x.astype(np.float64)
    y, cache = bn.forward_train(x)
    # Measured ~1e-6 (about 10 float32 ulps of y); a one-pass E[x^2] - E[x]^2 gives ~1e-3.
    assert normwise_error(y, _reference_forward(x64, None, None, 1e-5, 1)) < 1e-5
    axes = reduce_axes(x.ndim, 1)
    np.testing.assert_allclose(cache.mean, x64.mean(axis=axes), rtol=1e-12)
    np.testing.assert_allclose(cache.var, x64.var(axis=axes), rtol=1e-5)

    dy = np.random.default_rng(24).standard_normal(shape).astype(np.float32)
    dx, _, _ = bn.backward(dy, cache)
    dx_ref = _reference_backward_train(dy.astype(np.float64), x64, None, 1e-5, 1)[0]
    assert normwise_error(dx, dx_ref) < 1e-5


@pytest.mark.parametrize("shape", OFFSET_SHAPES)
def test_float32_with_large_offset_beats_torch(shape):
    torch = pytest.importorskip("torch")
    x = _offset_float32(shape, 25)
    reference = _reference_forward(x.astype(np.float64), None, None, 1e-5, 1)
    ours = normwise_error(bn.forward_train(x)[0], reference)
    y_torch = torch.nn.functional.batch_norm(
        torch.from_numpy(x), None, None, training=True, eps=1e-5
    )
    theirs = normwise_error(y_torch.numpy(), reference)
    assert ours <= theirs


def test_float64_with_huge_offset_keeps_the_variance():
    rng = np.random.default_rng(26)
    noise = rng.standard_normal((1000, 3))
    x = 1e8 + noise
    _, cache = bn.forward_train(x)
    # x - 1e8 is exact here (Sterbenz), so this is the variance of the stored values.
    exact_var = np.var(x - 1e8, axis=0)
    np.testing.assert_allclose(cache.var, exact_var, rtol=1e-10)
    np.testing.assert_allclose(cache.mean - 1e8, np.mean(x - 1e8, axis=0), atol=1e-7)
