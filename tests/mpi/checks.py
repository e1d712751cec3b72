"""Checks of synchronized BatchNorm and PreciseBN across a group, run by every rank.

Each check takes this rank's group, builds the whole batch from a seeded generator (the same on
every rank), takes its own part, and asserts against single-process BatchNorm on the
concatenated batch. tests/test_distributed.py runs them on thread groups; tests/mpi/run_checks.py
runs them on MPI ranks under mpiexec (tests/test_distributed_mpi.py launches it).
"""

from __future__ import annotations

import copy
import decimal
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import batchnorm as bn
from batchnorm import distributed as dist

Array = np.ndarray[Any, Any]
TOL = 1e-12


def part_sizes(size: int, *, empty: bool = False) -> list[int]:
    """Unequal parts (2, 3, 1, 4, ...); with `empty`, the last rank's part is empty."""
    sizes = [(2, 3, 1, 4)[r % 4] for r in range(size)]
    if empty and size > 1:
        sizes[-1] = 0
    return sizes


def split(whole: Array, sizes: list[int], rank: int, axis: int = 0) -> Array:
    start = sum(sizes[:rank])
    return np.take(whole, np.arange(start, start + sizes[rank]), axis=axis)


def close(actual: Array, expected: Array, what: str) -> None:
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-300)
    err = float(np.abs(actual - expected).max(initial=0.0)) / scale
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert err <= TOL, f"{what}: relative error {err:.3g} > {TOL}"


def same_everywhere(group: dist.Group, *arrays: Any) -> None:
    """Every rank holds bitwise the same values (float64 vectors, ints)."""
    mine = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    parts = group.allgather(mine)
    assert all(p.tobytes() == parts[0].tobytes() for p in parts), "ranks differ"


def total(group: dist.Group, value: Array) -> Array:
    parts = group.allgather(np.asarray(value, dtype=np.float64))
    result: Array = np.sum(parts, axis=0)
    return result


class Counting:
    """A group that counts its allgather calls."""

    def __init__(self, group: dist.Group) -> None:
        self.group, self.calls = group, 0
        self.rank, self.size = group.rank, group.size

    def allgather(self, array: Array) -> list[Array]:
        self.calls += 1
        return self.group.allgather(array)


def snapshot(layer: bn.BatchNorm) -> dict[str, Any]:
    names = ("gamma", "beta", "running_mean", "running_var", "num_batches_tracked", "dgamma")
    return {n: copy.deepcopy(getattr(layer, n)) for n in names}


def unchanged(layer: bn.BatchNorm, before: dict[str, Any]) -> None:
    after = snapshot(layer)
    for name, value in before.items():
        if isinstance(value, np.ndarray):
            assert after[name].tobytes() == value.tobytes(), name
        else:
            assert after[name] == value, name


def raises_everywhere(
    group: dist.Group, bad_rank: int, kind: type[Exception], own: str, action: Callable[[], Any]
) -> None:
    """action() raises `kind` on every rank: `own` in the bad rank's message, else its rank."""
    try:
        action()
    except kind as err:
        expected = own if group.rank == bad_rank else f"rank {bad_rank} of this group"
        assert expected in str(err), (group.rank, str(err))
    else:
        raise AssertionError(f"rank {group.rank}: no {kind.__name__} raised")


# --- kernels --------------------------------------------------------------------------------------

SHAPES = [((11, 3), 1), ((11, 4, 3, 2), 1), ((11, 3, 2, 5), -1)]


