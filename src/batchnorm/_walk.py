"""The walk that finds every BatchNorm in a model, for precise_bn and distributed.synchronize,
and the check of an explicit list of layers.

A model is any object: the walk follows attributes (``__dict__`` and ``__slots__``), lists,
tuples and dicts depth first, visits each object once (cycles are safe), never runs a property,
and never descends into numbers, strings, arrays, modules, classes or functions.
"""

from __future__ import annotations

import numbers
import types
from collections.abc import Iterable
from typing import Any

import numpy as np

from batchnorm import _validate
from batchnorm.layer import BatchNorm

_FUNCTIONS = (types.FunctionType, types.MethodType, types.BuiltinFunctionType)
_OPAQUE = (types.ModuleType, type, *_FUNCTIONS)


def named_layers(layers: Iterable[BatchNorm]) -> list[tuple[str, BatchNorm]]:
    """The explicitly chosen layers, checked, without duplicates."""
    named: list[tuple[str, BatchNorm]] = []
    seen: set[int] = set()
    for i, layer in enumerate(_validate.layer_list(layers, BatchNorm)):
        if id(layer) not in seen:
            seen.add(id(layer))
            _validate.has_running_stats(layer.track_running_stats, f"layers[{i}]")
            named.append((f"layers[{i}]", layer))
    if not named:
        raise _validate.no_layers_found()
    return named


def find_layers(model: Any) -> list[tuple[str, BatchNorm]]:
    """Every BatchNorm with running statistics that is not frozen, reachable from model, depth
    first, each once."""
    tracking = [(path, layer) for path, layer in reachable(model) if layer.track_running_stats]
    found = [(path, layer) for path, layer in tracking if not layer.frozen]
    if not found:
        function = None
        if isinstance(model, _FUNCTIONS):  # the walk never looks inside a function
            function = f"{type(model).__name__} {getattr(model, '__qualname__', model)!r}"
        raise _validate.no_layers_found(frozen=len(tracking), function=function)
    return found


def reachable(model: Any) -> list[tuple[str, BatchNorm]]:
    """Every BatchNorm reachable from model, with the path to it (``model.layers[2]``)."""
    return [(_path(steps), layer) for steps, layer in walk(model)]


#: One step of a path: ("attr", name), ("index", i) or ("key", dict key).
Step = tuple[str, Any]


def walk(model: Any) -> list[tuple[tuple[Step, ...], BatchNorm]]:
    """Every BatchNorm reachable from model, depth first, each once, with the steps to it."""
    found: list[tuple[tuple[Step, ...], BatchNorm]] = []
    seen: set[int] = set()
    stack: list[tuple[tuple[Step, ...], Any]] = [((), model)]
    while stack:
        steps, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        children: list[tuple[Step, Any]] = []
        if isinstance(obj, BatchNorm):
            found.append((steps, obj))
        elif isinstance(obj, dict):
            children = [(("key", key), value) for key, value in obj.items()]
        elif isinstance(obj, list | tuple):
            children = [(("index", i), value) for i, value in enumerate(obj)]
        elif not isinstance(obj, _OPAQUE):
            children = [(("attr", name), value) for name, value in _attributes(obj)]
        # Containers and plain objects only: skip numbers, strings and arrays early.
        stack.extend(((*steps, step), c) for step, c in reversed(children) if not _is_leaf(c))
    return found


def _attributes(obj: Any) -> list[tuple[str, Any]]:
    """An object's attributes: its ``__dict__`` and its filled ``__slots__`` (a
    ``dataclass(slots=True)``, say), the slots of every class it inherits from included. Slots
    are read through their own descriptors, so that no property a subclass puts over one runs."""
    items = list(vars(obj).items()) if hasattr(obj, "__dict__") else []
    for name, slot in _slots(type(obj)):
        try:
            items.append((name, slot.__get__(obj, type(obj))))
        except AttributeError:  # a slot never assigned
            continue
    return items


def _slots(cls: type) -> tuple[tuple[str, types.MemberDescriptorType], ...]:
    """(name, descriptor) of every slot of cls and of the classes it inherits from."""
    found = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name.startswith("__") and not name.endswith("__"):  # stored under a mangled name
                name = f"_{klass.__name__.lstrip('_')}{name}"
            slot = klass.__dict__.get(name)
            if isinstance(slot, types.MemberDescriptorType):  # not __dict__ or __weakref__
                found.append((name, slot))
    return tuple(found)


def _path(steps: tuple[Step, ...]) -> str:
    marks = {"attr": "{}.{}", "index": "{}[{}]", "key": "{}[{!r}]"}
    path = "model"
    for kind, value in steps:
        path = marks[kind].format(path, value)
    return path


def _is_leaf(obj: Any) -> bool:
    return isinstance(obj, numbers.Number | str | bytes | np.ndarray) or obj is None
