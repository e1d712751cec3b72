"""batchnorm.conformance: the cases, the error model's calibration, and the diagnostics.

The calibration is pinned in both directions: correct kernels (this library's, a textbook
two-pass NumPy kernel, PyTorch's CPU kernel) pass the default cases, and each seeded bug of
benchmarks/calibrate_conformance.py fails them in float32 alone.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from helpers import load_module

import batchnorm as bn
from batchnorm import conformance
from batchnorm.conformance import GROWTH, Case, cases, normwise_error, unit_roundoff
from batchnorm.gradcheck import check_kernels

CALIBRATE = Path(__file__).resolve().parents[1] / "benchmarks" / "calibrate_conformance.py"
HAS_BF16 = importlib.util.find_spec("ml_dtypes") is not None


cal = load_module("calibrate_conformance", CALIBRATE)


def _float32(report):
    return [case for case in report.cases if case.dtype == "float32"]


# --- the catalogue -------------------------------------------------------------------------------


def test_case_names_are_unique_and_cover_the_catalogue():
    everything = cases(extended=True, dtypes=["float64", "float32", "float16"])
    names = [c.name for c in everything]
    assert len(names) == len(set(names))
    f32 = {c.name for c in cases(dtypes=["float32"])}
    for name in (
        "offset_0",
        "offset_1e2",
        "offset_1e4",
        "tiny_var",
        "constant_channel",
        "m2",
        "n1_spatial",
        "channels_last_memory",
        "non_contiguous",
        "large_c",
        "5d",
        "eval_offset_1e2",
        "running_0.9_unbiased",
        "running_0.1_unbiased",
        "running_0.9_biased",
    ):
        assert f"{name}-float32" in f32
    assert "offset_1e6-float64" in {c.name for c in cases(dtypes=["float64"])}
    assert "near_overflow-float16" in {c.name for c in cases(dtypes=["float16"])}
    ranks = {len(c.shape) for c in cases(dtypes=["float32"])}
    assert ranks == {2, 3, 4, 5}


def test_extended_cases_are_opt_in():
    default = {c.name for c in cases(dtypes=["float32"])}
    extended = {c.name for c in cases(dtypes=["float32"], extended=True)}
    slow = {"huge_m-float32", "huge_values-float32", "constant_1e10-float32", "offset_1e6-float32"}
    assert slow <= extended
    assert not slow & default
    (huge,) = cases(names=["huge_m-float32"])
    assert huge.count == 880_801


def test_cases_filter_by_mode_and_keep_the_dtype_order():
    train = cases(dtypes=["float64", "float32"], modes=["train"])
    assert {c.mode for c in train} == {"train"}
    dtypes = [c.dtype for c in train]
    assert dtypes == sorted(dtypes, key=["float64", "float32"].index)
    assert {c.mode for c in cases(modes=["eval"])} == {"eval"}


def test_inputs_are_deterministic_and_seeded():
    (case,) = cases(names=["offset_1e2-float32"])
    a, b = case.inputs(), case.inputs()
    assert a.x.dtype == np.float32 and a.dy.dtype == np.float32
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.dy, b.dy)
    assert not np.array_equal(case.inputs(seed=1).x, a.x)
    x = a.x.astype(np.float64)
    assert 90 < x.mean() < 110


def test_layouts_and_channels_last():
    (strided,) = cases(names=["channels_last_memory-float32"])
    x = strided.inputs().x
    assert x.shape == strided.shape
    assert x.strides[1] == x.itemsize  # channels adjacent in memory: NHWC behind NCHW
    (view,) = cases(names=["non_contiguous-float32"])
    assert not view.inputs().x.flags.c_contiguous
    (plain,) = cases(names=["offset_0-float32"])
    last = plain.inputs(axis=-1)
    assert last.axis == -1
    assert last.x.shape == (32, 8)
    (four,) = cases(names=["5d-float32"])
    moved = four.inputs(axis=-1)
    np.testing.assert_array_equal(moved.x, np.moveaxis(four.inputs().x, 1, -1))


def test_parameters_are_exact_in_half_precision():
    for case in cases(dtypes=["float32"], modes=["eval", "running"]):
        inp = case.inputs()
        for v in (inp.gamma, inp.beta):
            np.testing.assert_array_equal(v, v.astype(np.float16).astype(np.float64))
        for v in (inp.mean, inp.var, inp.running_mean, inp.running_var):
            if v is not None:
                np.testing.assert_array_equal(v, v.astype(np.float32).astype(np.float64))


def test_constant_channel_is_constant_and_its_exact_output_is_beta():
    (case,) = cases(names=["constant_channel-float32"])
    inp = case.inputs()
    assert np.all(inp.x[:, 0] == np.float32(1e7))
    ref = case.reference(inp)
    assert np.all(ref["y"][:, 0] == inp.beta[0])


@pytest.mark.skipif(not HAS_BF16, reason="ml_dtypes is not installed")
def test_bfloat16_cases_when_ml_dtypes_is_installed():
    import ml_dtypes

    bf16 = cases(dtypes=["bfloat16"])
    assert bf16
    assert bf16[0].inputs().x.dtype == np.dtype(ml_dtypes.bfloat16)
    assert "offset_1e2-bfloat16" in {c.name for c in bf16}
    assert unit_roundoff("bfloat16") == 2.0**-8
    fwd, bwd, run = cal.textbook_forward, cal.textbook_backward, cal.textbook_running
    assert check_kernels(fwd, bwd, dtypes=["bfloat16"], running=run).passed


@pytest.mark.skipif(not HAS_BF16, reason="ml_dtypes is not installed")
def test_one_pass_variance_in_bfloat16_fails_the_narrow_case():
    # tt-metal's pattern: E[x^2] - E[x]^2 in bfloat16 on N(5, 0.1) data.
    def one_pass(x, gamma, beta, *, eps, axis):
        red, shape = (0, 2, 3), [1, -1, 1, 1]
        mean = x.mean(axis=red, keepdims=True, dtype=x.dtype)
        var = (x * x).mean(axis=red, keepdims=True, dtype=x.dtype) - mean * mean
        with np.errstate(invalid="ignore"):
            invstd = (1 / np.sqrt(var.astype(np.float32) + np.float32(eps))).astype(x.dtype)
        y = gamma.reshape(shape).astype(x.dtype) * ((x - mean) * invstd)
        return y + beta.reshape(shape).astype(x.dtype), None

    (case,) = cases(names=["narrow_offset_5-bfloat16"])
    inp = case.inputs()
    y, _ = one_pass(inp.x, inp.gamma, inp.beta, eps=inp.eps, axis=1)
    assert not case.check({"y": y}, inp).passed
    y, _ = cal.textbook_forward(inp.x, inp.gamma, inp.beta, eps=inp.eps, axis=1)
    assert case.check({"y": y}, inp).passed


# --- the error model -----------------------------------------------------------------------------


def test_tolerance_of_y_is_growth_times_roundoff_times_conditioning():
    (case,) = cases(names=["offset_1e4-float32"])
    inp = case.inputs()
    tol = case.tolerances(inp, case.reference(inp))
    x = np.moveaxis(inp.x.astype(np.float64), 1, 0).reshape(4, -1)
    kappa = np.max(np.abs(x.mean(axis=1)) / np.sqrt(x.var(axis=1) + 1e-5))
    assert tol["y"] == pytest.approx(GROWTH * 2.0**-24 * (1 + kappa), rel=1e-12)


def test_tolerance_grows_with_the_offset_and_the_dtype():
    def y_tol(name):
        (case,) = cases(names=[name])
        inp = case.inputs()
        return case.tolerances(inp, case.reference(inp))["y"]

    assert y_tol("offset_0-float32") < y_tol("offset_1e2-float32") < y_tol("offset_1e4-float32")
    assert y_tol("offset_0-float64") < y_tol("offset_0-float32") < y_tol("offset_0-float16")
    # A constant channel costs no conditioning: its output beta needs no cancellation.
    assert y_tol("constant_channel-float32") < 10 * y_tol("offset_0-float32")


def test_m2_dx_tolerance_includes_its_cancellation():
    # With two values per channel the exact dx is ~0 (xhat is +-1 whatever x is).
    (case,) = cases(names=["m2-float32"])
    inp = case.inputs()
    tol = case.tolerances(inp, case.reference(inp))
    assert tol["dx"] > 100 * tol["y"]


def test_normwise_error():
    want = np.array([[1.0, -2.0], [4.0, 0.5]])
    err, index = normwise_error(want + np.array([[0.0, 0.0], [0.0, 0.4]]), want)
    assert err == pytest.approx(0.1)
    assert index == (1, 1)
    assert normwise_error(None, want) == (float("inf"), None)
    assert normwise_error(want.T[:1], want) == (float("inf"), None)
    nan = want.copy()
    nan[1, 0] = np.nan
    assert normwise_error(nan, want) == (float("inf"), (1, 0))
    assert normwise_error(np.zeros((0, 2)), np.zeros((0, 2))) == (0.0, None)


# --- calibration: correct kernels pass -----------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_this_library_passes_every_default_case(dtype):
    report = check_kernels(
        bn.forward_train, bn.backward, dtypes=[dtype], running=cal.textbook_running
    )
    assert report.passed, str(report)
    assert {c.result.case.mode for c in report.cases} == {"train", "running"}
    eval_report = check_kernels(bn.forward_eval, bn.backward, dtypes=[dtype], training=False)
    assert eval_report.passed, str(eval_report)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("axis", [1, -1])
def test_textbook_two_pass_kernel_passes(dtype, axis):
    fwd, bwd, run = cal.textbook_forward, cal.textbook_backward, cal.textbook_running
    report = check_kernels(fwd, bwd, dtypes=[dtype], axis=axis, running=run)
    assert report.passed, str(report)
    # Well inside: the largest error is under a quarter of its tolerance.
    for case in report.cases:
        for name, err in case.errors.items():
            assert err < 0.25 * case.tolerances[name], (case.name, name)


def test_textbook_kernel_passes_with_the_documented_defaults():
    report = check_kernels(cal.textbook_forward, cal.textbook_backward, dtypes=[np.float32])
    assert report.passed
    assert len(report.cases) == len(cases(dtypes=["float32"], modes=["train"]))


def test_torch_cpu_kernel_passes_except_its_constant_channel():
    pytest.importorskip("torch")
    fwd, bwd, run = cal.torch_kernels()
    chosen = [c for c in cases(dtypes=["float32", "float16"], modes=["train", "running"])]
    chosen = [c for c in chosen if c.unbiased]  # torch's running variance is always unbiased
    report = check_kernels(fwd, bwd, cases=chosen, running=run)
    failed = {case.name for case in report.failures}
    # PyTorch 2.13 CPU: a float32 channel constant at 1e7 comes out tens away from beta.
    assert failed <= {"constant_channel-float32"}
    assert "constant_channel-float32" in failed


# --- calibration: each seeded bug fails in float32 alone -----------------------------------------


@pytest.mark.parametrize(
    ("bug", "output", "cause"),
    [
        ("eps outside sqrt", "y", "outside the square root"),
        ("E[x^2] - E[x]^2", "y", "E[x^2] - E[x]^2"),
        ("unbiased var in training", "y", "unbiased variance"),
        ("dx without mean term", "dx", "mean term"),
        ("dx without xhat term", "dx", "proportional to xhat"),
        ("momentum on the wrong side", "running_mean", "momentum on the wrong side"),
    ],
)
def test_each_seeded_bug_fails_in_float32_with_its_cause(bug, output, cause):
    fwd, bwd, run = cal.SEEDED[bug]
    report = check_kernels(fwd, bwd, dtypes=[np.float32], running=run)
    assert not report.passed
    failing = [out for case in report.failures for out in case.result.outputs if not out.passed]
    assert output in {out.name for out in failing}
    assert any(cause in out.cause for out in failing if out.name == output), str(report)
    text = str(report)
    assert "tolerance" in text and "likely cause" in text


def test_the_bugs_that_change_the_forward_fail_without_a_running_kernel():
    for bug in ("eps outside sqrt", "E[x^2] - E[x]^2", "unbiased var in training"):
        fwd, bwd, _ = cal.SEEDED[bug]
        assert not check_kernels(fwd, bwd, dtypes=[np.float32]).passed, bug


def test_one_pass_variance_is_diagnosed_from_the_offset_trend():
    fwd, bwd, _ = cal.SEEDED["E[x^2] - E[x]^2"]
    report = check_kernels(fwd, bwd, dtypes=[np.float32])
    failed = {case.name for case in report.failures}
    assert {"offset_1e2-float32", "offset_1e4-float32"} <= failed
    assert "offset_0-float32" not in failed


def test_biased_running_variance_is_named():
    def biased(rm, rv, x, *, momentum, unbiased, axis):
        return cal.textbook_running(rm, rv, x, momentum=momentum, unbiased=False, axis=axis)

    report = check_kernels(cal.textbook_forward, cal.textbook_backward, dtypes=["float32"],
                           running=biased)  # fmt: skip
    failed = {case.name: case for case in report.failures}
    assert set(failed) == {"running_0.9_unbiased-float32", "running_0.1_unbiased-float32"}
    out = {o.name: o for o in failed["running_0.9_unbiased-float32"].result.outputs}
    assert out["running_mean"].passed
    assert "unbiased (m/(m-1))" in out["running_var"].cause


# --- diagnostics ---------------------------------------------------------------------------------


def test_a_wrong_shaped_dx_says_so():
    def flat_backward(dy, cache):
        dx, dgamma, dbeta = cal.textbook_backward(dy, cache)
        return dx.reshape(-1), dgamma, dbeta

    report = check_kernels(cal.textbook_forward, flat_backward, cases=["offset_0-float32"])
    (case,) = report.cases
    out = {o.name: o for o in case.result.outputs}
    assert out["dx"].error == float("inf")
    assert "wrong shape: dx has shape (256,), expected (32, 8)" in out["dx"].cause
    assert "wrong shape" in str(report)


def test_a_per_channel_gradient_with_kept_dims_says_ravel():
    def kept(dy, cache):
        dx, dgamma, dbeta = cal.textbook_backward(dy, cache)
        return dx, dgamma[None, :], dbeta

    (case,) = check_kernels(cal.textbook_forward, kept, cases=["offset_0-float32"]).cases
    out = {o.name: o for o in case.result.outputs}
    assert "ravel" in out["dgamma"].cause
    assert out["dx"].passed


def test_a_kernel_that_raises_or_returns_none_fails_with_the_reason():
    def boom(x, gamma, beta, *, eps, axis):
        raise RuntimeError("strided input not supported")

    (case,) = check_kernels(boom, cal.textbook_backward, cases=["non_contiguous-float32"]).cases
    assert not case.passed
    assert "forward kernel raised RuntimeError: strided input not supported" in str(case.result)

    def nothing(dy, cache):
        dx, _, dbeta = cal.textbook_backward(dy, cache)
        return dx, None, dbeta

    (case,) = check_kernels(cal.textbook_forward, nothing, cases=["offset_0-float32"]).cases
    out = {o.name: o for o in case.result.outputs}
    assert "returned None for dgamma" in out["dgamma"].cause


def test_dtype_of_the_output_is_noted():
    def wide(x, gamma, beta, *, eps, axis):
        y, cache = bn.forward_train(x, gamma, beta, eps=eps, axis=axis)
        return y.astype(np.float64), cache

    (case,) = check_kernels(wide, bn.backward, cases=["offset_0-float32"]).cases
    assert case.passed
    assert any("y came back as float64 for float32 input" in n for n in case.result.notes)


def test_check_on_a_case_directly():
    (case,) = cases(names=["tiny_var-float32"])
    inp = case.inputs()
    y, _ = cal.SEEDED["eps outside sqrt"][0](inp.x, inp.gamma, inp.beta, eps=inp.eps, axis=1)
    result = case.check({"y": y}, inp)
    assert not result.passed
    (out,) = result.failures
    assert out.name == "y" and out.worst_index is not None
    assert "FAILED" in str(result) and "outside the square root" in str(result)
    with pytest.raises(ValueError, match="a case checks the outputs y, dx, dgamma, dbeta"):
        case.check({"z": y}, inp)


# --- options and messages ------------------------------------------------------------------------


def test_offset_option_runs_offset_cases_only():
    fwd, bwd, _ = cal.SEEDED["E[x^2] - E[x]^2"]
    low = check_kernels(fwd, bwd, dtypes=[np.float32], offset=1.0)
    high = check_kernels(fwd, bwd, dtypes=[np.float32], offset=[100.0, 1e4])
    assert low.passed
    assert len(high.cases) == 2 and not any(case.passed for case in high.cases)


def test_tolerances_option_replaces_the_model():
    report = check_kernels(bn.forward_train, bn.backward, cases=["offset_0-float32"],
                           tolerances={"float32": 1e-12})  # fmt: skip
    (case,) = report.cases
    assert set(case.tolerances.values()) == {1e-12}
    assert not case.passed


def test_unknown_names_and_bad_options_are_clear():
    with pytest.raises(ValueError, match=r"no conformance case is named 'offset_1e9-float32'"):
        cases(names=["offset_1e9-float32"])
    with pytest.raises(ValueError, match="Did you mean"):
        cases(names=["ofset_1e2-float32"])
    with pytest.raises(ValueError, match="axis=0"):
        Case("x", (4, 3), "float32").inputs(axis=0)
    with pytest.raises(ValueError, match="got dtype 'int32'"):
        cases(dtypes=[np.int32])


def test_module_is_public():
    assert bn.conformance is conformance
    assert "conformance" in bn.__all__
