"""Checks of the conformance cases, check_kernels' options and the audit's adapters."""

from __future__ import annotations

import difflib
from collections.abc import Container, Iterable, Mapping
from typing import Any

from batchnorm._validate.kernels import positive_float

__all__ = [
    "audit_names",
    "case_axis",
    "case_dtype",
    "case_name",
    "difference_step",
    "gradient_function",
    "kernel_functions",
    "missing_framework",
    "no_matplotlib",
    "output_name",
    "output_weights",
    "three_gradients",
]


def kernel_functions(**functions: Any) -> None:
    """check_kernels' kernels must be callables (None only where it is optional: running)."""
    for name, function in functions.items():
        if not callable(function) and not (name == "running" and function is None):
            raise TypeError(
                f"{name} must be a function (your kernel); got {type(function).__name__}. "
                "Pass the kernel itself, e.g. check_kernels(my_forward, my_backward), not what "
                "it returns."
            )


def gradient_function(f: Any) -> None:
    """numerical_gradient's f must be callable."""
    if not callable(f):
        raise TypeError(
            f"f must be a function of x (numerical_gradient differentiates sum(f(x) * dy)); "
            f"got {type(f).__name__}. Pass e.g. lambda x: bn.forward_train(x, gamma, beta)[0]."
        )


def difference_step(h: Any) -> float:
    """numerical_gradient's step: a finite float > 0."""
    return positive_float(
        h, "h", "the step of the central difference", "1e-5 is near the best trade-off in float64."
    )


def output_weights(output: tuple[int, ...], weights: tuple[int, ...]) -> None:
    """dy weights each output of f: the shapes must match (no broadcasting)."""
    if output != weights:
        raise ValueError(
            f"f(x) has shape {output} but dy has shape {weights}: dy weights each output of f "
            "(the upstream gradient), so it must have f(x)'s shape."
        )


def case_axis(axis: Any) -> int:
    """The conformance cases put channels at axis 1 or last (-1); nothing else."""
    if isinstance(axis, bool) or axis not in (1, -1):
        raise ValueError(
            f"the conformance cases put channels at axis 1 ((N, C, ...)) or -1 (channels-last); "
            f"got axis={axis!r}. Move your channel axis to one of these before checking."
        )
    return int(axis)


def case_dtype(name: str, known: Container[str]) -> str:
    """A dtype name the cases know (float64, float32, float16, bfloat16)."""
    if name not in known:
        raise ValueError(
            f"the conformance cases exist for float64, float32, float16 and bfloat16 "
            f"(with ml_dtypes); got dtype {name!r}."
        )
    return name


def case_name(name: str, known: Mapping[str, Any]) -> str:
    """A case name from the catalogue, with the closest names when it is not one."""
    if name not in known:
        close = difflib.get_close_matches(str(name), list(known), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"no conformance case is named {name!r}.{hint} "
            "bn.conformance.cases(extended=True) lists them all."
        )
    return name


def output_name(name: str, known: Mapping[str, Any]) -> str:
    """An output a case can check (y, dx, dgamma, dbeta, and running statistics)."""
    if name not in known:
        raise ValueError(
            f"a case checks the outputs {', '.join(known)}; got an output named {name!r}."
        )
    return name


def missing_framework(name: str, module: str, install: str) -> ImportError:
    """The error of an audit adapter whose framework is not installed."""
    return ImportError(
        f"auditing {name} needs the package {module!r}, which is not installed: "
        f"pip install {install} (or leave {name} out of the implementations to audit)."
    )


def audit_names(names: Iterable[str], known: Container[str]) -> list[str]:
    """The implementations to audit, each one the audit knows."""
    out = list(names)
    for name in out:
        if name not in known:
            raise ValueError(
                f"python -m batchnorm audit knows torch, jax, onnxruntime and batchnorm; "
                f"got {name!r}."
            )
    return out


def three_gradients(grads: tuple[Any, ...]) -> tuple[Any, ...]:
    """A user backward kernel returns (dx, dgamma, dbeta)."""
    if len(grads) != 3:
        raise ValueError(
            f"backward must return three values (dx, dgamma, dbeta), with None for a gradient "
            f"it does not compute; got {len(grads)}."
        )
    return grads


def no_matplotlib() -> ImportError:
    """--plot without matplotlib."""
    return ImportError(
        "--plot needs matplotlib, which is not installed: pip install matplotlib "
        "(or leave out --plot)."
    )
