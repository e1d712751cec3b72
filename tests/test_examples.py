"""The digits examples run in --quick mode, learn, and write valid PNG plots.

Each script runs in a subprocess as a user would run it. Their quick runs reach 0.90-0.98 test
accuracy (10 classes: chance is 0.1), so the bounds below leave a wide margin and still fail on
a network that does not learn.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The study adds what its numbers average over: "... 0.9512 (mean over the grid: ...)".
ACCURACY = re.compile(r"^test accuracy \((EMA|PreciseBN)\): ([0-9.]+)(?: \(.*\))?$", re.MULTILINE)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STUDY_PLOTS = ("accuracy", "stat_error", "samples")


def run_quick(script: str, cwd: Path, *extra: str) -> str:
    """Run an example with --quick; skip when the `examples` extra is not installed."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def accuracies(stdout: str) -> dict[str, float]:
    found = dict(ACCURACY.findall(stdout))
    assert set(found) == {"EMA", "PreciseBN"}, stdout
    return {name: float(value) for name, value in found.items()}


@pytest.mark.slow
@pytest.mark.parametrize(("script", "bound"), [("mlp_digits.py", 0.85), ("lenet_digits.py", 0.85)])
def test_classifier_learns(script: str, bound: float, tmp_path: Path) -> None:
    stdout = run_quick(script, tmp_path)
    for name, value in accuracies(stdout).items():
        assert bound < value <= 1.0, f"{name} accuracy {value}\n{stdout}"


@pytest.mark.slow
def test_classifier_with_precise_stats_in_place(tmp_path: Path) -> None:
    stdout = run_quick(
        "mlp_digits.py", tmp_path, "--use-precise-stats", "--num-batches-precise", "5"
    )
    assert "PreciseBN used 160 training samples" in stdout, stdout
    assert accuracies(stdout)["PreciseBN"] > 0.85, stdout


@pytest.mark.slow
def test_study_writes_tables_and_plots(tmp_path: Path) -> None:
    stdout = run_quick("ema_vs_precise.py", tmp_path, "--out", str(tmp_path))
    import matplotlib.image

    acc = accuracies(stdout)
    # Averaged over a grid that includes a badly lagging EMA (batch 512, momentum 0.99).
    assert acc["EMA"] > 0.6, stdout
    assert acc["PreciseBN"] > 0.8, stdout
    assert "weights identical across momenta for every batch size and seed: True" in stdout
    assert stdout.count("| 512 |") >= 2, stdout  # both tables have rows for batch 512
    for name in STUDY_PLOTS:
        path = tmp_path / f"ema_vs_precise_{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[2] in (3, 4), image.shape
        assert image.shape[0] >= 200 and image.shape[1] >= 300, image.shape
        assert image.std() > 0.01, f"{path} looks blank"


