"""How the stages of :mod:`batchnorm.functional` walk memory (private).

functional.py says *what* is computed; this module decides *how*, by size alone, so that the
forward and backward of one call always take the same road:

* Lean (x.size <= LEAN_VALUES): a few whole-array NumPy operations in float64. At this size
  the cost is the number of NumPy calls, not the arithmetic, so every stage here is written
  in as few calls as it takes (per-channel sums as one BLAS product with a ones vector), and
  float64 costs nothing extra while making float32 results exact to their last bit or so.
* Streaming (larger): ``_stream`` walks the data in cache-sized slabs in the compute dtype
  (float32 for float16 and float32 input).

Nothing here changes a result beyond rounding. Arrays are handled as (P, C, S):
P = prod(shape[:axis]), S = prod(shape[axis+1:]).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import numpy as np
from numpy.typing import NDArray

from batchnorm import _stream

Array = NDArray[np.floating[Any]]
Vector = NDArray[np.float64]
_P = ParamSpec("_P")
_R = TypeVar("_R")

# Largest x (values, all channels together) done the lean way. Measured: the lean road is
# faster up to about this size (python benchmarks/bench.py --crossover; docs/performance.md).
LEAN_VALUES = 1 << 13
_F64 = np.dtype(np.float64)
# NumPy's own errstate.__call__ (newer NumPy 2 releases) keeps each call's state apart;
# the one inherited from contextlib.ContextDecorator shares the errstate object between calls.
_ERRSTATE_DECORATES_SAFELY = "__call__" in vars(np.errstate)


def propagating(kernel: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a kernel with NumPy's "invalid value" and "overflow" warnings silenced: NaN and inf
    in the input propagate to the output by design (callers such as BatchNorm check the
    statistics), so those warnings would only be noise.

    Where NumPy's errstate decorates thread-safely (its own ``__call__``, which keeps each
    call's state in a context variable) it costs half a ``with`` block per call; elsewhere
    each call enters a new errstate."""
    if _ERRSTATE_DECORATES_SAFELY:
        silenced: Callable[_P, _R] = np.errstate(invalid="ignore", over="ignore")(kernel)
        return silenced

    @functools.wraps(kernel)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with np.errstate(invalid="ignore", over="ignore"):
            return kernel(*args, **kwargs)

    return run


def pcs(x: Array, axis: int) -> tuple[Array, bool]:
    """x as a (P, C, S) array, and whether it was taken channels-last.

    An array whose channel axis varies fastest in memory (a channels-last-strided (N, C, H, W)
    array, say) is viewed as (P, C, 1) without a copy; :func:`restore` gives the results the
    same memory layout, as NumPy's ufuncs do."""
    if axis != x.ndim - 1 and not x.flags.c_contiguous and x.size:
        moved = np.moveaxis(x, axis, -1)
        if moved.flags.c_contiguous:
            return moved.reshape(-1, x.shape[axis], 1), True
    return _stream.as_pcs(x, axis), False


def like(dy: Array, axis: int, moved: bool, dtype: np.dtype[Any]) -> Array:
    """dy as the C-contiguous (P, C, S) array in dtype that matches :func:`pcs` of x."""
    if moved:
        dy = np.moveaxis(dy, axis, -1).reshape(-1, dy.shape[axis], 1)
    else:
        dy = _stream.as_pcs(dy, axis)
    return _stream.contiguous(dy, dtype)


def restore(a3: Array, shape: tuple[int, ...], axis: int, moved: bool) -> Array:
    """A (P, C, S) result back in x's shape and memory layout."""
    if not moved:
        return a3.reshape(shape)
    last = (*shape[:axis], *shape[axis + 1 :], shape[axis])
    return np.moveaxis(a3.reshape(last), -1, axis)


def working_dtype(size: int, cdt: np.dtype[Any]) -> np.dtype[Any]:
    """float64 in the lean regime, else the compute dtype."""
    return _F64 if size <= LEAN_VALUES else cdt


def centred_moments(
    x3: Array, cdt: np.dtype[Any], count: int
) -> tuple[Array, Vector, Vector, Vector]:
    """(data, shift, resid, var): data = x - shift, mean = shift + resid, biased var."""
    if x3.size > LEAN_VALUES:
        return _stream.shifted_moments(x3, cdt, count)
    data = x3.astype(_F64, order="C")
    shift = _sum(data)
    shift /= count
    data -= shift[:, None]
    var = _dot(data, data)
    var /= count
    if x3.dtype != _F64:  # float32 values: the float64 mean is exact to far below their ulp
        return data, shift, np.zeros(len(shift)), var
    # The two-pass algorithm with its correction term: resid is what rounding left of the mean.
    resid = _sum(data)
    resid /= count
    var -= resid * resid
    return data, shift, resid, np.maximum(var, 0.0, out=var)


