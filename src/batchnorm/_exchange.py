"""The exchange of statistics within a group of workers, below every layer that needs it.

Synchronized BatchNorm (``BatchNorm(group=...)``, :mod:`batchnorm.distributed`) and PreciseBN
across workers send their per-channel statistics here. Every exchange is ONE
``group.allgather`` of a float64 vector per rank that starts with a status flag and the
exchange's fingerprint (:mod:`batchnorm._fingerprint`): a rank whose local work raised sends the
code and text of its error instead of its statistics, so that every rank learns of it in the
same call and raises (the failing rank its own error, the others an error of the same type
naming that rank); ranks whose fingerprints differ (different layers, operations, C or dtype)
all raise, naming what each rank was doing. No rank ever waits for a rank that has given up,
and nothing is changed anywhere before every rank knows the step succeeded.

What arrives is combined in rank order (:func:`batchnorm.functional.combine_moments`, or a sum
from rank 0 up), the same arithmetic on the same inputs, so every rank ends with bitwise the
same statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NoReturn, Protocol, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _exact, _fingerprint, _validate
from batchnorm import functional as F

Vector = NDArray[np.float64]
_T = TypeVar("_T")


class Group(Protocol):
    """A group of workers, as synchronized BatchNorm and PreciseBN use it.

    Any object with these three members works (an MPI communicator wrapper, threads, your own
    transport): ``rank`` in ``range(size)``, and ``allgather(array)``, which every rank calls
    with a 1-D float64 array (the arrays of different ranks may differ in length) and which
    returns the list of every rank's array, in rank order, on every rank.
    """

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def allgather(self, array: Vector) -> list[Vector]: ...


def gather(
    group: Group,
    work: Callable[[], tuple[_T, Vector]],
    what: str,
    sign: _fingerprint.Sign = _fingerprint.UNKNOWN,
) -> tuple[_T, list[Vector]]:
    """Run this rank's `work`, then exchange its payload with a status flag in ONE allgather.

    `work` returns (a value kept locally, the payload to send); `sign` says which layer, C and
    dtype this rank means (for the fingerprint). Returns the value and every rank's payload, in
    rank order, once every rank has succeeded in the same exchange; else raises on every rank.
    A second allgather, of each rank's description, happens only when the fingerprints differ.
    """
    head, exchange = _fingerprint.header(group, what, sign)
    failure: Exception | None = None
    try:
        value, payload = work()
        message = np.concatenate(([0.0], head, np.asarray(payload, dtype=np.float64).ravel()))
    except Exception as err:
        failure = err
        kinds = _validate.RANK_ERRORS
        code = next((i + 1 for i, kind in enumerate(kinds) if isinstance(err, kind)), 0)
        text = _fingerprint.encode(_validate.error_text(err, str(exchange)))
        message = np.concatenate(([float(code or len(kinds) + 1)], head, text))
    token = _fingerprint.enter(exchange)
    try:
        parts = _validate.gathered(group.allgather(message), group.size)
        if failure is not None:
            raise failure
        _check(group, parts, exchange)
    except Exception as err:
        _mark_reported(err)
        raise
    finally:
        _fingerprint.leave(token)
    return value, [part[1 + _fingerprint.SIZE :] for part in parts]


def _check(group: Group, parts: list[Vector], exchange: _fingerprint.Exchange) -> None:
    """Raise on every rank when a rank failed or the ranks' fingerprints differ."""
    failed = [r for r, part in enumerate(parts) if part.size == 0 or part[0] != 0.0]
    if failed:
        first = parts[failed[0]]
        code = int(first[0]) if first.size else 0
        kinds = _validate.RANK_ERRORS
        kind = kinds[code - 1] if 1 <= code <= len(kinds) else RuntimeError
        said = _fingerprint.decode(first[1 + _fingerprint.SIZE :])
        raise _validate.rank_failed(kind, failed, group.size, str(exchange), said)
    heads = [part[1 : 1 + _fingerprint.SIZE].tobytes() for part in parts]
    if any(h != heads[0] for h in heads):  # every rank sees it: every rank asks for the words
        labels = group.allgather(_fingerprint.encode(str(exchange)))
        raise _validate.group_desync([_fingerprint.decode(np.asarray(v)) for v in labels])


def _mark_reported(err: BaseException) -> None:
    with contextlib.suppress(AttributeError):  # an exception class with __slots__
        err._batchnorm_reported = True  # type: ignore[attr-defined]


def reported(err: BaseException) -> bool:
    """Whether `err` came out of an exchange, so that every rank of its group knows of it."""
    return getattr(err, "_batchnorm_reported", False) is True


def fail(group: Group, error: Exception, what: str) -> NoReturn:
    """Take part in the exchange the other ranks are in, only to report `error` and raise it."""

    def work() -> tuple[None, Vector]:
        raise error

    gather(group, work, what)
    raise AssertionError("unreachable: gather raised")  # pragma: no cover


def new_tag(group: Group | None) -> str:
    """The tag of a layer created with `group` on this rank (see :mod:`batchnorm._fingerprint`)."""
    return _fingerprint.new_tag(group)


def widths(parts: list[Vector], what: str) -> int:
    """The channel count C at the head of every rank's payload: the same on every rank."""
    found = [int(part[0]) for part in parts]
    if len(set(found)) != 1:
        raise _validate.group_widths(found, what)
    return found[0]


# --- synchronized BatchNorm: forward, backward ----------------------------------------------------


