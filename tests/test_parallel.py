"""The data-parallel helpers (allreduce, shuffle, unshuffle) on thread groups and MPI ranks.

The checks (tests/mpi/parallel_checks.py) compare every rank's results with what one process
computes on the whole; here they run on threads of this process, and under mpiexec -n 2 and
-n 4 when mpi4py is installed (each run bounded by a timeout).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import load_module
from test_distributed import run_ranks, thread_group_cases
from test_distributed_mpi import MPI_DIR, run_mpi

from batchnorm import distributed as dist

checks = load_module("parallel_checks", MPI_DIR / "parallel_checks.py")


@pytest.mark.parametrize(("name", "size"), thread_group_cases(checks.CHECKS))
def test_check_on_thread_groups(name: str, size: int) -> None:
    run_ranks(size, checks.CHECKS[name])


@pytest.mark.parametrize("ranks", [2, 4])
def test_every_check_passes_on_mpi_ranks(ranks: int) -> None:
    stdout = run_mpi(ranks, MPI_DIR / "run_parallel_checks.py", timeout=120)
    assert f"passed {len(checks.CHECKS)} checks on {ranks} ranks" in stdout, stdout


def test_every_check_runs() -> None:
    assert len(checks.CHECKS) >= 10


# --- one rank: the errors themselves --------------------------------------------------------------


@pytest.fixture
def solo() -> dist.Group:
    return dist.thread_groups(1)[0]


def test_allreduce_refuses_a_bare_array(solo: dist.Group) -> None:
    with pytest.raises(TypeError, match="list"):
        dist.allreduce(np.ones(3), solo)  # type: ignore[arg-type]


def test_allreduce_refuses_a_bad_group_and_a_bad_average(solo: dist.Group) -> None:
    with pytest.raises(TypeError, match="group must be"):
        dist.allreduce([np.ones(2)], object())  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="average"):
        dist.allreduce([np.ones(2)], solo, average="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-1, (1, -2)])
def test_shuffle_refuses_negative_seeds(solo: dist.Group, seed: object) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        dist.shuffle(np.ones((2, 2)), solo, seed)


@pytest.mark.parametrize("seed", [1.5, "3", None, (), True])
def test_shuffle_refuses_seeds_that_are_not_ints(solo: dist.Group, seed: object) -> None:
    with pytest.raises(TypeError, match="seed must be"):
        dist.shuffle(np.ones((2, 2)), solo, seed)


def test_shuffle_refuses_a_0d_array(solo: dist.Group) -> None:
    with pytest.raises(ValueError, match="axis 0"):
        dist.shuffle(np.float64(1.0), solo, 0)


def test_unshuffle_refuses_a_foreign_token() -> None:
    groups = dist.thread_groups(1)
    with pytest.raises(TypeError, match="ShuffleToken"):
        dist.unshuffle(np.ones((2, 2)), (np.arange(2), (2,), 0), groups[0])
    token = dist.ShuffleToken(np.arange(3), (1, 2), 1)
    with pytest.raises(ValueError, match="rank 1 of a group of 2"):
        dist.unshuffle(np.ones((2, 2)), token, groups[0])


def test_different_seeds_give_different_orders(solo: dist.Group) -> None:
    x = np.arange(50.0)[:, None]
    first, _ = dist.shuffle(x, solo, (0, 1))
    second, _ = dist.shuffle(x, solo, (0, 2))
    assert not np.array_equal(first, second)
    assert np.array_equal(np.sort(first, axis=0), x)
