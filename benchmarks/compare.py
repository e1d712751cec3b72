"""Time the kernels against an earlier version of themselves, interleaved in one process.

The earlier ``src/batchnorm`` is taken from git (``git archive REV``) into a temporary folder and
imported under another name, so both versions run on the same arrays, round after round, as in
bench.py (best of N, rotated order, one thread). Prints after / before per shape, for a training
step (forward_train + backward), for the forward alone and for ``forward_eval`` (with gamma and
beta). The current version is timed from a copy loaded the same way. ``--control`` loads a
second copy of it and prints its after / before as well (``copy``): identical code loaded
twice can differ by several percent on some shapes (where arrays and code land in memory),
and the two after / before columns side by side show by how much in the same run.

Usage::

    python benchmarks/compare.py 70c9b6b                      # the shapes of bench.py
    python benchmarks/compare.py 70c9b6b --shape 64,32 --rounds 10
    python benchmarks/compare.py 70c9b6b --control            # with a copy of the current
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
import shutil
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
    return _import_as(folder / "src" / "batchnorm", name)


def load_current(folder: Path, name: str) -> ModuleType:
    """A copy of the batchnorm package imported here, importable as `name`: loaded the way
    the earlier version is, so that neither has the advantage of being imported first."""
    package = folder / name
    shutil.copytree(Path(bn.__file__).parent, package, ignore=shutil.ignore_patterns("*.pyc"))
    return _import_as(package, name)


def _import_as(package: Path, name: str) -> ModuleType:
    """Import the batchnorm package at `package` as `name`, from a folder of its own."""
    for path in package.rglob("*.py"):
        text = re.sub(r"\bbatchnorm\b(?=[ .])", name, path.read_text(encoding="utf-8"))
        path.write_text(text, encoding="utf-8")
    home = package.parent / f"{name}_home"
    home.mkdir()
    package.rename(home / name)
    sys.path.insert(0, str(home))
    return importlib.import_module(name)


def compare(
    new: Any, old: Any, shape: tuple[int, ...], rounds: int, copy: Any = None
) -> dict[str, float]:
    """Times of new (and of copy, a second copy of it) against old, as ratios."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[1]
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    calls = {
        "step": lambda m: lambda: m.backward(dy, m.forward_train(x, gamma, beta)[1]),
        "forward": lambda m: lambda: m.forward_train(x, gamma, beta),
        "eval": lambda m: lambda: m.forward_eval(x, gamma, beta, mean, var),
    }
    versions = {"new": new, "old": old} | ({"copy": copy} if copy is not None else {})
    fns = {f"{v}_{k}": call(m) for k, call in calls.items() for v, m in versions.items()}
    t = best_times(fns, rounds)
    ratios = {"old_s": t["old_step"]}
    ratios |= {k: t[f"new_{k}"] / t[f"old_{k}"] for k in calls}
    if copy is not None:
        ratios |= {f"copy_{k}": t[f"copy_{k}"] / t[f"old_{k}"] for k in calls}
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the earlier version: a commit, tag or branch")
    parser.add_argument("--shape", type=parse_shape, action="append", dest="shapes")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--control", action="store_true", help="also time a copy of the current version"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        new = load_current(Path(tmp), "batchnorm_current")
        old = load_version(args.rev, Path(tmp))
        copy = load_current(Path(tmp), "batchnorm_copy") if args.control else None
        print(f"after / before ({args.rev}), float32, best of {args.rounds}")
        for shape in args.shapes or SHAPES:
            r = compare(new, old, tuple(shape), args.rounds, copy)
            line = (
                f"  {tuple(shape)!s:<18} before {r['old_s'] * 1e6:8.0f} us   step "
                f"{r['step']:.2f}   forward {r['forward']:.2f}   eval {r['eval']:.2f}"
            )
            if copy is not None:
                line += (
                    f"   copy: step {r['copy_step']:.2f}   forward {r['copy_forward']:.2f}"
                    f"   eval {r['copy_eval']:.2f}"
                )
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
