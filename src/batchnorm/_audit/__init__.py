"""The audit of outside BatchNorm implementations on the conformance cases (private).

Each framework has one small module that builds :class:`Implementation` objects (``_core``):
a name, the dtypes it takes, the eps it really applies, and ``run(case, inputs)``, which maps
this library's conventions to the framework's (momentum side, running variance, layout) and
returns the outputs it can compute, or None for a case it cannot express (PyTorch has no biased
running variance, flax no unbiased one). :func:`audit` runs them on the cases and gives one
:class:`Row` per (implementation, case). ``python -m batchnorm audit`` is the command line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from batchnorm import _validate
from batchnorm._audit._core import KNOWN, Implementation, Row, audit

__all__ = ["KNOWN", "Implementation", "Row", "audit", "implementations"]


def implementations(names: Iterable[str]) -> list[Implementation]:
    """The implementations behind the audit's names (torch, jax, onnxruntime, batchnorm)."""
    from batchnorm._audit import _flax, _onnxruntime, _ours, _torch

    builders: dict[str, Callable[[], list[Implementation]]] = {
        "batchnorm": _ours.implementations,
        "torch": _torch.implementations,
        "jax": _flax.implementations,
        "onnxruntime": _onnxruntime.implementations,
    }
    out: list[Implementation] = []
    for name in _validate.audit_names(names, builders):
        out.extend(builders[name]())
    return out
