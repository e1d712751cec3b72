"""The warnings a BatchNorm layer gives (private): a momentum written in PyTorch's convention,
and a float16 output that overflowed. Each points at the user's line, however many of this
package's frames lie between (a subclass's ``__init__``, ``BatchNorm.load``, ``forward``).
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _validate

_F16 = np.dtype(np.float16)

#: The momentum values below 0.5 already warned about: the warning comes once per value.
_warned_momenta: set[float] = set()


def pytorch_momentum(momentum: float | None) -> None:
    """Warn, once per value, about a momentum < 0.5: most likely PyTorch's convention."""
    if momentum is None or momentum >= 0.5 or momentum in _warned_momenta:
        return
    _warned_momenta.add(momentum)
    _warn(_validate.pytorch_momentum(momentum), UserWarning)


def float16_overflow(
    x: ArrayLike, y: NDArray[np.floating[Any]], axis: int, gamma: Any, beta: Any
) -> None:
    """Warn when a float16 output overflowed to inf where x was finite: computed in float32,
    y can exceed float16's range (65504) with a large gamma or beta."""
    if y.dtype != _F16 or np.isfinite(y).all():
        return
    bad = ~np.isfinite(y) & np.isfinite(np.asarray(x))
    per_channel = np.moveaxis(bad, axis, 0).reshape(y.shape[axis], -1).any(axis=1)
    if per_channel.any():
        message = _validate.float16_overflow(np.flatnonzero(per_channel), gamma, beta)
        _warn(message, RuntimeWarning)


def _warn(message: str, category: type[Warning]) -> None:
    """Warn at the first frame outside this package."""
    package, level = os.path.dirname(__file__) + os.sep, 1
    frame: FrameType | None = sys._getframe()
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
