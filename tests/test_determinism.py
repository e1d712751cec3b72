"""Determinism and reentrancy: the same input gives the same bits, every time, in any thread.

* Repeated calls with identical inputs return bit-for-bit identical results: the kernels
  (forward_train, forward_eval, backward, moments), the BatchNorm layer, PopulationStats and
  precise_bn; also after other shapes and dtypes were processed in between, when the input is
  a fresh copy of the same values, and when earlier results were modified by the caller.
* Nothing is kept between calls: module globals of every module are unchanged by any
  workload, and kernels run concurrently from several threads (different inputs per thread,
  many iterations, small arrays and arrays large enough to be processed in slabs) return
  exactly what the same calls return one after the other.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _validate, fold, functional, gradcheck, layer, precise

MODULES = [functional, layer, precise, fold, gradcheck, _validate, bn]

# (shape, axis): every rank, channels-first and channels-last, a batch of one with a spatial
# size, and one array of 4.7 MB in float32 / 9.4 MB in float64 (processed in slabs).
CASES = [
    ((16, 8), 1),
    ((4, 3, 5), 1),
    ((1, 3, 7), 1),
    ((8, 4, 6, 6), 1),
    ((2, 3, 2, 3, 4), 1),
    ((6, 5, 5, 3), -1),
    ((72, 16, 32, 32), 1),
]
DTYPES = [np.float32, np.float64]


def _data(shape: tuple[int, ...], axis: int, dtype: Any, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    c = shape[axis]
    return {
        "x": (rng.standard_normal(shape) * 3.0 + 1.5).astype(dtype),
        "dy": rng.standard_normal(shape).astype(dtype),
        "gamma": rng.uniform(0.5, 2.0, c),
        "beta": rng.standard_normal(c),
        "mean": rng.standard_normal(c),
        "var": rng.uniform(0.5, 2.0, c),
        "axis": axis,
    }


def _bits(value: Any) -> Any:
    """A value's exact content: arrays as (dtype, shape, bytes), containers recursively."""
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, dict):
        return {k: _bits(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_bits(v) for v in value)
    return value


def run_kernels(d: dict[str, Any]) -> dict[str, Any]:
    """Every kernel on one input: forward and backward in both modes, and moments."""
    ax = d["axis"]
    y, cache = bn.forward_train(d["x"], d["gamma"], d["beta"], axis=ax)
    dx, dgamma, dbeta = bn.backward(d["dy"], cache)
    y_eval, cache_eval = bn.forward_eval(
        d["x"], d["gamma"], d["beta"], d["mean"], d["var"], axis=ax
    )
    dx_eval, dgamma_eval, dbeta_eval = bn.backward(d["dy"], cache_eval)
    y_plain, cache_plain = bn.forward_train(d["x"], axis=ax)
    dx_plain, _, _ = bn.backward(d["dy"], cache_plain)
    mean, var, count = functional.moments(d["x"], axis=ax)
    return _bits(
        {
            "train": (y, dx, dgamma, dbeta, cache.mean, cache.var, cache.invstd, cache.count),
            "eval": (y_eval, dx_eval, dgamma_eval, dbeta_eval),
            "no_affine": (y_plain, dx_plain),
            "moments": (mean, var, count),
        }
    )


def _case_id(case: tuple[tuple[int, ...], int]) -> str:
    shape, axis = case
    return "x".join(map(str, shape)) + ("-last" if axis == -1 else "")


# --- repeated calls -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernels_repeat_bit_for_bit(case: tuple[tuple[int, ...], int], dtype: Any) -> None:
    shape, axis = case
    d = _data(shape, axis, dtype, seed=1)
    first = run_kernels(d)
    for _ in range(2):
        assert run_kernels(d) == first
    # The same values in a fresh buffer give the same bits.
    fresh = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in d.items()}
    assert run_kernels(fresh) == first


@pytest.mark.parametrize("case", CASES[:-1], ids=_case_id)
def test_kernels_repeat_after_other_work(case: tuple[tuple[int, ...], int]) -> None:
    # Whatever shapes, dtypes and layouts came in between, and whatever helpers cached for
    # them, the result is the same.
    shape, axis = case
    d = _data(shape, axis, np.float32, seed=2)
    first = run_kernels(d)
    for (other_shape, other_axis), dtype in itertools.product(CASES[:-1], [np.float16, *DTYPES]):
        run_kernels(_data(other_shape, other_axis, dtype, seed=3))
    assert run_kernels(d) == first


