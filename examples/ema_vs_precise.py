"""EMA versus PreciseBN: how good are BatchNorm's running statistics during training?

Over a grid of batch sizes and BatchNorm momenta, a network is trained on scikit-learn's digits
with SGD, and after every epoch the same weights are evaluated on the test set three ways:

- EMA: the running statistics updated during training,
  ``running = momentum * running + (1 - momentum) * batch_statistic`` (momentum is the weight of
  the OLD value; our 0.9 and 0.99 are PyTorch's 0.1 and 0.01);
- PreciseBN, ``mode="train"``: :func:`batchnorm.precise_bn` pools the exact statistics of a
  pass over training batches in which every layer normalizes with batch statistics;
- PreciseBN, ``mode="sequential"``: the same, one layer at a time, each finished layer switching
  to eval mode, so every layer's statistics describe the inputs it gets at inference.

PreciseBN also runs on subsets of the training set (--samples; "all" is the 1,437 training
images) to see how many samples are enough. Besides test accuracy, each set of statistics gets
an error against the reference, sequential PreciseBN on all training samples: per channel, the
2-Wasserstein distance between N(mean, var) and N(mean_ref, var_ref) in units of the reference
standard deviation, ``sqrt((mean - mean_ref)**2 + (std - std_ref)**2) / std_ref``, averaged over
the channels of every BatchNorm layer.

Every PreciseBN evaluation saves and restores the BatchNorm state (state_dict /
load_state_dict), so the EMA and training continue untouched. The momentum does not change the
weights either (running statistics do not enter a training-mode forward pass): the runs of one
batch size and seed end with identical weights for every momentum, which the script checks.

Run::

    python examples/ema_vs_precise.py --out docs/img    # the grid of docs/results.md, its figures
    python examples/ema_vs_precise.py --quick           # 2 batch sizes, 1 seed, 4 epochs
    python examples/ema_vs_precise.py --model lenet --seeds 0 --out /tmp/study

Prints summary tables and writes PNG plots to --out (default: a new temporary directory, so
that only an explicit ``--out docs/img`` replaces the figures the docs show). The last lines
read ``test accuracy (EMA): ...`` and ``test accuracy (PreciseBN): ...``, each followed by
what it averages: the mean over the whole grid (batch sizes x momenta x seeds) at the last
epoch.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from common import (
    THREADS_HELP,
    Digits,
    HelpFormatter,
    State,
    accuracy,
    batch_size_int,
    bn_state,
    figure_dir,
    input_batches,
    load_digits,
    positive_int,
    precise_accuracy,
    save_figure,
    sgd,
    steps_per_epoch,
    train_epoch,
)
from lenet_digits import build_lenet
from mlp_digits import build_mlp
from nn import Sequential
from numpy.typing import NDArray

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

BUILDERS: dict[str, Callable[[np.random.Generator, float], Sequential]] = {
    "mlp": build_mlp,
    "lenet": build_lenet,
}
MODEL_NAMES = {"mlp": "MLP", "lenet": "LeNet"}
MODES = ("train", "sequential")
ALL = 0  # a --samples value: the whole training set


@dataclass(frozen=True)
class Method:
    """Where eval statistics come from: the EMA (mode None) or PreciseBN on `samples` samples."""

    mode: str | None
    samples: int = ALL

    def label(self, n_train: int) -> str:
        if self.mode is None:
            return "EMA"
        return f"PreciseBN {self.mode}, {self.samples or n_train}"


@dataclass
class Grid:
    """Results indexed [seed, batch size, momentum, epoch, method].

    ``acc`` is test accuracy, ``err`` the statistics error against the reference (sequential
    PreciseBN on all samples), ``seconds`` [batch size, momentum] the wall time of all seeds.
    """

    seeds: list[int]
    batch_sizes: list[int]
    momenta: list[float]
    epochs: int
    methods: list[Method]
    acc: NDArray[np.float64]
    err: NDArray[np.float64]
    seconds: NDArray[np.float64]

    def index(self, mode: str | None, samples: int = ALL) -> int:
        return self.methods.index(Method(mode, samples))

    @property
    def sample_counts(self) -> list[int]:
        return [m.samples for m in self.methods if m.mode == MODES[0]]


def parse_samples(text: str) -> int:
    return ALL if text == "all" else positive_int(text)


def stat_error_definition(n_train: int) -> str:
    """The statistics error in words, as the figures that plot it state it."""
    return (
        "Statistics error: the mean over every channel of every BatchNorm layer of "
        "sqrt((mu - mu_ref)^2 + (sigma - sigma_ref)^2) / sigma_ref, with sigma = "
        "sqrt(running_var + eps): the 2-Wasserstein distance between the normal distributions "
        "the two sets of statistics describe, in units of the reference's standard deviation. "
        f"The reference is PreciseBN sequential on all {n_train} samples; its error, 0, has no "
        "place on the log axis, so it is not drawn."
    )


def _footnote(fig: Figure, text: str, cols: int) -> None:
    """A note under the panels, wrapped to the figure's width; the panels are laid out above
    it."""
    lines = textwrap.wrap(text, width=int(15 * 3.1 * cols))
    fig.text(0.5, 0.005, "\n".join(lines), ha="center", va="bottom", fontsize=7.5, color="0.25")
    height = (len(lines) * 7.5 * 1.25 + 8) / (fig.get_figheight() * 72)  # in points
    fig.tight_layout(rect=(0, height, 1, 1))


def stat_error(state: State, reference: State, eps: float = 1e-5) -> float:
    """Mean over every channel of every layer of the W2 distance, in reference std units."""
    errors = []
    for layer, ref in zip(state, reference, strict=True):
        std, ref_std = np.sqrt(layer["running_var"] + eps), np.sqrt(ref["running_var"] + eps)
        shift = layer["running_mean"] - ref["running_mean"]
        errors.append(np.sqrt(shift**2 + (std - ref_std) ** 2) / ref_std)
    return float(np.concatenate(errors).mean())


def weights_digest(model: Sequential) -> str:
    """A hash of every trainable array's bytes: equal digests mean identical weights."""
    h = hashlib.sha256()
    for param, _ in model.parameters():
        h.update(np.ascontiguousarray(param).tobytes())
    return h.hexdigest()


