"""BatchNorm state: state_dict / load_state_dict (PyTorch's keys) and save / load (.npz files).

Loading is all or nothing: after any error the layer is bit for bit as it was. A file that is
not one BatchNorm.save wrote gives a ValueError (FileNotFoundError when there is no file), and
nothing in a file is ever unpickled or executed.
"""

from __future__ import annotations

import io
import itertools
import os
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import layer_snapshot as snapshot

import batchnorm as bn
from batchnorm.layer import LoadResult

KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


# --- helpers -------------------------------------------------------------------------------------


def trained_layer(c: int = 3, seed: int = 0, *, steps: int = 3, **options: Any) -> bn.BatchNorm:
    """A layer with non-trivial parameters and running statistics, after a backward pass."""
    rng = np.random.default_rng(seed)
    layer = bn.BatchNorm(c, **options)
    if layer.affine:
        layer.gamma[:] = rng.uniform(0.5, 2.0, c)
        layer.beta[:] = rng.normal(size=c)
    shape = (5, 2, c) if layer.axis == -1 else (5, c, 2)
    for _ in range(steps):
        y = layer(rng.normal(1.0, 2.0, size=shape))
    layer.backward(np.ones_like(y))
    return layer


def other_state(c: int = 3, seed: int = 5) -> dict[str, np.ndarray]:
    """A complete, valid state that differs from every layer made by trained_layer."""
    rng = np.random.default_rng(seed)
    return {
        "weight": rng.uniform(0.5, 2.0, c),
        "bias": rng.normal(size=c),
        "running_mean": rng.normal(size=c),
        "running_var": rng.uniform(0.5, 2.0, c),
        "num_batches_tracked": np.array(17, dtype=np.int64),
    }


def npy_bytes(array: np.ndarray | None = None, header: dict[str, Any] | None = None) -> bytes:
    """The bytes of an .npy file: an array, or only a (possibly lying) header."""
    buf = io.BytesIO()
    if header is not None:
        np.lib.format.write_array_header_1_0(buf, header)
    else:
        np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def saved_entries(layer: bn.BatchNorm, tmp_path: Path) -> dict[str, np.ndarray]:
    """The arrays a real save writes, to build corrupted variants from."""
    with np.load(layer.save(tmp_path / "original.npz"), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# --- state_dict ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "keys"),
    [
        ({}, KEYS),
        ({"affine": False}, KEYS[2:]),
        ({"track_running_stats": False}, KEYS[:2]),
        ({"affine": False, "track_running_stats": False}, []),
    ],
)
def test_state_dict_keys_dtypes_and_shapes(options: dict[str, Any], keys: list[str]) -> None:
    layer = trained_layer(4, **options)
    state = layer.state_dict()
    assert list(state) == keys
    for key, value in state.items():
        assert isinstance(value, np.ndarray)
        if key == "num_batches_tracked":
            assert value.dtype == np.int64 and value.shape == ()
            assert int(value) == 3
        else:
            assert value.dtype == np.float64 and value.shape == (4,)


def test_state_dict_values_are_copies() -> None:
    layer = trained_layer()
    state = layer.state_dict()
    assert np.array_equal(state["weight"], layer.gamma)
    assert np.array_equal(state["bias"], layer.beta)
    assert np.array_equal(state["running_mean"], layer.running_mean)
    assert np.array_equal(state["running_var"], layer.running_var)
    before = snapshot(layer)
    for value in state.values():
        value[...] = 0
    assert snapshot(layer) == before


