"""The normwise relative error that tests comparing two computations of one array use.

``gradcheck.relative_error`` is elementwise (cs231n's), the right measure for a gradient check;
comparing an output with a reference computed differently is judged on the array's scale, so an
entry that is near zero by chance does not turn rounding into a large error.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def normwise_error(actual: ArrayLike, expected: ArrayLike) -> float:
    """``max|actual - expected| / max(max|actual|, max|expected|)``; 0.0 when both are 0."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    if a.size == 0:
        return 0.0
    diff = float(np.max(np.abs(a - e)))
    scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(e))))
    if not np.isfinite(diff):
        return float("inf")
    return diff / scale if scale > 0 else 0.0
