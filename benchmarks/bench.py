"""Time batchnorm's kernels against a textbook NumPy version and PyTorch's CPU kernel.

Every number is a ratio measured in one run: for each shape the implementations are called in
turn, round after round (interleaved, so a slow spell on a shared machine hits all of them),
and each keeps its best round (best of N, ``time.perf_counter``).

Columns (training = forward_train + backward, float32 unless ``--dtype`` says otherwise):

* ``ours ms``, ``textbook``, ``torch1``, ``torchN``: milliseconds per training step (forward
  and backward, gamma and beta given, no running statistics). ``textbook`` is the plain NumPy
  version below (transpose to (NHW, C), ``x.mean`` / ``x.var``, the cs231n-style backward with
  explicit dvar and dmean; y and dx are returned as transposed views, not copied back).
  ``torch1`` is PyTorch's C++ kernel (``aten::native_batch_norm`` and
  ``native_batch_norm_backward``, called directly, without autograd) on one thread, ``torchN``
  the same on every core, timed after the others rather than interleaved with them, since its
  worker threads would compete with them. PyTorch columns appear only when torch imports.
* ``tb/ours``: speed-up over the textbook; ``ours/t1``, ``ours/tN``: our time over PyTorch's.
* ``fwd mem``, ``bwd mem``: peak memory allocated during forward_train and during backward
  (tracemalloc), as multiples of x.nbytes. y and dx each count 1.0.
* ``eval/ma``: forward_eval (with gamma and beta) relative to one multiply-add pass over x,
  ``np.multiply(x, a, out=y); np.add(y, b, out=y)`` with per-channel float32 a and b
  (shaped (C, 1, ...) to broadcast), the plain NumPy way to apply known statistics.
  ``eval/sc``: the same with scalar a and b, a floor no per-channel code reaches, since NumPy
  loops over a broadcast vector more slowly than over a scalar. ``ev0/ma``: forward_eval
  without gamma and beta, which keeps no copy of x (nothing in its backward needs x).
* ``err ours``, ``err t``: accuracy on float32 data far from zero, x = 1e4 + N(0, 1): the
  largest |y - y64| of our and PyTorch's training forward, where y64 is the same float32 input
  normalized in float64 (two-pass). Both ys are O(1), so this is also the relative error.

Usage::

    python benchmarks/bench.py            # the table in docs/performance.md
    python benchmarks/bench.py --json     # the same as JSON
    python benchmarks/bench.py --quick    # a smoke run: tiny shapes, few rounds, seconds

NumPy's element-wise loops are single-threaded; BLAS thread pools are pinned to one thread
below (before NumPy loads) so that ``ours`` is single-threaded throughout, like ``torch1``.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Before NumPy loads its BLAS: one thread, as for torch1. Idle OpenMP threads sleep at
    # once instead of spinning, so that torchN's threads do not slow down what is timed
    # next. (Importing this module, as the tests do, changes nothing.)
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import gc
import json
import math
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import batchnorm as bn

SHAPES: tuple[tuple[int, ...], ...] = (
    (64, 32),
    (64, 128),
    (32, 256),
    (128, 64),
    (128, 64, 8, 8),
    (32, 64, 56, 56),
    (32, 256, 14, 14),
    (8, 512, 7, 7),
    (256, 1024),
    (4096, 64),
)
QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((8, 4, 5, 5), (64, 16), (64, 8, 8, 8))
# Sizes (values per array) for --crossover, around the lean/streaming switch.
CROSSOVER_SIZES = (4096, 8192, 16384, 32768, 65536, 131072, 262144)
EPS = 1e-5


# --- the textbook baseline: what a NumPy BatchNorm usually looks like ---------------------------


def textbook_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = EPS
) -> tuple[np.ndarray, tuple[Any, ...]]:
    """Channels to the last axis, then the (M, C) batch norm of the cs231n assignment."""
    c = x.shape[1]
    moved = (x.shape[0], *x.shape[2:], c)
    xt = np.moveaxis(x, 1, -1).reshape(-1, c)
    mu = xt.mean(axis=0)
    var = xt.var(axis=0)
    xmu = xt - mu
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = xmu * invstd
    out = gamma * xhat + beta
    y = np.moveaxis(out.reshape(moved), -1, 1)
    return y, (xhat, gamma, xmu, invstd, var, eps, moved)


def textbook_backward(
    dy: np.ndarray, cache: tuple[Any, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The staged backward with explicit gradients of the variance and the mean."""
    xhat, gamma, xmu, invstd, var, eps, moved = cache
    c = dy.shape[1]
    m = xhat.shape[0]
    dout = np.moveaxis(dy, 1, -1).reshape(-1, c)
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    dxhat = dout * gamma
    dvar = np.sum(dxhat * xmu, axis=0) * -0.5 * (var + eps) ** -1.5
    dmean = np.sum(dxhat * -invstd, axis=0) + dvar * np.mean(-2.0 * xmu, axis=0)
    dxt = dxhat * invstd + dvar * 2.0 * xmu / m + dmean / m
    dx = np.moveaxis(dxt.reshape(moved), -1, 1)
    return dx, dgamma, dbeta


