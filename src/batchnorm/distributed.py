"""Synchronized BatchNorm across workers: groups (MPI, threads) and the kernels over them.

Workers run the same model on different parts of a batch; synchronized BatchNorm normalizes
every part with the statistics of all of them, so that the workers together compute exactly
what one process would compute on the whole batch. A *group* is anything with ``rank``,
``size`` and ``allgather(array)`` (:class:`Group`); :class:`MPIGroup` wraps an mpi4py
communicator and :func:`thread_groups` connects threads of one process. See
docs/distributed.md.

Each training step communicates twice, one allgather each, O(C) values per rank: forward sends
(C, count, mean, var), backward the 2C sums ``sum(dy)``, ``sum(dy * xhat)``, each with a status
flag and a fingerprint of 5 values (exchange number, operation, layer, C, dtype). Every rank
combines what arrives in rank order, so every rank holds bitwise the same statistics. Bad input
on one rank raises on every rank (the bad one its usual error, the others an error of the same
type naming it), ranks in different exchanges raise alike, and :func:`fail` reports an error of
your own code to the other ranks; in each case nothing is changed anywhere.

Importing this module does not import mpi4py; :class:`MPIGroup` does, when it is created.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _exchange, _fingerprint, _validate, _walk
from batchnorm.functional import BatchNormCache
from batchnorm.layer import BatchNorm

__all__ = [
    "Group",
    "MPIGroup",
    "backward",
    "fail",
    "forward_train",
    "reporting",
    "synchronize",
    "thread_groups",
]

Group = _exchange.Group
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
        skipped the rest of the step (report it with :func:`fail`), an exited rank.
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
        :func:`fail` to make them raise in their exchange (the group goes on working).

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


def fail(group: Group, error: Exception) -> NoReturn:
    """Report `error`, caught on this rank in the middle of a step, to the other ranks; raise it.

    The other ranks are waiting in (or will reach) a synchronized exchange of `group`; this
    rank takes part in that exchange with `error` in place of its statistics, so that every
    other rank raises there at once (an error naming this rank and `error`, of the same type
    for TypeError, ValueError and FloatingPointError, else RuntimeError), with nothing changed
    anywhere, instead of waiting for this rank until the group's timeout. Then `error` is
    raised here. An error that came out of an exchange is known to every rank already: it is
    raised again without communicating.

    Parameters
    ----------
    group : Group
        The group of the step's synchronized layers.
    error : Exception
        What this rank caught.

    Raises
    ------
    Exception
        `error`, always.

    See Also
    --------
    reporting : the same, as a context manager around a step.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> from batchnorm import distributed as dist
    >>> group = dist.thread_groups(1)[0]
    >>> try:
    ...     raise KeyError("label")              # your own code, between forward and backward
    ... except KeyError as err:
    ...     dist.fail(group, err)
    Traceback (most recent call last):
    KeyError: 'label'
    """
    checked = _validate.group_value(group, False)
    caught = _validate.failure_value(error)
    if _exchange.reported(caught):
        raise caught
    _exchange.fail(checked, caught, "its own code (reported with dist.fail)")


@contextlib.contextmanager
def reporting(group: Group) -> Iterator[None]:
    """Around a step: an Exception raised in it is reported to the other ranks (:func:`fail`).

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> from batchnorm import distributed as dist
    >>> group = dist.thread_groups(1)[0]
    >>> layer = bn.BatchNorm(2, group=group)
    >>> with dist.reporting(group):              # every rank runs its steps like this
    ...     y = layer(np.array([[0.0, 1.0], [2.0, 3.0]]))
    ...     dx = layer.backward(np.ones_like(y))
    >>> layer.num_batches_tracked
    1
    """
    checked = _validate.group_value(group, False)
    try:
        yield
    except Exception as err:
        fail(checked, err)


def forward_train(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    group: Group,
    *,
    eps: float = 1e-5,
    axis: int = 1,
) -> tuple[NDArray[np.floating[Any]], BatchNormCache]:
    """Normalize this rank's part x with the statistics of every rank's part (SyncBN forward).

    Parameters
    ----------
    x : array_like of shape (N_r, C, *spatial), float
        This rank's part; N_r may differ between ranks and may be 0.
    gamma, beta : array_like of shape (C,) or None
        The same on every rank (as after a synchronized optimizer step).
    group : Group
        Every rank of the group must call this together.
    eps : float, default 1e-5
    axis : int, default 1

    Returns
    -------
    y : ndarray, shape, dtype and layout of x
    cache : BatchNormCache
        ``mean``, biased ``var`` and ``count`` are those of the whole batch (every rank's part),
        bitwise the same on every rank.

    Raises
    ------
    TypeError, ValueError, FloatingPointError
        On every rank when any rank's input is bad (wrong dtype or shape, NaN or inf in its
        statistics): that rank gets its usual error, the others an error of the same type
        naming it. ValueError on every rank when the ranks hold fewer than 2 values per
        channel in all.

    Notes
    -----
    Per rank r with part statistics (mean_r, var_r, m_r) from :func:`batchnorm.functional.moments`,
    one allgather, then :func:`batchnorm.functional.combine_moments` in rank order::

        m = sum_r m_r,  mean = sum_r m_r * mean_r / m,
        var = sum_r m_r * (var_r + (mean_r - mean)**2) / m

    and :func:`batchnorm.forward_train` with ``stats=(mean, var, m)``. y equals the
    single-process BatchNorm of the concatenated batch. Reference: Ioffe and Szegedy 2015;
    Peng et al., "MegDet", CVPR 2018 (cross-GPU BatchNorm).

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> from batchnorm import distributed as dist
    >>> group = dist.thread_groups(1)[0]    # one rank; threads or MPI ranks for more
    >>> x = np.array([[1.0], [3.0]])
    >>> y, cache = dist.forward_train(x, None, None, group, eps=1e-12)
    >>> y.ravel(), cache.count
    (array([-1.,  1.]), 2)
    """
    return _exchange.forward_train(
        x, gamma, beta, _validate.group_value(group, False), eps=eps, axis=axis
    )


def backward(
    dy: ArrayLike, cache: BatchNormCache, group: Group
) -> tuple[NDArray[np.floating[Any]], Vector | None, Vector | None]:
    """dx of this rank's part, and this rank's contributions to dgamma and dbeta (SyncBN backward).

    Parameters
    ----------
    dy : array_like, shape of this rank's x
    cache : BatchNormCache
        From :func:`forward_train` on this rank (a ``forward_eval`` cache is differentiated
        locally, without communication).
    group : Group
        The group of the forward pass.

    Returns
    -------
    dx : ndarray, shape, dtype and layout of x
    dgamma, dbeta : ndarray of shape (C,), float64, or None
        This rank's ``sum(dy * xhat)`` and ``sum(dy)``: summed over the ranks they are the
        whole batch's gradients (as PyTorch's SyncBatchNorm returns them).

    Raises
    ------
    ValueError, TypeError
        On every rank when any rank's dy has the wrong shape or dtype, or its cache is not a
        BatchNormCache.

    Notes
    -----
    :func:`batchnorm.functional.backward_sums` on each rank, one allgather, the sums added in
    rank order, then :func:`batchnorm.functional.backward_input` with the whole batch's count
    m::

        dx = gamma * invstd / m * (m * dy - sum(dy) - xhat * sum(dy * xhat))

    NaN in dy propagates to dx on every rank, as in :func:`batchnorm.backward`.

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm import distributed as dist
    >>> group = dist.thread_groups(1)[0]
    >>> y, cache = dist.forward_train(np.array([[1.0], [3.0]]), np.ones(1), np.zeros(1), group)
    >>> dx, dgamma, dbeta = dist.backward(np.array([[1.0], [2.0]]), cache, group)
    >>> dbeta
    array([3.])
    """
    return _exchange.backward(dy, cache, _validate.group_value(group, False))


def synchronize(model: Any, group: Group | None) -> list[BatchNorm]:
    """Set `group` on every BatchNorm reachable from `model`; return those layers.

    The model is walked as :func:`batchnorm.precise_bn` walks it (attributes, lists, tuples,
    dicts; each layer once). ``group=None`` makes the layers local again. A BatchRenorm or a
    layer with ghost batches among them is a ValueError, and then no layer is changed.

    Each layer is named by its path (``model['blocks'][1]``) in every exchange's fingerprint,
    so that ranks calling different layers raise, saying which each rank called; a layer given
    its group at construction is named ``BatchNorm #k``, the k-th created with that group.

    Examples
    --------
    >>> import batchnorm as bn
    >>> from batchnorm import distributed as dist
    >>> model = {"blocks": [bn.BatchNorm(4), bn.BatchNorm(8)]}
    >>> layers = dist.synchronize(model, dist.thread_groups(1)[0])
    >>> len(layers), layers[1].group
    (2, thread_groups(1)[0])
    """
    checked = _validate.group_value(group)
    named = _walk.reachable(model)
    layers = [layer for _, layer in named]
    for layer in layers if checked is not None else []:  # all checked before any is set
        if not layer._synchronizable:
            _validate.no_group(type(layer).__name__)
        if layer.ghost_batch_size is not None:
            _validate.no_group("ghost_batch_size")
    for path, layer in named:
        layer.group = checked
        layer._tag = path  # the exchanges name the layer by its path: the same on every rank
    return layers
