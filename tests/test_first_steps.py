"""What a new user coming from PyTorch, d2l or cs231n trips over gets a clear answer."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.layer import LoadResult

# --- eps given where d2l puts num_dims ---------------------------------------------------------


@pytest.mark.parametrize("num_dims", [1, 2, 4, np.int64(4)])
def test_positional_int_eps_is_d2ls_num_dims_and_refused(num_dims: int) -> None:
    with pytest.raises(TypeError, match="eps was given positionally") as info:
        bn.BatchNorm(6, num_dims)
    assert "no num_dims is needed" in str(info.value)
    assert "BatchNorm(C)" in str(info.value)


def test_positional_float_eps_is_pytorchs_and_accepted() -> None:
    assert bn.BatchNorm(6, 1e-3).eps == 1e-3
    assert bn.BatchNorm(6, 1.0).eps == 1.0
    assert bn.BatchNorm(6, 1e-3, 0.5).momentum == 0.5


def test_int_eps_by_keyword_means_what_it_says() -> None:
    layer = bn.BatchNorm(6, eps=4)
    assert layer.eps == 4.0
    assert type(layer.eps) is float


# --- PyTorch's reset methods -------------------------------------------------------------------


def _trained_layer(**kwargs: Any) -> bn.BatchNorm:
    layer = bn.BatchNorm(3, **kwargs)
    rng = np.random.default_rng(0)
    for _ in range(3):
        layer(rng.normal(2.0, 3.0, size=(8, 3)))
    if layer.gamma is not None and layer.beta is not None:
        layer.gamma[:] = [0.5, 2.0, 3.0]
        layer.beta[:] = [-1.0, 1.0, 0.25]
    return layer


def test_reset_running_stats_restores_a_fresh_layers_statistics_in_place() -> None:
    layer = _trained_layer()
    mean, var = layer.running_mean, layer.running_var
    assert layer.num_batches_tracked == 3
    layer.reset_running_stats()
    assert layer.running_mean is mean and layer.running_var is var
    np.testing.assert_array_equal(layer.running_mean, np.zeros(3))
    np.testing.assert_array_equal(layer.running_var, np.ones(3))
    assert layer.num_batches_tracked == 0
    # Parameters are not running statistics: untouched.
    np.testing.assert_array_equal(layer.gamma, [0.5, 2.0, 3.0])
    np.testing.assert_array_equal(layer.beta, [-1.0, 1.0, 0.25])


def test_reset_parameters_gives_a_fresh_layers_state() -> None:
    layer = _trained_layer()
    layer.eval()
    layer.reset_parameters()
    fresh = bn.BatchNorm(3)
    for key, value in fresh.state_dict().items():
        np.testing.assert_array_equal(layer.state_dict()[key], value, err_msg=key)
    assert not layer.training  # the mode is kept


@pytest.mark.parametrize(
    "kwargs",
    [
        {"track_running_stats": False},
        {"affine": False},
        {"affine": False, "track_running_stats": False},
    ],
)
def test_resets_do_what_applies_to_a_layer_without_parameters_or_statistics(
    kwargs: dict[str, bool],
) -> None:
    layer = _trained_layer(**kwargs)
    layer.reset_running_stats()
    layer.reset_parameters()
    assert {k: v.tolist() for k, v in layer.state_dict().items()} == {
        k: v.tolist() for k, v in bn.BatchNorm(3, **kwargs).state_dict().items()
    }


# --- python -m batchnorm --help ----------------------------------------------------------------


def _run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchnorm", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_python_m_batchnorm_help_prints_usage_and_conventions(flag: str) -> None:
    done = _run_module(flag)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m batchnorm")
    assert "weight of the OLD running value" in done.stdout
    assert bn.__version__ in done.stdout


def test_python_m_batchnorm_without_arguments_prints_the_conventions_screen() -> None:
    done = _run_module()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"batchnorm {bn.__version__}: ")
    assert "usage:" not in done.stdout
    assert "Start here:" in done.stdout


def test_python_m_batchnorm_lists_every_example_and_variant() -> None:
    done = _run_module()
    assert done.returncode == 0, done.stderr
    scripts = {p.name for p in (Path(__file__).parents[1] / "examples").glob("*.py")}
    scripts -= {"common.py", "nn.py"}  # helper modules, not scripts
    listed = set(re.findall(r"examples/(\w+\.py)", done.stdout))
    assert listed == scripts
    for variant in ["ghost_batch_size=k", ".freeze()", "BatchRenorm(", "AdaBN", "PreciseBN",
                    "group="]:  # fmt: skip
        assert variant in done.stdout, variant
    assert max(len(line) for line in done.stdout.splitlines()) <= 100


def test_python_m_batchnorm_points_to_docs_that_an_installed_package_has(tmp_path: Path) -> None:
    # Run away from the source tree: what it points to must not need docs/ or examples/.
    done = subprocess.run([sys.executable, "-m", "batchnorm"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    commands = re.findall(r"python -m pydoc ([\w.]+)", done.stdout)
    assert {"batchnorm.BatchNorm", "batchnorm.precise_bn"} <= set(commands)
    for name in commands:
        page = subprocess.run([sys.executable, "-m", "pydoc", name], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)  # fmt: skip
        assert page.returncode == 0 and "Examples" in page.stdout, name
        assert "no Python documentation found" not in page.stdout
    assert "not part of the installed package" in done.stdout


def test_python_m_batchnorm_refuses_unknown_arguments() -> None:
    done = _run_module("--bogus")
    assert done.returncode == 2
    assert "unrecognized arguments: --bogus" in done.stderr


# --- a whole model's state loaded into one layer -----------------------------------------------


def _model_state() -> dict[str, Any]:
    """A model's state dict: a Linear at '0.', BatchNorms at '1.' and 'bn1.'."""
    state: dict[str, Any] = {"0.weight": np.ones((3, 4)), "0.bias": np.zeros(3)}
    for prefix, seed in (("1.", 1), ("bn1.", 2)):
        layer = _trained_layer()
        layer(np.random.default_rng(seed).normal(size=(5, 3)))
        state.update({prefix + k: v for k, v in layer.state_dict().items()})
    return state