def forward_train(
    x: ArrayLike,
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    group: Group,
    *,
    eps: float = 1e-5,
    axis: int = 1,
    num_features: int | None = None,
    tag: str = "",
) -> tuple[NDArray[np.floating[Any]], F.BatchNormCache]:
    """Normalize this rank's part with the statistics of every rank's part (one allgather).

    Local checks and ``F.moments``; send (C, count, mean, var, mean_lo); ``F.combine_moments``
    in rank order; ``F.forward_train(stats=...)`` (the means travel as hi + lo: exact at any
    offset). `num_features`, when given, is the layer's C; `tag` names the layer in the
    fingerprint.
    """

    def local() -> tuple[Any, Vector]:
        xa = _validate.float_array(x)
        if num_features is not None:
            xa = _validate.layer_input(xa, num_features, axis)
        ax = _validate.channel_axis(xa.shape, axis)
        checked = (*F._affine(gamma, beta, xa.shape[ax]), _validate.eps_value(eps))
        found, kept = F._measure(xa, ax)  # stage 1, keeping the centred part for stage 3
        _validate.finite_statistics(found.mean, found.var, "nothing was changed on any rank")
        c = xa.shape[ax]
        payload = np.concatenate(([c, found.count], found.mean, found.var, found.mean_lo))
        return (xa, ax, kept, checked), payload

    sign = _fingerprint.of_input(x, axis, num_features, tag)
    (xa, ax, kept, checked), parts = gather(group, local, "the synchronized forward pass", sign)
    c = widths(parts, "the synchronized forward pass")
    counts = [int(part[1]) for part in parts]
    table = np.array(parts)[:, 2:].reshape(len(parts), 3, c)  # (ranks, [mean, var, lo], C)
    with np.errstate(over="ignore", invalid="ignore"):
        stats = F._combine(table[:, 0], table[:, 1], counts, table[:, 2])  # checked on each rank
    if stats.count < 2:
        raise _validate.group_batch(counts)
    # Finite parts can still pool to inf; every rank sees the same result and raises alike.
    _validate.finite_statistics(stats.mean, stats.var, "nothing was changed on any rank")
    g, b, eps_f = checked
    return F._finish(kept, xa, ax, g, b, eps_f, stats)


def backward(
    dy: ArrayLike, cache: F.BatchNormCache, group: Group, tag: str = ""
) -> tuple[NDArray[np.floating[Any]], Vector | None, Vector | None]:
    """dx of this rank's part from every rank's sums (one allgather); this rank's dgamma, dbeta.

    A cache from ``forward_eval`` needs no other rank (its statistics are constants): it is
    differentiated locally, without communication.
    """
    if isinstance(cache, F.BatchNormCache) and not cache.training:
        return F.backward(dy, cache)

    def local() -> tuple[tuple[Any, Vector, Vector], Vector]:
        dy3, (sum_dy, sum_dy_xhat) = F._part_sums(dy, cache)  # dy read once for both stages
        return (dy3, sum_dy, sum_dy_xhat), np.concatenate(([len(sum_dy)], sum_dy, sum_dy_xhat))

    sign = _fingerprint.of_cache(cache, tag)
    (dy3, sum_dy, sum_dy_xhat), parts = gather(group, local, "the synchronized backward pass",
                                               sign)  # fmt: skip
    c = widths(parts, "the synchronized backward pass")
    total_dy, total_dy_xhat = parts[0][1 : 1 + c].copy(), parts[0][1 + c :].copy()
    for part in parts[1:]:  # rank order: the same additions on every rank
        total_dy += part[1 : 1 + c]
        total_dy_xhat += part[1 + c :]
    dx = F._part_input(dy3, cache, total_dy, total_dy_xhat)
    dgamma = None if cache.gamma is None else sum_dy_xhat
    return dx, dgamma, sum_dy if cache.has_beta else None


# --- population statistics: pooling every rank's parts --------------------------------------------


def pool(
    group: Group,
    parts: list[_exact.Total],
    tallies: list[int],
    failure: Exception | None = None,
    what: str = "pooling statistics",
) -> tuple[list[_exact.Total], list[list[int]]]:
    """Pool k running totals (count, mean hi, mean lo, m2 hi, m2 lo) over the ranks, each
    added up in rank order (:func:`_exact.accumulate`: exact at any offset).

    `tallies` are integers sent along (counters, an order); every rank's come back in rank
    order. `failure`, an error this rank met before the exchange, is raised here on this rank
    and reported to the others. One allgather.
    """

    def local() -> tuple[None, Vector]:
        if failure is not None:
            raise failure
        flat = [np.concatenate(([len(hi), n], hi, lo, m2, m2_lo)) for n, hi, lo, m2, m2_lo in parts]
        return None, np.concatenate(([len(parts), len(tallies)], *flat, tallies))

    sign = _fingerprint.Sign(width=sum(len(total[1]) for total in parts), dtype="float64")
    _, messages = gather(group, local, what, sign)
    pooled_parts: list[list[_exact.Total]] = [[] for _ in parts]
    all_tallies = []
    for message in messages:
        k, t = int(message[0]), int(message[1])
        if k != len(parts):
            raise _validate.group_parts([int(m[0]) for m in messages], what)
        at = 2
        for i in range(k):
            c, n = int(message[at]), int(message[at + 1])
            hi, lo, m2, m2_lo = message[at + 2 : at + 2 + 4 * c].reshape(4, c)
            pooled_parts[i].append((n, hi, lo, m2, m2_lo))
            at += 2 + 4 * c
        all_tallies.append([int(v) for v in message[at : at + t]])
    result = []
    for ranks in pooled_parts:
        found = [len(total[1]) for total in ranks]
        if len(set(found)) != 1:
            raise _validate.group_widths(found, what)
        zeros = np.zeros(found[0])
        pooled: _exact.Total = (0, zeros, zeros, zeros, zeros)
        with np.errstate(over="ignore", invalid="ignore"):
            for total in ranks:
                pooled = _exact.accumulate(pooled, total)
        result.append(pooled)
    return result, all_tallies
