"""Run the checks of parallel_checks.py on the ranks of MPI.COMM_WORLD.

    mpiexec -n 4 python tests/mpi/run_parallel_checks.py [name ...]

The same driver as run_checks.py (every rank runs every check in order and the ranks exchange
their outcome after each), with the data-parallel helpers' checks.
"""

from __future__ import annotations

import sys

import parallel_checks  # this script's directory is on sys.path
import run_checks

if __name__ == "__main__":
    run_checks.checks = parallel_checks  # type: ignore[assignment]
    sys.exit(run_checks.main(sys.argv[1:]))
