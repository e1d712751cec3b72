"""Ranks that stop doing the same thing, on thread groups: every rank raises, none hangs.

The faults themselves are in tests/mpi/faults.py; tests/test_distributed_mpi.py runs them on
MPI ranks. Here each rank is a thread with a fresh group whose allgather waits 3 s at most.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import load_module

import batchnorm as bn
from batchnorm import distributed as dist

faults = load_module("distributed_faults", Path(__file__).resolve().parent / "mpi" / "faults.py")
TIMEOUT = 3.0


def run_threads(size: int, work: Any) -> list[BaseException | None]:
    """work(group) on `size` threads of one fresh group; every thread's error, or None."""
    groups = dist.thread_groups(size, timeout=TIMEOUT)
    errors: list[BaseException | None] = [None] * size

    def target(rank: int) -> None:
        try:
            work(groups[rank])
        except BaseException as err:
            errors[rank] = err

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT + 60)
    assert not any(thread.is_alive() for thread in threads), "a rank hangs"
    return errors


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("name", sorted(faults.FAULTS))
def test_fault_on_thread_groups(name: str, size: int) -> None:
    errors = run_threads(size, faults.FAULTS[name])
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]


def test_every_fault_runs() -> None:
    assert len(faults.FAULTS) == 8


def test_fail_raises_the_error_on_a_group_of_one() -> None:
    group = dist.thread_groups(1)[0]
    error = KeyError("label")
    with pytest.raises(KeyError) as caught:
        dist.fail(group, error)
    assert caught.value is error


def test_fail_needs_a_group_and_an_exception() -> None:
    with pytest.raises(TypeError, match="group must be"):
        dist.fail(None, KeyError("x"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Exception instance"):
        dist.fail(dist.thread_groups(1)[0], "x")  # type: ignore[arg-type]


def test_an_error_from_an_exchange_is_not_reported_twice() -> None:
    """An error every rank has already raised: reporting does not start a new exchange."""

    def work(group: Any) -> None:
        layer = bn.BatchNorm(3, group=group)
        x = np.ones((4, 2 if group.rank == 1 else 3))  # rank 1: wrong C
        with pytest.raises(ValueError), dist.reporting(group):
            layer(x)
        # Had rank 1 reported again, rank 0 would meet its report in this step and raise.
        layer(np.random.default_rng(group.rank).normal(size=(4, 3)))
        assert layer.num_batches_tracked == 1

    errors = run_threads(2, work)
    assert errors == [None, None], errors


def test_a_failing_rank_says_what_it_raised() -> None:
    def work(group: Any) -> None:
        x = np.random.default_rng(0).normal(size=(4, 3))
        bad = x[:, :2] if group.rank == 1 else x
        with pytest.raises(ValueError) as caught:
            bn.BatchNorm(3, group=group)(bad)
        if group.rank == 0:
            said = str(caught.value)
            assert "rank 1 of this group of 2 raised ValueError" in said
            assert (
                "Rank 1 reported: ValueError in the synchronized forward pass of BatchNorm #0"
                in said
            )
            assert "expected 3 channels" in said, said

    assert run_threads(2, work) == [None, None]


def test_ranks_with_different_dtypes_raise() -> None:
    def work(group: Any) -> None:
        x = np.random.default_rng(0).normal(size=(4, 3))
        layer = bn.BatchNorm(3, group=group)
        with pytest.raises(ValueError, match="not in the same exchange") as caught:
            layer(x.astype(np.float32) if group.rank == 1 else x)
        assert "(C=3, float64, exchange 1" in str(caught.value)
        assert "(C=3, float32, exchange 1" in str(caught.value)
        assert layer.num_batches_tracked == 0

    assert run_threads(2, work) == [None, None]


def test_a_timeout_names_the_exchange_and_the_causes() -> None:
    groups = dist.thread_groups(2, timeout=0.2)
    layer = bn.BatchNorm(3, group=groups[0])
    with pytest.raises(RuntimeError, match="timed out") as caught:
        layer(np.ones((4, 3)))  # rank 1 never calls
    said = str(caught.value)
    assert "in the synchronized forward pass of BatchNorm #0 (C=3, float64" in said, said
    assert "eval mode" in said and "dist.fail" in said


@pytest.mark.parametrize(
    ("options", "match"),
    [({"on_timeout": "ignore"}, "on_timeout"), ({"timeout": 0}, "timeout"),
     ({"timeout": "5"}, "timeout")],
)  # fmt: skip
def test_mpigroup_checks_its_options_before_importing_mpi4py(options: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dist.MPIGroup(**options)
