"""Frozen BatchNorm: running statistics in every mode, never updated; gamma and beta learn."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from helpers import layer_snapshot as snapshot
from normwise import normwise_error

import batchnorm as bn
from batchnorm.gradcheck import numerical_gradient


def trained(c: int = 3, seed: int = 0, **options: object) -> bn.BatchNorm:
    """A layer with non-trivial parameters and running statistics."""
    rng = np.random.default_rng(seed)
    layer = bn.BatchNorm(c, **options)  # type: ignore[arg-type]
    layer.gamma[:] = rng.uniform(0.5, 2.0, c)
    layer.beta[:] = rng.normal(size=c)
    for _ in range(3):
        layer(rng.normal(1.0, 2.0, size=(6, c, 2)))
    return layer


@pytest.mark.parametrize("steps", [1, 5, 40])
@pytest.mark.parametrize("options", [{}, {"momentum": None}, {"ghost_batch_size": 2}])
def test_a_frozen_layer_state_is_bitwise_unchanged_by_training_steps(
    steps: int, options: dict[str, object]
) -> None:
    layer = trained(**options).freeze()
    before = snapshot(layer, gradients=False)
    state = layer.state_dict()
    rng = np.random.default_rng(1)
    for _ in range(steps):
        x = rng.normal(5.0, 3.0, size=(8, 3, 2))
        layer(x)
        layer.backward(rng.normal(size=x.shape))
    assert snapshot(layer, gradients=False) == before
    after = layer.state_dict()
    assert all(np.array_equal(state[k], after[k]) for k in state)
    assert layer.training and layer.frozen


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 2)])
def test_frozen_forward_and_backward_are_eval_mode_in_either_mode(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(2)
    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    reference = trained().eval()
    y_ref, dx_ref = reference(x), reference.backward(dy)
    for mode in (True, False):
        layer = trained().freeze().train(mode)
        assert np.array_equal(layer(x), y_ref)
        assert np.array_equal(layer.backward(dy), dx_ref)
        assert np.array_equal(layer.dgamma, reference.dgamma)
        assert np.array_equal(layer.dbeta, reference.dbeta)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_frozen_gradients_match_finite_differences(shape: tuple[int, ...], training: bool) -> None:
    rng = np.random.default_rng(3)
    layer = trained().freeze().train(training)
    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    g, b = layer.gamma.copy(), layer.beta.copy()

    def run(values: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
        fresh = copy.deepcopy(layer)
        fresh.gamma[:], fresh.beta[:] = gamma, beta
        return fresh(values)

    layer(x)
    dx = layer.backward(dy)
    assert normwise_error(dx, numerical_gradient(lambda v: run(v, g, b), x, dy)) < 1e-7
    assert normwise_error(layer.dgamma, numerical_gradient(lambda v: run(x, v, b), g, dy)) < 1e-7
    assert normwise_error(layer.dbeta, numerical_gradient(lambda v: run(x, g, v), b, dy)) < 1e-7


def test_freeze_returns_the_layer_and_can_be_undone() -> None:
    layer = bn.BatchNorm(2)
    assert layer.freeze() is layer and layer.frozen
    assert "frozen=True" in repr(layer)
    assert layer.freeze(False) is layer and not layer.frozen
    layer(np.ones((2, 2)) * [[0.0], [1.0]])
    assert layer.num_batches_tracked == 1


def test_frozen_needs_running_statistics() -> None:
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bn.BatchNorm(2, track_running_stats=False, frozen=True)
    layer = bn.BatchNorm(2, track_running_stats=False)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        layer.freeze()
    assert not layer.frozen
    with pytest.raises(TypeError, match="frozen must be True or False"):
        bn.BatchNorm(2, frozen=1)  # type: ignore[arg-type]


def test_frozen_and_ghost_batch_size_are_saved_and_loaded(tmp_path: Path) -> None:
    layer = trained(ghost_batch_size=3).freeze()
    loaded = bn.BatchNorm.load(layer.save(tmp_path / "layer"))
    assert loaded.frozen and loaded.ghost_batch_size == 3
    assert snapshot(loaded, gradients=False) == snapshot(layer, gradients=False)
    plain = bn.BatchNorm.load(bn.BatchNorm(3).save(tmp_path / "plain"))
    assert not plain.frozen and plain.ghost_batch_size is None


def test_files_without_the_new_entries_still_load(tmp_path: Path) -> None:
    layer = trained()
    path = layer.save(tmp_path / "layer")
    with np.load(path) as data:
        entries = {
            k: data[k] for k in data.files if k not in ("config_frozen", "config_ghost_batch_size")
        }
    np.savez(tmp_path / "old.npz", **entries)
    loaded = bn.BatchNorm.load(tmp_path / "old.npz")
    assert not loaded.frozen and loaded.ghost_batch_size is None
    assert snapshot(loaded, gradients=False) == snapshot(layer, gradients=False)


def test_a_file_with_an_unknown_entry_is_refused(tmp_path: Path) -> None:
    path = bn.BatchNorm(2).save(tmp_path / "layer")
    with np.load(path) as data:
        entries = {k: data[k] for k in data.files}
    entries["config_frozn"] = np.array(True)
    np.savez(tmp_path / "odd.npz", **entries)
    with pytest.raises(ValueError, match=r"unknown entries \['config_frozn'\]"):
        bn.BatchNorm.load(tmp_path / "odd.npz")


# --- precise_bn --------------------------------------------------------------------------------


class Model:
    def __init__(self) -> None:
        self.first = trained(seed=4)
        self.second = trained(seed=5).freeze()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.second(self.first(x) * 2.0 + 1.0)


DATA = [np.random.default_rng(i).normal(2.0, 3.0, size=(10, 3, 2)) for i in range(3)]


def test_precise_bn_skips_frozen_layers() -> None:
    model = Model()
    before = snapshot(model.second)
    summary = bn.precise_bn(model, DATA, num_batches_precise=3)
    assert [s.layer for s in summary] == [model.first]
    assert snapshot(model.second) == before
    np.testing.assert_allclose(
        model.first.running_mean, np.concatenate(DATA).mean(axis=(0, 2)), rtol=1e-12
    )


def test_precise_bn_recomputes_a_frozen_layer_named_in_layers() -> None:
    model = Model()
    summary = bn.precise_bn(model, DATA, num_batches_precise=3, layers=[model.first, model.second])
    assert [s.layer for s in summary] == [model.first, model.second]
    assert model.second.frozen and model.second.num_batches_tracked == 3
    # During the pass both layers normalized with batch statistics: the second layer saw the
    # first's batch-normalized output, * 2 + 1 (mean 1, biased variance ~4 per batch).
    inputs = [bn.forward_train(x, model.first.gamma, model.first.beta)[0] * 2 + 1 for x in DATA]
    np.testing.assert_allclose(
        model.second.running_mean, np.concatenate(inputs).mean(axis=(0, 2)), rtol=1e-12
    )


def test_precise_bn_with_only_frozen_layers_finds_nothing() -> None:
    layer = trained().freeze()
    before = snapshot(layer)
    with pytest.raises(ValueError, match="found no BatchNorm layer"):
        bn.precise_bn(layer, DATA, num_batches_precise=3)
    assert snapshot(layer) == before


def test_a_file_with_a_repeated_entry_is_refused(tmp_path: Path) -> None:
    # Optional entries must not be smuggled in twice (the second copy would win).
    import zipfile

    path = bn.BatchNorm(2).save(tmp_path / "layer")
    with zipfile.ZipFile(path) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    frozen = next(data for name, data in members if name == "config_frozen.npy")
    odd = tmp_path / "odd.npz"
    with zipfile.ZipFile(odd, "w") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        for name, data in [*members, ("config_frozen.npy", frozen)]:
            archive.writestr(name, data)
    with pytest.raises(ValueError, match=r"repeated member 'config_frozen\.npy'"):
        bn.BatchNorm.load(odd)


def test_precise_bn_says_when_it_skipped_only_frozen_layers() -> None:
    class Model:
        def __init__(self) -> None:
            self.layers = [bn.BatchNorm(2).freeze(), bn.BatchNorm(2).freeze()]

        def __call__(self, x: np.ndarray) -> np.ndarray:
            for layer in self.layers:
                x = layer(x)
            return x

    batches = [np.random.default_rng(0).normal(size=(8, 2))]
    with pytest.raises(ValueError, match=r"skipped 2 frozen layer\(s\): name them in layers="):
        bn.precise_bn(Model(), batches, 1)
