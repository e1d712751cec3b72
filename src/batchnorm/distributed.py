"""Synchronized BatchNorm across workers: groups (MPI, threads) and the kernels over them.

Workers run the same model on different parts of a batch; synchronized BatchNorm normalizes
every part with the statistics of all of them, so that the workers together compute exactly
what one process would compute on the whole batch. A *group* is anything with ``rank``,
``size`` and ``allgather(array)`` (:class:`Group`); :class:`MPIGroup` wraps an mpi4py
communicator and :func:`thread_groups` connects threads of one process. See
docs/distributed.md.

Each training step communicates twice, one allgather each, O(C) values per rank: forward sends
(C, count, mean, var, mean_lo), backward the 2C sums ``sum(dy)``, ``sum(dy * xhat)``, each with
a status flag and a fingerprint of 5 values (exchange number, operation, layer, C, dtype). Every
rank combines what arrives in rank order, so every rank holds bitwise the same statistics. Bad
input on one rank raises on every rank (the bad one its usual error, the others an error of the
same type naming it), ranks in different exchanges raise alike, and :func:`fail` reports an
error of your own code to the other ranks; in each case nothing is changed anywhere.

Importing this module does not import mpi4py; :class:`MPIGroup` does, when it is created.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NoReturn

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _exchange, _parallel, _validate, _walk
from batchnorm._groups import MPIGroup, thread_groups
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

    and :func:`batchnorm.forward_train` with ``stats=(mean, var, m)``. The means travel as
    hi + lo (``Moments.mean_lo``), so y and dx equal the single-process BatchNorm of the
    concatenated batch to float64's last bits at any offset (docs/math.md). Reference: Ioffe
    and Szegedy 2015; Peng et al., "MegDet", CVPR 2018 (cross-GPU BatchNorm).

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
