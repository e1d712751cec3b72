"""BatchRenorm against the paper's formulas (Ioffe 2017, Algorithm 1) and against BatchNorm."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import layer_snapshot as snapshot
from normwise import normwise_error

import batchnorm as bn
from batchnorm.gradcheck import numerical_gradient

EPS = 1e-5


def paper(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mu: np.ndarray,
    var: np.ndarray,
    rmax: float,
    dmax: float,
    r: Any = None,
    d: Any = None,
) -> tuple[np.ndarray, ...]:
    """Algorithm 1 for (N, C) input, written out in plain NumPy; r and d may be given (held)."""
    mu_b = x.mean(axis=0)
    sigma_b = np.sqrt(((x - mu_b) ** 2).mean(axis=0) + EPS)
    sigma = np.sqrt(var + EPS)
    if r is None:
        r = np.clip(sigma_b / sigma, 1 / rmax, rmax)
        d = np.clip((mu_b - mu) / sigma, -dmax, dmax)
    xhat = (x - mu_b) / sigma_b
    return gamma * (xhat * r + d) + beta, r, d


def layer_with(c: int, rng: np.random.Generator, **options: Any) -> bn.BatchRenorm:
    layer = bn.BatchRenorm(c, **options)
    if layer.affine:
        layer.gamma[:] = rng.uniform(0.5, 2.0, c)
        layer.beta[:] = rng.normal(size=c)
    layer.running_mean[:] = rng.normal(size=c)
    layer.running_var[:] = rng.uniform(0.2, 3.0, c)
    return layer


# --- golden values ----------------------------------------------------------------------------


def test_hand_checked_values() -> None:
    # Channel 0: batch [1, 3] (mean 2, var 1), running mean 0, var 1: sigma_B = sigma, so r = 1,
    # d = 2 clipped to dmax = 1.5. Channel 1: batch [0, 8] (mean 4, var 16), running mean 4,
    # var 1: r = 4 clipped to rmax = 3, d = 0. (eps makes the ratios differ by ~1e-5.)
    layer = bn.BatchRenorm(2, rmax=3.0, dmax=1.5)
    layer.running_mean[:] = [0.0, 4.0]
    y = layer(np.array([[1.0, 0.0], [3.0, 8.0]]))
    np.testing.assert_allclose(layer.r, [1.0, 3.0], rtol=1e-5)
    np.testing.assert_allclose(layer.d, [1.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(y, [[-1.0 + 1.5, -3.0], [1.0 + 1.5, 3.0]], rtol=1e-5)
    # The running statistics are BatchNorm's: unbiased variance 2 and 32, momentum 0.9.
    np.testing.assert_allclose(layer.running_mean, [0.2, 4.0])
    np.testing.assert_allclose(layer.running_var, [0.9 + 0.2, 0.9 + 3.2])


@pytest.mark.parametrize(
    ("rmax", "dmax"), [(3.0, 5.0), (1.2, 0.1), (math.inf, math.inf), (1.0, 0.0)]
)
def test_training_output_matches_the_paper(rmax: float, dmax: float) -> None:
    rng = np.random.default_rng(0)
    layer = layer_with(3, rng, rmax=rmax, dmax=dmax)
    x = rng.normal(2.0, 3.0, size=(16, 3))
    expected, r, d = paper(x, layer.gamma, layer.beta, layer.running_mean, layer.running_var,
                           rmax, dmax)  # fmt: skip
    y = layer(x)
    assert normwise_error(y, expected) < 1e-12
    assert normwise_error(layer.r, r) < 1e-14 and normwise_error(layer.d, d) < 1e-14


def test_no_clipping_with_infinite_limits() -> None:
    layer = bn.BatchRenorm(1, rmax=math.inf, dmax=math.inf)
    layer.running_var[:] = 1e-4
    layer(np.array([[-100.0], [300.0]]))  # sigma_B / sigma ~ 19069, d ~ 9535, far beyond 3 and 5
    np.testing.assert_allclose(layer.r, [math.sqrt(4e4 + EPS) / math.sqrt(1e-4 + EPS)], rtol=1e-12)
    np.testing.assert_allclose(layer.d, [100.0 / math.sqrt(1e-4 + EPS)], rtol=1e-12)


# --- rmax = 1, dmax = 0 is BatchNorm ---------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "options"),
    [
        ((8, 3), {}),
        ((6, 3, 4, 4), {}),
        ((6, 4, 4, 3), {"axis": -1}),
        ((10, 3, 2), {"ghost_batch_size": 4}),
        ((8, 3), {"affine": False, "momentum": None, "unbiased": False}),
    ],
)
def test_rmax_1_dmax_0_is_batchnorm(shape: tuple[int, ...], options: dict[str, Any]) -> None:
    renorm = layer_with(shape[options.get("axis", 1)], np.random.default_rng(1),
                        rmax=1.0, dmax=0.0, **options)  # fmt: skip
    plain = bn.BatchNorm(renorm.num_features, **options)
    plain.load_state_dict(renorm.state_dict())
    rng = np.random.default_rng(2)
    for _ in range(3):
        x, dy = rng.normal(1.0, 2.0, size=shape), rng.normal(size=shape)
        assert normwise_error(renorm(x), plain(x)) < 1e-12
        assert normwise_error(renorm.backward(dy), plain.backward(dy)) < 1e-12
        if plain.affine:
            assert normwise_error(renorm.dgamma, plain.dgamma) < 1e-12
            assert normwise_error(renorm.dbeta, plain.dbeta) < 1e-12
        else:
            assert renorm.dgamma is None and renorm.dbeta is None
        assert normwise_error(renorm.running_mean, plain.running_mean) < 1e-12
        assert normwise_error(renorm.running_var, plain.running_var) < 1e-12
        assert renorm.num_batches_tracked == plain.num_batches_tracked


def test_eval_mode_is_batchnorm_eval_mode() -> None:
    rng = np.random.default_rng(3)
    renorm = layer_with(3, rng).eval()
    plain = bn.BatchNorm(3).eval()
    plain.load_state_dict(renorm.state_dict())
    x = rng.normal(size=(5, 3, 2))
    assert np.array_equal(renorm(x), plain(x))
    assert np.array_equal(renorm.backward(x), plain.backward(x))
    assert np.array_equal(renorm.dgamma, plain.dgamma)
    assert renorm.r is None and renorm.d is None


# --- gradients, with r and d held fixed -------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 3, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_finite_differences(shape: tuple[int, ...], training: bool) -> None:
    rng = np.random.default_rng(4)
    layer = layer_with(3, rng, rmax=1.5, dmax=0.5).train(training)
    x, dy = rng.normal(0.5, 2.0, size=shape), rng.normal(size=shape)
    g, b = layer.gamma.copy(), layer.beta.copy()
    mu, var = layer.running_mean.copy(), layer.running_var.copy()
    layer(x)
    dx = layer.backward(dy)
    r, d = layer.r, layer.d

    def f(values: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """The paper's formula on (N * spatial, C), r and d held at their values; in eval mode
        the running statistics' affine map."""
        flat = np.moveaxis(values, 1, -1)
        if training:
            y, _, _ = paper(flat.reshape(-1, 3), gamma, beta, mu, var, 1.5, 0.5, r, d)
            y = y.reshape(flat.shape)
        else:
            y = (flat - mu) * (gamma / np.sqrt(var + EPS)) + beta
        return np.moveaxis(y, -1, 1)

    if training:
        assert r is not None and not np.allclose(r, 1.0)  # the clipping is active
    assert normwise_error(dx, numerical_gradient(lambda v: f(v, g, b), x, dy)) < 1e-7
    assert normwise_error(layer.dgamma, numerical_gradient(lambda v: f(x, v, b), g, dy)) < 1e-7
    assert normwise_error(layer.dbeta, numerical_gradient(lambda v: f(x, g, v), b, dy)) < 1e-7


