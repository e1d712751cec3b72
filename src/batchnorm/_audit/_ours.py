"""This library's own float32 and float16 roads (float64 is the reference itself), and its
second derivatives (functional.double_backward) on the second-order cases."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

import batchnorm
from batchnorm._audit._core import Implementation
from batchnorm.conformance import Case, CaseInputs
from batchnorm.functional import backward, double_backward, forward_eval, forward_train
from batchnorm.layer import BatchNorm


def implementations() -> list[Implementation]:
    """One row: the kernels and, for running cases, the BatchNorm layer."""
    return [
        Implementation(
            "batchnorm",
            batchnorm.__version__,
            frozenset({"float64", "float32", "float16"}),
            _run,
            conventions="this library: the reference conventions",
            second_order=True,
        )
    ]


def _run(case: Case, inp: CaseInputs) -> dict[str, Any]:
    kw: dict[str, Any] = {"eps": inp.eps, "axis": inp.axis}
    if case.mode == "eval":
        assert inp.mean is not None and inp.var is not None
        y, cache = forward_eval(inp.x, inp.gamma, inp.beta, inp.mean, inp.var, **kw)
    else:
        y, cache = forward_train(inp.x, inp.gamma, inp.beta, **kw)
    if case.second_order:
        assert inp.g_dx is not None
        gx, ggamma, gdy = double_backward(inp.g_dx, inp.g_dgamma, inp.g_dbeta, inp.dy, cache)
        return {"gx": gx, "ggamma": ggamma, "gdy": gdy}
    dx, dgamma, dbeta = backward(inp.dy, cache)
    out: dict[str, Any] = {"y": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}
    if case.mode == "running":
        assert inp.running_mean is not None and inp.running_var is not None
        with warnings.catch_warnings():  # momentum 0.1 is meant: the case weighs the old value
            warnings.simplefilter("ignore", UserWarning)
            layer = BatchNorm(case.shape[1], inp.eps, inp.momentum, unbiased=inp.unbiased)
            layer.running_mean = np.array(inp.running_mean)
            layer.running_var = np.array(inp.running_var)
            layer(inp.x)
        out["running_mean"], out["running_var"] = layer.running_mean, layer.running_var
    return out
