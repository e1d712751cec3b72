"""The calibration of the second-derivative tolerances: correct kernels pass, a term left out fails.

Runs the second-order conformance cases (``bn.conformance.cases(second_order=True)``, float32,
training and eval) on this library's ``functional.double_backward``, the closed form of
docs/math.md evaluated in float32, PyTorch's autograd double backward when torch is installed,
and the closed form with one term left out, and prints the largest error/tolerance ratio of
each (below 1: passes). docs/conformance.md shows the table:

    python benchmarks/calibrate_double_backward.py [--json]

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
from batchnorm import functional as F

#: The terms a seeded kernel leaves out (docs/math.md, "Second derivatives").
DROPS = {
    "gx without mean(u * dyc) * xhat": "gx_xhat",
    "gdy without g_dgamma * xhat": "gdy_xhat",
    "uc without mean(g_dx)": "uc_mean",
    "ggamma without invstd": "ggamma_invstd",
}


def closed_form(case: Any, inp: Any, drop: str = "") -> dict[str, Any]:
    """gx, ggamma, gdy of docs/math.md evaluated in x's dtype, with channels at axis 1; ``drop``
    leaves one term out (a value of DROPS)."""
    dt = inp.x.dtype
    c = case.shape[1]

    def flat(v: Any) -> Any:
        return np.moveaxis(np.asarray(v, dtype=dt), 1, 0).reshape(c, -1)

    def back(v: Any) -> Any:
        return np.moveaxis(v.reshape(c, case.shape[0], *case.shape[2:]), 0, 1)

    def mean(v: Any) -> Any:
        return v.mean(axis=1, keepdims=True)

    def col(v: Any) -> Any:
        return np.asarray(v, dtype=dt)[:, None]

    x, dy, u = flat(inp.x), flat(inp.dy), flat(inp.g_dx)
    g, a, b = col(inp.gamma), col(inp.g_dgamma), col(inp.g_dbeta)
    if case.training:
        mu = mean(x)
        var = mean((x - mu) ** 2)
    else:
        mu, var = col(inp.mean), col(inp.var)
    s = 1 / np.sqrt(var + dt.type(inp.eps))
    xhat = (x - mu) * s
    gdy = (0 if drop == "gdy_xhat" else a * xhat) + b
    if case.training:
        dyc = dy - mean(dy) - xhat * mean(dy * xhat)
        uc = u - (0 if drop == "uc_mean" else mean(u)) - xhat * mean(u * xhat)
        gdy = gdy + g * s * uc
        inner = (u * dyc).sum(axis=1, keepdims=True)
        gx = s * (a - g * s * mean(u * xhat)) * dyc - g * s * s * mean(dy * xhat) * uc
        if drop != "gx_xhat":
            gx = gx - g * s * s * mean(u * dyc) * xhat
    else:
        gdy = gdy + g * s * u
        inner = (u * dy).sum(axis=1, keepdims=True)
        gx = a * s * dy
    ggamma = inner if drop == "ggamma_invstd" else s * inner
    return {"gx": back(gx), "ggamma": ggamma.ravel().astype(np.float64), "gdy": back(gdy)}


def ours(case: Any, inp: Any) -> dict[str, Any]:
    """This library: forward in the case's dtype, then functional.double_backward."""
    kw = {"eps": inp.eps, "axis": inp.axis}
    if case.training:
        _, cache = bn.forward_train(inp.x, inp.gamma, inp.beta, **kw)
    else:
        _, cache = bn.forward_eval(inp.x, inp.gamma, inp.beta, inp.mean, inp.var, **kw)
    gx, ggamma, gdy = F.double_backward(inp.g_dx, inp.g_dgamma, inp.g_dbeta, inp.dy, cache)
    return {"gx": gx, "ggamma": ggamma, "gdy": gdy}


def torch_double_backward(case: Any, inp: Any) -> dict[str, Any]:
    """PyTorch's autograd double backward, all tensors in x's dtype."""
    import torch

    t = lambda v: torch.tensor(np.asarray(v), dtype=getattr(torch, inp.x.dtype.name))  # noqa: E731
    x, w, b, dy = (t(v).requires_grad_(True) for v in (inp.x, inp.gamma, inp.beta, inp.dy))
    stats = (None, None) if case.training else (t(inp.mean), t(inp.var))
    y = torch.nn.functional.batch_norm(x, *stats, w, b, training=case.training, eps=inp.eps)
    dx, dw, db = torch.autograd.grad(y, [x, w, b], dy, create_graph=True)
    total = (t(inp.g_dx) * dx).sum() + (t(inp.g_dgamma) * dw).sum() + (t(inp.g_dbeta) * db).sum()
    gx, gw, gdy = torch.autograd.grad(total, [x, w, dy])
    return {"gx": gx.numpy(), "ggamma": gw.numpy().astype(np.float64), "gdy": gdy.numpy()}


def calibrate(extended: bool = False) -> list[dict[str, Any]]:
    """One row per kernel: the largest error/tolerance over the float32 cases and where."""
    kernels: dict[str, Callable[[Any, Any], dict[str, Any]]] = {
        "batchnorm": ours,
        "closed form in float32": closed_form,
    }
    if importlib.util.find_spec("torch") is not None:
        kernels["torch (CPU) autograd"] = torch_double_backward
    for label, drop in DROPS.items():
        kernels[label] = lambda case, inp, drop=drop: closed_form(case, inp, drop)
    chosen = bn.conformance.cases(dtypes=["float32"], second_order=True, extended=extended)
    inputs = {case.name: case.inputs() for case in chosen}
    rows = []
    for label, kernel in kernels.items():
        worst, where, least, failed = 0.0, "", float("inf"), 0
        for case in chosen:
            inp = inputs[case.name]
            result = case.check(kernel(case, inp), inp)
            out = max(result.outputs, key=lambda o: o.error / o.tolerance)
            ratio = out.error / out.tolerance
            if ratio > worst:
                worst, where = ratio, f"{case.name.removeprefix('double_backward_')} {out.name}"
            if not result.passed:
                failed += 1
                least = min(least, ratio)
        rows.append(
            {
                "kernel": label,
                "worst_error_over_tolerance": worst,
                "least_failing_error_over_tolerance": least,
                "where": where,
                "failed_cases": failed,
                "cases": len(chosen),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    parser.add_argument("--extended", action="store_true", help="add the 880,801-row case")
    args = parser.parse_args()
    rows = calibrate(args.extended)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'kernel':<34} {'worst err/tol':>13} {'least failing':>13} {'failed':>7}  worst case")
    for r in rows:
        least = r["least_failing_error_over_tolerance"]
        least_text = "-" if least == float("inf") else f"{least:.3g}"
        print(
            f"{r['kernel']:<34} {r['worst_error_over_tolerance']:13.3g} {least_text:>13} "
            f"{r['failed_cases']:>3}/{r['cases']:<3}  {r['where']}"
        )


if __name__ == "__main__":
    main()