def test_dgamma_is_r_times_sum_dy_xhat_plus_d_times_sum_dy() -> None:
    rng = np.random.default_rng(5)
    layer = layer_with(2, rng, rmax=1.3, dmax=0.4)
    x, dy = rng.normal(size=(9, 2)), rng.normal(size=(9, 2))
    layer(x)
    layer.backward(dy)
    xhat = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + EPS)
    expected = layer.r * (dy * xhat).sum(axis=0) + layer.d * dy.sum(axis=0)
    assert normwise_error(layer.dgamma, expected) < 1e-12
    assert normwise_error(layer.dbeta, dy.sum(axis=0)) < 1e-12


# --- the schedule, ghost batches, state ---------------------------------------------------------


def test_rmax_and_dmax_may_change_during_training() -> None:
    rng = np.random.default_rng(6)
    layer = layer_with(2, rng, rmax=1.0, dmax=0.0)
    x = rng.normal(3.0, 4.0, size=(8, 2))
    layer(x)
    assert np.array_equal(layer.r, [1.0, 1.0]) and np.array_equal(layer.d, [0.0, 0.0])
    layer.rmax, layer.dmax = 3.0, 5.0
    layer(x)
    assert not np.allclose(layer.r, 1.0) and not np.allclose(layer.d, 0.0)