@pytest.mark.parametrize("strict", [True, False])
def test_a_whole_models_state_is_refused_with_the_prefix_to_strip(strict: bool) -> None:
    layer = _trained_layer()
    before = layer.state_dict()
    if strict:
        with pytest.raises(ValueError, match="whole model") as info:
            layer.load_state_dict(_model_state(), strict=strict)
        message = str(info.value)
    else:  # a warning, and PyTorch's result: every key missing, every key unexpected
        with pytest.warns(UserWarning, match="whole model") as record:
            result = layer.load_state_dict(_model_state(), strict=strict)
        message = str(record[0].message)
        assert result.missing_keys == list(before)
        assert result.unexpected_keys == sorted(_model_state())
    assert "'1.'" in message and "'bn1.'" in message
    # The prefixes that carry every name of the layer come first, and the example uses one.
    assert message.index("'1.'") < message.index("'0.'")
    assert 'k.removeprefix("1."' in message.replace("'", '"')
    assert "Use strict=False" not in message  # strict=False would load nothing here
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_the_suggested_one_liner_loads_the_layer() -> None:
    state = _model_state()
    layer = bn.BatchNorm(3)
    layer.load_state_dict(
        {k.removeprefix("bn1."): v for k, v in state.items() if k.startswith("bn1.")}
    )
    np.testing.assert_array_equal(layer.running_mean, state["bn1.running_mean"])
    assert layer.num_batches_tracked == int(state["bn1.num_batches_tracked"])


@pytest.mark.parametrize("state", [{}, {"foo": np.zeros(3)}, {"momentum": 0.1}])
def test_a_non_strict_load_that_matches_nothing_warns_and_reports(state: dict[str, Any]) -> None:
    # PyTorch's TestNN.test_batchnorm_load_state_dict: load_state_dict({}, strict=False) is a
    # no-op that reports every key as missing.
    layer = _trained_layer()
    before = layer.state_dict()
    with pytest.warns(UserWarning, match=r"load_state_dict\(strict=False\) loaded nothing"):
        result = layer.load_state_dict(state, strict=False)
    assert result == LoadResult(missing_keys=list(before), unexpected_keys=sorted(state))
    assert result.missing_keys == list(before)
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    with pytest.raises(ValueError, match="missing keys"):
        layer.load_state_dict(state)  # strict


def test_a_non_strict_load_that_matches_some_keys_still_loads_them() -> None:
    layer = _trained_layer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a partial load is what strict=False is for: no warning
        result = layer.load_state_dict(
            {"running_mean": np.full(3, 7.0), "bn1.weight": 1}, strict=False
        )
    np.testing.assert_array_equal(layer.running_mean, np.full(3, 7.0))
    assert result.unexpected_keys == ["bn1.weight"]


