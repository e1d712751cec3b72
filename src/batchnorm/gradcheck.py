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
    """``max|actual - expected| / max(max|actual|, max|expected|)``, or 0.0 when both are 0.

    Scaling by the largest magnitude (not element by element) keeps entries that are near zero
    by construction, such as dx of a channel whose gradients cancel, from dominating.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    _validate.same_shapes(a.shape, e.shape)
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(e))))
    diff = float(np.max(np.abs(a - e)))
    if scale == 0.0:
        return 0.0
    return diff / scale if np.isfinite(diff) else float("inf")


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
        ``{"dx": err}``, plus ``"dgamma"`` and ``"dbeta"`` when gamma and beta are given.

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
        Errors are :func:`relative_error` of y, dx, dgamma and dbeta per case; inf where your
        kernel returned None or an array of the wrong shape.
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
    """relative_error, or inf when a user kernel returned None or an array of another shape."""
    if got is None or np.shape(got) != want.shape:
        return float("inf")
    return relative_error(got, want)
