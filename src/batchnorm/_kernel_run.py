"""How check_kernels chooses its cases and runs a user's kernels on one (private; the front is
``batchnorm.gradcheck.check_kernels``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from batchnorm import _validate, conformance
from batchnorm.conformance import Case, CaseInputs


def chosen_cases(
    shapes: Sequence[tuple[int, ...]] | None,
    dtypes: Sequence[DTypeLike],
    training: bool,
    chosen: Iterable[Case | str] | None,
    offset: float | Iterable[float] | None,
    with_running: bool,
) -> list[Case]:
    """The cases check_kernels runs, from its options."""
    if chosen is not None:
        names = [c for c in chosen if isinstance(c, str)]
        named = iter(conformance.cases(names=names))
        return [next(named) if isinstance(c, str) else c for c in chosen]
    mode = "train" if training else "eval"
    if shapes is not None or offset is not None:
        offsets = [0.5] if offset is None else floats(offset)
        out = []
        for dt in dtypes:
            for off in offsets:
                for shape in [(16, 4, 8, 8)] if shapes is None else shapes:
                    dims = "x".join(str(n) for n in shape)
                    name = f"random_{dims}" if offset is None else f"offset_{off:g}_{dims}"
                    out.append(
                        Case(name, tuple(shape), "float64", offset=off, mode=mode).with_dtype(dt)
                    )
        return out
    modes = [mode] + (["running"] if with_running and training else [])
    return conformance.cases(dtypes=dtypes, modes=modes)


def floats(value: float | Iterable[float]) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value]


def run_kernels(
    case: Case,
    inp: CaseInputs,
    forward: Callable[..., tuple[Any, Any]],
    backward_fn: Callable[[Any, Any], tuple[Any, Any, Any]],
    running: Callable[..., tuple[Any, Any]] | None,
) -> tuple[dict[str, Any], str]:
    """The kernels' outputs on one case, and a note when one of them raised."""
    names = ("y", "dx", "dgamma", "dbeta")
    outputs: dict[str, Any] = dict.fromkeys(names)
    stage = "forward"
    try:
        stats = () if case.training else (inp.mean, inp.var)
        y, cache = forward(inp.x, inp.gamma, inp.beta, *stats, eps=inp.eps, axis=inp.axis)
        outputs["y"] = y
        stage = "backward"
        grads = tuple(backward_fn(inp.dy, cache))
        outputs.update(zip(names[1:], _validate.three_gradients(grads), strict=True))
        if case.mode == "running" and running is not None:
            stage = "running"
            outputs["running_mean"] = outputs["running_var"] = None
            rm, rv = running(
                np.array(inp.running_mean), np.array(inp.running_var), inp.x,
                momentum=inp.momentum, unbiased=inp.unbiased, axis=inp.axis,
            )  # fmt: skip
            outputs["running_mean"], outputs["running_var"] = rm, rv
    except Exception as exc:
        if case.mode == "running" and running is not None:
            outputs.setdefault("running_mean", None)
            outputs.setdefault("running_var", None)
        return outputs, f"your {stage} kernel raised {type(exc).__name__}: {exc}"
    return outputs, ""
