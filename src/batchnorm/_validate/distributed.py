"""Checks of groups of workers and of what they exchange (synchronized BatchNorm)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "RANK_ERRORS",
    "gathered",
    "group_batch",
    "group_broken",
    "group_parts",
    "group_value",
    "group_widths",
    "mpi_missing",
    "precise_group_batches",
    "rank_failed",
    "thread_group_size",
    "timeout_value",
]


#: Exception types a rank reports to the others in its status flag (code = index + 1); any
#: other exception is reported as a RuntimeError.
RANK_ERRORS: tuple[type[Exception], ...] = (TypeError, ValueError, FloatingPointError)


def group_value(group: Any, optional: bool = True) -> Any:
    """Check a group of workers: integer rank and size with 0 <= rank < size, and allgather."""
    if group is None and optional:
        return None
    rank, size = getattr(group, "rank", None), getattr(group, "size", None)
    ints = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (rank, size))
    valid = ints and 0 <= int(rank) < int(size)  # type: ignore[arg-type]
    if not valid or not callable(getattr(group, "allgather", None)):
        raise TypeError(
            "group must be a group of workers with integer `rank` and `size` (0 <= rank < size) "
            "and a method `allgather(array) -> list of every rank's array in rank order`, such "
            f"as batchnorm.distributed.MPIGroup() or thread_groups(n)[r]; got {group!r}."
        )
    return group


def gathered(parts: Any, size: int) -> list[NDArray[np.float64]]:
    """Check what a group's allgather returned: one float64 vector per rank."""
    if not isinstance(parts, list | tuple) or len(parts) != size:
        raise RuntimeError(
            f"group.allgather must return a list with one array per rank ({size}); got "
            f"{type(parts).__name__} of length {len(parts) if hasattr(parts, '__len__') else '?'}."
            " Check the group's allgather implementation."
        )
    return [np.asarray(p, dtype=np.float64).ravel() for p in parts]


def rank_failed(kind: type[Exception], failed: list[int], size: int, what: str) -> Exception:
    """The error a rank raises when another rank of its group could not take part in a step."""
    who = f"rank {failed[0]}" if len(failed) == 1 else f"ranks {failed}"
    return kind(
        f"{who} of this group of {size} raised {kind.__name__} in {what}, so every rank stops "
        "here; this rank's input was accepted and nothing was changed on any rank. See the "
        f"error raised on {who} for the cause."
    )


def group_widths(widths: list[int], what: str) -> ValueError:
    return ValueError(
        f"the ranks of this group disagree on the number of channels in {what}: {widths}, "
        "rank by rank. Every rank must run the same layer on data with the same C; nothing "
        "was changed on any rank."
    )


def group_parts(parts: list[int], what: str) -> ValueError:
    return ValueError(
        f"the ranks of this group disagree on how many sets of statistics take part in {what}: "
        f"{parts}, rank by rank. Every rank must measure the same layers of the same model; "
        "nothing was changed on any rank."
    )


def group_batch(counts: list[int]) -> ValueError:
    return ValueError(
        "Expected more than 1 value per channel in the whole synchronized batch when training; "
        f"the ranks of this group hold {counts} values per channel ({sum(counts)} in all), whose "
        "batch variance is 0 or undefined. Train with larger batches, or use eval mode; "
        "nothing was changed on any rank."
    )


def thread_group_size(size: Any) -> int:
    wrong_type = isinstance(size, bool) or not isinstance(size, numbers.Integral)
    if wrong_type or size < 1:
        error = TypeError if wrong_type else ValueError
        raise error(
            f"thread_groups needs a positive int size (the number of threads); got {size!r}."
        )
    return int(size)


def timeout_value(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not float(timeout) > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None; got {timeout!r}.")
    return float(timeout)


def group_broken(rank: int, size: int, timeout: float | None) -> RuntimeError:
    waited = "timed out" if timeout is None else f"waited {timeout:g} s and timed out"
    return RuntimeError(
        f"thread group rank {rank} of {size}: allgather was aborted or {waited} waiting for the "
        "other ranks (one of them probably raised or stopped calling). This group is now broken; "
        "create new ones with thread_groups(size)."
    )


def mpi_missing(err: ImportError) -> ImportError:
    return ImportError(
        f"MPIGroup needs mpi4py and an MPI runtime ({err}). Install them with "
        "pip install 'batchnorm[mpi]' (mpi4py and MPICH from PyPI), then launch with "
        "mpiexec -n 4 python your_script.py. For threads of one process use thread_groups(n)."
    )


def precise_group_batches() -> ValueError:
    return ValueError(
        "precise_bn received no batches on any rank of the group: every rank's `batches` was "
        "empty (or an exhausted iterator). Nothing was changed. Pass at least one batch on some "
        "rank (ranks without batches are fine when another rank has some)."
    )