@pytest.mark.parametrize(("rmax", "dmax"), [(0.5, 1.0), (2.0, -1.0)])
def test_bad_limits_set_later_are_refused_before_anything_changes(rmax: float, dmax: float) -> None:
    layer = layer_with(2, np.random.default_rng(7))
    layer(np.random.default_rng(8).normal(size=(4, 2)))
    layer.rmax, layer.dmax = rmax, dmax
    before = snapshot(layer)
    with pytest.raises(ValueError, match="rmax >= 1 and dmax >= 0"):
        layer(np.random.default_rng(9).normal(size=(4, 2)))
    assert snapshot(layer) == before


@pytest.mark.parametrize(
    ("rmax", "dmax", "error"),
    [
        (0.9, 1.0, ValueError),
        (3.0, -0.5, ValueError),
        (math.nan, 1.0, TypeError),
        (3.0, "5", TypeError),
    ],
)
def test_bad_limits_are_refused(rmax: Any, dmax: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"rmax|dmax"):
        bn.BatchRenorm(2, rmax=rmax, dmax=dmax)


def test_ghost_batches_use_the_running_statistics_updated_by_the_ones_before() -> None:
    rng = np.random.default_rng(10)
    ghost = layer_with(2, rng, rmax=2.0, dmax=1.0, ghost_batch_size=3)
    plain = copy.deepcopy(ghost)
    plain.ghost_batch_size = None
    x, dy = rng.normal(2.0, 3.0, size=(8, 2)), rng.normal(size=(8, 2))
    y, dx = ghost(x), ghost.backward(dy)
    ys, dxs, dgs = [], [], []
    for lo in (0, 3, 6):
        ys.append(plain(x[lo : lo + 3]))
        dxs.append(plain.backward(dy[lo : lo + 3]))
        dgs.append(plain.dgamma)
    assert normwise_error(y, np.concatenate(ys)) < 1e-12
    assert normwise_error(dx, np.concatenate(dxs)) < 1e-12
    assert normwise_error(ghost.dgamma, np.sum(dgs, axis=0)) < 1e-12
    assert np.array_equal(ghost.running_var, plain.running_var)
    assert np.array_equal(ghost.r, plain.r)


def test_a_group_is_refused() -> None:
    layer = bn.BatchRenorm(2)
    layer.group = object()  # type: ignore[attr-defined]
    before = snapshot(layer)
    with pytest.raises(ValueError, match="BatchRenorm cannot be combined with a group"):
        layer(np.ones((4, 2)) * np.arange(4)[:, None])
    assert snapshot(layer) == before


def test_a_batch_of_one_and_non_finite_input_change_nothing() -> None:
    layer = layer_with(2, np.random.default_rng(11))
    before = snapshot(layer)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(np.ones((1, 2)))
    with pytest.raises(FloatingPointError, match="not finite"):
        layer(np.array([[1.0, np.inf], [2.0, 3.0]]))
    assert snapshot(layer) == before


