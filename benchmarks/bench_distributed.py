"""Time a synchronized BatchNorm training step against a local one, as a ratio.

Every rank holds a part of the given shape (the per-worker batch; the bench's conv shape
(32, 256, 14, 14) float32 by default) and times, round after round, interleaved:

* ``local``: ``bn.forward_train`` + ``bn.backward`` on its part (no communication);
* ``sync``: ``dist.forward_train`` + ``dist.backward`` over the group (two allgathers of O(C)
  values each, the statistics of every rank's part);
* ``alone``: the same synchronized kernels on a thread group of one: the staged arithmetic
  without any communication or waiting, to tell the two costs apart.

Each keeps its best round (``time.perf_counter``); the ranks meet in an allgather before each
timed call, so that a synchronized step is not charged for a rank that started late. Rank 0
prints the slowest rank's times, the ratios sync/local and alone/local, and the bytes each rank
sends per step (measured on one untimed step).

Usage::

    mpiexec -n 2 python benchmarks/bench_distributed.py            # docs/distributed.md
    mpiexec -n 2 python benchmarks/bench_distributed.py --json
    python benchmarks/bench_distributed.py --quick                 # one process, a smoke run

Without mpiexec the script is a group of one (mpi4py missing: a thread group of one).
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # One BLAS thread per rank, as in bench.py (before NumPy loads).
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import batchnorm as bn
from batchnorm import distributed as dist


def group_of_this_process() -> Any:
    """MPI.COMM_WORLD when mpi4py is installed (size 1 without mpiexec), else a thread group."""
    try:
        return dist.MPIGroup()
    except ImportError:
        return dist.thread_groups(1)[0]


def best_of(group: Any, steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best time in seconds of each step over `rounds` interleaved rounds."""
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            group.allgather(np.zeros(1))  # start together
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


class Measuring:
    """A group that records the size in bytes of every array this rank sends."""

    def __init__(self, group: Any) -> None:
        self.group, self.rank, self.size = group, group.rank, group.size
        self.sent: list[int] = []

    def allgather(self, array: Any) -> list[Any]:
        self.sent.append(np.asarray(array).nbytes)
        parts: list[Any] = self.group.allgather(array)
        return parts


def measure(group: Any, shape: tuple[int, ...], dtype: str, rounds: int) -> dict[str, Any]:
    rng = np.random.default_rng(group.rank)
    x = rng.normal(3.0, 2.0, size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    c = shape[1]
    gamma, beta = np.ones(c), np.zeros(c)

    def local() -> object:
        _, cache = bn.forward_train(x, gamma, beta)
        return bn.backward(dy, cache)

    def sync() -> object:
        _, cache = dist.forward_train(x, gamma, beta, group)
        return dist.backward(dy, cache, group)

    solo = dist.thread_groups(1)[0]

    def alone() -> object:
        _, cache = dist.forward_train(x, gamma, beta, solo)
        return dist.backward(dy, cache, solo)

    measuring = Measuring(group)  # one untimed step: what each exchange sends
    _, cache = dist.forward_train(x, gamma, beta, measuring)
    dist.backward(dy, cache, measuring)
    best = best_of(group, {"local": local, "sync": sync, "alone": alone}, rounds)
    # Slowest rank's best: a synchronized step is as fast as its slowest rank.
    parts = group.allgather(np.array(list(best.values())))
    worst = np.max(parts, axis=0)
    return {
        "ranks": group.size,
        "shape": list(shape),
        "dtype": dtype,
        "local_ms": worst[0] * 1e3,
        "sync_ms": worst[1] * 1e3,
        "alone_ms": worst[2] * 1e3,
        "ratio": worst[1] / worst[0],
        "ratio_alone": worst[2] / worst[0],
        # float64 per rank: status, fingerprint (5), C, count, mean, var, mean_lo / status,
        # fingerprint, C, the 2C sums; as measured.
        "bytes_forward": measuring.sent[0],
        "bytes_backward": measuring.sent[1],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs="+", default=[32, 256, 14, 14])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="shape (8, 16, 4, 4), 3 rounds")
    args = p.parse_args(argv)
    shape, rounds = ((8, 16, 4, 4), 3) if args.quick else (tuple(args.shape), args.rounds)
    group = group_of_this_process()
    result = measure(group, shape, args.dtype, rounds)
    if group.rank == 0:
        if args.json:
            print(json.dumps(result))
        else:
            print(
                f"{result['ranks']} ranks, part {tuple(shape)} {args.dtype} per rank: "
                f"local {result['local_ms']:.2f} ms, sync {result['sync_ms']:.2f} ms, "
                f"alone {result['alone_ms']:.2f} ms; sync/local {result['ratio']:.2f}, "
                f"alone/local {result['ratio_alone']:.2f}; sent per rank and step: forward "
                f"{result['bytes_forward']} B, backward {result['bytes_backward']} B"
            )
    return result


if __name__ == "__main__":
    main()
