"""examples/distributed_digits.py in --quick mode: on threads, and on MPI ranks when available.

With SyncBN the data-parallel run must reproduce single-process training on the global batch
(the script's --check compares every step's loss); with --no-sync it must not.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed_mpi import run_mpi

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "distributed_digits.py"
REPRODUCED = "SyncBN reproduces single-process training within 1e-9: True"


def run_threads(*args: str) -> str:
    pytest.importorskip("sklearn")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 3])
def test_syncbn_on_threads_reproduces_single_process_training(ranks: int) -> None:
    stdout = run_threads("--check", "--thread-ranks", str(ranks))
    assert REPRODUCED in stdout, stdout
    assert f"over {ranks} ranks" in stdout and "normalizes over ~64 samples" in stdout
    assert "bitwise identical on every rank: True" in stdout


@pytest.mark.slow
def test_per_rank_batchnorm_normalizes_smaller_batches_and_trains_differently() -> None:
    stdout = run_threads("--check", "--no-sync", "--thread-ranks", "4")
    assert "per-rank BatchNorm: each BatchNorm normalizes over ~16 samples" in stdout
    gap = float(stdout.split("single-process loss| over")[1].split(":")[1])
    assert gap > 1e-3, stdout
    assert "reproduces" not in stdout


@pytest.mark.slow
def test_syncbn_on_mpi_ranks_reproduces_single_process_training() -> None:
    pytest.importorskip("sklearn")
    stdout = run_mpi(2, SCRIPT, "--quick", "--check")
    assert REPRODUCED in stdout, stdout
    assert "over 2 ranks" in stdout
    assert "bitwise identical on every rank: True" in stdout
