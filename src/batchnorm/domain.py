"""Domain-specific BatchNorm: one set of statistics per domain, composed of BatchNorm layers.

When training data come from several domains (datasets, cameras, synthetic and real), a batch
drawn from one domain has statistics of its own. Domain-specific BatchNorm (Chang et al.,
"Domain-Specific Batch Normalization for Unsupervised Domain Adaptation", CVPR 2019) keeps one
set of running statistics per domain, and optionally one gamma and beta per domain; Wu and
Johnson ("Rethinking 'Batch' in BatchNorm", 2021, section 5) find that what matters is to use
the statistics of the same domain in training and at test time.

:class:`DomainBatchNorm` holds one :class:`~batchnorm.BatchNorm` per domain in ``domains`` and
sends each batch to the layer of its domain; with ``shared_affine=True`` the layers share one
gamma and one beta array. Everything that works on BatchNorm layers (precise_bn, synchronize,
freeze_all, model_state_dict) sees the per-domain layers, named ``domains.0``, ``domains.1``...
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchnorm import _model, _saved, _validate
from batchnorm.layer import BatchNorm, LoadResult

__all__ = ["DomainBatchNorm"]

_FORMAT = "batchnorm.DomainBatchNorm/1"
_CONFIG = ("num_features", "eps", "momentum", "affine", "track_running_stats", "unbiased",
           "axis", "ghost_batch_size", "frozen")  # fmt: skip


def _shared(name: str) -> Any:
    """A hyperparameter of every domain's layer (read from domain 0's)."""
    return property(lambda self: getattr(self.domains[0], name), doc=f"Every domain's {name}.")


class DomainBatchNorm:
    """BatchNorm with one set of running statistics per domain: ``layer(x, domain=d)``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    num_domains : int
        D, the number of domains; a batch's domain is an int in ``range(D)``.
    shared_affine : bool, default True
        One gamma and one beta for every domain (arrays of shape (C,)). False: one per domain,
        ``gamma`` and ``beta`` of shape (D, C), as in DSBN.
    **options
        Any keyword of :class:`~batchnorm.BatchNorm` (``eps=1e-5``, ``momentum=0.9``, the
        weight of the OLD running value; ``affine``, ``track_running_stats``, ``unbiased``,
        ``axis``, ``ghost_batch_size``, ``frozen``, ``group``), the same for every domain.

    Attributes
    ----------
    domains : list of BatchNorm
        ``domains[d]`` normalizes the batches of domain d and keeps its running statistics.
    gamma, beta : ndarray, float64, or None
        Shape (C,) when shared, (D, C) when not (row d is ``domains[d].gamma``, the same
        memory); None without affine. Update them in place.
    dgamma, dbeta : ndarray or None
        Set by :meth:`backward`, shaped as gamma and beta; not shared, only row d (the
        domain of the last forward) is non-zero.
    running_mean, running_var : ndarray of shape (D, C)
        Copies of every domain's running statistics.

    Notes
    -----
    The statistics of domain d are exactly those of a separate BatchNorm fed only the batches
    of domain d: y, dx, running statistics and counters are computed by ``domains[d]`` itself.
    A bad domain (not an int: TypeError; out of range: ValueError) is refused before anything
    is touched. :func:`batchnorm.precise_bn` recomputes domain d with the batches of domain d
    and ``layers=[layer.domains[d]]``. State dict keys are ``domains.{d}.{PyTorch key}``; with
    a shared affine every domain's ``weight`` and ``bias`` are the same array.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> layer = bn.DomainBatchNorm(3, num_domains=2)
    >>> rng = np.random.default_rng(0)
    >>> y0 = layer(rng.normal(0.0, 1.0, size=(16, 3)), domain=0)
    >>> y1 = layer(rng.normal(5.0, 2.0, size=(16, 3)), domain=1)
    >>> dx = layer.backward(np.ones_like(y1))            # through domain 1's statistics
    >>> layer.running_mean.shape, [d.num_batches_tracked for d in layer.domains]
    ((2, 3), [1, 1])
    >>> layer.domains[0].gamma is layer.domains[1].gamma  # shared_affine=True
    True
    """

    def __init__(
        self, num_features: int, num_domains: int, shared_affine: bool = True, **options: Any
    ) -> None:
        self.num_domains = _validate.num_domains(num_domains)
        self.shared_affine = _validate.flag(shared_affine, "shared_affine")
        self.domains = [BatchNorm(num_features, **options) for _ in range(self.num_domains)]
        first = self.domains[0]
        self.gamma: NDArray[np.float64] | None = None
        self.beta: NDArray[np.float64] | None = None
        if first.gamma is not None and first.beta is not None:
            if self.shared_affine:
                self.gamma, self.beta = first.gamma, first.beta
            else:
                self.gamma = np.ones((self.num_domains, first.num_features))
                self.beta = np.zeros((self.num_domains, first.num_features))
            for d, layer in enumerate(self.domains):  # one memory: in-place updates reach all
                layer.gamma = self.gamma if self.shared_affine else self.gamma[d]
                layer.beta = self.beta if self.shared_affine else self.beta[d]
        self.dgamma: NDArray[np.float64] | None = None
        self.dbeta: NDArray[np.float64] | None = None
        self._last: int | None = None  # the domain of the last forward (an index, not a layer)

    num_features = _shared("num_features")
    eps = _shared("eps")
    momentum = _shared("momentum")
    affine = _shared("affine")
    track_running_stats = _shared("track_running_stats")
    unbiased = _shared("unbiased")
    axis = _shared("axis")
    ghost_batch_size = _shared("ghost_batch_size")
    frozen = _shared("frozen")

    # --- forward and backward ------------------------------------------------------------------

    def forward(self, x: ArrayLike, domain: int | None = None) -> NDArray[np.floating[Any]]:
        """Normalize a batch of domain `domain` with that domain's layer (see BatchNorm.forward).

        Training mode records the batch in that domain's running statistics only; eval mode
        uses them. A bad domain is refused before anything is touched."""
        d = _validate.domain_index(domain, self.num_domains)
        y = self.domains[d](x)
        self._last = d
        return y

    __call__ = forward

    def backward(self, dy: ArrayLike) -> NDArray[np.floating[Any]]:
        """Gradient with respect to the last forward's input; sets ``dgamma`` and ``dbeta``."""
        layer = self.domains[0 if self._last is None else self._last]
        dx = layer.backward(dy)  # before any forward: the layer's own RuntimeError
        assert self._last is not None
        self.dgamma, self.dbeta = self._spread(layer.dgamma), self._spread(layer.dbeta)
        return dx

    def _spread(self, grad: NDArray[np.float64] | None) -> NDArray[np.float64] | None:
        """A domain layer's gradient, shaped as this layer's parameter."""
        if grad is None or self.shared_affine:
            return grad
        assert self._last is not None
        full = np.zeros((self.num_domains, len(grad)))
        full[self._last] = grad
        return full

    # --- mode ----------------------------------------------------------------------------------

    @property
    def training(self) -> bool:
        return self.domains[0].training

    def train(self, mode: bool = True) -> DomainBatchNorm:
        """Set training mode on every domain (``mode=False``: eval mode); return the layer."""
        mode = _validate.flag(mode, "mode")
        for layer in self.domains:
            layer.train(mode)
        return self

    def eval(self) -> DomainBatchNorm:
        """Set eval mode on every domain; return the layer."""
        return self.train(False)

    def freeze(self, frozen: bool = True) -> DomainBatchNorm:
        """Freeze (or unfreeze) every domain's statistics; return the layer."""
        frozen = _validate.flag(frozen, "frozen")
        if frozen and not self.domains[0].track_running_stats:
            self.domains[0].freeze(frozen)  # its error: nothing to freeze
        for layer in self.domains:
            layer.freeze(frozen)
        return self

    @property
    def running_mean(self) -> NDArray[np.float64] | None:
        return self._stacked("running_mean")

    @property
    def running_var(self) -> NDArray[np.float64] | None:
        return self._stacked("running_var")

    def _stacked(self, name: str) -> NDArray[np.float64] | None:
        values = [getattr(layer, name) for layer in self.domains]
        return None if values[0] is None else np.stack(values)

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, NDArray[Any]]:
        """Every domain's state under ``domains.{d}.`` and PyTorch's keys (copies)."""
        return _model.model_state_dict(self)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> LoadResult:
        """Load every domain from keys ``domains.{d}.{key}``; all or nothing.

        With a shared affine, every domain's ``weight`` (and ``bias``) in `state` must be equal:
        they are one array here."""
        if self.shared_affine and hasattr(state, "keys"):
            for key in ("weight", "bias"):
                given = [(d, state[f"domains.{d}.{key}"]) for d in range(self.num_domains)
                         if f"domains.{d}.{key}" in state]  # fmt: skip
                differ = [d for d, v in given if not np.array_equal(v, given[0][1])]
                if differ:
                    raise _validate.shared_affine_differs(key, [given[0][0], *differ])
        return _model.load_model_state_dict(self, state, strict)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write hyperparameters, mode and every domain's state to an ``.npz`` file (no pickle)."""
        target = _saved.npz_path(path)
        first = self.domains[0]
        entries: dict[str, Any] = {
            "format": np.array(_FORMAT),
            "config_num_domains": np.array(self.num_domains),
            "config_shared_affine": np.array(self.shared_affine),
            "config_training": np.array(self.training),
        }
        for name in _CONFIG:
            value = getattr(first, name)
            if value is None:  # momentum=None and ghost_batch_size=None, as BatchNorm.save
                value = np.nan if name == "momentum" else 0
            entries[f"config_{name}"] = np.array(value)
        entries.update(self.state_dict())
        np.savez(target, **entries)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DomainBatchNorm:
        """Read a layer written by :meth:`save` (checked as :meth:`BatchNorm.load` checks)."""
        path = _saved._existing(path)
        arrays = _saved._read_npz(path)
        if arrays.get("format") is None or str(arrays["format"]) != _FORMAT:
            raise _validate.saved_domain_file(path, f"its 'format' entry is not {_FORMAT!r}")
        try:
            entry = functools.partial(_validate.saved_scalar, arrays)
            count = _validate.num_domains(int(entry("config_num_domains", "iu")))
            num_features = int(entry("config_num_features", "iu"))
            config = ["config_num_domains", "config_shared_affine", "config_training"]
            config += [f"config_{name}" for name in _CONFIG]
            state_keys = [f"domains.{d}.{k}" for d in range(count) for k in _validate.STATE_KEYS]
            unknown = sorted(set(arrays) - {"format", *config, *state_keys})
            if unknown:
                raise ValueError(f"it holds unknown entries {unknown}")
            for key in state_keys:  # the width, before any state is allocated
                if not key.endswith("num_batches_tracked") and key in arrays:
                    _validate.saved_width(key, arrays[key].shape, num_features)
            shared = bool(entry("config_shared_affine", "b"))
            layer = cls(num_features, count, shared_affine=shared, **_saved.options(arrays))
            layer.load_state_dict({k: arrays[k] for k in state_keys if k in arrays})
            layer.train(bool(entry("config_training", "b")))
        except (KeyError, TypeError, ValueError) as err:
            raise _validate.saved_domain_file(path, str(err)) from err
        return layer

    def __repr__(self) -> str:
        inner = repr(self.domains[0]).removeprefix("BatchNorm(")
        return f"DomainBatchNorm(num_domains={self.num_domains}, shared_affine=" + (
            f"{self.shared_affine}, {inner}"
        )
