"""Every input error: its type and a message that says what was expected and what arrived."""

from __future__ import annotations

import re

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _validate

RNG = np.random.default_rng(0)
X = RNG.standard_normal((4, 3))
GAMMA, BETA = np.ones(3), np.zeros(3)
MEAN, VAR = np.zeros(3), np.ones(3)


def _train(x=X, gamma=GAMMA, beta=BETA, **kw):
    return bn.forward_train(x, gamma, beta, **kw)


def _eval(x=X, gamma=GAMMA, beta=BETA, mean=MEAN, var=VAR, **kw):
    return bn.forward_eval(x, gamma, beta, mean, var, **kw)


# --- x --------------------------------------------------------------------------------------


@pytest.mark.parametrize("forward", [_train, _eval])
@pytest.mark.parametrize("x", [np.float64(1.0), np.ones(3)], ids=["0-d", "1-d"])
def test_rank_below_two(forward, x):
    with pytest.raises(ValueError, match=r"x must have at least 2 dimensions.*x\[None\]") as info:
        forward(x)
    assert f"got shape {x.shape} ({x.ndim}-d)" in str(info.value)


@pytest.mark.parametrize("forward", [_train, _eval])
@pytest.mark.parametrize(
    ("dtype", "hint"),
    [
        (np.int64, "astype"),
        (np.int32, "astype"),
        (np.uint8, "astype"),
        (np.bool_, "astype"),
        (np.complex128, "real-valued"),
        (np.complex64, "real-valued"),
        (object, "real-valued"),
        ("<U3", "real-valued"),
        ("S3", "real-valued"),
    ],
)
def test_non_float_x_is_a_type_error(forward, dtype, hint):
    x = np.ones((4, 3)).astype(dtype)
    with pytest.raises(
        TypeError, match=r"x must have dtype float16, float32 or float64; got dtype"
    ):
        forward(x)
    with pytest.raises(TypeError, match=hint):
        forward(x)


def test_the_hint_for_integer_data_fits_what_was_passed():
    with pytest.raises(TypeError, match=r"e\.g\. np\.asarray\(x, dtype=np\.float32\)\.$"):
        bn.forward_train([[1, 2], [3, 4]])
    with pytest.raises(TypeError, match=r"e\.g\. x\.astype\(np\.float32\)\.$"):
        bn.forward_train(np.ones((2, 2), dtype=np.int64))


@pytest.mark.parametrize(
    "x", [[[1, 2], [3, 4]], [["a", "b"], ["c", "d"]], [[True, False], [False, True]]]
)
def test_non_float_nested_lists_are_type_errors(x):
    with pytest.raises(TypeError, match="x must have dtype float16, float32 or float64"):
        bn.forward_train(x)


def _masked(a, *where):
    mask = np.zeros(np.shape(a), dtype=bool)
    for index in where:
        mask[index] = True
    return np.ma.masked_array(a, mask=mask)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: _train(_masked(X, (0, 0), (2, 1))), "x"),
        (lambda: _eval(_masked(X, (0, 0), (2, 1))), "x"),
        (lambda: bn.BatchNorm(3)(_masked(X, (0, 0), (2, 1))), "x"),
        (lambda: bn.PopulationStats(3).update(_masked(X, (0, 0), (2, 1))), "x"),
        (lambda: _train(gamma=_masked(GAMMA, 0, 2)), "gamma"),
        (lambda: _eval(var=_masked(VAR, 0, 2)), "var"),
        (lambda: bn.backward(_masked(X, (0, 0), (2, 1)), _train()[1]), "dy"),
    ],
    ids=["train", "eval", "layer", "population", "gamma", "var", "dy"],
)
def test_masked_values_are_refused(call, name):
    with pytest.raises(ValueError, match=rf"^{name} is a masked array with 2 masked value\(s\)"):
        call()


def test_a_masked_array_without_masked_values_is_data():
    y, _ = _train(np.ma.masked_array(X))
    np.testing.assert_array_equal(y, _train()[0])
    assert type(y) is np.ndarray


def test_a_refused_masked_batch_leaves_the_layer_unchanged():
    layer = bn.BatchNorm(3)
    layer(X)
    before = (layer.running_mean.copy(), layer.running_var.copy(), layer.num_batches_tracked)
    with pytest.raises(ValueError, match="masked"):
        layer(_masked(X + 5.0, (1, 1)))
    np.testing.assert_array_equal(layer.running_mean, before[0])
    np.testing.assert_array_equal(layer.running_var, before[1])
    assert layer.num_batches_tracked == before[2]


@pytest.mark.parametrize("forward", [_train, _eval])
def test_x_none(forward):
    with pytest.raises(TypeError, match="x must be a floating-point array; got None"):
        forward(None)


