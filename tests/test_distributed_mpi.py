"""The distributed checks on real MPI ranks: mpiexec -n 2 and -n 4, as subprocesses of pytest.

Skipped when mpi4py or mpiexec is missing (``pip install 'batchnorm[mpi]'`` installs both).
Each run has a timeout, so a rank that hangs fails the test instead of stalling the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import batchnorm

MPI_DIR = Path(__file__).resolve().parent / "mpi"


def mpiexec() -> str:
    """mpiexec next to this Python (a venv with the mpich wheel), else on PATH; else skip."""
    pytest.importorskip("mpi4py")
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip("mpiexec not found (pip install 'batchnorm[mpi]')")
    return found


def launch(
    ranks: int, script: Path, *args: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run `script` on `ranks` MPI ranks with this batchnorm importable."""
    env = dict(os.environ)
    src = str(Path(batchnorm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [mpiexec(), "-n", str(ranks), sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def run_mpi(ranks: int, script: Path, *args: str, timeout: float = 240) -> str:
    """Run `script` on `ranks` MPI ranks; assert it exits 0; return stdout."""
    done = launch(ranks, script, *args, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("ranks", [2, 4])
def test_every_check_passes_on_mpi_ranks(ranks: int) -> None:
    stdout = run_mpi(ranks, MPI_DIR / "run_checks.py")
    assert f"checks on {ranks} ranks" in stdout, stdout
    assert "passed" in stdout


def test_a_check_that_fails_fails_the_run() -> None:
    with pytest.raises(AssertionError, match="exit 1"):
        run_mpi(2, MPI_DIR / "run_checks.py", "no_such_check", timeout=60)


# --- faults: ranks that stop doing the same thing (tests/mpi/faults.py) ---------------------------
# MPIGroup timeouts of 4 s; the subprocess timeouts turn a regression (a hang) into a failure.


def test_every_fault_ends_with_an_error_on_mpi_ranks() -> None:
    stdout = run_mpi(2, MPI_DIR / "run_faults.py", "--timeout", "4", timeout=150)
    assert "passed 8 faults on 2 ranks" in stdout, stdout


def test_a_rank_that_exits_times_out_the_other() -> None:
    stdout = run_mpi(2, MPI_DIR / "run_faults.py", "--exit", "raise", "--timeout", "4",
                     timeout=90)  # fmt: skip
    assert "rank 0: TimeoutError, layer unchanged, group broken" in stdout, stdout


def test_abort_ends_a_job_whose_other_rank_is_stuck(tmp_path: Path) -> None:
    # The ranks' stderr goes to files: mpiexec may end an aborted job before forwarding it.
    done = launch(2, MPI_DIR / "run_faults.py", "--exit", "abort", "--stuck", "--timeout", "4",
                  "--stderr-dir", str(tmp_path), timeout=90)  # fmt: skip
    assert done.returncode != 0, done.stdout
    printed = (tmp_path / "rank0.err").read_text()
    said = "TimeoutError: MPIGroup rank 0 of 2 waited 4 s in the synchronized backward pass"
    assert f"{said} of BatchNorm #0" in printed, printed
    assert "Aborting every rank" in printed, printed
    assert "layer unchanged" not in done.stdout  # rank 0 did not go on after the abort