def check_kernels_match_single_process(group: dist.Group, *, empty: bool = False) -> None:
    sizes = part_sizes(group.size, empty=empty)
    for shape, axis in SHAPES:
        rng = np.random.default_rng(len(shape))
        n = sum(sizes)
        whole = rng.normal(3.0, 2.0, size=(n, *shape[1:]))
        dy_whole = rng.normal(size=whole.shape)
        c = whole.shape[axis]
        gamma, beta = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
        ref_y, ref_cache = bn.forward_train(whole, gamma, beta, axis=axis)
        ref_dx, ref_dgamma, ref_dbeta = bn.backward(dy_whole, ref_cache)
        x, dy = split(whole, sizes, group.rank), split(dy_whole, sizes, group.rank)
        y, cache = dist.forward_train(x, gamma, beta, group, axis=axis)
        dx, dgamma, dbeta = dist.backward(dy, cache, group)
        close(y, split(ref_y, sizes, group.rank), f"y {shape}")
        close(dx, split(ref_dx, sizes, group.rank), f"dx {shape}")
        assert cache.count == ref_cache.count
        close(cache.var, ref_cache.var, "var")
        close(total(group, dgamma), ref_dgamma, "sum of dgamma")
        close(total(group, dbeta), ref_dbeta, "sum of dbeta")
        same_everywhere(group, cache.mean, cache.var, cache.invstd)


def check_kernels_with_an_empty_part(group: dist.Group) -> None:
    check_kernels_match_single_process(group, empty=True)


def check_kernels_float32_and_no_affine(group: dist.Group) -> None:
    sizes = part_sizes(group.size)
    whole = np.random.default_rng(7).normal(5.0, 3.0, size=(sum(sizes), 6)).astype(np.float32)
    ref_y, _ = bn.forward_train(whole.astype(np.float64), None, None)
    y, cache = dist.forward_train(split(whole, sizes, group.rank), None, None, group)
    assert y.dtype == np.float32
    assert np.abs(y - split(ref_y, sizes, group.rank)).max() < 1e-5
    dx, dgamma, dbeta = dist.backward(np.ones_like(y), cache, group)
    assert dgamma is None and dbeta is None and dx.dtype == np.float32
    assert np.abs(dx).max() < 1e-5  # a constant dy does not change y


def check_nan_in_dy_propagates(group: dist.Group) -> None:
    sizes = part_sizes(group.size)
    whole = np.random.default_rng(3).normal(size=(sum(sizes), 2))
    y, cache = dist.forward_train(split(whole, sizes, group.rank), np.ones(2), None, group)
    dy = np.ones_like(y)
    if group.rank == 0:
        dy[0, 1] = np.nan
    dx, _, _ = dist.backward(dy, cache, group)
    assert np.isnan(dx[:, 1]).all() and np.isfinite(dx[:, 0]).all()


def check_eval_cache_does_not_communicate(group: dist.Group) -> None:
    counting = Counting(group)
    x = np.random.default_rng(group.rank).normal(size=(3, 2))
    y, cache = bn.forward_eval(x, np.ones(2), None, np.zeros(2), np.ones(2))
    dx, _, _ = dist.backward(np.ones_like(y), cache, counting)
    assert counting.calls == 0 and dx.shape == x.shape


# --- the layer ------------------------------------------------------------------------------------


def check_layer_matches_single_process(group: dist.Group) -> None:
    sizes = part_sizes(group.size, empty=group.size > 2)
    for momentum, unbiased in ((0.9, True), (None, False)):
        mine = bn.BatchNorm(3, momentum=momentum, unbiased=unbiased, group=group)
        ref = bn.BatchNorm(3, momentum=momentum, unbiased=unbiased)
        rng = np.random.default_rng(11)
        for step in range(3):
            whole = rng.normal(step, 1.0 + step, size=(sum(sizes), 3, 2))
            dy_whole = rng.normal(size=whole.shape)
            y = mine(split(whole, sizes, group.rank))
            dx = mine.backward(split(dy_whole, sizes, group.rank))
            ref_y, ref_dx = ref(whole), ref.backward(dy_whole)
            close(y, split(ref_y, sizes, group.rank), "layer y")
            close(dx, split(ref_dx, sizes, group.rank), "layer dx")
            assert mine.dgamma is not None and mine.dbeta is not None
            assert ref.dgamma is not None and ref.dbeta is not None
            close(total(group, mine.dgamma), ref.dgamma, "layer dgamma")
            close(total(group, mine.dbeta), ref.dbeta, "layer dbeta")
        assert mine.running_mean is not None and mine.running_var is not None
        assert ref.running_mean is not None and ref.running_var is not None
        close(mine.running_mean, ref.running_mean, "running_mean")
        close(mine.running_var, ref.running_var, "running_var")  # Bessel with the whole count
        assert mine.num_batches_tracked == ref.num_batches_tracked == 3
        same_everywhere(group, mine.running_mean, mine.running_var, [mine.num_batches_tracked])


