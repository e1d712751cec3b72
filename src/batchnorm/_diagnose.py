"""Likely causes of a failing conformance output, recognised from the shape of the error.

Each recogniser compares the wrong output with the exact one in the (C, m) view (channels
first, every other axis flattened) and names a cause only when the error has that cause's
exact form: a per-channel constant ratio (eps outside the square root, the unbiased variance),
a per-channel constant or an xhat-proportional dx error (a missing term; the same for the
second derivatives gx and gdy), running statistics that weigh the wrong side. Otherwise the
cause is "" or a hint about the case's conditioning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray


class Case(Protocol):
    """What a diagnosis reads of a conformance case (``batchnorm.conformance.Case``)."""

    @property
    def dtype(self) -> str: ...
    @property
    def recipe(self) -> str: ...
    @property
    def offset(self) -> float: ...
    @property
    def mode(self) -> str: ...
    @property
    def count(self) -> int: ...


class CaseInputs(Protocol):
    """What a diagnosis reads of a case's inputs (``batchnorm.conformance.CaseInputs``)."""

    @property
    def x(self) -> NDArray[Any]: ...
    @property
    def beta(self) -> NDArray[np.float64]: ...
    @property
    def eps(self) -> float: ...
    @property
    def axis(self) -> int: ...
    @property
    def mean(self) -> NDArray[np.float64] | None: ...
    @property
    def var(self) -> NDArray[np.float64] | None: ...
    @property
    def running_mean(self) -> NDArray[np.float64] | None: ...
    @property
    def running_var(self) -> NDArray[np.float64] | None: ...
    @property
    def momentum(self) -> float | None: ...
    @property
    def unbiased(self) -> bool: ...


Matrix = NDArray[np.float64]


def dtype_note(name: str, got: Any, dtype: np.dtype[Any]) -> str:
    """A note when y or dx does not come back in x's dtype (measured as returned)."""
    if name not in ("y", "dx") or got is None or not hasattr(got, "dtype"):
        return ""
    if np.dtype(got.dtype) == dtype:
        return ""
    return (
        f"{name} came back as {np.dtype(got.dtype).name} for {dtype.name} input (this library "
        f"returns the input dtype); its error is measured on the values as returned."
    )


def cause(name: str, got: Any, ref: Mapping[str, Matrix], inp: CaseInputs, case: Case) -> str:
    """A likely cause of the failure of output ``name``, or ""."""
    want = ref[name]
    if got is None:
        return f"the kernel returned None for {name} (expected shape {want.shape})"
    shape = np.shape(got)
    if shape != want.shape:
        return _shape_cause(name, shape, want.shape)
    a = np.asarray(got, dtype=np.float64)
    if not np.isfinite(a).all():
        return (
            f"{name} holds NaN or inf: an overflow in the arithmetic (squares of large values in "
            f"{case.dtype}?) or a division by a variance of 0 (eps missing?)"
        )
    if case.recipe == "constant" and name in ("y", "dx", "gx", "gdy"):
        return (
            f"channel 0 is constant at {case.offset:g}: its exact mean is that value and its "
            "exact y is beta; a mean that is not exactly the constant (rounded partial sums, "
            "a one-pass update) leaves x - mean != 0, which 1 / sqrt(eps) amplifies. Subtract "
            "one of the channel's values before summing (shifted data), as this library does"
        )
    if case.recipe == "huge_values":
        return (
            "the squares of |x| ~ 1e30 overflow float32 (max 3.4e38): accumulate the variance "
            "in float64, or scale the data before squaring"
        )
    try:
        if name == "y":
            found = _y_cause(a, want, inp, case)
        elif name == "dx":
            found = _dx_cause(a, want, ref, inp, case)
        elif name in ("dgamma", "dbeta", "ggamma"):
            found = _ratio_cause(name, a, want, case.count)
        elif name in ("gx", "gdy"):
            found = _second_order_cause(name, a, want, inp, case)
        else:
            found = _running_cause(name, a, want, inp)
    except (FloatingPointError, ValueError, ZeroDivisionError, np.linalg.LinAlgError):
        found = ""
    if case.offset >= 100.0 and case.recipe == "normal" and "E[x^2]" not in found:
        hint = (
            f"the data sit at offset {case.offset:g} from zero, where a variance computed as "
            "E[x^2] - E[x]^2 (or another one-pass sum of squares) cancels: compute it from "
            "x - mean"
        )
        found = f"{found}; {hint}" if found else hint
    return found


