"""Ghost batches: BatchNorm(ghost_batch_size=k) is BatchNorm applied to each run of k samples.

Every result is compared with a plain layer called on each ghost batch in turn (y and dx to
1e-12, running statistics bit for bit), and gradients with float64 finite differences.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from helpers import layer_snapshot as snapshot
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from normwise import normwise_error

import batchnorm as bn
from batchnorm.gradcheck import numerical_gradient

# (shape, k, axis): uneven last ghost batch, a last ghost batch of one sample with spatial
# values, channels-last, and k at least the batch size (one ghost batch: plain BatchNorm).
CASES = [
    ((10, 3), 4, 1),
    ((9, 3, 2, 2), 4, 1),
    ((12, 2, 3, 4), 5, 1),
    ((10, 2, 2, 3), 3, -1),
    ((6, 4), 6, 1),
    ((6, 4), 50, 1),
    ((7, 2, 5), 2, 1),
]


def layers(
    c: int, k: int, axis: int, seed: int, **options: Any
) -> tuple[bn.BatchNorm, bn.BatchNorm]:
    """A ghost layer and a plain one with the same (non-trivial) parameters and statistics."""
    rng = np.random.default_rng(seed)
    ghost = bn.BatchNorm(c, axis=axis, ghost_batch_size=k, **options)
    plain = bn.BatchNorm(c, axis=axis, **options)
    for layer in (ghost, plain):
        if layer.affine:
            layer.gamma[:] = np.random.default_rng(seed + 1).uniform(0.5, 2.0, c)
            layer.beta[:] = np.random.default_rng(seed + 2).normal(size=c)
        if layer.track_running_stats:
            layer.running_mean[:] = rng.normal(size=c)
            layer.running_var[:] = rng.uniform(0.5, 2.0, c)
            rng = np.random.default_rng(seed)
    return ghost, plain


def per_ghost(plain: bn.BatchNorm, x: np.ndarray, dy: np.ndarray, k: int) -> tuple[Any, ...]:
    """y, dx, dgamma, dbeta of the plain layer called on each ghost batch in turn."""
    ys, dxs, dgs, dbs = [], [], [], []
    for lo in range(0, len(x), k):
        ys.append(plain(x[lo : lo + k]))
        dxs.append(plain.backward(dy[lo : lo + k]))
        dgs.append(plain.dgamma)
        dbs.append(plain.dbeta)
    dgamma = None if dgs[0] is None else np.sum(dgs, axis=0)
    dbeta = None if dbs[0] is None else np.sum(dbs, axis=0)
    return np.concatenate(ys), np.concatenate(dxs), dgamma, dbeta


@pytest.mark.parametrize(("shape", "k", "axis"), CASES)
@pytest.mark.parametrize("options", [{}, {"affine": False}, {"momentum": None, "unbiased": False}])
def test_ghost_batches_equal_batchnorm_on_each_ghost_batch(
    shape: tuple[int, ...], k: int, axis: int, options: dict[str, Any]
) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=shape)
    dy = rng.normal(size=shape)
    ghost, plain = layers(shape[axis], k, axis, 1, **options)
    steps = -(-shape[0] // k)
    for _ in range(2):  # two training steps: the running statistics carry over
        y = ghost(x)
        dx = ghost.backward(dy)
        y_ref, dx_ref, dgamma, dbeta = per_ghost(plain, x, dy, k)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert normwise_error(y, y_ref) < 1e-12
        assert normwise_error(dx, dx_ref) < 1e-12
        if dgamma is None:
            assert ghost.dgamma is None and ghost.dbeta is None
        else:
            assert normwise_error(ghost.dgamma, dgamma) < 1e-12
            assert normwise_error(ghost.dbeta, dbeta) < 1e-12
        # Updated once per ghost batch, in order, as the calls on each ghost batch did.
        assert np.array_equal(ghost.running_mean, plain.running_mean)
        assert np.array_equal(ghost.running_var, plain.running_var)
        assert ghost.num_batches_tracked == plain.num_batches_tracked
    assert ghost.num_batches_tracked == 2 * steps


def test_ghost_batches_differ_from_whole_batch_normalization() -> None:
    x = np.random.default_rng(2).normal(size=(8, 3))
    x[4:] += 5.0  # the two halves have different means
    y = bn.BatchNorm(3, ghost_batch_size=4)(x)
    assert np.allclose(y[:4].mean(axis=0), 0.0) and np.allclose(y[4:].mean(axis=0), 0.0)
    assert not np.allclose(y, bn.BatchNorm(3)(x))


def test_ghost_output_keeps_the_dtype_and_channels_last_layout() -> None:
    x = np.random.default_rng(3).normal(size=(6, 3, 4, 4)).astype(np.float32)
    xcl = np.moveaxis(np.moveaxis(x, 1, -1).copy(), -1, 1)  # channels-last strides
    y = bn.BatchNorm(3, ghost_batch_size=4)(xcl)
    assert y.dtype == np.float32
    assert y.strides == xcl.strides


@pytest.mark.parametrize("shape", [(8, 3), (6, 2, 3, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_ghost_gradients_match_finite_differences(shape: tuple[int, ...], training: bool) -> None:
    rng = np.random.default_rng(4)
    layer, _ = layers(shape[1], 3, 1, 5)
    layer.train(training)
    x = rng.normal(1.0, 2.0, size=shape)
    dy = rng.normal(size=shape)

    def run(values: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
        fresh = copy.deepcopy(layer)
        fresh.gamma[:], fresh.beta[:] = gamma, beta
        return fresh(values)

    g, b = layer.gamma.copy(), layer.beta.copy()
    layer(x)
    dx = layer.backward(dy)
    assert normwise_error(dx, numerical_gradient(lambda v: run(v, g, b), x, dy)) < 1e-7
    assert normwise_error(layer.dgamma, numerical_gradient(lambda v: run(x, v, b), g, dy)) < 1e-7
    assert normwise_error(layer.dbeta, numerical_gradient(lambda v: run(x, g, v), b, dy)) < 1e-7


def test_eval_mode_ignores_ghost_batches() -> None:
    x = np.random.default_rng(6).normal(size=(10, 3, 2))
    ghost, plain = layers(3, 4, 1, 7)
    assert np.array_equal(ghost.eval()(x), plain.eval()(x))
    assert np.array_equal(ghost.backward(x), plain.backward(x))
    # track_running_stats=False in eval mode: the whole batch's statistics.
    ghost = bn.BatchNorm(3, ghost_batch_size=4, track_running_stats=False).eval()
    assert np.array_equal(ghost(x), bn.BatchNorm(3, track_running_stats=False).eval()(x))


def test_precise_bn_on_ghost_batches_gives_the_population_statistics() -> None:
    data = [np.random.default_rng(i).normal(2.0, 3.0, size=(10, 2)) for i in range(3)]
    ghost, plain = bn.BatchNorm(2, ghost_batch_size=4), bn.BatchNorm(2)
    bn.precise_bn(ghost, data, num_batches_precise=3)
    bn.precise_bn(plain, data, num_batches_precise=3)
    np.testing.assert_allclose(ghost.running_mean, plain.running_mean, rtol=1e-12)
    np.testing.assert_allclose(ghost.running_var, plain.running_var, rtol=1e-12)
    assert ghost.num_batches_tracked == 0


# --- failures change nothing -----------------------------------------------------------------


@pytest.mark.parametrize(("shape", "k"), [((9, 3), 4), ((5, 2), 2), ((1, 3), 1), ((0, 3), 2)])
def test_a_ghost_batch_with_one_value_per_channel_is_refused(
    shape: tuple[int, ...], k: int
) -> None:
    layer, _ = layers(shape[1], k, 1, 8)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"ghost batch .* fewer than 2 values per channel"):
        layer(np.ones(shape))
    assert snapshot(layer) == before


def test_non_finite_statistics_in_a_later_ghost_batch_change_nothing() -> None:
    layer, _ = layers(3, 4, 1, 9)
    layer(np.random.default_rng(0).normal(size=(8, 3)))
    layer.backward(np.ones((8, 3)))
    before = snapshot(layer)
    x = np.random.default_rng(1).normal(size=(12, 3))
    x[10, 1] = np.nan  # third ghost batch
    with pytest.raises(FloatingPointError, match=r"channels \[1\]"):
        layer(x)
    assert snapshot(layer) == before
    assert layer.backward(np.ones((8, 3))).shape == (8, 3)  # the last forward is still cached


def test_backward_checks_the_whole_batch_shape() -> None:
    layer = bn.BatchNorm(2, ghost_batch_size=3)
    layer(np.random.default_rng(0).normal(size=(8, 2)))
    with pytest.raises(ValueError, match=r"\(8, 2\)"):
        layer.backward(np.ones((3, 2)))


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-2, ValueError), (1.5, TypeError), (2.5, TypeError), (True, TypeError),
     ("4", TypeError)],
)  # fmt: skip
def test_bad_ghost_batch_sizes_are_refused(value: Any, error: type) -> None:
    with pytest.raises(error, match=r"ghost_batch_size must be None .* positive int"):
        bn.BatchNorm(3, ghost_batch_size=value)


def test_ghost_batches_on_the_channel_axis_are_refused() -> None:
    layer = bn.BatchNorm(3, axis=0, ghost_batch_size=2)
    with pytest.raises(ValueError, match="axis 0 is the channel axis"):
        layer(np.ones((3, 8)))


def test_ghost_batches_with_a_group_are_refused() -> None:
    layer = bn.BatchNorm(2, ghost_batch_size=2)
    layer.group = object()  # type: ignore[attr-defined]
    before = snapshot(layer)
    with pytest.raises(ValueError, match="ghost_batch_size cannot be combined with a group"):
        layer(np.ones((4, 2)))
    assert snapshot(layer) == before


def test_ghost_batches_match_torch_batchnorm_on_each_chunk() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    x, dy = rng.normal(2.0, 3.0, size=(10, 3, 4, 4)), rng.normal(size=(10, 3, 4, 4))
    module = torch.nn.BatchNorm2d(3, momentum=0.1, dtype=torch.float64)  # = our momentum 0.9
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.cat([module(chunk) for chunk in xt.split(4)])
    yt.backward(torch.tensor(dy))
    layer = bn.BatchNorm(3, ghost_batch_size=4)
    y = layer(x)
    dx = layer.backward(dy)
    assert normwise_error(y, yt.detach().numpy()) < 1e-12
    assert normwise_error(dx, xt.grad.numpy()) < 1e-12
    assert normwise_error(layer.dgamma, module.weight.grad.numpy()) < 1e-12
    assert normwise_error(layer.dbeta, module.bias.grad.numpy()) < 1e-12
    assert normwise_error(layer.running_mean, module.running_mean.numpy()) < 1e-12
    assert normwise_error(layer.running_var, module.running_var.numpy()) < 1e-12
    assert layer.num_batches_tracked == int(module.num_batches_tracked) == 3


def test_attributes_set_by_hand_are_checked_at_the_next_step() -> None:
    ghost = bn.BatchNorm(2)
    ghost.ghost_batch_size = 0
    before = snapshot(ghost)
    with pytest.raises(ValueError, match="ghost_batch_size must be None"):
        ghost(np.ones((4, 2)))
    assert snapshot(ghost) == before
    frozen = bn.BatchNorm(2, track_running_stats=False)
    frozen.frozen = True
    with pytest.raises(ValueError, match="track_running_stats=False"):
        frozen(np.ones((4, 2)))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 12),
    c=st.integers(1, 3),
    spatial=st.sampled_from([(), (1,), (3,), (2, 2)]),
    k=st.integers(1, 13),
    seed=st.integers(0, 2**16),
    channels_last=st.booleans(),
)
def test_any_split_equals_batchnorm_on_each_ghost_batch(
    n: int, c: int, spatial: tuple[int, ...], k: int, seed: int, channels_last: bool
) -> None:
    per_sample = int(np.prod(spatial))
    assume(all((min(lo + k, n) - lo) * per_sample >= 2 for lo in range(0, n, k)))
    axis = -1 if channels_last else 1
    shape = (n, *spatial, c) if channels_last else (n, c, *spatial)
    rng = np.random.default_rng(seed)
    x, dy = rng.normal(1.0, 3.0, size=shape), rng.normal(size=shape)
    ghost, plain = layers(c, k, axis, seed)
    y, dx = ghost(x), ghost.backward(dy)
    y_ref, dx_ref, dgamma, dbeta = per_ghost(plain, x, dy, k)
    assert normwise_error(y, y_ref) < 1e-12
    assert normwise_error(dx, dx_ref) < 1e-12
    assert normwise_error(ghost.dgamma, dgamma) < 1e-12
    assert normwise_error(ghost.dbeta, dbeta) < 1e-12
    assert np.array_equal(ghost.running_var, plain.running_var)