def test_results_are_not_shared_between_calls() -> None:
    # Outputs are new arrays: the caller may overwrite them, and the next call does not
    # touch the previous call's outputs.
    d = _data((8, 4, 6, 6), 1, np.float32, seed=4)
    y, cache = bn.forward_train(d["x"], d["gamma"], d["beta"])
    dx, dgamma, dbeta = bn.backward(d["dy"], cache)
    kept = _bits((y, dx, dgamma, dbeta, cache.mean, cache.var))
    for array in (y, dx, dgamma, dbeta):
        array[...] = np.nan
    y2, cache2 = bn.forward_train(d["x"], d["gamma"], d["beta"])
    grads2 = bn.backward(d["dy"], cache2)
    assert _bits((y2, *grads2, cache2.mean, cache2.var)) == kept
    # Backward of the first cache is unaffected by the second forward and by the overwrites.
    assert _bits(bn.backward(d["dy"], cache)) == kept[1:4]
    y3, _ = bn.forward_train(d["x"] * 2.0, d["gamma"], d["beta"])
    assert _bits(y2) == kept[0] and not np.shares_memory(y2, y3)


def _layer_run(seed: int, *, axis: int = 1, momentum: float | None = 0.9) -> Any:
    """Train, backpropagate, evaluate and fine-tune a layer; every output and state."""
    rng = np.random.default_rng(seed)
    shape = (8, 5, 5, 3) if axis == -1 else (8, 3, 5, 5)
    layer_ = bn.BatchNorm(3, momentum=momentum, axis=axis)
    out = []
    for _ in range(4):
        y = layer_(rng.standard_normal(shape).astype(np.float32) * 2.0 + 1.0)
        out += [y, layer_.backward(rng.standard_normal(shape).astype(np.float32))]
        out += [layer_.dgamma, layer_.dbeta]
    layer_.eval()
    x = rng.standard_normal(shape)
    out += [layer_(x), layer_.backward(np.ones_like(x)), layer_.dgamma]
    return _bits([*out, layer_.state_dict()])


@pytest.mark.parametrize(
    "options", [{}, {"axis": -1}, {"momentum": None}], ids=["default", "channels_last", "cma"]
)
def test_layer_repeats_bit_for_bit(options: dict[str, Any]) -> None:
    assert _layer_run(5, **options) == _layer_run(5, **options)


def _population(parts: list[np.ndarray]) -> Any:
    stats = bn.PopulationStats(4)
    for part in parts:
        stats.update(part)
    other = bn.PopulationStats(4)
    for part in parts:
        _, cache = bn.forward_train(part)
        other.update_from_moments(cache.mean, cache.var, cache.count)
    stats.merge(other)
    return _bits([stats.mean, stats.var(), stats.var(unbiased=False), stats.count])


def test_population_stats_repeat_bit_for_bit() -> None:
    rng = np.random.default_rng(6)
    parts = [rng.standard_normal((n, 4, 3)) * 5.0 + 2.0 for n in (7, 1, 12, 3)]
    assert _population(parts) == _population([p.copy() for p in parts])