def _shape_cause(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    text = f"wrong shape: {name} has shape {got}, expected {want}"
    if len(want) == 1 and int(np.prod(got)) == want[0]:
        return text + " (per-channel results are flat (C,) vectors: ravel them)"
    if int(np.prod(got)) == int(np.prod(want)):
        return text + " (same size: a transposed or moved channel axis, or a missing reshape?)"
    return text


def _per_channel(v: NDArray[Any], axis: int) -> Matrix:
    arr = np.asarray(v, dtype=np.float64)
    return np.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)


def _batch_stats(inp: CaseInputs) -> tuple[Matrix, Matrix, int]:
    x = _per_channel(inp.x, inp.axis)
    return x.mean(axis=1), x.var(axis=1), x.shape[1]


def _y_cause(got: Matrix, want: Matrix, inp: CaseInputs, case: Case) -> str:
    beta = inp.beta[:, None]
    g, r = _per_channel(got, inp.axis) - beta, _per_channel(want, inp.axis) - beta
    ratio = _fit_ratio(g, r)
    if ratio is None:
        shift = (g - r).mean(axis=1, keepdims=True)
        if np.allclose(g - r, shift, rtol=0, atol=1e-3 * max(1e-8, float(np.abs(r).max()))):
            return "y is off by a constant per channel: beta, or the mean subtracted, is wrong"
        return ""
    if case.mode == "eval":
        var = inp.var if inp.var is not None else _batch_stats(inp)[1]
        m = case.count
    else:
        _, var, m = _batch_stats(inp)
    eps = inp.eps
    candidates = {
        "eps is added outside the square root: invstd must be 1 / sqrt(var + eps), "
        "not 1 / (sqrt(var) + eps)": np.sqrt(var + eps) / (np.sqrt(var) + eps),
        "y is normalized with the unbiased variance (divided by m - 1); training normalizes "
        "with the biased one (divide by m)": np.sqrt((var + eps) / (var * m / (m - 1) + eps)),
        "eps is missing: invstd must be 1 / sqrt(var + eps)": np.sqrt((var + eps) / var),
    }
    for text, cand in candidates.items():
        if _matches(ratio, cand):
            return text
    worst = float(np.max(np.abs(ratio - 1.0)))
    return f"y is off by a constant factor per channel (up to {worst:.2g} relative): {_SCALE}"


def _xhat(inp: CaseInputs, case: Case) -> Matrix:
    """xhat per channel, (C, m), of the batch's statistics or an eval case's given ones."""
    if case.mode == "eval":
        mean, var = inp.mean, inp.var
        assert mean is not None and var is not None
    else:
        mean, var, _ = _batch_stats(inp)
    xhat: Matrix = (_per_channel(inp.x, inp.axis) - mean[:, None]) / np.sqrt(var[:, None] + inp.eps)
    return xhat


def _split(diff: Matrix, xhat: Matrix) -> tuple[float, float, float, float]:
    """The size of diff and of its parts: a constant per channel, a multiple of xhat, the rest."""
    const = diff.mean(axis=1, keepdims=True)
    centred = xhat - xhat.mean(axis=1, keepdims=True)
    denom = np.maximum((centred * centred).sum(axis=1, keepdims=True), 1e-300)
    slope = (diff * centred).sum(axis=1, keepdims=True) / denom
    size = float(np.linalg.norm(diff))
    const_part = float(np.linalg.norm(const * np.ones_like(diff)))
    slope_part = float(np.linalg.norm(slope * centred))
    residual = float(np.linalg.norm(diff - const - slope * centred))
    return size, const_part, slope_part, residual


def _dx_cause(
    got: Matrix, want: Matrix, ref: Mapping[str, Matrix], inp: CaseInputs, case: Case
) -> str:
    diff = _per_channel(got, inp.axis) - _per_channel(want, inp.axis)
    size, const_part, slope_part, residual = _split(diff, _xhat(inp, case))
    if size == 0.0:
        return ""
    if residual > 0.05 * size:
        ratio = _fit_ratio(_per_channel(got, inp.axis), _per_channel(want, inp.axis))
        if ratio is not None:
            return f"dx is off by a constant factor per channel: {_SCALE}"
        return ""
    if const_part > 0.9 * size:
        return (
            "dx is off by a constant per channel: the mean term, gamma * invstd * sum(dy) / m, "
            "is missing or wrong"
        )
    if slope_part > 0.9 * size:
        return (
            "the dx error is proportional to xhat: the term gamma * invstd * xhat * "
            "sum(dy * xhat) / m is missing or wrong"
        )
    return (
        "the dx error is a per-channel constant plus a multiple of xhat: both batch-statistics "
        "terms of dx are wrong (mean term sum(dy)/m and xhat term sum(dy * xhat)/m)"
    )


