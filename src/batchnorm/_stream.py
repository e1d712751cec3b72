"""Streaming the stages over large arrays (private): slabs, row views, BLAS sums.

Used by ``_layout`` for inputs above its lean size. Arrays are C-contiguous (P, C, S) in the
compute dtype (float32 for float16 and float32 input).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.floating[Any]]
Vector = NDArray[np.float64]

# x is handled as a (P, C, S) view: P = prod(shape[:axis]), S = prod(shape[axis+1:]). What makes
# the kernels fast in NumPy (before/after timings in docs/performance.md):
#
# * Few passes over memory. Centring costs one pass, not two: the shift comes from a small
#   leading sample of the batch, with a full-mean shift only when that sample was too far off
#   (shifted_moments). dx is built in place in its own buffer, with no temporary of x's size.
# * Large arrays are processed in slabs of whole samples (_SLAB_BYTES), so that what one step
#   writes is still in cache when the next step reads it: centring and the sums of the centred
#   values share one trip to memory, and so do the four steps that build dx.
# * Element-wise work runs on long rows. NumPy runs `x * v` with a per-channel v broadcast as
#   (C, 1) over (P, C, S) 1.5x (S = 3136) to 2.2x (S = 49) slower than with an equally long v
#   of its own, and (B, C) data (S = 1) is the worst case. So the contiguous data is viewed as
#   (R, L) rows of k whole samples each, and every per-channel vector is expanded once to a
#   row of L values (_layout).
# * Per-channel sums are matrix-vector products with a ones vector, which BLAS runs at memory
#   speed; ndarray.sum with a float64 accumulator converts element by element, 2-4x slower.
#   Accuracy is kept by bounding how many terms BLAS adds in the compute dtype (at most
#   _BLAS_TERMS over P; over S as many as a feature map holds) and adding the rest in float64.

# Target row length (elements) of the element-wise view: long enough that the per-loop cost
# vanishes, short enough that the expanded per-channel rows stay in cache.
_ROW_LENGTH = 16384
# Largest expanded per-channel row (bytes of one sample, C * S values), and fewest rows the
# element-wise view must have, so that an expanded row costs at most 1/8 of x's memory.
_ROW_MAX_BYTES = 1 << 20
_MIN_ROWS = 8
# Largest number of rows BLAS sums in the compute dtype before float64 takes over.
_BLAS_TERMS = 64
# Largest run of one feature map summed in the compute dtype (bounds float32 rounding growth).
_ROW_TERMS = 4096
# Values per channel in the leading sample that estimates the shift.
_SHIFT_SAMPLE = 32
# Bytes of one array per slab; arrays up to _SLAB_MIN_BYTES are done in one piece.
_SLAB_BYTES = 1 << 20
_SLAB_MIN_BYTES = 16 << 20


def shifted_moments(
    x3: Array, cdt: np.dtype[Any], count: int
) -> tuple[Array, Vector, Vector, Vector]:
    """Centre x3 (P, C, S) by a first mean estimate; return (data, shift, resid, var).

    ``data = x3 - shift`` in the compute dtype, C-contiguous, with ``shift`` (float64, exactly
    representable in cdt) a first estimate of the mean; ``resid`` is the exact remainder, so the
    mean is ``shift + resid``, and ``var`` the biased variance. Summing small centred values and
    correcting by the remainder (Chan, Golub and LeVeque's two-pass algorithm) avoids the
    cancellation of the one-pass E[x^2] - E[x]^2.

    The shift is the mean of the first ~_SHIFT_SAMPLE values of each channel, which saves a
    full pass over x. The correction ``var = E[data^2] - resid^2`` loses about
    log2(1 + resid^2 / var) bits, so at most one while every channel's sample mean lies within
    one standard deviation of its batch mean. When one does not (an ordered batch, an outlier
    up front), x is centred again on the batch mean just measured and the sums are redone, as
    the full two-pass algorithm would.
    """
    x3 = contiguous(x3, cdt)
    p, _, s = x3.shape
    head = x3[: min(p, -(-_SHIFT_SAMPLE // s))]
    shift = (channel_sum(head) / max(head.shape[0] * s, 1)).astype(cdt)
    data = np.empty_like(x3)
    resid, var = _centre(x3, shift, data, count)
    if (resid * resid > var).any():
        shift = (shift + resid).astype(cdt)
        resid, var = _centre(x3, shift, data, count)
    return data, shift.astype(np.float64), resid, np.maximum(var, 0.0)


def _centre(x3: Array, shift: Array, data: Array, count: int) -> tuple[Vector, Vector]:
    """data = x3 - shift; return the mean of data and its (unclipped) biased variance
    E[data^2] - mean^2, summing each slab while it is in cache."""
    p, c, s = x3.shape
    flat = _flat(p, c, s, x3.dtype.itemsize)
    if flat is not None:
        size, n = flat
        (op,) = _flat_rows(size, x3.dtype, shift)
        np.subtract(x3.reshape(-1, size), op, out=data.reshape(-1, size))
        total, total_sq = _flat_sums(data, data, n)
    else:
        sums = []
        for (_, d_slab), (x_view, d_view), (op,) in _slabs((x3, data), shift):
            np.subtract(x_view, op, out=d_view)
            sums.append((channel_sum(d_slab), _channel_dot(d_slab, d_slab)))
        total, total_sq = _add_up(sums)
    resid = total / count
    return resid, total_sq / count - resid * resid


def sum_and_dot(dy3: Array, data: Array) -> tuple[Vector, Vector]:
    """Per-channel sum(dy) and sum(dy * data), slab by slab."""
    p, c, s = data.shape
    flat = _flat(p, c, s, data.dtype.itemsize)
    if flat is not None:
        return _flat_sums(dy3, data, flat[1])
    sums = [
        (channel_sum(dy_slab), _channel_dot(dy_slab, d_slab))
        for (dy_slab, d_slab), _, _ in _slabs((dy3, data))
    ]
    return _add_up(sums)


def _add_up(sums: list[tuple[Vector, Vector]]) -> tuple[Vector, Vector]:
    """Add up per-slab pairs of per-channel sums."""
    first, second = sums[0]
    for a, b in sums[1:]:
        first = first + a
        second = second + b
    return first, second


def train_dx(data: Array, dy3: Array, a: Vector, b1: Vector, c1: Vector) -> Array:
    """dx = a * dy + (a * b1) * data + a * c1, evaluated as a * (data * b1 + dy + c1): four
    passes in place on dx (each slab's four while it is in cache), no temporary of x's size."""
    dx = np.empty_like(data)
    p, c, s = data.shape
    flat = _flat(p, c, s, data.dtype.itemsize)
    if flat is not None:
        size = flat[0]
        views = tuple([arr.reshape(-1, size) for arr in (data, dy3, dx)])
        steps: list[tuple[tuple[Array, ...], list[Array]]] = [
            (views, _flat_rows(size, data.dtype, a, b1, c1))
        ]
    else:
        steps = [slab[1:] for slab in _slabs((data, dy3, dx), a, b1, c1)]
    for (d_view, dy_view, dx_view), (a_op, b1_op, c1_op) in steps:
        np.multiply(d_view, b1_op, out=dx_view)
        dx_view += dy_view
        dx_view += c1_op
        dx_view *= a_op
    return dx


def scale_shift(a: Array, scale: Vector, offset: Vector | None, dtype: np.dtype[Any]) -> Array:
    """a * scale + offset per channel for C-contiguous (P, C, S) a, computed in a's dtype and
    returned in dtype: a multiply into a new array and an in-place add."""
    out = np.empty_like(a)
    p, c, s = a.shape
    flat = _flat(p, c, s, a.dtype.itemsize)
    if offset is not None and flat is not None:
        size = flat[0]
        scale_op, offset_op = _flat_rows(size, a.dtype, scale, offset)
        out_view = out.reshape(-1, size)
        np.multiply(a.reshape(-1, size), scale_op, out=out_view)
        out_view += offset_op
    elif offset is None or a.nbytes <= _SLAB_MIN_BYTES:
        # One expanded vector alive at a time: with few samples one costs up to 1/8 of x.
        _apply(np.multiply, a, scale, out)
        if offset is not None:
            _apply(np.add, out, offset, out)
    else:  # slab by slab, adding while the product is in cache
        for _, (a_view, out_view), (scale_op, offset_op) in _slabs((a, out), scale, offset):
            np.multiply(a_view, scale_op, out=out_view)
            out_view += offset_op
    result: Array = out.astype(dtype, copy=False)
    return result


def _apply(op: np.ufunc, a: Array, vector: Vector | Array, out: Array) -> None:
    """out = op(a, vector) per channel, for C-contiguous (P, C, S) a and out."""
    for _, (a_view, out_view), (operand,) in _slabs((a, out), vector):
        op(a_view, operand, out=out_view)


def copy_scale_shift(
    x3: Array, cdt: np.dtype[Any], scale: Vector, offset: Vector, dtype: np.dtype[Any]
) -> tuple[Array, Array]:
    """(a C-contiguous copy of x3 in cdt, x3 * scale + offset in dtype): copy, multiply and
    add in one walk with both vectors expanded at once (slab by slab for large arrays, so that
    each slab of the copy is scaled while it is still in cache)."""
    data = np.empty(x3.shape, cdt)
    if not x3.flags.c_contiguous:
        np.copyto(data, x3)
        return data, scale_shift(data, scale, offset, dtype)
    out = np.empty_like(data)
    for (d_slab, x_slab, _), (d_view, _, out_view), (scale_op, offset_op) in _slabs(
        (data, x3, out), scale, offset
    ):
        np.copyto(d_slab, x_slab)
        np.multiply(d_view, scale_op, out=out_view)
        out_view += offset_op
    result: Array = out.astype(dtype, copy=False)
    return data, result


# (B, C) data in one slab (fully connected layers) takes straight-line branches of the kernels
# above: the same passes in the same order (bit for bit the same results) without the calls of
# the slab walk and the general helpers, 4-7% of a step (docs/performance.md, item 9).


@functools.lru_cache(maxsize=64)
def _flat(p: int, c: int, s: int, itemsize: int) -> tuple[int, int] | None:
    """(L, n) for (B, C) data (S = 1) of at most _SLAB_MIN_BYTES: the length of the rows of
    the element-wise view (_layout) and the number of rows of the BLAS sums' view (that of
    channel_sum); None for other data, and for a P that channel_sum splits."""
    if s != 1 or not p or p * c * itemsize > _SLAB_MIN_BYTES or p // _blas_split(p) > _BLAS_TERMS:
        return None
    return _layout(p, c, s, itemsize)[1], p // _blas_split(p)


def _flat_rows(size: int, dtype: np.dtype[Any], *vectors: Vector | Array) -> list[Array]:
    """Per-channel vectors (C,) expanded to rows of `size` values in dtype, as _per_channel
    does for (B, C) data."""
    stacked = np.array(vectors, dtype=dtype)
    m, c = stacked.shape
    expanded = np.empty((m, size // c, c), dtype)
    expanded[...] = stacked[:, None, :]
    return list(expanded.reshape(m, size))


def _flat_sums(a: Array, b: Array, n: int) -> tuple[Vector, Vector]:
    """Per-channel sum(a) and sum(a * b) of (P, C, 1) arrays, summed as channel_sum and
    _channel_dot do: over n rows of P / n samples in the compute dtype, then in float64."""
    c = a.shape[1]
    rows_a, rows_b = a.reshape(n, -1), b.reshape(n, -1)
    total = _fold(ones(n, a.dtype) @ rows_a, c)
    return total, _fold(np.einsum("rl,rl->l", rows_a, rows_b), c)


def _slabs(
    arrays: tuple[Array, ...], *vectors: Vector | Array
) -> Iterator[tuple[tuple[Array, ...], tuple[Array, ...], list[Array]]]:
    """Walk same-shaped C-contiguous (P, C, S) arrays together, a slab of samples at a time.

    Yields (the arrays' (n, C, S) slabs, the same slabs in the element-wise view, the
    per-channel vectors as operands that broadcast against that view, in the first array's
    dtype). The view is chosen once for the whole arrays (_layout); arrays up to
    _SLAB_MIN_BYTES are one slab."""
    p, c, s = arrays[0].shape
    dtype = arrays[0].dtype
    mode, size = _layout(p, c, s, dtype.itemsize)
    ops = _per_channel(s, mode, size, dtype, *vectors)
    sample_bytes = c * s * dtype.itemsize
    if p * sample_bytes <= _SLAB_MIN_BYTES:
        yield arrays, _views(arrays, mode, size), ops
        return
    k = size // (c * s) if mode == "rows" else 1  # a slab holds whole rows
    step = max(1, _SLAB_BYTES // (sample_bytes * k)) * k
    for start in range(0, p, step):
        blocks = tuple([arr[start : start + step] for arr in arrays])
        yield blocks, _views(blocks, mode, size), ops


def _views(blocks: tuple[Array, ...], mode: str, size: int) -> tuple[Array, ...]:
    return tuple([b.reshape(-1, size) for b in blocks]) if mode == "rows" else blocks


def as_pcs(x: Array, axis: int) -> Array:
    """View x as (P, C, S): P = prod(shape[:axis]), S = prod(shape[axis+1:]); copies only if
    x's memory layout does not allow the view."""
    shape = x.shape
    return x.reshape(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))


