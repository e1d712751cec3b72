"""The stateful BatchNorm layer: parameters, running statistics, train/eval mode, saved state.

All arithmetic on activations is done by :mod:`batchnorm.functional`; this module only keeps
state and decides which kernel to call.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _alerts, _exchange, _ghost, _saved, _validate
from batchnorm._ghost import Part
from batchnorm._saved import LoadResult
from batchnorm.functional import BatchNormCache, backward, forward_eval, forward_train

__all__ = ["BatchNorm", "LoadResult"]


class BatchNorm:
    """Batch Normalization over the channel axis of (N, C, *spatial) input, for every rank.

    One class serves (B, L), (N, C, L), (N, C, H, W) and (N, C, D, H, W) input, and with
    ``axis=-1`` channels-last data: statistics are per channel, over every other axis.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
        Added to the variance: ``invstd = 1 / sqrt(var + eps)`` (PyTorch's default; Keras uses
        1e-3). A positional int >= 1 is a TypeError: ``BatchNorm(6, 4)`` is d2l's ``BatchNorm(
        num_features, num_dims)``; no num_dims is needed here (``eps=4`` by keyword is fine).
    momentum : float in [0, 1] or None, default 0.9
        The weight of the OLD running value::

            running = momentum * running + (1 - momentum) * batch_statistic

        as in the original paper's code, cs231n, d2l and Keras. PyTorch's ``momentum`` is the
        weight of the new value: PyTorch's 0.1 is 0.9 here. A momentum below 0.5 warns
        (UserWarning, once per value), naming the value a PyTorch user meant; silence it with
        ``warnings.filterwarnings("ignore", message="momentum=")``. None keeps the cumulative
        average of all batches seen (running = running + (batch - running) /
        num_batches_tracked), as PyTorch's ``momentum=None``.
    affine : bool, default True
        Learn a per-channel scale ``gamma`` (init 1) and shift ``beta`` (init 0). False: no
        parameters; ``gamma``, ``beta``, ``dgamma`` and ``dbeta`` are None.
    track_running_stats : bool, default True
        Keep ``running_mean`` (init 0), ``running_var`` (init 1) and ``num_batches_tracked``
        (init 0) for eval mode. False: no running statistics, batch statistics in both modes.
    unbiased : bool, default True
        running_var receives the unbiased batch variance ``var * m / (m - 1)`` (the paper's
        inference rule, PyTorch, Chainer). False: the biased ``var`` (cs231n, Keras). The
        output is always normalized with the biased batch variance.
    axis : int, default 1
        The channel axis; -1 for channels-last.
    ghost_batch_size : int or None, default None
        k: in training mode, normalize each run of k consecutive samples along axis 0 (the
        last run may be shorter) with its own statistics, sharing gamma and beta (ghost batch
        normalization, Hoffer et al. 2017). The running statistics are updated once per ghost
        batch, in order, exactly as calling the layer on each ghost batch would. Eval mode
        ignores it. None: the whole batch. See docs/variants.md.
    frozen : bool, default False
        Normalize with the running statistics in every mode and never update them; gamma and
        beta still get gradients (backward is eval mode's). Needs track_running_stats=True.
        :func:`batchnorm.precise_bn` skips frozen layers unless they are named in ``layers``.
    group : group of workers, optional
        Synchronized BatchNorm (:mod:`batchnorm.distributed`): training mode normalizes with
        the statistics of every rank's part together and records them, with the whole group's
        count, bitwise the same on every rank; ``dgamma``/``dbeta`` are this rank's
        contributions. Eval mode never communicates. Not saved. None: this process alone.

    Attributes
    ----------
    gamma, beta : ndarray of shape (C,), float64, or None
    running_mean, running_var : ndarray of shape (C,), float64, or None
    num_batches_tracked : int or None
        Training forward passes that updated the running statistics.
    dgamma, dbeta : ndarray of shape (C,), float64, or None
        Set by :meth:`backward`.
    training : bool
        True after construction and :meth:`train`; False after :meth:`eval`.
    ghost_batch_size : int or None
    frozen : bool
        Set by :meth:`freeze`.

    Notes
    -----
    A training step that raises (wrong shape, one value per channel, non-float input, NaN or
    inf statistics) changes no state at all. Reference: S. Ioffe and C. Szegedy, "Batch
    Normalization", ICML 2015.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> layer = bn.BatchNorm(3)
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, size=(64, 3, 4, 4))
    >>> y = layer(x)                        # training mode: batch statistics
    >>> dx = layer.backward(np.ones_like(y))
    >>> layer.num_batches_tracked, layer.dgamma.shape
    (1, (3,))
    >>> y_eval = layer.eval()(x)            # eval mode: running statistics
    >>> ghost = bn.BatchNorm(3, ghost_batch_size=16)
    >>> _ = ghost(x); ghost.num_batches_tracked  # 64 samples: 4 ghost batches
    4
    """

    _format: ClassVar[str] = "batchnorm.BatchNorm/1"
    _synchronizable: ClassVar[bool] = True  # whether a group may be set (BatchRenorm: no)
    _config_keys: ClassVar[tuple[str, ...]] = _saved.CONFIG_KEYS

    @_validate.refuse_num_dims
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.9,
        *,
        affine: bool = True,
        track_running_stats: bool = True,
        unbiased: bool = True,
        axis: int = 1,
        ghost_batch_size: int | None = None,
        frozen: bool = False,
        group: _exchange.Group | None = None,
    ) -> None:
        self.num_features = _validate.num_features(num_features)
        self.eps = _validate.eps_value(eps)
        self.momentum = _validate.momentum_value(momentum)
        _alerts.pytorch_momentum(self.momentum)
        self.affine = _validate.flag(affine, "affine")
        self.track_running_stats = _validate.flag(track_running_stats, "track_running_stats")
        self.unbiased = _validate.flag(unbiased, "unbiased")
        self.axis = _validate.axis_value(axis)
        self.ghost_batch_size = _validate.ghost_batch_size(ghost_batch_size)
        self.frozen = False
        self.freeze(frozen)
        self.group: _exchange.Group | None = _validate.group_value(group)
        self._tag = _exchange.new_tag(self.group)  # names it in exchanges (dist.synchronize)
        if group is not None and ghost_batch_size is not None:
            _validate.no_group("ghost_batch_size")
        c = self.num_features
        self.gamma: NDArray[np.float64] | None = np.ones(c) if self.affine else None
        self.beta: NDArray[np.float64] | None = np.zeros(c) if self.affine else None
        tracking = self.track_running_stats
        self.running_mean: NDArray[np.float64] | None = np.zeros(c) if tracking else None
        self.running_var: NDArray[np.float64] | None = np.ones(c) if tracking else None
        self.num_batches_tracked: int | None = 0 if tracking else None
        self.dgamma: NDArray[np.float64] | None = None
        self.dbeta: NDArray[np.float64] | None = None
        self.training = True
        self._cache: BatchNormCache | None = None
        # The normalization batches of the last training forward, while the last is _cache.
        self._parts: tuple[Part, ...] = ()
        self._cache_group: _exchange.Group | None = None  # the group of the cached forward
        # Called with each checked training-mode cache: how precise_bn sees batch statistics.
        self._observers: list[Callable[[BatchNormCache], None]] = []

    # --- forward and backward ------------------------------------------------------------------

    def forward(self, x: ArrayLike) -> NDArray[np.floating[Any]]:
        """Normalize x (y has x's shape, dtype and layout); in training mode record statistics.

        Training mode (or ``track_running_stats=False``) normalizes with the batch statistics
        (each ghost batch's with ``ghost_batch_size``); training mode with tracking then updates
        ``running_mean``, ``running_var`` and ``num_batches_tracked``. Eval mode, and a frozen
        layer in every mode, normalizes with the running statistics. Bad input (TypeError,
        ValueError) and NaN or inf batch statistics (FloatingPointError) change nothing. A
        float16 output that overflows to inf where x is finite (a large gamma or beta: float16
        ends at 65504) gives a RuntimeWarning naming the channels, before any state changes."""
        if self.training and not self.frozen:
            return self._forward_train(x)
        # The kernel checks x; the layer adds only what the kernel cannot know.
        _validate.layer_channels(x, self.num_features, self.axis)
        if self.frozen or self.track_running_stats:
            if self.running_mean is None or self.running_var is None:  # frozen set by hand
                raise _validate.frozen_needs_running_stats()
            y, cache = forward_eval(x, self.gamma, self.beta, self.running_mean,
                                    self.running_var, eps=self.eps, axis=self.axis)  # fmt: skip
        else:  # eval mode, track_running_stats=False: this rank's batch statistics
            y, cache = forward_train(x, self.gamma, self.beta, eps=self.eps, axis=self.axis)
        _alerts.float16_overflow(x, y, self.axis, self.gamma, self.beta)
        self._cache, self._parts, self._cache_group = cache, (), None
        return y

    __call__ = forward

    def _forward_train(self, x: ArrayLike) -> NDArray[np.floating[Any]]:
        """Training mode: normalize each part, then record them all (all or nothing)."""
        if self.group is None:  # with a group, x is checked in the exchange every rank joins
            _validate.layer_channels(x, self.num_features, self.axis)
        pieces: list[Any] = [x]
        if self.ghost_batch_size is not None:
            if self.group is not None:
                _validate.no_group("ghost_batch_size")
            xa = _validate.layer_input(x, self.num_features, self.axis)
            bounds = _ghost.spans(xa.shape, self.axis, self.ghost_batch_size)
            pieces = [xa[lo:hi] for lo, hi in bounds]
        running = None
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            running = (self.running_mean, self.running_var, self.num_batches_tracked)
        outputs: list[NDArray[np.floating[Any]]] = []
        parts: list[Part] = []
        for piece in pieces:
            y, part = self._normalize(piece, running)
            _validate.finite_statistics(part.cache.mean, part.cache.var)
            if running is not None:
                if not parts:  # once: after the exchange a group's ranks join, before any write
                    _validate.running_buffers(
                        self.running_mean, self.running_var, self.num_features
                    )
                running = self._advance(running, part.cache)
            outputs.append(y)
            parts.append(part)
        y = outputs[0] if len(outputs) == 1 else _ghost.join(xa, outputs, bounds)
        # Before any write: under -W error the warning raises, and then nothing changed.
        _alerts.float16_overflow(x, y, self.axis, self.gamma, self.beta)
        for part in parts:
            for observe in self._observers:
                observe(part.cache)
        if running is not None:
            # Every value is computed before anything is written, and these writes cannot fail.
            assert self.running_mean is not None and self.running_var is not None
            np.copyto(self.running_mean, running[0])
            np.copyto(self.running_var, running[1])
            self.num_batches_tracked = running[2]
        self._cache, self._parts, self._cache_group = parts[-1].cache, tuple(parts), self.group
        return y

    def _normalize(
        self, x: ArrayLike, running: tuple[Any, Any, int] | None
    ) -> tuple[NDArray[np.floating[Any]], Part]:
        """One normalization batch with its own statistics (BatchRenorm also uses `running`)."""
        if self.group is not None:
            y, cache = _exchange.forward_train(
                x, self.gamma, self.beta, self.group, eps=self.eps, axis=self.axis,
                num_features=self.num_features, tag=self._tag,
            )  # fmt: skip
        else:
            y, cache = forward_train(x, self.gamma, self.beta, eps=self.eps, axis=self.axis)
        return y, Part(cache)

    def _advance(
        self, running: tuple[Any, Any, int], cache: BatchNormCache
    ) -> tuple[Any, Any, int]:
        """The running statistics after one more batch; nothing is written. momentum weights
        the old value; None: the cumulative average over `count` batches."""
        mean, var, tracked = running
        count = tracked + 1
        keep = 1.0 - 1.0 / count if self.momentum is None else self.momentum
        m = cache.count
        batch_var = cache.var * (m / (m - 1)) if self.unbiased else cache.var
        new_mean = keep * mean + (1.0 - keep) * cache.mean
        new_var = keep * var + (1.0 - keep) * batch_var
        return new_mean, new_var, count

    def backward(self, dy: ArrayLike) -> NDArray[np.floating[Any]]:
        """Gradient with respect to the last forward's input; sets ``dgamma`` and ``dbeta``.

        Through the batch statistics after a training forward (each ghost batch's own, dgamma
        and dbeta summed); after an eval or frozen forward ``dx = dy * gamma / sqrt(var +
        eps)``. May be called more than once. RuntimeError before any forward (on every rank of
        a group); ValueError for a dy without the last input's shape."""
        if self._cache is None:  # with a group, the other ranks wait in an exchange: report it
            if self.group is not None and self.training:
                _exchange.fail(self.group, _validate.backward_before_forward(), "backward")
            raise _validate.backward_before_forward()
        parts = self._parts
        if not parts or parts[-1].cache is not self._cache:
            parts = (Part(self._cache),)
        if len(parts) == 1:
            dx, dgamma, dbeta = self._backward_part(dy, parts[0])
        else:
            dx, dgamma, dbeta = _ghost.backward(dy, parts, self._backward_part)
        self.dgamma, self.dbeta = dgamma, dbeta
        return dx

    def _backward_part(self, dy: ArrayLike, part: Part) -> _ghost.Gradients:
        if self._cache_group is not None:  # the group of a synchronized training forward
            return _exchange.backward(dy, part.cache, self._cache_group, self._tag)
        return backward(dy, part.cache)

    # --- mode ----------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> BatchNorm:
        """Set training mode (``mode=False``: eval mode) and return the layer."""
        self.training = _validate.flag(mode, "mode")
        return self

    def eval(self) -> BatchNorm:
        """Set eval mode (normalize with running statistics) and return the layer."""
        return self.train(False)

    def freeze(self, frozen: bool = True) -> BatchNorm:
        """Freeze the layer (``frozen=False``: unfreeze it) and return it.

        A frozen layer normalizes with its running statistics in every mode and never updates
        them; gamma and beta still get gradients from :meth:`backward` (eval mode's backward).
        detectron2's ``FrozenBatchNorm2d`` is a frozen layer whose dgamma and dbeta are ignored.

        A layer with ``track_running_stats=False`` has no statistics to freeze: ValueError.

        Examples
        --------
        >>> import numpy as np, batchnorm as bn
        >>> layer = bn.BatchNorm(2).freeze()
        >>> y = layer(np.random.default_rng(0).normal(size=(8, 2)))   # training mode
        >>> layer.num_batches_tracked, layer.running_mean
        (0, array([0., 0.]))
        """
        frozen = _validate.flag(frozen, "frozen")
        if frozen and not self.track_running_stats:
            raise _validate.frozen_needs_running_stats()
        self.frozen = frozen
        return self

    # --- state ---------------------------------------------------------------------------------

    def reset_running_stats(self) -> None:
        """Set ``running_mean`` to 0, ``running_var`` to 1 and ``num_batches_tracked`` to 0, in
        place, as PyTorch's ``reset_running_stats`` (nothing with track_running_stats=False)."""
        if self.running_mean is not None and self.running_var is not None:
            self.running_mean.fill(0.0)
            self.running_var.fill(1.0)
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Reset the running statistics and set ``gamma`` to 1 and ``beta`` to 0, in place, as
        PyTorch's ``reset_parameters`` (mode, hyperparameters and last gradients are kept).

        Examples
        --------
        >>> import numpy as np, batchnorm as bn
        >>> layer = bn.BatchNorm(2)
        >>> _ = layer(np.array([[0.0, 1.0], [4.0, 5.0]]))
        >>> layer.num_batches_tracked
        1
        >>> layer.reset_parameters()
        >>> layer.running_mean, layer.running_var, layer.num_batches_tracked
        (array([0., 0.]), array([1., 1.]), 0)
        """
        self.reset_running_stats()
        if self.gamma is not None and self.beta is not None:
            self.gamma.fill(1.0)
            self.beta.fill(0.0)

    def state_dict(self) -> dict[str, NDArray[Any]]:
        """Copies of the parameters and buffers under PyTorch's keys.

        ``weight`` (gamma), ``bias`` (beta), ``running_mean``, ``running_var`` (float64, shape
        (C,)) and ``num_batches_tracked`` (0-d int64), each present only when the layer has it.
        """
        return _saved.state_dict(self)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> LoadResult:
        """Load parameters and buffers from a mapping with PyTorch's keys.

        A PyTorch BatchNorm's state converted to NumPy arrays loads as it is::

            layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})

        Every entry is checked (keys; shapes (C,); real dtype; finite; running_var >= 0;
        num_batches_tracked a non-negative int) before anything is loaded: on any error the
        layer is unchanged. ``strict=True`` loads exactly this layer's keys or raises
        ValueError. ``strict=False`` loads the matching keys and returns the others, as
        PyTorch does; when no key matches (an empty state included) it loads nothing and
        warns (UserWarning). A whole model's state (keys such as ``bn1.running_mean``) is
        refused (a warning with ``strict=False``) with the prefixes found; strip one::

            layer.load_state_dict({k.removeprefix("bn1."): v for k, v in state.items()
                                   if k.startswith("bn1.")})

        Returns
        -------
        LoadResult
            A named tuple ``(missing_keys, unexpected_keys)``: this layer's keys absent from
            state, and the keys of state this layer does not have (both empty when strict).

        Examples
        --------
        >>> import warnings, batchnorm as bn
        >>> layer = bn.BatchNorm(3)
        >>> layer.load_state_dict(bn.BatchNorm(3).state_dict())
        LoadResult(missing_keys=[], unexpected_keys=[])
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")      # "loaded nothing"
        ...     layer.load_state_dict({}, strict=False).missing_keys
        ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
        """
        return _saved.load_state_dict(self, state, strict)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the hyperparameters, mode and state to an ``.npz`` file; return its path.

        NumPy appends ``.npz`` when the name has no such suffix. No pickled objects are written
        (:meth:`load` reads with ``allow_pickle=False``); a synchronized layer's group is not."""
        return _saved.save(self, path, self._format, self._extra_entries())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BatchNorm:
        """Read a layer written by :meth:`save` (of this class; BatchRenorm has its own).

        `path` is the name given to :meth:`save` or the path it returned: ``load("bn1")``
        reads ``bn1.npz`` when there is no file ``bn1``. FileNotFoundError for no such file;
        ValueError for a file of another class (naming the loader that reads it) and for one
        that is truncated, malformed, holds pickled objects, unknown or repeated entries, or
        values that fail :meth:`load_state_dict`'s checks (never executed)."""
        layer = _saved.load(path, cls._format, cls._config_keys, cls._from_config)
        assert isinstance(layer, cls)
        return layer

    def _extra_entries(self) -> dict[str, Any]:
        """Configuration a subclass saves besides BatchNorm's."""
        return {}

    @classmethod
    def _from_config(cls, entry: Callable[..., Any], *args: Any, **config: Any) -> BatchNorm:
        """A new layer from the saved configuration (subclasses read their own entries with
        ``entry(key, kinds)``, or ``entry(key, kinds, default)`` for one older files lack)."""
        return cls(*args, **config)

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, eps={self.eps:g}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"unbiased={self.unbiased}, axis={self.axis}, ghost_batch_size="
            f"{self.ghost_batch_size}, frozen={self.frozen}, "
            f"mode={'train' if self.training else 'eval'}"
            + ("" if self.group is None else f", group={self.group!r}")
            + ")"
        )
