"""Named conformance cases for BatchNorm kernels, with tolerances from a stated error model.

A :class:`Case` is a shape, a dtype, a memory layout, a data recipe and a mode (training,
eval, or a running-statistic update). :meth:`Case.inputs` builds its arrays (seeded),
:meth:`Case.reference` computes the exact answers with this library's float64 kernels, and
:meth:`Case.check` measures a kernel's outputs against them: the normwise error of each output,
its tolerance, the index of the worst element and, where one is recognisable, the likely cause.
:func:`batchnorm.gradcheck.check_kernels` is the front of these cases for a forward/backward
pair; the cases are public so that you can parametrize your own tests with them::

    @pytest.mark.parametrize("case", bn.conformance.cases(dtypes=["float32"]), ids=str)
    def test_my_kernel(case):
        inp = case.inputs()
        y, cache = my_forward(inp.x, inp.gamma, inp.beta, eps=inp.eps, axis=inp.axis)
        ...
        assert case.check({"y": y, "dx": dx, ...}, inp).passed

The error model (docs/conformance.md) gives each output the tolerance::

    tol = G * u * (1 + kappa) * S                            (float64, float32)
    tol = (G * (u + u32 * kappa) + u * kappa) * S            (float16, bfloat16)

with u the unit roundoff of the input dtype, G a growth factor calibrated on correct kernels,
``kappa = max_c |mean_c| / sqrt(var_c + eps)`` the cost of subtracting a channel's mean from
data that sit far from zero (a constant channel adds none), and S the condition number of the
output's last cancellation: 1 for y, the size of dx's terms over dx's own, and the sums' behind
dgamma and dbeta (times log2(m), the depth of a summation tree). 16-bit data are computed in
float32 (u32 = 2^-24) with the mean allowed one rounding to x's dtype.

``cases(second_order=True)`` lists the cases of second derivatives: their inputs add the
weights g_dx, g_dgamma, g_dbeta and their reference gx, ggamma, gdy
(:func:`batchnorm.functional.double_backward`), with S the closed form evaluated in absolute
values over the output's size.

Examples
--------
>>> import batchnorm as bn
>>> case = bn.conformance.cases(names=["offset_1e2-float32"])[0]
>>> inp = case.inputs()
>>> y, cache = bn.forward_train(inp.x, inp.gamma, inp.beta, eps=inp.eps, axis=inp.axis)
>>> dx, dgamma, dbeta = bn.backward(inp.dy, cache)
>>> case.check({"y": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}, inp).passed
True
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from batchnorm import _catalogue, _diagnose, _second_order, _validate
from batchnorm.functional import backward, forward_eval, forward_train

__all__ = [
    "GROWTH",
    "Case",
    "CaseInputs",
    "CaseResult",
    "OutputResult",
    "cases",
    "unit_roundoff",
]

Vector = NDArray[np.float64]

#: The growth factor G of the error model, calibrated in docs/conformance.md: correct float32
#: and float16 kernels stay below a quarter of their tolerances, every seeded bug exceeds it.
GROWTH = 16.0

_UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}
LAYOUTS = ("contiguous", "strided_channels_last", "non_contiguous")
RECIPES = ("normal", "tiny_var", "constant", "wide", "huge_values")


def unit_roundoff(dtype: Any) -> float:
    """The unit roundoff of a float dtype (2^-53, 2^-24, 2^-11, 2^-8 for bfloat16).

    Examples
    --------
    >>> from batchnorm.conformance import unit_roundoff
    >>> unit_roundoff("float32") == 2.0**-24
    True
    """
    return _UNIT_ROUNDOFF[_dtype_name(dtype)]


@dataclass(frozen=True)
class CaseInputs:
    """The arrays of one case: what a kernel is fed (x, dy in the case dtype; the rest float64).

    ``mean``/``var`` are the statistics of an eval case (None in training);
    ``running_mean``/``running_var`` the running statistics before a running-statistic update,
    with ``momentum`` the weight of the OLD value (this library's convention:
    ``running = momentum * running + (1 - momentum) * batch``) and ``unbiased`` whether the
    running variance gets m / (m - 1) times the batch variance. ``g_dx`` (x's shape, dtype
    and layout), ``g_dgamma`` and ``g_dbeta`` are the weights of dx, dgamma and dbeta of a
    second-order case (None otherwise), as :func:`batchnorm.functional.double_backward`
    takes them.
    """

    x: NDArray[Any]
    gamma: Vector
    beta: Vector
    dy: NDArray[Any]
    eps: float
    axis: int
    mean: Vector | None = None
    var: Vector | None = None
    running_mean: Vector | None = None
    running_var: Vector | None = None
    momentum: float | None = None
    unbiased: bool = True
    g_dx: NDArray[Any] | None = None
    g_dgamma: Vector | None = None
    g_dbeta: Vector | None = None


@dataclass(frozen=True)
class OutputResult:
    """The verdict on one output of one case.

    ``error`` is normwise, ``max|got - want| / max(max|want|, 1e-8)``; inf for None, a wrong
    shape or non-finite values. ``worst_index`` is where ``|got - want|`` is largest (None when
    it cannot be said); ``cause`` a likely cause when one is recognisable, else "".
    """

    name: str
    error: float
    tolerance: float
    worst_index: tuple[int, ...] | None = None
    cause: str = ""

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance


@dataclass(frozen=True)
class CaseResult:
    """Every output's verdict on one case; ``str()`` explains the failures."""

    case: Case
    outputs: tuple[OutputResult, ...]
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return all(out.passed for out in self.outputs)

    @property
    def errors(self) -> dict[str, float]:
        return {out.name: out.error for out in self.outputs}

    @property
    def failures(self) -> list[OutputResult]:
        return [out for out in self.outputs if not out.passed]

    def __str__(self) -> str:
        lines = [f"{self.case.name}: {'passed' if self.passed else 'FAILED'} ({self.case.about})"]
        for out in self.outputs:
            verdict = "ok" if out.passed else "FAIL"
            where = "" if out.passed or out.worst_index is None else f" at {out.worst_index}"
            lines.append(
                f"  {out.name:<13} error {out.error:9.2e}  tolerance {out.tolerance:9.2e}  "
                f"{verdict}{where}"
            )
            if out.cause and not out.passed:
                lines.append(f"      likely cause: {out.cause}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass(frozen=True)
class Case:
    """One named conformance case: shape, dtype, layout, data recipe and mode.

    Attributes
    ----------
    name : str
        Unique, e.g. ``"offset_1e4-float32"``.
    shape : tuple of int
        (N, C, *spatial) with the channels at axis 1 (:meth:`inputs` can move them last).
    dtype : str
        "float64", "float32", "float16" or "bfloat16" (needs ``ml_dtypes``).
    recipe : str
        "normal" (per channel offset + std * N(0, 1), std in [0.5, 2]), "tiny_var" (variances
        1e-7 to 1e-4 around eps), "constant" (channel 0 constant at ``offset``), "wide"
        (uniform over +-offset, for float16 near overflow), "huge_values" (std offset / 10).
    offset : float
        The data's distance from zero (the recipe says how it is used).
    layout : str
        "contiguous", "strided_channels_last" (x's memory is channels-last behind the
        logical (N, C, ...) shape) or "non_contiguous" (a view with a stride of 2).
    mode : str
        "train", "eval" or "running" (a running-statistic update in training).
    momentum, unbiased
        The running-statistic update of a "running" case, in this library's convention.
    default : bool
        Whether :func:`batchnorm.gradcheck.check_kernels` runs the case by default.
    second_order : bool
        A case of second derivatives: its inputs add the weights ``g_dx``, ``g_dgamma``,
        ``g_dbeta`` and its reference ``gx``, ``ggamma``, ``gdy``, the gradients of
        ``<g_dx, dx> + <g_dgamma, dgamma> + <g_dbeta, dbeta>`` with respect to x, gamma and
        dy (:func:`batchnorm.functional.double_backward`).
    about : str
        What the case is for.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    recipe: str = "normal"
    offset: float = 0.0
    layout: str = "contiguous"
    mode: str = "train"
    momentum: float | None = None
    unbiased: bool = True
    default: bool = True
    about: str = ""
    second_order: bool = False

    def __str__(self) -> str:
        return self.name

    @property
    def training(self) -> bool:
        return self.mode != "eval"

    @property
    def count(self) -> int:
        """m, the number of values per channel."""
        return math.prod(self.shape) // self.shape[1]

    def with_dtype(self, dtype: Any) -> Case:
        """The same case for another dtype (the name's dtype suffix changes with it)."""
        name = _dtype_name(dtype)
        return replace(self, dtype=name, name=f"{self.name.rsplit('-', 1)[0]}-{name}")

    def inputs(self, *, axis: int = 1, eps: float = 1e-5, seed: int = 0) -> CaseInputs:
        """Build the case's arrays, deterministically from its name and ``seed``.

        ``axis=1`` gives x as (N, C, *spatial); ``axis=-1`` moves the channels last (N, ...,
        C). gamma and beta are exact in every dtype, the statistics in float32 and in x's
        dtype, so a kernel that casts them to its own dtype loses nothing.
        """
        _validate.case_axis(axis)
        rng = np.random.default_rng([zlib.crc32(self.name.encode()), seed])
        c = self.shape[1]
        x64 = _catalogue.draw(self.recipe, self.shape, self.offset, rng)
        dy64 = rng.standard_normal(self.shape)
        gamma = rng.integers(32, 97, c) / 64.0  # in [0.5, 1.5], exact in bfloat16
        beta = rng.integers(-32, 33, c) / 16.0
        dt = _catalogue.numpy_dtype(self.dtype)
        x, dy = x64.astype(dt), dy64.astype(dt)
        xr = x.astype(np.float64)
        red = tuple(i for i in range(x.ndim) if i != 1)
        mean = var = run_mean = run_var = None
        if self.mode == "eval":
            mean = _catalogue.exact(
                xr.mean(axis=red) + rng.uniform(-0.3, 0.3, c) * xr.std(axis=red), dt
            )
            var = _catalogue.exact(xr.var(axis=red) * rng.uniform(0.8, 1.25, c), dt)
        elif self.mode == "running":
            # Far from the batch's statistics, so the side momentum weights shows.
            run_mean = _catalogue.exact(
                xr.mean(axis=red) + rng.uniform(1.0, 2.0, c) * xr.std(axis=red), dt
            )
            run_var = _catalogue.exact(xr.var(axis=red) * rng.uniform(2.0, 4.0, c), dt)
        g_dx = g_dgamma = g_dbeta = None
        if self.second_order:
            g_dx, g_dgamma, g_dbeta = _second_order.weights(self.shape, dt, rng)
        if axis == -1:
            x, dy = np.moveaxis(x, 1, -1), np.moveaxis(dy, 1, -1)
            g_dx = None if g_dx is None else np.moveaxis(g_dx, 1, -1)
        x = _catalogue.lay_out(np.ascontiguousarray(x), self.layout)
        dy = np.ascontiguousarray(dy)
        if g_dx is not None:
            g_dx = _catalogue.lay_out(np.ascontiguousarray(g_dx), self.layout)
        return CaseInputs(
            x, gamma, beta, dy, eps, axis, mean, var, run_mean, run_var, self.momentum,
            self.unbiased, g_dx, g_dgamma, g_dbeta,
        )  # fmt: skip

    def reference(self, inputs: CaseInputs) -> dict[str, NDArray[Any]]:
        """The exact answers: this library's float64 kernels on the case's (rounded) inputs.

        Keys: y, dx, dgamma, dbeta, and running_mean, running_var for a "running" case, and
        gx, ggamma, gdy for a second-order one.
        """
        x = np.asarray(inputs.x, dtype=np.float64)
        dy = np.asarray(inputs.dy, dtype=np.float64)
        kw: dict[str, Any] = {"eps": inputs.eps, "axis": inputs.axis}
        if self.mode == "eval":
            assert inputs.mean is not None and inputs.var is not None
            y, cache = forward_eval(x, inputs.gamma, inputs.beta, inputs.mean, inputs.var, **kw)
        else:
            y, cache = forward_train(x, inputs.gamma, inputs.beta, **kw)
        dx, dgamma, dbeta = backward(dy, cache)
        assert dgamma is not None and dbeta is not None
        ref: dict[str, NDArray[Any]] = {"y": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}
        if inputs.g_dx is not None:
            assert inputs.g_dgamma is not None and inputs.g_dbeta is not None
            ref |= _second_order.reference(inputs.g_dx, inputs.g_dgamma, inputs.g_dbeta, dy, cache)
        if self.mode == "running":
            assert inputs.running_mean is not None and inputs.running_var is not None
            mom, m = float(inputs.momentum or 0.0), cache.count
            batch_var = cache.var * (m / (m - 1) if inputs.unbiased else 1.0)
            ref["running_mean"] = mom * inputs.running_mean + (1 - mom) * cache.mean
            ref["running_var"] = mom * inputs.running_var + (1 - mom) * batch_var
        return ref

    def tolerances(
        self, inputs: CaseInputs, reference: Mapping[str, NDArray[Any]]
    ) -> dict[str, float]:
        """Each output's tolerance, ``G * u * (1 + kappa) * S`` or its 16-bit form."""
        x = np.moveaxis(np.asarray(inputs.x, dtype=np.float64), inputs.axis, 0).reshape(
            self.shape[1], -1
        )
        mean, var = x.mean(axis=1), x.var(axis=1)
        if self.mode == "eval":
            assert inputs.mean is not None and inputs.var is not None
            mean, var = inputs.mean, np.maximum(var, inputs.var)
        # A channel whose values are all equal has exact output beta and its mean is one of
        # its values: it needs no cancellation (docs/conformance.md), so it adds no kappa.
        spread = np.ptp(x, axis=1) > 0
        kappa = float(np.max(np.where(spread, np.abs(mean) / np.sqrt(var + inputs.eps), 0.0)))
        u = unit_roundoff(self.dtype)
        if u > _UNIT_ROUNDOFF["float32"]:
            # 16-bit: arithmetic in float32 (u_w), the mean stored once in x's dtype (u * kappa).
            base = GROWTH * (u + _UNIT_ROUNDOFF["float32"] * kappa) + u * kappa
        else:
            base = GROWTH * u * (1.0 + kappa)
        dy = np.moveaxis(np.asarray(inputs.dy, dtype=np.float64), inputs.axis, 0)
        dy = dy.reshape(self.shape[1], -1)
        xhat = (x - mean[:, None]) / np.sqrt(var[:, None] + inputs.eps)
        # dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)): its terms' size over
        # its own is the condition number of that cancellation (large for m = 2, where dx ~ 0).
        parts = np.abs(dy)
        if self.training:
            parts = parts + np.abs(dy.mean(axis=1, keepdims=True))
            parts = parts + np.abs(xhat * (dy * xhat).mean(axis=1, keepdims=True))
        gi = np.abs(inputs.gamma)[:, None] / np.sqrt(var[:, None] + inputs.eps)
        dx_scale = max(float(np.max(np.abs(reference["dx"]))), 1e-8)
        cond_dx = max(1.0, float(np.max(gi * parts)) / dx_scale)
        tol = {"y": base, "dx": base * cond_dx}
        for name, terms in (("dgamma", np.abs(dy * xhat)), ("dbeta", np.abs(dy))):
            scale = max(float(np.max(np.abs(reference[name]))), 1e-8)
            # The sum's condition number, and log2(m) for a summation tree's depth.
            cond = float(np.max(terms.sum(axis=1))) / scale * max(1.0, math.log2(self.count))
            tol[name] = base * cond
        if self.mode == "running":
            tol["running_mean"] = tol["running_var"] = base
        if inputs.g_dx is not None:  # second derivatives: the same base, their own S
            conds = _second_order.conditions(self.training, inputs, reference)
            tol |= {name: base * cond for name, cond in conds.items()}
        return tol

    def check(self, outputs: Mapping[str, Any], inputs: CaseInputs | None = None) -> CaseResult:
        """Measure a kernel's outputs against the reference: a :class:`CaseResult`.

        ``outputs`` maps names (y, dx, dgamma, dbeta, running_mean, running_var) to arrays;
        names left out are not checked, a None value fails. ``inputs`` must be the ones the
        outputs were computed from (default: ``self.inputs()``).
        """
        inp = self.inputs() if inputs is None else inputs
        ref = self.reference(inp)
        tol = self.tolerances(inp, ref)
        results: list[OutputResult] = []
        notes: list[str] = []
        for name, got in outputs.items():
            _validate.output_name(name, ref)
            error, index = normwise_error(got, ref[name])
            cause = _diagnose.cause(name, got, ref, inp, self) if error > tol[name] else ""
            results.append(OutputResult(name, error, tol[name], index, cause))
            note = _diagnose.dtype_note(name, got, inp.x.dtype)
            if note:
                notes.append(note)
        return CaseResult(self, tuple(results), tuple(notes))


def normwise_error(got: Any, want: NDArray[Any]) -> tuple[float, tuple[int, ...] | None]:
    """``max|got - want| / max(max|want|, 1e-8)`` and the index of the largest difference.

    inf (index None) when got is None or has another shape; inf at the first non-finite
    element when got holds NaN or inf; 0.0 for empty arrays.
    """
    if got is None or np.shape(got) != want.shape:
        return float("inf"), None
    a = np.asarray(got, dtype=np.float64)
    if a.size == 0:
        return 0.0, None
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - want)
    if not np.isfinite(diff).all():
        bad = np.unravel_index(int(np.argmax(~np.isfinite(diff))), a.shape)
        return float("inf"), tuple(int(i) for i in bad)
    worst = np.unravel_index(int(np.argmax(diff)), a.shape)
    scale = max(float(np.max(np.abs(want))), 1e-8)
    return float(diff[worst]) / scale, tuple(int(i) for i in worst)


def cases(
    *,
    dtypes: Iterable[Any] | None = None,
    modes: Iterable[str] | None = None,
    names: Iterable[str] | None = None,
    extended: bool = False,
    second_order: bool = False,
) -> list[Case]:
    """The catalogue of conformance cases.

    Parameters
    ----------
    dtypes : iterable of dtype, optional
        Keep the cases of these dtypes; default float64, float32, float16, and bfloat16 when
        ``ml_dtypes`` is installed.
    modes : iterable of str, optional
        Keep these modes ("train", "eval", "running"); default all.
    names : iterable of str, optional
        Exactly these cases, in this order (extended ones included).
    extended : bool, default False
        Add the slow and the beyond-the-textbook cases: offsets 1e1 to 1e6 (1e8 in float64),
        a constant channel at 1e10 (1e15 in float64, channels-last memory), float32 data
        whose squares overflow (|x| ~ 1e30) and the 880,801-row batch.
    second_order : bool, default False
        The cases of second derivatives instead (``double_backward_*``, float64 and float32,
        training and eval): see :attr:`Case.second_order`.

    Returns
    -------
    list of Case

    Examples
    --------
    >>> import batchnorm as bn
    >>> [c.name for c in bn.conformance.cases(dtypes=["float32"])][:3]
    ['offset_0-float32', 'offset_1e2-float32', 'offset_1e4-float32']
    """
    catalogue = [Case(**spec) for spec in _catalogue.specs()]
    if names is not None:
        by_name = {c.name: c for c in catalogue}
        return [by_name[_validate.case_name(n, by_name)] for n in names]
    wanted = None if dtypes is None else {_dtype_name(d) for d in dtypes}
    if wanted is None:
        wanted = {"float64", "float32", "float16"} | (
            {"bfloat16"} if _catalogue.has_bfloat16() else set()
        )
    keep_modes = None if modes is None else set(modes)
    order = list(_UNIT_ROUNDOFF) if dtypes is None else [_dtype_name(d) for d in dtypes]
    return sorted(
        (
            c
            for c in catalogue
            if c.dtype in wanted
            and c.second_order == second_order
            and (keep_modes is None or c.mode in keep_modes)
            and (extended or c.default)
        ),
        key=lambda c: order.index(c.dtype),
    )


def _dtype_name(dtype: Any) -> str:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    return _validate.case_dtype(name, tuple(_UNIT_ROUNDOFF))
