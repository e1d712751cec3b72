"""PyTorch as an outside oracle, in float64 (skipped when torch is not installed)."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.gradcheck import relative_error

torch = pytest.importorskip("torch")

TOL = 1e-10
SHAPES = [(8, 3), (4, 3, 5), (3, 4, 5, 6), (2, 3, 3, 4, 5)]


def problem(shape, seed, axis=1):
    """x, dy, gamma, beta, mean, var in float64 for a channel axis of size shape[axis]."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0) + rng.uniform(-2.0, 2.0)
    dy = rng.standard_normal(shape)
    return (
        x,
        dy,
        rng.uniform(0.5, 1.5, c),
        rng.standard_normal(c),
        rng.standard_normal(c),
        rng.uniform(0.5, 2.0, c),
    )


def torch_batch_norm(x, dy, gamma, beta, mean=None, var=None, *, training, eps=1e-5):
    """y, dx, dgamma, dbeta from torch.nn.functional.batch_norm and autograd, channels at axis 1.

    Absent gamma/beta give None gradients. mean/var are used in eval and ignored in training.
    """
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    gt = None if gamma is None else torch.tensor(gamma, dtype=torch.float64, requires_grad=True)
    bt = None if beta is None else torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    rm = None if training else torch.tensor(mean, dtype=torch.float64)
    rv = None if training else torch.tensor(var, dtype=torch.float64)
    y = torch.nn.functional.batch_norm(xt, rm, rv, gt, bt, training=training, eps=eps)
    y.backward(torch.tensor(dy, dtype=torch.float64))
    grads = [None if t is None else t.grad.numpy() for t in (xt, gt, bt)]
    return y.detach().numpy(), *grads


def assert_parity(ours, theirs):
    for name, got, want in zip(("y", "dx", "dgamma", "dbeta"), ours, theirs, strict=True):
        if want is None:
            assert got is None, name
        else:
            assert got.shape == want.shape, name
            assert relative_error(got, want) <= TOL, (name, relative_error(got, want))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_functional_train_matches_torch(shape, affine):
    x, dy, gamma, beta, _, _ = problem(shape, seed=len(shape))
    g, b = (gamma, beta) if affine else (None, None)
    y, cache = bn.forward_train(x, g, b)
    assert_parity((y, *bn.backward(dy, cache)), torch_batch_norm(x, dy, g, b, training=True))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_functional_eval_matches_torch(shape, affine):
    x, dy, gamma, beta, mean, var = problem(shape, seed=10 + len(shape))
    g, b = (gamma, beta) if affine else (None, None)
    y, cache = bn.forward_eval(x, g, b, mean, var)
    theirs = torch_batch_norm(x, dy, g, b, mean, var, training=False)
    assert_parity((y, *bn.backward(dy, cache)), theirs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_functional_channels_last_matches_torch(shape, training):
    x, dy, gamma, beta, mean, var = problem(shape, seed=20 + len(shape))
    last, dy_last = np.moveaxis(x, 1, -1), np.moveaxis(dy, 1, -1)
    if training:
        y, cache = bn.forward_train(last, gamma, beta, axis=-1)
    else:
        y, cache = bn.forward_eval(last, gamma, beta, mean, var, axis=-1)
    dx, dgamma, dbeta = bn.backward(dy_last, cache)
    ours = (np.moveaxis(y, -1, 1), np.moveaxis(dx, -1, 1), dgamma, dbeta)
    assert_parity(ours, torch_batch_norm(x, dy, gamma, beta, mean, var, training=training))


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
def test_functional_eps_matches_torch(eps):
    x, dy, gamma, beta, mean, var = problem((6, 4, 3), seed=30)
    for training in (True, False):
        if training:
            y, cache = bn.forward_train(x, gamma, beta, eps=eps)
        else:
            y, cache = bn.forward_eval(x, gamma, beta, mean, var, eps=eps)
        theirs = torch_batch_norm(x, dy, gamma, beta, mean, var, training=training, eps=eps)
        assert_parity((y, *bn.backward(dy, cache)), theirs)


@pytest.mark.parametrize("shape", SHAPES)
def test_functional_cache_statistics_match_torch_running_update(shape):
    # With momentum=1.0 PyTorch's running buffers become the batch mean and the *unbiased*
    # batch variance: ours are cache.mean and cache.var * m / (m - 1).
    x, _, _, _, _, _ = problem(shape, seed=40 + len(shape))
    c = shape[1]
    running_mean = torch.zeros(c, dtype=torch.float64)
    running_var = torch.ones(c, dtype=torch.float64)
    torch.nn.functional.batch_norm(
        torch.tensor(x), running_mean, running_var, training=True, momentum=1.0
    )
    _, cache = bn.forward_train(x)
    m = cache.count
    assert m == x.size // c
    assert relative_error(cache.mean, running_mean.numpy()) <= TOL
    assert relative_error(cache.var * m / (m - 1), running_var.numpy()) <= TOL


def test_functional_single_sample_with_spatial_extent_matches_torch():
    x, dy, gamma, beta, _, _ = problem((1, 3, 2, 3), seed=50)
    y, cache = bn.forward_train(x, gamma, beta)
    assert_parity((y, *bn.backward(dy, cache)), torch_batch_norm(x, dy, gamma, beta, training=True))
