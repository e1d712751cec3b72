"""Bad input to every public function and method: the right answer or a clear error, no damage.

Each public entry point is called with one argument replaced by a variant of a good value: None,
Python lists and scalars, 0-d and 1-d arrays, the wrong rank or channel count, int, bool,
complex, object and string dtypes, NaN, inf, values whose variance overflows (1e30 in float32,
1e200 in float64), empty batches, strided, Fortran-ordered, reversed, broadcast and read-only
views, float32/float16 data with float64 parameters, int parameters. Every call has one of
three outcomes:

* OK: the result equals that of the same call on a clean C-contiguous float64 copy of the
  argument (to the precision of the argument's dtype), including where it is NaN or inf.
* PROPAGATE (the statistics kernels only, see below): the poisoned channel's statistics are
  NaN or inf and every other channel is as in OK.
* An error: TypeError (wrong type or dtype), ValueError (wrong shape, value or range) or
  FloatingPointError (statistics that are not finite), with a message naming the argument.

In every case no RuntimeWarning escapes (every warning is an error in this module), array
arguments are not modified, and after an error every layer or PopulationStats involved is bit
for bit as it was: parameters, running statistics, counter, mode, dgamma/dbeta, and the
previous forward pass still backpropagates to the same dx.

NaN and inf, decided:

* The kernels (forward_train, forward_eval, backward, moments) are arithmetic and propagate.
  forward_train and moments give NaN or inf statistics (cache.mean / cache.var) for a channel
  holding NaN or inf or whose variance overflows, and that channel's y and dx are then
  meaningless (NaN, or 0 when only the variance overflowed); other channels are exact. So a
  caller of the kernels checks cache.mean / cache.var, as BatchNorm does. forward_eval and
  eval-mode backward act element by element: a NaN stays where it was. No call warns.
* What records statistics refuses them: BatchNorm.forward in training mode,
  PopulationStats.update and precise_bn raise FloatingPointError naming the channels and
  change nothing. BatchNorm in eval mode is a forward_eval call and propagates.
* Values the caller gives as parameters or statistics (gamma, beta, mean, var, state entries,
  update_from_moments, fold's bias) must be finite: ValueError. So must the weight given to
  fold_batchnorm and the x given to check_gradients, whose results would otherwise be NaN
  without saying why. A finite result that overflows (folding in float32, pooling moments
  ~1e154 apart) is a FloatingPointError.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from helpers import STATE, layer_snapshot, raw

import batchnorm as bn
from batchnorm.fold import fold_batchnorm
from batchnorm.functional import moments
from batchnorm.gradcheck import check_gradients

# Every warning is an error, except the one a small momentum gets by design (momentum=0 is
# valid input here; tests/test_first_steps.py checks the warning).
pytestmark = [
    pytest.mark.filterwarnings("error"),
    pytest.mark.filterwarnings("ignore:momentum=.* weights the OLD running value:UserWarning"),
]

C = 3
SHAPE = (6, C, 2)  # (N, C, L): 12 values per channel
POISONED = 1  # the channel that NaN, inf and huge values go to

# The RuntimeWarnings that functional.py still lets escape (an np.errstate there fixes them).


# --- outcomes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raises:
    error: type[Exception]
    match: str


@dataclass(frozen=True)
class Ok:
    pass


@dataclass(frozen=True)
class Propagate:
    pass


OK = Ok()
PROPAGATE = Propagate()
Outcome = Raises | Ok | Propagate


# --- variants of good values --------------------------------------------------------------------

# Array data (x, dy, a batch, fold's weight), made from a good float64 array whose channel
# axis is `axis`.
DTYPE_KINDS = ["int64", "bool", "complex128", "object", "str"]
LAYOUT_KINDS = [
    "nested_list",
    "strided",
    "fortran",
    "reversed_strides",
    "broadcast",
    "readonly",
    "float32",
    "float16",
]
RANK_KINDS = ["python_scalar", "0d", "1d"]
POISON_KINDS = ["nan", "inf", "minus_inf", "huge_float32", "huge_float64"]
ACTIVATION_KINDS = [
    "none",
    *LAYOUT_KINDS,
    *RANK_KINDS,
    "wrong_rank",
    "wrong_channels",
    "empty",
    *DTYPE_KINDS,
    *POISON_KINDS,
]


def _readonly(a: np.ndarray) -> np.ndarray:
    out = np.array(a, copy=True)
    out.setflags(write=False)
    return out


def _poison(x: np.ndarray, kind: str, axis: int) -> np.ndarray:
    out = x.astype(np.float32 if kind == "huge_float32" else np.float64)
    channel = np.moveaxis(out, axis, 0)[POISONED]  # a view into out
    if kind in ("huge_float32", "huge_float64"):
        channel *= 1e30 if kind == "huge_float32" else 1e200
    else:
        channel.flat[3] = {"nan": np.nan, "inf": np.inf, "minus_inf": -np.inf}[kind]
    return out


def activation(kind: str, x: np.ndarray, axis: int = 1) -> Any:
    """A variant of the good float64 array x."""
    if kind == "none":
        return None
    if kind == "nested_list":
        return x.tolist()
    if kind == "strided":
        buffer = np.zeros((*x.shape, 2))
        buffer[..., 1] = x
        return buffer[..., 1]
    if kind == "fortran":
        return np.asfortranarray(x)
    if kind == "reversed_strides":
        return np.flip(np.flip(x, axis=0).copy(), axis=0)
    if kind == "broadcast":  # zero strides, read-only
        return np.broadcast_to(x[:1], x.shape)
    if kind == "readonly":
        return _readonly(x)
    if kind in ("float32", "float16"):
        return x.astype(kind)
    if kind == "python_scalar":
        return 1.5
    if kind == "0d":
        return np.array(1.5)
    if kind == "1d":
        return x.reshape(-1)[:C].copy()
    if kind == "wrong_rank":
        return x[None]
    if kind == "wrong_channels":
        first = [slice(None)] * x.ndim
        first[axis] = slice(0, 1)
        return np.concatenate([x, x[tuple(first)]], axis=axis)
    if kind == "empty":
        return x[:0]
    if kind == "object":
        return x.astype(object)
    if kind == "str":
        return x.astype(str)
    if kind in DTYPE_KINDS:
        return x.astype(kind)
    assert kind in POISON_KINDS, kind
    return _poison(x, kind, axis)


# Per-channel vectors (gamma, beta, mean, var, state entries, fold's bias) of shape (C,).
VECTOR_SHAPE_KINDS = ["python_scalar", "0d", "wrong_length", "wrong_rank", "empty"]
VECTOR_DTYPE_KINDS = ["bool", "complex128", "object", "str"]
VECTOR_OK_KINDS = ["list", "int", "strided", "broadcast", "readonly", "float32", "float16"]
VECTOR_KINDS = [
    "none",
    *VECTOR_OK_KINDS,
    *VECTOR_SHAPE_KINDS,
    *VECTOR_DTYPE_KINDS,
    "nan",
    "inf",
    "huge",
    "negative",
]


def vector(kind: str, v: np.ndarray) -> Any:
    """A variant of the good float64 vector v, shape (C,), all values > 0.25."""
    changed = v.copy()
    if kind == "none":
        return None
    if kind == "list":
        return v.tolist()
    if kind == "int":
        return np.arange(1, C + 1)
    if kind == "strided":
        buffer = np.zeros(2 * C)
        buffer[1::2] = v
        return buffer[1::2]
    if kind == "broadcast":
        return np.broadcast_to(v[:1], (C,))
    if kind == "readonly":
        return _readonly(v)
    if kind in ("float32", "float16"):
        return v.astype(kind)
    if kind == "python_scalar":
        return 1.5
    if kind == "0d":
        return np.array(1.5)
    if kind == "wrong_length":
        return np.append(v, 1.0)
    if kind == "wrong_rank":
        return v[:, None]
    if kind == "empty":
        return np.empty(0)
    if kind == "object":
        return v.astype(object)
    if kind == "str":
        return v.astype(str)
    if kind in VECTOR_DTYPE_KINDS:
        return v.astype(kind)
    changed[POISONED] = {"nan": np.nan, "inf": np.inf, "huge": 1e200, "negative": -0.5}[kind]
    return changed


# Python and NumPy scalars for counts, hyperparameters and flags.
SCALARS: dict[str, Any] = {
    "none": None,
    "list": [1],
    "python_int": 1,
    "numpy_int": np.int64(1),
    "python_bool": True,
    "numpy_bool": np.bool_(True),
    "python_float": 0.5,
    "numpy_float": np.float32(0.5),
    "0d_int": np.array(1),
    "1d_int": np.array([1, 1]),
    "complex": 0.5 + 0j,
    "str": "1",
    "nan": float("nan"),
    "inf": float("inf"),
    "negative": -1,
    "zero": 0,
    "huge_int": 10**30,
    "huge_float": 1e30,
}
SCALAR_KINDS = list(SCALARS)


def scalar(kind: str, good: Any) -> Any:
    value = SCALARS[kind]
    return list(value) if isinstance(value, list) else value


def clean(value: Any) -> Any:
    """The clean C-contiguous float64 copy a variant is compared against (None stays None)."""
    return None if value is None else np.array(value, dtype=np.float64, order="C")


def clean_scalar(value: Any) -> Any:
    if isinstance(value, list):
        return value[0]
    return value.item() if isinstance(value, np.ndarray | np.generic) else value


# --- outcome rules ------------------------------------------------------------------------------


def activation_outcome(profile: str, kind: str) -> Outcome:
    """What a call does with a variant of its array data, by the kind of call (profile)."""
    name = {"grad": "dy", "fold": "weight"}.get(profile, "x")
    if kind == "none":
        return Raises(TypeError, f"{name} must be a floating-point array; got None")
    if kind in DTYPE_KINDS:
        return Raises(TypeError, f"{name} must have dtype float16, float32 or float64; got")
    if kind in LAYOUT_KINDS:
        return OK
    if profile == "grad":
        if kind in POISON_KINDS:
            return OK
        return Raises(ValueError, "dy must have the shape of the forward input and output")
    if profile == "fold":
        if kind in ("nan", "inf", "minus_inf"):
            return Raises(ValueError, r"weight must be finite; 1 of its 24 values are NaN or inf")
        if kind in POISON_KINDS:
            return OK
        return Raises(ValueError, "weight must have shape .* with 3 outputs")
    if kind in RANK_KINDS:
        return Raises(ValueError, r"x must have at least 2 dimensions, \(N, C\)")
    if kind in ("wrong_rank", "wrong_channels"):
        if profile == "moments":
            return OK
        if profile in ("train", "eval", "gradcheck"):
            return Raises(
                ValueError,
                r"gamma must have shape \(\d+,\), one value per channel; got shape \(3,\)",
            )
        return Raises(ValueError, r"expected 3 channels \(num_features\) on axis 1")
    if kind == "empty":
        if profile in ("eval", "layer_eval", "update", "moments"):  # moments: count 0
            return OK
        return Raises(ValueError, r"x holds no values per channel \(shape \(0, 3, 2\)\)")
    assert kind in POISON_KINDS
    if profile in ("eval", "layer_eval") or kind == "huge_float32":
        # Inputs this small are computed in float64 (the lean regime), where values of 1e30
        # square without overflow; test_functional checks the large float32 regime.
        return OK
    if profile in ("train", "moments"):
        return PROPAGATE
    if profile == "gradcheck":
        if kind in ("nan", "inf", "minus_inf"):
            return Raises(ValueError, r"x must be finite; 1 of its 36 values are NaN or inf")
        return OK
    assert profile in ("layer_train", "update", "precise"), profile
    unchanged = "this PopulationStats was" if profile == "update" else "the running statistics were"
    return Raises(
        FloatingPointError,
        rf"the batch statistics of channels \[1\] are not finite .*; {unchanged} left unchanged",
    )


def vector_outcome(profile: str, name: str, kind: str) -> Outcome:
    """profile: "optional" (None allowed), "required", "variance" (>= 0), "pooled_mean"."""
    escaped = re.escape(name)
    if kind == "none":
        if profile == "optional":
            return OK
        if name.startswith("state["):
            return Raises(TypeError, f"{escaped} must hold real numbers")
        return Raises(TypeError, rf"{escaped} must be an array of shape \(3,\); got None")
    if kind in VECTOR_OK_KINDS:
        return OK
    if kind in VECTOR_SHAPE_KINDS:
        return Raises(ValueError, rf"{escaped} must have shape \(3,\), one value per channel; got")
    if kind in VECTOR_DTYPE_KINDS:
        return Raises(TypeError, rf"{escaped} must hold real numbers \(float or int\); got dtype")
    if kind in ("nan", "inf"):
        return Raises(ValueError, rf"{escaped} must be finite; channels \[1\] hold NaN or inf")
    if kind == "negative" and name.endswith(("var", "var']")):
        return Raises(ValueError, rf"{escaped} must be >= 0 \(it is a variance\); channels \[1\]")
    if kind == "huge" and profile == "pooled_mean":
        return Raises(FloatingPointError, r"pooling overflowed: .* channels \[1\]")
    return OK


def count_outcome(kind: str) -> Outcome:
    """PopulationStats.update_from_moments(count=...)."""
    if kind in ("python_int", "numpy_int", "zero", "huge_int"):
        return OK
    return Raises(ValueError, r"count must be a non-negative int \(values per channel\); got")


def counter_outcome(kind: str) -> Outcome:
    """state['num_batches_tracked']."""
    if kind in ("python_int", "numpy_int", "0d_int", "list", "zero"):
        return OK
    return Raises(ValueError, r"state\['num_batches_tracked'\] must be one non-negative integer")


def positive_int_outcome(name: str) -> Callable[[str], Outcome]:
    """num_features, num_batches_precise."""

    def outcome(kind: str) -> Outcome:
        if kind in ("python_int", "numpy_int") or (kind == "huge_int" and name != "num_features"):
            return OK
        if kind == "huge_int":
            return Raises(ValueError, "num_features=.* is more channels than a NumPy array can")
        # A value of the wrong type is a TypeError, an int out of range a ValueError.
        error = ValueError if kind in ("negative", "zero") else TypeError
        return Raises(error, f"{name} must be a positive int")

    return outcome


def eps_outcome(kind: str) -> Outcome:
    if kind in ("python_int", "numpy_int", "python_float", "numpy_float", "huge_int", "huge_float"):
        return OK
    if kind in ("nan", "inf", "negative", "zero"):
        return Raises(ValueError, r"eps must be a finite float > 0 \(it keeps 1/sqrt")
    return Raises(TypeError, "eps must be a positive float such as 1e-5; got")


def momentum_outcome(kind: str) -> Outcome:
    if kind in ("none", "python_int", "numpy_int", "python_float", "numpy_float", "zero"):
        return OK
    if kind in ("nan", "inf", "negative", "huge_int", "huge_float"):
        return Raises(ValueError, r"momentum must be in \[0, 1\] or None; got .* the weight of the")
    return Raises(TypeError, r"momentum must be a float in \[0, 1\] or None; got")


def flag_outcome(name: str) -> Callable[[str], Outcome]:
    def outcome(kind: str) -> Outcome:
        if kind in ("python_bool", "numpy_bool"):
            return OK
        return Raises(TypeError, f"{name} must be True or False; got")

    return outcome


def axis_outcome(kind: str) -> Outcome:
    # Any int is an axis; whether it fits the data is checked when data arrives.
    if kind in ("python_int", "numpy_int", "negative", "zero", "huge_int"):
        return OK
    return Raises(TypeError, r"axis must be an int \(1 for \(N, C, ...\), -1 for channels-last\)")


# --- snapshots ----------------------------------------------------------------------------------


def layer_values(layer: bn.BatchNorm) -> dict[str, Any]:
    """The layer's state as values, to compare with a reference layer up to rounding."""
    return {f"layer.{name}": getattr(layer, name) for name in STATE}


