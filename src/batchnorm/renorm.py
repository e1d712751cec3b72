"""Batch Renormalization (Ioffe 2017): BatchNorm whose training output is corrected towards the
running statistics, so that training and inference normalize alike.

The correction is a per-channel scale r and shift d applied to the normalized value, held
constant in backward; everything else is :class:`batchnorm.BatchNorm` on the same stages of
:mod:`batchnorm.functional`. See docs/variants.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _exchange, _validate
from batchnorm._ghost import Gradients, Part
from batchnorm.functional import backward, forward_train, moments
from batchnorm.layer import BatchNorm

__all__ = ["BatchRenorm"]


class BatchRenorm(BatchNorm):
    """Batch Renormalization over the channel axis of (N, C, *spatial) input.

    A :class:`batchnorm.BatchNorm` (same state dict keys, save/load, eval mode, ``freeze`` and
    :func:`batchnorm.precise_bn`) whose training-mode output is ``gamma * (xhat * r + d) +
    beta``, with r and d the clipped ratio and offset between the batch statistics and the
    running statistics.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
        Added to both variances: ``sigma_B = sqrt(var_B + eps)``, ``sigma = sqrt(running_var +
        eps)``.
    momentum : float in [0, 1] or None, default 0.9
        The weight of the OLD running value, as in BatchNorm:
        ``running = momentum * running + (1 - momentum) * batch_statistic``.
    rmax : float >= 1, default 3.0
        r is clipped to [1/rmax, rmax]; ``math.inf``: no clipping. An attribute a training loop
        may change (the paper starts at 1 and raises it to 3).
    dmax : float >= 0, default 5.0
        d is clipped to [-dmax, dmax]; ``math.inf``: no clipping. An attribute, like rmax (the
        paper starts at 0 and raises it to 5).
    warmup_steps : int >= 0, default 0
        W > 0: the paper's schedule, scaled to W. For the first W training batches (counted by
        ``num_batches_tracked``) r = 1 and d = 0, plain BatchNorm, while the running statistics
        settle; then the limits relax linearly, dmax reaching ``dmax`` after 5W batches and
        rmax reaching ``rmax`` after 8W (Ioffe: 5,000, 25,000 and 40,000 steps). 0: ``rmax``
        and ``dmax`` from the first batch, which then corrects towards the initial running
        statistics (0 and 1): on N(5, 3) data the first output has mean ~5 and std ~3, not 0
        and 1. ``current_limits`` gives the limits of the next training batch.
    affine : bool, default True
    unbiased : bool, default True
        running_var receives the unbiased batch variance (False: the biased one), as in
        BatchNorm.
    axis : int, default 1
        The channel axis; -1 for channels-last.
    ghost_batch_size : int or None, default None
        As in BatchNorm: each ghost batch gets its own r and d from the running statistics as
        updated by the ghost batches before it.
    frozen : bool, default False
        As in BatchNorm: running statistics in every mode, never updated.
    group : None
        Not supported: a group (synchronized BatchNorm) is a ValueError, as is setting
        ``layer.group`` later or passing the layer to ``distributed.synchronize``.

    Attributes
    ----------
    rmax, dmax : float
        The limits (after the warm-up).
    warmup_steps : int
    current_limits : tuple of float
        (rmax, dmax) for the next training batch, as the warm-up sets them.
    r, d : ndarray of shape (C,), float64, or None
        The corrections of the last forward in training mode (of its last ghost batch); None
        after an eval-mode or frozen forward.

    Notes
    -----
    In training mode, with the batch's mean mu_B and biased variance var_B (m values per
    channel)::

        sigma_B = sqrt(var_B + eps)                   sigma = sqrt(running_var + eps)
        r = clip(sigma_B / sigma, 1 / rmax, rmax)     d = clip((mu_B - running_mean) / sigma,
                                                               -dmax, dmax)
        xhat = (x - mu_B) / sigma_B
        y = gamma * (xhat * r + d) + beta  =  (gamma * r) * xhat + (gamma * d + beta)

    running_mean and running_var are taken as stored, before this batch updates them (as
    BatchNorm does). r and d are constants in backward (stop-gradient)::

        dx     = BatchNorm's training dx with gamma * r as the scale
        dgamma = r * sum(dy * xhat) + d * sum(dy),       dbeta = sum(dy)

    rmax = 1 and dmax = 0 give r = 1 and d = 0: BatchNorm exactly. Eval mode is BatchNorm's
    eval mode. Reference: S. Ioffe, "Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models", NeurIPS 2017, Algorithm 1. The paper keeps a moving
    average of sigma rather than of the variance; see docs/variants.md for this and Keras's
    ``renorm`` options.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> layer = bn.BatchRenorm(2, rmax=1.5, dmax=0.5)
    >>> layer.running_var[:] = 4.0                   # sigma = 2: the batch's sigma_B is ~1
    >>> y = layer(np.array([[0.0, 10.0], [2.0, 12.0]]))
    >>> np.round(layer.r, 3), np.round(layer.d, 3)   # clipped to 1/1.5 and to 0.5
    (array([0.667, 0.667]), array([0.5, 0.5]))
    >>> np.round(y[:, 0], 3)                         # xhat * r + d
    array([-0.167,  1.167])
    >>> warm = bn.BatchRenorm(2, warmup_steps=100)   # r = 1, d = 0 for 100 batches
    >>> warm.current_limits
    (1.0, 0.0)
    >>> warm.num_batches_tracked = 300               # 200 batches into the relaxation
    >>> warm.current_limits                          # dmax: 5 at 500, rmax: 3 at 800
    (1.5714285714285714, 2.5)
    """

    _format: ClassVar[str] = "batchnorm.BatchRenorm/1"
    _synchronizable: ClassVar[bool] = False
    _config_keys: ClassVar[tuple[str, ...]] = (*BatchNorm._config_keys, "config_rmax",
                                               "config_dmax", "config_warmup_steps")  # fmt: skip

    @_validate.refuse_num_dims
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.9,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        affine: bool = True,
        unbiased: bool = True,
        axis: int = 1,
        ghost_batch_size: int | None = None,
        frozen: bool = False,
        group: _exchange.Group | None = None,
    ) -> None:
        if _validate.group_value(group) is not None:  # accepted only to refuse it clearly
            _validate.no_group("BatchRenorm")
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine, unbiased=unbiased,
            axis=axis, ghost_batch_size=ghost_batch_size, frozen=frozen,
        )  # fmt: skip
        self.rmax, self.dmax = _validate.renorm_limits(rmax, dmax)
        self.warmup_steps = _validate.warmup_steps(warmup_steps)

    @property
    def current_limits(self) -> tuple[float, float]:
        """(rmax, dmax) for the next training batch: (1, 0) during the warm-up, then relaxing
        linearly to (rmax, dmax)."""
        rmax, dmax = _validate.renorm_limits(self.rmax, self.dmax)
        return _relaxed(rmax, dmax, self.warmup_steps, self.num_batches_tracked or 0)

    @property
    def r(self) -> NDArray[np.float64] | None:
        """r of the last training forward (of its last ghost batch), a copy; else None."""
        return self._last_correction(0)

    @property
    def d(self) -> NDArray[np.float64] | None:
        """d of the last training forward (of its last ghost batch), a copy; else None."""
        return self._last_correction(1)

    def _last_correction(self, which: int) -> NDArray[np.float64] | None:
        parts = self._parts
        if not parts or parts[-1].cache is not self._cache:
            return None
        value = (parts[-1].r, parts[-1].d)[which]
        return None if value is None else value.copy()

    def _normalize(
        self, x: ArrayLike, running: tuple[Any, Any, int] | None
    ) -> tuple[NDArray[np.floating[Any]], Part]:
        if self.group is not None:
            _validate.no_group("BatchRenorm")
        assert running is not None
        _validate.running_buffers(running[0], running[1], self.num_features)  # read here first
        rmax, dmax = _validate.renorm_limits(self.rmax, self.dmax)
        warmup = _validate.warmup_steps(self.warmup_steps)
        rmax, dmax = _relaxed(rmax, dmax, warmup, running[2])  # this batch's step
        x = _validate.float_array(x)
        _validate.training_batch(x.shape, _validate.channel_axis(x.shape, self.axis))
        batch = moments(x, axis=self.axis)
        mean_b, var_b = batch.mean, batch.var
        _validate.finite_statistics(mean_b, var_b)
        sigma = np.sqrt(running[1] + self.eps)
        r = np.clip(np.sqrt(var_b + self.eps) / sigma, 1.0 / rmax, rmax)
        d = np.clip((mean_b - running[0]) / sigma, -dmax, dmax)
        gamma = np.ones(self.num_features) if self.gamma is None else self.gamma
        shift = gamma * d if self.beta is None else gamma * d + self.beta
        y, cache = forward_train(x, gamma * r, shift, eps=self.eps, axis=self.axis, stats=batch)
        return y, Part(cache, r, d)

    def _backward_part(self, dy: ArrayLike, part: Part) -> Gradients:
        dx, sum_dy_xhat, sum_dy = backward(dy, part.cache)
        if part.r is None or part.d is None:  # eval mode or frozen: BatchNorm's backward
            return dx, sum_dy_xhat, sum_dy
        if not self.affine:
            return dx, None, None
        assert sum_dy_xhat is not None and sum_dy is not None
        return dx, part.r * sum_dy_xhat + part.d * sum_dy, sum_dy

    def _extra_entries(self) -> dict[str, Any]:
        return {
            "config_rmax": np.array(self.rmax),
            "config_dmax": np.array(self.dmax),
            "config_warmup_steps": np.array(self.warmup_steps),
        }

    @classmethod
    def _from_config(cls, entry: Callable[..., Any], *args: Any, **config: Any) -> BatchNorm:
        if not config.pop("track_running_stats"):
            raise _validate.renorm_needs_running_stats()
        rmax, dmax = float(entry("config_rmax", "f")), float(entry("config_dmax", "f"))
        warmup = int(entry("config_warmup_steps", "iu", 0))  # files from before: none
        return cls(*args, rmax=rmax, dmax=dmax, warmup_steps=warmup, **config)

    def __repr__(self) -> str:
        return (
            f"BatchRenorm({self.num_features}, eps={self.eps:g}, momentum={self.momentum}, "
            f"rmax={self.rmax:g}, dmax={self.dmax:g}, warmup_steps={self.warmup_steps}, "
            f"affine={self.affine}, "
            f"unbiased={self.unbiased}, axis={self.axis}, ghost_batch_size="
            f"{self.ghost_batch_size}, frozen={self.frozen}, "
            f"mode={'train' if self.training else 'eval'})"
        )


def _relaxed(rmax: float, dmax: float, warmup: int, step: int) -> tuple[float, float]:
    """The limits at training batch `step` (0 for the first) of Ioffe's schedule scaled to
    `warmup` steps: (1, 0) for `warmup` steps, then linear, dmax reached at 5 * warmup and
    rmax at 8 * warmup (the paper's 5k, 25k, 40k). An infinite limit is reached at once."""
    if warmup == 0:
        return rmax, dmax
    done = step - warmup

    def ramp(bottom: float, top: float, length: int) -> float:
        fraction = min(max(done / length, 0.0), 1.0)
        if fraction == 0.0:
            return bottom
        if fraction == 1.0 or math.isinf(top):
            return top
        return bottom + (top - bottom) * fraction

    return ramp(1.0, rmax, 7 * warmup), ramp(0.0, dmax, 4 * warmup)