def test_state_save_load_freeze_and_precise_bn(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    layer = layer_with(3, rng, rmax=2.5, dmax=math.inf, ghost_batch_size=4)
    layer(rng.normal(size=(8, 3)))
    assert list(layer.state_dict()) == list(bn.BatchNorm(3).state_dict())
    loaded = bn.BatchRenorm.load(layer.save(tmp_path / "renorm"))
    assert type(loaded) is bn.BatchRenorm
    assert (loaded.rmax, loaded.dmax, loaded.ghost_batch_size) == (2.5, math.inf, 4)
    assert snapshot(loaded, gradients=False) == snapshot(layer, gradients=False)
    assert repr(loaded).startswith("BatchRenorm(3, ") and "rmax=2.5, dmax=inf" in repr(loaded)
    with pytest.raises(ValueError, match=r"'batchnorm\.BatchNorm/1'"):
        bn.BatchNorm.load(tmp_path / "renorm.npz")
    with pytest.raises(ValueError, match=r"'batchnorm\.BatchRenorm/1'"):
        bn.BatchRenorm.load(bn.BatchNorm(3).save(tmp_path / "plain"))
    # freeze and precise_bn apply as to BatchNorm.
    state = layer.freeze().state_dict()
    layer(rng.normal(size=(8, 3)))
    assert all(np.array_equal(state[k], layer.state_dict()[k]) for k in state)
    data = [rng.normal(1.0, 2.0, size=(8, 3)) for _ in range(3)]
    bn.precise_bn(layer, data, num_batches_precise=3, layers=[layer])
    np.testing.assert_allclose(layer.running_mean, np.concatenate(data).mean(axis=0), rtol=1e-12)
    assert layer.frozen


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_output_keeps_the_input_dtype(dtype: type) -> None:
    rng = np.random.default_rng(13)
    layer = layer_with(3, rng, rmax=1.5, dmax=0.5)
    x = rng.normal(2.0, 3.0, size=(8, 3, 2)).astype(dtype)
    reference = copy.deepcopy(layer)
    y = layer(x)
    assert y.dtype == dtype
    assert layer.running_mean.dtype == np.float64
    expected = reference(x.astype(np.float64))
    tolerance = {np.float16: 1e-2, np.float32: 1e-5, np.float64: 1e-12}[dtype]
    assert normwise_error(y, expected) < tolerance
    assert layer.backward(np.ones_like(y)).dtype == dtype


# --- the defaults' first steps, and the warm-up --------------------------------------------------


def test_default_limits_correct_the_first_batch_towards_the_initial_statistics() -> None:
    # What docs/variants.md states: on N(5, 3) data, the first step with rmax=3, dmax=5 against
    # running statistics 0 and 1 gives an output of mean ~5 and std ~3.
    x = np.random.default_rng(30).normal(5.0, 3.0, size=(64, 4))
    y = bn.BatchRenorm(4)(x)
    assert 4.5 < y.mean() < 5.0 and 2.7 < y.std() < 3.0
    y = bn.BatchRenorm(4, warmup_steps=10)(x)
    assert abs(y.mean()) < 1e-12 and abs(y.std() - 1.0) < 1e-4


def test_the_warmup_is_batchnorm_then_relaxes_as_the_paper() -> None:
    rng = np.random.default_rng(31)
    w = 3
    layer, plain = bn.BatchRenorm(2, warmup_steps=w), bn.BatchNorm(2)
    for _ in range(w):  # r = 1, d = 0: BatchNorm exactly
        assert layer.current_limits == (1.0, 0.0)
        x = rng.normal(5.0, 3.0, size=(16, 2))
        assert normwise_error(layer(x), plain(x)) < 1e-12
        assert np.array_equal(layer.r, np.ones(2)) and np.array_equal(layer.d, np.zeros(2))
    expected = {
        w: (1.0, 0.0),  # relaxation starts
        2 * w: (1 + 2 / 7, 5 / 4),
        5 * w: (1 + 2 * 4 / 7, 5.0),  # dmax reached after 5W (the paper's 25k of 5k)
        8 * w: (3.0, 5.0),  # rmax reached after 8W (the paper's 40k)
        100 * w: (3.0, 5.0),
    }
    for step, (rmax, dmax) in expected.items():
        layer.num_batches_tracked = step
        assert layer.current_limits == pytest.approx((rmax, dmax), rel=1e-15)
    layer.num_batches_tracked = 2 * w
    x = rng.normal(5.0, 3.0, size=(16, 2))
    sigma = np.sqrt(layer.running_var + EPS)
    mu = layer.running_mean.copy()
    r_limit, d_limit = layer.current_limits
    layer(x)  # r and d are clipped to this step's limits
    r = np.clip(np.sqrt(x.var(axis=0) + EPS) / sigma, 1 / r_limit, r_limit)
    d = np.clip((x.mean(axis=0) - mu) / sigma, -d_limit, d_limit)
    np.testing.assert_allclose(layer.r, r, rtol=1e-12)
    np.testing.assert_allclose(layer.d, d, rtol=1e-12)
    assert (d_limit < np.abs((x.mean(axis=0) - mu) / sigma)).any()  # the limit did clip


def test_infinite_limits_are_reached_when_the_relaxation_starts() -> None:
    layer = bn.BatchRenorm(2, rmax=math.inf, dmax=math.inf, warmup_steps=4)
    layer.num_batches_tracked = 4
    assert layer.current_limits == (1.0, 0.0)
    layer.num_batches_tracked = 5
    assert layer.current_limits == (math.inf, math.inf)


def test_warmup_steps_is_saved_and_checked(tmp_path: Path) -> None:
    layer = bn.BatchRenorm(3, warmup_steps=7)
    loaded = bn.BatchRenorm.load(layer.save(tmp_path / "warm"))
    assert loaded.warmup_steps == 7 and "warmup_steps=7" in repr(loaded)
    # A file written before warmup_steps existed loads with no warm-up.
    with np.load(tmp_path / "warm.npz") as data:
        old = {k: data[k] for k in data.files if k != "config_warmup_steps"}
    np.savez(tmp_path / "old.npz", **old)
    assert bn.BatchRenorm.load(tmp_path / "old.npz").warmup_steps == 0
    for bad, error in [(-1, ValueError), (2.5, TypeError), (True, TypeError), ("5", TypeError)]:
        with pytest.raises(error, match="warmup_steps must be an int >= 0"):
            bn.BatchRenorm(3, warmup_steps=bad)


def test_a_group_at_construction_is_a_value_error() -> None:
    group = bn.distributed.thread_groups(1)[0]
    with pytest.raises(ValueError, match="BatchRenorm cannot be combined with a group"):
        bn.BatchRenorm(4, group=group)
    with pytest.raises(TypeError, match="group must be a group of workers"):
        bn.BatchRenorm(4, group=object())
    assert bn.BatchRenorm(4, group=None).group is None
