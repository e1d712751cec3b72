"""Checks of the model-level helpers: names, state dicts and freezing of a model's layers."""

from __future__ import annotations

from typing import Any

__all__ = [
    "cannot_freeze",
    "model_layer_error",
    "model_name_clash",
    "model_state_keys",
    "model_state_mapping",
]


def model_name_clash(name: str) -> ValueError:
    return ValueError(
        f"two BatchNorm layers of this model get the same name {name!r} (dict keys whose text is "
        "the same, or keys with dots in them): their state dict keys would collide. Give the "
        "containers distinct string keys without dots."
    )


def model_state_mapping(state: Any) -> None:
    if not hasattr(state, "keys") or not hasattr(state, "__getitem__"):
        raise TypeError(
            "state must be a mapping such as the dict from bn.model_state_dict(model); got "
            f"{type(state).__name__}."
        )


def model_state_keys(missing: list[str], unexpected: list[str]) -> ValueError:
    def shown(keys: list[str]) -> str:
        return f"{keys[:6]}" + (f" (and {len(keys) - 6} more)" if len(keys) > 6 else "")

    return ValueError(
        f"state does not match this model's BatchNorm layers: missing keys {shown(missing)}, "
        f"unexpected keys {shown(unexpected)}. Keys are the layers' names from "
        "bn.batchnorms(model) followed by PyTorch's names ('block.bn1.running_mean'). Nothing "
        "was loaded; strict=False loads the matching keys and reports the others."
    )


def model_layer_error(name: str, err: Exception) -> Exception:
    """A layer refused its part of a model's state: the same type, naming the layer."""
    kind = type(err) if isinstance(err, TypeError | ValueError) else ValueError
    return kind(f"BatchNorm {name!r} of the model: {err} Nothing was loaded into any layer.")


def cannot_freeze(names: list[str]) -> ValueError:
    return ValueError(
        f"freeze_all: the BatchNorm layers {names} have track_running_stats=False, so there are "
        "no statistics to freeze them with; no layer was frozen. Build them with "
        "track_running_stats=True (and compute their statistics, e.g. with precise_bn), or "
        "freeze the others one by one with layer.freeze()."
    )
