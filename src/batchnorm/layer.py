"""The stateful BatchNorm layer: parameters, running statistics, train/eval mode, saved state.

All arithmetic on activations is done by :mod:`batchnorm.functional`; this module only keeps
state and decides which kernel to call.
"""

from __future__ import annotations

import functools
import math
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, ParamSpec

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _exchange, _validate
from batchnorm.functional import BatchNormCache, backward, forward_eval, forward_train

__all__ = ["BatchNorm", "LoadResult"]

_FORMAT = "batchnorm.BatchNorm/1"
# A saved layer holds a few (C,) vectors; a member declaring more bytes than this (16M float64
# channels) is not one of our files, and is refused before anything is allocated for it.
_MAX_MEMBER_BYTES = 1 << 27


_P = ParamSpec("_P")


def _refuse_num_dims(init: Callable[_P, None]) -> Callable[_P, None]:
    """Check the positional eps of ``__init__(self, num_features, eps, ...)``.

    Only a positional int >= 1 is refused (d2l's ``BatchNorm(num_features, num_dims)``): an
    explicit ``eps=4`` by keyword means what it says.
    """

    @functools.wraps(init)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> None:
        if len(args) > 2:
            _validate.positional_eps(args[2])
        init(*args, **kwargs)

    return checked


class LoadResult(NamedTuple):
    """Keys of a non-strict :meth:`BatchNorm.load_state_dict` that were not both present."""

    missing_keys: list[str]
    unexpected_keys: list[str]


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
        1e-3). An int >= 1 given positionally is a TypeError: ``BatchNorm(6, 4)`` is d2l's
        ``BatchNorm(num_features, num_dims)``, and no num_dims is needed here (a float such as
        ``BatchNorm(6, 1e-3)`` is fine, and so is an int by keyword, ``eps=4``).
    momentum : float in [0, 1] or None, default 0.9
        The weight of the OLD running value::

            running = momentum * running + (1 - momentum) * batch_statistic

        as in the original paper's code, cs231n, d2l and Keras. PyTorch's ``momentum`` is the
        weight of the new value: PyTorch's 0.1 is 0.9 here. None keeps the cumulative average
        of all batches seen (running = running + (batch - running) / num_batches_tracked), as
        PyTorch's ``momentum=None``.
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
    group : group of workers, optional
        Synchronized BatchNorm (see :mod:`batchnorm.distributed`): in training mode the batch
        statistics are those of every rank's part together (one allgather per forward and one
        per backward), the running statistics are recorded from them with the whole group's
        count m, bitwise the same on every rank, and ``dgamma``/``dbeta`` are this rank's
        contributions (sum them over the ranks, as for any weight). Eval mode never
        communicates. The group is not saved with the layer. None: this process alone.

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
    """

    @_refuse_num_dims
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
        group: _exchange.Group | None = None,
    ) -> None:
        self.num_features = _validate.num_features(num_features)
        self.eps = _validate.eps_value(eps)
        self.momentum = _validate.momentum_value(momentum)
        self.affine = _validate.flag(affine, "affine")
        self.track_running_stats = _validate.flag(track_running_stats, "track_running_stats")
        self.unbiased = _validate.flag(unbiased, "unbiased")
        self.axis = _validate.axis_value(axis)
        self.group: _exchange.Group | None = _validate.group_value(group)
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
        self._cache_group: _exchange.Group | None = None  # the group of the cached forward
        # Called with the cache of every training-mode forward, after its statistics passed the
        # finiteness check: how precise_bn sees each call's batch statistics.
        self._observers: list[Callable[[BatchNormCache], None]] = []

    # --- forward and backward ------------------------------------------------------------------

    def forward(self, x: ArrayLike) -> NDArray[np.floating[Any]]:
        """Normalize x; in training mode also record its statistics.

        Training mode (or ``track_running_stats=False``) normalizes with the batch statistics;
        training mode with tracking then updates ``running_mean``, ``running_var`` and
        ``num_batches_tracked``. Eval mode normalizes with the running statistics.

        Returns y with the shape and dtype of x.

        Raises
        ------
        TypeError, ValueError
            Bad input (see :func:`batchnorm.forward_train`); nothing changes.
        FloatingPointError
            In training mode, when a channel's batch mean or variance is NaN or inf; names the
            channels; nothing changes.
        """
        group = self.group if self.training else None
        use_batch_stats = self.training or not self.track_running_stats
        if group is not None:  # x is checked inside the exchange, which every rank joins
            y, cache = _exchange.forward_train(
                x, self.gamma, self.beta, group, eps=self.eps, axis=self.axis,
                num_features=self.num_features,
            )  # fmt: skip
        else:  # the kernel checks x; the layer adds only what the kernel cannot know
            _validate.layer_channels(x, self.num_features, self.axis)
            if use_batch_stats:
                y, cache = forward_train(x, self.gamma, self.beta, eps=self.eps, axis=self.axis)
        if use_batch_stats:
            if self.training:
                _validate.finite_statistics(cache.mean, cache.var)
                for observe in self._observers:
                    observe(cache)
                if self.track_running_stats:
                    self._record(cache)
        else:
            assert self.running_mean is not None and self.running_var is not None
            y, cache = forward_eval(
                x,
                self.gamma,
                self.beta,
                self.running_mean,
                self.running_var,
                eps=self.eps,
                axis=self.axis,
            )
        self._cache, self._cache_group = cache, group
        return y

    __call__ = forward

    def _record(self, cache: BatchNormCache) -> None:
        """Fold one batch's statistics into the running statistics (all or nothing)."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        count = self.num_batches_tracked + 1
        # momentum weights the old value; None: the cumulative average over `count` batches.
        keep = 1.0 - 1.0 / count if self.momentum is None else self.momentum
        m = cache.count
        batch_var = cache.var * (m / (m - 1)) if self.unbiased else cache.var
        new_mean = keep * self.running_mean + (1.0 - keep) * cache.mean
        new_var = keep * self.running_var + (1.0 - keep) * batch_var
        # Every value is computed before anything is written, and these writes cannot fail.
        np.copyto(self.running_mean, new_mean)
        np.copyto(self.running_var, new_var)
        self.num_batches_tracked = count

    def backward(self, dy: ArrayLike) -> NDArray[np.floating[Any]]:
        """Gradient with respect to the last forward's input; sets ``dgamma`` and ``dbeta``.

        Works after a training-mode forward (gradients through the batch statistics) and after
        an eval-mode forward (statistics are constants: ``dx = dy * gamma / sqrt(var + eps)``),
        for fine-tuning with frozen BatchNorm. May be called more than once per forward.

        Raises
        ------
        RuntimeError
            No forward pass has been run.
        ValueError
            dy does not have the shape of the last forward's input.
        """
        if self._cache is None:
            raise _validate.backward_before_forward()
        if self._cache_group is not None:
            dx, dgamma, dbeta = _exchange.backward(dy, self._cache, self._cache_group)
        else:
            dx, dgamma, dbeta = backward(dy, self._cache)
        self.dgamma, self.dbeta = dgamma, dbeta
        return dx

    # --- mode ----------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> BatchNorm:
        """Set training mode (``mode=False``: eval mode) and return the layer."""
        self.training = _validate.flag(mode, "mode")
        return self

    def eval(self) -> BatchNorm:
        """Set eval mode (normalize with running statistics) and return the layer."""
        return self.train(False)

    # --- state ---------------------------------------------------------------------------------

    def reset_running_stats(self) -> None:
        """Set ``running_mean`` to 0, ``running_var`` to 1 and ``num_batches_tracked`` to 0.

        The values of a fresh layer, written in place (arrays held elsewhere see the reset), as
        PyTorch's ``reset_running_stats``. A layer with ``track_running_stats=False`` has no
        running statistics: nothing happens.
        """
        if self.running_mean is None or self.running_var is None:
            return
        self.running_mean.fill(0.0)
        self.running_var.fill(1.0)
        self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Reset the running statistics and set ``gamma`` to 1 and ``beta`` to 0, in place.

        As PyTorch's ``reset_parameters``: the layer's state is that of a fresh one (mode,
        hyperparameters and the last gradients are kept).

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

    def _state_keys(self) -> tuple[str, ...]:
        affine = ("weight", "bias") if self.affine else ()
        tracked = (
            ("running_mean", "running_var", "num_batches_tracked")
            if self.track_running_stats
            else ()
        )
        return affine + tracked

    def state_dict(self) -> dict[str, NDArray[Any]]:
        """Copies of the parameters and buffers under PyTorch's keys.

        ``weight`` (gamma), ``bias`` (beta), ``running_mean``, ``running_var`` (float64, shape
        (C,)) and ``num_batches_tracked`` (0-d int64), each present only when the layer has it.
        """
        values: dict[str, Any] = {
            "weight": self.gamma,
            "bias": self.beta,
            "running_mean": self.running_mean,
            "running_var": self.running_var,
            "num_batches_tracked": self.num_batches_tracked,
        }
        return {key: np.array(values[key], dtype=_dtype_of(key)) for key in self._state_keys()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> LoadResult:
        """Load parameters and buffers from a mapping with PyTorch's keys.

        A PyTorch BatchNorm's state converted to NumPy arrays loads as it is::

            layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})

        Every entry is checked (keys; shapes (C,); real dtype; finite; running_var >= 0;
        num_batches_tracked a non-negative int) before anything is loaded: on any error the
        layer is unchanged. ``strict=False`` loads the matching keys and reports the rest; a
        state of which no key matches is an error in both modes (nothing would be loaded).

        A whole model's state (keys such as ``bn1.running_mean``) is refused with the prefixes
        found; select one layer's entries and strip its prefix::

            layer.load_state_dict(
                {k.removeprefix("bn1."): v for k, v in state.items() if k.startswith("bn1.")}
            )
        """
        expected = self._state_keys()
        _validate.state_keys(state, expected, strict)
        checked: dict[str, Any] = {}
        for key in expected:
            if key not in state:
                continue
            if key == "num_batches_tracked":
                checked[key] = _validate.state_counter(state[key])
            else:
                checked[key] = _validate.state_vector(state[key], key, self.num_features)
        # Everything is valid: now load it all.
        targets = {
            "weight": self.gamma,
            "bias": self.beta,
            "running_mean": self.running_mean,
            "running_var": self.running_var,
        }
        for key, value in checked.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                target = targets[key]
                assert target is not None
                np.copyto(target, value)
        return LoadResult(
            missing_keys=[k for k in expected if k not in state],
            unexpected_keys=sorted(str(k) for k in state if k not in expected),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the hyperparameters, mode and state to an ``.npz`` file; return its path.

        NumPy appends ``.npz`` when the name has no such suffix. No pickled objects are written,
        so :meth:`load` can read the file with ``allow_pickle=False``.
        """
        target = Path(path)
        if target.suffix != ".npz":
            target = target.with_name(target.name + ".npz")
        entries: dict[str, Any] = {
            "format": np.array(_FORMAT),
            "config_num_features": np.array(self.num_features),
            "config_eps": np.array(self.eps),
            "config_momentum": np.array(np.nan if self.momentum is None else self.momentum),
            "config_affine": np.array(self.affine),
            "config_track_running_stats": np.array(self.track_running_stats),
            "config_unbiased": np.array(self.unbiased),
            "config_axis": np.array(self.axis),
            "config_training": np.array(self.training),
        }
        entries.update(self.state_dict())
        np.savez(target, **entries)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BatchNorm:
        """Read a layer written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            No such file.
        ValueError
            The file is truncated, malformed, holds pickled objects or values that fail the
            checks of :meth:`load_state_dict`; no code from the file is ever executed.
        """
        arrays = _read_npz(path)
        if arrays.get("format") is None or str(arrays["format"]) != _FORMAT:
            raise _validate.saved_file(path, f"its 'format' entry is not {_FORMAT!r}")
        try:
            # Each entry must have the dtype kind save() writes: a file is refused, never
            # reinterpreted (a string eps, a bool axis).
            entry = functools.partial(_validate.saved_scalar, arrays)
            momentum = float(entry("config_momentum", "f"))
            num_features = int(entry("config_num_features", "iu"))
            for key in _validate.STATE_KEYS[:4]:
                # Check the width against the saved vectors before allocating any state.
                if key in arrays:
                    _validate.saved_width(key, arrays[key].shape, num_features)
            layer = cls(
                num_features,
                eps=float(entry("config_eps", "f")),
                momentum=None if math.isnan(momentum) else momentum,
                affine=bool(entry("config_affine", "b")),
                track_running_stats=bool(entry("config_track_running_stats", "b")),
                unbiased=bool(entry("config_unbiased", "b")),
                axis=int(entry("config_axis", "iu")),
            )
            state = {k: v for k, v in arrays.items() if k in _validate.STATE_KEYS}
            layer.load_state_dict(state, strict=True)
            layer.train(bool(entry("config_training", "b")))
        except (KeyError, TypeError, ValueError) as err:
            raise _validate.saved_file(path, str(err)) from err
        return layer

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, eps={self.eps:g}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"unbiased={self.unbiased}, axis={self.axis}, "
            f"mode={'train' if self.training else 'eval'}"
            + ("" if self.group is None else f", group={self.group!r}")
            + ")"
        )


def _dtype_of(key: str) -> type[np.generic]:
    return np.int64 if key == "num_batches_tracked" else np.float64


def _read_npz(path: str | os.PathLike[str]) -> dict[str, NDArray[Any]]:
    """Read every array of an .npz file, checking each header before reading its data."""
    arrays: dict[str, NDArray[Any]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"unexpected member {info.filename!r}")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(member)
                if dtype.hasobject:
                    raise ValueError(f"{info.filename!r} holds Python objects")
                if math.prod(shape) * dtype.itemsize > _MAX_MEMBER_BYTES:
                    raise ValueError(
                        f"{info.filename!r} declares a {dtype} array of shape {shape}, "
                        "far larger than any saved layer"
                    )
                with archive.open(info) as member:
                    arrays[info.filename[:-4]] = np.lib.format.read_array(
                        member, allow_pickle=False
                    )
    except FileNotFoundError:
        raise
    except Exception as err:
        # A damaged archive fails in many ways besides BadZipFile (an unknown compression
        # method, the encryption flag, a zlib error, ...); whatever the way, the file is not
        # one BatchNorm.save wrote.
        raise _validate.saved_file(path, f"{type(err).__name__}: {err}") from err
    return arrays
