"""Checks of the data-parallel helpers (allreduce, shuffle, unshuffle), run by every rank.

Each check builds what every rank holds from a seeded generator (the same on every rank), takes
its own part, and asserts against what one process computes on the whole. tests/test_parallel.py
runs them on thread groups; tests/mpi/run_parallel_checks.py runs them on MPI ranks under
mpiexec (tests/test_parallel.py launches it, with a timeout).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from batchnorm import distributed as dist

Array = np.ndarray[Any, Any]


def sizes_for(size: int, empty: bool) -> list[int]:
    """Unequal parts (3, 1, 4, 2, ...); with `empty`, rank 0's part is empty."""
    sizes = [(3, 1, 4, 2)[r % 4] for r in range(size)]
    if empty:
        sizes[0] = 0
    return sizes


def part_of(whole: Array, sizes: list[int], rank: int) -> Array:
    start = sum(sizes[:rank])
    return whole[start : start + sizes[rank]]


def _shared_helpers() -> ModuleType:
    """tests/mpi/checks.py, whose helpers these checks share, loaded by path (this module runs
    under pytest and under mpiexec, with different import paths)."""
    if "mpi_checks" not in sys.modules:
        path = Path(__file__).resolve().parent / "checks.py"
        spec = importlib.util.spec_from_file_location("mpi_checks", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["mpi_checks"] = module
        spec.loader.exec_module(module)
    return sys.modules["mpi_checks"]


same_everywhere = _shared_helpers().same_everywhere
raises_everywhere = _shared_helpers().raises_everywhere


# --- allreduce ------------------------------------------------------------------------------------


def check_allreduce_is_the_rank_order_sum(group: dist.Group) -> None:
    rng = np.random.default_rng(5)
    every = [[rng.normal(size=(3, 2)), rng.normal(size=4).astype(np.float32), rng.normal(size=())]
             for _ in range(group.size)]  # fmt: skip
    mine = every[group.rank]
    kept = [a.copy() for a in mine]
    summed = dist.allreduce(mine, group)
    averaged = dist.allreduce(mine, group, average=True)
    for i, a in enumerate(mine):
        expected = every[0][i].astype(np.float64)
        for r in range(1, group.size):
            expected = expected + every[r][i]
        assert summed[i].dtype == a.dtype and summed[i].shape == a.shape
        assert summed[i].tobytes() == expected.astype(a.dtype).tobytes()
        assert averaged[i].tobytes() == (expected / group.size).astype(a.dtype).tobytes()
        assert np.array_equal(a, kept[i]), "input changed"
    same_everywhere(group, *summed, *averaged)


def check_allreduce_is_one_collective(group: dist.Group) -> None:
    calls = []

    class Counting:
        rank, size = group.rank, group.size

        def allgather(self, array: Array) -> list[Array]:
            calls.append(1)
            return group.allgather(array)

    out = dist.allreduce([np.ones(3), np.ones((2, 2))], Counting())
    assert len(calls) == 1 and out[1].tolist() == [[group.size] * 2] * 2
    assert dist.allreduce([], group) == []


def check_allreduce_shape_mismatch_raises_everywhere(group: dist.Group) -> None:
    bad = group.size - 1
    shape = (3,) if group.rank != bad else (4,)
    try:
        dist.allreduce([np.ones(shape)], group)
    except ValueError as err:
        assert "disagree on the arrays of allreduce" in str(err), str(err)
    else:
        raise AssertionError("no ValueError")


def check_allreduce_bad_input_raises_everywhere(group: dist.Group) -> None:
    bad = group.size - 1
    arrays: Any = [np.ones(2)] if group.rank != bad else [np.arange(2)]
    raises_everywhere(
        group, bad, TypeError, "dtype float16, float32 or float64",
        lambda: dist.allreduce(arrays, group),
    )  # fmt: skip


# --- shuffle and unshuffle ------------------------------------------------------------------------


def shuffle_round_trip(group: dist.Group, empty: bool, dtype: Any) -> None:
    sizes = sizes_for(group.size, empty)
    rng = np.random.default_rng(11)
    whole = rng.normal(size=(sum(sizes), 3, 2)).astype(dtype)
    whole[:1, 0, 0] = -0.0
    x = part_of(whole, sizes, group.rank)
    xs, token = dist.shuffle(x, group, seed=(3, 1))
    assert xs.shape == x.shape and xs.dtype == x.dtype
    assert token.sizes == tuple(sizes) and token.rank == group.rank
    perm = np.random.default_rng(np.random.SeedSequence((3, 1))).permutation(sum(sizes))
    assert np.array_equal(token.permutation, perm)
    assert xs.tobytes() == whole[part_of(perm, sizes, group.rank)].tobytes()
    back = dist.unshuffle(xs, token, group)
    assert back.dtype == x.dtype and back.tobytes() == x.tobytes(), "not the exact inverse"
    # Any per-sample function commutes with the round trip, and its output may change shape.
    features = dist.unshuffle(np.stack([xs.sum(axis=(1, 2)), xs[:, 0, 0]], axis=1), token, group)
    expected = np.stack([x.sum(axis=(1, 2)), x[:, 0, 0]], axis=1)
    assert features.tobytes() == expected.tobytes()
    again, token_again = dist.shuffle(x, group, seed=(3, 1))
    assert again.tobytes() == xs.tobytes(), "not deterministic for a seed"
    same_everywhere(group, token.permutation, token_again.permutation)


def check_shuffle_round_trip_unequal_parts(group: dist.Group) -> None:
    for dtype in (np.float64, np.float32, np.float16):
        shuffle_round_trip(group, False, dtype)


def check_shuffle_round_trip_with_an_empty_part(group: dist.Group) -> None:
    shuffle_round_trip(group, True, np.float64)


def check_shuffle_of_nothing(group: dist.Group) -> None:
    xs, token = dist.shuffle(np.zeros((0, 4)), group, seed=1)
    assert xs.shape == (0, 4) and token.permutation.size == 0
    assert dist.unshuffle(xs, token, group).shape == (0, 4)


def check_shuffle_mixes_ranks(group: dist.Group) -> None:
    """With 8 samples per rank, some of every rank's shuffled part come from other ranks."""
    if group.size == 1:
        return
    x = np.full((8, 1), float(group.rank))
    xs, _ = dist.shuffle(x, group, seed=0)
    assert (xs[:, 0] != group.rank).any()


def check_shuffle_seed_mismatch_raises_everywhere(group: dist.Group) -> None:
    seed = 1 if group.rank != group.size - 1 else 2
    try:
        dist.shuffle(np.ones((2, 3)), group, seed=seed)
    except ValueError as err:
        assert "different seeds" in str(err), str(err)
    else:
        raise AssertionError("no ValueError")


def check_shuffle_bad_input_raises_everywhere(group: dist.Group) -> None:
    bad = group.size - 1
    x: Any = np.ones((2, 3)) if group.rank != bad else np.ones((2, 3), dtype=int)
    raises_everywhere(group, bad, TypeError, "dtype float16", lambda: dist.shuffle(x, group, 0))
    x = np.ones((2, 3)) if group.rank != bad else np.ones((2, 4))
    try:
        dist.shuffle(x, group, 0)
    except ValueError as err:
        assert "disagree on the arrays of shuffle" in str(err), str(err)
    else:
        raise AssertionError("no ValueError")


def check_unshuffle_wrong_rows_raises_everywhere(group: dist.Group) -> None:
    bad = group.size - 1
    xs, token = dist.shuffle(np.ones((3, 2)), group, seed=4)
    y = xs if group.rank != bad else xs[:2]
    raises_everywhere(
        group, bad, ValueError, "y has 2 samples", lambda: dist.unshuffle(y, token, group)
    )


CHECKS: dict[str, Callable[[dist.Group], None]] = {
    name[len("check_") :]: function
    for name, function in sorted(globals().items())
    if name.startswith("check_") and callable(function)
}
