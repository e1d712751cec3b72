"""Fuzzing of state loading: malformed state dicts and corrupted .npz files.

Hypothesis builds layers of every configuration with arbitrary state, then:

* state dicts with missing, extra or non-string keys and entries of the wrong shape, of object,
  complex, string or bool dtype, NaN or inf, negative variances, negative, float or oversized
  counters, values NumPy cannot convert, and objects that are not mappings at all. Whether a
  state is valid is known by construction; an invalid one makes load_state_dict raise
  ValueError or TypeError with a message naming the state, and leaves the layer bit for bit as
  it was (its last forward pass still backpropagates identically). A valid one loads exactly.
* .npz files with flipped bits, truncated, replaced by random bytes, with members renamed,
  with object arrays written with allow_pickle, with pickles that would create a marker file
  when unpickled, with array headers that promise more data than there is, and with entries
  replaced by arrays of any dtype and shape. BatchNorm.load raises ValueError
  (FileNotFoundError when there is no file), or, when a flipped bit hit nothing that matters,
  returns the saved layer unchanged; the marker never appears.
* Valid states and files round-trip exactly.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import layer_snapshot as snapshot
from helpers import raw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import batchnorm as bn

# momentum=0.0 is drawn on purpose: its PyTorch-habit warning is tested in tests/test_layer.py.
pytestmark = pytest.mark.filterwarnings("ignore:momentum=:UserWarning")

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,  # examples are cheap to find again; no files written beside the tests
)

STATE_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
INT64_MAX = int(np.iinfo(np.int64).max)


# --- layers, snapshots --------------------------------------------------------------------------


@functools.cache  # strategies are immutable: build each once
def _moderate(n: int, *, nonnegative: bool = False) -> st.SearchStrategy[list[float]]:
    low = 0.0 if nonnegative else -1e3
    return st.lists(st.floats(low, 1e3, allow_subnormal=False), min_size=n, max_size=n)


@st.composite
def configured_layers(draw: st.DrawFn) -> bn.BatchNorm:
    """A layer of any configuration and mode, with arbitrary (moderate) state."""
    c = draw(st.integers(1, 4))
    layer = bn.BatchNorm(
        c,
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.5])),
        momentum=draw(st.sampled_from([0.9, 0.0, 1.0, 0.5, None])),
        affine=draw(st.booleans()),
        track_running_stats=draw(st.booleans()),
        unbiased=draw(st.booleans()),
        axis=draw(st.sampled_from([1, -1])),
    )
    if layer.affine:
        layer.gamma[:] = draw(_moderate(c))
        layer.beta[:] = draw(_moderate(c))
    if layer.track_running_stats:
        layer.running_mean[:] = draw(_moderate(c))
        layer.running_var[:] = draw(_moderate(c, nonnegative=True))
        layer.num_batches_tracked = draw(st.integers(0, INT64_MAX - 10))
    return layer.train(draw(st.booleans()))


@st.composite
def layers(draw: st.DrawFn) -> tuple[bn.BatchNorm, tuple[Any, ...]]:
    """A layer from configured_layers after a forward and a backward pass; and (dy, dx,
    dgamma, dbeta) of that backward pass."""
    layer = draw(configured_layers())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c = layer.num_features
    y = layer(rng.normal(size=(4, 3, c) if layer.axis == -1 else (4, c, 3)))
    dy = rng.normal(size=y.shape)
    dx = layer.backward(dy)
    dgamma = None if layer.dgamma is None else layer.dgamma.copy()
    dbeta = None if layer.dbeta is None else layer.dbeta.copy()
    return layer, (dy, dx.copy(), dgamma, dbeta)


def expected_keys(layer: bn.BatchNorm) -> list[str]:
    return list(layer.state_dict())


def assert_untouched(
    layer: bn.BatchNorm, before: dict[str, Any], previous: tuple[Any, ...]
) -> None:
    assert snapshot(layer) == before
    dy, dx, dgamma, dbeta = previous
    assert np.array_equal(layer.backward(dy), dx)
    assert raw(layer.dgamma) == raw(dgamma) and raw(layer.dbeta) == raw(dbeta)


# --- valid and invalid state entries ------------------------------------------------------------

FLOAT_DTYPES = ["float16", "float32", "float64"]
INT_DTYPES = ["int8", "int32", "int64", "uint8", "uint64"]


@functools.cache  # strategies are immutable: build each once
def valid_vector(c: int, *, nonnegative: bool) -> st.SearchStrategy[Any]:
    """Any real, finite (C,) array-like; >= 0 for running_var."""
    low = 0.0 if nonnegative else None

    def floats(dtype: str) -> st.SearchStrategy[np.ndarray]:
        elements = hnp.from_dtype(
            np.dtype(dtype), allow_nan=False, allow_infinity=False, min_value=low
        )
        return hnp.arrays(dtype, c, elements=elements)

    def ints(dtype: str) -> st.SearchStrategy[np.ndarray]:
        info = np.iinfo(dtype)
        return hnp.arrays(
            dtype, c, elements=st.integers(max(info.min, 0 if nonnegative else -(2**62)), info.max)
        )

    as_list = st.lists(
        st.floats(min_value=low, allow_nan=False, allow_infinity=False), min_size=c, max_size=c
    )
    return st.one_of(
        st.sampled_from(FLOAT_DTYPES).flatmap(floats),
        st.sampled_from(INT_DTYPES).flatmap(ints),
        as_list,
    )


@functools.cache  # strategies are immutable: build each once
def valid_counter() -> st.SearchStrategy[Any]:
    n = st.integers(0, INT64_MAX)
    return st.one_of(
        n,
        n.map(np.int64),
        n.map(lambda v: np.array(v, dtype=np.uint64)),
        n.map(lambda v: np.array([v])),
        st.integers(0, 255).map(np.uint8),
    )


class Unconvertible:
    """An object NumPy cannot turn into an array (like a tensor that requires grad)."""

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise RuntimeError("cannot convert this object")

    def __repr__(self) -> str:
        return "Unconvertible()"


@functools.cache  # strategies are immutable: build each once
def _poisoned(c: int, nonnegative: bool) -> st.SearchStrategy[np.ndarray]:
    @st.composite
    def make(draw: st.DrawFn) -> np.ndarray:
        dtype = draw(st.sampled_from(FLOAT_DTYPES))
        low = 0.0 if nonnegative else -100.0
        values = np.array(draw(st.lists(st.floats(low, 100.0), min_size=c, max_size=c)), dtype)
        values[draw(st.integers(0, c - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return values

    return make()


@functools.cache  # strategies are immutable: build each once
def _negative(c: int) -> st.SearchStrategy[np.ndarray]:
    @st.composite
    def make(draw: st.DrawFn) -> np.ndarray:
        values = np.array(draw(valid_vector(c, nonnegative=True)), dtype=np.float64)
        negative = st.floats(max_value=-5e-324, allow_nan=False, allow_infinity=False)
        values[draw(st.integers(0, c - 1))] = draw(negative)
        return values

    return make()


@functools.cache  # strategies are immutable: build each once
def invalid_vector(c: int, *, variance: bool) -> st.SearchStrategy[Any]:
    finite = st.floats(-1e6, 1e6)
    wrong_shape = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5).filter(
        lambda shape: shape != (c,)
    )
    strategies = [
        hnp.arrays(np.float64, wrong_shape, elements=finite),
        st.lists(finite, max_size=6).filter(lambda v: len(v) != c),
        hnp.arrays(st.sampled_from(["complex128", "bool", "U3", "S3"]), c),
        st.lists(st.one_of(st.none(), finite, st.text(max_size=3)), min_size=c, max_size=c).map(
            lambda v: np.array(v, dtype=object)
        ),
        st.none(),
        st.text(max_size=5),
        st.binary(max_size=5),
        st.dictionaries(st.text(max_size=3), finite, max_size=2),
        st.just(Unconvertible()),
        st.just([[1.0, 2.0], [3.0]]),  # ragged
        _poisoned(c, nonnegative=variance),
    ]
    if variance:
        strategies.append(_negative(c))
    return st.one_of(strategies)


@functools.cache  # strategies are immutable: build each once
def invalid_counter() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(max_value=-1),
        st.integers(min_value=INT64_MAX + 1),
        st.integers(min_value=INT64_MAX + 1, max_value=2**64 - 1).map(np.uint64),
        st.floats(),
        st.floats(0, 100).map(np.float64),
        st.booleans(),
        st.just(np.bool_(True)),
        st.text(max_size=3),
        st.none(),
        st.complex_numbers(max_magnitude=10),
        hnp.arrays(
            np.int64, st.sampled_from([(0,), (2,), (1, 2), (3, 1)]), elements=st.integers(0, 9)
        ),
        st.just(Unconvertible()),
        st.just(np.array([1], dtype=object)),
    )


@st.composite
def states(draw: st.DrawFn, layer: bn.BatchNorm, strict: bool) -> tuple[dict[Any, Any], bool]:
    """A state dict for `layer` and whether loading it must fail."""
    c = layer.num_features
    keys = expected_keys(layer)
    state: dict[Any, Any] = {}
    for key in keys:
        if key == "num_batches_tracked":
            state[key] = draw(valid_counter())
        else:
            state[key] = draw(valid_vector(c, nonnegative=key == "running_var"))
    bad: set[str] = set()  # keys holding an invalid value
    structural = False  # a missing or an extra key
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["drop", "extra", "bad"]))
        if action == "drop" and state.keys() & set(keys):
            key = draw(st.sampled_from(sorted(state.keys() & set(keys))))
            del state[key]
            bad.discard(key)
            structural = True
        elif action == "extra":
            extra = draw(
                st.one_of(
                    st.text(max_size=12),
                    st.integers(),
                    st.none(),
                    st.sampled_from([*STATE_KEYS, "bn.weight", "running_std", "momentum"]),
                ).filter(lambda k: k not in keys)
            )
            state[extra] = draw(valid_vector(c, nonnegative=False))
            structural = True
        elif action == "bad" and keys:
            key = draw(st.sampled_from(keys))
            if key == "num_batches_tracked":
                state[key] = draw(invalid_counter())
            else:
                state[key] = draw(invalid_vector(c, variance=key == "running_var"))
            bad.add(key)
    # A strict load refuses a missing or extra key; a non-strict one that matches no key loads
    # nothing and reports every key missing, as PyTorch's does (with a warning).
    invalid = bool(bad) or (strict and structural)
    return state, invalid


# --- state dicts --------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_fuzzed_state_dict(data: st.DataObject) -> None:
    layer, previous = data.draw(layers(), label="layer")
    strict = data.draw(st.booleans(), label="strict")
    state, invalid = data.draw(states(layer, strict), label="state")
    before = snapshot(layer)
    keys = expected_keys(layer)
    if invalid:
        with pytest.raises((ValueError, TypeError)) as info:
            layer.load_state_dict(state, strict=strict)
        assert "state" in str(info.value)
        assert_untouched(layer, before, previous)
        return

    if keys and not state.keys() & set(keys):  # non-strict, matching nothing: loads nothing
        with pytest.warns(UserWarning, match="loaded nothing"):
            result = layer.load_state_dict(state, strict=strict)
    else:
        result = layer.load_state_dict(state, strict=strict)
    assert result.missing_keys == [k for k in keys if k not in state]
    assert result.unexpected_keys == sorted(str(k) for k in state if k not in keys)
    loaded = layer.state_dict()
    for key in keys:
        if key not in state:  # strict=False: left as it was
            assert loaded[key].tobytes() == layer_state_bytes(before, key)
        elif key == "num_batches_tracked":
            assert int(loaded[key]) == int(np.asarray(state[key]).reshape(()))
        else:
            assert np.array_equal(loaded[key], np.asarray(state[key], dtype=np.float64))
    # Whatever was loaded reads back and loads again, bit for bit.
    twin = bn.BatchNorm(
        layer.num_features, affine=layer.affine, track_running_stats=layer.track_running_stats
    )
    twin.load_state_dict(loaded)
    assert {k: v.tobytes() for k, v in twin.state_dict().items()} == {
        k: v.tobytes() for k, v in loaded.items()
    }


def layer_state_bytes(before: dict[str, Any], key: str) -> bytes:
    attribute = {"weight": "gamma", "bias": "beta"}.get(key, key)
    value = before[attribute]
    if key == "num_batches_tracked":
        return np.array(value, dtype=np.int64).tobytes()
    return value[2]


NOT_MAPPINGS = st.one_of(
    st.none(),
    st.integers(),
    st.floats(),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.tuples(st.sampled_from(STATE_KEYS), st.just(np.ones(2))), max_size=3),
    st.tuples(st.floats(), st.floats()),
    st.sets(st.text(max_size=3), max_size=3),
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=0, max_dims=2)),
    st.just(object()),
    st.just(iter([("weight", np.ones(2))])),
)


@FUZZ
@given(data=st.data(), state=NOT_MAPPINGS)
def test_non_mapping_state_is_a_type_error(data: st.DataObject, state: Any) -> None:
    layer, previous = data.draw(layers(), label="layer")
    before = snapshot(layer)
    with pytest.raises(TypeError, match="state must be a mapping such as the dict from state_dict"):
        layer.load_state_dict(state, strict=data.draw(st.booleans()))
    assert_untouched(layer, before, previous)


# --- files --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def where(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every example of the module: each example overwrites its files."""
    return tmp_path_factory.mktemp("fuzz")


