"""The catalogue of conformance cases and their data recipes (private; public through
``batchnorm.conformance``).

:func:`specs` lists every case as the keywords of :class:`batchnorm.conformance.Case`;
:func:`draw` makes a case's x from its recipe, :func:`lay_out` gives it the case's memory
layout, :func:`exact` rounds statistics to values every kernel can store exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

Vector = NDArray[np.float64]

#: Magnitude of the constant channel, by dtype: exact floats with few significant bits.
CONSTANT = {"float64": 1e15, "float32": 1e7, "float16": 1e3, "bfloat16": 1e3}


def _spec(
    name: str,
    shape: tuple[int, ...],
    dtype: str,
    recipe: str = "normal",
    offset: float = 0.0,
    **options: Any,
) -> dict[str, Any]:
    return {"name": name, "shape": shape, "dtype": dtype, "recipe": recipe, "offset": offset,
            **options}  # fmt: skip


def specs() -> list[dict[str, Any]]:
    """Every case as Case keywords, in a stable order: dtype by dtype, train, eval, running."""
    out: list[dict[str, Any]] = []
    for dt in ("float32", "float64", "float16", "bfloat16"):
        half = dt in ("float16", "bfloat16")
        offsets = [0.0, 1e2] if half else [0.0, 1e2, 1e4] + ([1e6] if dt == "float64" else [])
        for off in offsets:
            shape = (32, 8) if off == 0.0 else (16, 4, 8, 8)
            out.append(_spec(f"offset_{fmt(off)}-{dt}", shape, dt, offset=off,
                            about=f"N(offset {fmt(off)}, std 0.5-2) per channel"))  # fmt: skip
        # The sweep for the audit's plot: float32 stops at 1e6, where its spacing is 1/16.
        for k in range(1, 9 if dt == "float64" else 7):
            off = 10.0**k
            if f"offset_{fmt(off)}-{dt}" not in {c["name"] for c in out} and not half:
                out.append(_spec(f"offset_{fmt(off)}-{dt}", (16, 4, 8, 8), dt, offset=off,
                                default=False, about="offset sweep"))  # fmt: skip
        out += [
            _spec(f"narrow_offset_5-{dt}", (2, 64, 32, 32), dt, "narrow", 5.0,
                  about="N(5, 0.1): where one-pass bfloat16 kernels return NaN"),
            _spec(f"tiny_var-{dt}", (64, 4), dt, "tiny_var",
                 about="variances 1e-7 to 1e-4 (eps 1e-5)"),
            _spec(f"constant_channel-{dt}", (8, 4, 4, 4), dt, "constant", CONSTANT[dt],
                 about=f"channel 0 constant at {fmt(CONSTANT[dt])}: exact y is beta"),
            _spec(f"m2-{dt}", (2, 3), dt, about="two values per channel"),
            _spec(f"n1_spatial-{dt}", (1, 3, 4, 5), dt, offset=1.0, about="one sample, 4x5 map"),
            _spec(f"channels_last_memory-{dt}", (8, 6, 5, 5), dt, offset=1.0,
                 layout="strided_channels_last", about="(N, C, H, W) in NHWC memory"),
            _spec(f"non_contiguous-{dt}", (8, 4, 10), dt, offset=1.0, layout="non_contiguous",
                 about="3-D view with stride 2"),
            _spec(f"large_c-{dt}", (8, 512), dt, about="512 channels, m = 8"),
            _spec(f"5d-{dt}", (2, 3, 4, 4, 4), dt, offset=1.0, about="(N, C, D, H, W)"),
            _spec(f"eval_offset_0-{dt}", (16, 4), dt, mode="eval", about="given statistics"),
            _spec(f"eval_offset_1e2-{dt}", (8, 4, 4, 4), dt, offset=1e2, mode="eval",
                 about="given statistics at offset 1e2"),
            _spec(f"eval_tiny_var-{dt}", (64, 4), dt, "tiny_var", mode="eval",
                 about="given variances near eps"),
            _spec(f"running_0.9_unbiased-{dt}", (64, 4, 4), dt, offset=1.0, mode="running",
                 momentum=0.9, about="momentum 0.9 weighs the old value, var * m/(m-1)"),
            _spec(f"running_0.1_unbiased-{dt}", (64, 4, 4), dt, offset=1.0, mode="running",
                 momentum=0.1, about="momentum 0.1 weighs the old value, var * m/(m-1)"),
            _spec(f"running_0.9_biased-{dt}", (64, 4, 4), dt, offset=1.0, mode="running",
                 momentum=0.9, unbiased=False, about="momentum 0.9, biased running var"),
        ]  # fmt: skip
        if dt == "float16":
            out.append(_spec(f"near_overflow-{dt}", (32, 4), dt, "wide", 6e4,
                            about="uniform in +-6e4: squares overflow float16"))  # fmt: skip
        if dt == "float32":
            out += [
                _spec(f"constant_1e10-{dt}", (8, 4, 4, 4), dt, "constant", 1e10, default=False,
                     about="channel 0 constant at 1e10: exact y is beta"),
                _spec(f"huge_values-{dt}", (16, 4), dt, "huge_values", 1e30, default=False,
                     about="|x| ~ 1e30, std 1e29: squares overflow float32"),
                _spec(f"huge_m-{dt}", (880801, 2), dt, offset=10.0, default=False,
                     about="880,801 values per channel"),
            ]  # fmt: skip
        if dt == "float64":
            out.append(_spec(f"constant_1e15_strided-{dt}", (8, 4, 4, 4), dt, "constant", 1e15,
                            layout="strided_channels_last", default=False,
                            about="constant channel at 1e15 in NHWC memory"))  # fmt: skip
    out += second_order_specs()
    if not has_bfloat16():
        out = [c for c in out if c["dtype"] != "bfloat16"]
    return out


def second_order_specs() -> list[dict[str, Any]]:
    """The cases of functional.double_backward (``second_order``): float32 and float64."""
    out: list[dict[str, Any]] = []
    for dt in ("float32", "float64"):
        for off in (0.0, 1e2, 1e4):
            shape = (32, 8) if off == 0.0 else (16, 4, 8, 8)
            out.append(_spec(f"double_backward_offset_{fmt(off)}-{dt}", shape, dt, offset=off,
                             about=f"second derivatives at offset {fmt(off)}"))  # fmt: skip
        out += [
            _spec(f"double_backward_5d-{dt}", (2, 3, 4, 4, 4), dt, offset=1.0,
                  about="second derivatives, (N, C, D, H, W)"),
            _spec(f"double_backward_channels_last_memory-{dt}", (8, 6, 5, 5), dt, offset=1.0,
                  layout="strided_channels_last", about="second derivatives, NHWC memory"),
            _spec(f"double_backward_constant_channel-{dt}", (8, 4, 4, 4), dt, "constant",
                  CONSTANT[dt], about=f"second derivatives, channel 0 constant at "
                  f"{fmt(CONSTANT[dt])}"),
            _spec(f"double_backward_eval_offset_0-{dt}", (16, 4), dt, mode="eval",
                  about="second derivatives with given statistics"),
            _spec(f"double_backward_eval_offset_1e2-{dt}", (8, 4, 4, 4), dt, offset=1e2,
                  mode="eval", about="second derivatives with given statistics at 1e2"),
        ]  # fmt: skip
        if dt == "float32":
            out.append(_spec(f"double_backward_huge_m-{dt}", (880801, 2), dt, offset=10.0,
                             default=False, about="second derivatives, 880,801 values per "
                             "channel"))  # fmt: skip
    return [{**spec, "second_order": True} for spec in out]


def draw(recipe: str, shape: tuple[int, ...], offset: float, rng: np.random.Generator) -> Vector:
    """A case's x in float64, channels at axis 1, from its recipe (conformance.Case)."""
    c = shape[1]
    per = (1, c) + (1,) * (len(shape) - 2)
    z = rng.standard_normal(shape)
    if recipe == "tiny_var":
        std = np.sqrt(np.geomspace(1e-7, 1e-4, c))
        return (z * std.reshape(per)).astype(np.float64)
    if recipe == "wide":
        return rng.uniform(-offset, offset, shape)
    if recipe == "narrow":
        return offset + 0.1 * z
    if recipe == "huge_values":
        return offset * (1.0 + 0.1 * z)
    std = rng.uniform(0.5, 2.0, c).reshape(per)
    shift = rng.uniform(-1.0, 1.0, c).reshape(per)
    if recipe == "constant":
        x = z * std + shift
        x[:, 0] = offset
        return x
    return offset + shift + z * std


def lay_out(x: NDArray[Any], layout: str) -> NDArray[Any]:
    """x (contiguous) given the case's memory layout, with the same logical shape and values."""
    if layout == "strided_channels_last":
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    if layout == "non_contiguous":
        big = np.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x


def exact(v: Vector, dtype: np.dtype[Any]) -> Vector:
    """v rounded to float32, and to x's dtype if narrower: exact where a kernel may store it."""
    out = np.asarray(v, dtype=np.float32)
    if dtype.itemsize < 4:
        out = out.astype(dtype)
    return out.astype(np.float64)


def fmt(value: float) -> str:
    if value == 0.0:
        return "0"
    exp = math.log10(abs(value))
    return f"1e{round(exp)}" if exp == round(exp) else f"{value:g}"


def has_bfloat16() -> bool:
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        return False
    return True


def numpy_dtype(name: str) -> np.dtype[Any]:
    if name == "bfloat16":
        import ml_dtypes

        bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bf16
    return np.dtype(name)
