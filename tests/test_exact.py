"""Every float64 road within 8 units of 2^-52 of exact arithmetic, at offsets 0 to 1e8.

x = offset + N(0, 1): the mean carries the offset's digits, the centred data the rest, and a
road that rounds the mean to one float64 before subtracting it loses log10(offset) digits
(docs/math.md, "Exact at any offset"). The reference is 60-digit decimal arithmetic
(tests/exact.py). Arrays are judged normwise, dgamma and dbeta relative to the sum of their
terms' magnitudes, population statistics relative to themselves.
"""

from __future__ import annotations

import decimal
import threading
from typing import Any

import exact
import numpy as np
import pytest
from test_distributed_mpi import MPI_DIR, run_mpi

import batchnorm as bn
from batchnorm import distributed as dist
from batchnorm import functional as F

BOUND = 8.0  # units of 2^-52
OFFSETS = [0.0, 1e4, 1e6, 1e8]
SHAPES = {
    "small (64, 3)": ((64, 3), 1),
    "conv (4, 3, 6, 6)": ((4, 3, 6, 6), 1),
    "5-D (2, 3, 3, 4, 5)": ((2, 3, 3, 4, 5), 1),
    "channels-last (4, 5, 5, 3)": ((4, 5, 5, 3), -1),
    "streaming (8, 3, 32, 40)": ((8, 3, 32, 40), 1),  # above the lean road's 8192 values
    "streaming (B, C) (3000, 4)": ((3000, 4), 1),
}


def draw(shape: tuple[int, ...], offset: float, axis: int = 1, seed: int = 0) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = offset + rng.standard_normal(shape)
    return x, rng.standard_normal(shape), rng.uniform(0.5, 2.0, c), rng.standard_normal(c)


def assert_exact(y: Any, dx: Any, dgamma: Any, dbeta: Any, ref: dict[str, Any]) -> None:
    errors = {
        "y": exact.units(y, ref["y"]),
        "dx": exact.units(dx, ref["dx"]),
        "dgamma": exact.sum_units(dgamma, ref["dgamma"], ref["dgamma_scale"]),
        "dbeta": exact.sum_units(dbeta, ref["dbeta"], ref["dbeta_scale"]),
    }
    assert max(errors.values()) <= BOUND, errors


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("name", SHAPES)
def test_forward_and_backward_are_exact(name: str, offset: float) -> None:
    shape, axis = SHAPES[name]
    x, dy, gamma, beta = draw(shape, offset, axis)
    y, cache = bn.forward_train(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = bn.backward(dy, cache)
    assert_exact(y, dx, dgamma, dbeta, exact.forward_backward(x, dy, gamma, beta, axis=axis))


def chain(
    x: Any, dy: Any, gamma: Any, beta: Any, cuts: list[int], as_tuple: bool
) -> tuple[Any, ...]:
    """The stages by hand: moments per part, combine, forward_train(stats=), sums, dx."""
    parts, dys = np.split(x, cuts), np.split(dy, cuts)
    found = [F.moments(p) for p in parts]
    stats = F.combine_moments(
        [m.mean for m in found], [m.var for m in found], [m.count for m in found],
        means_lo=[m.mean_lo for m in found],
    )  # fmt: skip
    if as_tuple:  # the plain 4-tuple, as a kernel written elsewhere would pass it
        stats = (stats.mean, stats.var, stats.count, stats.mean_lo)
    outs = [bn.forward_train(p, gamma, beta, stats=stats) for p in parts]
    sums = [F.backward_sums(d, cache) for d, (_, cache) in zip(dys, outs, strict=True)]
    sum_dy, sum_dy_xhat = np.sum([s[0] for s in sums], 0), np.sum([s[1] for s in sums], 0)
    dx = [F.backward_input(d, c, sum_dy, sum_dy_xhat) for d, (_, c) in zip(dys, outs, strict=True)]
    return np.concatenate([y for y, _ in outs]), np.concatenate(dx), sum_dy_xhat, sum_dy


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize(
    ("shape", "cuts"),
    [((64, 3), [40]), ((64, 3), [0, 30, 30, 31]), ((3000, 4), [1000, 2999])],
    ids=["two parts", "empty and one-row parts", "streaming parts"],
)
@pytest.mark.parametrize("as_tuple", [False, True], ids=["Moments", "4-tuple"])
def test_stages_chained_by_hand_are_exact(shape: Any, cuts: Any, offset: float, as_tuple: bool):
    x, dy, gamma, beta = draw(shape, offset)
    result = chain(x, dy, gamma, beta, cuts, as_tuple)
    assert_exact(*result, exact.forward_backward(x, dy, gamma, beta))


def test_moments_is_a_three_tuple_with_the_mean_remainder() -> None:
    x = 1e8 + np.random.default_rng(1).standard_normal((50, 2))
    mean, var, count = found = F.moments(x)
    assert (found.mean, found.var, found.count) == (mean, var, count) and count == 50
    exact_mean, _ = exact.statistics(x)
    hi_lo = [
        decimal.Decimal(h) + decimal.Decimal(lo) for h, lo in zip(mean, found.mean_lo, strict=True)
    ]
    err = max(abs(v - e) / abs(e) for v, e in zip(hi_lo, exact_mean, strict=True))
    assert float(err) < 2.0**-80  # hi + lo: far below one float64's precision
    assert np.abs(found.mean_lo).max() > 0  # the remainder is not zero at this offset


def test_old_three_tuple_stats_still_work() -> None:
    x = np.random.default_rng(2).standard_normal((8, 3))
    mean, var, count = F.moments(x)
    y_old, _ = bn.forward_train(x, stats=(mean, var, count))
    y_new, _ = bn.forward_train(x, stats=F.moments(x))
    assert np.abs(y_old - y_new).max() <= 1e-14


def test_bad_mean_lo_is_refused() -> None:
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="mean_lo must have shape"):
        bn.forward_train(x, stats=(np.zeros(3), np.ones(3), 4, np.zeros(2)))
    with pytest.raises(ValueError, match="means_lo must have the shape of means"):
        F.combine_moments(np.zeros((2, 3)), np.ones((2, 3)), [2, 2], means_lo=np.zeros((3, 3)))