@pytest.fixture
def common(monkeypatch: pytest.MonkeyPatch) -> Any:
    """examples/common.py, imported the way the scripts import it."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("common")


@pytest.mark.parametrize(
    ("n", "batch_size"), [(1437, 8), (1437, 32), (1437, 512), (9, 4), (8, 4), (5, 4), (3, 8)]
)
def test_batch_indices_cover_everything_without_a_batch_of_one(
    common: Any, n: int, batch_size: int
) -> None:
    chunks = common.batch_indices(n, batch_size, np.random.default_rng(0))
    assert np.array_equal(np.sort(np.concatenate(chunks)), np.arange(n))
    assert all(2 <= len(c) <= batch_size + 1 for c in chunks)
    assert len(chunks) == common.steps_per_epoch(n, batch_size)


def test_precise_accuracy_leaves_the_ema_untouched(common: Any) -> None:
    rng = np.random.default_rng(0)
    model = common.nn.Sequential(
        common.nn.Linear(6, 5, rng, bias=False),
        common.bn.BatchNorm(5),
        common.nn.ReLU(),
        common.nn.Linear(5, 3, rng),
    )
    x = rng.normal(2.0, 3.0, size=(40, 6))
    y = rng.integers(0, 3, size=40)
    for idx in common.batch_indices(len(x), 8, rng):  # a few EMA updates
        model(x[idx])
    before = common.bn_state(model)
    acc, used = common.precise_accuracy(model, [x[:20], x[20:]], x, y, mode="sequential")
    after = common.bn_state(model)
    assert 0.0 <= acc <= 1.0
    for old, new in zip(before, after, strict=True):
        assert old.keys() == new.keys()
        assert all(np.array_equal(old[k], new[k]) for k in old)
    # What PreciseBN used: the exact mean of the first layer's outputs over all 40 samples.
    features = x @ model.layers[0].weight.T
    assert np.allclose(used[0]["running_mean"], features.mean(axis=0))
    assert not np.allclose(used[0]["running_mean"], before[0]["running_mean"])
    assert model.training


def _png_ok(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 200 and image.shape[1] >= 300, image.shape
    assert image.std() > 0.01, f"{path} looks blank"


def _results(stdout: str, pattern: str) -> dict[tuple[str, str], float]:
    found = re.findall(rf"^test accuracy \({pattern}, ([^)]+)\): ([0-9.]+)$", stdout, re.MULTILINE)
    return {(key, method): float(value) for key, method, value in found}


@pytest.mark.slow
def test_domain_shift_adabn_undoes_an_affine_shift(tmp_path: Path) -> None:
    stdout = run_quick("domain_shift.py", tmp_path, "--out", str(tmp_path))
    acc = _results(stdout, "([a-z]+)")
    domains = ("source", "contrast", "gamma", "noise", "inverted")
    assert {d for d, _ in acc} == set(domains), stdout
    assert acc["source", "EMA"] > 0.85, stdout
    # An affine map of the pixels is an affine map of the first layer's features, which
    # statistics recomputed on the target undo: the clean accuracy comes back (up to eps).
    assert abs(acc["contrast", "AdaBN"] - acc["source", "PreciseBN"]) <= 1 / 360 + 1e-9, stdout
    assert acc["contrast", "AdaBN"] > acc["contrast", "PreciseBN"] + 0.05, stdout
    assert stdout.count("| inverted |") == 1, stdout
    _png_ok(tmp_path / "domain_shift.png")


@pytest.mark.slow
def test_batch_size_study_runs_and_plots(tmp_path: Path) -> None:
    stdout = run_quick("batch_size_study.py", tmp_path, "--out", str(tmp_path))
    acc = _results(stdout, "k=([0-9]+)")
    assert {k for k, _ in acc} == {"2", "8", "32", "128"}, stdout
    assert {m for _, m in acc} == {"EMA", "PreciseBN", "mini-batch"}, stdout
    assert all(0.0 <= v <= 1.0 for v in acc.values()), stdout
    # Normalizing ghost batches of the whole SGD batch is BatchNorm, which learns the digits.
    assert acc["128", "PreciseBN"] > 0.85 and acc["128", "mini-batch"] > 0.85, stdout
    assert stdout.count("| 32 |") == 1, stdout
    _png_ok(tmp_path / "batch_size_study.png")


SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in ("common.py", "nn.py"))


def _help_options(text: str) -> dict[str, tuple[bool, str]]:
    """{option: (takes a value, its help text on one line)} of an argparse --help."""
    section = text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    options = {}
    for block in re.split(r"\n(?=  -)", section):
        first, *rest = block.splitlines()
        invocation, _, help_text = first.strip().partition("  ")
        flags = invocation.split(", ")[-1].split()
        options[flags[0]] = (len(flags) > 1, " ".join([help_text, *rest]).split())
    return {k: (v, " ".join(words)) for k, (v, words) in options.items()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_every_option_and_states_each_default_once(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    options = _help_options(done.stdout)
    assert "--quick" in options and len(options) >= 3, done.stdout
    for option, (takes_value, text) in options.items():
        assert text, f"{script} {option}: no help text"
        # One format: the default of an option with a value, once, as "(default: X)"; a switch
        # (off unless given) states none.
        assert text.count("(default: ") == int(takes_value), f"{script} {option}: {text}"
        assert text.lower().count("default") == int(takes_value), f"{script} {option}: {text}"


def test_the_scripts_list_is_every_example() -> None:
    assert len(SCRIPTS) == 9 and "quickstart.py" in SCRIPTS and "leakage.py" in SCRIPTS


def test_seed_captions_name_a_spread_only_for_several_seeds(common: Any) -> None:
    assert common.seeds_caption([3], "band") == "seed 3"
    assert common.seeds_caption([0, 1, 2], "bars") == "seeds 0, 1, 2; bars: min-max over the seeds"


@pytest.mark.parametrize("seeds", [1, 3])
def test_domain_shift_figure_labels_its_lines_and_bars(
    common: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, seeds: int
) -> None:
    pytest.importorskip("matplotlib")
    study = importlib.import_module("domain_shift")
    figures: list[Any] = []
    monkeypatch.setattr(study, "save_figure", lambda fig, path: figures.append(fig) or path)
    methods = ["EMA", "PreciseBN", "AdaBN", "AdaBN 64"]
    rng = np.random.default_rng(0)
    table = {(d, m): list(rng.uniform(0.5, 1.0, seeds)) for d in study.DOMAINS for m in methods}
    caption = "mlp, 3 epochs, " + common.seeds_caption(list(range(seeds)), "bars")
    study.plot(table, methods, tmp_path, caption, study.method_labels(1437, 64))
    (ax,) = figures[0].axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[-1] == "chance: 1 in 10 classes"  # the dotted line at 0.1 says what it is
    assert "AdaBN 64 (only the first 64 target images)" in legend
    assert "AdaBN (all 1437 target images)" in legend and len(legend) == 5
    has_bars = any(getattr(c, "errorbar", None) is not None for c in ax.containers)
    assert has_bars == (seeds > 1)
    assert ("min-max" in ax.get_title()) == (seeds > 1)
    figures[0].clf()
