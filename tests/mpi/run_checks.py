"""Run the checks of checks.py on the ranks of MPI.COMM_WORLD.

    mpiexec -n 4 python tests/mpi/run_checks.py [name ...]

Every rank runs every check (or the named ones) in the same order; after each check the ranks
exchange their outcome, so that a check failing on one rank stops every rank instead of leaving
the others waiting. Exits 0 when every check passed on every rank; rank 0 prints a summary.
"""

from __future__ import annotations

import sys
import traceback

import checks  # tests/mpi/checks.py: this script's directory is on sys.path
import numpy as np

from batchnorm import distributed as dist


def main(names: list[str]) -> int:
    group = dist.MPIGroup()
    chosen = names or sorted(checks.CHECKS)
    for name in chosen:
        try:
            checks.CHECKS[name](group)  # an unknown name fails on every rank alike
            ok = 1.0
        except Exception:
            print(f"rank {group.rank}: {name} FAILED", file=sys.stderr)
            traceback.print_exc()
            ok = 0.0
        outcome = group.allgather(np.array([ok]))
        if not all(part[0] == 1.0 for part in outcome):
            if group.rank == 0:
                failed = [r for r, part in enumerate(outcome) if part[0] != 1.0]
                print(f"FAILED {name} on ranks {failed}")
            return 1
    if group.rank == 0:
        print(f"passed {len(chosen)} checks on {group.size} ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
