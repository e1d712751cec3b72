"""Properties of the kernels that hold for every well-conditioned input (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
from helpers import param_shape, reduce_axes
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import batchnorm as bn

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def batches(draw, max_dims=5, axes=(1, -1)):
    """(x, axis, rng): float64 normal data, per-channel location and spread, >= 4 values per
    channel, and no channel so flat that normalizing it is meaningless."""
    ndim = draw(st.integers(2, max_dims))
    axis = draw(st.sampled_from(axes))
    shape = draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim))
    c = shape[axis]
    shape[0] *= -(-4 * c // math.prod(shape))  # grow the batch to >= 4 values per channel
    shape = tuple(shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pshape = param_shape(len(shape), axis)
    loc = rng.uniform(-50.0, 50.0, c).reshape(pshape)
    spread = np.exp(rng.uniform(-2.0, 2.0, c)).reshape(pshape)
    z = rng.standard_normal(shape)
    # A normal sample of 4+ values can be nearly constant by chance; such channels say nothing.
    assume(z.var(axis=reduce_axes(len(shape), axis)).min() > 0.05)
    return z * spread + loc, axis, rng


def _xhat(x, cache):
    pshape = param_shape(x.ndim, cache.axis)
    return (x - cache.mean.reshape(pshape)) / np.sqrt(cache.var.reshape(pshape) + cache.eps)


@SETTINGS
@given(batches(), st.sampled_from([1e-5, 1e-3, 0.1]), st.booleans())
def test_output_has_mean_zero_and_unit_variance(batch, eps, explicit_identity):
    x, axis, _ = batch
    c = x.shape[axis]
    gamma, beta = (np.ones(c), np.zeros(c)) if explicit_identity else (None, None)
    y, _ = bn.forward_train(x, gamma, beta, eps=eps, axis=axis)
    axes = reduce_axes(x.ndim, axis)
    var = x.var(axis=axes)
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-12)
    # Exactly 1 without eps; eps shrinks it to var / (var + eps).
    np.testing.assert_allclose(y.var(axis=axes), var / (var + eps), rtol=1e-12)


@SETTINGS
@given(batches(), st.booleans())
def test_output_is_gamma_times_xhat_plus_beta(batch, affine):
    x, axis, rng = batch
    c = x.shape[axis]
    gamma = rng.uniform(-2.0, 2.0, c) if affine else None
    beta = rng.standard_normal(c) if affine else None
    y, cache = bn.forward_train(x, gamma, beta, axis=axis)
    y0, _ = bn.forward_train(x, axis=axis)
    pshape = param_shape(x.ndim, axis)
    np.testing.assert_allclose(y0, _xhat(x, cache), rtol=1e-12, atol=1e-12)
    if affine:
        expected = gamma.reshape(pshape) * y0 + beta.reshape(pshape)
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(batches(), st.data())
def test_invariant_to_per_channel_positive_scaling_and_shifting(batch, data):
    x, axis, rng = batch
    c = x.shape[axis]
    pshape = param_shape(x.ndim, axis)
    scale = np.exp(rng.uniform(-2.0, 2.0, c)).reshape(pshape)
    shift = rng.uniform(-1e3, 1e3, c).reshape(pshape)
    # eps far below every channel's variance (>= 0.05 * e^-4 * e^-4 here), so it changes
    # nothing at this tolerance, whatever the scale.
    eps = data.draw(st.sampled_from([1e-14, 1e-12]))
    y, _ = bn.forward_train(x, eps=eps, axis=axis)
    y_scaled, cache = bn.forward_train(x * scale + shift, eps=eps, axis=axis)
    np.testing.assert_allclose(y_scaled, y, rtol=1e-7, atol=1e-7)
    expected_mean = x.mean(axis=reduce_axes(x.ndim, axis)) * scale.ravel() + shift.ravel()
    np.testing.assert_allclose(cache.mean, expected_mean, rtol=1e-10, atol=1e-9)


@SETTINGS
@given(batches(), st.sampled_from([1e-5, 1.0]))
def test_shifting_is_exactly_harmless_for_any_eps(batch, eps):
    # A shift leaves the variance alone, so the output is the same even with a large eps.
    x, axis, rng = batch
    c = x.shape[axis]
    shift = rng.uniform(-100.0, 100.0, c).reshape(param_shape(x.ndim, axis))
    y, _ = bn.forward_train(x, eps=eps, axis=axis)
    y_shifted, _ = bn.forward_train(x + shift, eps=eps, axis=axis)
    np.testing.assert_allclose(y_shifted, y, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(batches(), st.sampled_from([1e-5, 1e-2, 1.0]), st.booleans())
def test_train_dx_sums_to_zero_and_is_orthogonal_to_xhat(batch, eps, affine):
    x, axis, rng = batch
    c = x.shape[axis]
    gamma = rng.uniform(0.5, 2.0, c) if affine else None
    dy = rng.standard_normal(x.shape) * rng.uniform(0.1, 10.0)
    _, cache = bn.forward_train(x, gamma, None, eps=eps, axis=axis)
    dx, _, _ = bn.backward(dy, cache)
    axes = reduce_axes(x.ndim, axis)
    xhat = _xhat(x, cache)

    size = np.sum(np.abs(dx), axis=axes)
    np.testing.assert_allclose(np.sum(dx, axis=axes), 0.0, atol=1e-12 * size.max())

    # sum(dx * xhat) = gamma * invstd * sum(dy * xhat) * eps / (var + eps): zero as eps -> 0.
    g = 1.0 if gamma is None else gamma
    eps_term = g * cache.invstd * np.sum(dy * xhat, axis=axes) * eps / (cache.var + eps)
    dot = np.sum(dx * xhat, axis=axes)
    bound = 1e-11 * np.sum(np.abs(dx * xhat), axis=axes).max()
    np.testing.assert_allclose(dot, eps_term, rtol=1e-8, atol=bound)


@SETTINGS
@given(batches(), st.booleans())
def test_train_dx_vanishes_for_dy_in_the_span_of_one_and_xhat(batch, affine):
    # y is invariant to shifting and scaling x, so dy = a * xhat + b carries no gradient to x
    # (exactly so as eps -> 0; with eps the xhat part leaves eps / (var + eps) of itself).
    x, axis, rng = batch
    c = x.shape[axis]
    pshape = param_shape(x.ndim, axis)
    gamma = rng.uniform(0.5, 2.0, c) if affine else None
    _, cache = bn.forward_train(x, gamma, None, eps=1e-14, axis=axis)
    a, b = rng.standard_normal(c).reshape(pshape), rng.standard_normal(c).reshape(pshape)
    dy = a * _xhat(x, cache) + b
    dx, _, _ = bn.backward(dy, cache)
    g = 1.0 if gamma is None else gamma.reshape(pshape)
    scale = np.max(np.abs(dy * g * cache.invstd.reshape(pshape)))
    np.testing.assert_allclose(dx, 0.0, atol=1e-9 * scale)


@SETTINGS
@given(batches(max_dims=4, axes=(1,)), st.booleans(), st.booleans())
def test_channels_last_equals_moveaxis(batch, training, affine):
    x, _, rng = batch
    c = x.shape[1]
    gamma = rng.uniform(0.5, 2.0, c) if affine else None
    beta = rng.standard_normal(c) if affine else None
    stats = () if training else (rng.standard_normal(c), rng.uniform(0.1, 3.0, c))
    fwd = bn.forward_train if training else bn.forward_eval
    dy = rng.standard_normal(x.shape)

    y, cache = fwd(x, gamma, beta, *stats, axis=1)
    dx, dgamma, dbeta = bn.backward(dy, cache)
    y_l, cache_l = fwd(np.moveaxis(x, 1, -1), gamma, beta, *stats, axis=-1)
    dx_l, dgamma_l, dbeta_l = bn.backward(np.moveaxis(dy, 1, -1), cache_l)

    np.testing.assert_allclose(y_l, np.moveaxis(y, 1, -1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx_l, np.moveaxis(dx, 1, -1), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(cache_l.mean, cache.mean, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(cache_l.var, cache.var, rtol=1e-12)
    if affine:
        np.testing.assert_allclose(dgamma_l, dgamma, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dbeta_l, dbeta, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(batches(max_dims=4, axes=(1,)), st.data())
def test_any_channel_axis_equals_moveaxis(batch, data):
    x, _, rng = batch
    axis = data.draw(st.integers(0, x.ndim - 1))
    moved = np.moveaxis(x, 1, axis)
    dy = rng.standard_normal(moved.shape)
    y, cache = bn.forward_train(moved, axis=axis)
    dx, _, _ = bn.backward(dy, cache)
    y_ref, cache_ref = bn.forward_train(np.moveaxis(moved, axis, 1))
    dx_ref, _, _ = bn.backward(np.moveaxis(dy, axis, 1), cache_ref)
    np.testing.assert_allclose(np.moveaxis(y, axis, 1), y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.moveaxis(dx, axis, 1), dx_ref, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(batches(), st.booleans())
def test_train_statistics_are_the_biased_moments(batch, affine):
    x, axis, rng = batch
    c = x.shape[axis]
    gamma = rng.uniform(0.5, 2.0, c) if affine else None
    y, cache = bn.forward_train(x, gamma, None, axis=axis)
    axes = reduce_axes(x.ndim, axis)
    np.testing.assert_allclose(cache.mean, x.mean(axis=axes), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cache.var, x.var(axis=axes), rtol=1e-11)
    assert cache.count == x.size // c
    # Evaluating with those statistics reproduces the training output.
    y_eval, _ = bn.forward_eval(x, gamma, None, cache.mean, cache.var, axis=axis)
    np.testing.assert_allclose(y_eval, y, rtol=1e-10, atol=1e-10)
