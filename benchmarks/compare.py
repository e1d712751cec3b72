"""Time the kernels against an earlier version of themselves, interleaved in one process.

The earlier ``src/batchnorm`` is taken from git (``git archive REV``) into a temporary folder and
imported under another name, so both versions run on the same arrays, round after round, as in
bench.py (best of N, rotated order, one thread). Prints after / before per shape, for a training
step (forward_train + backward) and for the forward alone.

Usage::

    python benchmarks/compare.py 70c9b6b                      # the shapes of bench.py
    python benchmarks/compare.py 70c9b6b --shape 64,32 --rounds 10
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import argparse
import importlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from bench import SHAPES, best_times, parse_shape

import batchnorm as bn

ROOT = Path(__file__).resolve().parents[1]


def load_version(rev: str, folder: Path) -> ModuleType:
    """src/batchnorm at `rev`, importable as batchnorm_<rev>."""
    name = "batchnorm_" + re.sub(r"\W", "_", rev)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src/batchnorm"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / "src" / "batchnorm"
    for path in package.rglob("*.py"):
        text = re.sub(r"\bbatchnorm\b(?=[ .])", name, path.read_text(encoding="utf-8"))
        path.write_text(text, encoding="utf-8")
    package.rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def compare(old: Any, shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, shape[1]), rng.standard_normal(shape[1])

    def step(module: Any) -> Any:
        return lambda: module.backward(dy, module.forward_train(x, gamma, beta)[1])

    def forward(module: Any) -> Any:
        return lambda: module.forward_train(x, gamma, beta)

    t = best_times(
        {"new": step(bn), "old": step(old), "new_f": forward(bn), "old_f": forward(old)}, rounds
    )
    return {"old_s": t["old"], "step": t["new"] / t["old"], "forward": t["new_f"] / t["old_f"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the earlier version: a commit, tag or branch")
    parser.add_argument("--shape", type=parse_shape, action="append", dest="shapes")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = load_version(args.rev, Path(tmp))
        print(f"after / before ({args.rev}), float32, best of {args.rounds}")
        for shape in args.shapes or SHAPES:
            r = compare(old, tuple(shape), args.rounds)
            print(
                f"  {tuple(shape)!s:<18} before {r['old_s'] * 1e6:8.0f} us   step "
                f"{r['step']:.2f}   forward {r['forward']:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
