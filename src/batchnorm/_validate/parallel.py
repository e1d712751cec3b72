"""Checks of the data-parallel helpers: allreduce of gradients, shuffle and unshuffle."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from batchnorm._validate.kernels import float_array

__all__ = [
    "group_layouts",
    "group_seeds",
    "reduce_arrays",
    "sample_array",
    "seed_value",
    "shuffle_token",
    "unshuffle_rows",
]


def reduce_arrays(arrays: Any) -> list[NDArray[np.floating[Any]]]:
    """Check the arrays of an allreduce: a list or tuple of float arrays (any shapes)."""
    if not isinstance(arrays, list | tuple):
        raise TypeError(
            "allreduce takes a list (or tuple) of arrays, e.g. [layer.dgamma, linear.dweight]; "
            f"got {type(arrays).__name__}. Wrap a single array in a list: allreduce([a], group)."
        )
    return [float_array(a, f"arrays[{i}]") for i, a in enumerate(arrays)]


def sample_array(x: Any, name: str) -> NDArray[np.floating[Any]]:
    """Check an array whose axis 0 holds samples: float, at least 1-d."""
    arr = float_array(x, name)
    if arr.ndim < 1:
        raise ValueError(
            f"{name} must hold samples along axis 0 (at least 1-d, e.g. (N, C, H, W)); got a "
            "0-d array. Add a sample axis, e.g. x[None]."
        )
    return arr


def seed_value(seed: Any) -> int | tuple[int, ...]:
    """Check a shuffle seed: a non-negative int or a sequence of them (e.g. (seed, step))."""
    items = list(seed) if isinstance(seed, Sequence) and not isinstance(seed, str) else [seed]
    ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items)
    if not ok or not items:
        raise TypeError(
            "seed must be a non-negative int or a non-empty sequence of them, the same on every "
            f"rank (for instance (base_seed, step) for a new order each step); got {seed!r}."
        )
    if any(int(v) < 0 for v in items):
        raise ValueError(f"seed must be non-negative; got {seed!r}.")
    return int(items[0]) if not isinstance(seed, Sequence) else tuple(int(v) for v in items)


def group_layouts(layouts: list[list[float]], what: str) -> ValueError:
    """The ranks sent arrays of different dtypes or shapes (beyond axis 0 where allowed)."""
    return ValueError(
        f"the ranks of this group disagree on the arrays of {what}: (dtype code, ndim, shape) "
        f"rank by rank {[[int(v) for v in layout] for layout in layouts]} (dtype codes: 0 "
        "float16, 1 float32, 2 float64). Every rank must pass arrays of the same dtype and "
        "shape (in shuffle and unshuffle the number of samples, axis 0, may differ); nothing "
        "was changed on any rank."
    )


def group_seeds(ranks: list[int]) -> ValueError:
    return ValueError(
        f"the ranks of this group passed different seeds to shuffle (ranks {ranks} differ from "
        "rank 0): every rank must derive the same permutation, so pass the same seed on every "
        "rank, e.g. seed=(base_seed, step)."
    )


def shuffle_token(token: Any, kind: type[Any], rank: int, size: int) -> None:
    """A token from shuffle on this rank of a group of this size."""
    if not isinstance(token, kind):
        raise TypeError(
            f"token must be the ShuffleToken that shuffle returned on this rank; got "
            f"{type(token).__name__}."
        )
    if len(token.sizes) != size or token.rank != rank:
        raise ValueError(
            f"this token comes from shuffle on rank {token.rank} of a group of "
            f"{len(token.sizes)}, but unshuffle runs on rank {rank} of a group of {size}. Pass "
            "each rank the token its own shuffle returned, with the same group."
        )


def unshuffle_rows(got: int, expected: int, rank: int) -> ValueError:
    return ValueError(
        f"y has {got} samples on axis 0, but shuffle gave rank {rank} a part of {expected} "
        "samples: unshuffle needs one output row per shuffled sample, in the shuffled order "
        "(the model may change every other axis)."
    )
