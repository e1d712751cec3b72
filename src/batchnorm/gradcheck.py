"""Gradient checks: numerical gradients, relative errors, and an oracle for your own kernels.

Three levels, from the most general to the most specific:

* :func:`numerical_gradient` - central differences of ``sum(f(x) * dy)`` for any f.
* :func:`check_gradients` - this library's backward against finite differences.
* :func:`check_kernels` - *your* forward/backward pair (NumPy, or a CUDA/Triton/C kernel
  wrapped to take and return NumPy arrays) against this library on random inputs.

Examples
--------
>>> import batchnorm as bn
>>> report = bn.gradcheck.check_kernels(bn.forward_train, bn.backward, shapes=[(4, 3)])
>>> report.passed
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from batchnorm import _validate
from batchnorm.functional import backward, forward_eval, forward_train

__all__ = [
    "DEFAULT_TOLERANCES",
    "KernelReport",
    "check_gradients",
    "check_kernels",
    "numerical_gradient",
    "relative_error",
]

#: Largest relative error :func:`check_kernels` accepts, by the dtype of the kernel's input.
DEFAULT_TOLERANCES: dict[str, float] = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2}

_DY_SALT = 0x6479  # "dy"

DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((16, 8), (4, 3, 5), (4, 3, 5, 6), (2, 3, 2, 3, 4))


def numerical_gradient(
    f: Callable[[NDArray[np.float64]], ArrayLike],
    x: ArrayLike,
    dy: ArrayLike,
    *,
    h: float = 1e-5,
) -> NDArray[np.float64]:
    """Central-difference gradient of ``sum(f(x) * dy)`` with respect to x, in float64.

    Parameters
    ----------
    f : callable
        Maps an array shaped like x to an array shaped like dy.
    x : array_like
        The point to differentiate at. It is copied to float64; the caller's array is unchanged.
    dy : array_like
        The weights of the outputs (the upstream gradient).
    h : float, default 1e-5
        The step. The truncation error is O(h^2) and the rounding error O(eps / h); 1e-5 is
        near the best trade-off in float64.

    Returns
    -------
    ndarray, shape of x, float64

    Notes
    -----
    ``grad[i] = (L(x + h e_i) - L(x - h e_i)) / (2 h)`` with ``L(x) = sum(f(x) * dy)``: two
    calls of f per element of x, so keep x small.
    """
    # C order, so that the flat views below write through to point and grad (for a Fortran
    # or broadcast x, reshape(-1) would be a copy and every difference 0).
    point = np.array(x, dtype=np.float64, order="C", copy=True)
    weights = np.asarray(dy, dtype=np.float64)
    grad = np.empty_like(point)
    flat, out = point.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + h
        plus = float(np.sum(np.asarray(f(point), dtype=np.float64) * weights))
        flat[i] = orig - h
        minus = float(np.sum(np.asarray(f(point), dtype=np.float64) * weights))
        flat[i] = orig
        out[i] = (plus - minus) / (2.0 * h)
    return grad


def relative_error(actual: ArrayLike, expected: ArrayLike) -> float:
    """Largest elementwise relative error, ``max |a - b| / max(|a| + |b|, 1e-8)``.

    Parameters
    ----------
    actual, expected : array_like
        Arrays of the same shape (a gradient and its numerical estimate, say).

    Returns
    -------
    float
        The maximum over elements of ``|a - b| / max(|a| + |b|, 1e-8)``, between 0 and 1
        for finite input; 0.0 for empty arrays, inf when an element is NaN or inf.

    Notes
    -----
    The denominator is the one of the cs231n assignments: ``|a| + |b|``, floored at 1e-8 so
    that two entries that are both (near) zero compare by their absolute difference instead of
    dividing 0 by 0. A correct zero gradient therefore has error 0, and a pair of entries
    within 1e-8 of zero contributes at most ``|a - b| / 1e-8``. Entries of opposite sign give
    1, the largest value.

    Examples
    --------
    >>> from batchnorm.gradcheck import relative_error
    >>> round(relative_error([1.0, 2.0], [1.0, 2.2]), 6)   # 0.2 / 4.2
    0.047619
    >>> relative_error([0.0, 0.0], [0.0, 0.0])             # a correct zero gradient
    0.0
    >>> round(relative_error([0.0], [1e-12]), 6)           # below the floor: 1e-12 / 1e-8
    0.0001
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    _validate.same_shapes(a.shape, e.shape)
    if a.size == 0:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(a - e) / np.maximum(np.abs(a) + np.abs(e), 1e-8)
    if not np.isfinite(err).all():
        return float("inf")
    return float(np.max(err))


