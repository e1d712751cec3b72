"""Checks of the variants: ghost batches, frozen BatchNorm, Batch Renormalization."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = [
    "frozen_needs_running_stats",
    "ghost_axis",
    "ghost_batch_size",
    "ghost_too_small",
    "no_group",
    "renorm_limits",
    "renorm_needs_running_stats",
    "warmup_steps",
]


def ghost_batch_size(value: Any) -> int | None:
    """Check ghost_batch_size: None (the whole batch) or a positive int k."""
    if value is None:
        return None
    wrong_type = isinstance(value, bool) or not isinstance(value, numbers.Integral)
    if wrong_type or value < 1:
        raise (TypeError if wrong_type else ValueError)(
            f"ghost_batch_size must be None (normalize over the whole batch) or a positive int k, "
            f"the number of samples per ghost batch; got {value!r}."
        )
    return int(value)


def ghost_axis(shape: tuple[int, ...], axis: int) -> None:
    """Ghost batches split axis 0, which must then not be the channel axis."""
    if axis == 0:
        raise ValueError(
            f"ghost batches split axis 0 into runs of samples, but axis 0 is the channel axis "
            f"here (input of shape {shape}). Put the samples on axis 0, or pass "
            "ghost_batch_size=None."
        )


def ghost_too_small(
    shape: tuple[int, ...], k: int, index: int, total: int, lo: int, hi: int
) -> None:
    """A ghost batch with fewer than two values per channel has no batch variance."""
    raise ValueError(
        f"ghost batch {index + 1} of {total} (samples {lo}..{hi - 1} of input of shape {shape}, "
        f"ghost_batch_size={k}) holds fewer than 2 values per channel, so it has no batch "
        "variance; nothing was changed. Use a batch size whose last ghost batch keeps at least "
        "2 samples (or spatial size > 1), or a larger ghost_batch_size."
    )


def no_group(name: str) -> None:
    """Variants computed per worker do not combine with a group (synchronized BatchNorm)."""
    raise ValueError(
        f"{name} cannot be combined with a group (synchronized BatchNorm across workers): this "
        "combination is not supported; nothing was changed. Set layer.group = None, or use "
        "plain BatchNorm with the group."
    )


def frozen_needs_running_stats() -> ValueError:
    return ValueError(
        "a frozen BatchNorm normalizes with its running statistics, but this layer has "
        "track_running_stats=False and keeps none. Create it with track_running_stats=True "
        "(the default) and load the statistics to freeze."
    )


def renorm_limits(rmax: Any, dmax: Any) -> tuple[float, float]:
    """Check BatchRenorm's clipping limits: rmax >= 1 and dmax >= 0 (inf: no clipping)."""
    for name, value in (("rmax", rmax), ("dmax", dmax)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise TypeError(f"{name} must be a float (math.inf: no clipping); got {value!r}.")
    if not (float(rmax) >= 1.0 and float(dmax) >= 0.0):
        raise ValueError(
            f"BatchRenorm needs rmax >= 1 and dmax >= 0 (r is clipped to [1/rmax, rmax], d to "
            f"[-dmax, dmax]); got rmax={rmax!r}, dmax={dmax!r}. rmax=1, dmax=0 is BatchNorm; "
            "the paper raises them gradually to 3 and 5; math.inf switches clipping off."
        )
    return float(rmax), float(dmax)


def warmup_steps(value: Any) -> int:
    """Check BatchRenorm's warmup_steps: an int >= 0 (0: no warm-up)."""
    wrong_type = isinstance(value, bool) or not isinstance(value, numbers.Integral)
    if wrong_type or value < 0:
        error = TypeError if wrong_type else ValueError
        raise error(
            f"warmup_steps must be an int >= 0, the number of training batches with r = 1 and "
            f"d = 0 before rmax and dmax relax (0: no warm-up); got {value!r}."
        )
    return int(value)


def renorm_needs_running_stats() -> ValueError:
    return ValueError(
        "BatchRenorm corrects the batch statistics towards its running statistics, so it "
        "always keeps them: track_running_stats must be True. Use BatchNorm("
        "track_running_stats=False) for batch statistics only."
    )
