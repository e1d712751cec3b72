"""Float data in the other byte order (big-endian on this machine, as some file formats store
it) is float data: every entry point takes it, and computes what it computes for the same
values in the machine's own order, returned in that order as NumPy's operations do."""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import distributed as dist
from batchnorm import functional as F

OTHER = ">" if sys.byteorder == "little" else "<"
SHAPES = [(64, 32), (4, 3, 5, 5), (256, 64)]  # lean, lean 4-D, streaming (B, C)


def swapped(a: Any) -> Any:
    """The same values in the other byte order."""
    a = np.asarray(a)
    other = a.astype(a.dtype.newbyteorder(OTHER))
    assert not other.dtype.isnative and np.array_equal(other, a)
    return other


def data(shape: tuple[int, ...], dtype: str) -> tuple[Any, Any, Any, Any]:
    rng = np.random.default_rng(0)
    x = (3.0 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[1]
    return x, dy, rng.uniform(0.5, 1.5, c), rng.standard_normal(c)


def assert_same(got: Any, expected: Any) -> None:
    assert got.dtype == expected.dtype and got.dtype.isnative
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_training_step_in_the_other_byte_order(shape: tuple[int, ...], dtype: str) -> None:
    x, dy, gamma, beta = data(shape, dtype)
    y, cache = bn.forward_train(x, gamma, beta)
    expected = (y, *bn.backward(dy, cache))
    y2, cache2 = bn.forward_train(swapped(x), swapped(gamma), swapped(beta))
    got = (y2, *bn.backward(swapped(dy), cache2))
    for g, e in zip(got, expected, strict=True):
        assert_same(g, e)
    np.testing.assert_array_equal(cache2.mean, cache.mean)
    np.testing.assert_array_equal(cache2.var, cache.var)


@pytest.mark.parametrize("shape", SHAPES)
def test_eval_forward_in_the_other_byte_order(shape: tuple[int, ...]) -> None:
    x, dy, gamma, beta = data(shape, "float32")
    mean, var = np.full(shape[1], 3.0), np.full(shape[1], 2.0)
    y, cache = bn.forward_eval(x, gamma, beta, mean, var)
    y2, cache2 = bn.forward_eval(swapped(x), gamma, beta, swapped(mean), swapped(var))
    assert_same(y2, y)
    for g, e in zip(bn.backward(swapped(dy), cache2), bn.backward(dy, cache), strict=True):
        assert_same(g, e)


def test_stages_in_the_other_byte_order() -> None:
    x, _, _, _ = data((64, 32), "float64")
    part = F.moments(x)
    part2 = F.moments(swapped(x))
    for g, e in zip((*part2[:2], part2.mean_lo), (*part[:2], part.mean_lo), strict=True):
        assert_same(g, e)
    assert part2.count == part.count


@pytest.mark.parametrize("mode", ["train", "eval", "ghost"])
def test_layer_in_the_other_byte_order(mode: str) -> None:
    x, dy, _, _ = data((64, 32), "float32")
    layers = [bn.BatchNorm(32, ghost_batch_size=16 if mode == "ghost" else None) for _ in range(2)]
    outputs = []
    for layer, (xi, dyi) in zip(layers, [(x, dy), (swapped(x), swapped(dy))], strict=True):
        layer(xi)  # one training step moves the running statistics away from (0, 1)
        if mode == "eval":
            layer.eval()
        outputs.append((layer(xi), layer.backward(dyi), layer.running_mean, layer.running_var))
    for g, e in zip(outputs[1], outputs[0], strict=True):
        assert_same(g, e)


def test_population_stats_and_precise_bn_in_the_other_byte_order() -> None:
    batches = [data((16, 8), "float32")[0] for _ in range(3)]
    stats, stats2 = bn.PopulationStats(8), bn.PopulationStats(8)
    for batch in batches:
        stats.update(batch)
        stats2.update(swapped(batch))
    assert_same(stats2.mean, stats.mean)
    assert_same(stats2.var(), stats.var())
    layer, layer2 = bn.BatchNorm(8), bn.BatchNorm(8)
    bn.precise_bn(layer, batches, len(batches))
    bn.precise_bn(layer2, [swapped(b) for b in batches], len(batches))
    assert_same(layer2.running_mean, layer.running_mean)
    assert_same(layer2.running_var, layer.running_var)


def test_shuffle_and_allreduce_in_the_other_byte_order() -> None:
    x, _, _, _ = data((6, 4), "float32")
    groups = dist.thread_groups(2)
    results: list[Any] = [None, None]

    def work(rank: int) -> None:
        group = groups[rank]
        mine = swapped(x[3 * rank : 3 * rank + 3])
        part, token = dist.shuffle(mine, group, seed=0)
        back = dist.unshuffle(part, token, group)
        (total,) = dist.allreduce([mine], group)
        results[rank] = (back, total)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank, (back, total) in enumerate(results):
        assert_same(back, x[3 * rank : 3 * rank + 3])
        assert_same(total, x[:3] + x[3:])


def test_other_kinds_in_the_other_byte_order_stay_type_errors() -> None:
    with pytest.raises(TypeError, match="x must have dtype float16, float32 or float64; got"):
        bn.forward_train(swapped(np.ones((4, 3), dtype=np.int32)))