def centre_on(x3: Array, cdt: np.dtype[Any], mean: Vector) -> tuple[Array, Vector]:
    """(data, shift): data = x - shift, shift the given mean rounded to the working dtype."""
    if x3.size > LEAN_VALUES:
        shift = mean.astype(cdt)
        data = _stream.subtract_per_channel(_stream.contiguous(x3, cdt), shift)
        return data, shift.astype(_F64)
    data = x3.astype(_F64, order="C")
    data -= mean[:, None]
    return data, mean


def scale_shift(a: Array, scale: Vector, offset: Vector | None, dtype: np.dtype[Any]) -> Array:
    """a * scale + offset per channel, returned in dtype."""
    if a.size > LEAN_VALUES:
        cdt = np.promote_types(a.dtype, np.float32)  # float16 is computed in float32
        return _stream.scale_shift(_stream.contiguous(a, cdt), scale, offset, dtype)
    # Same-dtype float64 passes and one cast at the end: NumPy's mixed-dtype loops (casting
    # as they go) cost twice as much at this size.
    out = np.multiply(a if a.dtype == _F64 else a.astype(_F64), scale[:, None])
    if offset is not None:
        out += offset[:, None]
    return out.astype(dtype, copy=False)


def normalize_eval(
    x3: Array,
    cdt: np.dtype[Any],
    scale: Vector,
    offset: Vector,
    dtype: np.dtype[Any],
    *,
    keep: bool,
) -> tuple[Array | None, Array]:
    """(a copy of x in the working dtype if keep else None, x * scale + offset in dtype)."""
    if not keep:
        return None, scale_shift(x3, scale, offset, dtype)
    if x3.size > LEAN_VALUES:
        return _stream.copy_scale_shift(x3, cdt, scale, offset, dtype)
    data = x3.astype(_F64, order="C")
    return data, scale_shift(data, scale, offset, dtype)


def sums(dy3: Array, data: Array, ref: Vector, *, centred: bool) -> tuple[Vector, Vector]:
    """Per-channel sum(dy) and sum(dy * (data - ref)), in float64.

    centred: data is x minus (nearly) its mean, so ref is a small remainder and
    sum(dy * data) - ref * sum(dy) does not cancel. Otherwise (an eval cache holds x itself)
    data is centred on ref first."""
    if data.size <= LEAN_VALUES:
        if not centred:
            data = data - ref[:, None]
            ref = np.zeros(len(ref))
        sum_dy = _sum(dy3)
        return sum_dy, _dot(dy3, data) - ref * sum_dy
    if centred:
        sum_dy, dot = _stream.sum_and_dot(dy3, data)
        return sum_dy, dot - ref * sum_dy
    ref_c = ref.astype(data.dtype)
    sum_dy, dot = _stream.sum_and_dot(dy3, _stream.subtract_per_channel(data, ref_c))
    return sum_dy, dot - (ref - ref_c) * sum_dy


def channel_sum(a: Array) -> Vector:
    """Per-channel sum of a (P, C, S) array in its working dtype, as float64."""
    return _sum(a) if a.size <= LEAN_VALUES else _stream.channel_sum(a)


def train_dx(
    data: Array, dy3: Array, a: Vector, b1: Vector, c1: Vector, dtype: np.dtype[Any]
) -> Array:
    """dx = a * (data * b1 + dy + c1) per channel, returned in dtype."""
    if data.size > LEAN_VALUES:
        dx: Array = _stream.train_dx(data, dy3, a, b1, c1).astype(dtype, copy=False)
        return dx
    # = data * (a * b1) + dy * a + a * c1: per-channel products first, then three passes.
    dx = np.multiply(data, (a * b1)[:, None])
    dx += (a * c1)[:, None]
    dx += dy3 * a[:, None]
    return dx.astype(dtype, copy=False)


def _sum(a: Array) -> Vector:
    """Per-channel sum of a small (P, C, S) float64 array: BLAS products with ones vectors,
    over P and then over S (np.dot: less per call than matmul or a ufunc's reduce)."""
    p, c, s = a.shape
    if not p:
        return np.zeros(c)
    total: Vector = np.dot(_stream.ones(p, _F64), a.reshape(p, c * s))
    return total if s == 1 else np.dot(total.reshape(c, s), _stream.ones(s, _F64))


def _dot(a: Array, b: Array) -> Vector:
    """Per-channel sum of a * b for small (P, C, S) float64 arrays."""
    if a.shape[2] == 1:  # rows of channels: BLAS beats einsum's loop
        return _sum(a * b)
    total: Vector = np.einsum("pcs,pcs->c", a, b)
    return total
