"""Synchronized BatchNorm across workers: groups (MPI, threads) and the kernels over them.

Workers run the same model on different parts of a batch; synchronized BatchNorm normalizes
every part with the statistics of all of them, so that the workers together compute exactly
what one process would compute on the whole batch. A *group* is anything with ``rank``,
``size`` and ``allgather(array)`` (:class:`Group`); :class:`MPIGroup` wraps an mpi4py
communicator and :func:`thread_groups` connects threads of one process. See
docs/distributed.md.

Each training step communicates twice, one allgather each, O(C) values per rank: forward sends
(C, count, mean, var) and a status flag, backward the 2C sums ``sum(dy)``, ``sum(dy * xhat)``
and a status flag. Every rank combines what arrives in rank order, so every rank holds bitwise
the same statistics. Bad input on one rank raises on every rank (the bad one its usual error,
the others an error of the same type naming it), with nothing changed anywhere.

Importing this module does not import mpi4py; :class:`MPIGroup` does, when it is created.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _exchange, _parallel, _validate, _walk
from batchnorm.functional import BatchNormCache
from batchnorm.layer import BatchNorm

__all__ = ["Group", "MPIGroup", "backward", "forward_train", "synchronize", "thread_groups"]

Group = _exchange.Group
Vector = NDArray[np.float64]


class MPIGroup:
    """The ranks of an MPI communicator, as a group for synchronized BatchNorm.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        The communicator; None: ``MPI.COMM_WORLD``. Pass a sub-communicator
        (``comm.Split(...)``) to synchronize BatchNorm within smaller groups of ranks.

    Attributes
    ----------
    comm : mpi4py.MPI.Comm
    rank, size : int
        This process's rank and the number of ranks.

    Raises
    ------
    ImportError
        mpi4py is not installed; the message says ``pip install 'batchnorm[mpi]'``.

    Notes
    -----
    ``allgather`` is mpi4py's ``comm.allgather`` of the NumPy array: every rank's array, in
    rank order, on every rank. Launch with ``mpiexec -n 4 python script.py``; a script run
    without mpiexec is a group of one.

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm import distributed as dist
    >>> group = dist.MPIGroup()             # doctest: +SKIP
    >>> group.allgather(np.array([group.rank], dtype=float))   # doctest: +SKIP
    [array([0.]), array([1.])]
    """

    def __init__(self, comm: Any = None) -> None:
        try:
            mpi = importlib.import_module("mpi4py.MPI")
        except ImportError as err:
            raise _validate.mpi_missing(err) from err
        self.comm = mpi.COMM_WORLD if comm is None else comm

    @property
    def rank(self) -> int:
        return int(self.comm.Get_rank())

    @property
    def size(self) -> int:
        return int(self.comm.Get_size())

    def allgather(self, array: Vector) -> list[Vector]:
        """Every rank's array, in rank order, on every rank."""
        return list(self.comm.allgather(np.ascontiguousarray(array)))

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
            raise _validate.group_broken(rank, self.size, self.timeout) from None


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
        the others at once. Either way the group is broken afterwards.

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
    layers = [layer for _, layer in _walk.reachable(model)]
    for layer in layers if checked is not None else []:  # all checked before any is set
        if not layer._synchronizable:
            _validate.no_group(type(layer).__name__)
        if layer.ghost_batch_size is not None:
            _validate.no_group("ghost_batch_size")
    for layer in layers:
        layer.group = checked
    return layers


# --- data-parallel helpers: gradients, and shuffling samples across ranks -------------------------

ShuffleToken = _parallel.ShuffleToken


def allreduce(arrays: list[ArrayLike], group: Group, average: bool = False) -> list[Any]:
    """The sum over the ranks of each array of a list, in rank order, in ONE allgather.

    Parameters
    ----------
    arrays : list of array_like, float16, float32 or float64
        This rank's arrays (for instance every weight gradient after backward); every rank
        passes the same number, each with the same shape and dtype as on the other ranks.
    group : Group
        Every rank of the group must call this together.
    average : bool, default False
        Divide each sum by ``group.size``.

    Returns
    -------
    list of ndarray
        New arrays (the inputs are not changed), each with its input's shape and dtype:
        ``((a_0 + a_1) + a_2) + ...`` over the ranks, computed in float64 and then cast,
        bitwise the same on every rank.

    Raises
    ------
    TypeError, ValueError
        On every rank when any rank passes something else than a list of float arrays, or the
        ranks disagree on the number, shapes or dtypes of the arrays (the bad rank its own
        error, the others an error naming it).

    Notes
    -----
    The gradient rule for data parallelism: every rank's loss must be its share of the GLOBAL
    batch's loss, so ``dy`` is scaled by the global batch size, not the local one. With the
    usual mean over this rank's N_r samples, multiply its gradient by N_r / N (N = sum of
    N_r); the sum over the ranks is then the single-process gradient of the whole batch (with
    equal parts, ``average=True`` on the local-mean gradients gives the same). See
    docs/distributed.md.

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm import distributed as dist
    >>> group = dist.thread_groups(1)[0]    # one rank; threads or MPI ranks for more
    >>> dist.allreduce([np.array([1.0, 2.0]), np.ones((2, 2), np.float32)], group)[0]
    array([1., 2.])
    """
    checked = _validate.group_value(group, False)
    return _parallel.allreduce(arrays, checked, _validate.flag(average, "average"))


