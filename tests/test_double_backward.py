"""functional.double_backward: the gradients of <g_dx, dx> + <g_dgamma, dgamma> + <g_dbeta, dbeta>
with respect to x, gamma and dy, against finite differences of backward and PyTorch's autograd."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import param_shape, reduce_axes
from hypothesis import given, settings
from hypothesis import strategies as st
from normwise import normwise_error

import batchnorm as bn
from batchnorm import functional as F
from batchnorm.gradcheck import numerical_gradient

# 2-D to 5-D, channels-first and channels-last; small, since every element costs two backwards.
SHAPES_AXES = [
    ((6, 3), 1),
    ((3, 2, 4), 1),
    ((2, 3, 2, 3), 1),
    ((2, 2, 2, 3, 2), 1),
    ((5, 3), -1),
    ((2, 3, 2), -1),
    ((2, 2, 3, 2), -1),
    ((2, 2, 2, 2, 3), -1),
]


def problem(shape, axis, seed, *, affine=True):
    """x (offset and scaled), dy, g_dx, gamma, beta, g_dgamma, g_dbeta, mean, var in float64."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0) + rng.uniform(-2.0, 2.0)
    dy, g_dx = rng.standard_normal(shape), rng.standard_normal(shape)
    per_channel = [rng.uniform(0.5, 1.5, c)] + [rng.standard_normal(c) for _ in range(3)]
    gamma, beta, g_dgamma, g_dbeta = per_channel if affine else [None] * 4
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    return x, dy, g_dx, gamma, beta, g_dgamma, g_dbeta, mean, var


def forward(x, gamma, beta, mean, var, axis, training):
    if training:
        return bn.forward_train(x, gamma, beta, axis=axis)
    return bn.forward_eval(x, gamma, beta, mean, var, axis=axis)