def run_ranks(size: int, work: Any) -> list[Any]:
    groups, results = dist.thread_groups(size), [None] * size

    def run(rank: int) -> None:
        results[rank] = work(groups[rank])

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize(
    "sizes", [[40, 24], [5, 0, 1, 58], [20, 1, 0], [2000, 1000]], ids=str
)  # unequal, empty, one-row and streaming parts on 2 to 4 ranks
def test_synchronized_road_is_exact(sizes: list[int], offset: float) -> None:
    x, dy, gamma, beta = draw((sum(sizes), 3), offset)
    bounds = np.cumsum([0, *sizes])

    def work(group: Any) -> tuple[Any, ...]:
        part = slice(bounds[group.rank], bounds[group.rank + 1])
        y, cache = dist.forward_train(x[part], gamma, beta, group)
        return (y, *dist.backward(dy[part], cache, group))

    results = run_ranks(len(sizes), work)
    y, dx = (np.concatenate([r[i] for r in results]) for i in (0, 1))
    dgamma, dbeta = (np.sum([r[i] for r in results], axis=0) for i in (2, 3))
    assert_exact(y, dx, dgamma, dbeta, exact.forward_backward(x, dy, gamma, beta))


def assert_population(mean: Any, var: Any, data: Any) -> None:
    exact_mean, exact_var = exact.statistics(data)
    m = decimal.Decimal(data.shape[0])
    unbiased = exact_var * m / (m - 1)
    errors = (exact.relative_units(mean, exact_mean), exact.relative_units(var, unbiased))
    assert max(errors) <= BOUND, errors


def batches(offset: float, n: int, size: int, seed: int = 3) -> list[Any]:
    rng = np.random.default_rng(seed)
    return [offset + 0.5 * rng.standard_normal((size, 3)) for _ in range(n)]


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize(("n", "size"), [(20, 32), (300, 4)])
def test_population_stats_are_exact_over_many_batches(offset: float, n: int, size: int) -> None:
    data = batches(offset, n, size)
    stats = bn.PopulationStats(3)
    for batch in data:
        stats.update(batch)
    assert_population(stats.mean, stats.var(), np.concatenate(data))


@pytest.mark.parametrize("offset", OFFSETS)
def test_population_stats_from_moments_and_merge_are_exact(offset: float) -> None:
    data = batches(offset, 30, 16)
    first, second = bn.PopulationStats(3), bn.PopulationStats(3)
    for batch in data[:10]:
        _, cache = bn.forward_train(batch)
        first.update_from_moments(cache.mean, cache.var, cache.count, mean_lo=cache.mean_lo)
    for batch in data[10:]:
        part = F.moments(batch)
        second.update_from_moments(*part, mean_lo=part.mean_lo)
    first.merge(second)
    assert_population(first.mean, first.var(), np.concatenate(data))


@pytest.mark.parametrize("offset", [1e4, 1e8])
def test_population_stats_allreduce_is_exact(offset: float) -> None:
    data = batches(offset, 9, 10)
    shares = [data[:4], [], data[4:5], data[5:]]  # an empty rank and a one-batch rank

    def work(group: Any) -> tuple[Any, Any]:
        stats = bn.PopulationStats(3)
        for batch in shares[group.rank]:
            stats.update(batch)
        stats.allreduce(group)
        return stats.mean, stats.var()

    for mean, var in run_ranks(4, work):
        assert_population(mean, var, np.concatenate(data))


@pytest.mark.parametrize("offset", [0.0, 1e6, 1e8])
@pytest.mark.parametrize("ranks", [1, 3])
def test_precise_bn_is_exact(offset: float, ranks: int) -> None:
    data = batches(offset, 12, 8)

    def work(group: Any) -> tuple[Any, Any]:
        layer = bn.BatchNorm(3)
        mine = data[group.rank :: group.size]
        bn.precise_bn(layer, mine, len(mine), group=group if ranks > 1 else None)
        return layer.running_mean, layer.running_var

    for mean, var in run_ranks(ranks, work):
        assert_population(mean, var, np.concatenate(data))


@pytest.mark.parametrize("offset", [1e4, 1e8])
def test_batch_renorm_without_clipping_room_is_exact(offset: float) -> None:
    x, _, _, _ = draw((64, 3), offset)
    layer = bn.BatchRenorm(3, rmax=1.0, dmax=0.0)
    y = layer(x)
    assert exact.units(y, exact.forward_backward(x, x)["y"]) <= BOUND


def test_exact_checks_pass_on_three_mpi_ranks() -> None:
    names = ("exact_synchronized_road", "exact_population_allreduce")
    stdout = run_mpi(3, MPI_DIR / "run_checks.py", *names)
    assert "passed 2 checks on 3 ranks" in stdout, stdout
