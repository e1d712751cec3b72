"""What each exchange is, so that ranks doing different things raise instead of mixing data.

Every exchange of :mod:`batchnorm._exchange` sends, besides its status flag and payload, a
fingerprint of five float64 values: the number of this exchange on this rank's group (1, 2,
...), a CRC-32 of the operation (``"the synchronized forward pass"``), a CRC-32 of the layer's
tag, the channel count C (-1: unknown) and a CRC-32 of the dtype (0: unknown). Ranks that run
the same step send the same fingerprint. When they differ, every rank has received the same
fingerprints, so every rank sees the mismatch; a second exchange then carries each rank's
description in words, which every rank raises.

A layer's tag is the attribute path :func:`batchnorm.distributed.synchronize` found it at
(``model.bn1``), or else ``BatchNorm #k``: the k-th layer created with that group on this rank.
The numbers are kept per group object, in a weak dictionary: nothing is stored on the group.
"""

from __future__ import annotations

import contextvars
import functools
import weakref
import zlib
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

Vector = NDArray[np.float64]
SIZE = 5  # floats per fingerprint


class Sign(NamedTuple):
    """What an exchange does, as this rank sees it before running it."""

    tag: str = ""
    width: int = -1
    dtype: str = ""


UNKNOWN = Sign()  # no layer, C or dtype to tell (a failure report, an exchange of counters)


class _Counters:
    def __init__(self) -> None:
        self.exchanges = 0
        self.layers = 0


_COUNTERS: weakref.WeakKeyDictionary[Any, _Counters] = weakref.WeakKeyDictionary()
# The exchange this thread waits in, for a group that times out (MPIGroup) to say which.
_WAITING: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar("waiting", default=None)


def _counters(group: Any) -> _Counters | None:
    """The counters of a group; None for a group that cannot be weakly referenced."""
    try:
        return _COUNTERS.setdefault(group, _Counters())
    except TypeError:
        return None


def new_tag(group: Any) -> str:
    """The tag of a layer created with `group` on this rank: its creation index in the group."""
    counters = None if group is None else _counters(group)
    if counters is None:
        return ""
    counters.layers += 1
    return f"BatchNorm #{counters.layers - 1}"


@functools.lru_cache(maxsize=1024)
def _crc(text: str) -> float:
    return float(zlib.crc32(text.encode())) if text else 0.0


class Exchange(NamedTuple):
    """One exchange as this rank sees it; str() describes it in words (only when needed)."""

    what: str
    sign: Sign
    number: int

    def __str__(self) -> str:
        sign, number = self.sign, self.number
        details = [f"C={sign.width}" if sign.width >= 0 else "", sign.dtype,
                   f"exchange {number} of this group" if number > 0 else ""]  # fmt: skip
        where = f" of {sign.tag}" if sign.tag else ""
        return f"{self.what}{where} ({', '.join(d for d in details if d)})"


def header(group: Any, what: str, sign: Sign) -> tuple[Vector, Exchange]:
    """The next exchange's fingerprint on this group, and the exchange."""
    counters = _counters(group)
    number = -1
    if counters is not None:
        counters.exchanges += 1
        number = counters.exchanges
    values = (number, _crc(what), _crc(sign.tag), sign.width, _crc(sign.dtype))
    return np.array(values, dtype=np.float64), Exchange(what, sign, number)


def of_input(x: Any, axis: int, num_features: int | None, tag: str) -> Sign:
    """The sign of a forward exchange, read from x without checking it (the exchange does)."""
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception:  # the exchange reports it
            return Sign(tag, -1 if num_features is None else num_features)
    width = num_features
    if width is None and isinstance(axis, int) and -x.ndim <= axis < x.ndim:
        width = int(x.shape[axis])
    return Sign(tag, -1 if width is None else width, _name(x.dtype))


def of_cache(cache: Any, tag: str) -> Sign:
    """The sign of a backward exchange, read from the forward's cache without checking it."""
    mean, dtype = getattr(cache, "mean", None), getattr(cache, "dtype", None)
    width = mean.size if isinstance(mean, np.ndarray) else -1
    return Sign(tag, width, "" if dtype is None else _name(dtype))


@functools.lru_cache(maxsize=64)
def _name(dtype: Any) -> str:
    return str(dtype)  # str of a NumPy dtype takes microseconds: once per dtype


def encode(text: str) -> Vector:
    """Text as float64 values (one per UTF-8 byte), to travel through an allgather."""
    return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.float64)


def decode(values: Vector) -> str:
    return bytes(np.clip(values, 0, 255).astype(np.uint8)).decode(errors="replace")


def enter(exchange: Exchange) -> contextvars.Token[Exchange | None]:
    """Mark this thread as waiting in `exchange` (see :func:`waited_for`) until :func:`leave`."""
    return _WAITING.set(exchange)


def leave(token: contextvars.Token[Exchange | None]) -> None:
    _WAITING.reset(token)


def waited_for() -> str | None:
    """The exchange this thread is waiting in, in words, or None outside an exchange."""
    exchange = _WAITING.get()
    return None if exchange is None else str(exchange)
