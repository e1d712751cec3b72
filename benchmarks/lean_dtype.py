"""Which dtype the lean road's element-wise passes should run in, for float32 input.

Two bare versions of a small training step (forward and backward, (B, C) float32 data, no
argument checks), each with float64 per-channel statistics and sums:

* ``float64``: what the lean road does (src/batchnorm/_layout.py): x and dy converted to
  float64 once, every pass in float64, sums as ``np.dot`` with a ones vector, y and dx cast to
  float32 at the end.
* ``float32``: every element-wise pass in float32, each per-channel sum accumulated in float64
  with ``np.add.reduce(..., dtype=np.float64)``, no conversions.

Prints their times (interleaved, best of N, one thread, as bench.py) and the largest error of y
and dx against the same float32 values normalized in float64, at offset 0; beside them, in the
same rounds, the library's whole step (``bn.forward_train`` + ``bn.backward``: the float64
passes plus argument checks and Python calls) and, when PyTorch is installed, its C++ kernel on
one thread (bench.py's ``torch1``): how far the bare passes alone are from PyTorch.

Usage::

    python benchmarks/lean_dtype.py [--rounds 30]
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import argparse
import sys
from typing import Any

import numpy as np
from bench import best_times, load_torch, torch_step

import batchnorm as bn

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
SHAPES = ((64, 32), (64, 128), (32, 256), (128, 64))
EPS = 1e-5


def step_float64(x: Any, dy: Any, g: Any, b: Any) -> tuple[Any, Any]:
    """The lean road's passes: float64 throughout, one cast of y and of dx."""
    m = x.shape[0]
    ones = np.ones(m)
    d = x.astype(F64)
    mean = np.dot(ones, d)
    mean /= m
    d -= mean
    invstd = 1.0 / np.sqrt(np.dot(ones, d * d) / m + EPS)
    a = g * invstd
    y = d * a
    y += b
    dy64 = dy.astype(F64)
    sum_dy = np.dot(ones, dy64)
    b1 = invstd * np.dot(ones, dy64 * d) * invstd / -m
    dx = d * (a * b1)
    dx += a * (sum_dy / -m)
    dy64 *= a
    dx += dy64
    return y.astype(F32), dx.astype(F32)


def step_float32(x: Any, dy: Any, g: Any, b: Any) -> tuple[Any, Any]:
    """float32 passes, float64-accumulated sums."""
    m = x.shape[0]
    mean = np.add.reduce(x, axis=0, dtype=F64) / m
    d = x - mean.astype(F32)
    resid = np.add.reduce(d, axis=0, dtype=F64) / m
    var = np.add.reduce(d * d, axis=0, dtype=F64) / m - resid * resid
    invstd = 1.0 / np.sqrt(var + EPS)
    a = g * invstd
    y = d * a.astype(F32)
    y += (b - resid * a).astype(F32)
    sum_dy = np.add.reduce(dy, axis=0, dtype=F64)
    dot = np.add.reduce(dy * d, axis=0, dtype=F64) - resid * sum_dy
    b1 = invstd * dot * invstd / -m
    dx = d * (a * b1).astype(F32)
    dx += (a * (sum_dy / -m - b1 * resid)).astype(F32)
    dx += dy * a.astype(F32)
    return y, dx


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch = load_torch()
    if torch is not None:
        torch.set_num_threads(1)
    print(f"float32 training step, bare passes, best of {args.rounds}; errors at offset 0")
    print(f"  {'shape':<11} {'f64 us':>7} {'f32 us':>7} {'f32/f64':>8} "
          f"{'y err f64':>10} {'y err f32':>10} {'dx err f64':>11} {'dx err f32':>11} "
          f"{'ours us':>8} {'t1 us':>6} {'f64/t1':>7} {'ours/t1':>8}")  # fmt: skip
    for shape in SHAPES:
        rng = np.random.default_rng(0)
        x, dy = (rng.standard_normal(shape).astype(F32) for _ in range(2))
        g, b = rng.uniform(0.5, 1.5, shape[1]), rng.standard_normal(shape[1])
        args_ = (x, dy, g, b)
        fns = {
            "f64": lambda a=args_: step_float64(*a),
            "f32": lambda a=args_: step_float32(*a),
            "ours": lambda a=args_: library_step(*a),
        }
        if torch is not None:
            fns["t1"] = torch_step(torch, x, g, b, dy)
        t = best_times(fns, args.rounds)
        exact = _uncast(x, dy, g, b)
        errs = [
            float(np.max(np.abs(out.astype(F64) - ref)))
            for version in (step_float64, step_float32)
            for out, ref in zip(version(x, dy, g, b), exact, strict=True)
        ]
        t1 = t.get("t1", float("nan"))
        print(
            f"  {shape!s:<11} {t['f64'] * 1e6:7.1f} {t['f32'] * 1e6:7.1f} "
            f"{t['f32'] / t['f64']:8.2f} {errs[0]:10.1e} {errs[2]:10.1e} {errs[1]:11.1e} "
            f"{errs[3]:11.1e} {t['ours'] * 1e6:8.1f} {t1 * 1e6:6.1f} {t['f64'] / t1:7.2f} "
            f"{t['ours'] / t1:8.2f}"
        )
    return 0


def library_step(x: Any, dy: Any, g: Any, b: Any) -> tuple[Any, Any]:
    """The library's step on the same data: forward_train and backward."""
    y, cache = bn.forward_train(x, g, b)
    return y, bn.backward(dy, cache)[0]


def _uncast(x: Any, dy: Any, g: Any, b: Any) -> tuple[Any, Any]:
    """y and dx of float32 x and dy computed in float64 and kept in float64."""
    m = x.shape[0]
    d = x.astype(F64) - x.astype(F64).mean(axis=0)
    invstd = 1.0 / np.sqrt((d * d).mean(axis=0) + EPS)
    xhat = d * invstd
    dy64 = dy.astype(F64)
    dx = g * invstd / m * (m * dy64 - dy64.sum(axis=0) - xhat * (dy64 * xhat).sum(axis=0))
    return xhat * g + b, dx


if __name__ == "__main__":
    sys.exit(main())