def shuffle(x: ArrayLike, group: Group, seed: Any) -> tuple[NDArray[Any], ShuffleToken]:
    """Permute the samples (axis 0) of the whole batch across the ranks; undo with unshuffle.

    The ranks' parts are concatenated in rank order into the global batch of N samples, which
    a permutation drawn from `seed` reorders; rank r gets as many samples as it gave (its
    N_r), the r-th run of the permuted batch. Shuffle BN (MoCo) normalizes these mixed parts
    with per-rank BatchNorm, so that no rank's batch statistics come from samples that belong
    together.

    Parameters
    ----------
    x : array_like of shape (N_r, ...), float16, float32 or float64
        This rank's samples; N_r may differ between ranks and may be 0. Every other axis and
        the dtype are the same on every rank.
    group : Group
        Every rank of the group must call this together.
    seed : int or sequence of int, non-negative
        The same on every rank (checked): ``numpy.random.default_rng(SeedSequence(seed))``
        draws the permutation, so a seed gives the same order on every run (with the same
        NumPy on every rank: NumPy does not promise the same stream across its versions). Pass
        for instance ``(base_seed, step)`` for a new order each step.

    Returns
    -------
    x_shuffled : ndarray of shape (N_r, ...), x's dtype
        Samples of the global batch, bitwise as they were sent.
    token : ShuffleToken
        For :func:`unshuffle`: the permutation (the same on every rank) and every part's size.

    Raises
    ------
    TypeError, ValueError
        On every rank when a rank's x is not a float array of at least one dimension, its
        seed is not an int or a sequence of ints, or the ranks disagree on dtypes, on shapes
        beyond axis 0, or on the seed (the bad rank its own error, the others one naming it).

    Notes
    -----
    One allgather: every rank receives the whole batch, O(N) samples, as MoCo's
    ``concat_all_gather`` does (MoCo then takes equal parts of a permutation broadcast from
    rank 0; here every rank derives the permutation from the seed, and parts may differ).

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm import distributed as dist
    >>> group = dist.thread_groups(1)[0]
    >>> x = np.arange(5.0)[:, None]
    >>> xs, token = dist.shuffle(x, group, seed=0)
    >>> bool((xs[:, 0] == token.permutation).all())
    True
    >>> bool((dist.unshuffle(xs, token, group) == x).all())
    True
    """
    return _parallel.shuffle(x, _validate.group_value(group, False), seed)


def unshuffle(y: ArrayLike, token: ShuffleToken, group: Group) -> NDArray[Any]:
    """Put the samples of a shuffled part back on their ranks, in their order: shuffle's inverse.

    Parameters
    ----------
    y : array_like of shape (N_r, ...), float16, float32 or float64
        One row per sample of this rank's shuffled part, in the shuffled order (for instance
        the output of a network on it: every axis but 0 may differ from x's, the same on every
        rank).
    token : ShuffleToken
        What :func:`shuffle` returned on this rank.
    group : Group
        The group of the shuffle; every rank must call this together.

    Returns
    -------
    ndarray of shape (N_r, ...), y's dtype
        Row i is the row of y (on whichever rank) computed from this rank's sample i.
        ``unshuffle(shuffle(x)[0], token) == x`` bitwise.

    Raises
    ------
    TypeError, ValueError
        On every rank when a rank's token is not from its shuffle with this group, its y has
        another number of rows than its shuffled part, or the ranks disagree on y's dtype or
        its shape beyond axis 0.

    Examples
    --------
    >>> import numpy as np
    >>> from batchnorm import distributed as dist
    >>> group = dist.thread_groups(1)[0]
    >>> xs, token = dist.shuffle(np.arange(4.0)[:, None], group, seed=(7, 0))
    >>> dist.unshuffle(10 * xs, token, group).ravel()
    array([ 0., 10., 20., 30.])
    """
    return _parallel.unshuffle(y, token, _validate.group_value(group, False))


__all__ += ["ShuffleToken", "allreduce", "shuffle", "unshuffle"]