def check_eval_mode_does_not_communicate(group: dist.Group) -> None:
    counting = Counting(group)
    layer = bn.BatchNorm(2, group=counting).eval()
    for _ in range(group.rank + 1):  # ranks call it a different number of times
        y = layer(np.random.default_rng(0).normal(size=(4, 2)))
        layer.backward(np.ones_like(y))
    local = bn.BatchNorm(2, track_running_stats=False, group=counting).eval()
    local(np.random.default_rng(0).normal(size=(4, 2)))
    assert counting.calls == 0


def check_synchronize_sets_every_layer(group: dist.Group) -> None:
    model = {"a": [bn.BatchNorm(2), bn.BatchNorm(3, track_running_stats=False)], "b": None}
    layers = dist.synchronize(model, group)
    assert len(layers) == 2 and all(layer.group is group for layer in layers)
    assert dist.synchronize(model, None) == layers and layers[0].group is None


# --- faults ---------------------------------------------------------------------------------------

BAD_INPUTS: list[tuple[str, type[Exception], str]] = [
    ("channels", ValueError, "expected 3 channels"),
    ("dtype", TypeError, "dtype float16, float32 or float64"),
    ("nan", FloatingPointError, "not finite"),
    ("ndim", ValueError, "at least 2 dimensions"),
]


def bad_input(kind: str) -> Any:
    x = np.random.default_rng(5).normal(size=(4, 3))
    return {
        "channels": x[:, :2],
        "dtype": (x * 10).astype(np.int64),
        "nan": np.where(np.arange(3) == 1, np.nan, x),
        "ndim": x[:, 0],
    }[kind]


def check_bad_forward_input_raises_everywhere(group: dist.Group) -> None:
    bad_rank = group.size - 1
    for kind, error, own in BAD_INPUTS:
        layer = bn.BatchNorm(3, group=group)
        layer(np.random.default_rng(group.rank).normal(size=(3, 3)))  # a first good step
        before = snapshot(layer)
        x = np.random.default_rng(group.rank).normal(size=(4, 3))
        x = bad_input(kind) if group.rank == bad_rank else x
        raises_everywhere(group, bad_rank, error, own, lambda x=x, layer=layer: layer(x))
        unchanged(layer, before)
        # The group is still usable: the next good step works on every rank.
        layer(np.random.default_rng(1).normal(size=(3, 3)))
        assert layer.num_batches_tracked == 2


def check_bad_dy_raises_everywhere(group: dist.Group) -> None:
    bad_rank = 0
    layer = bn.BatchNorm(3, group=group)
    y = layer(np.random.default_rng(group.rank).normal(size=(4, 3)))
    layer.backward(np.ones_like(y))
    before = snapshot(layer)
    dy = np.ones((5, 3)) if group.rank == bad_rank else np.ones_like(y)
    raises_everywhere(group, bad_rank, ValueError, "dy must have the shape",
                      lambda: layer.backward(dy))  # fmt: skip
    unchanged(layer, before)
    assert layer._cache is not None
    cache = None if group.rank == bad_rank else layer._cache
    raises_everywhere(group, bad_rank, TypeError, "cache must be the BatchNormCache",
                      lambda: dist.backward(np.ones_like(y), cache, group))  # fmt: skip