@pytest.mark.parametrize("shape, axis", SHAPES_AXES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_finite_differences_of_backward(shape, axis, training, affine):
    x, dy, g_dx, gamma, beta, g_dgamma, g_dbeta, mean, var = problem(shape, axis, 0, affine=affine)

    def objective(x, gamma, dy):
        _, cache = forward(x, gamma, beta, mean, var, axis, training)
        dx, dgamma, dbeta = bn.backward(dy, cache)
        total = np.sum(g_dx * dx)
        if affine:
            total += np.dot(g_dgamma, dgamma) + np.dot(g_dbeta, dbeta)
        return np.asarray(total)

    _, cache = forward(x, gamma, beta, mean, var, axis, training)
    gx, ggamma, gdy = F.double_backward(g_dx, g_dgamma, g_dbeta, dy, cache)
    # Normwise: central differences of an objective of size ~10 are good to ~1e-10 absolute,
    # which an entry near zero by chance would turn into a large elementwise error.
    one = np.ones(())
    assert normwise_error(gx, numerical_gradient(lambda v: objective(v, gamma, dy), x, one)) < 1e-7
    assert normwise_error(gdy, numerical_gradient(lambda v: objective(x, gamma, v), dy, one)) < 1e-7
    if affine:
        numeric = numerical_gradient(lambda v: objective(x, v, dy), gamma, one)
        assert ggamma.dtype == np.float64 and normwise_error(ggamma, numeric) < 1e-7
    else:
        assert ggamma is None
    assert gx.shape == gdy.shape == x.shape and gx.dtype == gdy.dtype == np.float64


def torch_double_backward(x, dy, g_dx, gamma, beta, g_dgamma, g_dbeta, mean, var, training):
    """gx, ggamma, gdy from torch.nn.functional.batch_norm, autograd with create_graph=True."""
    torch = pytest.importorskip("torch")
    t = lambda a: None if a is None else torch.tensor(a, dtype=torch.float64)  # noqa: E731
    xt, dyt, gt, bt = t(x), t(dy), t(gamma), t(beta)
    for leaf in (xt, dyt, gt, bt):
        if leaf is not None:
            leaf.requires_grad_(True)
    running = (t(mean), t(var)) if not training else (None, None)
    y = torch.nn.functional.batch_norm(xt, *running, gt, bt, training=training, eps=1e-5)
    params = [p for p in (gt, bt) if p is not None]
    grads = torch.autograd.grad(y, [xt, *params], dyt, create_graph=True)
    total = (t(g_dx) * grads[0]).sum()
    if gamma is not None:
        total = total + (t(g_dgamma) * grads[1]).sum() + (t(g_dbeta) * grads[2]).sum()
    wrt = [xt, dyt] + ([gt] if gamma is not None else [])
    out = torch.autograd.grad(total, wrt, allow_unused=True)
    as_numpy = [np.zeros_like(x) if g is None else g.detach().numpy() for g in out]
    return as_numpy[0], (as_numpy[2] if gamma is not None else None), as_numpy[1]


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (3, 4, 5, 6), (2, 3, 3, 4, 5)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch_autograd_double_backward(shape, training, affine):
    pytest.importorskip("torch")
    args = problem(shape, 1, 1, affine=affine)
    x, dy, g_dx, gamma, beta, g_dgamma, g_dbeta, mean, var = args
    _, cache = forward(x, gamma, beta, mean, var, 1, training)
    ours = F.double_backward(g_dx, g_dgamma, g_dbeta, dy, cache)
    theirs = torch_double_backward(*args, training)
    for got, want in zip(ours, theirs, strict=True):
        if want is None:
            assert got is None
        else:
            assert normwise_error(got, want) < 1e-10


def textbook_double_backward(x, dy, u, gamma, a, b, axis):
    """Training-mode gx, ggamma, gdy from the expanded sums (docs/math.md, before the centred
    forms), with explicit broadcasting in float64: an independent evaluation."""
    axes, shape = reduce_axes(x.ndim, axis), param_shape(x.ndim, axis)
    m = x.size // x.shape[axis]
    mean = lambda v: v.mean(axis=axes, keepdims=True)  # noqa: E731
    g, a, b = (np.reshape(v, shape) for v in (gamma, a, b))
    xc = x - mean(x)
    s = 1.0 / np.sqrt(mean(xc * xc) + 1e-5)
    xhat = xc * s
    u_, dy_, ux, dyx, udy = mean(u), mean(dy), mean(u * xhat), mean(dy * xhat), mean(u * dy)
    gdy = g * s * (u - u_ - xhat * ux) + a * xhat + b
    ggamma = (m * s * (udy - u_ * dy_ - ux * dyx)).ravel()
    gx = a * s * (dy - dy_ - xhat * dyx) - g * s * s * (
        dyx * (u - u_) + ux * (dy - dy_) + xhat * (udy - u_ * dy_ - 3 * ux * dyx)
    )
    return gx, ggamma, gdy


@pytest.mark.parametrize("shape, axis", [((64, 8, 6, 6), 1), ((16, 4, 4, 4, 8), -1)])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_streaming_road_matches_a_textbook_evaluation(shape, axis, offset):
    # Above 8192 values the cache holds x - shift from the streaming road.
    x, dy, g_dx, gamma, beta, g_dgamma, g_dbeta, _, _ = problem(shape, axis, 10)
    x = x + offset
    _, cache = bn.forward_train(x, gamma, beta, axis=axis)
    ours = F.double_backward(g_dx, g_dgamma, g_dbeta, dy, cache)
    want = textbook_double_backward(x, dy, g_dx, gamma, g_dgamma, g_dbeta, axis)
    for got, ref in zip(ours, want, strict=True):
        assert normwise_error(got, ref) < 1e-11


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(16, 4, 5, 5), (64, 8, 6, 6)])  # lean road, streaming road
def test_low_precision_input_gives_its_dtype(training, dtype, shape):
    x, dy, g_dx, gamma, beta, g_dgamma, g_dbeta, mean, var = problem(shape, 1, 2)
    x, dy, g_dx = (a.astype(dtype) for a in (x, dy, g_dx))
    _, cache = forward(x, gamma, beta, mean, var, 1, training)
    gx, ggamma, gdy = F.double_backward(g_dx, g_dgamma, g_dbeta, dy, cache)
    assert gx.dtype == gdy.dtype == dtype and ggamma.dtype == np.float64
    # Against the same values in float64: only the rounding of x's dtype apart.
    wide = [a.astype(np.float64) for a in (x, dy, g_dx)]
    _, cache64 = forward(wide[0], gamma, beta, mean, var, 1, training)
    want = F.double_backward(wide[2], g_dgamma, g_dbeta, wide[1], cache64)
    tol = 1e-5 if dtype == np.float32 else 2e-3
    for got, ref in zip((gx, ggamma, gdy), want, strict=True):
        scale = np.abs(ref).max()
        assert np.abs(got.astype(np.float64) - ref).max() <= tol * scale


