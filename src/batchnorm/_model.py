"""A model's BatchNorm layers as a whole: their names, one state dict, freezing them all.

The layers are found by the walk of precise_bn (attributes, lists, tuples, dicts; each layer
once) and named as PyTorch names submodules: attribute names, list indices and dict keys joined
by dots (``block.bn1``, ``layers.2``); a model that is itself a BatchNorm has the name ``""``.
State dict keys are a layer's name, a dot and PyTorch's key (``block.bn1.running_mean``), as
``torch.nn.Module.state_dict()`` writes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from numpy.typing import NDArray

from batchnorm import _validate, _walk
from batchnorm.layer import BatchNorm, LoadResult

__all__ = ["batchnorms", "freeze_all", "load_model_state_dict", "model_state_dict"]


def batchnorms(model: Any) -> list[tuple[str, BatchNorm]]:
    """Every BatchNorm reachable from `model`, with its PyTorch-style name, depth first.

    Parameters
    ----------
    model : object
        Any object: its attributes (``__slots__`` too), lists, tuples and dicts are walked (each
        object once, cycles are safe), as :func:`batchnorm.precise_bn` and
        :func:`batchnorm.distributed.synchronize` walk it. Frozen layers and layers without
        running statistics are included.

    Returns
    -------
    list of (name, layer)
        Names join attribute names, list or tuple indices and dict keys with dots, as
        PyTorch's ``named_modules()``: ``"block.bn1"``, ``"layers.2"``; ``""`` for a model
        that is a BatchNorm itself. A :class:`batchnorm.DomainBatchNorm` appears as one layer
        per domain (``"norm.domains.0"``, ...).

    Raises
    ------
    ValueError
        Two layers would get the same name (dict keys with dots, or keys 1 and "1").

    Examples
    --------
    >>> import batchnorm as bn
    >>> class Block:
    ...     def __init__(self):
    ...         self.bn1, self.layers = bn.BatchNorm(4), [None, bn.BatchNorm(8)]
    >>> [name for name, _ in bn.batchnorms({"block": Block()})]
    ['block.bn1', 'block.layers.1']
    """
    named: list[tuple[str, BatchNorm]] = []
    seen: set[str] = set()
    for steps, layer in _walk.walk(model):
        name = ".".join(str(value) for _, value in steps)
        if name in seen:
            raise _validate.model_name_clash(name)
        seen.add(name)
        named.append((name, layer))
    return named


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def model_state_dict(model: Any) -> dict[str, NDArray[Any]]:
    """The state of every BatchNorm of `model` in one dict, under PyTorch's prefixed keys.

    Each layer's :meth:`~batchnorm.BatchNorm.state_dict` (copies of ``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``, those the layer has) with its
    name from :func:`batchnorms` in front: ``"block.bn1.running_mean"``. Only BatchNorm state:
    the model's other weights are not included.

    Examples
    --------
    >>> import batchnorm as bn
    >>> model = {"bn1": bn.BatchNorm(2), "head": [bn.BatchNorm(3, affine=False)]}
    >>> list(bn.model_state_dict(model))        # doctest: +NORMALIZE_WHITESPACE
    ['bn1.weight', 'bn1.bias', 'bn1.running_mean', 'bn1.running_var',
     'bn1.num_batches_tracked', 'head.0.running_mean', 'head.0.running_var',
     'head.0.num_batches_tracked']
    """
    state: dict[str, NDArray[Any]] = {}
    for name, layer in batchnorms(model):
        state.update({_prefix(name) + key: v for key, v in layer.state_dict().items()})
    return state


def load_model_state_dict(model: Any, state: Mapping[str, Any], strict: bool = True) -> LoadResult:
    """Load every BatchNorm of `model` from one dict with prefixed keys; all or nothing.

    Parameters
    ----------
    model : object
        Walked as by :func:`batchnorms`.
    state : mapping
        Keys as :func:`model_state_dict` writes them (a PyTorch model's ``state_dict()`` converted
        to NumPy arrays matches for its BatchNorm modules; its other weights are reported as
        unexpected keys, so load it with ``strict=False``).
    strict : bool, default True
        True: the keys must be exactly this model's BatchNorm keys. False: load the matching
        keys and return the others.

    Returns
    -------
    LoadResult
        ``missing_keys`` (this model's keys absent from `state`) and ``unexpected_keys``.

    Raises
    ------
    TypeError, ValueError
        State that is not a mapping; keys that do not match (strict); a value that a layer's
        :meth:`~batchnorm.BatchNorm.load_state_dict` refuses (the error names the layer). Every
        layer is then left exactly as it was, also those loaded before the bad one.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> trained, fresh = [bn.BatchNorm(2), bn.BatchNorm(2)], [bn.BatchNorm(2), bn.BatchNorm(2)]
    >>> _ = trained[1](np.array([[0.0, 2.0], [2.0, 6.0]]))
    >>> bn.load_model_state_dict(fresh, bn.model_state_dict(trained))
    LoadResult(missing_keys=[], unexpected_keys=[])
    >>> fresh[1].running_mean
    array([0.1, 0.4])
    """
    _validate.model_state_mapping(state)
    strict = _validate.flag(strict, "strict")
    layers = batchnorms(model)
    expected = {_prefix(name) + key: name for name, layer in layers for key in layer.state_dict()}
    missing = [key for key in expected if key not in state]
    unexpected = sorted(str(key) for key in state if key not in expected)
    if strict and (missing or unexpected):
        raise _validate.model_state_keys(missing, unexpected)
    saved = [layer.state_dict() for _, layer in layers]
    done: list[int] = []
    try:
        for i, (name, layer) in enumerate(layers):
            prefix = _prefix(name)
            mine = {key[len(prefix) :]: state[key] for key, owner in expected.items()
                    if owner == name and key in state}  # fmt: skip
            if mine:
                done.append(i)
                try:
                    layer.load_state_dict(mine, strict=strict)
                except (TypeError, ValueError) as err:
                    raise _validate.model_layer_error(name, err) from err
    except Exception:
        for i in done:  # put back what was loaded before the bad layer (cannot fail)
            layers[i][1].load_state_dict(saved[i])
        raise
    return LoadResult(missing_keys=missing, unexpected_keys=unexpected)


def freeze_all(model: Any) -> list[BatchNorm]:
    """Freeze every BatchNorm of `model` (detectron2's ``convert_frozen_batchnorm`` habit).

    Each layer then normalizes with its running statistics in every mode and never updates
    them (:meth:`batchnorm.BatchNorm.freeze`); gamma and beta still get gradients: leave them
    out of the optimizer to freeze them too, as detectron2's ``FrozenBatchNorm2d`` does. Returns
    the layers, in the order of :func:`batchnorms`.

    Raises
    ------
    ValueError
        A layer has ``track_running_stats=False`` (nothing to freeze it with); no layer is
        frozen then.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> model = {"stem": bn.BatchNorm(2), "head": bn.BatchNorm(2)}
    >>> [layer.frozen for layer in bn.freeze_all(model)]
    [True, True]
    >>> _ = model["stem"](np.ones((4, 2)))     # training mode, but frozen: nothing recorded
    >>> model["stem"].num_batches_tracked
    0
    """
    layers = batchnorms(model)
    untracked = [name for name, layer in layers if not layer.track_running_stats]
    if untracked:
        raise _validate.cannot_freeze(untracked)
    return [layer.freeze() for _, layer in layers]
