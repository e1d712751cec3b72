"""The data-parallel helpers over a group (private): the sum of arrays over the ranks, and the
permutation of samples across ranks that shuffle BN uses, with its exact inverse.

Each is ONE exchange through :func:`batchnorm._exchange.gather`, so bad input on one rank
raises on every rank. Each message starts with a short head (its length, then the dtype code and
shape of what follows, and for shuffle the part's length and a fingerprint of the seed); the
heads are compared before anything is used, so ranks that disagree raise alike. Arrays travel
as float64, which holds float16, float32 and float64 values exactly: nothing is rounded on the
way, and whatever arrives is combined in rank order, the same arithmetic on every rank.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _exchange, _validate

Vector = NDArray[np.float64]
FloatArray = NDArray[np.floating[Any]]
_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class ShuffleToken(NamedTuple):
    """What :func:`batchnorm.distributed.unshuffle` needs to undo one shuffle on one rank."""

    permutation: NDArray[np.int64]
    """The global order: shuffled sample j is sample ``permutation[j]`` of the concatenation of
    every rank's part (in rank order); the same on every rank."""
    sizes: tuple[int, ...]
    """Every rank's number of samples, in rank order: the same before and after the shuffle."""
    rank: int
    """The rank this token belongs to."""


def _layout(a: FloatArray, rows: bool) -> list[float]:
    """dtype code, ndim and shape (without axis 0 when `rows`: parts differ in length there)."""
    shape = a.shape[1:] if rows else a.shape
    return [float(_DTYPES.index(a.dtype)), float(a.ndim), *map(float, shape)]


def _message(head: list[float], arrays: list[FloatArray]) -> Vector:
    return np.concatenate(([len(head)], head, *(a.ravel() for a in arrays)))


def _split(parts: list[Vector]) -> tuple[list[list[float]], list[Vector]]:
    """Every rank's head and data, in rank order."""
    heads = [list(part[1 : 1 + int(part[0])]) for part in parts]
    return heads, [part[1 + int(part[0]) :] for part in parts]


def _same(layouts: list[list[float]], what: str) -> None:
    if any(layout != layouts[0] for layout in layouts):
        raise _validate.group_layouts(layouts, what)


def allreduce(arrays: Any, group: _exchange.Group, average: bool) -> list[FloatArray]:
    what = "allreduce"

    def local() -> tuple[list[FloatArray], Vector]:
        checked = _validate.reduce_arrays(arrays)
        head = [float(len(checked))] + [v for a in checked for v in _layout(a, False)]
        return checked, _message(head, checked)

    mine, parts = _exchange.gather(group, local, what)
    heads, data = _split(parts)
    _same(heads, what)
    total = data[0].copy()
    for part in data[1:]:  # rank order: the same additions on every rank
        total += part
    if average:
        total /= group.size
    out, at = [], 0
    for a in mine:
        out.append(total[at : at + a.size].reshape(a.shape).astype(a.dtype))
        at += a.size
    return out


def _fingerprint(seed: int | tuple[int, ...]) -> list[float]:
    # Two 32-bit words derived from the seed (exact in float64): equal seeds give equal words.
    return [float(w) for w in np.random.SeedSequence(seed).generate_state(2)]


def shuffle(x: ArrayLike, group: _exchange.Group, seed: Any) -> tuple[FloatArray, ShuffleToken]:
    what = "shuffle"

    def local() -> tuple[tuple[FloatArray, int | tuple[int, ...]], Vector]:
        xa = _validate.sample_array(x, "x")
        checked = _validate.seed_value(seed)
        head = [float(len(xa)), *_fingerprint(checked), *_layout(xa, True)]
        return (xa, checked), _message(head, [xa])

    (xa, checked), parts = _exchange.gather(group, local, what)
    heads, data = _split(parts)
    _same([head[3:] for head in heads], what)
    differ = [r for r, head in enumerate(heads) if head[1:3] != heads[0][1:3]]
    if differ:
        raise _validate.group_seeds(differ)
    sizes = tuple(int(head[0]) for head in heads)
    whole = np.concatenate(data).reshape(sum(sizes), *xa.shape[1:])
    permutation = np.random.default_rng(np.random.SeedSequence(checked)).permutation(sum(sizes))
    start = sum(sizes[: group.rank])
    mine = permutation[start : start + sizes[group.rank]]
    token = ShuffleToken(permutation.astype(np.int64), sizes, group.rank)
    return whole[mine].astype(xa.dtype), token


def unshuffle(y: ArrayLike, token: Any, group: _exchange.Group) -> FloatArray:
    what = "unshuffle"

    def local() -> tuple[FloatArray, Vector]:
        _validate.shuffle_token(token, ShuffleToken, group.rank, group.size)
        ya = _validate.sample_array(y, "y")
        if len(ya) != token.sizes[group.rank]:
            raise _validate.unshuffle_rows(len(ya), token.sizes[group.rank], group.rank)
        return ya, _message(_layout(ya, True), [ya])

    ya, parts = _exchange.gather(group, local, what)
    heads, data = _split(parts)
    _same(heads, what)
    sizes = token.sizes
    shuffled = np.concatenate(data).reshape(sum(sizes), *ya.shape[1:])
    # Shuffled row j holds original sample permutation[j]: the inverse permutation finds the
    # shuffled row of each of this rank's original samples.
    inverse = np.argsort(token.permutation, kind="stable")
    start = sum(sizes[: group.rank])
    rows = inverse[start : start + sizes[group.rank]]
    result: FloatArray = shuffled[rows].astype(ya.dtype)
    return result
