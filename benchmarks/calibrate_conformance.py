"""The calibration of the conformance tolerances: correct kernels pass, seeded bugs fail.

Runs ``bn.gradcheck.check_kernels`` with its defaults (``dtypes=[np.float32]``, and float16
for the correct kernels) on a textbook two-pass NumPy kernel, PyTorch's CPU kernel when torch
is installed, this library's own kernels, and six kernels each with one classic bug, and prints
the largest error/tolerance ratio of each (below 1: passes). docs/conformance.md shows the table:

    python benchmarks/calibrate_conformance.py [--json]

The kernels are plain functions so that tests can use them too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Callable
from typing import Any

import numpy as np

import batchnorm as bn

Array = Any


def _axes(x: Array, axis: int) -> tuple[tuple[int, ...], list[int]]:
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    shape = [-1 if i == ax else 1 for i in range(x.ndim)]
    return red, shape


def make_forward(*, eps_outside: bool = False, one_pass: bool = False, ddof: int = 0) -> Callable:
    """A textbook two-pass forward in x's dtype (16-bit floats in float32), with one bug or none."""

    def forward(x: Array, gamma: Array, beta: Array, *, eps: float, axis: int) -> Any:
        dtype = np.asarray(x).dtype
        work = np.asarray(x, dtype=np.float32 if dtype.itemsize < 4 else dtype)
        red, shape = _axes(work, axis)
        m = work.size // work.shape[axis]
        mean = work.mean(axis=red, keepdims=True)
        if one_pass:  # may be negative: NaN below, reported as such
            var = (work * work).mean(axis=red, keepdims=True) - mean * mean
        else:
            var = ((work - mean) ** 2).sum(axis=red, keepdims=True) / (m - ddof)
        with np.errstate(invalid="ignore"):
            if eps_outside:
                invstd = 1 / (np.sqrt(var) + work.dtype.type(eps))
            else:
                invstd = 1 / np.sqrt(var + work.dtype.type(eps))
        xhat = (work - mean) * invstd
        g = gamma.reshape(shape).astype(work.dtype)
        b = beta.reshape(shape).astype(work.dtype)
        return (g * xhat + b).astype(dtype), (xhat, g * invstd, red, dtype)

    return forward


def make_backward(*, mean_term: bool = True, xhat_term: bool = True) -> Callable:
    """The compact textbook backward, optionally without one of its batch-statistics terms."""

    def backward(dy: Array, cache: Any) -> Any:
        xhat, scale, red, dtype = cache
        dy = np.asarray(dy, dtype=xhat.dtype)
        m = xhat.size // scale.size
        sum_dy = dy.sum(axis=red, keepdims=True)
        sum_dy_xhat = (dy * xhat).sum(axis=red, keepdims=True)
        inner = m * dy
        if mean_term:
            inner = inner - sum_dy
        if xhat_term:
            inner = inner - xhat * sum_dy_xhat
        dx = scale / m * inner
        return dx.astype(dtype), sum_dy_xhat.ravel(), sum_dy.ravel()

    return backward


def make_running(*, wrong_side: bool = False) -> Callable:
    """A running-statistic update in this library's convention, or with momentum flipped."""

    def running(rm: Array, rv: Array, x: Array, *, momentum: float, unbiased: bool, axis: int):
        work = np.asarray(x, dtype=np.float64)
        red, _ = _axes(work, axis)
        m = work.size // work.shape[axis]
        mean, var = work.mean(axis=red), work.var(axis=red, ddof=1 if unbiased else 0)
        old = 1 - momentum if wrong_side else momentum
        return old * rm + (1 - old) * mean, old * rv + (1 - old) * var + 0 * m

    return running


textbook_forward, textbook_backward, textbook_running = (
    make_forward(),
    make_backward(),
    make_running(),
)

#: Each seeded bug: (forward, backward, running), the rest being the textbook kernel.
SEEDED = {
    "eps outside sqrt": (make_forward(eps_outside=True), textbook_backward, textbook_running),
    "E[x^2] - E[x]^2": (make_forward(one_pass=True), textbook_backward, textbook_running),
    "unbiased var in training": (make_forward(ddof=1), textbook_backward, textbook_running),
    "dx without mean term": (textbook_forward, make_backward(mean_term=False), textbook_running),
    "dx without xhat term": (textbook_forward, make_backward(xhat_term=False), textbook_running),
    "momentum on the wrong side": (
        textbook_forward,
        textbook_backward,
        make_running(wrong_side=True),
    ),
}


