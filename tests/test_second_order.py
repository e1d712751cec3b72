"""The second-order conformance cases (functional.double_backward): their inputs, reference,
tolerances and diagnostics.

The tolerances are pinned in both directions: a correct float32 kernel (this library's
double_backward, and the closed form evaluated in float32) passes every default case, and the
same closed form with one term left out fails in float32 alone.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from helpers import load_module

import batchnorm as bn
from batchnorm import functional as F
from batchnorm.conformance import cases

SECOND = cases(second_order=True)
CALIBRATE = Path(__file__).resolve().parents[1] / "benchmarks" / "calibrate_double_backward.py"


cal = load_module("calibrate_double_backward", CALIBRATE)
closed_form, ours = cal.closed_form, cal.ours


def test_the_second_order_catalogue():
    names = {c.name for c in SECOND}
    for dt in ("float32", "float64"):
        for base in ("offset_0", "offset_1e2", "offset_1e4", "eval_offset_0", "eval_offset_1e2"):
            assert f"double_backward_{base}-{dt}" in names
    assert {c.dtype for c in SECOND} == {"float32", "float64"}
    assert {c.mode for c in SECOND} == {"train", "eval"}
    assert all(c.second_order for c in SECOND)
    assert any(len(c.shape) == 4 for c in SECOND) and any(len(c.shape) == 5 for c in SECOND)
    # Kept apart: first-order users (check_kernels, parametrized suites) never see them.
    assert not any(c.second_order for c in cases(extended=True))
    extended = {c.name for c in cases(second_order=True, extended=True)}
    assert extended - names == {"double_backward_huge_m-float32"}
    (named,) = cases(names=["double_backward_offset_1e2-float32"])
    assert named.second_order


@pytest.mark.parametrize("axis", [1, -1])
def test_inputs_and_reference(axis):
    (case,) = cases(names=["double_backward_channels_last_memory-float32"])
    inp = case.inputs(axis=axis)
    assert inp.g_dx.dtype == np.float32 and inp.g_dx.shape == inp.x.shape
    assert inp.g_dgamma.shape == inp.g_dbeta.shape == (case.shape[1],)
    for w in (inp.g_dgamma, inp.g_dbeta):  # exact in every dtype: multiples of 1/64 in [-1, 1]
        assert np.all(np.abs(w) <= 1) and np.all(w * 64 == np.round(w * 64))
    ref = case.reference(inp)
    assert {"y", "dx", "dgamma", "dbeta", "gx", "ggamma", "gdy"} <= set(ref)
    x64, dy64, u64 = (np.asarray(a, dtype=np.float64) for a in (inp.x, inp.dy, inp.g_dx))
    _, cache = bn.forward_train(x64, inp.gamma, inp.beta, eps=inp.eps, axis=axis)
    want = F.double_backward(u64, inp.g_dgamma, inp.g_dbeta, dy64, cache)
    for name, w in zip(("gx", "ggamma", "gdy"), want, strict=True):
        np.testing.assert_array_equal(ref[name], w)
    # A first-order case has no weights and no second-order answers.
    (plain,) = cases(names=["offset_0-float32"])
    first = plain.inputs()
    assert first.g_dx is None and "gx" not in plain.reference(first)


@pytest.mark.parametrize("case", [c for c in SECOND if c.dtype == "float32"], ids=str)
def test_correct_float32_kernels_pass(case):
    inp = case.inputs()
    for kernel in (ours, closed_form):
        result = case.check(kernel(case, inp), inp)
        assert result.passed, str(result)
        # Well inside: a tenth of the tolerance at most (measured 0.045 at most).
        assert max(o.error / o.tolerance for o in result.outputs) < 0.1


@pytest.mark.parametrize(
    "name",
    ["double_backward_offset_0-float32", "double_backward_offset_1e2-float32",
     "double_backward_5d-float32", "double_backward_constant_channel-float32"],
)  # fmt: skip
@pytest.mark.parametrize(
    "drop, output, cause",
    [
        ("gx_xhat", "gx", "proportional to xhat: the term gamma * invstd^2 * mean(g_dx * dyc)"),
        ("gdy_xhat", "gdy", "the g_dgamma * xhat term"),
        ("uc_mean", "gdy", "off by a constant per channel"),
        ("ggamma_invstd", "ggamma", ""),
    ],
)
def test_a_term_left_out_fails_in_float32(name, drop, output, cause):
    assert drop in cal.DROPS.values()
    (case,) = cases(names=[name])
    inp = case.inputs()
    result = case.check(closed_form(case, inp, drop), inp)
    assert not result.passed
    assert output in {o.name for o in result.failures}
    (failed,) = [o for o in result.failures if o.name == output]
    # ggamma's tolerance is a sum's (times log2(m)): leaving out invstd (0.5 to 2) fails by less.
    assert failed.error > (1 if output == "ggamma" else 10) * failed.tolerance
    if case.recipe == "normal":
        assert cause in failed.cause


def test_eval_cases_catch_a_term_left_out():
    (case,) = cases(names=["double_backward_eval_offset_1e2-float32"])
    inp = case.inputs()
    result = case.check(closed_form(case, inp, "gdy_xhat"), inp)
    assert [o.name for o in result.failures] == ["gdy"]


def test_tolerances_follow_the_error_model():
    # The same base G * u * (1 + kappa) as the first-order outputs, times S >= 1.
    for name in ("double_backward_offset_0-float32", "double_backward_offset_1e2-float32"):
        (case,) = cases(names=[name])
        inp = case.inputs()
        tol = case.tolerances(inp, case.reference(inp))
        assert min(tol["gx"], tol["gdy"], tol["ggamma"]) >= tol["y"]
        assert tol["ggamma"] >= tol["dgamma"] * 0.1
    (low,) = cases(names=["double_backward_offset_0-float32"])
    (high,) = cases(names=["double_backward_offset_1e2-float32"])
    tl, th = (c.tolerances(c.inputs(), c.reference(c.inputs())) for c in (low, high))
    assert th["gdy"] > 10 * tl["gdy"]  # kappa ~ 100 at offset 1e2
    (f64,) = cases(names=["double_backward_offset_0-float64"])
    t64 = f64.tolerances(f64.inputs(), f64.reference(f64.inputs()))
    assert t64["gx"] < 1e-12 and tl["gx"] < 1e-4


def test_the_calibration_script():
    rows = {r["kernel"]: r for r in cal.calibrate()}
    correct = ["batchnorm", "closed form in float32"]
    if importlib.util.find_spec("torch") is not None:
        correct.append("torch (CPU) autograd")
    for label in correct:
        assert rows[label]["failed_cases"] == 0 and rows[label]["worst_error_over_tolerance"] < 0.1
    for label in cal.DROPS:
        assert (
            rows[label]["failed_cases"] >= 5
            and rows[label]["least_failing_error_over_tolerance"] > 1
        )


def test_wrong_shape_and_none_are_named():
    (case,) = cases(names=["double_backward_offset_0-float32"])
    inp = case.inputs()
    got = ours(case, inp)
    result = case.check({**got, "ggamma": got["ggamma"][:, None], "gx": None}, inp)
    causes = {o.name: o.cause for o in result.failures}
    assert "wrong shape: ggamma has shape (8, 1), expected (8,)" in causes["ggamma"]
    assert "returned None for gx" in causes["gx"]
