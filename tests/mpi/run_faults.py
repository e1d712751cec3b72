"""Run the faults of faults.py on the ranks of MPI.COMM_WORLD, each on a fresh communicator.

    mpiexec -n 2 python tests/mpi/run_faults.py [--timeout S] [--report] [name ...]
    mpiexec -n 2 python tests/mpi/run_faults.py --exit raise|abort [--stuck] [--timeout S]

Every fault gets ``MPIGroup(COMM_WORLD.Dup(), timeout=S, on_timeout="raise")``: a group left
broken by a timeout is not used again. After each fault the ranks exchange their outcome, so
that one failing on one rank fails the run. Exits 0 when every fault behaved as expected on
every rank; rank 0 prints a summary (with ``--report``, what each rank saw first, and the
seconds the fault took on the slowest rank: docs/distributed.md's fault table).

``--exit`` runs the exited-rank fault instead: the last rank calls ``sys.exit(0)`` between
forward and backward; rank 0, waiting in backward, raises a TimeoutError (``raise``: it checks
the message and that its layer is unchanged, then exits 0) or aborts the job (``abort``).
With ``--stuck`` the last rank blocks in a ``Barrier`` of its own instead of exiting, as a
rank that went on to the rest of its step would: then only an abort ends the job.

``--stderr-dir DIR`` writes each rank's stderr to ``DIR/rank<r>.err``: when a rank aborts, the
process manager may end the job before it has forwarded what the ranks printed, so a check of
the abort message reads it from these files.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import faults  # tests/mpi/faults.py: this script's directory is on sys.path
import numpy as np
from mpi4py import MPI

import batchnorm as bn
from batchnorm import distributed as dist


def run_faults(names: list[str], timeout: float, report: bool) -> int:
    world = dist.MPIGroup(timeout=None)
    chosen = names or sorted(faults.FAULTS)
    for name in chosen:
        group = dist.MPIGroup(MPI.COMM_WORLD.Dup(), timeout=timeout, on_timeout="raise")
        faults.SEEN.clear()
        start = time.perf_counter()
        try:
            faults.FAULTS[name](group)
            ok = 1.0
        except Exception:
            print(f"rank {group.rank}: {name} FAILED", file=sys.stderr)
            traceback.print_exc()
            ok = 0.0
        seen = MPI.COMM_WORLD.gather((time.perf_counter() - start, faults.SEEN[:1]), root=0)
        if report and world.rank == 0:
            each = "; ".join(f"rank {r}: {s[0] if s else '-'}" for r, (_, s) in enumerate(seen))
            print(f"{name}: {each}; {max(t for t, _ in seen):.2f} s")
        outcome = world.allgather(np.array([ok]))
        if not all(part[0] == 1.0 for part in outcome):
            if world.rank == 0:
                print(f"FAILED {name} on ranks {[r for r, p in enumerate(outcome) if p[0] != 1]}")
            return 1
    if world.rank == 0:
        print(f"passed {len(chosen)} faults on {world.size} ranks")
    return 0


def run_exit(on_timeout: str, timeout: float, stuck: bool) -> int:
    group = dist.MPIGroup(timeout=timeout, on_timeout=on_timeout)
    layer = bn.BatchNorm(3, group=group)
    y = layer(faults.part(group))
    if faults.odd(group):  # between forward and backward
        if stuck:  # waits for rank 0 in a collective of its own: only an abort ends it
            MPI.COMM_WORLD.Barrier()
        sys.exit(0)
    before = faults.state(layer)
    try:
        layer.backward(np.ones_like(y))
    except TimeoutError as err:
        assert "the synchronized backward pass of BatchNorm #0" in str(err), str(err)
        assert "a rank that exited" in str(err), str(err)
        assert faults.state(layer) == before
        # The collective is still pending: the group refuses at once.
        again = faults.outcome(lambda: layer.backward(np.ones_like(y)))
        assert isinstance(again, RuntimeError), repr(again)
        assert "cannot exchange anything any more" in str(again), str(again)
        print(f"rank {group.rank}: TimeoutError, layer unchanged, group broken")
        return 0
    print(f"rank {group.rank}: no TimeoutError")
    return 1


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("names", nargs="*")
    p.add_argument("--timeout", type=float, default=4.0)
    p.add_argument("--report", action="store_true", help="print what each rank saw, and when")
    p.add_argument("--exit", choices=["raise", "abort"])
    p.add_argument("--stuck", action="store_true", help="with --exit: block instead of exiting")
    p.add_argument("--stderr-dir", help="write each rank's stderr to DIR/rank<r>.err")
    args = p.parse_args(argv)
    if args.stderr_dir:
        path = f"{args.stderr_dir}/rank{MPI.COMM_WORLD.Get_rank()}.err"
        sys.stderr = open(path, "w", buffering=1)  # noqa: SIM115 - open until the process ends
    if args.exit:
        return run_exit(args.exit, args.timeout, args.stuck)
    return run_faults(args.names, args.timeout, args.report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