def check_too_few_values_raise_everywhere(group: dist.Group) -> None:
    layer = bn.BatchNorm(2, group=group)
    x = np.ones((1 if group.rank == 0 else 0, 2))  # one value per channel in all
    before = snapshot(layer)
    try:
        layer(x)
    except ValueError as err:
        assert "[1" in str(err) and "more than 1 value per channel" in str(err), str(err)
    else:
        raise AssertionError("no ValueError")
    unchanged(layer, before)


# --- PreciseBN ------------------------------------------------------------------------------------


class TwoLayers:
    """bn2(tanh(bn1(x) @ w)): bn2's input depends on bn1's statistics in eval mode."""

    def __init__(self, group: dist.Group | None = None) -> None:
        self.bn1, self.bn2 = bn.BatchNorm(3, group=group), bn.BatchNorm(4, group=group)
        self.w = np.random.default_rng(0).normal(size=(3, 4))

    def __call__(self, x: Array) -> Array:
        out: Array = self.bn2(np.tanh(self.bn1(x) @ self.w))
        return out


def rank_batches(size: int) -> list[list[Array]]:
    """Rank r holds r + 1 batches of unequal sizes; with 2+ ranks the last holds none."""
    rng = np.random.default_rng(21)
    counts = [r + 1 for r in range(size)]
    if size > 1:
        counts[-1] = 0
    return [[rng.normal(2.0, 3.0, size=(3 + k, 3)) for k in range(n)] for n in counts]


def check_population_stats_allreduce(group: dist.Group) -> None:
    data = rank_batches(group.size)
    stats, ref = bn.PopulationStats(3), bn.PopulationStats(3)
    for batch in data[group.rank]:
        stats.update(batch)
    for batches in data:
        for batch in batches:
            ref.update(batch)
    stats.allreduce(group)
    assert stats.count == ref.count and stats.num_batches == ref.num_batches
    close(stats.mean, ref.mean, "allreduce mean")
    close(stats.var(), ref.var(), "allreduce var")
    same_everywhere(group, stats.mean, stats.var(), [stats.count, stats.num_batches])


def check_precise_bn_matches_the_union(group: dist.Group) -> None:
    data = rank_batches(group.size)
    wanted = 2
    union = [b for batches in data for b in batches[:wanted]]
    for mode in ("train", "sequential"):
        counting = Counting(group)
        model, ref = TwoLayers(counting), TwoLayers()
        model(np.random.default_rng(group.rank).normal(size=(5, 3)))  # synchronized step
        ref(np.random.default_rng(0).normal(size=(5, 3)))
        calls_before, merges = counting.calls, Counting(group)
        summary = bn.precise_bn(model, data[group.rank], wanted, mode=mode, group=merges)
        assert counting.calls == calls_before, "layers communicated during the pass"
        # One allgather after the pass ("train"), or one per layer ("sequential").
        assert merges.calls == (1 if mode == "train" else 2)
        bn.precise_bn(ref, union, len(union), mode=mode)
        for mine, theirs in ((model.bn1, ref.bn1), (model.bn2, ref.bn2)):
            assert mine.running_mean is not None and mine.running_var is not None
            assert theirs.running_mean is not None and theirs.running_var is not None
            close(mine.running_mean, theirs.running_mean, f"{mode} running_mean")
            close(mine.running_var, theirs.running_var, f"{mode} running_var")
            same_everywhere(group, mine.running_mean, mine.running_var)
            assert mine.group is counting and mine.training  # restored
        assert summary[0].values == sum(len(b) for b in union)
        assert summary[0].batches == len(union)


def check_precise_bn_with_no_batches_anywhere(group: dist.Group) -> None:
    model = TwoLayers(group)
    before = snapshot(model.bn1)
    try:
        bn.precise_bn(model, [], 3, group=group)
    except ValueError as err:
        assert "on any rank" in str(err), str(err)
    else:
        raise AssertionError("no ValueError")
    unchanged(model.bn1, before)