def contiguous(a: Array, dtype: np.dtype[Any]) -> Array:
    """a itself when it is C-contiguous in dtype, else a C-contiguous copy in dtype."""
    result: Array = np.ascontiguousarray(a, dtype=dtype)
    return result


@functools.lru_cache(maxsize=64)
def _layout(p: int, c: int, s: int, itemsize: int) -> tuple[str, int]:
    """How element-wise work views C-contiguous (P, C, S) data, as (mode, size).

    * ("rows", L): rows of L = k * C * S values, k whole samples each (k the largest divisor
      of P with L <= _ROW_LENGTH and P / k >= _MIN_ROWS): every row has the same channel
      pattern, so one expanded row per vector serves them all. (B, C) data always takes
      rows: broadcasting a (C,) vector over B short rows is the slow case itself.
    * ("planes", 0): (C, 1) vectors broadcast over (P, C, S), when an expanded row would
      cost more than 1/_MIN_ROWS of x's memory (fewer than _MIN_ROWS samples) or more than
      _ROW_MAX_BYTES. NumPy runs these passes 1.5x (S = 3136) to 2.2x (S = 49) slower."""
    cs = c * s
    if cs > 0 and (s == 1 or (p >= _MIN_ROWS and cs * itemsize <= _ROW_MAX_BYTES)):
        most = min(p // _MIN_ROWS, _ROW_LENGTH // max(cs, 1))
        return "rows", cs * next((d for d in range(most, 1, -1) if p % d == 0), 1)
    return "planes", 0


def _per_channel(
    s: int, mode: str, size: int, dtype: np.dtype[Any], *vectors: Vector | Array
) -> list[Array]:
    """Per-channel vectors (n,) as operands in dtype: expanded to one row of `size` values
    (k repeats of each channel's value S times) in "rows" mode, else shaped (n, 1)."""
    if not vectors:
        return []
    stacked = np.array(vectors, dtype=dtype)
    if mode != "rows":
        return list(stacked[:, :, None])
    pattern = np.repeat(stacked, s, axis=1) if s > 1 else stacked  # one sample: (m, n * S)
    k = size // max(pattern.shape[1], 1)
    if k == 1:
        return list(pattern)
    expanded = np.empty((len(vectors), k, pattern.shape[1]), dtype)
    expanded[...] = pattern[:, None, :]
    return list(expanded.reshape(len(vectors), size))


def subtract_per_channel(a: Array, vector: Array) -> Array:
    """a - vector per channel for C-contiguous (P, C, S) a, as a new array."""
    result = np.empty_like(a)
    _apply(np.subtract, a, vector, result)
    return result


def ones(n: int, dtype: np.dtype[Any]) -> Array:
    """A read-only ones vector; the short ones (up to 64K values) are kept for reuse."""
    return _cached_ones(n, dtype) if n <= 1 << 16 else np.ones(n, dtype)


@functools.lru_cache(maxsize=16)
def _cached_ones(n: int, dtype: np.dtype[Any]) -> Array:
    ones: Array = np.ones(n, dtype)
    ones.flags.writeable = False
    return ones


@functools.lru_cache(maxsize=64)
def _blas_split(p: int) -> int:
    """k, the smallest divisor of P with P / k <= _BLAS_TERMS: sums over P run as BLAS sums of
    P / k rows in the compute dtype, then k partial sums added in float64. When no such
    divisor lies near P / _BLAS_TERMS (P prime, say), this returns 1 and the callers split P."""
    first = -(-p // _BLAS_TERMS)
    return next((k for k in range(first, min(p, 8 * first) + 1) if p % k == 0), 1)


def channel_sum(a: Array) -> Vector:
    """Per-channel sum of contiguous (P, C, S) a in float32/float64, as float64 (C,)."""
    p, c, s = a.shape
    if a.size == 0:
        return np.zeros(c)
    if s == 1:
        k = _blas_split(p)
        if p // k > _BLAS_TERMS:  # no divisor fits: split off the last P % _BLAS_TERMS rows
            cut = p - p % _BLAS_TERMS
            return channel_sum(a[:cut]) + channel_sum(a[cut:])
        return _fold(ones(p // k, a.dtype) @ a.reshape(p // k, k * c), c)
    parts = [piece @ ones(piece.shape[-1], a.dtype) for piece in _pieces(a.reshape(p * c, s))]
    return _fold(_add_pieces(parts, p * c), c)


def _channel_dot(a: Array, b: Array) -> Vector:
    """Per-channel sum of a * b for contiguous (P, C, S) arrays, without a temporary of their
    size (einsum multiplies and adds in one loop), as float64 (C,)."""
    p, c, s = a.shape
    if a.size == 0:
        return np.zeros(c)
    if s == 1:
        k = _blas_split(p)
        if p // k > _BLAS_TERMS:
            cut = p - p % _BLAS_TERMS
            return _channel_dot(a[:cut], b[:cut]) + _channel_dot(a[cut:], b[cut:])
        rows = (p // k, k * c)
        return _fold(np.einsum("rl,rl->l", a.reshape(rows), b.reshape(rows)), c)
    pieces = zip(_pieces(a.reshape(p * c, s)), _pieces(b.reshape(p * c, s)), strict=True)
    parts = [np.einsum("...s,...s->...", u, v) for u, v in pieces]
    return _fold(_add_pieces(parts, p * c), c)


def _pieces(rows: Array) -> list[Array]:
    """(n, S) rows as views of at most _ROW_TERMS terms per row: (n, k, _ROW_TERMS) and the
    (n, S % _ROW_TERMS) rest. Summing each piece in the compute dtype and the pieces in
    float64 makes float32 rounding grow with the piece, not with the feature map."""
    s = rows.shape[1]
    if s <= _ROW_TERMS:
        return [rows]
    cut = s - s % _ROW_TERMS
    pieces = [rows[:, :cut].reshape(rows.shape[0], -1, _ROW_TERMS)]
    return [*pieces, rows[:, cut:]] if cut < s else pieces


def _add_pieces(parts: Sequence[Array], n: int) -> Array:
    """Per-row totals of the pieces' sums, in float64 when there is more than one piece."""
    if len(parts) == 1 and parts[0].ndim == 1:
        return parts[0]
    total: Array = np.add.reduce(
        [part.reshape(n, -1).sum(axis=1, dtype=np.float64) for part in parts]
    )
    return total


def _fold(partial: Array, c: int) -> Vector:
    """Add partial sums laid out as (n, C) per channel, in float64."""
    rows = partial.reshape(-1, c)
    total: Vector = (
        rows[0].astype(np.float64) if rows.shape[0] == 1 else rows.sum(axis=0, dtype=np.float64)
    )
    return total
