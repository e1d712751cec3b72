"""Synchronized BatchNorm and PreciseBN across a group, on thread groups.

The checks themselves (tests/mpi/checks.py) compare every rank's results with single-process
BatchNorm on the concatenated batch; tests/test_distributed_mpi.py runs the same checks on MPI
ranks. Here each rank is a thread of this process.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import load_module
from hypothesis import given, settings
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm import distributed as dist

checks = load_module("distributed_checks", Path(__file__).resolve().parent / "mpi" / "checks.py")
# Ranks with fewer batches than asked warn (checked below); the checks give them few on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:precise_bn. asked for:UserWarning")


def run_ranks(size: int, work: Callable[[Any], Any], timeout: float = 30.0) -> list[Any]:
    """work(group) on `size` threads, one rank each; every rank's result, or the first error."""
    groups = dist.thread_groups(size, timeout=timeout)
    results: list[Any] = [None] * size
    errors: list[BaseException | None] = [None] * size

    def target(rank: int) -> None:
        try:
            results[rank] = work(groups[rank])
        except BaseException as err:
            errors[rank] = err
            groups[rank].abort()  # release the others at once

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 10)
    assert not any(thread.is_alive() for thread in threads), "a rank hangs"
    # The error of the rank that failed first, not the broken-group errors it caused.
    failed = [e for e in errors if e is not None]
    failed.sort(key=lambda e: "group is now broken" in str(e))
    if failed:
        raise failed[0]
    return results


def thread_group_cases(names: Iterable[str]) -> list[tuple[str, int]]:
    """(check name, group size) pairs: every check on groups of 1 to 4 threads, except that a
    fault on one rank of a group of one is the single-process case: those run from size 2."""
    return [
        (name, size)
        for name in sorted(names)
        for size in (1, 2, 3, 4)
        if size > 1 or "raises_everywhere" not in name
    ]


@pytest.mark.parametrize(("name", "size"), thread_group_cases(checks.CHECKS))
def test_check_on_thread_groups(name: str, size: int) -> None:
    run_ranks(size, checks.CHECKS[name])


def test_every_check_runs() -> None:
    assert len(checks.CHECKS) >= 15


# --- groups ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 5])
def test_thread_groups_have_ranks_in_order(size: int) -> None:
    groups = dist.thread_groups(size)
    assert [g.rank for g in groups] == list(range(size))
    assert {g.size for g in groups} == {size}
    parts = run_ranks(size, lambda g: g.allgather(np.arange(g.rank + 1, dtype=float)))
    for got in parts:
        assert [p.tolist() for p in got] == [list(range(r + 1)) for r in range(size)]


def test_a_rank_that_stops_calling_times_out_the_others() -> None:
    groups = dist.thread_groups(2, timeout=0.2)
    with pytest.raises(RuntimeError, match="timed out"):
        groups[0].allgather(np.zeros(1))  # rank 1 never calls
    with pytest.raises(RuntimeError, match="broken"):
        groups[1].allgather(np.zeros(1))  # and the group stays broken


def test_abort_releases_a_waiting_rank() -> None:
    groups = dist.thread_groups(2, timeout=None)
    caught: list[BaseException] = []

    def wait() -> None:
        try:
            groups[0].allgather(np.zeros(1))
        except RuntimeError as err:
            caught.append(err)

    thread = threading.Thread(target=wait)
    thread.start()
    groups[1].abort()
    thread.join(10)
    assert not thread.is_alive() and len(caught) == 1


@pytest.mark.parametrize(
    ("size", "error"),
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), (2.0, TypeError), (True, TypeError),
     ("2", TypeError)],
)  # fmt: skip
def test_thread_groups_size_must_be_a_positive_int(size: Any, error: type) -> None:
    with pytest.raises(error, match="positive int"):
        dist.thread_groups(size)


@pytest.mark.parametrize("timeout", [0, -1.0, "1"])
def test_thread_groups_timeout_must_be_positive(timeout: Any) -> None:
    with pytest.raises(ValueError, match="timeout"):
        dist.thread_groups(2, timeout=timeout)


class NotAGroup:
    rank, size = 0, 1


@pytest.mark.parametrize("group", [NotAGroup(), 3, "world"])
def test_a_group_needs_rank_size_and_allgather(group: Any) -> None:
    with pytest.raises(TypeError, match="allgather"):
        bn.BatchNorm(2, group=group)
    with pytest.raises(TypeError, match="allgather"):
        dist.synchronize([bn.BatchNorm(2)], group)


def test_the_kernels_need_a_group() -> None:
    x = np.ones((3, 2))
    with pytest.raises(TypeError, match="group must be"):
        dist.forward_train(x, None, None, None)  # type: ignore[arg-type]
    _, cache = bn.forward_train(x + np.arange(3)[:, None], None, None)
    with pytest.raises(TypeError, match="group must be"):
        dist.backward(x, cache, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="group must be"):
        bn.PopulationStats(2).allreduce(None)  # type: ignore[arg-type]


