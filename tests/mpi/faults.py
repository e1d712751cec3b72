"""Faults in which the ranks of a group stop doing the same thing, run by every rank.

Each fault takes a fresh group with a short timeout (``thread_groups(n, timeout=...)[r]``, or
``MPIGroup(comm.Dup(), timeout=..., on_timeout="raise")``); the last rank is the odd one out.
Every rank asserts what it saw (the same error on every rank, or a timeout on the ranks left
waiting) and that its layers hold the state they held before the failing exchange.
tests/test_distributed_faults.py runs them on thread groups; tests/mpi/run_faults.py on MPI
ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import batchnorm as bn
from batchnorm import distributed as dist


def state(*layers: bn.BatchNorm) -> list[bytes]:
    """Every parameter, buffer and gradient of the layers, as bytes."""
    names = ("gamma", "beta", "running_mean", "running_var", "num_batches_tracked", "dgamma")
    return [np.asarray(getattr(layer, n)).tobytes() for layer in layers for n in names]


def part(group: dist.Group) -> np.ndarray[Any, Any]:
    return np.random.default_rng(group.rank).normal(2.0, 3.0, size=(4, 3))


def odd(group: dist.Group) -> bool:
    return group.rank == group.size - 1


def timed_out(err: BaseException | None, what: str) -> None:
    """A TimeoutError (MPIGroup) or a broken thread group, saying what it waited in."""
    assert isinstance(err, TimeoutError | RuntimeError), repr(err)
    assert "timed out" in str(err) or "waited" in str(err), str(err)
    assert what in str(err), str(err)


#: What outcome() saw on this rank, in order ("ok" or the error's type): run_faults.py --report.
SEEN: list[str] = []


def outcome(action: Callable[[], Any]) -> BaseException | None:
    try:
        action()
    except Exception as err:
        SEEN.append(type(err).__name__)
        return err
    SEEN.append("ok")
    return None


# --- ranks in different exchanges: the fingerprint ------------------------------------------------


def fault_layers_in_different_orders(group: dist.Group) -> None:
    a, b = bn.BatchNorm(3, group=group), bn.BatchNorm(3, group=group)
    x = part(group)
    a(x), b(x)  # a good step
    before = state(a, b)
    first, second = (b, a) if odd(group) else (a, b)
    err = outcome(lambda: (first(x), second(x)))
    assert isinstance(err, ValueError), repr(err)
    assert "not in the same exchange" in str(err), str(err)
    assert "rank 0: the synchronized forward pass of BatchNorm #0 (C=3, float64" in str(err)
    last = group.size - 1
    assert f"rank {last}: the synchronized forward pass of BatchNorm #1 (C=3" in str(err)
    assert state(a, b) == before
    a(x), b(x)  # every rank raised in the same exchange: the group still works
    assert a.num_batches_tracked == b.num_batches_tracked == 2


class Pair:
    def __init__(self) -> None:
        self.bn1, self.bn2 = bn.BatchNorm(3), bn.BatchNorm(3)


def fault_named_layers_in_different_orders(group: dist.Group) -> None:
    model = Pair()
    dist.synchronize(model, group)
    x = part(group)
    first, second = (model.bn2, model.bn1) if odd(group) else (model.bn1, model.bn2)
    before = state(model.bn1, model.bn2)
    err = outcome(lambda: (first(x), second(x)))
    assert isinstance(err, ValueError), repr(err)
    assert "rank 0: the synchronized forward pass of model.bn1 (C=3" in str(err), str(err)
    assert f"rank {group.size - 1}: the synchronized forward pass of model.bn2" in str(err)
    assert state(model.bn1, model.bn2) == before


def fault_an_unreported_error_then_the_next_step(group: dist.Group) -> None:
    """The odd rank catches an error after forward and goes on to the next step's forward."""
    layer = bn.BatchNorm(3, group=group)
    x = part(group)
    layer(x)
    before = state(layer)
    if odd(group):
        err = outcome(lambda: layer(x))  # skipped its backward
    else:
        err = outcome(lambda: layer.backward(np.ones_like(x)))
    assert isinstance(err, ValueError), repr(err)
    assert "rank 0: the synchronized backward pass of BatchNorm #0" in str(err), str(err)
    assert "the synchronized forward pass of BatchNorm #0" in str(err), str(err)
    assert state(layer) == before


# --- a rank reports its own error -----------------------------------------------------------------


def fault_an_error_reported_with_fail(group: dist.Group) -> None:
    layer = bn.BatchNorm(3, group=group)
    x = part(group)

    def step() -> None:
        with dist.reporting(group):
            y = layer(x)
            if odd(group):
                raise KeyError("no such label")
            layer.backward(np.ones_like(y))

    layer(x)
    layer.backward(np.ones_like(x))
    err = outcome(step)
    after_forward = state(layer)  # this step's forward succeeded on every rank
    if odd(group):
        assert isinstance(err, KeyError), repr(err)
    else:
        assert isinstance(err, RuntimeError), repr(err)
        who = f"rank {group.size - 1} of this group"
        assert who in str(err) and "KeyError in its own code" in str(err), str(err)
        assert "the synchronized backward pass of BatchNorm #0" in str(err), str(err)
    assert state(layer) == after_forward and layer.num_batches_tracked == 2
    step_ok = outcome(lambda: layer.backward(layer(x)))  # the group still works
    assert step_ok is None and layer.num_batches_tracked == 3


# --- a rank that never joins: the timeout ---------------------------------------------------------


def one_rank_leaves(group: dist.Group, leave: Callable[[bn.BatchNorm], None]) -> None:
    """The odd rank applies `leave` to its layer; the others time out in forward."""
    layer = bn.BatchNorm(3, group=group)
    x = part(group)
    layer(x)
    if odd(group):
        leave(layer)
    before = state(layer)
    err = outcome(lambda: layer.backward(layer(x)))
    if odd(group):
        assert err is None, repr(err)  # it works alone, as asked
    else:
        timed_out(err, "the synchronized forward pass of BatchNorm #0")
        assert state(layer) == before


def fault_one_rank_in_eval_mode(group: dist.Group) -> None:
    one_rank_leaves(group, lambda layer: layer.eval() and None)


def fault_one_rank_frozen(group: dist.Group) -> None:
    one_rank_leaves(group, lambda layer: layer.freeze() and None)


def fault_one_rank_without_a_group(group: dist.Group) -> None:
    one_rank_leaves(group, lambda layer: dist.synchronize(layer, None) and None)


def fault_one_rank_stops_after_an_error(group: dist.Group) -> None:
    """The odd rank catches an error after forward and stops (returns, as a rank that exits)."""
    layer = bn.BatchNorm(3, group=group)
    x = part(group)
    y = layer(x)
    if odd(group):
        return
    before = state(layer)
    timed_out(outcome(lambda: layer.backward(y)), "the synchronized backward pass of BatchNorm #0")
    assert state(layer) == before


FAULTS: dict[str, Callable[[dist.Group], None]] = {
    name[len("fault_") :]: function
    for name, function in sorted(globals().items())
    if name.startswith("fault_") and callable(function)
}