class _Net:
    """Two BatchNorm layers with a fixed nonlinearity between them."""

    def __init__(self) -> None:
        self.layers = [bn.BatchNorm(3), bn.BatchNorm(3, axis=1)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.layers[1](np.tanh(self.layers[0](x)) * 2.0 + 0.5)


@pytest.mark.parametrize("mode", ["train", "sequential"])
def test_precise_bn_repeats_bit_for_bit(mode: str) -> None:
    rng = np.random.default_rng(7)
    batches = [rng.standard_normal((6, 3, 4)) * 3.0 + 1.0 for _ in range(5)]

    def run() -> Any:
        net = _Net()
        summaries = bn.precise_bn(net, batches, num_batches_precise=5, mode=mode)
        states = [layer_.state_dict() for layer_ in net.layers]
        return _bits([states, [(s.values, s.calls, s.batches) for s in summaries]])

    assert run() == run()


# --- no state kept between calls: module globals ------------------------------------------------


def _globals_fingerprint() -> dict[str, Any]:
    """Every module's globals: names, identities, and the content of mutable containers."""
    prints: dict[str, Any] = {}
    for module in MODULES:
        for name, value in vars(module).items():
            if name.startswith("__"):  # __builtins__, __warningregistry__, ...
                continue
            key = f"{module.__name__}.{name}"
            if isinstance(value, np.ndarray):
                prints[key] = (_bits(value), value.flags.writeable)
            elif isinstance(value, dict | list | set | bytearray):
                prints[key] = (id(value), repr(value))
            else:
                prints[key] = id(value)
    return prints


def _workload() -> None:
    """Every public entry point, including failing calls."""
    for (shape, axis), dtype in itertools.product(CASES[:-1], [np.float16, *DTYPES]):
        run_kernels(_data(shape, axis, dtype, seed=8))
    _layer_run(9)
    _layer_run(9, axis=-1, momentum=None)
    rng = np.random.default_rng(10)
    _population([rng.standard_normal((5, 4)) for _ in range(3)])
    net = _Net()
    bn.precise_bn(net, [rng.standard_normal((6, 3, 2)) for _ in range(3)], 3)
    bn.precise_bn(net, [rng.standard_normal((6, 3, 2)) for _ in range(3)], 3, mode="sequential")
    folded = net.layers[0].eval()
    fold.fold_batchnorm(rng.standard_normal((3, 4, 3, 3)), rng.standard_normal(3), folded)
    gradcheck.check_gradients(rng.standard_normal((4, 3)), np.ones(3), np.zeros(3))
    gradcheck.check_kernels(bn.forward_train, bn.backward, shapes=[(4, 3)])
    for bad in (None, np.ones(3), np.ones((4, 3), dtype=int), np.full((4, 3), np.nan)):
        with pytest.raises((TypeError, ValueError, FloatingPointError)):
            bn.BatchNorm(3)(bad)
    with pytest.raises(ValueError):
        bn.BatchNorm(3).load_state_dict({"weight": np.ones(2)})


def test_workload_leaves_module_globals_unchanged() -> None:
    _workload()  # first calls may fill caches of helpers; what matters is what comes after
    before = _globals_fingerprint()
    _workload()
    assert _globals_fingerprint() == before


def test_no_module_holds_a_writable_array() -> None:
    # A writable module-level array would be state shared by every call and thread.
    _workload()
    for module in MODULES:
        for name, value in vars(module).items():
            if isinstance(value, np.ndarray):
                assert not value.flags.writeable, f"{module.__name__}.{name}"


# --- threads ------------------------------------------------------------------------------------

THREADS = 8
ROUNDS = 3


def _thread_tasks() -> list[dict[str, Any]]:
    """Different inputs for every task: shapes, dtypes, axes and seeds vary; the two largest
    cases keep NumPy busy long enough for the threads to overlap."""
    tasks = []
    small = CASES[:-1]
    for i in range(4 * THREADS):
        shape, axis = small[i % len(small)]
        tasks.append(_data(shape, axis, DTYPES[i % 2], seed=100 + i))
    for i, dtype in enumerate(DTYPES):
        shape, axis = CASES[-1]
        tasks.append(_data(shape, axis, dtype, seed=200 + i))
    return tasks


def test_threads_give_the_serial_results() -> None:
    tasks = _thread_tasks()
    serial = [run_kernels(task) for task in tasks]
    start = threading.Barrier(THREADS)

    def worker(index: int) -> list[int]:
        start.wait()  # every thread starts at once
        mismatches = []
        # Each thread walks all tasks from its own offset, so different inputs meet.
        for step in range(ROUNDS * len(tasks) // THREADS):
            t = (index + step * THREADS + step) % len(tasks)
            if run_kernels(tasks[t]) != serial[t]:
                mismatches.append(t)
        return mismatches

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(worker, range(THREADS)))
    assert results == [[] for _ in range(THREADS)]


def test_layers_in_threads_give_the_serial_results() -> None:
    # One layer per thread, each trained on its own data; every layer ends as it would alone.
    serial = [_layer_run(300 + i) for i in range(THREADS)]
    start = threading.Barrier(THREADS)

    def worker(index: int) -> bool:
        start.wait()
        return all(_layer_run(300 + index) == serial[index] for _ in range(ROUNDS))

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        assert all(pool.map(worker, range(THREADS)))


def test_threads_leave_module_globals_unchanged() -> None:
    _workload()
    before = _globals_fingerprint()
    tasks = _thread_tasks()[: 2 * THREADS]

    def worker(index: int) -> None:
        for task in tasks[index::THREADS]:
            run_kernels(task)

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        list(pool.map(worker, range(THREADS)))
    assert _globals_fingerprint() == before


def test_error_state_is_not_changed_by_any_call() -> None:
    # Kernels may silence NumPy's floating-point warnings for their own arithmetic, but the
    # caller's error state is the caller's: it is the same before and after every call.
    before = np.geterr()
    with np.errstate(all="ignore"):
        _workload_quiet()
        inside = np.geterr()
    assert inside == {"divide": "ignore", "over": "ignore", "under": "ignore", "invalid": "ignore"}
    assert np.geterr() == before
    _workload()
    assert np.geterr() == before


def _workload_quiet() -> None:
    run_kernels(_data((4, 3, 5), 1, np.float32, seed=11))
    bn.BatchNorm(3)(np.ones((4, 3)) * np.arange(3))