def float64_reference(x: np.ndarray, eps: float = EPS) -> np.ndarray:
    """xhat of x computed in float64 with the two-pass variance: the accuracy yardstick."""
    x64 = x.astype(np.float64)
    axes = (0, *range(2, x.ndim))
    mu = x64.mean(axis=axes, keepdims=True)
    var = ((x64 - mu) ** 2).mean(axis=axes, keepdims=True)
    result: np.ndarray = (x64 - mu) / np.sqrt(var + eps)
    return result


# --- PyTorch, when it is installed ----------------------------------------------------------------


def load_torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_step(
    torch: Any, x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, dy: np.ndarray
) -> Callable[[], Any]:
    """A training step through PyTorch's C++ kernels, without autograd bookkeeping."""
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    gt = torch.from_numpy(gamma.astype(x.dtype))
    bt = torch.from_numpy(beta.astype(x.dtype))
    fwd = torch.ops.aten.native_batch_norm.default
    bwd = torch.ops.aten.native_batch_norm_backward.default

    def step() -> Any:
        y, mean, invstd = fwd(xt, gt, bt, None, None, True, 0.1, EPS)
        return y, bwd(dyt, xt, gt, None, None, mean, invstd, True, EPS, [True, True, True])

    return step


def torch_forward(torch: Any, x: np.ndarray) -> np.ndarray:
    c = x.shape[1]
    ones = torch.ones(c, dtype=torch.float32)
    zeros = torch.zeros(c, dtype=torch.float32)
    y = torch.ops.aten.native_batch_norm.default(
        torch.from_numpy(x), ones, zeros, None, None, True, 0.1, EPS
    )[0]
    result: np.ndarray = y.numpy()
    return result


# --- measurement ------------------------------------------------------------------------------


