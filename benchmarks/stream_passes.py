"""Where a streaming training step's time goes: each pass over memory of the streaming road alone.

For each shape (float32, one thread, best of N, interleaved as in bench.py) this times, on
arrays of x's size:

* every pass that ``forward_train`` + ``backward`` run on the streaming road, the way
  ``src/batchnorm/_stream.py`` runs it (the same element-wise view, expanded per-channel rows
  and BLAS sums, called through the same private functions): forward, x - shift into the
  cache, sum(data), sum(data * data), y = x * scale, y += offset; backward, sum(dy),
  sum(dy * data), and dx's four in-place steps. In-place steps add zeros and multiply by ones,
  so that repeated calls keep the values (and the time) of one call;
* the per-channel rows the step expands (one, two and three vectors at a time);
* the whole step (``forward_train`` + ``backward``, argument checks included) and, when
  PyTorch imports, its C++ kernel on one thread (as ``torch1`` in bench.py).

Prints one table per shape: each pass in microseconds and as a share of the whole step, the
sum of the passes, and that sum and the step over PyTorch's step.

Usage::

    python benchmarks/stream_passes.py                      # (256, 1024) and (4096, 64)
    python benchmarks/stream_passes.py --shape 32,256,14,14 --rounds 50
    python benchmarks/stream_passes.py --quick              # a smoke run in seconds
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import argparse
import gc
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
from bench import best_times, load_torch, parse_shape, torch_step

import batchnorm as bn
from batchnorm import _stream

SHAPES = ((256, 1024), (4096, 64))
QUICK_SHAPES = ((512, 32),)
F32 = np.dtype(np.float32)


def passes(x: Any, dy: Any) -> dict[str, Callable[[], Any]]:
    """The streaming road's passes over arrays of x's shape, one callable each."""
    x3, dy3 = _stream.as_pcs(x, 1), _stream.as_pcs(dy, 1)
    p, c, s = x3.shape
    mode, size = _stream._layout(p, c, s, F32.itemsize)
    zeros, ones = np.zeros(c), np.ones(c)
    zero, one = _stream._per_channel(s, mode, size, F32, zeros, ones)
    data, y, dx = (np.zeros_like(x3) for _ in range(3))

    def view(a: Any) -> Any:
        return a.reshape(-1, size) if mode == "rows" else a

    xv, dyv, dv, yv, dxv = (view(a) for a in (x3, dy3, data, y, dx))
    return {
        "forward: x - shift into the cache": lambda: np.subtract(xv, zero, out=dv),
        "forward: sum(data), BLAS": lambda: _stream.channel_sum(data),
        "forward: sum(data * data), einsum": lambda: _stream._channel_dot(data, data),
        "forward: y = x * scale": lambda: np.multiply(xv, one, out=yv),
        "forward: y += offset": lambda: np.add(yv, zero, out=yv),
        "backward: sum(dy), BLAS": lambda: _stream.channel_sum(dy3),
        "backward: sum(dy * data), einsum": lambda: _stream._channel_dot(dy3, data),
        "backward: dx = data * b1": lambda: np.multiply(dv, one, out=dxv),
        "backward: dx += dy": lambda: np.add(dxv, dyv, out=dxv),
        "backward: dx += c1": lambda: np.add(dxv, zero, out=dxv),
        "backward: dx *= a": lambda: np.multiply(dxv, one, out=dxv),
        "per-channel rows, 1 + 2 + 3 vectors": lambda: (
            _stream._per_channel(s, mode, size, F32, zeros),
            _stream._per_channel(s, mode, size, F32, zeros, ones),
            _stream._per_channel(s, mode, size, F32, zeros, ones, zeros),
        ),
    }


def measure(shape: tuple[int, ...], rounds: int, torch: Any) -> dict[str, float]:
    """Seconds per call of every pass, of the whole step and (with torch) of torch1.

    The passes run on buffers kept for them, the step and torch1 afterwards without those:
    the passes' buffers change where the step's new arrays land, and with them its time."""
    rng = np.random.default_rng(0)
    x, dy = (rng.standard_normal(shape).astype(F32) for _ in range(2))
    gamma, beta = rng.uniform(0.5, 1.5, shape[1]), rng.standard_normal(shape[1])
    times = best_times(passes(x, dy), rounds)
    gc.collect()
    whole = {"step": lambda: bn.backward(dy, bn.forward_train(x, gamma, beta)[1])}
    if torch is not None:
        torch.set_num_threads(1)
        whole["torch1"] = torch_step(torch, x, gamma, beta, dy)
    return times | best_times(whole, rounds)


def report(shape: tuple[int, ...], t: dict[str, float]) -> str:
    step = t["step"]
    names = [name for name in t if name not in ("step", "torch1")]
    total = sum(t[name] for name in names)
    lines = [f"{shape}, float32: one step {step * 1e6:.0f} us"]
    lines.append(f"  {'pass':<38} {'us':>7} {'step':>6}")
    lines += [f"  {name:<38} {t[name] * 1e6:7.1f} {t[name] / step:6.2f}" for name in names]
    lines.append(f"  {'sum of the passes':<38} {total * 1e6:7.1f} {total / step:6.2f}")
    if "torch1" in t:
        torch1 = t["torch1"]
        lines.append(
            f"  torch1 {torch1 * 1e6:.0f} us: passes / torch1 {total / torch1:.2f}, "
            f"step / torch1 {step / torch1:.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=parse_shape, action="append", dest="shapes")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--quick", action="store_true", help="a tiny shape, 3 rounds, no torch")
    args = parser.parse_args(argv)
    torch = None if args.no_torch or args.quick else load_torch()
    shapes = QUICK_SHAPES if args.quick else args.shapes or SHAPES
    rounds = 3 if args.quick else args.rounds
    print(f"streaming road, one thread, best of {rounds}")
    for shape in shapes:
        print(report(tuple(shape), measure(tuple(shape), rounds, torch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