@pytest.mark.parametrize(
    "options",
    [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None, "axis": -1}],
)
def test_state_dict_round_trip(options: dict[str, Any]) -> None:
    source = trained_layer(3, seed=1, **options)
    target = bn.BatchNorm(3, **options)
    result = target.load_state_dict(source.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert snapshot(target, gradients=False) == snapshot(source, gradients=False)


def test_load_converts_to_float64_in_place() -> None:
    layer = bn.BatchNorm(3)
    gamma_array = layer.gamma
    state = {
        "weight": np.array([1.5, 2.0, 0.5], dtype=np.float32),
        "bias": [0, 1, 2],
        "running_mean": np.array([1, -1, 0], dtype=np.int32),
        "running_var": np.array([0.5, 1.0, 4.0], dtype=np.float16),
        "num_batches_tracked": 4,
    }
    layer.load_state_dict(state)
    assert layer.gamma is gamma_array  # loaded into the existing arrays
    for name in ["gamma", "beta", "running_mean", "running_var"]:
        assert getattr(layer, name).dtype == np.float64
    assert np.array_equal(layer.gamma, [1.5, 2.0, 0.5])
    assert np.array_equal(layer.beta, [0.0, 1.0, 2.0])
    assert layer.num_batches_tracked == 4 and isinstance(layer.num_batches_tracked, int)
    # The caller's arrays are not aliased.
    state["weight"][0] = 9.0
    assert layer.gamma[0] == 1.5


@pytest.mark.parametrize(
    "counter", [np.array(3), np.int64(3), 3, np.array([3]), np.array(3, dtype=np.uint8)]
)
def test_num_batches_tracked_forms(counter: Any) -> None:
    layer = bn.BatchNorm(2)
    layer.load_state_dict({**other_state(2), "num_batches_tracked": counter})
    assert layer.num_batches_tracked == 3


def _bad(key: str, value: Any) -> dict[str, Any]:
    state: dict[str, Any] = other_state()
    state[key] = value
    return state


def _without(key: str) -> dict[str, Any]:
    state: dict[str, Any] = other_state()
    del state[key]
    return state


BAD_STATES: dict[str, tuple[Any, type, str]] = {
    "missing_running_var": (_without("running_var"), ValueError, r"missing keys \['running_var'\]"),
    "missing_counter": (_without("num_batches_tracked"), ValueError, "num_batches_tracked"),
    "unexpected_key": ({**other_state(), "momentum": 0.1}, ValueError, r"unexpected keys \['mo"),
    "torch_prefixed_keys": (
        {f"bn1.{k}": v for k, v in other_state().items()},
        ValueError,
        "missing keys",
    ),
    "short_weight": (_bad("weight", np.ones(2)), ValueError, r"shape \(3,\)"),
    "long_bias": (_bad("bias", np.ones(4)), ValueError, r"shape \(3,\)"),
    "column_mean": (_bad("running_mean", np.ones((3, 1))), ValueError, r"shape \(3,\)"),
    "scalar_var": (_bad("running_var", np.float64(1.0)), ValueError, r"shape \(3,\)"),
    "bool_weight": (_bad("weight", np.ones(3, dtype=bool)), TypeError, "real numbers"),
    "complex_bias": (_bad("bias", np.ones(3, dtype=complex)), TypeError, "real numbers"),
    "string_mean": (_bad("running_mean", np.array(["1", "2", "3"])), TypeError, "real numbers"),
    "object_var": (_bad("running_var", np.array([1.0, 2.0, None])), TypeError, "real numbers"),
    "none_weight": (_bad("weight", None), TypeError, "weight"),
    "nan_weight": (_bad("weight", np.array([1.0, np.nan, 1.0])), ValueError, "finite"),
    "inf_bias": (_bad("bias", np.array([0.0, 0.0, np.inf])), ValueError, "finite"),
    "nan_mean": (_bad("running_mean", np.array([np.nan, 0.0, 0.0])), ValueError, "finite"),
    "inf_var": (_bad("running_var", np.array([1.0, np.inf, 1.0])), ValueError, "finite"),
    "negative_var": (_bad("running_var", np.array([1.0, -1e-3, 1.0])), ValueError, ">= 0"),
    "negative_counter": (_bad("num_batches_tracked", np.array(-1)), ValueError, "non-negative"),
    "float_counter": (_bad("num_batches_tracked", np.array(2.5)), ValueError, "integer"),
    "vector_counter": (_bad("num_batches_tracked", np.array([1, 2])), ValueError, "integer"),
    "bool_counter": (_bad("num_batches_tracked", True), ValueError, "integer"),
    "string_counter": (_bad("num_batches_tracked", "3"), ValueError, "integer"),
    "not_a_mapping": (list(other_state().items()), TypeError, "mapping"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_strict_load_refuses_and_changes_nothing(case: str) -> None:
    state, error, match = BAD_STATES[case]
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        layer.load_state_dict(state, strict=True)
    # Nothing was loaded, not even the valid entries that came before the bad one.
    assert snapshot(layer) == before


def test_non_strict_load_reports_and_loads_matching_keys() -> None:
    layer = trained_layer()
    before = snapshot(layer)
    state = {"weight": np.array([3.0, 2.0, 1.0]), "running_var": np.full(3, 2.0), "extra": 1}
    result = layer.load_state_dict(state, strict=False)
    assert isinstance(result, LoadResult)
    assert result.missing_keys == ["bias", "running_mean", "num_batches_tracked"]
    assert result.unexpected_keys == ["extra"]
    assert np.array_equal(layer.gamma, [3.0, 2.0, 1.0])
    assert np.array_equal(layer.running_var, [2.0, 2.0, 2.0])
    after = snapshot(layer)
    for name in ["beta", "running_mean", "num_batches_tracked", "training", "dgamma", "dbeta"]:
        assert after[name] == before[name], name


@pytest.mark.parametrize("case", ["nan_weight", "negative_var", "float_counter", "short_weight"])
def test_non_strict_load_still_checks_every_matching_value(case: str) -> None:
    state, error, _ = BAD_STATES[case]
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(error):
        layer.load_state_dict(state, strict=False)
    assert snapshot(layer) == before


def test_state_of_a_richer_layer_loads_non_strictly() -> None:
    full = trained_layer(3, seed=2).state_dict()
    bare = bn.BatchNorm(3, affine=False)
    with pytest.raises(ValueError, match="unexpected keys"):
        bare.load_state_dict(full)
    result = bare.load_state_dict(full, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["bias", "weight"]
    assert np.array_equal(bare.running_mean, full["running_mean"])


def test_momentum_none_continues_the_average_after_loading() -> None:
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(6, 2)) for _ in range(4)]
    whole = bn.BatchNorm(2, momentum=None)
    for x in batches:
        whole(x)
    first_half = bn.BatchNorm(2, momentum=None)
    for x in batches[:2]:
        first_half(x)
    resumed = bn.BatchNorm(2, momentum=None)
    resumed.load_state_dict(first_half.state_dict())
    for x in batches[2:]:
        resumed(x)
    np.testing.assert_allclose(resumed.running_mean, whole.running_mean, rtol=1e-14)
    np.testing.assert_allclose(resumed.running_var, whole.running_var, rtol=1e-14)
    assert resumed.num_batches_tracked == 4


# --- running statistics assigned by hand ---------------------------------------------------------


def read_only(values: Any) -> np.ndarray:
    array = np.array(values, dtype=np.float64)
    array.flags.writeable = False
    return array


@pytest.mark.parametrize(
    ("name", "value", "error", "got"),
    [
        ("running_mean", np.zeros(4), ValueError, "got an array of shape (4,)."),
        ("running_var", [1.0, 1.0, 1.0], TypeError, "got list."),
        ("running_mean", np.zeros(3, dtype=np.int64), TypeError, "got an array of dtype int64."),
        ("running_var", read_only([1.0, 1.0, 1.0]), ValueError, "(3,), read-only."),
    ],
    ids=["shape", "list", "int", "read-only"],
)
def test_a_training_step_refuses_unusable_running_statistics(
    name: str, value: Any, error: type[Exception], got: str
) -> None:
    layer = trained_layer()
    setattr(layer, name, value)
    before = snapshot(layer)
    with pytest.raises(
        error, match=rf"^layer\.{name} must be a writeable float array of shape"
    ) as info:
        layer(np.random.default_rng(1).normal(size=(5, 3, 2)))
    assert got in str(info.value)
    assert snapshot(layer) == before


def test_batch_renorm_refuses_unusable_running_statistics_before_reading_them() -> None:
    layer = bn.BatchRenorm(3)
    layer.running_var = [1.0, 1.0, 1.0]
    with pytest.raises(TypeError, match=r"^layer\.running_var must be a writeable float array"):
        layer(np.ones((4, 3)) + np.arange(4.0)[:, None])


def test_a_rank_with_unusable_running_statistics_fails_alone_after_the_exchange() -> None:
    groups = bn.distributed.thread_groups(2, timeout=20.0)
    layers = [bn.BatchNorm(3, group=group) for group in groups]
    layers[1].running_mean = np.zeros(4)
    before = [snapshot(layer) for layer in layers]
    x = np.random.default_rng(3).normal(size=(4, 3))
    outcome: list[Any] = [None, None]

    def step(rank: int) -> None:
        try:
            outcome[rank] = layers[rank](x)
        except ValueError as err:
            outcome[rank] = err

    threads = [threading.Thread(target=step, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30.0)
    assert not any(thread.is_alive() for thread in threads)
    assert isinstance(outcome[0], np.ndarray)  # rank 0 finished its step: nobody waited
    assert layers[0].num_batches_tracked == 1
    assert "layer.running_mean must be a writeable float array" in str(outcome[1])
    assert snapshot(layers[1]) == before[1]


def test_float32_running_statistics_assigned_by_hand_are_updated_in_place() -> None:
    layer = bn.BatchNorm(3)
    mean = layer.running_mean = np.zeros(3, dtype=np.float32)
    x = np.random.default_rng(2).normal(3.0, 1.0, size=(8, 3))
    layer(x)
    assert layer.running_mean is mean and mean.dtype == np.float32
    np.testing.assert_allclose(mean, 0.1 * x.mean(axis=0), rtol=1e-6)


# --- save and load -------------------------------------------------------------------------------

ROUND_TRIP_OPTIONS = [
    {
        "affine": affine,
        "track_running_stats": track,
        "momentum": momentum,
        "unbiased": unbiased,
        "axis": axis,
        "training": training,
    }
    for affine, track, momentum, unbiased, axis, training in itertools.product(
        [True, False], [True, False], [0.9, None], [True, False], [1, -1], [True, False]
    )
]


@pytest.mark.parametrize(
    "options", ROUND_TRIP_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_save_load_round_trip(tmp_path: Path, options: dict[str, Any]) -> None:
    options = dict(options)
    training = options.pop("training")
    layer = trained_layer(3, seed=4, eps=1e-3, **options).train(training)
    path = layer.save(tmp_path / "layer.npz")
    loaded = bn.BatchNorm.load(path)
    assert snapshot(loaded, gradients=False) == snapshot(layer, gradients=False)
    assert loaded.dgamma is None and loaded.dbeta is None  # gradients are not state
    # The two layers now behave identically, in their mode and in the other one.
    rng = np.random.default_rng(5)
    for _ in range(2):
        x = rng.normal(size=(4, 2, 3) if layer.axis == -1 else (4, 3, 2))
        assert np.array_equal(loaded(x), layer(x))
        loaded.train(not loaded.training)
        layer.train(not layer.training)
    assert snapshot(loaded, gradients=False) == snapshot(layer, gradients=False)


@pytest.mark.filterwarnings("ignore:momentum=0.0 weights the OLD")
def test_save_and_load_of_extreme_hyperparameters(tmp_path: Path) -> None:
    layer = bn.BatchNorm(1, eps=1e-300, momentum=0.0, axis=3)
    loaded = bn.BatchNorm.load(layer.save(tmp_path / "odd.npz"))
    assert (loaded.eps, loaded.momentum, loaded.axis) == (1e-300, 0.0, 3)


@pytest.mark.parametrize(
    ("name", "written"),
    [
        ("layer", "layer.npz"),
        ("layer.npz", "layer.npz"),
        ("layer.v2", "layer.v2.npz"),
        ("layer.npy", "layer.npy.npz"),
    ],
)
def test_save_appends_the_npz_suffix(tmp_path: Path, name: str, written: str) -> None:
    layer = trained_layer()
    path = layer.save(tmp_path / name)
    assert path == tmp_path / written
    assert path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [written]
    assert snapshot(bn.BatchNorm.load(path), gradients=False) == snapshot(layer, gradients=False)


def test_save_accepts_a_string_path_and_changes_nothing(tmp_path: Path) -> None:
    layer = trained_layer()
    before = snapshot(layer)
    path = layer.save(str(tmp_path / "as_string"))
    assert path == tmp_path / "as_string.npz"
    assert snapshot(layer) == before
    assert bn.BatchNorm.load(str(path)).num_batches_tracked == 3


def test_failed_save_changes_nothing(tmp_path: Path) -> None:
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(FileNotFoundError):
        layer.save(tmp_path / "no_such_folder" / "layer.npz")
    assert snapshot(layer) == before


def test_saved_file_holds_no_pickles(tmp_path: Path) -> None:
    path = trained_layer().save(tmp_path / "layer.npz")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}  # would raise on any object array
    assert all(not a.dtype.hasobject for a in arrays.values())
    assert {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"} <= set(arrays)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        bn.BatchNorm.load(tmp_path / "nothing_here.npz")


_HEADER = {"descr": "<f8", "fortran_order": False}
_FORMAT_NPY = npy_bytes(np.array("batchnorm.BatchNorm/1"))

# name -> (how the file is made, what goes in it). "bytes": the file's bytes from a good file's
# bytes; "savez": np.savez of a good file's arrays with some replaced (None: left out); "zip": an
# archive written member by member from a good file's arrays; "npy": np.save of an array.
BAD_FILES: dict[str, tuple[str, Any]] = {
    "empty": ("bytes", lambda good: b""),
    "truncated_half": ("bytes", lambda good: good[: len(good) // 2]),
    "truncated_tail": ("bytes", lambda good: good[:-10]),
    "random_bytes": ("bytes", lambda good: np.random.default_rng(6).bytes(2000)),
    "text": ("bytes", lambda good: b"weight,bias\n1,0\n"),
    "plain_npy": ("npy", np.ones(3)),
    "plain_npy_named_npz": ("bytes", lambda good: npy_bytes(np.ones(3))),
    # np.savez pickles object arrays (allow_pickle defaults to True when writing).
    "object_weight": ("savez", {"weight": np.array([1.0, 2.0, 3.0], dtype=object)}),
    "object_format": ("savez", {"format": np.array("batchnorm.BatchNorm/1", dtype=object)}),
    "missing_format": ("savez", {"format": None}),
    "missing_num_features": ("savez", {"config_num_features": None}),
    "missing_momentum": ("savez", {"config_momentum": None}),
    "missing_training": ("savez", {"config_training": None}),
    "missing_weight": ("savez", {"weight": None}),
    "missing_running_var": ("savez", {"running_var": None}),
    "missing_counter": ("savez", {"num_batches_tracked": None}),
    "no_state_at_all": ("savez", dict.fromkeys(KEYS)),
    "wrong_format": ("savez", {"format": np.array("batchnorm.BatchNorm/999")}),
    "format_is_a_number": ("savez", {"format": np.array(1.0)}),
    "format_is_bytes": ("savez", {"format": np.array(b"batchnorm.BatchNorm/1")}),
    "zero_num_features": ("savez", {"config_num_features": np.array(0)}),
    "float_num_features": ("savez", {"config_num_features": np.array(3.0)}),
    "negative_eps": ("savez", {"config_eps": np.array(-1.0)}),
    "momentum_above_one": ("savez", {"config_momentum": np.array(1.5)}),
    "float_axis": ("savez", {"config_axis": np.array(0.5)}),
    "vector_training_flag": ("savez", {"config_training": np.array([True, False])}),
    "nan_running_var": ("savez", {"running_var": np.array([1.0, np.nan, 1.0])}),
    "negative_running_var": ("savez", {"running_var": np.array([1.0, -2.0, 1.0])}),
    "inf_weight": ("savez", {"weight": np.array([1.0, np.inf, 1.0])}),
    "short_weight": ("savez", {"weight": np.ones(2)}),
    "negative_counter": ("savez", {"num_batches_tracked": np.array(-5)}),
    # A state entry that the saved options do not have (weight and bias with affine=False).
    "unexpected_state": ("savez", {"config_affine": np.array(False)}),
    "huge_shape": (
        "zip",
        lambda entries: {
            "format.npy": _FORMAT_NPY,
            "weight.npy": npy_bytes(header={**_HEADER, "shape": (10**12,)}),
        },
    ),
    "huge_2d_shape": (
        "zip",
        lambda entries: {"running_var.npy": npy_bytes(header={**_HEADER, "shape": (2**31, 2**31)})},
    ),
    "header_without_data": (
        "zip",
        lambda entries: {
            **{f"{k}.npy": npy_bytes(v) for k, v in entries.items()},
            "weight.npy": npy_bytes(header={**_HEADER, "shape": (3,)}),
        },
    ),
    "member_is_a_pickle": ("zip", lambda entries: {"weight.npy": b"\x80\x04K\x01."}),
    "member_not_npy": (
        "zip",
        lambda entries: {
            **{f"{k}.npy": npy_bytes(v) for k, v in entries.items()},
            "extra.pkl": b"\x80\x04K\x01.",
        },
    ),
}


def make_bad_file(tmp_path: Path, name: str) -> Path:
    layer = trained_layer()
    good = layer.save(tmp_path / "good.npz")
    kind, spec = BAD_FILES[name]
    path = tmp_path / f"{name}.npz"
    if kind == "bytes":
        path.write_bytes(spec(good.read_bytes()))
    elif kind == "npy":
        path = tmp_path / f"{name}.npy"
        np.save(path, spec)
    elif kind == "savez":
        arrays = {**saved_entries(layer, tmp_path), **spec}
        np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    else:
        write_zip(path, spec(saved_entries(layer, tmp_path)))
    return path


def test_the_good_file_of_make_bad_file_loads(tmp_path: Path) -> None:
    make_bad_file(tmp_path, "empty")
    assert bn.BatchNorm.load(tmp_path / "good.npz").num_batches_tracked == 3


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_load_refuses_a_bad_file(tmp_path: Path, name: str) -> None:
    path = make_bad_file(tmp_path, name)
    with pytest.raises(ValueError, match="not a valid BatchNorm file") as info:
        bn.BatchNorm.load(path)
    assert str(path) in str(info.value)


class _Payload:
    """Unpickling this object creates a directory: proof that code from a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("key", ["weight", "format", "config_eps", "unrelated"])
def test_load_never_unpickles(tmp_path: Path, key: str) -> None:
    marker = tmp_path / "code_ran"
    entries = saved_entries(trained_layer(), tmp_path)
    entries[key] = np.array([_Payload(marker)], dtype=object)
    path = tmp_path / "malicious.npz"
    np.savez(path, **entries)
    with pytest.raises(ValueError, match="not a valid BatchNorm file"):
        bn.BatchNorm.load(path)
    assert not marker.exists()
    # The payload is real: unpickling it does run code.
    with np.load(path, allow_pickle=True) as data:
        data[key]
    assert marker.exists()


def test_load_of_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    with pytest.raises((ValueError, IsADirectoryError, PermissionError)):
        bn.BatchNorm.load(folder)


def test_load_refuses_a_huge_declared_itemsize(tmp_path: Path) -> None:
    header = {"descr": "|S100000", "fortran_order": False, "shape": (2**25,)}
    path = write_zip(tmp_path / "wide.npz", {"weight.npy": npy_bytes(header=header)})
    with pytest.raises(ValueError, match="not a valid BatchNorm file"):
        bn.BatchNorm.load(path)


def test_load_checks_num_features_against_the_saved_vectors_first(tmp_path: Path) -> None:
    with np.load(bn.BatchNorm(3).save(tmp_path / "good.npz")) as saved:
        entries = {key: saved[key] for key in saved.files}
    entries["config_num_features"] = np.array(10**12)
    np.savez(tmp_path / "wide.npz", **entries)
    with pytest.raises(ValueError, match="num_features is 1000000000000"):
        bn.BatchNorm.load(tmp_path / "wide.npz")