def check_gradients(
    x: ArrayLike,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    *,
    training: bool = True,
    mean: ArrayLike | None = None,
    var: ArrayLike | None = None,
    eps: float = 1e-5,
    axis: int = 1,
    seed: int = 0,
    h: float = 1e-5,
) -> dict[str, float]:
    """Relative errors of :func:`batchnorm.backward` against finite differences, in float64.

    Parameters
    ----------
    x, gamma, beta, eps, axis
        As for :func:`batchnorm.forward_train`; x is converted to float64.
    training : bool, default True
        Check the training kernels; False checks :func:`batchnorm.forward_eval` with the given
        ``mean`` and ``var`` (required then).
    seed : int
        Seeds the random upstream gradient dy.
    h : float
        The finite-difference step.

    Returns
    -------
    dict
        ``{"dx": err}``, plus ``"dgamma"`` and ``"dbeta"`` when gamma and beta are given; each
        error is :func:`relative_error` (elementwise, floored at 1e-8) of the analytic gradient
        against the central differences. Correct gradients of well-scaled input give 1e-7 or
        less; an entry of dx near zero carries the differences' absolute error (~1e-10).

    Raises
    ------
    TypeError, ValueError
        As :func:`batchnorm.forward_train` for bad input; also ValueError when x holds NaN or
        inf (finite differences of them mean nothing), or when ``training=False`` lacks
        ``mean`` or ``var``.
    """
    x64 = np.asarray(_validate.float_array(x), dtype=np.float64)
    # Finite differences of NaN or inf say nothing about the gradient.
    _validate.finite_values(x64, "x")
    if not training:
        _validate.eval_statistics(mean, var)

    def run(xv: ArrayLike, g: ArrayLike | None, b: ArrayLike | None) -> Any:
        if training:
            return forward_train(xv, g, b, eps=eps, axis=axis)
        assert mean is not None and var is not None
        return forward_eval(xv, g, b, mean, var, eps=eps, axis=axis)

    # The salt keeps dy from equalling an x the caller drew from default_rng(seed): with dy = x,
    # dx is ~0 and its relative error meaningless.
    dy = np.random.default_rng([seed, _DY_SALT]).standard_normal(x64.shape)
    _, cache = run(x64, gamma, beta)
    dx, dgamma, dbeta = backward(dy, cache)
    errors = {
        "dx": relative_error(dx, numerical_gradient(lambda v: run(v, gamma, beta)[0], x64, dy, h=h))
    }
    if gamma is not None and dgamma is not None:
        num = numerical_gradient(lambda v: run(x64, v, beta)[0], gamma, dy, h=h)
        errors["dgamma"] = relative_error(dgamma, num)
    if beta is not None and dbeta is not None:
        num = numerical_gradient(lambda v: run(x64, gamma, v)[0], beta, dy, h=h)
        errors["dbeta"] = relative_error(dbeta, num)
    return errors


@dataclass(frozen=True)
class KernelCase:
    """The relative errors of one (shape, dtype) case of :func:`check_kernels`."""

    shape: tuple[int, ...]
    dtype: str
    errors: dict[str, float]
    tolerance: float

    @property
    def passed(self) -> bool:
        return all(err <= self.tolerance for err in self.errors.values())


@dataclass(frozen=True)
class KernelReport:
    """Result of :func:`check_kernels`: one :class:`KernelCase` per shape and dtype.

    ``str(report)`` is a table; ``report.passed`` is True when every error is within its
    dtype's tolerance; ``report.worst`` maps each output name to its largest error.
    """

    cases: list[KernelCase] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(case.passed for case in self.cases)

    @property
    def worst(self) -> dict[str, float]:
        worst: dict[str, float] = {}
        for case in self.cases:
            for name, err in case.errors.items():
                worst[name] = max(worst.get(name, 0.0), err)
        return worst

    def __str__(self) -> str:
        names = ["y", "dx", "dgamma", "dbeta"]
        lines = [f"{'shape':<20} {'dtype':<8} " + " ".join(f"{n:>9}" for n in names) + "  ok"]
        for case in self.cases:
            errs = " ".join(f"{case.errors.get(n, float('nan')):9.1e}" for n in names)
            lines.append(
                f"{case.shape!s:<20} {case.dtype:<8} {errs}  {'yes' if case.passed else 'NO'}"
            )
        return "\n".join(lines)


