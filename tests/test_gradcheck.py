"""batchnorm.gradcheck: finite differences, relative errors, and the kernel oracle."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.gradcheck import (
    DEFAULT_TOLERANCES,
    KernelReport,
    check_gradients,
    check_kernels,
    numerical_gradient,
    relative_error,
)

# --- numerical_gradient -----------------------------------------------------------------------


def test_numerical_gradient_of_a_polynomial():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4))
    dy = rng.standard_normal((3, 4))
    grad = numerical_gradient(lambda v: v**3 + 2.0 * v, x, dy)
    assert grad.dtype == np.float64
    assert grad.shape == x.shape
    np.testing.assert_allclose(grad, (3.0 * x**2 + 2.0) * dy, rtol=1e-8, atol=1e-9)


def test_numerical_gradient_of_a_linear_map_with_another_output_shape():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 3))
    x = rng.standard_normal(3)
    dy = rng.standard_normal(5)
    grad = numerical_gradient(lambda v: a @ v, x, dy)
    np.testing.assert_allclose(grad, a.T @ dy, rtol=1e-9, atol=1e-10)


def test_numerical_gradient_of_a_coupled_function():
    # f(x) = x / sum(x): every output depends on every input.
    x = np.array([1.0, 2.0, 3.0])
    dy = np.array([1.0, -1.0, 0.5])
    s = x.sum()
    jacobian = np.eye(3) / s - x[:, None] / s**2
    grad = numerical_gradient(lambda v: v / v.sum(), x, dy)
    np.testing.assert_allclose(grad, jacobian.T @ dy, rtol=1e-8, atol=1e-10)


def test_numerical_gradient_leaves_x_alone_and_accepts_lists():
    x = np.array([[0.5, -1.0], [2.0, 3.0]], dtype=np.float32)
    before = x.copy()
    seen = []

    def f(v):
        seen.append(v.dtype)
        return np.sin(v)

    grad = numerical_gradient(f, x, np.ones((2, 2)))
    np.testing.assert_array_equal(x, before)
    assert set(seen) == {np.dtype(np.float64)}
    np.testing.assert_allclose(grad, np.cos(x.astype(np.float64)), rtol=1e-8)
    grad_list = numerical_gradient(np.exp, [[0.0, 1.0]], [[1.0, 2.0]])
    np.testing.assert_allclose(grad_list, [[1.0, 2.0 * np.e]], rtol=1e-8)


def test_numerical_gradient_step_size_matters():
    # The central difference of x**3 is exact up to h**2: 3x^2 + h^2.
    x = np.array([1.0])
    grad = numerical_gradient(lambda v: v**3, x, np.ones(1), h=1e-2)
    np.testing.assert_allclose(grad, [3.0 + 1e-4], rtol=1e-10)


# --- relative_error ---------------------------------------------------------------------------


def test_relative_error_is_elementwise_over_the_sum_of_magnitudes():
    # max over elements of |a - b| / max(|a| + |b|, 1e-8), as in cs231n.
    assert relative_error([1.0, 2.0], [1.0, 2.2]) == pytest.approx(0.2 / 4.2, rel=1e-12)
    assert relative_error([1.0, 2.2], [1.0, 2.0]) == pytest.approx(0.2 / 4.2, rel=1e-12)
    # Each entry is judged on its own scale: a small entry 10% off counts as 10% off.
    assert relative_error([100.0, 0.011], [100.0, 0.01]) == pytest.approx(0.001 / 0.021)
    assert relative_error([-4.0], [4.0]) == pytest.approx(1.0)
    assert isinstance(relative_error([1.0], [2.0]), float)


def test_a_correct_zero_gradient_has_error_zero():
    # A gradient that is 0 where it should be, next to finite-difference noise below the floor.
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error([0.0, 1.0], [1e-13, 1.0]) == pytest.approx(1e-13 / 1e-8)
    assert relative_error(np.zeros(3), [0.0, 1e-300, 0.0]) < 1e-290


def test_relative_error_floor_is_1e_8():
    assert relative_error([0.0], [1e-8]) == pytest.approx(1.0)
    assert relative_error([0.0], [1e-9]) == pytest.approx(0.1)
    assert relative_error([1e-9], [-1e-9]) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("actual", "expected"),
    [(np.zeros(3), np.zeros(3)), (np.zeros((0, 2)), np.zeros((0, 2))), ([1.5, -2.0], [1.5, -2.0])],
)
def test_relative_error_zero_cases(actual, expected):
    assert relative_error(actual, expected) == 0.0


@pytest.mark.parametrize(("a_shape", "e_shape"), [((3,), (4,)), ((2, 3), (3, 2)), ((3,), (1, 3))])
def test_relative_error_needs_equal_shapes(a_shape, e_shape):
    with pytest.raises(ValueError, match=r"relative_error needs equal shapes; got"):
        relative_error(np.ones(a_shape), np.ones(e_shape))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_relative_error_of_non_finite_values_is_inf(bad):
    assert relative_error([1.0, bad], [1.0, 2.0]) == float("inf")


# --- check_gradients: this library against finite differences ---------------------------------


def _problem(shape, axis, seed):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = rng.standard_normal(shape) * 1.5 + 0.3
    gamma = rng.uniform(0.5, 1.5, c)
    beta = rng.standard_normal(c)
    mean = rng.standard_normal(c)
    var = rng.uniform(0.5, 2.0, c)
    return x, gamma, beta, mean, var


def test_check_gradients_with_gamma_only_and_large_eps():
    x, gamma, _, _, _ = _problem((5, 4, 3), 1, seed=3)
    errors = check_gradients(x, gamma, None, eps=0.5, seed=1)
    assert set(errors) == {"dx", "dgamma"}
    assert max(errors.values()) < 1e-7


def test_check_gradients_eval_needs_statistics():
    x, gamma, beta, mean, _ = _problem((4, 3), 1, seed=4)
    with pytest.raises(ValueError, match=r"check_gradients\(training=False\) needs mean= and var="):
        check_gradients(x, gamma, beta, training=False, mean=mean)


def test_check_gradients_float32_input_is_checked_in_float64():
    x, gamma, beta, _, _ = _problem((6, 3, 2), 1, seed=5)
    errors = check_gradients(x.astype(np.float32), gamma, beta, seed=2)
    assert max(errors.values()) < 1e-7


def test_check_gradients_catches_a_wrong_backward(monkeypatch):
    # check_gradients is only useful if it can fail: give it a backward that treats the batch
    # statistics as constants and a beta gradient off by a factor 2.
    def wrong_backward(dy, cache):
        _, dgamma, dbeta = bn.backward(dy, cache)
        shape = [1] * len(cache.shape)
        shape[cache.axis] = -1
        return dy * (cache.gamma * cache.invstd).reshape(shape), dgamma, 2.0 * dbeta

    monkeypatch.setattr("batchnorm.gradcheck.backward", wrong_backward)
    x, gamma, beta, _, _ = _problem((6, 3, 2), 1, seed=6)
    errors = check_gradients(x, gamma, beta, seed=3)
    assert errors["dx"] > 0.1
    assert errors["dbeta"] == pytest.approx(1 / 3, rel=1e-6)  # |2b - b| / (|2b| + |b|)
    assert errors["dgamma"] < 1e-7


def test_check_gradients_rejects_integer_input():
    with pytest.raises(TypeError, match="x must have dtype float16, float32 or float64"):
        check_gradients(np.ones((4, 3), dtype=np.int64))


# --- check_kernels: a user's kernels against this library -------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("axis", [1, -1])
def test_check_kernels_passes_for_our_kernels(training, axis):
    forward = bn.forward_train if training else bn.forward_eval
    report = check_kernels(forward, bn.backward, training=training, axis=axis)
    assert isinstance(report, KernelReport)
    assert report.passed
    # The default cases: the named conformance cases of this mode, float64 then float32.
    expected = bn.conformance.cases(
        dtypes=[np.float64, np.float32], modes=["train" if training else "eval"]
    )
    assert [case.name for case in report.cases] == [case.name for case in expected]
    assert report.cases[0].dtype == "float64"
    assert set(report.worst) == {"y", "dx", "dgamma", "dbeta"}
    for case in report.cases:
        assert case.tolerance == case.tolerances["y"] > 0
        if case.dtype == "float64":
            assert max(case.errors.values()) == 0.0  # the reference is this same code
    assert report.worst["y"] < 1e-6


def test_check_kernels_float16_within_its_tolerance():
    report = check_kernels(bn.forward_train, bn.backward, shapes=[(16, 4)], dtypes=[np.float16])
    assert report.passed
    assert 1e-6 < report.worst["y"] < DEFAULT_TOLERANCES["float16"]


def test_check_kernels_custom_tolerance_can_fail_float32():
    report = check_kernels(
        bn.forward_train, bn.backward, shapes=[(8, 3)], tolerances={"float32": 1e-12}
    )
    assert not report.passed
    assert [case.passed for case in report.cases] == [True, False]


def _forward_then_mean_free_backward(dy, cache):
    """A common mistake: treat the batch statistics as constants in training backward."""
    shape = [1] * len(cache.shape)
    shape[cache.axis] = -1
    dx = np.asarray(dy) * (cache.gamma * cache.invstd).reshape(shape)
    _, dgamma, dbeta = bn.backward(dy, cache)
    return dx, dgamma, dbeta


def _forward_with_unbiased_variance(x, gamma, beta, *, eps, axis):
    """Another mistake: normalize with the unbiased variance, m / (m - 1)."""
    x = np.asarray(x)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    var = x.var(axis=axes, keepdims=True, ddof=1, dtype=np.float64)
    y = (x - mean) / np.sqrt(var + eps) * gamma.reshape(shape) + beta.reshape(shape)
    _, cache = bn.forward_train(x, gamma, beta, eps=eps, axis=axis)
    return y.astype(x.dtype), cache


def test_check_kernels_catches_a_backward_without_the_statistics_paths():
    report = check_kernels(bn.forward_train, _forward_then_mean_free_backward)
    assert not report.passed
    assert report.worst["dx"] > 0.1
    assert report.worst["y"] < 1e-6
    assert report.worst["dgamma"] < 1e-6
    assert all(not case.passed for case in report.cases)
    assert "NO" in str(report)


def test_the_same_backward_passes_in_eval_mode():
    # Without batch statistics, dx = dy * gamma * invstd is right.
    report = check_kernels(bn.forward_eval, _forward_then_mean_free_backward, training=False)
    assert report.passed


def test_check_kernels_catches_the_unbiased_variance():
    report = check_kernels(
        _forward_with_unbiased_variance, bn.backward, shapes=[(16, 8), (4, 3, 2)]
    )
    assert not report.passed
    # (4, 3, 2): m = 8 values per channel, so y is off by about 1 - sqrt(7/8) ~ 6%.
    assert report.worst["y"] > 1e-2
    assert report.worst["dx"] < 1e-6


def test_report_string_is_a_table():
    report = check_kernels(
        bn.forward_train, bn.backward, shapes=[(16, 8), (4, 3, 5)], dtypes=[np.float64]
    )
    lines = str(report).splitlines()
    assert len(lines) == 3
    header = lines[0].split()
    assert header == ["case", "dtype", "y", "dx", "dgamma", "dbeta", "err/tol", "ok"]
    assert lines[1].startswith("random_16x8-float64")
    assert "float64" in lines[1]
    assert lines[1].split()[-1] == "yes"
    assert lines[2].startswith("random_4x3x5-float64")
    assert [case.shape for case in report.cases] == [(16, 8), (4, 3, 5)]


def test_empty_report_passes_vacuously():
    report = KernelReport()
    assert report.passed
    assert report.worst == {}
    assert str(report).split() == ["case", "dtype", "y", "dx", "dgamma", "dbeta", "err/tol", "ok"]


@pytest.mark.parametrize(
    ("kwargs", "name", "got"),
    [
        ({"forward": None}, "forward", "NoneType"),
        ({"backward_fn": (1.0, 2.0, 3.0)}, "backward_fn", "tuple"),
        ({"running": "update"}, "running", "str"),
    ],
)
def test_check_kernels_refuses_kernels_that_are_not_functions(
    kwargs: dict[str, Any], name: str, got: str
) -> None:
    args = {"forward": bn.forward_train, "backward_fn": bn.backward, **kwargs}
    forward, backward_fn = args.pop("forward"), args.pop("backward_fn")
    with pytest.raises(
        TypeError, match=rf"^{name} must be a function \(your kernel\); got {got}\."
    ):
        check_kernels(forward, backward_fn, dtypes=[np.float32], **args)


def test_numerical_gradient_refuses_a_dy_that_only_broadcasts() -> None:
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match=r"^f\(x\) has shape \(4, 3\) but dy has shape \(3,\)"):
        numerical_gradient(lambda v: 2.0 * v, x, np.ones(3))


@pytest.mark.parametrize(
    ("h", "error"),
    [(0.0, ValueError), (-1e-5, ValueError), (float("nan"), ValueError), ("1e-5", TypeError)],
)
def test_numerical_gradient_needs_a_positive_step(h: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"^h must be a"):
        numerical_gradient(lambda v: v, np.ones(2), np.ones(2), h=h)


def test_numerical_gradient_needs_a_function() -> None:
    with pytest.raises(TypeError, match=r"^f must be a function of x .*; got ndarray\."):
        numerical_gradient(np.ones(2), np.ones(2), np.ones(2))