#: What a gx or gdy error of one form points at (docs/math.md, "Second derivatives").
_SECOND_ORDER = {
    ("gdy", "const"): "gdy is off by a constant per channel: the g_dbeta term, or the mean "
    "term of backward applied to g_dx, is missing or wrong",
    ("gdy", "slope"): "the gdy error is proportional to xhat: the g_dgamma * xhat term, or the "
    "xhat term of backward applied to g_dx, is missing or wrong",
    ("gx", "const"): "gx is off by a constant per channel: a mean term of the projections "
    "dyc = P dy or uc = P g_dx is missing (in training gx sums to zero per channel)",
    ("gx", "slope"): "the gx error is proportional to xhat: the term gamma * invstd^2 * "
    "mean(g_dx * dyc) * xhat (x through invstd) is missing or wrong",
}


def _second_order_cause(name: str, got: Matrix, want: Matrix, inp: CaseInputs, case: Case) -> str:
    diff = _per_channel(got, inp.axis) - _per_channel(want, inp.axis)
    size, const_part, slope_part, _ = _split(diff, _xhat(inp, case))
    if size == 0.0:
        return ""
    if const_part > 0.9 * size:
        return _SECOND_ORDER[(name, "const")]
    if slope_part > 0.9 * size:
        return _SECOND_ORDER[(name, "slope")]
    return ""


_SCALE = (
    "the scale gamma / sqrt(var + eps) is wrong, or the variance lost precision (squares summed "
    "in the input's dtype over many values: accumulate in float64)"
)


def _ratio_cause(name: str, got: Matrix, want: Matrix, m: int) -> str:
    ok = np.abs(want) > 1e-6 * float(np.abs(want).max())
    if not ok.any():
        return ""
    ratio = got[ok] / want[ok]
    r = float(np.median(ratio))
    if not np.allclose(ratio, r, rtol=1e-3) or abs(r - 1.0) < 1e-3:
        return ""
    for factor, text in ((1.0 / m, "a mean instead of a sum over the batch"), (-1.0, "a sign")):
        if abs(r - factor) <= 1e-3 * abs(factor):
            return f"{name} is {r:.3g} times the exact one: {text}"
    return f"{name} is {r:.4g} times the exact one on every channel"


def _running_cause(name: str, got: Matrix, want: Matrix, inp: CaseInputs) -> str:
    mom = float(inp.momentum or 0.0)
    batch_mean, batch_var, m = _batch_stats(inp)
    old = inp.running_mean if name == "running_mean" else inp.running_var
    assert old is not None
    side = (
        f"momentum on the wrong side: this library's momentum ({mom:g}) weighs the OLD value, "
        f"running = {mom:g} * running + {1 - mom:g} * batch (PyTorch's momentum weighs the new "
        f"one: pass 1 - momentum)"
    )
    unbiased_var = batch_var * m / (m - 1)
    expected, other = (unbiased_var, batch_var) if inp.unbiased else (batch_var, unbiased_var)
    kind = "the unbiased (m/(m-1))" if inp.unbiased else "the biased"
    wrong_var = f"the running variance must get {kind} batch variance"
    candidates = [((1 - mom) * old + mom * (batch_mean if name == "running_mean" else expected),
                   side)]  # fmt: skip
    if name == "running_var":
        candidates += [
            (mom * old + (1 - mom) * other, wrong_var),
            ((1 - mom) * old + mom * other, f"{side}; {wrong_var}"),
        ]
    for cand, text in candidates:
        if np.allclose(got, cand, rtol=1e-5, atol=0):
            return text
    return ""


def _fit_ratio(g: Matrix, r: Matrix) -> Matrix | None:
    """Per-channel c with g = c * r exactly (to 1e-4), not all 1; None when there is none."""
    denom = (r * r).sum(axis=1)
    if not (denom > 0).all():
        return None
    c: Matrix = (g * r).sum(axis=1) / denom
    scale = max(float(np.abs(r).max()), 1e-300)
    if float(np.abs(g - c[:, None] * r).max()) > 1e-4 * scale * max(1.0, float(np.abs(c).max())):
        return None
    if np.allclose(c, 1.0, rtol=0, atol=1e-6):
        return None
    return c


def _matches(ratio: Matrix, candidate: Matrix) -> bool:
    """Whether two per-channel ratios agree to a tenth of their distance from 1."""
    gap = np.abs(candidate - 1.0)
    return bool(np.all(np.abs(ratio - candidate) <= 0.1 * gap + 1e-6)) and bool(np.any(gap > 1e-6))
