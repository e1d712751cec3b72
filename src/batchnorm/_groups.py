"""The groups of workers that come with the library: the ranks of an MPI communicator, and
connected groups for the threads of one process (re-exported by :mod:`batchnorm.distributed`).

Both wait a bounded time for the other ranks: a rank that never joins an exchange (eval mode,
frozen, group=None, an exception in user code, an exited rank) makes the others raise or, on
MPI by default, abort the job, instead of hanging. mpi4py is imported when the first
:class:`MPIGroup` is made, never on import.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from typing import Any, NoReturn

import numpy as np
from numpy.typing import NDArray

from batchnorm import _fingerprint, _validate

__all__ = ["MPIGroup", "thread_groups"]

Vector = NDArray[np.float64]


class MPIGroup:
    """The ranks of an MPI communicator, as a group for synchronized BatchNorm.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        The communicator; None: ``MPI.COMM_WORLD``. Pass a sub-communicator
        (``comm.Split(...)``) to synchronize BatchNorm within smaller groups of ranks.
    timeout : float or None, default 300.0
        Seconds an ``allgather`` waits for every rank to join before giving up; None: forever.
        A rank that never joins is a rank doing something else: a layer in eval mode or frozen
        while the others train, a layer with ``group=None``, an exception in user code that
        skipped the rest of the step (report it with :func:`batchnorm.distributed.fail`), an
        exited rank.
    on_timeout : {"abort", "raise"}, default "abort"
        What a rank that timed out does. ``"abort"`` writes the TimeoutError's message to
        stderr and calls ``comm.Abort(1)``: every rank of the job ends. ``"raise"`` raises the
        TimeoutError on this rank and leaves the group broken (every later ``allgather``
        raises at once).

    Attributes
    ----------
    comm : mpi4py.MPI.Comm
    rank, size : int
        This process's rank and the number of ranks.
    timeout : float or None
    on_timeout : str

    Raises
    ------
    ImportError
        mpi4py is not installed; the message says ``pip install 'batchnorm[mpi]'``.

    Notes
    -----
    ``allgather`` is a non-blocking ``Iallgather`` of the lengths, then ``Iallgatherv`` of
    the float64 data, each polled with ``Test`` (without pause for 20 ms, then with sleeps
    growing to 1 ms) until `timeout` seconds have passed: every rank's array, in rank order,
    on every rank. Launch with
    ``mpiexec -n 4 python script.py``; a script run without mpiexec is a group of one.

    **Why "abort" is the default.** An MPI collective cannot be cancelled: the waiting rank's
    request stays pending, and the rank that never joined is somewhere else, maybe blocked in
    a collective of its own. A rank that raises and exits does not end the others: under
    MPICH the job then hangs until killed. Aborting turns a hang into an error message and a
    non-zero exit of ``mpiexec``. Choose ``"raise"`` to handle the error yourself (log, save
    a checkpoint), then end the job, for example with ``comm.Abort()`` or by running the
    script as ``python -m mpi4py script.py``, which aborts on an uncaught exception.

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm import distributed as dist
    >>> group = dist.MPIGroup(timeout=60.0)  # doctest: +SKIP
    >>> group.allgather(np.array([group.rank], dtype=float))   # doctest: +SKIP
    [array([0.]), array([1.])]
    """

    def __init__(
        self, comm: Any = None, timeout: float | None = 300.0, on_timeout: str = "abort"
    ) -> None:
        self.timeout = _validate.timeout_value(timeout)
        self.on_timeout = _validate.on_timeout_value(on_timeout)
        try:
            mpi = importlib.import_module("mpi4py.MPI")
        except ImportError as err:
            raise _validate.mpi_missing(err) from err
        self.comm = mpi.COMM_WORLD if comm is None else comm
        self._double = mpi.DOUBLE
        self._broken = False

    @property
    def rank(self) -> int:
        return int(self.comm.Get_rank())

    @property
    def size(self) -> int:
        return int(self.comm.Get_size())

    def allgather(self, array: Vector) -> list[Vector]:
        """Every rank's array, in rank order, on every rank (waits at most `timeout` s)."""
        if self._broken:
            raise _validate.group_broken_mpi(self.rank, self.size)
        data = np.ascontiguousarray(array, dtype=np.float64).ravel()
        lengths = np.zeros(self.size, dtype=np.int64)
        start = time.monotonic()
        self._wait(self.comm.Iallgather(np.array([data.size], dtype=np.int64), lengths), start)
        counts = [int(n) for n in lengths]
        ends = np.cumsum(counts)
        received = np.empty(int(ends[-1]), dtype=np.float64)
        spec = [received, (counts, [int(e - n) for e, n in zip(ends, counts, strict=True)])]
        self._wait(self.comm.Iallgatherv(data, [*spec, self._double]), start)
        return np.split(received, ends[:-1])

    def _wait(self, request: Any, start: float) -> None:
        """Poll `request` until it completes or `timeout` seconds have passed since `start`."""
        if self.timeout is None:
            request.Wait()
            return
        pause = 1e-5
        while not request.Test():
            waited = time.monotonic() - start
            if waited > self.timeout:
                self._timed_out()
            # Spin as MPI's own Wait does while the exchange is likely to be quick (a sleep,
            # even of 0 s, costs about 0.1 ms on a busy machine); after 20 ms, sleep between
            # polls, up to 1 ms.
            if waited > 0.02:
                time.sleep(pause)
                pause = min(1e-3, 2 * pause)

    def _timed_out(self) -> NoReturn:
        assert self.timeout is not None
        abort = self.on_timeout == "abort"
        message = _validate.group_timeout(self.rank, self.size, self.timeout,
                                          _fingerprint.waited_for(), abort)  # fmt: skip
        self._broken = True
        if abort:
            print(f"TimeoutError: {message}", file=sys.stderr, flush=True)
            self.comm.Abort(1)
            os._exit(1)  # MPICH's Abort may return before the process manager ends the ranks
        raise TimeoutError(message)

    def __repr__(self) -> str:
        return f"MPIGroup(rank={self.rank}, size={self.size})"