def run_one(
    model: Sequential,
    data: Digits,
    batch_size: int,
    lr: float,
    epochs: int,
    methods: list[Method],
    seed: int,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Train, evaluating every method after every epoch: (accuracy, error), (epochs, methods)."""
    opt = sgd(lr)
    shuffle_rng = np.random.default_rng([seed, 1])
    precise_rng = np.random.default_rng([seed, 2])
    acc = np.zeros((epochs, len(methods)))
    err = np.zeros((epochs, len(methods)))
    reference = methods.index(Method("sequential", ALL))
    for epoch in range(epochs):
        train_epoch(model, opt, data.x_train, data.y_train, batch_size, shuffle_rng)
        # One shuffle per epoch; the subsets are its prefixes (the 100 samples lie in the 300).
        order = precise_rng.permutation(len(data.x_train))
        states: list[State] = []
        for j, method in enumerate(methods):
            if method.mode is None:
                acc[epoch, j] = accuracy(model, data.x_test, data.y_test)
                states.append(bn_state(model))
                continue
            subset = data.x_train[order[: method.samples or None]]
            # Both modes get the same batches: they differ only in how they measure.
            batches = input_batches(subset, batch_size, np.random.default_rng([seed, epoch]))
            acc[epoch, j], state = precise_accuracy(
                model, batches, data.x_test, data.y_test, mode=method.mode
            )
            states.append(state)
        err[epoch] = [stat_error(state, states[reference]) for state in states]
    return acc, err


def run_grid(args: argparse.Namespace, data: Digits) -> Grid:
    methods = [Method(None)] + [Method(m, s) for m in MODES for s in args.samples]
    shape = (len(args.seeds), len(args.batch_sizes), len(args.momenta), args.epochs, len(methods))
    grid = Grid(
        args.seeds,
        args.batch_sizes,
        args.momenta,
        args.epochs,
        methods,
        np.zeros(shape),
        np.zeros(shape),
        np.zeros(shape[1:3]),
    )
    build = BUILDERS[args.model]
    digests: dict[tuple[int, int], set[str]] = {}
    for (b, batch_size), (m, momentum) in itertools.product(
        enumerate(args.batch_sizes), enumerate(args.momenta)
    ):
        lr = args.lr * batch_size / args.lr_base_batch if args.scale_lr else args.lr
        start = time.perf_counter()
        for s, seed in enumerate(args.seeds):
            model = build(np.random.default_rng([seed, 0]), momentum)
            grid.acc[s, b, m], grid.err[s, b, m] = run_one(
                model, data, batch_size, lr, args.epochs, methods, seed
            )
            digests.setdefault((b, s), set()).add(weights_digest(model))
        grid.seconds[b, m] = time.perf_counter() - start
        last = grid.acc[:, b, m, -1].mean(axis=0)
        print(
            f"  batch {batch_size:>4}, lr {lr:g}, momentum {momentum}: last epoch EMA "
            f"{last[0]:.4f}, PreciseBN train {last[grid.index('train')]:.4f}, sequential "
            f"{last[grid.index('sequential')]:.4f} ({grid.seconds[b, m]:.1f}s)",
            flush=True,
        )
    same = all(len(d) == 1 for d in digests.values())
    print(f"weights identical across momenta for every batch size and seed: {same}")
    return grid


def _spread(values: NDArray[np.float64]) -> str:
    """Mean over seeds, and the min-max range when there are several."""
    if values.size == 1:
        return f"{values.item():.3f}"
    return f"{values.mean():.3f} ({values.min():.3f}-{values.max():.3f})"


def print_tables(grid: Grid, n_train: int) -> None:
    ema, train, seq = grid.index(None), grid.index("train"), grid.index("sequential")
    early = min(2, grid.epochs) - 1  # the second epoch, or the first of a one-epoch run
    half = grid.epochs // 2
    steps = [steps_per_epoch(n_train, b) for b in grid.batch_sizes]
    print(
        f"\nTest accuracy, mean over seeds {grid.seeds} (min-max); PreciseBN on all {n_train} "
        "training samples. gap: PreciseBN train - EMA, mean over all epochs. swing: mean "
        f"|change of accuracy from one epoch to the next| over epochs {half + 1}-{grid.epochs}, "
        "EMA / PreciseBN train. error: EMA's statistics error at the last epoch"
    )
    print(
        f"| batch | steps/epoch | momentum | epoch {early + 1}: EMA | epoch {early + 1}: "
        f"PreciseBN train | epoch {grid.epochs}: EMA | epoch {grid.epochs}: PreciseBN train | "
        f"epoch {grid.epochs}: PreciseBN sequential | gap | swing | error |"
    )
    print("|" + "---|" * 11)
    for (b, batch_size), (m, momentum) in itertools.product(
        enumerate(grid.batch_sizes), enumerate(grid.momenta)
    ):
        cell = grid.acc[:, b, m]  # [seed, epoch, method]
        gap = (cell[:, :, train] - cell[:, :, ema]).mean()
        swing = np.abs(np.diff(cell[:, max(half - 1, 0) :], axis=1)).mean(axis=(0, 1))
        print(
            f"| {batch_size} | {steps[b]} | {momentum} | {cell[:, early, ema].mean():.3f} "
            f"| {cell[:, early, train].mean():.3f} | {_spread(cell[:, -1, ema])} "
            f"| {_spread(cell[:, -1, train])} | {cell[:, -1, seq].mean():.3f} | {gap:+.3f} "
            f"| {swing[ema]:.3f} / {swing[train]:.3f} | {grid.err[:, b, m, -1, ema].mean():.3f} |"
        )

    labels = [str(s or n_train) for s in grid.sample_counts]
    print(
        f"\nPreciseBN on fewer samples, epoch {grid.epochs}: test accuracy, then statistics "
        f"error, mean over seeds (PreciseBN does not depend on the momentum: same weights, "
        f"same batches); EMA columns per momentum {grid.momenta}"
    )
    head = " | ".join(labels)
    ema_head = " | ".join(f"EMA {m}" for m in grid.momenta)
    print(f"| batch | mode | accuracy: {head} | {ema_head} | error: {head} | {ema_head} |")
    print("|" + "---|" * (2 + 2 * (len(labels) + len(grid.momenta))))
    for b, batch_size in enumerate(grid.batch_sizes):
        acc, err = grid.acc[:, b, :, -1], grid.err[:, b, :, -1]  # [seed, momentum, method]
        for mode in MODES:
            cols = [grid.index(mode, s) for s in grid.sample_counts]
            row = [f"{acc[:, 0, j].mean():.3f}" for j in cols]
            row += [f"{acc[:, m, ema].mean():.3f}" for m in range(len(grid.momenta))]
            row += [f"{err[:, 0, j].mean():.4f}" for j in cols]
            row += [f"{err[:, m, ema].mean():.4f}" for m in range(len(grid.momenta))]
            print(f"| {batch_size} | {mode} | " + " | ".join(row) + " |")


def _panels(grid: Grid, title: str, *, sharey: bool) -> tuple[Figure, NDArray[np.object_]]:
    import matplotlib.pyplot as plt

    rows, cols = len(grid.momenta), len(grid.batch_sizes)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(3.1 * cols, 2.7 * rows + 0.7),
        sharex=True,
        sharey=sharey,
        squeeze=False,
    )
    fig.suptitle(title, fontsize=10)
    for (m, momentum), (b, batch_size) in itertools.product(
        enumerate(grid.momenta), enumerate(grid.batch_sizes)
    ):
        ax = axes[m, b]
        ax.set_title(f"batch {batch_size}, momentum {momentum}", fontsize=9)
        ax.grid(alpha=0.3)
        if m == rows - 1:
            ax.set_xlabel("epoch")
    return fig, axes


def _save(fig: Figure, path: Path, *, layout: bool = True) -> Path:
    if layout:
        fig.tight_layout()
    return save_figure(fig, path)


def _seeds_caption(grid: Grid, band: str) -> str:
    if len(grid.seeds) == 1:
        return f"seed {grid.seeds[0]}"
    return f"mean of seeds {', '.join(map(str, grid.seeds))}" + (f", {band}" if band else "")


def lr_caption(args: argparse.Namespace) -> str:
    """The learning rate as the figures' titles state it, scaling included."""
    if args.scale_lr:
        return f"lr {args.lr:g} x batch / {args.lr_base_batch} (learning-rate scaling on)"
    return f"lr {args.lr:g} for every batch size"


def accuracy_range(keep: NDArray[np.float64], others: NDArray[np.float64]) -> tuple[float, float]:
    """A y range that shows every value of `keep` (the PreciseBN curves) with a margin, and
    `others` (the EMA) whole when that at most doubles it: a far lagging EMA falls below."""
    low, high = float(np.min(keep)), max(float(np.max(keep)), float(np.max(others)))
    # The EMA is shown whole too when that at most doubles the range.
    low = min(low, float(np.min(others))) if np.min(others) >= low - (high - low) else low
    pad = max(0.08 * (high - low), 0.004)
    return max(0.0, low - pad), min(1.0, high + pad)


def clipped_note(
    label: str, epochs: NDArray[np.int_], ys: NDArray[np.float64], bottom: float
) -> str:
    """'EMA clipped: epochs 1-3, min 0.31' (below the axis there), or '' when it is not."""
    below = np.flatnonzero(ys < bottom)
    if below.size == 0:
        return ""
    first, last = int(epochs[below[0]]), int(epochs[below[-1]])
    if first == last:
        where = f"epoch {first}"
    elif below.size == below[-1] - below[0] + 1:
        where = f"epochs {first}-{last}"
    else:
        where = f"{below.size} epochs in {first}-{last}"
    return f"{label} clipped: {where}, min {float(np.min(ys)):.2f}"


def _title(ax: Axes, title: str, notes: list[str]) -> None:
    """A panel title, with a line per clipped curve under it (never over the curves)."""
    lines = [title, *(note for note in notes if note)]
    ax.set_title("\n".join(lines), fontsize=9 if len(lines) == 1 else 7.5)


def plot_per_epoch(grid: Grid, n_train: int, out: Path, model: str, lr: str) -> list[Path]:
    """Accuracy and statistics error per epoch: a panel per (momentum, batch size).

    Each accuracy panel has its own y range, chosen to show the PreciseBN curves whole; an EMA
    curve that falls below it is named in the panel with where and how low. The statistics
    error is on a log axis, where the reference itself (error 0) has no place: the title says so.
    """
    epochs = np.arange(1, grid.epochs + 1)
    smallest = min(grid.sample_counts, key=lambda s: s or n_train)
    lines = [
        (grid.index(None), "C3", "-"),
        (grid.index("train"), "C0", "-"),
        (grid.index("sequential"), "C2", "--"),
    ]
    err_lines = [lines[0], lines[1], (grid.index("sequential", smallest), "C1", ":")]
    caption = _seeds_caption(grid, "band: min-max")
    paths = []
    for name, values, shown, ylabel in (
        ("accuracy", grid.acc, lines, "test accuracy"),
        ("stat_error", grid.err, err_lines, "statistics error"),
    ):
        what = "test accuracy" if name == "accuracy" else "statistics error"
        detail = (
            "y ranges per panel, fitted to PreciseBN; curves clipped below are noted"
            if name == "accuracy"
            else "log axis; defined below"
        )
        fig, axes = _panels(
            grid,
            f"{MODEL_NAMES[model]} on digits: {what} per epoch, {lr}\n({caption}; {detail})",
            sharey=name != "accuracy",
        )
        for (m, _), (b, _) in itertools.product(
            enumerate(grid.momenta), enumerate(grid.batch_sizes)
        ):
            ax = axes[m, b]
            for j, color, style in shown:
                runs = values[:, b, m, :, j]
                if name == "stat_error" and not runs.any():
                    continue  # the reference itself
                label = grid.methods[j].label(n_train)
                ax.plot(epochs, runs.mean(axis=0), style, color=color, lw=1.4, label=label)
                if len(grid.seeds) > 1:
                    ax.fill_between(
                        epochs, runs.min(axis=0), runs.max(axis=0), color=color, alpha=0.15, lw=0
                    )
            if b == 0:
                ax.set_ylabel(ylabel)
            if name == "accuracy":
                means = values[:, b, m].mean(axis=0)  # [epoch, method]
                precise = [j for j, _, _ in shown if grid.methods[j].mode is not None]
                ema = grid.index(None)
                bottom, top = accuracy_range(means[:, precise], means[:, ema])
                ax.set_ylim(bottom, top)
                _title(
                    ax,
                    f"batch {grid.batch_sizes[b]}, momentum {grid.momenta[m]}",
                    [clipped_note("EMA", epochs, means[:, ema], bottom)],
                )
        axes[0, 0].legend(fontsize=7, loc="lower right" if name == "accuracy" else "upper right")
        if name == "stat_error":
            axes[0, 0].set_yscale("log")
            _footnote(fig, stat_error_definition(n_train), len(grid.batch_sizes))
        paths.append(_save(fig, out / f"ema_vs_precise_{name}.png", layout=name != "stat_error"))
    return paths


def plot_samples(grid: Grid, n_train: int, out: Path, model: str, lr: str) -> Path:
    """Last-epoch accuracy and statistics error against the number of PreciseBN samples.

    The accuracy row's range shows every PreciseBN point; EMA lines below it are noted in the
    panel. The error row is on a log axis: the reference (sequential on all samples, error 0)
    has no point there, which a note under the panels says.
    """
    import matplotlib.pyplot as plt

    xs = [s or n_train for s in grid.sample_counts]
    cols = len(grid.batch_sizes)
    fig, axes = plt.subplots(
        2, cols, figsize=(3.1 * cols, 5.4), sharex=True, sharey="row", squeeze=False
    )
    ema = grid.index(None)
    last_acc = grid.acc[:, :, :, -1].mean(axis=0)  # [batch, momentum, method]
    precise = [j for j, method in enumerate(grid.methods) if method.mode is not None]
    bottom, top = accuracy_range(last_acc[:, 0, precise], last_acc[:, :, ema])
    for b, batch_size in enumerate(grid.batch_sizes):
        for row, values in enumerate((grid.acc, grid.err)):
            ax = axes[row, b]
            last = values[:, b, :, -1]  # [seed, momentum, method]
            for mode, color, marker in zip(MODES, ("C0", "C2"), ("o", "s"), strict=True):
                points = [
                    (x, last[:, 0, grid.index(mode, s)].mean())
                    for x, s in zip(xs, grid.sample_counts, strict=True)
                ]
                points = [(x, y) for x, y in points if row == 0 or y > 0]
                ax.plot(
                    *zip(*points, strict=True),
                    "-",
                    marker=marker,
                    ms=4,
                    color=color,
                    label=f"PreciseBN {mode}",
                )
            notes = []
            for m, momentum in enumerate(grid.momenta):
                level = last[:, m, ema].mean()
                ax.axhline(
                    level,
                    color="C3",
                    lw=1,
                    ls=("-", "--", ":")[m % 3],
                    label=f"EMA, momentum {momentum}",
                )
                if row == 0 and level < bottom:
                    notes.append(f"EMA {momentum} clipped: {level:.3f}")
            if row == 0:
                ax.set_ylim(bottom, top)
                _title(ax, f"batch {batch_size}", notes)
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_yscale("log")
                ax.set_xlabel("PreciseBN samples")
    axes[0, 0].set_ylabel(f"test accuracy, epoch {grid.epochs}")
    axes[1, 0].set_ylabel("statistics error")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"{MODEL_NAMES[model]} on digits: how many samples PreciseBN needs (of {n_train})\n"
        f"epoch {grid.epochs}, {_seeds_caption(grid, '')}, {lr}",
        fontsize=10,
    )
    _footnote(fig, stat_error_definition(n_train), cols)
    return _save(fig, out / "ema_vs_precise_samples.png", layout=False)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Regenerate the figures of docs/results.md with --out docs/img.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", choices=sorted(BUILDERS), default="mlp", help="the network")
    parser.add_argument("--epochs", type=positive_int, default=20, help="training epochs")
    parser.add_argument(
        "--batch-sizes",
        type=batch_size_int,
        nargs="+",
        default=[8, 32, 128, 512],
        help="training batch sizes (also PreciseBN's)",
    )
    parser.add_argument(
        "--momenta",
        type=float,
        nargs="+",
        default=[0.9, 0.99],
        help="BatchNorm momenta, the weight of the OLD running value",
    )
    parser.add_argument(
        "--samples",
        type=parse_samples,
        nargs="+",
        default=[100, 300, 1000, "all"],
        help="PreciseBN sample counts, 'all' for the whole training set (always included)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random seeds")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument(
        "--scale-lr", action="store_true", help="linear scaling: lr * batch / --lr-base-batch"
    )
    parser.add_argument(
        "--lr-base-batch", type=int, default=32, help="the batch size at which --scale-lr keeps lr"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for the PNG plots; docs/img holds the shipped figures, which --out "
        "docs/img regenerates (default: a new temporary directory)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small grid in a few seconds: 4 epochs, batch sizes 32 512, seed 0, samples 100",
    )
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.batch_sizes, args.seeds, args.samples = 4, [32, 512], [0], [100]
    # argparse applies `type` to string defaults only: "all" arrives here unconverted.
    samples = {parse_samples(s) if isinstance(s, str) else s for s in args.samples}
    args.samples = sorted(samples | {ALL}, key=lambda s: s or np.inf)
    args.out = figure_dir(args.out, "ema_vs_precise_", args.threads)

    data = load_digits(0)
    n_train = len(data.x_train)
    print(
        f"{args.model} on digits ({n_train} train / {len(data.x_test)} test), {args.epochs} "
        f"epochs, lr {args.lr}{' scaled by batch' if args.scale_lr else ''}, seeds {args.seeds}"
    )
    start = time.perf_counter()
    grid = run_grid(args, data)
    print_tables(grid, n_train)
    lr = lr_caption(args)
    paths = plot_per_epoch(grid, n_train, args.out, args.model, lr)
    paths.append(plot_samples(grid, n_train, args.out, args.model, lr))
    for path in paths:
        print(f"wrote {path}")
    last = grid.acc[:, :, :, -1].mean(axis=(0, 1, 2))
    print(f"total time {time.perf_counter() - start:.1f}s")
    counts = [
        _count(len(grid.batch_sizes), "batch size", "batch sizes"),
        _count(len(grid.momenta), "momentum", "momenta"),
        _count(len(grid.seeds), "seed", "seeds"),
    ]
    over = f"(mean over the grid: {' x '.join(counts)}, epoch {grid.epochs})"
    print(f"test accuracy (EMA): {last[grid.index(None)]:.4f} {over}")
    print(f"test accuracy (PreciseBN): {last[grid.index('train')]:.4f} {over}")


if __name__ == "__main__":
    main()
