"""Checks of groups of workers and of what they exchange (synchronized BatchNorm)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "RANK_ERRORS",
    "error_text",
    "failure_value",
    "gathered",
    "group_batch",
    "group_broken",
    "group_broken_mpi",
    "group_desync",
    "group_parts",
    "group_timeout",
    "group_value",
    "group_widths",
    "mpi_missing",
    "on_timeout_value",
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


def error_text(err: BaseException, where: str) -> str:
    """What a failing rank tells the others about its error (at most 400 characters)."""
    text = f"{type(err).__name__} in {where}: {err}"
    return text if len(text) <= 400 else text[:397] + "..."


def rank_failed(
    kind: type[Exception], failed: list[int], size: int, what: str, said: str = ""
) -> Exception:
    """The error a rank raises when another rank of its group could not take part in a step."""
    who = f"rank {failed[0]}" if len(failed) == 1 else f"ranks {failed}"
    cause = f" Rank {failed[0]} reported: {said}" if said else ""
    return kind(
        f"{who} of this group of {size} raised {kind.__name__} while this rank was in {what}, "
        "so every rank stops here; this rank's input was accepted and nothing was changed on "
        f"any rank.{cause}"
    )


def group_desync(labels: list[str]) -> ValueError:
    """The error every rank raises when the ranks are not in the same exchange."""
    each = "; ".join(f"rank {r}: {label}" for r, label in enumerate(labels))
    hint = (
        " (BatchNorm #k is the k-th layer created with this group on that rank; "
        "dist.synchronize(model, group) names each layer by its attribute path instead)"
        if any("BatchNorm #" in label for label in labels)
        else ""
    )
    return ValueError(
        f"the ranks of this group are not in the same exchange: {each}. Every rank must call "
        "the same synchronized layers in the same order with the same C and dtype, all in "
        "training mode, none frozen, each with this group; an error caught on one rank in the "
        f"middle of a step is reported with dist.fail(group, err){hint}. Nothing was changed "
        "on any rank."
    )


def on_timeout_value(value: Any) -> str:
    if value not in ("abort", "raise"):
        raise ValueError(f'on_timeout must be "abort" or "raise"; got {value!r}.')
    return str(value)


def group_timeout(rank: int, size: int, timeout: float, what: str | None, abort: bool) -> str:
    """The message of an MPIGroup that waited `timeout` seconds in a collective."""
    where = what if what is not None else "an allgather called outside BatchNorm"
    then = (
        "Aborting every rank (on_timeout='abort'): an MPI collective cannot be cancelled, so "
        "this job cannot go on."
        if abort
        else "This group is now broken (its collective is still pending): end the job."
    )
    return (
        f"MPIGroup rank {rank} of {size} waited {timeout:g} s in {where}, and some rank never "
        "joined. Likely causes: a rank whose layer is in eval mode or frozen while this one "
        "trains (only training mode communicates); a rank whose layers have group=None; an "
        "exception in user code on a rank that skipped the rest of its step (report it with "
        "dist.fail(group, err) so that the others raise at once); a rank that exited or "
        f"crashed; or a rank that is slower than the timeout (raise MPIGroup(timeout=...)). {then}"
    )


def group_broken_mpi(rank: int, size: int) -> RuntimeError:
    return RuntimeError(
        f"MPIGroup rank {rank} of {size} timed out in an earlier allgather whose collective is "
        "still pending (MPI cannot cancel it): this group cannot exchange anything any more. "
        "End the job (comm.Abort()) and find the rank that did not join (see the first error)."
    )


def failure_value(error: Any) -> Exception:
    if not isinstance(error, Exception):
        raise TypeError(
            f"dist.fail reports an Exception instance to the other ranks; got {error!r}."
        )
    return error


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


def group_broken(
    rank: int, size: int, timeout: float | None, what: str | None = None
) -> RuntimeError:
    waited = "timed out" if timeout is None else f"waited {timeout:g} s and timed out"
    where = "" if what is None else f" in {what}"
    return RuntimeError(
        f"thread group rank {rank} of {size}: allgather{where} was aborted or {waited} waiting "
        "for the other ranks (one of them raised or stopped calling: a layer in eval mode or "
        "frozen, group=None, an exception in user code not reported with dist.fail, a thread "
        "that ended). This group is now broken; create new ones with thread_groups(size)."
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