def check_precise_bn_error_on_one_rank(group: dist.Group) -> None:
    data = rank_batches(group.size)
    for error, others in ((ValueError, ValueError), (KeyError, RuntimeError)):
        model = TwoLayers(group)
        before = snapshot(model.bn2)

        def failing(x: Array, model: TwoLayers = model, error: type = error) -> Array:
            if group.rank == 0:
                raise error("model failed here")
            return model(x)

        try:
            bn.precise_bn(failing, data[group.rank], 3, layers=[model.bn1, model.bn2],
                          group=group)  # fmt: skip
        except Exception as err:
            expected = error if group.rank == 0 else others
            assert type(err) is expected, (group.rank, err)
            assert ("model failed" if group.rank == 0 else "rank 0 of this group") in str(err)
        else:
            raise AssertionError("no error")
        unchanged(model.bn2, before)
        assert model.bn2.group is group


def exact_reference() -> Any:
    """tests/exact.py (decimal arithmetic), loaded by path: this module also runs under
    mpiexec, where tests/ is not on sys.path."""
    if "exact" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "exact.py"
        spec = importlib.util.spec_from_file_location("exact", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["exact"] = module
        spec.loader.exec_module(module)
    return sys.modules["exact"]


def check_exact_synchronized_road(group: dist.Group) -> None:
    """At offset 1e8, y, dx, dgamma and dbeta within 8 units of 2^-52 of exact arithmetic
    (unequal parts, one of them empty, one a single row)."""
    ref_module = exact_reference()
    sizes = [(9, 0, 1, 6)[r % 4] for r in range(group.size)]
    rng = np.random.default_rng(11)
    n = sum(sizes)
    x, dy = 1e8 + rng.standard_normal((n, 3)), rng.standard_normal((n, 3))
    gamma, beta = rng.uniform(0.5, 2.0, 3), rng.standard_normal(3)
    y, cache = dist.forward_train(split(x, sizes, group.rank), gamma, beta, group)
    dx, dgamma, dbeta = dist.backward(split(dy, sizes, group.rank), cache, group)
    ref = ref_module.forward_backward(x, dy, gamma, beta)
    whole_y = np.concatenate(group.allgather(y.ravel())).reshape(n, 3)
    whole_dx = np.concatenate(group.allgather(dx.ravel())).reshape(n, 3)
    errors = (
        ref_module.units(whole_y, ref["y"]),
        ref_module.units(whole_dx, ref["dx"]),
        ref_module.sum_units(total(group, dgamma), ref["dgamma"], ref["dgamma_scale"]),
        ref_module.sum_units(total(group, dbeta), ref["dbeta"], ref["dbeta_scale"]),
    )
    assert max(errors) <= 8.0, errors


def check_exact_population_allreduce(group: dist.Group) -> None:
    """PopulationStats at offset 1e8 over every rank's batches (the last rank has none):
    mean and unbiased variance within 8 units of 2^-52, bitwise the same on every rank."""
    ref_module = exact_reference()
    rng = np.random.default_rng(12)
    workers = max(group.size - 1, 1)  # the last of several ranks sees nothing
    data = [1e8 + 0.5 * rng.standard_normal((7, 3)) for _ in range(3 * workers)]
    stats = bn.PopulationStats(3)
    for batch in data[group.rank :: workers] if group.rank < workers else []:
        stats.update(batch)
    stats.allreduce(group)
    seen = np.concatenate(data)
    mean, var = ref_module.statistics(seen)
    m = decimal.Decimal(seen.shape[0])
    errors = (
        ref_module.relative_units(stats.mean, mean),
        ref_module.relative_units(stats.var(), var * m / (m - 1)),
    )
    assert max(errors) <= 8.0, errors
    same_everywhere(group, stats.mean, stats.var(), stats.count)


CHECKS: dict[str, Callable[[dist.Group], None]] = {
    name[len("check_") :]: function
    for name, function in sorted(globals().items())
    if name.startswith("check_") and callable(function)
}