def test_longdouble_is_refused():
    x = np.ones((4, 3), dtype=np.longdouble)
    if x.dtype == np.float64:
        pytest.skip("long double is float64 on this platform")
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        bn.forward_train(x)


# --- axis -------------------------------------------------------------------------------------


@pytest.mark.parametrize("forward", [_train, _eval])
@pytest.mark.parametrize("axis", [2, -3, 100])
def test_axis_out_of_range(forward, axis):
    with pytest.raises(
        ValueError,
        match=rf"axis {axis} is out of range for x of shape \(4, 3\); expected an int "
        r"in \[-2, 1\]",
    ):
        forward(axis=axis)


@pytest.mark.parametrize("axis", [1.0, "1", None, True, (1,)])
def test_axis_must_be_an_int(axis):
    with pytest.raises(TypeError, match="axis must be an int"):
        _train(axis=axis)


@pytest.mark.parametrize(("shape", "axis", "expected"), [((2, 3), -1, 1), ((2, 3, 4), -2, 1)])
def test_channel_axis_is_normalized(shape, axis, expected):
    assert _validate.channel_axis(shape, axis) == expected


# --- per-channel vectors ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gamma", "beta"])
@pytest.mark.parametrize("forward", [_train, _eval])
@pytest.mark.parametrize("bad", [np.ones(4), np.ones(2), np.ones((1, 3)), np.ones(()), []])
def test_affine_parameter_wrong_shape(name, forward, bad):
    shape = re.escape(str(np.asarray(bad).shape))
    expected = rf"{name} must have shape \(3,\), one value per channel; got shape {shape}"
    with pytest.raises(ValueError, match=expected) as info:
        forward(**{name: bad})
    assert "num_features" in str(info.value)


@pytest.mark.parametrize("name", ["mean", "var"])
@pytest.mark.parametrize("bad", [np.ones(4), np.ones(2), np.ones((3, 1))])
def test_statistics_wrong_shape(name, bad):
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\), one value per channel"):
        _eval(**{name: bad})


def test_channels_last_length_mismatch_names_the_channel_count():
    x = np.ones((2, 4, 5))
    with pytest.raises(ValueError, match=r"gamma must have shape \(5,\).*got shape \(4,\)"):
        bn.forward_train(x, np.ones(4), None, axis=-1)


@pytest.mark.parametrize("name", ["mean", "var"])
def test_statistics_are_required_in_eval(name):
    with pytest.raises(TypeError, match=rf"{name} must be an array of shape \(3,\); got None"):
        _eval(**{name: None})


@pytest.mark.parametrize("name", ["gamma", "beta", "mean", "var"])
@pytest.mark.parametrize("bad", [np.array([1, 1j, 0]), np.array(["a", "b", "c"]), [True] * 3])
def test_per_channel_must_be_real(name, bad):
    with pytest.raises(TypeError, match=rf"{name} must hold real numbers \(float or int\)"):
        _eval(**{name: bad})