def stats_snapshot(stats: bn.PopulationStats) -> dict[str, Any]:
    state: dict[str, Any] = {"count": stats.count, "num_batches": stats.num_batches}
    if stats.count:
        state.update(mean=raw(stats.mean), var=raw(stats.var(unbiased=False)))
    return state


def stats_values(stats: bn.PopulationStats) -> dict[str, Any]:
    return {
        "stats.count": stats.count,
        "stats.num_batches": stats.num_batches,
        "stats.mean": stats.mean,
        "stats.var": stats.var(unbiased=False),
    }


class Witness:
    """Records a layer (after a forward and backward pass) or a PopulationStats, and the
    arguments of a call, to check afterwards that nothing changed."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self.inputs = {k: _frozen(v) for k, v in args.items() if not k.startswith("_")}
        self.layers = [v for v in args.values() if isinstance(v, bn.BatchNorm)]
        self.snapshots = [layer_snapshot(layer) for layer in self.layers]
        self.stats = [v for v in args.values() if isinstance(v, bn.PopulationStats)]
        self.stats_snapshots = [stats_snapshot(s) for s in self.stats]

    def assert_inputs_unchanged(self) -> None:
        for key, before in self.inputs.items():
            assert _frozen(self.args[key]) == before, f"argument {key} was modified"

    def assert_unchanged(self) -> None:
        self.assert_inputs_unchanged()
        for layer, before in zip(self.layers, self.snapshots, strict=True):
            assert layer_snapshot(layer) == before
        for stats, before in zip(self.stats, self.stats_snapshots, strict=True):
            assert stats_snapshot(stats) == before
        # The previous forward pass of the layer still backpropagates to the same gradients.
        previous = self.args.get("_previous")
        if previous is not None:
            layer, dy, dx, dgamma, dbeta = previous
            assert np.array_equal(layer.backward(dy), dx)
            assert raw(layer.dgamma) == raw(dgamma) and raw(layer.dbeta) == raw(dbeta)


def _frozen(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return (raw(value), value.flags.writeable)
    if isinstance(value, list):
        return repr(value)
    if isinstance(value, bn.BatchNorm | bn.PopulationStats):
        return id(value)
    return repr(value)


# --- comparison ---------------------------------------------------------------------------------


def tolerance(value: Any) -> float:
    if value is None or isinstance(value, str):
        return 1e-12
    dtype = np.asarray(value).dtype
    return {np.dtype(np.float16): 1e-2, np.dtype(np.float32): 1e-4}.get(dtype, 1e-12)


def assert_close(got: Any, want: Any, tol: float, name: str, skip_channel: bool = False) -> None:
    """got equals want up to tol relative to each channel's largest value; non-finite values
    at the same places. Arrays of rank >= 2 have their channels on axis 1, vectors on axis 0."""
    if isinstance(want, float):
        got, want = np.array([got]), np.array([want])
    if not isinstance(want, np.ndarray):
        assert got == want, name
        assert type(got) is type(want), name
        return
    assert isinstance(got, np.ndarray), name
    assert got.shape == want.shape, name
    axis = 1 if want.ndim >= 2 else 0
    if skip_channel:
        got, want = np.delete(got, POISONED, axis=axis), np.delete(want, POISONED, axis=axis)
    g, w = got.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(w)
    assert np.array_equal(np.isfinite(g), finite), f"{name}: non-finite values differ"
    assert np.array_equal(g[~finite], w[~finite], equal_nan=True), name
    if w.size == 0:
        return
    other = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.max(np.where(finite, np.abs(w), 0.0), axis=other, keepdims=True)
    bound = tol * np.maximum(scale, 1.0)
    error = np.abs(np.where(finite, g, 0.0) - np.where(finite, w, 0.0))
    assert (error <= bound).all(), f"{name}: off by {np.max(error / bound):.3g} tolerances"


# --- the targets --------------------------------------------------------------------------------


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(1.0, 2.0, SHAPE)


def _dy(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(99).standard_normal(shape)


def _vectors(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gamma": rng.uniform(0.5, 2.0, C),
        "beta": rng.uniform(0.5, 2.0, C),
        "mean": rng.uniform(0.5, 2.0, C),
        "var": rng.uniform(0.5, 2.0, C),
    }


def _trained_layer(**options: Any) -> tuple[bn.BatchNorm, tuple[Any, ...]]:
    """A layer with non-trivial state after two training steps, and its last backward pass."""
    rng = np.random.default_rng(7)
    layer = bn.BatchNorm(C, **options)
    layer.gamma[:] = rng.uniform(0.5, 2.0, C)
    layer.beta[:] = rng.normal(size=C)
    layer(rng.normal(2.0, 3.0, SHAPE))
    layer(rng.normal(2.0, 3.0, SHAPE))
    dy = rng.standard_normal(SHAPE)
    dx = layer.backward(dy)
    return layer, (layer, dy, dx.copy(), layer.dgamma.copy(), layer.dbeta.copy())


def _layer_args(**options: Any) -> dict[str, Any]:
    layer, previous = _trained_layer(**options)
    return {"layer": layer, "_previous": previous}


def _stats_args() -> dict[str, Any]:
    stats = bn.PopulationStats(C)
    stats.update(np.random.default_rng(8).normal(1.0, 2.0, SHAPE))
    return {"stats": stats}


def _with_backward(y: np.ndarray, cache: bn.BatchNormCache) -> dict[str, Any]:
    dx, dgamma, dbeta = bn.backward(_dy(y.shape), cache)
    return {"y": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}


def run_forward_train(a: dict[str, Any]) -> dict[str, Any]:
    y, cache = bn.forward_train(a["x"], a["gamma"], a["beta"])
    return {**_with_backward(y, cache), "mean": cache.mean, "var": cache.var, "m": cache.count}


def run_forward_eval(a: dict[str, Any]) -> dict[str, Any]:
    y, cache = bn.forward_eval(a["x"], a["gamma"], a["beta"], a["mean"], a["var"])
    return _with_backward(y, cache)


def run_backward(a: dict[str, Any]) -> dict[str, Any]:
    dx, dgamma, dbeta = bn.backward(a["dy"], a["_cache"])
    return {"dx": dx, "dgamma": dgamma, "dbeta": dbeta}


def run_moments(a: dict[str, Any]) -> dict[str, Any]:
    mean, var, count = moments(a["x"])
    return {"mean": mean, "var": var, "m": count}


def run_layer_forward(a: dict[str, Any]) -> dict[str, Any]:
    layer = a["layer"]
    y = layer(a["x"])
    dx = layer.backward(_dy(y.shape))
    return {"y": y, "dx": dx, **layer_values(layer), "dgamma": layer.dgamma, "dbeta": layer.dbeta}


def run_layer_backward(a: dict[str, Any]) -> dict[str, Any]:
    layer = a["layer"]
    dx = layer.backward(a["dy"])
    return {"dx": dx, **layer_values(layer), "dgamma": layer.dgamma, "dbeta": layer.dbeta}


STATE_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def run_load_state_dict(a: dict[str, Any]) -> dict[str, Any]:
    state = {key: a[key] for key in STATE_KEYS}
    result = a["layer"].load_state_dict(state)
    return {"result": repr(result), **layer_values(a["layer"])}


def run_update(a: dict[str, Any]) -> dict[str, Any]:
    a["stats"].update(a["x"])
    return stats_values(a["stats"])


def run_update_from_moments(a: dict[str, Any]) -> dict[str, Any]:
    a["stats"].update_from_moments(a["mean"], a["var"], a["count"])
    return stats_values(a["stats"])


def run_precise_bn(a: dict[str, Any]) -> dict[str, Any]:
    layer = a["layer"]
    batches = [a["batch0"], a["batch"], a["batch2"]]
    # Asking for more batches than there are is allowed, with a UserWarning, recorded here;
    # every other warning is still an error.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        summaries = bn.precise_bn(layer, batches, a["num_batches_precise"])
    messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    return {"values": summaries[0].values, "warnings": messages, **layer_values(layer)}


def run_fold(a: dict[str, Any]) -> dict[str, Any]:
    weight, bias = fold_batchnorm(a["weight"], a["bias"], a["layer"])
    return {"weight": weight, "bias": bias}


def run_check_gradients(a: dict[str, Any]) -> dict[str, Any]:
    errors = check_gradients(
        a["x"], a["gamma"], a["beta"], training=a["_training"], mean=a["mean"], var=a["var"]
    )
    return {name: float(err) for name, err in errors.items()}


def run_constructor(a: dict[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in a.items() if not k.startswith("_")}
    layer = bn.BatchNorm(**options)
    snap = layer_snapshot(layer)
    return {name: snap[name] for name in snap}


def run_stats_constructor(a: dict[str, Any]) -> dict[str, Any]:
    stats = bn.PopulationStats(a["num_features"])
    return {"num_features": stats.num_features, "count": stats.count}


def setup_forward_train() -> dict[str, Any]:
    v = _vectors()
    return {"x": _x(), "gamma": v["gamma"], "beta": v["beta"]}


def setup_forward_eval() -> dict[str, Any]:
    return {"x": _x(), **_vectors()}


def setup_backward(training: bool) -> Callable[[], dict[str, Any]]:
    def setup() -> dict[str, Any]:
        v = _vectors()
        if training:
            _, cache = bn.forward_train(_x(), v["gamma"], v["beta"])
        else:
            _, cache = bn.forward_eval(_x(), v["gamma"], v["beta"], v["mean"], v["var"])
        return {"dy": _dy(SHAPE), "_cache": cache}

    return setup


def setup_layer_forward(training: bool) -> Callable[[], dict[str, Any]]:
    def setup() -> dict[str, Any]:
        args = _layer_args()
        args["layer"].train(training)
        return {**args, "x": _x()}

    return setup


def setup_layer_backward(training: bool) -> Callable[[], dict[str, Any]]:
    def setup() -> dict[str, Any]:
        layer, _ = _trained_layer()
        layer.train(training)
        layer(_x(3))
        dy = _dy(SHAPE)
        dx = layer.backward(dy)
        previous = (layer, dy, dx.copy(), layer.dgamma.copy(), layer.dbeta.copy())
        return {"layer": layer, "_previous": previous, "dy": dy}

    return setup


def setup_load_state_dict() -> dict[str, Any]:
    rng = np.random.default_rng(5)
    state = {
        "weight": rng.uniform(0.5, 2.0, C),
        "bias": rng.uniform(0.5, 2.0, C),
        "running_mean": rng.uniform(0.5, 2.0, C),
        "running_var": rng.uniform(0.5, 2.0, C),
        "num_batches_tracked": 17,
    }
    return {**_layer_args(), **state}


def setup_update() -> dict[str, Any]:
    return {**_stats_args(), "x": _x()}


def setup_update_from_moments() -> dict[str, Any]:
    v = _vectors()
    return {**_stats_args(), "mean": v["mean"], "var": v["var"], "count": 12}


def setup_precise_bn() -> dict[str, Any]:
    return {
        **_layer_args(),
        "batch0": _x(10),
        "batch": _x(11),
        "batch2": _x(12),
        "num_batches_precise": 3,
    }


def setup_fold() -> dict[str, Any]:
    args = _layer_args()
    args["layer"].eval()
    rng = np.random.default_rng(6)
    return {**args, "weight": rng.normal(size=(C, 8)), "bias": rng.normal(size=C)}


def setup_check_gradients(training: bool) -> Callable[[], dict[str, Any]]:
    def setup() -> dict[str, Any]:
        v = _vectors()
        if training:
            v["mean"] = v["var"] = None  # type: ignore[assignment]
        return {"x": _x(), **v, "_training": training}

    return setup


CONSTRUCTOR_DEFAULTS: dict[str, Any] = {
    "num_features": C,
    "eps": 1e-5,
    "momentum": 0.9,
    "affine": True,
    "track_running_stats": True,
    "unbiased": True,
    "axis": 1,
}


@dataclass(frozen=True)
class Slot:
    family: str  # "activation", "vector" or "scalar"
    outcome: Callable[[str], Outcome]
    axis: int = 1  # the channel axis of activation data


@dataclass(frozen=True)
class Target:
    setup: Callable[[], dict[str, Any]]
    run: Callable[[dict[str, Any]], dict[str, Any]]
    slots: dict[str, Slot]


def _act(profile: str, axis: int = 1) -> Slot:
    return Slot("activation", lambda kind: activation_outcome(profile, kind), axis)


def _vec(profile: str, name: str) -> Slot:
    return Slot("vector", lambda kind: vector_outcome(profile, name, kind))


def _eval_stat(name: str) -> Slot:
    def outcome(kind: str) -> Outcome:
        if kind == "none":
            return Raises(ValueError, rf"needs mean= and var= to evaluate with; {name} missing")
        return vector_outcome("required", name, kind)

    return Slot("vector", outcome)


def _state(key: str) -> Slot:
    profile = "variance" if key == "running_var" else "required"
    return _vec(profile, f"state[{key!r}]")


TARGETS: dict[str, Target] = {
    "forward_train": Target(
        setup_forward_train,
        run_forward_train,
        {
            "x": _act("train"),
            "gamma": _vec("optional", "gamma"),
            "beta": _vec("optional", "beta"),
        },
    ),
    "forward_eval": Target(
        setup_forward_eval,
        run_forward_eval,
        {
            "x": _act("eval"),
            "gamma": _vec("optional", "gamma"),
            "beta": _vec("optional", "beta"),
            "mean": _vec("required", "mean"),
            "var": _vec("variance", "var"),
        },
    ),
    "backward[train]": Target(setup_backward(True), run_backward, {"dy": _act("grad")}),
    "backward[eval]": Target(setup_backward(False), run_backward, {"dy": _act("grad")}),
    "moments": Target(lambda: {"x": _x()}, run_moments, {"x": _act("moments")}),
    "BatchNorm": Target(
        lambda: dict(CONSTRUCTOR_DEFAULTS),
        run_constructor,
        {
            "num_features": Slot("scalar", positive_int_outcome("num_features")),
            "eps": Slot("scalar", eps_outcome),
            "momentum": Slot("scalar", momentum_outcome),
            "affine": Slot("scalar", flag_outcome("affine")),
            "track_running_stats": Slot("scalar", flag_outcome("track_running_stats")),
            "unbiased": Slot("scalar", flag_outcome("unbiased")),
            "axis": Slot("scalar", axis_outcome),
        },
    ),
    "layer.forward[train]": Target(
        setup_layer_forward(True), run_layer_forward, {"x": _act("layer_train")}
    ),
    "layer.forward[eval]": Target(
        setup_layer_forward(False), run_layer_forward, {"x": _act("layer_eval")}
    ),
    "layer.backward[train]": Target(
        setup_layer_backward(True), run_layer_backward, {"dy": _act("grad")}
    ),
    "layer.backward[eval]": Target(
        setup_layer_backward(False), run_layer_backward, {"dy": _act("grad")}
    ),
    "load_state_dict": Target(
        setup_load_state_dict,
        run_load_state_dict,
        {
            **{key: _state(key) for key in STATE_KEYS[:4]},
            "num_batches_tracked": Slot("scalar", counter_outcome),
        },
    ),
    "PopulationStats": Target(
        lambda: {"num_features": C},
        run_stats_constructor,
        {"num_features": Slot("scalar", positive_int_outcome("num_features"))},
    ),
    "PopulationStats.update": Target(setup_update, run_update, {"x": _act("update")}),
    "PopulationStats.update_from_moments": Target(
        setup_update_from_moments,
        run_update_from_moments,
        {
            "mean": _vec("pooled_mean", "mean"),
            "var": _vec("variance", "var"),
            "count": Slot("scalar", count_outcome),
        },
    ),
    "precise_bn": Target(
        setup_precise_bn,
        run_precise_bn,
        {
            "batch": _act("precise"),
            "num_batches_precise": Slot("scalar", positive_int_outcome("num_batches_precise")),
        },
    ),
    "fold_batchnorm": Target(
        setup_fold,
        run_fold,
        {"weight": _act("fold", axis=0), "bias": _vec("optional", "bias")},
    ),
    "check_gradients[train]": Target(
        setup_check_gradients(True),
        run_check_gradients,
        {
            "x": _act("gradcheck"),
            "gamma": _vec("optional", "gamma"),
            "beta": _vec("optional", "beta"),
        },
    ),
    "check_gradients[eval]": Target(
        setup_check_gradients(False),
        run_check_gradients,
        {"mean": _eval_stat("mean"), "var": _eval_stat("var")},
    ),
}

KINDS = {"activation": ACTIVATION_KINDS, "vector": VECTOR_KINDS, "scalar": SCALAR_KINDS}


def _cases() -> list[Any]:
    cases = []
    for name, target in TARGETS.items():
        for slot_name, slot in target.slots.items():
            for kind in KINDS[slot.family]:
                cases.append(pytest.param(name, slot_name, kind, id=f"{name}-{slot_name}-{kind}"))
    return cases


def make_variant(slot: Slot, kind: str, good: Any) -> Any:
    if slot.family == "activation":
        return activation(kind, good, slot.axis)
    if slot.family == "vector":
        return vector(kind, good)
    return scalar(kind, good)


@pytest.mark.parametrize(("target_name", "slot_name", "kind"), _cases())
def test_bad_input(target_name: str, slot_name: str, kind: str) -> None:
    target = TARGETS[target_name]
    slot = target.slots[slot_name]
    args = target.setup()
    variant = make_variant(slot, kind, args[slot_name])
    args[slot_name] = variant
    expected = slot.outcome(kind)
    witness = Witness(args)

    if isinstance(expected, Raises):
        with pytest.raises(expected.error, match=expected.match):
            target.run(args)
        witness.assert_unchanged()
        return

    got = target.run(args)
    witness.assert_inputs_unchanged()
    reference = target.setup()
    if slot.family == "scalar":
        reference[slot_name] = clean_scalar(variant)
    else:
        reference[slot_name] = clean(variant)
    want = target.run(reference)
    assert got.keys() == want.keys()
    tol = tolerance(variant)
    for name in want:
        assert_close(got[name], want[name], tol, name, skip_channel=expected is PROPAGATE)
    if expected is PROPAGATE:
        # The poisoned channel's statistics say so; the other channels were checked above.
        mean, var = got["mean"][POISONED], got["var"][POISONED]
        assert not (np.isfinite(mean) and np.isfinite(var))


# --- whole objects in the wrong place -----------------------------------------------------------

NOT_A_MAPPING = {
    "none": None,
    "list_of_pairs": [("weight", np.ones(C))],
    "tuple": (np.ones(C),),
    "string": "weight",
    "int": 3,
    "array": np.ones(C),
    "layer": bn.BatchNorm(C),
}


@pytest.mark.parametrize("state", list(NOT_A_MAPPING.values()), ids=list(NOT_A_MAPPING))
def test_load_state_dict_of_a_non_mapping(state: Any) -> None:
    args = _layer_args()
    witness = Witness(args)
    with pytest.raises(TypeError, match="state must be a mapping such as the dict from state_dict"):
        args["layer"].load_state_dict(state)
    witness.assert_unchanged()


NOT_A_CACHE = {
    "none": None,
    "tuple": (np.zeros(C), np.ones(C)),
    "dict": {"mean": np.zeros(C), "var": np.ones(C)},
    "layer": bn.BatchNorm(C),
}


@pytest.mark.parametrize("cache", list(NOT_A_CACHE.values()), ids=list(NOT_A_CACHE))
def test_backward_of_a_non_cache(cache: Any) -> None:
    with pytest.raises(TypeError, match="cache must be the BatchNormCache returned by forward_"):
        bn.backward(_dy(SHAPE), cache)


def _layer_in_training() -> bn.BatchNorm:
    return _trained_layer()[0]


def _layer_without_statistics() -> bn.BatchNorm:
    return _trained_layer(track_running_stats=False)[0].eval()


FOLD_LAYERS: dict[str, tuple[Callable[[], Any], type[Exception], str]] = {
    "none": (lambda: None, TypeError, "layer must be the BatchNorm that follows the linear"),
    "array": (lambda: np.ones(C), TypeError, "got ndarray"),
    "stats": (lambda: bn.PopulationStats(C), TypeError, "got PopulationStats"),
    "training_mode": (_layer_in_training, ValueError, r"in training mode.*layer\.eval\(\)"),
    "no_running_stats": (_layer_without_statistics, ValueError, "track_running_stats=False"),
}


@pytest.mark.parametrize("case", list(FOLD_LAYERS))
def test_fold_into_a_non_foldable_layer(case: str) -> None:
    make, error, match = FOLD_LAYERS[case]
    args = {"weight": np.ones((C, 4)), "bias": None, "layer": make()}
    witness = Witness(args)
    with pytest.raises(error, match=match):
        fold_batchnorm(args["weight"], args["bias"], args["layer"])
    witness.assert_unchanged()


NOT_BATCHES = {
    "none": (None, TypeError, "batches must be an iterable of model inputs .* got NoneType"),
    "int": (3, TypeError, "batches must be an iterable of model inputs .* got int"),
    "one_array_of_wrong_rank": (
        np.ones((2, C)),  # iterating an array gives 1-d rows
        ValueError,
        "x must have at least 2 dimensions",
    ),
    "strings": ("abc", TypeError, "x must have dtype float16, float32 or float64; got dtype <U1"),
    "empty_list": ([], ValueError, "precise_bn received no batches"),
    "exhausted_iterator": (iter([]), ValueError, "precise_bn received no batches"),
}


@pytest.mark.parametrize("case", list(NOT_BATCHES))
def test_precise_bn_of_non_batches(case: str) -> None:
    batches, error, match = NOT_BATCHES[case]
    args = _layer_args()
    witness = Witness(args)
    with pytest.raises(error, match=match):
        bn.precise_bn(args["layer"], batches, 2)
    witness.assert_unchanged()


NOT_LAYERS = {
    "int": (
        3,
        TypeError,
        "layers must be an iterable of BatchNorm layers, such as a list; got int",
    ),
    "one_layer": ("layer", TypeError, "wrap one in a list"),
    "list_with_none": ([None], TypeError, r"layers\[0\] is a NoneType, not a BatchNorm layer"),
    "empty_list": ([], ValueError, "precise_bn found no BatchNorm layer"),
}


@pytest.mark.parametrize("case", list(NOT_LAYERS))
def test_precise_bn_of_non_layers(case: str) -> None:
    layers, error, match = NOT_LAYERS[case]
    args = _layer_args()
    if layers == "layer":
        layers = args["layer"]
    witness = Witness(args)
    with pytest.raises(error, match=match):
        bn.precise_bn(args["layer"], [_x()], 1, layers=layers)
    witness.assert_unchanged()


# --- mixed dtypes -------------------------------------------------------------------------------

X_DTYPES = ["float16", "float32", "float64"]
PARAM_DTYPES = ["float16", "float32", "float64", "int32", "int64", "uint8", "list"]


def _param(values: np.ndarray, dtype: str) -> Any:
    return values.tolist() if dtype == "list" else values.astype(dtype)


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
def test_output_dtype_is_the_input_dtype_whatever_the_parameters(
    x_dtype: str, param_dtype: str
) -> None:
    x = _x().astype(x_dtype)
    gamma = _param(np.array([1.0, 2.0, 3.0]), param_dtype)
    beta = _param(np.array([0.0, 1.0, 2.0]), param_dtype)
    mean, var = _param(np.array([1.0, 0.0, 2.0]), param_dtype), _param(np.ones(C), param_dtype)
    x64, g64, b64 = x.astype(np.float64), np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0])
    tol = tolerance(x)
    dy = _dy(SHAPE).astype(x_dtype)
    train = bn.forward_train(x, gamma, beta)
    evaluation = bn.forward_eval(x, gamma, beta, mean, var)
    train64 = bn.forward_train(x64, g64, b64)
    eval64 = bn.forward_eval(x64, g64, b64, [1.0, 0.0, 2.0], np.ones(C))
    for (y, cache), (y64, cache64) in [(train, train64), (evaluation, eval64)]:
        dx, dgamma, dbeta = bn.backward(dy, cache)
        dx64, dgamma64, dbeta64 = bn.backward(dy.astype(np.float64), cache64)
        assert y.dtype == dx.dtype == np.dtype(x_dtype)
        assert dgamma.dtype == dbeta.dtype == cache.mean.dtype == cache.var.dtype == np.float64
        assert_close(y, y64, tol, "y")
        assert_close(dx, dx64, tol, "dx")
        assert_close(dgamma, dgamma64, tol, "dgamma")
        assert_close(dbeta, dbeta64, tol, "dbeta")


@pytest.mark.parametrize("x_dtype", X_DTYPES)
def test_layer_keeps_float64_state_for_any_input_dtype(x_dtype: str) -> None:
    layer = bn.BatchNorm(C)
    layer.load_state_dict(
        {
            "weight": np.array([1, 2, 3], dtype=np.int32),
            "bias": np.zeros(C, dtype=np.float16),
            "running_mean": [0, 0, 0],
            "running_var": np.ones(C, dtype=np.float32),
            "num_batches_tracked": np.uint8(0),
        }
    )
    y = layer(_x().astype(x_dtype))
    dx = layer.backward(_dy(SHAPE).astype(x_dtype))
    assert y.dtype == dx.dtype == np.dtype(x_dtype)
    for name in ["gamma", "beta", "running_mean", "running_var", "dgamma", "dbeta"]:
        assert getattr(layer, name).dtype == np.float64, name
    assert type(layer.num_batches_tracked) is int


# --- results beyond the range of the dtype ------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "name"),
    [
        ("forward_train", "gamma"),
        ("forward_train", "beta"),
        ("forward_eval", "gamma"),
        ("forward_eval", "beta"),
        ("forward_eval", "mean"),
    ],
)
def test_float32_output_beyond_range_is_not_finite_quietly(kernel: str, name: str) -> None:
    # A per-channel value beyond float32's range: that channel's float32 y is not finite (inf,
    # or NaN where inf - inf met), and only that channel (a kernel propagates, it does not raise).
    x = _x().astype(np.float32)
    values = {**_vectors(), name: np.array([1.0, 1e200, 1.0])}
    if kernel == "forward_train":
        y, _ = bn.forward_train(x, values["gamma"], values["beta"])
    else:
        y, _ = bn.forward_eval(x, values["gamma"], values["beta"], values["mean"], values["var"])
    assert not np.isfinite(y[:, POISONED]).any()
    assert np.isfinite(np.delete(y, POISONED, axis=1)).all()


@pytest.mark.parametrize(
    ("weight", "running_var"),
    [
        (np.full((C, 4), 1e38, dtype=np.float32), 1e-12),
        (np.full((C, 4), 1e306), 1e-12),
    ],
    ids=["float32", "float64"],
)
def test_fold_that_overflows_is_refused(weight: np.ndarray, running_var: float) -> None:
    layer = _trained_layer()[0].eval()
    layer.running_var[POISONED] = running_var
    args = {"weight": weight, "bias": None, "layer": layer}
    witness = Witness(args)
    with pytest.raises(FloatingPointError, match=r"output channels \[1\] overflows float"):
        fold_batchnorm(weight, None, layer)
    witness.assert_unchanged()
    # In float64 the same float32 weights fold fine.
    if weight.dtype == np.float32:
        folded, _ = fold_batchnorm(weight.astype(np.float64), None, layer)
        assert np.isfinite(folded).all()


def test_population_stats_merge_that_overflows_is_refused() -> None:
    a, b = bn.PopulationStats(C), bn.PopulationStats(C)
    a.update(np.full((4, C), 1e160))
    b.update(np.full((4, C), 1e160) * [1.0, -1.0, 1.0])
    before = stats_snapshot(a)
    with pytest.raises(FloatingPointError, match=r"pooling overflowed: .* channels \[1\]"):
        a.merge(b)
    assert stats_snapshot(a) == before


def test_precise_bn_refuses_batches_whose_pooled_variance_overflows() -> None:
    # Each batch is fine on its own; their means are too far apart for a float64 variance.
    args = _layer_args()
    witness = Witness(args)
    batches = [np.full(SHAPE, 1e160), np.full(SHAPE, -1e160)]
    with pytest.raises(FloatingPointError, match=r"pooling overflowed: .* channels \[0, 1, 2\]"):
        bn.precise_bn(args["layer"], batches, 2)
    witness.assert_unchanged()
