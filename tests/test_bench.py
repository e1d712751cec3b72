"""benchmarks/bench.py: the quick smoke run works, and its textbook baseline computes BatchNorm.

Speed itself is never asserted here: timings belong to the benchmark, read as ratios.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from helpers import load_module

import batchnorm as bn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
HAS_TORCH = importlib.util.find_spec("torch") is not None

ROW_KEYS = {
    "shape",
    "dtype",
    "ours_s",
    "textbook_s",
    "textbook_over_ours",
    "fwd_peak_x",
    "bwd_peak_x",
    "textbook_fwd_peak_x",
    "textbook_bwd_peak_x",
    "eval_s",
    "muladd_s",
    "eval_over_muladd",
    "eval_plain_s",
    "eval_plain_over_muladd",
    "muladd_scalars_s",
    "eval_over_scalars",
    "err_ours",
    "err0_ours",
    "copy_s",
    "ours_over_traffic",
}
TORCH_ROW_KEYS = {
    "torch1_s",
    "torchN_s",
    "ours_over_torch1",
    "ours_over_torchN",
    "err_torch",
    "err0_torch",
}


def run_quick(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_module("bench", BENCH)


@pytest.mark.slow
def test_quick_run_prints_the_table() -> None:
    result = run_quick()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in ("shape", "ours ms", "textbook", "tb/ours", "fwd mem", "eval/ma", "(64,16)"):
        assert text in out, f"{text!r} missing from:\n{out}"
    assert "geometric means over the shapes" in out
    assert ("ours/t1" in out) == HAS_TORCH


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--no-torch",)], ids=["default", "no-torch"])
def test_quick_json_has_the_expected_keys(extra: tuple[str, ...]) -> None:
    result = run_quick("--json", *extra)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert set(report) == {"env", "rows", "geomean", "precise_bn"}
    assert set(report["precise_bn"]) == {
        "precise_train_over_forward",
        "precise_sequential_over_forward",
    }
    assert all(ratio > 0 for ratio in report["precise_bn"].values())
    with_torch = HAS_TORCH and not extra
    assert (report["env"]["torch"] is not None) == with_torch
    assert [row["shape"] for row in report["rows"]] == [[8, 4, 5, 5], [64, 16], [64, 8, 8, 8]]
    for row in report["rows"]:
        expected = ROW_KEYS | (TORCH_ROW_KEYS if with_torch else set())
        assert set(row) == expected
        assert row["dtype"] == "float32"
        for key in expected - {"shape", "dtype"}:
            assert row[key] > 0, (key, row[key])
    means = set(report["geomean"])
    assert {"textbook_over_ours", "eval_over_muladd", "ours_over_traffic"} <= means
    assert ("ours_over_torch1" in means) == with_torch


@pytest.mark.slow
def test_crossover_times_both_roads() -> None:
    result = run_quick("--crossover", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["shape"] for row in rows] == [[64, 64], [16, 16, 4, 4], [128, 64], [32, 16, 4, 4]]
    assert all(row["lean_over_streaming"] > 0 for row in rows)


def test_precise_overhead_runs_the_batches_asked_for(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    original = bn.precise_bn

    def counting(model: Any, batches: Any, num_batches_precise: int, **kwargs: Any) -> Any:
        seen.append(len(batches))
        assert num_batches_precise == len(batches)
        return original(model, batches, num_batches_precise, **kwargs)

    monkeypatch.setattr(bench.bn, "precise_bn", counting)
    ratios = bench.precise_overhead(np.dtype(np.float32), 1, True, num_batches=3)
    assert seen and set(seen) == {3}  # every call, in train and in sequential mode
    assert all(ratio > 0 for ratio in ratios.values())


def test_precise_batches_must_be_positive() -> None:
    result = run_quick("--precise-batches", "0")
    assert result.returncode == 2
    assert "--precise-batches must be at least 1; got 0" in result.stderr


@pytest.mark.parametrize("shape", [(16, 5), (4, 3, 5, 6)])
def test_textbook_baseline_is_batchnorm(bench: ModuleType, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 3.0 + 2.0
    dy = rng.standard_normal(shape)
    gamma = rng.uniform(0.5, 1.5, shape[1])
    beta = rng.standard_normal(shape[1])
    y_ref, cache = bn.forward_train(x, gamma, beta)
    grads_ref = bn.backward(dy, cache)
    y, tb_cache = bench.textbook_forward(x, gamma, beta)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(bench.textbook_backward(dy, tb_cache), grads_ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    xhat, _ = bn.forward_train(x)
    np.testing.assert_allclose(bench.float64_reference(x), xhat, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compare_runs_against_an_earlier_version() -> None:
    root = BENCH.parents[1]
    if not (root / ".git").exists():
        pytest.skip("benchmarks/compare.py reads earlier versions from git: not a checkout")
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH.with_name("compare.py")),
            "HEAD",
            "--shape",
            "8,4",
            "--rounds",
            "1",
            "--control",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "after / before (HEAD)" in result.stdout
    ratios = r"step \d+\.\d\d\s+forward \d+\.\d\d\s+eval \d+\.\d\d"
    line = rf"\(8, 4\)\s+before\s+\d+ us\s+{ratios}\s+copy: {ratios}"
    assert re.search(line, result.stdout), result.stdout


@pytest.mark.slow
def test_stream_passes_times_every_pass_of_the_streaming_step() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH.with_name("stream_passes.py")), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "(512, 32), float32: one step" in out
    times = re.findall(r"^  (forward|backward): .+?\s+(\d+\.\d)\s+(\d+\.\d\d)$", out, re.M)
    assert len(times) == 11, out  # five passes forward, six backward
    assert all(float(us) > 0 for _, us, _ in times)
    total = re.search(r"sum of the passes\s+(\d+\.\d)", out)
    assert total is not None and float(total.group(1)) > 0, out


def test_lean_dtype_steps_compute_the_library_step() -> None:
    # benchmarks/lean_dtype.py times two bare versions of the small road's step: both must
    # compute what the library does, to float32 rounding.
    sys.path.insert(0, str(BENCH.parent))  # lean_dtype imports bench as a sibling module
    try:
        lean = load_module("lean_dtype", BENCH.with_name("lean_dtype.py"))
    finally:
        sys.path.remove(str(BENCH.parent))
    rng = np.random.default_rng(1)
    x, dy = (rng.standard_normal((64, 32)).astype(np.float32) for _ in range(2))
    g, b = rng.uniform(0.5, 1.5, 32), rng.standard_normal(32)
    y_ref, dx_ref = lean.library_step(x, dy, g, b)
    for step in (lean.step_float64, lean.step_float32):
        y, dx = step(x, dy, g, b)
        assert y.dtype == dx.dtype == np.float32
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-6)
        np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_lean_dtype_prints_a_row_per_shape() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH.with_name("lean_dtype.py")), "--rounds", "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("  (")]
    assert [row[0] + row[1] for row in rows] == ["(64,32)", "(64,128)", "(32,256)", "(128,64)"]
    assert all(len(row) == 13 for row in rows), result.stdout