def best_times(
    fns: dict[str, Callable[[], Any]], rounds: int, min_sample: float = 2e-3
) -> dict[str, float]:
    """Best seconds per call of each function, interleaved round by round.

    A sample is `number` calls, with `number` chosen so that one sample takes at least
    `min_sample` seconds; the order of the functions rotates every round."""
    names = list(fns)
    number: dict[str, int] = {}
    for name in names:
        start = time.perf_counter()
        fns[name]()
        once = time.perf_counter() - start
        number[name] = max(1, math.ceil(min_sample / max(once, 1e-7)))
    best = dict.fromkeys(names, math.inf)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                fn, n = fns[name], number[name]
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                best[name] = min(best[name], (time.perf_counter() - start) / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    return best


def peak_multiple(fn: Callable[[], Any], nbytes: int) -> float:
    """Peak bytes that fn allocates (tracemalloc), as a multiple of nbytes; fn's result is
    kept alive until the peak is read, as a caller would keep it."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    del result
    return peak / nbytes


def bench_shape(
    shape: tuple[int, ...], dtype: np.dtype[Any], rounds: int, torch: Any
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    c = shape[1]
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, c)
    beta = rng.standard_normal(c)
    gamma_c, beta_c = gamma.astype(dtype), beta.astype(dtype)

    def ours() -> Any:
        y, cache = bn.forward_train(x, gamma, beta)
        return y, bn.backward(dy, cache)

    def textbook() -> Any:
        y, cache = textbook_forward(x, gamma_c, beta_c)
        return y, textbook_backward(dy, cache)

    buffer = np.empty_like(x)

    def copy() -> Any:
        np.copyto(buffer, x)

    fns: dict[str, Callable[[], Any]] = {"ours": ours, "textbook": textbook, "copy": copy}
    if torch is not None:
        step = torch_step(torch, x, gamma, beta, dy)
        fns["torch1"] = step
    train = best_times(fns, rounds)
    if torch is not None:
        # All threads, timed on its own afterwards: its worker threads would compete with
        # the single-threaded runs on a small machine.
        torch.set_num_threads(os.cpu_count() or 1)
        train["torchN"] = best_times({"torchN": step}, rounds)["torchN"]
        torch.set_num_threads(1)

    # Eval mode: forward_eval against the multiply-add floor, same per-channel a and b.
    mean = rng.standard_normal(c)
    var = rng.uniform(0.5, 2.0, c)
    bshape = (c,) + (1,) * (len(shape) - 2)
    a_c = (gamma / np.sqrt(var + EPS)).astype(dtype).reshape(bshape)
    b_c = (beta - mean * gamma / np.sqrt(var + EPS)).astype(dtype).reshape(bshape)

    def evaluate() -> Any:
        return bn.forward_eval(x, gamma, beta, mean, var)

    def evaluate_plain() -> Any:
        return bn.forward_eval(x, None, None, mean, var)

    def multiply_add() -> Any:
        y = np.empty_like(x)
        np.multiply(x, a_c, out=y)
        np.add(y, b_c, out=y)
        return y

    a_s, b_s = a_c.flat[0], b_c.flat[0]

    def multiply_add_scalars() -> Any:
        y = np.empty_like(x)
        np.multiply(x, a_s, out=y)
        np.add(y, b_s, out=y)
        return y

    evals = best_times(
        {
            "eval": evaluate,
            "eval_plain": evaluate_plain,
            "muladd": multiply_add,
            "scalars": multiply_add_scalars,
        },
        rounds,
    )

    y_ours, cache = bn.forward_train(x, gamma, beta)
    del y_ours
    fwd_mem = peak_multiple(lambda: bn.forward_train(x, gamma, beta), x.nbytes)
    bwd_mem = peak_multiple(lambda: bn.backward(dy, cache), x.nbytes)
    tb_cache = textbook_forward(x, gamma_c, beta_c)[1]
    tb_fwd_mem = peak_multiple(lambda: textbook_forward(x, gamma_c, beta_c), x.nbytes)
    tb_bwd_mem = peak_multiple(lambda: textbook_backward(dy, tb_cache), x.nbytes)

    row: dict[str, Any] = {
        "shape": list(shape),
        "dtype": np.dtype(dtype).name,
        "ours_s": train["ours"],
        "textbook_s": train["textbook"],
        "textbook_over_ours": train["textbook"] / train["ours"],
        "copy_s": train["copy"],
        "ours_over_traffic": train["ours"] / (4 * train["copy"]),
        "fwd_peak_x": fwd_mem,
        "bwd_peak_x": bwd_mem,
        "textbook_fwd_peak_x": tb_fwd_mem,
        "textbook_bwd_peak_x": tb_bwd_mem,
        "eval_s": evals["eval"],
        "muladd_s": evals["muladd"],
        "eval_over_muladd": evals["eval"] / evals["muladd"],
        "eval_plain_s": evals["eval_plain"],
        "eval_plain_over_muladd": evals["eval_plain"] / evals["muladd"],
        "muladd_scalars_s": evals["scalars"],
        "eval_over_scalars": evals["eval"] / evals["scalars"],
    }
    if torch is not None:
        row["torch1_s"] = train["torch1"]
        row["torchN_s"] = train["torchN"]
        row["ours_over_torch1"] = train["ours"] / train["torch1"]
        row["ours_over_torchN"] = train["ours"] / train["torchN"]

    # Accuracy at offsets 0 and 1e4, float32 only (in float64 both are exact to ~1e-12).
    if np.dtype(dtype) == np.float32:
        for key, offset in (("err0", 0.0), ("err", 1e4)):
            xo = (offset + rng.standard_normal(shape)).astype(np.float32)
            ref = float64_reference(xo)
            row[f"{key}_ours"] = float(np.max(np.abs(bn.forward_train(xo)[0] - ref)))
            if torch is not None:
                row[f"{key}_torch"] = float(np.max(np.abs(torch_forward(torch, xo) - ref)))
    return row


def crossover(dtype: np.dtype[Any], rounds: int, sizes: Sequence[int]) -> list[dict[str, Any]]:
    """A training step done the lean way against the streaming way, at sizes around the
    switch (batchnorm._layout.LEAN_VALUES), for (N, 64) and (N, 16, 4, 4) arrays: where the
    lean road stops being faster is where the switch belongs."""
    from batchnorm import _layout

    saved = _layout.LEAN_VALUES
    rows = []
    try:
        for size in sizes:
            for tail in ((64,), (16, 4, 4)):
                shape = (max(2, size // math.prod(tail)), *tail)
                rng = np.random.default_rng(0)
                x = rng.standard_normal(shape).astype(dtype)
                dy = rng.standard_normal(shape).astype(dtype)

                def step(lean: int, x: np.ndarray = x, dy: np.ndarray = dy) -> Callable[[], Any]:
                    def run() -> Any:
                        _layout.LEAN_VALUES = lean
                        _, cache = bn.forward_train(x, np.ones(x.shape[1]), np.zeros(x.shape[1]))
                        return bn.backward(dy, cache)

                    return run

                t = best_times({"lean": step(1 << 62), "streaming": step(-1)}, rounds)
                rows.append(
                    {"shape": list(shape), "lean_over_streaming": t["lean"] / t["streaming"]}
                )
    finally:
        _layout.LEAN_VALUES = saved
    return rows


def precise_overhead(
    dtype: np.dtype[Any], rounds: int, quick: bool, num_batches: int | None = None
) -> dict[str, float]:
    """precise_bn's time over the plain training-mode forward passes it runs.

    The model is three BatchNorm layers with a ReLU after each, so that the BatchNorm work is
    all there is: the ratio is the bookkeeping precise_bn adds (per-call PopulationStats
    updates, saving and restoring the layers). Train mode runs one pass over the batches,
    sequential mode one per layer. Besides a fixed cost per pooled batch, each call pays once
    for fresh memory: the layers' last caches are kept to be restored, so the pass's first
    caches cannot reuse theirs (``num_batches``, default 20, sets how far that is spread)."""
    rng = np.random.default_rng(0)
    shape = (8, 16, 8, 8) if quick else (32, 64, 14, 14)
    count = num_batches or (4 if quick else 20)
    batches = [rng.standard_normal(shape).astype(dtype) for _ in range(count)]
    layers = [bn.BatchNorm(shape[1]) for _ in range(3)]

    def model(x: np.ndarray) -> np.ndarray:
        for layer in layers:
            x = np.maximum(layer(x), 0)
        return x

    def plain() -> None:
        for batch in batches:
            model(batch)

    n = len(batches)
    times = best_times(
        {
            "plain": plain,
            "train": lambda: bn.precise_bn(model, batches, n, layers=layers),
            "sequential": lambda: bn.precise_bn(
                model, batches, n, layers=layers, mode="sequential"
            ),
        },
        rounds,
    )
    return {
        "precise_train_over_forward": times["train"] / times["plain"],
        "precise_sequential_over_forward": times["sequential"] / (len(layers) * times["plain"]),
    }


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = (
        "textbook_over_ours",
        "ours_over_traffic",
        "ours_over_torch1",
        "ours_over_torchN",
        "eval_over_muladd",
        "eval_over_scalars",
        "eval_plain_over_muladd",
    )
    return {k: geomean([r[k] for r in rows if k in r]) for k in keys if any(k in r for r in rows)}


def format_table(rows: list[dict[str, Any]], summary: dict[str, float]) -> str:
    has_torch = any("torch1_s" in r for r in rows)
    cols: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
        ("shape", "<18", lambda r: "(" + ",".join(map(str, r["shape"])) + ")"),
        ("dtype", "<7", lambda r: r["dtype"]),
        ("ours ms", ">8", lambda r: f"{r['ours_s'] * 1e3:.2f}"),
        ("textbook", ">8", lambda r: f"{r['textbook_s'] * 1e3:.2f}"),
    ]
    if has_torch:
        cols += [
            ("torch1", ">7", lambda r: f"{r['torch1_s'] * 1e3:.2f}"),
            ("torchN", ">7", lambda r: f"{r['torchN_s'] * 1e3:.2f}"),
        ]
    cols.append(("tb/ours", ">7", lambda r: f"{r['textbook_over_ours']:.2f}"))
    if has_torch:
        cols += [
            ("ours/t1", ">7", lambda r: f"{r['ours_over_torch1']:.2f}"),
            ("ours/tN", ">7", lambda r: f"{r['ours_over_torchN']:.2f}"),
        ]
    cols += [
        ("ours/4cp", ">8", lambda r: f"{r['ours_over_traffic']:.2f}"),
        ("fwd mem", ">7", lambda r: f"{r['fwd_peak_x']:.2f}"),
        ("bwd mem", ">7", lambda r: f"{r['bwd_peak_x']:.2f}"),
        ("eval/ma", ">7", lambda r: f"{r['eval_over_muladd']:.2f}"),
        ("eval/sc", ">7", lambda r: f"{r['eval_over_scalars']:.2f}"),
        ("ev0/ma", ">6", lambda r: f"{r['eval_plain_over_muladd']:.2f}"),
    ]
    for key, label in (("err0", "err0"), ("err", "err")):
        cols.append((f"{label} ours", ">9", _error(f"{key}_ours")))
        if has_torch:
            cols.append((f"{label} t", ">8", _error(f"{key}_torch")))
    lines = ["  ".join(f"{name:{fmt}}" for name, fmt, _ in cols)]
    lines += ["  ".join(f"{get(r):{fmt}}" for _, fmt, get in cols) for r in rows]
    lines.append("")
    labels = {
        "textbook_over_ours": "textbook / ours (speed-up, goal >= 3)",
        "ours_over_traffic": "ours / 4 copies of x (memory-traffic floor)",
        "ours_over_torch1": "ours / torch, 1 thread (goal <= 1.0)",
        "ours_over_torchN": "ours / torch, all threads",
        "eval_over_muladd": "eval / multiply-add (goal <= 1.2)",
        "eval_over_scalars": "eval / multiply-add with scalars",
        "eval_plain_over_muladd": "eval without gamma, beta / multiply-add",
    }
    lines.append("geometric means over the shapes:")
    lines += [f"  {labels[k]:<42} {v:.2f}" for k, v in summary.items()]
    tb_mem = max(max(r["textbook_fwd_peak_x"], r["textbook_bwd_peak_x"]) for r in rows)
    lines.append(f"  (textbook peak memory, largest of fwd/bwd: {tb_mem:.2f} x input)")
    slowest = min(r["textbook_over_ours"] for r in rows)
    lines.append(f"  (textbook / ours on the shape where it is smallest: {slowest:.2f})")
    return "\n".join(lines)


def _error(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: f"{r[key]:.1e}" if key in r else "-"


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace("(", "").replace(")", "").split(",") if v.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds: a smoke run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per shape (best of N)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--shape",
        type=parse_shape,
        action="append",
        dest="shapes",
        help="a shape such as 32,64,56,56 (repeatable; channel axis 1)",
    )
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument(
        "--crossover", action="store_true", help="only time the lean against the streaming road"
    )
    parser.add_argument(
        "--precise-batches",
        type=int,
        default=None,
        help="batches of precise_bn's pass (default 20; 4 with --quick)",
    )
    args = parser.parse_args(argv)
    if args.precise_batches is not None and args.precise_batches < 1:
        parser.error(f"--precise-batches must be at least 1; got {args.precise_batches}")
    dtype = np.dtype(args.dtype)
    if args.crossover:
        sizes = CROSSOVER_SIZES[:2] if args.quick else CROSSOVER_SIZES
        rows = crossover(dtype, args.rounds or (3 if args.quick else 30), sizes)
        if args.json:
            json.dump(rows, sys.stdout, indent=2)
            print()
            return 0
        print("lean / streaming time of a training step (< 1: the lean road is faster)")
        for r in rows:
            shape = "(" + ", ".join(map(str, r["shape"])) + ")"
            print(
                f"  {shape:<18} {math.prod(r['shape']):>8} values  {r['lean_over_streaming']:.2f}"
            )
        return 0

    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    rounds = args.rounds or (3 if args.quick else 30)
    torch = None if args.no_torch else load_torch()
    if torch is not None:
        torch.set_grad_enabled(False)
        torch.set_num_threads(1)

    rows = [bench_shape(tuple(s), dtype, rounds, torch) for s in shapes]
    summary = summarize(rows)
    precise = precise_overhead(dtype, rounds, args.quick, args.precise_batches)
    env = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "rounds": rounds,
        "quick": args.quick,
    }
    if args.json:
        report = {"env": env, "rows": rows, "geomean": summary, "precise_bn": precise}
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        torch_text = f", torch {env['torch']}" if torch is not None else ", torch not installed"
        print(f"numpy {env['numpy']}{torch_text}, {env['cpu_count']} cores, best of {rounds}")
        print(format_table(rows, summary))
        batches = args.precise_batches or (4 if args.quick else 20)
        title = f"precise_bn over the plain forward passes it runs ({batches} batches)"
        print(f"\n{title} (goal <= 1.10):")
        for key, label in (
            ("precise_train_over_forward", "train mode (one pass)"),
            ("precise_sequential_over_forward", "sequential mode (one pass per layer)"),
        ):
            print(f"  {label:<42} {precise[key]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
