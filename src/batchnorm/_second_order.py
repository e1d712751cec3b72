"""The second-derivative part of the conformance cases (private; public through
``batchnorm.conformance``).

A second-order case (``Case.second_order``) weighs backward's three outputs: its inputs add
``g_dx`` (x's shape and dtype), ``g_dgamma`` and ``g_dbeta`` (per channel, exact in every
dtype), and its reference adds ``gx``, ``ggamma`` and ``gdy``, the gradients of
``<g_dx, dx> + <g_dgamma, dgamma> + <g_dbeta, dbeta>`` with respect to x, gamma and dy
(:func:`batchnorm.functional.double_backward` in float64). :func:`weights` draws the weights,
:func:`reference` computes the answers, :func:`conditions` gives each answer the factor S of
the error model: the closed form of docs/math.md evaluated with every quantity replaced by
its absolute value (means of absolute values), over the answer's largest value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from batchnorm.functional import BatchNormCache, double_backward

Vector = NDArray[np.float64]
Matrix = NDArray[np.float64]

#: The outputs a second-order case adds to y, dx, dgamma and dbeta.
OUTPUTS = ("gx", "ggamma", "gdy")


def weights(
    shape: tuple[int, ...], dtype: np.dtype[Any], rng: np.random.Generator
) -> tuple[NDArray[Any], Vector, Vector]:
    """g_dx ~ N(0, 1) in ``dtype`` (channels at axis 1), g_dgamma and g_dbeta in [-1, 1] in
    steps of 1/64 (exact in bfloat16)."""
    c = shape[1]
    g_dx = rng.standard_normal(shape).astype(dtype)
    return g_dx, rng.integers(-64, 65, c) / 64.0, rng.integers(-64, 65, c) / 64.0


def reference(
    g_dx: NDArray[Any], g_dgamma: Vector, g_dbeta: Vector, dy: Matrix, cache: BatchNormCache
) -> dict[str, NDArray[Any]]:
    """gx, ggamma, gdy from the float64 cache and dy of the case's reference."""
    gx, ggamma, gdy = double_backward(
        np.asarray(g_dx, dtype=np.float64), g_dgamma, g_dbeta, dy, cache
    )
    assert ggamma is not None
    return {"gx": gx, "ggamma": ggamma, "gdy": gdy}


class Inputs(Protocol):
    """What the conditions read of a case's inputs (``batchnorm.conformance.CaseInputs``)."""

    @property
    def x(self) -> NDArray[Any]: ...
    @property
    def dy(self) -> NDArray[Any]: ...
    @property
    def g_dx(self) -> NDArray[Any] | None: ...
    @property
    def gamma(self) -> Vector: ...
    @property
    def g_dgamma(self) -> Vector | None: ...
    @property
    def g_dbeta(self) -> Vector | None: ...
    @property
    def eps(self) -> float: ...
    @property
    def axis(self) -> int: ...
    @property
    def mean(self) -> Vector | None: ...
    @property
    def var(self) -> Vector | None: ...


def conditions(
    training: bool, inputs: Inputs, reference: Mapping[str, NDArray[Any]]
) -> dict[str, float]:
    """S of gx, gdy (elementwise, as dx) and ggamma (a sum: times log2(m), as dgamma).

    In the closed form, with every array seen as (C, m) (channels first, every other axis
    flattened), each projection ``P v = v - mean(v) - xhat * mean(v * xhat)`` becomes ``|P| v
    = |v| + mean|v| + |xhat| * mean|v * xhat|`` (eval: ``|v|``), each product and mean the same
    of absolute values; what a correct kernel may lose is u times that, per rounding.
    """
    assert inputs.g_dx is not None and inputs.g_dgamma is not None and inputs.g_dbeta is not None
    x, dy, u = (_per_channel(v, inputs.axis) for v in (inputs.x, inputs.dy, inputs.g_dx))
    if training:
        mean, var = x.mean(axis=1), x.var(axis=1)
    else:
        assert inputs.mean is not None and inputs.var is not None
        mean, var = inputs.mean, inputs.var
    invstd = 1.0 / np.sqrt(var + inputs.eps)
    ax = np.abs(x - mean[:, None]) * invstd[:, None]
    g, s, a, b = (
        np.abs(v)[:, None] for v in (inputs.gamma, invstd, inputs.g_dgamma, inputs.g_dbeta)
    )
    ady, au = np.abs(dy), np.abs(u)

    def avg(v: Matrix) -> Matrix:
        out: Matrix = v.mean(axis=1, keepdims=True)
        return out

    def proj(v: Matrix) -> Matrix:
        return v + avg(v) + ax * avg(v * ax) if training else v

    pdy, pu = proj(ady), proj(au)
    terms = {"gdy": g * s * pu + a * ax + b, "ggamma": s * (au * pdy).sum(axis=1, keepdims=True)}
    if training:
        terms["gx"] = s * (a + g * s * avg(au * ax)) * pdy + g * s * s * (
            avg(ady * ax) * pu + avg(au * pdy) * ax
        )
    else:
        terms["gx"] = a * s * ady
    out = {}
    for name in OUTPUTS:
        scale = max(float(np.max(np.abs(reference[name]), initial=0.0)), 1e-8)
        cond = max(1.0, float(np.max(terms[name], initial=0.0)) / scale)
        out[name] = cond * max(1.0, math.log2(x.shape[1])) if name == "ggamma" else cond
    return out


def _per_channel(v: NDArray[Any], axis: int) -> Matrix:
    arr = np.moveaxis(np.asarray(v, dtype=np.float64), axis, 0)
    out: Matrix = arr.reshape(arr.shape[0], -1)
    return out