@pytest.mark.parametrize("name", ["gamma", "beta", "mean", "var"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_per_channel_must_be_finite(name, bad_value):
    vec = np.ones(3)
    vec[1] = bad_value
    with pytest.raises(ValueError, match=rf"{name} must be finite; channels \[1\] hold NaN or inf"):
        _eval(**{name: vec})


@pytest.mark.parametrize("name", ["gamma", "beta", "mean", "var"])
def test_per_channel_values_whose_squares_overflow_are_finite(name):
    # The finiteness check sums squares first; an overflow there must not reject the vector.
    vec = np.array([1e200, 3e200, 2.0])
    y, _ = _eval(**{name: vec})
    assert y.shape == X.shape


def test_negative_variance_in_eval():
    with pytest.raises(
        ValueError, match=r"var must be >= 0 \(it is a variance\); channels \[0, 2\]"
    ):
        _eval(var=np.array([-1.0, 0.5, -1e-12]))


def test_zero_variance_in_eval_is_allowed():
    y, _ = _eval(var=np.zeros(3), mean=np.zeros(3))
    np.testing.assert_allclose(y, X / np.sqrt(1e-5))


def test_channel_list_is_truncated():
    var = -np.ones(13)
    with pytest.raises(
        ValueError, match=r"channels \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] \(and 3 more\)"
    ):
        bn.forward_eval(np.ones((2, 13)), None, None, np.zeros(13), var)


def test_per_channel_returns_a_fresh_float64_copy():
    source = np.array([1.0, 2.0, 3.0])
    out = _validate.per_channel(source, "gamma", 3)
    assert out.dtype == np.float64
    assert not np.shares_memory(out, source)
    np.testing.assert_array_equal(out, source)
    np.testing.assert_array_equal(_validate.per_channel([1, 2, 3], "gamma", 3), source)


# --- batch size -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "axis"), [((1, 3), 1), ((1, 3, 1), 1), ((1, 3, 1, 1), 1), ((1, 1, 1, 3), -1)]
)
def test_single_value_per_channel_in_training(shape, axis):
    with pytest.raises(
        ValueError, match=r"Expected more than 1 value per channel when training"
    ) as info:
        bn.forward_train(np.ones(shape), axis=axis)
    message = str(info.value)
    assert f"got input of shape {shape}" in message
    assert "eval mode" in message


@pytest.mark.parametrize("shape", [(1, 3, 2, 2), (1, 3, 2), (2, 3)])
def test_smallest_valid_training_batches(shape):
    x = np.random.default_rng(1).standard_normal(shape)
    y, cache = bn.forward_train(x)
    assert y.shape == shape
    assert cache.count == x.size // 3


@pytest.mark.parametrize("shape", [(0, 3), (4, 3, 0), (0, 3, 4, 4), (2, 3, 0, 5)])
def test_empty_batch_in_training(shape):
    with pytest.raises(ValueError, match=r"x holds no values per channel.*Skip empty batches"):
        bn.forward_train(np.ones(shape))


@pytest.mark.parametrize("forward", [_train, _eval])
def test_no_channels(forward):
    x = np.ones((4, 0))
    kwargs = {"gamma": None, "beta": None}
    if forward is _eval:
        kwargs.update(mean=np.zeros(0), var=np.zeros(0))
    with pytest.raises(ValueError, match=r"x has no channels: shape \(4, 0\) has size 0"):
        forward(x, **kwargs)


# --- eps --------------------------------------------------------------------------------------


@pytest.mark.parametrize("forward", [_train, _eval])
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf"), -np.inf, np.float32(0)])
def test_eps_must_be_positive_and_finite(forward, eps):
    with pytest.raises(ValueError, match=r"eps must be a finite float > 0"):
        forward(eps=eps)


@pytest.mark.parametrize("eps", ["1e-5", None, True, [1e-5], 1e-5j])
def test_eps_must_be_a_real_number(eps):
    with pytest.raises(TypeError, match=r"eps must be a positive float such as 1e-5"):
        _train(eps=eps)


@pytest.mark.parametrize("eps", [1, np.float32(1e-3), np.float64(1e-5), 1e-300])
def test_eps_accepts_real_numbers(eps):
    _, cache = _train(eps=eps)
    assert cache.eps == float(eps)
    assert type(cache.eps) is float


# --- backward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dy_shape", [(3, 4), (4, 3, 1), (12,), (4, 2)])
def test_dy_shape_must_match(training, dy_shape):
    _, cache = _train() if training else _eval()
    expected = r"dy must have the shape of the forward input and output, \(4, 3\); got"
    with pytest.raises(ValueError, match=expected) as info:
        bn.backward(np.ones(dy_shape), cache)
    assert str(dy_shape) in str(info.value)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex128, object])
def test_dy_must_be_float(dtype):
    _, cache = _train()
    with pytest.raises(TypeError, match=r"dy must have dtype float16, float32 or float64"):
        bn.backward(np.ones((4, 3)).astype(dtype), cache)


def test_dy_none():
    _, cache = _train()
    with pytest.raises(TypeError, match=r"dy must be a floating-point array; got None"):
        bn.backward(None, cache)


@pytest.mark.parametrize(
    ("cache", "type_name"),
    [({}, "dict"), (None, "NoneType"), ((np.ones((4, 3)), None), "tuple"), (X, "ndarray")],
)
def test_backward_needs_a_cache(cache, type_name):
    with pytest.raises(
        TypeError,
        match=rf"cache must be the BatchNormCache returned by forward_train or forward_eval; "
        rf"got {type_name}\.",
    ):
        bn.backward(np.ones((4, 3)), cache)


def test_backward_with_swapped_arguments():
    y, cache = _train()
    with pytest.raises(TypeError, match="got ndarray"):
        bn.backward(cache, y)


# --- helpers ----------------------------------------------------------------------------------


def test_float_array_does_not_copy_float_input():
    x = np.ones((2, 3), dtype=np.float32)
    assert _validate.float_array(x) is x


def test_compute_dtypes():
    expected = {
        np.dtype(np.float16): np.dtype(np.float32),
        np.dtype(np.float32): np.dtype(np.float32),
        np.dtype(np.float64): np.dtype(np.float64),
    }
    assert dict(_validate.COMPUTE_DTYPES) == expected


def test_eval_batch_counts_values_per_channel():
    assert _validate.eval_batch((0, 3, 4), 1) == 0
    assert _validate.eval_batch((2, 3, 4), 2) == 6
    assert _validate.training_batch((2, 3, 4), 1) == 8