def check_kernels(
    forward: Callable[..., tuple[Any, Any]],
    backward_fn: Callable[[Any, Any], tuple[Any, Any, Any]],
    *,
    shapes: Sequence[tuple[int, ...]] = DEFAULT_SHAPES,
    dtypes: Sequence[DTypeLike] = (np.float64, np.float32),
    training: bool = True,
    eps: float = 1e-5,
    axis: int = 1,
    seed: int = 0,
    tolerances: dict[str, float] | None = None,
) -> KernelReport:
    """Check your own BatchNorm kernels against this library on random inputs.

    Parameters
    ----------
    forward : callable
        With ``training=True`` called as ``forward(x, gamma, beta, eps=eps, axis=axis)``; with
        ``training=False`` as ``forward(x, gamma, beta, mean, var, eps=eps, axis=axis)``: the
        signatures of :func:`batchnorm.forward_train` and :func:`batchnorm.forward_eval`.
        Returns ``(y, cache)``; the cache is passed on to ``backward_fn`` untouched.
    backward_fn : callable
        ``backward_fn(dy, cache) -> (dx, dgamma, dbeta)``.
    shapes : sequence of tuple
        Input shapes, default (16, 8), (4, 3, 5), (4, 3, 5, 6) and (2, 3, 2, 3, 4).
    dtypes : sequence of dtype
        The dtypes your kernel is fed. The reference is always this library in float64 on the
        same (rounded) input, so the errors are your kernel's true errors.
    training, eps, axis, seed
        Mode, eps, channel axis, and the seed of the random x, gamma, beta, dy (and mean, var).
    tolerances : dict, optional
        Largest accepted relative error by dtype name; default :data:`DEFAULT_TOLERANCES`.

    Returns
    -------
    KernelReport
        The normwise relative error of y, dx, dgamma and dbeta per case,
        ``max|got - want| / max(max|want|, 1e-8)``; inf where your kernel returned None or an
        array of the wrong shape.

    Notes
    -----
    The errors are normwise, not the elementwise :func:`relative_error`: a float32 kernel
    rounds every output to about 6e-8 of the array's scale, so an entry that is near zero by
    chance (an output near beta, a dx whose terms cancel) has a large elementwise error even
    when the kernel is exact up to rounding. Scaling by the largest reference magnitude makes
    the error a property of the kernel, comparable with the dtype's precision.
    """
    tol = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    rng = np.random.default_rng(seed)
    report = KernelReport()
    for shape in shapes:
        num_channels = shape[axis]
        x64 = rng.standard_normal(shape) * 2.0 + 0.5
        dy64 = rng.standard_normal(shape)
        gamma = rng.uniform(0.5, 1.5, num_channels)
        beta = rng.standard_normal(num_channels)
        mean = rng.standard_normal(num_channels)
        var = rng.uniform(0.5, 2.0, num_channels)
        stats = () if training else (mean, var)
        for dtype in dtypes:
            dt = np.dtype(dtype)
            x, dy = x64.astype(dt), dy64.astype(dt)
            ref_fwd = forward_train if training else forward_eval
            y_ref, cache_ref = ref_fwd(
                x.astype(np.float64), gamma, beta, *stats, eps=eps, axis=axis
            )
            grads_ref = backward(dy.astype(np.float64), cache_ref)
            y, cache = forward(x, gamma, beta, *stats, eps=eps, axis=axis)
            grads = backward_fn(dy, cache)
            errors = {"y": _error_or_inf(y, y_ref)}
            for name, got, want in zip(("dx", "dgamma", "dbeta"), grads, grads_ref, strict=True):
                if want is not None:
                    errors[name] = _error_or_inf(got, want)
            report.cases.append(KernelCase(tuple(shape), dt.name, errors, tol[dt.name]))
    return report


def _error_or_inf(got: Any, want: NDArray[Any]) -> float:
    """_normwise_error, or inf when a user kernel returned None or an array of another shape."""
    if got is None or np.shape(got) != want.shape:
        return float("inf")
    return _normwise_error(got, want)


def _normwise_error(actual: ArrayLike, expected: ArrayLike) -> float:
    """``max|actual - expected| / max(max|expected|, 1e-8)``; inf for NaN or inf; 0 if empty."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.size == 0:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        diff = float(np.max(np.abs(a - e)))
    if not np.isfinite(diff):
        return float("inf")
    return diff / max(float(np.max(np.abs(e))), 1e-8)
