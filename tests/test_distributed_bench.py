"""benchmarks/bench_distributed.py runs (--quick) in one process and on two MPI ranks.

Only that it runs and reports consistent numbers is checked: times are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed_mpi import run_mpi

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_distributed.py"


def check(result: dict[str, object], ranks: int) -> None:
    assert result["ranks"] == ranks
    assert result["shape"] == [8, 16, 4, 4]
    # status flag, fingerprint (5 values), C, count, mean, var, mean_lo / flag, fingerprint, C,
    # the 2C sums
    assert result["bytes_forward"] == 8 * (8 + 3 * 16)
    assert result["bytes_backward"] == 8 * (7 + 2 * 16)
    local, sync = float(result["local_ms"]), float(result["sync_ms"])  # type: ignore[arg-type]
    assert local > 0 and sync > 0
    assert result["ratio"] == pytest.approx(sync / local)
    assert float(result["alone_ms"]) > 0  # type: ignore[arg-type]


@pytest.mark.slow
def test_bench_distributed_in_one_process() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    check(json.loads(done.stdout), 1)


@pytest.mark.slow
def test_bench_distributed_on_two_mpi_ranks() -> None:
    check(json.loads(run_mpi(2, SCRIPT, "--quick", "--json")), 2)