def test_a_layer_with_no_state_loads_an_empty_state_non_strictly() -> None:
    layer = bn.BatchNorm(3, affine=False, track_running_stats=False)
    assert layer.load_state_dict({}, strict=False) == ([], [])


# --- save and load by the same name --------------------------------------------------------------


@pytest.mark.parametrize("cls", [bn.BatchNorm, bn.BatchRenorm])
def test_load_accepts_the_name_given_to_save(tmp_path: Path, cls: type[bn.BatchNorm]) -> None:
    layer = _trained_layer() if cls is bn.BatchNorm else cls(3)
    written = layer.save(tmp_path / "bn1")
    assert written == tmp_path / "bn1.npz"
    for name in (tmp_path / "bn1", str(tmp_path / "bn1"), written):
        loaded = cls.load(name)
        assert type(loaded) is cls
        np.testing.assert_array_equal(loaded.running_var, layer.running_var)


def test_load_of_a_missing_file_names_both_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'.*bn1' \(nor '.*bn1\.npz'"):
        bn.BatchNorm.load(tmp_path / "bn1")
    with pytest.raises(FileNotFoundError, match=r"no such file: '.*bn2\.npz'\. Pass"):
        bn.BatchNorm.load(tmp_path / "bn2.npz")


def test_a_file_named_as_given_is_read_first(tmp_path: Path) -> None:
    plain = bn.BatchNorm(2).save(tmp_path / "bn1")  # bn1.npz: a BatchNorm
    (tmp_path / "bn1").write_bytes(plain.read_bytes())
    bn.BatchRenorm(2).save(tmp_path / "bn1")  # bn1.npz is now a BatchRenorm
    assert type(bn.BatchNorm.load(tmp_path / "bn1")) is bn.BatchNorm


@pytest.mark.parametrize(
    ("writer", "reader"), [(bn.BatchNorm, bn.BatchRenorm), (bn.BatchRenorm, bn.BatchNorm)]
)
def test_loading_with_the_wrong_class_names_the_right_loader(
    tmp_path: Path, writer: type[bn.BatchNorm], reader: type[bn.BatchNorm]
) -> None:
    path = writer(3).save(tmp_path / "layer")
    with pytest.raises(ValueError) as info:
        reader.load(path)
    message = str(info.value)
    assert f"written by {writer.__name__}.save" in message
    assert f"Read it with batchnorm.{writer.__name__}.load(path)" in message
    assert type(writer.load(path)) is writer


# --- PyTorch's momentum habit ---------------------------------------------------------------------


@pytest.fixture
def fresh_momentum_warnings() -> Any:
    """The momentum warning comes once per value per process: forget the values seen so far."""
    from batchnorm import _alerts

    _alerts._warned_momenta.clear()
    yield
    _alerts._warned_momenta.clear()


@pytest.mark.usefixtures("fresh_momentum_warnings")
@pytest.mark.parametrize(("cls", "value", "meant"), [(bn.BatchNorm, 0.1, "0.9"),
                                                     (bn.BatchRenorm, 0.3, "0.7")])  # fmt: skip
def test_a_pytorch_momentum_warns_once_per_value(
    cls: type[bn.BatchNorm], value: float, meant: str
) -> None:
    with pytest.warns(UserWarning, match=f"^momentum={value} weights the OLD") as record:
        layer = cls(4, momentum=value)
    assert layer.momentum == value  # accepted: a warning, not an error
    message = str(record[0].message)
    assert f"PyTorch's momentum={value} is momentum={meant} here" in message
    assert 'warnings.filterwarnings("ignore", message="momentum=")' in message
    assert record[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(4, momentum=value)  # the same value again: no second warning
    with pytest.warns(UserWarning, match="momentum=0.2 weights"):
        cls(4, 1e-5, 0.2)


@pytest.mark.usefixtures("fresh_momentum_warnings")
@pytest.mark.parametrize("value", [0.5, 0.9, 0.99, 1.0, None])
def test_momentum_from_half_up_and_none_do_not_warn(value: float | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn.BatchNorm(4, momentum=value)


@pytest.mark.usefixtures("fresh_momentum_warnings")
def test_the_documented_filter_silences_the_momentum_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="momentum=")
        assert bn.BatchNorm(4, momentum=0.1).momentum == 0.1
