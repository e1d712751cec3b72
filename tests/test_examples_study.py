"""examples/ema_vs_precise.py tells its reader what they are looking at: defaults in --help,
what the summary lines average, plots whose ranges keep PreciseBN readable and say what they
leave out, and figures in docs/img replaced only on request."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPT = EXAMPLES / "ema_vs_precise.py"


def run(script: Path, *args: str, cwd: Path) -> str:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    done = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def study(monkeypatch: pytest.MonkeyPatch) -> Any:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("ema_vs_precise")


def test_help_shows_the_defaults(tmp_path: Path) -> None:
    text = " ".join(run(SCRIPT, "--help", cwd=tmp_path).split())
    for default in ["(default: 20)", "(default: 0.05)", "(default: mlp)", "(default: 32)"]:
        assert default in text, default
    assert "(default: [8, 32, 128, 512])" in text
    assert "(default: [0.9, 0.99])" in text
    assert "--out docs/img" in text


@pytest.mark.slow
def test_summary_lines_say_they_are_means_over_the_grid(tmp_path: Path) -> None:
    stdout = run(SCRIPT, "--quick", "--out", str(tmp_path), cwd=tmp_path)
    lines = [line for line in stdout.splitlines() if line.startswith("test accuracy (")]
    assert len(lines) == 2, stdout
    for line in lines:
        assert re.fullmatch(
            r"test accuracy \((EMA|PreciseBN)\): [0-9.]+ \(mean over the grid: "
            r"2 batch sizes x 2 momenta x 1 seed, epoch 4\)",
            line,
        ), line


@pytest.mark.slow
def test_the_default_output_never_replaces_the_shipped_figures(tmp_path: Path) -> None:
    # A copy of the examples beside an empty docs/img: where a default run would write.
    examples = tmp_path / "repo" / "examples"
    shutil.copytree(EXAMPLES, examples, ignore=shutil.ignore_patterns("__pycache__"))
    shipped = tmp_path / "repo" / "docs" / "img"
    shipped.mkdir(parents=True)
    tiny = ["--epochs", "1", "--batch-sizes", "256", "--momenta", "0.9", "--seeds", "0"]
    stdout = run(examples / "ema_vs_precise.py", *tiny, "--samples", "100", cwd=tmp_path)
    assert list(shipped.iterdir()) == []
    written = [Path(p) for p in re.findall(r"^wrote (.+)$", stdout, re.MULTILINE)]
    assert len(written) == 3 and all(p.is_file() for p in written), stdout
    assert all(shipped not in p.parents for p in written)


def test_the_accuracy_range_keeps_precise_bn_whole(study: Any) -> None:
    precise = np.array([[0.80, 0.81], [0.90, 0.90], [0.97, 0.96]])
    ema = np.array([0.10, 0.60, 0.97])
    bottom, top = study.accuracy_range(precise, ema)
    assert bottom < 0.80 and top >= 0.97
    assert bottom > 0.10  # the EMA, far below, is clipped
    note = study.clipped_note("EMA", np.arange(1, 4), ema, bottom)
    assert note == "EMA clipped: epochs 1-2, min 0.10"
    # An EMA a little below PreciseBN is shown whole, and nothing is noted.
    bottom, _ = study.accuracy_range(precise[1:], np.array([0.85, 0.95]))
    assert bottom < 0.85
    assert study.clipped_note("EMA", np.arange(1, 3), np.array([0.85, 0.95]), bottom) == ""
    dips = np.array([0.5, 0.97, 0.5, 0.97, 0.5])
    assert (
        study.clipped_note("EMA", np.arange(1, 6), dips, 0.9)
        == "EMA clipped: 3 epochs in 1-5, min 0.50"
    )


def test_the_lr_caption_says_when_scaling_was_on(study: Any) -> None:
    scaled = study.lr_caption(Namespace(lr=0.05, scale_lr=True, lr_base_batch=32))
    assert "scaling on" in scaled and "batch / 32" in scaled
    assert "scaling" not in study.lr_caption(Namespace(lr=0.05, scale_lr=False, lr_base_batch=32))


def _grid(study: Any) -> Any:
    """A made-up 2-epoch grid: batch 512's EMA lags far behind, as in the study."""
    methods = [study.Method(None)] + [
        study.Method(mode, samples) for mode in study.MODES for samples in (100, study.ALL)
    ]
    shape = (1, 2, 1, 2, len(methods))  # seed, batch, momentum, epoch, method
    acc = np.full(shape, 0.95)
    acc[0, 1, 0, :, 0] = [0.20, 0.60]  # EMA, batch 512
    err = np.full(shape, 0.05)
    err[..., methods.index(study.Method("sequential", study.ALL))] = 0.0  # the reference
    return study.Grid([0], [32, 512], [0.99], 2, methods, acc, err, np.zeros((2, 1)))


def test_plots_say_what_they_clip_and_leave_out(
    study: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures: dict[str, Any] = {}

    def keep(fig: Any, path: Path, **_: Any) -> Path:
        figures[path.stem] = fig
        return path

    monkeypatch.setattr(study, "_save", keep)
    grid = _grid(study)
    lr = study.lr_caption(Namespace(lr=0.05, scale_lr=True, lr_base_batch=32))
    study.plot_per_epoch(grid, 1437, tmp_path, "mlp", lr)
    study.plot_samples(grid, 1437, tmp_path, "mlp", lr)
    assert set(figures) == {f"ema_vs_precise_{n}" for n in ("accuracy", "stat_error", "samples")}
    for fig in figures.values():
        assert "learning-rate scaling on" in fig._suptitle.get_text()

    accuracy = figures["ema_vs_precise_accuracy"].axes
    titles = [ax.get_title() for ax in accuracy]
    assert "EMA clipped: epochs 1-2, min 0.20" in titles[1]
    assert "clipped" not in titles[0]
    # The PreciseBN curves stay inside every panel's range.
    for ax in accuracy:
        bottom, top = ax.get_ylim()
        assert bottom < 0.95 < top

    # Both figures of the statistics error define it on the figure, and say what is not drawn.
    for name in ("stat_error", "samples"):
        fig = figures[f"ema_vs_precise_{name}"]
        footnotes = " ".join(" ".join(t.get_text().split()) for t in fig.texts)
        assert "sqrt((mu - mu_ref)^2 + (sigma - sigma_ref)^2) / sigma_ref" in footnotes, name
        assert "2-Wasserstein distance" in footnotes and "every BatchNorm layer" in footnotes
        assert "no place on the log axis" in footnotes
    # One seed: no spread is drawn, and no caption mentions one.
    for fig in figures.values():
        text = fig._suptitle.get_text() + " ".join(ax.get_title() for ax in fig.axes)
        assert "seed 0" in text and "min-max" not in text and "band" not in text
    samples = figures["ema_vs_precise_samples"]
    assert "EMA 0.99 clipped: 0.600" in samples.axes[1].get_title()