def torch_kernels() -> tuple[Callable, Callable, Callable]:
    """PyTorch's CPU kernel as (forward, backward, running) in check_kernels' signatures."""
    import torch

    def forward(x: Array, gamma: Array, beta: Array, *, eps: float, axis: int) -> Any:
        xt = torch.from_numpy(np.moveaxis(np.asarray(x), axis, 1).copy()).requires_grad_(True)
        dt = xt.dtype
        g = torch.tensor(gamma, dtype=dt, requires_grad=True)
        b = torch.tensor(beta, dtype=dt, requires_grad=True)
        y = torch.nn.functional.batch_norm(xt, None, None, g, b, training=True, eps=eps)
        return np.moveaxis(y.detach().numpy(), 1, axis), (xt, g, b, y, axis)

    def backward(dy: Array, cache: Any) -> Any:
        xt, g, b, y, axis = cache
        y.backward(torch.from_numpy(np.moveaxis(np.asarray(dy), axis, 1).copy()))
        return np.moveaxis(xt.grad.numpy(), 1, axis), g.grad.numpy(), b.grad.numpy()

    def running(rm: Array, rv: Array, x: Array, *, momentum: float, unbiased: bool, axis: int):
        xt = torch.from_numpy(np.moveaxis(np.asarray(x), axis, 1).copy())
        rmt = torch.tensor(rm, dtype=xt.dtype)
        rvt = torch.tensor(rv, dtype=xt.dtype)
        torch.nn.functional.batch_norm(xt, rmt, rvt, training=True, momentum=1 - momentum)
        return rmt.numpy(), rvt.numpy()

    return forward, backward, running


def _worst(report: bn.gradcheck.KernelReport) -> tuple[float, str, float]:
    """The largest error/tolerance, where it is, and the smallest one of a failing case."""
    worst, where, least = 0.0, "", float("inf")
    for case in report.cases:
        ratios = {n: e / case.tolerances.get(n, case.tolerance) for n, e in case.errors.items()}
        name = max(ratios, key=lambda n: ratios[n])
        if ratios[name] > worst:
            worst, where = ratios[name], f"{case.name} {name}"
        if ratios[name] > 1.0:
            least = min(least, ratios[name])
    return worst, where, least


def calibrate() -> list[dict[str, Any]]:
    """One row per kernel and dtype: the largest error/tolerance and where it is."""
    correct: dict[str, tuple[Callable, Callable, Callable]] = {
        "textbook two-pass": (textbook_forward, textbook_backward, textbook_running),
        "batchnorm": (bn.forward_train, bn.backward, textbook_running),
    }
    if importlib.util.find_spec("torch") is not None:
        correct["torch (CPU)"] = torch_kernels()
    # PyTorch takes no ml_dtypes array and this library no bfloat16: the textbook kernel does.
    bf16 = ("bfloat16",) if importlib.util.find_spec("ml_dtypes") is not None else ()
    runs = [("textbook two-pass", correct.pop("textbook two-pass"), ("float32", "float16", *bf16))]
    runs += [(k, v, ("float32", "float16")) for k, v in correct.items()]
    runs += [(k, v, ("float32",)) for k, v in SEEDED.items()]
    rows = []
    for label, kernels, dtypes in runs:
        fwd, bwd, run = kernels
        for dt in dtypes:
            # PyTorch's running variance is always unbiased: its biased case is left out.
            chosen = [
                c
                for c in bn.conformance.cases(dtypes=[dt], modes=["train", "running"])
                if c.unbiased or not label.startswith("torch")
            ]
            report = bn.gradcheck.check_kernels(fwd, bwd, cases=chosen, running=run)
            ratio, where, least = _worst(report)
            rows.append(
                {
                    "kernel": label,
                    "dtype": dt,
                    "passed": report.passed,
                    "worst_error_over_tolerance": ratio,
                    "least_failing_error_over_tolerance": least,
                    "where": where,
                    "failed_cases": len(report.failures),
                    "cases": len(report.cases),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args()
    rows = calibrate()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(
        f"{'kernel':<28} {'dtype':<8} {'worst err/tol':>13} {'least failing':>13} "
        f"{'failed':>7}  worst case"
    )
    for r in rows:
        failed = f"{r['failed_cases']}/{r['cases']}"
        least = r["least_failing_error_over_tolerance"]
        least_text = "-" if least == float("inf") else f"{least:.3g}"
        print(
            f"{r['kernel']:<28} {r['dtype']:<8} {r['worst_error_over_tolerance']:13.3g} "
            f"{least_text:>13} {failed:>7}  {r['where']}"
        )


if __name__ == "__main__":
    main()
