"""Model-level helpers: batchnorms, model_state_dict, load_model_state_dict, freeze_all."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

import batchnorm as bn


class Block:
    def __init__(self) -> None:
        self.conv = object()
        self.bn1 = bn.BatchNorm(3)
        self.bn2 = bn.BatchNorm(2, affine=False)


class Net:
    def __init__(self) -> None:
        self.stem = bn.BatchNorm(4)
        self.block = Block()
        self.layers = [None, bn.BatchNorm(5), {"head": bn.BatchNorm(2, momentum=None)}]


def trained(seed: int = 0) -> Net:
    net = Net()
    rng = np.random.default_rng(seed)
    for _, layer in bn.batchnorms(net):
        for _ in range(2):
            layer(rng.normal(size=(6, layer.num_features)))
        if layer.gamma is not None:
            layer.gamma[:] = rng.uniform(0.5, 2.0, size=layer.num_features)
    return net


def test_names_are_pytorchs_dotted_paths() -> None:
    names = [name for name, _ in bn.batchnorms(Net())]
    assert names == ["stem", "block.bn1", "block.bn2", "layers.1", "layers.2.head"]
    assert bn.batchnorms(bn.BatchNorm(2))[0][0] == ""


def test_a_shared_layer_is_listed_once_and_cycles_are_safe() -> None:
    layer = bn.BatchNorm(2)
    model: dict[str, Any] = {"a": layer, "b": [layer]}
    model["self"] = model
    assert [name for name, _ in bn.batchnorms(model)] == ["a"]


class Slotted:
    __slots__ = ("__private", "empty", "norm")

    def __init__(self) -> None:
        self.norm = bn.BatchNorm(3)
        self.__private = [bn.BatchNorm(2)]


class MoreSlots(Slotted):
    __slots__ = ("extra",)

    def __init__(self) -> None:
        super().__init__()
        self.extra = {"head": bn.BatchNorm(4)}


class Shadowed(Slotted):
    """A subclass whose property hides a slot of its base: the walk reads the slot itself."""

    __slots__ = ()

    @property
    def norm(self) -> Any:
        raise AssertionError("the walk ran a property")


@dataclasses.dataclass(slots=True)
class Head:
    norm: bn.BatchNorm
    scale: float = 1.0

    def __call__(self, x: Any) -> Any:
        return self.scale * self.norm(x)


def test_layers_in_slots_are_found() -> None:
    model = {"body": MoreSlots(), "head": Head(bn.BatchNorm(5))}
    names = [name for name, _ in bn.batchnorms(model)]
    assert names == ["body.extra.head", "body._Slotted__private.0", "body.norm", "head.norm"]
    assert [layer.num_features for _, layer in bn.batchnorms(model)] == [4, 2, 3, 5]
    assert len(bn.freeze_all(model)) == 4


def test_slots_are_read_without_running_properties() -> None:
    model = Shadowed.__new__(Shadowed)
    Slotted.__dict__["norm"].__set__(model, bn.BatchNorm(3))  # the property hides the slot
    assert [name for name, _ in bn.batchnorms(model)] == ["norm"]


def test_precise_bn_finds_layers_in_slots() -> None:
    model = Head(bn.BatchNorm(3))
    x = np.random.default_rng(0).normal(2.0, 1.0, size=(16, 3))
    summaries = bn.precise_bn(model, [x], 1)
    assert [s.name for s in summaries] == ["model.norm"]
    np.testing.assert_allclose(model.norm.running_mean, x.mean(axis=0), rtol=1e-12)


def test_clashing_names_are_refused() -> None:
    with pytest.raises(ValueError, match="same name '1'"):
        bn.batchnorms({1: bn.BatchNorm(2), "1": bn.BatchNorm(2)})


def test_state_dict_keys_and_values() -> None:
    net = trained()
    state = bn.model_state_dict(net)
    assert "block.bn1.running_mean" in state and "block.bn2.weight" not in state
    assert "layers.2.head.num_batches_tracked" in state
    for name, layer in bn.batchnorms(net):
        for key, value in layer.state_dict().items():
            assert np.array_equal(state[f"{name}.{key}"], value)
    state["stem.running_mean"][0] = 99.0  # a copy
    assert net.stem.running_mean is not None and net.stem.running_mean[0] != 99.0


def test_round_trip_loads_every_layer_bitwise() -> None:
    source, target = trained(1), Net()
    result = bn.load_model_state_dict(target, bn.model_state_dict(source))
    assert result.missing_keys == [] and result.unexpected_keys == []
    after = bn.model_state_dict(target)
    for key, value in bn.model_state_dict(source).items():
        assert after[key].tobytes() == value.tobytes(), key


def test_strict_mismatch_loads_nothing_and_names_the_keys() -> None:
    target = Net()
    before = bn.model_state_dict(target)
    state = bn.model_state_dict(trained(2))
    del state["block.bn1.running_var"]
    state["fc.weight"] = np.ones(3)
    with pytest.raises(ValueError, match=r"missing keys \['block.bn1.running_var'\]"):
        bn.load_model_state_dict(target, state)
    assert all(np.array_equal(v, before[k]) for k, v in bn.model_state_dict(target).items())
    result = bn.load_model_state_dict(target, state, strict=False)
    assert result.missing_keys == ["block.bn1.running_var"]
    assert result.unexpected_keys == ["fc.weight"]
    assert np.array_equal(target.stem.gamma, state["stem.weight"])  # type: ignore[arg-type]


def test_a_bad_value_in_a_late_layer_restores_the_early_ones() -> None:
    target = Net()
    before = bn.model_state_dict(target)
    state = bn.model_state_dict(trained(3))
    state["layers.2.head.running_var"] = np.array([1.0, -1.0])
    with pytest.raises(ValueError, match=r"'layers\.2\.head'") as info:
        bn.load_model_state_dict(target, state)
    assert "Nothing was loaded" in str(info.value)
    for key, value in bn.model_state_dict(target).items():
        assert value.tobytes() == before[key].tobytes(), key


def test_state_must_be_a_mapping() -> None:
    with pytest.raises(TypeError, match="mapping"):
        bn.load_model_state_dict(Net(), [1, 2])  # type: ignore[arg-type]


def test_freeze_all_freezes_every_layer_or_none() -> None:
    net = Net()
    layers = bn.freeze_all(net)
    assert [layer.frozen for layer in layers] == [True] * 5
    assert layers == [layer for _, layer in bn.batchnorms(net)]
    mixed = {"a": bn.BatchNorm(2), "b": bn.BatchNorm(2, track_running_stats=False)}
    with pytest.raises(ValueError, match=r"\['b'\]"):
        bn.freeze_all(mixed)
    assert not mixed["a"].frozen


def test_keys_match_a_pytorch_model() -> None:
    torch = pytest.importorskip("torch")

    class TorchBlock(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.bn1 = torch.nn.BatchNorm2d(3)
            self.bn2 = torch.nn.BatchNorm2d(2, affine=False)

    class TorchNet(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.BatchNorm1d(4)
            self.block = TorchBlock()
            self.layers = torch.nn.Sequential(torch.nn.Identity(), torch.nn.BatchNorm1d(5))

    ours = {"stem": bn.BatchNorm(4), "block": Block(), "layers": [None, bn.BatchNorm(5)]}
    theirs = TorchNet()
    assert list(bn.model_state_dict(ours)) == list(theirs.state_dict())
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    state["block.bn1.running_mean"] = np.arange(3.0)
    assert bn.load_model_state_dict(ours, state).missing_keys == []
    assert ours["block"].bn1.running_mean.tolist() == [0.0, 1.0, 2.0]  # type: ignore[attr-defined]