def test_a_user_group_works() -> None:
    class Solo:
        rank, size = 0, 1

        def allgather(self, array: Any) -> list[Any]:
            return [array]

    layer = bn.BatchNorm(2, group=Solo())
    x = np.random.default_rng(0).normal(size=(5, 2))
    assert np.array_equal(layer(x), bn.BatchNorm(2)(x))
    assert "group=" in repr(layer)


def test_a_group_that_returns_the_wrong_list_is_reported() -> None:
    class Broken:
        rank, size = 0, 2

        def allgather(self, array: Any) -> list[Any]:
            return [array]

    with pytest.raises(RuntimeError, match="one array per rank"):
        dist.forward_train(np.ones((3, 2)), None, None, Broken())


@pytest.mark.filterwarnings("default")
def test_a_rank_with_fewer_batches_warns_about_its_own() -> None:
    layer = bn.BatchNorm(2)
    with pytest.warns(UserWarning, match="data of this rank gave only 1; the statistics are "
                      "those of every rank's batches"):  # fmt: skip
        bn.precise_bn(layer, [np.ones((3, 2))], 5, group=dist.thread_groups(1)[0])
    assert layer.running_mean is not None and np.array_equal(layer.running_mean, np.ones(2))


def test_the_group_is_not_saved(tmp_path: Path) -> None:
    layer = bn.BatchNorm(2, group=dist.thread_groups(1)[0])
    assert bn.BatchNorm.load(layer.save(tmp_path / "layer")).group is None


# --- mpi4py stays optional ------------------------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_importing_batchnorm_does_not_import_mpi4py() -> None:
    done = _python(
        "import sys, batchnorm, batchnorm.distributed as d; d.thread_groups(2); "
        "print('mpi4py' in sys.modules)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_mpigroup_without_mpi4py_says_how_to_install() -> None:
    done = _python(
        "import sys; sys.modules['mpi4py'] = None\n"
        "from batchnorm import distributed as d\n"
        "try:\n    d.MPIGroup()\nexcept ImportError as err:\n    print(err)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'batchnorm[mpi]'" in done.stdout


# --- any split of a batch -------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 4), min_size=1, max_size=4).filter(lambda s: sum(s) >= 2),
    seed=st.integers(0, 2**16),
)
def test_any_split_gives_the_whole_batch_result(sizes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(rng.uniform(-5, 5), rng.uniform(0.1, 5), size=(sum(sizes), 3, 2))
    dy = rng.normal(size=x.shape)
    y_ref, cache = bn.forward_train(x, np.ones(3), np.zeros(3))
    dx_ref, _, _ = bn.backward(dy, cache)
    bounds = np.cumsum([0, *sizes])

    def work(group: Any) -> tuple[Any, Any]:
        part = slice(bounds[group.rank], bounds[group.rank + 1])
        y, c = dist.forward_train(x[part], np.ones(3), np.zeros(3), group)
        return y, dist.backward(dy[part], c, group)[0]

    results = run_ranks(len(sizes), work)
    y = np.concatenate([r[0] for r in results])
    dx = np.concatenate([r[1] for r in results])
    checks.close(y, y_ref, "y")
    checks.close(dx, dx_ref, "dx")


@pytest.mark.parametrize("variant", ["ghost", "renorm"])
def test_synchronize_refuses_variants_without_changing_any_layer(variant: str) -> None:
    plain = bn.BatchNorm(3)
    other = bn.BatchNorm(3, ghost_batch_size=4) if variant == "ghost" else bn.BatchRenorm(3)
    group = dist.thread_groups(1)[0]
    with pytest.raises(ValueError, match="cannot be combined with a group"):
        dist.synchronize([plain, other], group)
    assert plain.group is None and other.group is None
    assert dist.synchronize([plain, other], None) == [plain, other]  # making local is fine


def test_ghost_batches_with_a_group_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="ghost_batch_size cannot be combined with a group"):
        bn.BatchNorm(3, ghost_batch_size=4, group=dist.thread_groups(1)[0])


def test_backward_before_forward_on_one_rank_raises_on_every_rank() -> None:
    groups = dist.thread_groups(2, timeout=20.0)
    errors: list[BaseException | None] = [None, None]
    x = np.random.default_rng(0).normal(size=(4, 3))

    def rank(r: int) -> None:
        layer = bn.BatchNorm(3, group=groups[r])
        try:
            if r == 0:
                layer.backward(layer(x))
            else:
                layer.backward(x)  # no forward on this rank
        except BaseException as err:
            errors[r] = err

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a rank hangs"
    assert isinstance(errors[1], RuntimeError) and "forward" in str(errors[1])
    assert isinstance(errors[0], RuntimeError)
    assert "rank 1 of this group of 2 raised RuntimeError" in str(errors[0])
