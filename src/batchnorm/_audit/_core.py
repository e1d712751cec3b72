"""What the audit runs and what it reports: implementations, rows, and the run itself (private).

Each framework has one small module that builds :class:`Implementation` objects: a name, the
dtypes it takes, the eps it really applies, and ``run(case, inputs)``, which maps this
library's conventions to the framework's (momentum side, running variance, layout) and returns
the outputs it can compute, or None for a case it cannot express (PyTorch has no biased running
variance, flax no unbiased one). On a second-order case (``Case.second_order``) ``run``
returns gx, ggamma and gdy only, so the row measures the second derivatives; an implementation
without them (``second_order=False``) gets an n/a row. :func:`audit` runs them on the cases
and gives one :class:`Row` per (implementation, case). ``python -m batchnorm audit`` is the
command line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from batchnorm.conformance import Case, CaseInputs, cases, unit_roundoff

__all__ = ["KNOWN", "Implementation", "Row", "audit"]

Run = Callable[[Case, CaseInputs], "dict[str, Any] | None"]

#: Public reports of the failures some cases reproduce, shown next to a failing row.
KNOWN: dict[str, str] = {
    "constant_channel": "a constant channel's exact output is beta (Caffe issue 3963)",
    "constant_1e10": "a constant channel's exact output is beta (Caffe issue 3963)",
    "constant_1e15_strided": "a constant channel's exact output is beta",
    "huge_values": "squares of |x| ~ 1e30 overflow float32 (PyTorch issue 162489)",
}


@dataclass(frozen=True)
class Implementation:
    """One outside BatchNorm as the audit runs it."""

    name: str
    version: str
    dtypes: frozenset[str]
    run: Run
    conventions: str = ""
    #: eps and momentum are float32 attributes (ONNX): the reference uses them rounded so.
    float32_attributes: bool = False
    #: run computes gx, ggamma, gdy of the second-order cases (else their rows are n/a).
    second_order: bool = False


@dataclass(frozen=True)
class Row:
    """The verdict of one implementation on one case: its worst output by error/tolerance."""

    implementation: str
    case: str
    dtype: str
    mode: str
    offset: float
    supported: bool
    output: str = ""
    error: float = 0.0
    tolerance: float = 0.0
    passed: bool = True
    cause: str = ""
    errors: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)
    known: str = ""

    @property
    def digits_lost(self) -> float:
        """log10(error / u): decimal digits lost beyond the dtype's rounding (0 when within)."""
        if not self.supported:
            return 0.0
        if not math.isfinite(self.error):
            return math.inf
        return max(0.0, math.log10(max(self.error, 1e-300) / unit_roundoff(self.dtype)))

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "dtype": self.dtype,
            "mode": self.mode,
            "offset": self.offset,
            "supported": self.supported,
            "output": self.output,
            "error": _json_float(self.error),
            "tolerance": self.tolerance,
            "passed": self.passed,
            "digits_lost": _json_float(self.digits_lost),
            "cause": self.cause,
            "known": self.known,
            "errors": {k: _json_float(v) for k, v in self.errors.items()},
            "tolerances": self.tolerances,
        }


def audit(impls: Sequence[Implementation], chosen: Sequence[Case] | None = None) -> list[Row]:
    """Run each implementation on each case it takes: one Row per pair, in order."""
    catalogue = (
        cases(extended=True) + cases(extended=True, second_order=True)
        if chosen is None
        else list(chosen)
    )
    rows = []
    for impl in impls:
        for case in catalogue:
            if case.dtype in impl.dtypes:
                rows.append(_row(impl, case))
    return rows


def _row(impl: Implementation, case: Case) -> Row:
    inp = case.inputs()
    if impl.float32_attributes:
        momentum = None if inp.momentum is None else float(np.float32(inp.momentum))
        inp = replace(inp, eps=float(np.float32(inp.eps)), momentum=momentum)
    head = (impl.name, case.name, case.dtype, case.mode, case.offset)
    if case.second_order and not impl.second_order:
        return Row(*head, supported=False, passed=True, cause="no second derivatives")
    outputs = impl.run(case, inp)
    if outputs is None:
        return Row(*head, supported=False, passed=True)
    result = case.check(outputs, inp)
    worst = max(result.outputs, key=lambda o: o.error / o.tolerance)
    return Row(
        *head,
        supported=True,
        output=worst.name,
        error=worst.error,
        tolerance=worst.tolerance,
        passed=result.passed,
        cause=worst.cause,
        errors=result.errors,
        tolerances={o.name: o.tolerance for o in result.outputs},
        known="" if result.passed else KNOWN.get(case.name.rsplit("-", 1)[0], ""),
    )


def _json_float(value: float) -> float | str:
    """A float for JSON: inf becomes the string "inf" (JSON has no infinity)."""
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