@pytest.mark.parametrize("training", [True, False])
def test_none_weights_are_zero(training):
    x, dy, g_dx, gamma, beta, _, _, mean, var = problem((5, 3, 4), 1, 3)
    _, cache = forward(x, gamma, beta, mean, var, 1, training)
    zeros = np.zeros(3)
    for got, want in zip(
        F.double_backward(g_dx, None, None, dy, cache),
        F.double_backward(g_dx, zeros, zeros, dy, cache),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("training", [True, False])
def test_gdy_is_backward_of_g_dx_plus_the_parameter_terms(training):
    # backward is linear in dy, so d<g_dx, dx>/d dy is backward applied to g_dx (the adjoint of
    # a symmetric map), and dgamma, dbeta add g_dgamma * xhat + g_dbeta.
    x, dy, g_dx, gamma, beta, g_dgamma, g_dbeta, mean, var = problem((6, 2, 3), 1, 4)
    _, cache = forward(x, gamma, beta, mean, var, 1, training)
    _, _, gdy = F.double_backward(g_dx, g_dgamma, g_dbeta, dy, cache)
    dx_of_weights, _, _ = bn.backward(g_dx, cache)
    shape = param_shape(x.ndim, 1)
    xhat = (x - np.reshape(cache.mean, shape)) * np.reshape(cache.invstd, shape)
    want = dx_of_weights + np.reshape(g_dgamma, shape) * xhat + np.reshape(g_dbeta, shape)
    np.testing.assert_allclose(gdy, want, rtol=1e-12, atol=1e-12)


def test_channels_last_memory_layout_is_kept():
    x, dy, g_dx, gamma, beta, g_dgamma, g_dbeta, _, _ = problem((2, 5, 4, 3), -1, 5)
    x, dy, g_dx = (np.moveaxis(a, -1, 1) for a in (x, dy, g_dx))  # (N, C, H, W), NHWC strides
    _, cache = bn.forward_train(x, gamma, beta)
    gx, _, gdy = F.double_backward(g_dx, g_dgamma, g_dbeta, dy, cache)
    dx, _, _ = bn.backward(dy, cache)
    assert gx.strides == gdy.strides == dx.strides
    _, cache_c = bn.forward_train(np.ascontiguousarray(x), gamma, beta)
    want = F.double_backward(g_dx, g_dgamma, g_dbeta, np.ascontiguousarray(dy), cache_c)
    np.testing.assert_allclose(gx, want[0], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(gdy, want[2], rtol=1e-12, atol=1e-13)


def test_inputs_and_cache_are_not_modified():
    x, dy, g_dx, gamma, beta, g_dgamma, g_dbeta, _, _ = problem((4, 3, 5), 1, 6)
    _, cache = bn.forward_train(x, gamma, beta)
    arrays = (dy, g_dx, g_dgamma, g_dbeta, cache._data, cache.mean, cache.invstd)
    before = [a.copy() for a in arrays]
    first = F.double_backward(g_dx, g_dgamma, g_dbeta, dy, cache)
    second = F.double_backward(g_dx, g_dgamma, g_dbeta, dy, cache)
    for a, b in zip(arrays, before, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_eval_without_gamma_and_an_empty_batch():
    x = np.random.default_rng(7).standard_normal((4, 3))
    _, cache = bn.forward_eval(x, None, np.zeros(3), np.zeros(3), np.full(3, 3.0), eps=1.0)
    gx, ggamma, gdy = F.double_backward(np.ones_like(x), None, np.ones(3), x, cache)
    assert ggamma is None and not gx.any()
    np.testing.assert_allclose(gdy, np.full_like(x, 1.5))  # invstd * 1 + 1 with invstd = 1/2
    empty = np.zeros((0, 3))
    _, cache = bn.forward_eval(empty, np.ones(3), None, np.zeros(3), np.ones(3))
    gx, ggamma, gdy = F.double_backward(empty, np.ones(3), None, empty, cache)
    assert gx.shape == gdy.shape == (0, 3) and not ggamma.any()


def test_bad_input():
    x, dy, g_dx, gamma, beta, g_dgamma, g_dbeta, _, _ = problem((4, 3), 1, 8)
    _, cache = bn.forward_train(x, gamma, beta)
    with pytest.raises(TypeError, match="cache must be the BatchNormCache"):
        F.double_backward(g_dx, g_dgamma, g_dbeta, dy, {"mean": 0})
    with pytest.raises(ValueError, match=r"g_dx must have the shape of the forward input"):
        F.double_backward(g_dx[:2], g_dgamma, g_dbeta, dy, cache)
    with pytest.raises(TypeError, match="g_dx must have dtype float16, float32 or float64"):
        F.double_backward(g_dx.astype(int), g_dgamma, g_dbeta, dy, cache)
    with pytest.raises(ValueError, match="dy must have the shape"):
        F.double_backward(g_dx, g_dgamma, g_dbeta, dy.T, cache)
    with pytest.raises(ValueError, match=r"g_dgamma must be None or a real array of shape \(3,\)"):
        F.double_backward(g_dx, np.ones(4), g_dbeta, dy, cache)
    with pytest.raises(ValueError, match=r"g_dbeta must be None or a real array"):
        F.double_backward(g_dx, g_dgamma, np.array(["a", "b", "c"]), dy, cache)
    _, plain = bn.forward_train(x)
    with pytest.raises(ValueError, match="g_dgamma must be None: the forward call had no gamma"):
        F.double_backward(g_dx, g_dgamma, None, dy, plain)
    with pytest.raises(ValueError, match="g_dbeta must be None: the forward call had no beta"):
        F.double_backward(g_dx, None, g_dbeta, dy, plain)
    stats = F.moments(x)
    _, part = bn.forward_train(x[:2], gamma, beta, stats=stats)
    with pytest.raises(ValueError, match="needs the cache of a whole normalization batch"):
        F.double_backward(g_dx[:2], None, None, dy[:2], part)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from(SHAPES_AXES),
    st.booleans(),
    st.floats(-3, 3),
    st.floats(-3, 3),
)
def test_linear_in_the_weights(seed, shape_axis, training, alpha, beta_coef):
    # The objective is linear in (g_dx, g_dgamma, g_dbeta), so are its gradients.
    shape, axis = shape_axis
    x, dy, u1, gamma, beta, a1, b1, mean, var = problem(shape, axis, seed)
    _, _, u2, _, _, a2, b2, _, _ = problem(shape, axis, seed + 1)
    _, cache = forward(x, gamma, beta, mean, var, axis, training)
    one = F.double_backward(u1, a1, b1, dy, cache)
    two = F.double_backward(u2, a2, b2, dy, cache)
    mixed = F.double_backward(
        alpha * u1 + beta_coef * u2, alpha * a1 + beta_coef * a2, alpha * b1 + beta_coef * b2,
        dy, cache,
    )  # fmt: skip
    for got, p, q in zip(mixed, one, two, strict=True):
        scale = 1.0 + np.abs(p).max() + np.abs(q).max()
        np.testing.assert_allclose(got, alpha * p + beta_coef * q, rtol=1e-9, atol=1e-12 * scale)
