"""Gradient checks: numerical gradients, relative errors, and an oracle for your own kernels.

Three levels, from the most general to the most specific:

* :func:`numerical_gradient` - central differences of ``sum(f(x) * dy)`` for any f.
* :func:`check_gradients` - this library's backward against finite differences.
* :func:`check_kernels` - *your* forward/backward pair (NumPy, or a CUDA/Triton/C kernel
  wrapped to take and return NumPy arrays) against this library on the named cases of
  :mod:`batchnorm.conformance`, with tolerances from a stated error model.

Examples
--------
>>> import batchnorm as bn
>>> report = bn.gradcheck.check_kernels(bn.forward_train, bn.backward, shapes=[(4, 3)])
>>> report.passed
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from batchnorm import _kernel_run, _validate
from batchnorm.conformance import Case, CaseResult
from batchnorm.functional import backward, forward_eval, forward_train

__all__ = [
    "DEFAULT_TOLERANCES",
    "KernelReport",
    "check_gradients",
    "check_kernels",
    "numerical_gradient",
    "relative_error",
]

#: Flat tolerances by dtype, kept for callers that pass them as ``tolerances=``;
#: :func:`check_kernels` itself uses the per-case tolerances of :mod:`batchnorm.conformance`.
DEFAULT_TOLERANCES: dict[str, float] = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2}

_DY_SALT = 0x6479  # "dy"

#: The shapes of the random cases before the named ones existed (pass ``shapes=`` for them).
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
        The weights of the outputs (the upstream gradient), of f(x)'s shape: a dy that would
        only broadcast against f(x) is a ValueError.
    h : float, default 1e-5
        The step, a finite float > 0. The truncation error is O(h^2) and the rounding error
        O(eps / h); 1e-5 is near the best trade-off in float64.

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
    _validate.gradient_function(f)
    step = _validate.difference_step(h)
    point = np.array(x, dtype=np.float64, order="C", copy=True)
    weights = np.asarray(dy, dtype=np.float64)
    grad = np.empty_like(point)
    flat, out = point.reshape(-1), grad.reshape(-1)

    def weighted_sum() -> float:
        value = np.asarray(f(point), dtype=np.float64)
        _validate.output_weights(value.shape, weights.shape)
        return float(np.sum(value * weights))

    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + step
        plus = weighted_sum()
        flat[i] = orig - step
        minus = weighted_sum()
        flat[i] = orig
        out[i] = (plus - minus) / (2.0 * step)
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
    """The errors of one case of :func:`check_kernels`.

    ``errors`` maps each output (y, dx, dgamma, dbeta, running_mean, running_var) to its
    normwise error; ``tolerances`` to its tolerance (``tolerance`` is y's); ``result`` holds the
    full :class:`~batchnorm.conformance.CaseResult` (worst index, likely cause).
    """

    shape: tuple[int, ...]
    dtype: str
    errors: dict[str, float]
    tolerance: float
    name: str = ""
    tolerances: dict[str, float] = field(default_factory=dict)
    result: CaseResult | None = None

    @property
    def passed(self) -> bool:
        return all(err <= self.tolerances.get(n, self.tolerance) for n, err in self.errors.items())


@dataclass(frozen=True)
class KernelReport:
    """Result of :func:`check_kernels`: one :class:`KernelCase` per case.

    ``str(report)`` is a table of errors, then each failing case explained (output, error,
    tolerance, worst index, likely cause); ``report.passed`` is True when every error is within
    its tolerance; ``report.worst`` maps each output name to its largest error;
    ``report.failures`` lists the failing cases.
    """

    cases: list[KernelCase] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(case.passed for case in self.cases)

    @property
    def failures(self) -> list[KernelCase]:
        return [case for case in self.cases if not case.passed]

    @property
    def worst(self) -> dict[str, float]:
        worst: dict[str, float] = {}
        for case in self.cases:
            for name, err in case.errors.items():
                worst[name] = max(worst.get(name, 0.0), err)
        return worst

    def __str__(self) -> str:
        names = ["y", "dx", "dgamma", "dbeta"]
        lines = [
            f"{'case':<30} {'dtype':<8} "
            + " ".join(f"{n:>9}" for n in names)
            + f" {'err/tol':>8}  ok"
        ]
        for case in self.cases:
            errs = " ".join(f"{case.errors.get(n, float('nan')):9.1e}" for n in names)
            ratio = max(
                (e / max(case.tolerances.get(n, case.tolerance), 1e-300))
                for n, e in case.errors.items()
            ) if case.errors else 0.0  # fmt: skip
            label = case.name or str(case.shape)
            lines.append(
                f"{label:<30} {case.dtype:<8} {errs} {ratio:8.2g}  {'yes' if case.passed else 'NO'}"
            )
        failed = self.failures
        if failed:
            lines.append("")
            lines.append(f"{len(failed)} of {len(self.cases)} cases failed:")
            for case in failed:
                if case.result is not None:
                    lines.append(str(case.result))
                else:
                    bad = [n for n, e in case.errors.items() if e > case.tolerance]
                    lines.append(f"{case.name}: {', '.join(bad)} above {case.tolerance:.2e}")
        lines.extend(f"diagnosis: {text}" for text in _trends(self.cases))
        return "\n".join(lines)


def check_kernels(
    forward: Callable[..., tuple[Any, Any]],
    backward_fn: Callable[[Any, Any], tuple[Any, Any, Any]],
    *,
    shapes: Sequence[tuple[int, ...]] | None = None,
    dtypes: Sequence[DTypeLike] = (np.float64, np.float32),
    training: bool = True,
    eps: float = 1e-5,
    axis: int = 1,
    seed: int = 0,
    tolerances: dict[str, float] | None = None,
    cases: Iterable[Case | str] | None = None,
    offset: float | Iterable[float] | None = None,
    running: Callable[..., tuple[Any, Any]] | None = None,
) -> KernelReport:
    """Check your own BatchNorm kernels against this library on the conformance cases.

    Parameters
    ----------
    forward : callable
        With ``training=True`` called as ``forward(x, gamma, beta, eps=eps, axis=axis)``; with
        ``training=False`` as ``forward(x, gamma, beta, mean, var, eps=eps, axis=axis)``: the
        signatures of :func:`batchnorm.forward_train` and :func:`batchnorm.forward_eval`.
        Returns ``(y, cache)``; the cache is passed on to ``backward_fn`` untouched. x comes in
        the case's dtype and layout (channels-last memory and strided views included); gamma,
        beta, mean and var are float64 (C,) with values exact in every dtype.
    backward_fn : callable
        ``backward_fn(dy, cache) -> (dx, dgamma, dbeta)``.
    shapes : sequence of tuple, optional
        Instead of the named cases, random N(0.5, std 0.5-2) inputs of these shapes (the
        behaviour before the named cases existed, with the tolerances of the error model).
    dtypes : sequence of dtype, default (float64, float32)
        The dtypes your kernel is fed: float64, float32, float16, bfloat16 (``ml_dtypes``).
        The reference is always this library in float64 on the same (rounded) input.
    training : bool, default True
        Training cases (batch statistics); False runs the eval cases (given statistics).
    eps, axis, seed
        eps, the channel axis (1, or -1 for channels-last arrays) and the seed of the data.
    tolerances : dict, optional
        A fixed largest accepted error by dtype name (for every output), replacing the error
        model's per-case tolerances for that dtype.
    cases : iterable of Case or str, optional
        Exactly these :func:`batchnorm.conformance.cases` (or their names); ``dtypes`` is then
        ignored.
    offset : float or iterable of float, optional
        Only the offset cases, at these offsets (data N(offset, std 0.5-2) per channel).
    running : callable, optional
        Your running-statistic update, also checked (on the "running" cases) when given:
        ``running(running_mean, running_var, x, momentum=..., unbiased=..., axis=...) ->
        (new_mean, new_var)`` with momentum in this library's convention, the weight of the
        OLD value: ``new = momentum * old + (1 - momentum) * batch``. Wrap a PyTorch-style
        update (momentum weighs the new value) as ``update(..., momentum=1 - momentum)``.

    Returns
    -------
    KernelReport
        The normwise relative error of y, dx, dgamma, dbeta (and running_mean, running_var)
        per case, ``max|got - want| / max(max|want|, 1e-8)``, with its tolerance; for a
        failure the worst index and a likely cause. A kernel that raises, returns None or an
        array of the wrong shape fails its case with that said; a kernel that is not a
        function at all is a TypeError before any case runs.

    Notes
    -----
    The default cases (docs/conformance.md) are offsets 0, 1e2, 1e4 (and 1e6 in float64),
    variances around eps, a constant channel, m = 2, one sample with spatial dims, channels-last
    memory, a strided view, 512 channels and a 5-D input. The tolerance of each output is
    ``G * u * (1 + max|mean|/std) * S``: unit roundoff times a growth factor times the case's
    conditioning (:mod:`batchnorm.conformance`), so that a correct two-pass float32 kernel
    passes and eps outside the square root, E[x^2] - E[x]^2, the unbiased variance in training,
    a missing term of dx and momentum on the wrong side each fail in float32 alone.

    The errors are normwise, not the elementwise :func:`relative_error`: a float32 kernel
    rounds every output to about 6e-8 of the array's scale, so an entry that is near zero by
    chance has a large elementwise error even when the kernel is exact up to rounding.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> report = bn.gradcheck.check_kernels(bn.forward_train, bn.backward, dtypes=[np.float32])
    >>> report.passed, len(report.cases)
    (True, 12)
    """
    _validate.kernel_functions(forward=forward, backward_fn=backward_fn, running=running)
    chosen = _kernel_run.chosen_cases(shapes, dtypes, training, cases, offset, running is not None)
    report = KernelReport()
    for case in chosen:
        inp = case.inputs(axis=axis, eps=eps, seed=seed)
        outputs, failure = _kernel_run.run_kernels(case, inp, forward, backward_fn, running)
        result = case.check(outputs, inp)
        tol = {out.name: out.tolerance for out in result.outputs}
        if tolerances and case.dtype in tolerances:
            fixed = float(tolerances[case.dtype])
            tol = dict.fromkeys(tol, fixed)
            outs = tuple(replace(o, tolerance=fixed) for o in result.outputs)
            result = replace(result, outputs=outs)
        if failure:
            outs = tuple(
                replace(o, cause=failure) if outputs.get(o.name) is None else o
                for o in result.outputs
            )
            result = replace(result, outputs=outs)
        report.cases.append(
            KernelCase(case.shape, case.dtype, result.errors, tol["y"], case.name, tol, result)
        )
    return report


def _trends(cases: Sequence[KernelCase]) -> list[str]:
    """Report-level causes: how y's error grows with the offset of the data, per dtype."""
    out = []
    for dtype in sorted({c.dtype for c in cases}):
        errs = {}
        for c in cases:
            if c.dtype == dtype and c.name.startswith("offset_") and c.result is not None:
                errs[c.result.case.offset] = c.errors.get("y", 0.0)
        lo, hi = errs.get(1e2), errs.get(1e4)
        if lo and hi and np.isfinite(hi) and lo > 0 and hi / lo > 1e3:
            out.append(
                f"{dtype}: y's error grows {hi / lo:.2g} times from offset 1e2 to 1e4, like "
                "offset^2: the variance is computed as E[x^2] - E[x]^2 (or another one-pass "
                "formula); compute it from x - mean"
            )
    return out