def saved(layer: bn.BatchNorm, where: Path) -> Path:
    return layer.save(where / "layer.npz")


def entries(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def write_zip(path: Path, content: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name" is the point here
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in content:
                archive.writestr(name, data)
    return path


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as .npy bytes; object arrays are pickled, as np.save(allow_pickle=True) does."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def assert_refused(path: Path, marker: Path | None = None) -> None:
    with pytest.raises(ValueError, match="is not a valid BatchNorm file") as info:
        bn.BatchNorm.load(path)
    assert str(path) in str(info.value)
    if marker is not None:
        assert not marker.exists(), "loading the file ran code from it"


class Payload:
    """Unpickling this creates a folder at `marker`: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def test_payload_is_real(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@FUZZ
@given(data=st.data())
def test_flipped_bits_are_refused_or_harmless(where: Path, data: st.DataObject) -> None:
    layer = data.draw(configured_layers(), label="layer")
    path = saved(layer, where)
    content = bytearray(path.read_bytes())
    flips = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(content) - 1), st.integers(0, 7)),
            min_size=1,
            max_size=8,
        ),
        label="flips",
    )
    for position, bit in flips:
        content[position] ^= 1 << bit
    path.write_bytes(bytes(content))
    try:
        loaded = bn.BatchNorm.load(path)
    except ValueError as err:
        assert "is not a valid BatchNorm file" in str(err)
    else:  # the flips hit a timestamp or other bytes that do not matter
        assert snapshot(loaded, gradients=False) == snapshot(layer, gradients=False)


@FUZZ
@given(data=st.data())
def test_truncated_files_are_refused(where: Path, data: st.DataObject) -> None:
    layer = data.draw(configured_layers(), label="layer")
    path = saved(layer, where)
    content = path.read_bytes()
    path.write_bytes(content[: data.draw(st.integers(0, len(content) - 1), label="length")])
    assert_refused(path)


@FUZZ
@given(
    content=st.one_of(
        st.binary(max_size=3000), st.binary(max_size=3000).map(lambda b: b"PK\x03\x04" + b)
    )
)
def test_random_bytes_are_refused(where: Path, content: bytes) -> None:
    path = where / "random.npz"
    path.write_bytes(content)
    assert_refused(path)


NAMES = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20)


@FUZZ
@given(data=st.data())
def test_renamed_members_are_refused(where: Path, data: st.DataObject) -> None:
    layer = data.draw(configured_layers(), label="layer")
    content = list(members(saved(layer, where)).items())
    names = [name for name, _ in content]
    index = data.draw(st.integers(0, len(content) - 1), label="member")
    new_name = data.draw(
        st.one_of(
            NAMES.filter(bool), NAMES.map(lambda n: n + ".npy"), st.sampled_from(names)
        ).filter(lambda n: n != names[index]),
        label="new name",
    )
    content[index] = (new_name, content[index][1])
    assert_refused(write_zip(where / "renamed.npz", content))


@FUZZ
@given(data=st.data())
def test_object_arrays_are_refused_unpickled(where: Path, data: st.DataObject) -> None:
    layer = data.draw(configured_layers(), label="layer")
    marker = where / "code_ran"
    arrays = entries(saved(layer, where))
    key = data.draw(
        st.one_of(st.sampled_from(sorted(arrays)), NAMES),
        label="key",
    )
    size = data.draw(st.integers(1, 4), label="size")
    objects = np.empty(size, dtype=object)
    objects[:] = [data.draw(st.sampled_from([1.0, "x", None])) for _ in range(size)]
    objects[data.draw(st.integers(0, size - 1))] = Payload(marker)
    arrays[key] = objects
    content = [(f"{name}.npy", npy_bytes(array)) for name, array in arrays.items()]
    assert_refused(write_zip(where / "pickled.npz", content), marker)


@FUZZ
@given(data=st.data())
def test_pickle_payloads_are_never_unpickled(where: Path, data: st.DataObject) -> None:
    layer = data.draw(configured_layers(), label="layer")
    marker = where / "code_ran"
    payload = pickle.dumps(Payload(marker), protocol=data.draw(st.integers(2, 5)))
    how = data.draw(st.sampled_from(["whole_file", "member", "extra_member"]), label="how")
    path = where / "pickled.npz"
    if how == "whole_file":  # np.load(allow_pickle=True) would unpickle this
        path.write_bytes(payload)
    else:
        content = list(members(saved(layer, where)).items())
        if how == "member":
            index = data.draw(st.integers(0, len(content) - 1), label="member")
            content[index] = (content[index][0], payload)
        else:
            content.append((data.draw(NAMES.filter(bool), label="name"), payload))
        write_zip(path, content)
    assert_refused(path, marker)


HEADER_DTYPES = ["<f8", "<f4", "<i8", "|b1", "<c16", "|O", "<U5", "|S3", ">f8"]


@FUZZ
@given(data=st.data())
def test_headers_promising_missing_data_are_refused(where: Path, data: st.DataObject) -> None:
    layer = data.draw(configured_layers(), label="layer")
    content = list(members(saved(layer, where)).items())
    index = data.draw(st.integers(0, len(content) - 1), label="member")
    dtype = np.dtype(data.draw(st.sampled_from(HEADER_DTYPES), label="dtype"))
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=10**6))
    header = {"descr": dtype.str if not dtype.hasobject else "|O", "fortran_order": False}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {**header, "shape": shape})
    declared = int(np.prod(shape)) * dtype.itemsize
    body = data.draw(st.binary(max_size=max(declared - 1, 0)), label="body")
    content[index] = (content[index][0], buffer.getvalue() + body)
    assert_refused(write_zip(where / "short.npz", content))


# What BatchNorm.save writes for each entry: dtype kinds and shape (None: the layer's (C,)).
SAVED_KINDS: dict[str, tuple[str, tuple[int, ...] | None]] = {
    "format": ("U", ()),
    "config_num_features": ("iu", ()),
    "config_eps": ("f", ()),
    "config_momentum": ("f", ()),
    "config_affine": ("b", ()),
    "config_track_running_stats": ("b", ()),
    "config_unbiased": ("b", ()),
    "config_axis": ("iu", ()),
    "config_training": ("b", ()),
    "config_ghost_batch_size": ("iu", ()),
    "config_frozen": ("b", ()),
    "weight": ("iuf", None),
    "bias": ("iuf", None),
    "running_mean": ("iuf", None),
    "running_var": ("iuf", None),
    "num_batches_tracked": ("iu", ()),
}

ANY_ARRAY = hnp.arrays(
    st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes()),
    hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4),
)


@FUZZ
@given(data=st.data(), replacement=ANY_ARRAY)
def test_entries_of_another_kind_are_refused(
    where: Path, data: st.DataObject, replacement: np.ndarray
) -> None:
    # An entry replaced by an array of any dtype and shape: refused unless it has the kind and
    # shape save() writes; then it may load (if its values pass the checks) and round-trips.
    layer = data.draw(configured_layers(), label="layer")
    arrays = entries(saved(layer, where))
    key = data.draw(st.sampled_from(sorted(arrays)), label="key")
    arrays[key] = replacement
    path = write_zip(
        where / "replaced.npz", [(f"{k}.npy", npy_bytes(v)) for k, v in arrays.items()]
    )
    kinds, shape = SAVED_KINDS[key]
    if key == "num_batches_tracked":  # one integer, whatever the shape (PyTorch saves ())
        fits = replacement.size == 1
    else:
        fits = replacement.shape == ((layer.num_features,) if shape is None else shape)
    compatible = fits and replacement.dtype.kind in kinds
    if not compatible:
        assert_refused(path)
        return
    try:
        loaded = bn.BatchNorm.load(path)
    except ValueError as err:
        assert "is not a valid BatchNorm file" in str(err)
    else:
        again = bn.BatchNorm.load(loaded.save(where / "again.npz"))
        assert snapshot(again, gradients=False) == snapshot(loaded, gradients=False)


def test_missing_file_is_file_not_found(where: Path) -> None:
    with pytest.raises(FileNotFoundError):
        bn.BatchNorm.load(where / "nothing_here.npz")


# --- valid files and states round-trip ----------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_valid_files_round_trip(where: Path, data: st.DataObject) -> None:
    layer = data.draw(configured_layers(), label="layer")
    loaded = bn.BatchNorm.load(saved(layer, where))
    assert snapshot(loaded, gradients=False) == snapshot(layer, gradients=False)
    assert loaded.dgamma is None and loaded.dbeta is None


@FUZZ
@given(data=st.data())
def test_valid_states_round_trip(data: st.DataObject) -> None:
    source = data.draw(configured_layers(), label="source")
    target = bn.BatchNorm(
        source.num_features,
        affine=source.affine,
        track_running_stats=source.track_running_stats,
    )
    result = target.load_state_dict(source.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    for attribute in ["gamma", "beta", "running_mean", "running_var", "num_batches_tracked"]:
        assert raw(getattr(target, attribute)) == raw(getattr(source, attribute))