class _Hub:
    """What the thread groups of one :func:`thread_groups` call share: slots and a barrier."""

    def __init__(self, size: int, timeout: float | None) -> None:
        self.size, self.timeout = size, timeout
        self.slots: list[Vector] = [np.zeros(0)] * size
        self.barrier = threading.Barrier(size, timeout=timeout)

    def allgather(self, rank: int, array: Vector) -> list[Vector]:
        self.slots[rank] = np.array(array, dtype=np.float64, copy=True)
        self._wait(rank)  # every slot is written
        parts = [slot.copy() for slot in self.slots]
        self._wait(rank)  # every rank has read them: the slots may be reused
        return parts

    def _wait(self, rank: int) -> None:
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            what = _fingerprint.waited_for()
            raise _validate.group_broken(rank, self.size, self.timeout, what) from None


class _ThreadGroup:
    """One thread's member of a :func:`thread_groups` group."""

    def __init__(self, hub: _Hub, rank: int) -> None:
        self._hub, self._rank = hub, rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._hub.size

    def allgather(self, array: Vector) -> list[Vector]:
        """Every thread's array, in rank order (waits for all of them, at most `timeout` s)."""
        return self._hub.allgather(self._rank, array)

    def abort(self) -> None:
        """Break the group: every thread waiting in allgather, now or later, raises at once."""
        self._hub.barrier.abort()

    def __repr__(self) -> str:
        return f"thread_groups({self.size})[{self.rank}]"


def thread_groups(size: int, *, timeout: float | None = 60.0) -> list[_ThreadGroup]:
    """`size` connected groups for the threads of one process: give ``groups[r]`` to thread r.

    Parameters
    ----------
    size : int
        The number of threads (ranks).
    timeout : float or None, default 60.0
        Seconds an ``allgather`` waits for the other threads before raising RuntimeError (None:
        forever). A thread that fails outside BatchNorm can call ``group.abort()`` to release
        the others at once (the group is then broken, as after a timeout), or
        :func:`batchnorm.distributed.fail` to make them raise in their exchange (the group
        goes on working).

    Returns
    -------
    list of groups
        ``groups[r].rank == r`` and ``groups[r].size == size``.

    Notes
    -----
    For tests, teaching, and checking a distributed setup without MPI: the arithmetic is that
    of any other group, so results are bitwise those of MPI ranks holding the same parts.

    Examples
    --------
    >>> import threading
    >>> import numpy as np
    >>> from batchnorm import distributed as dist
    >>> groups = dist.thread_groups(2)
    >>> out = {}
    >>> def work(group):
    ...     out[group.rank] = group.allgather(np.array([10.0 * group.rank]))
    >>> threads = [threading.Thread(target=work, args=(g,)) for g in groups]
    >>> for t in threads: t.start()
    >>> for t in threads: t.join()
    >>> out[1]
    [array([0.]), array([10.])]
    """
    hub = _Hub(_validate.thread_group_size(size), _validate.timeout_value(timeout))
    return [_ThreadGroup(hub, rank) for rank in range(hub.size)]
