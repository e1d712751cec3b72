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

    python examples/ema_vs_precise.py                   # the grid of docs/results.md
    python examples/ema_vs_precise.py --quick           # 2 batch sizes, 1 seed, 4 epochs
    python examples/ema_vs_precise.py --model lenet --seeds 0 --out /tmp/study

Prints summary tables and writes PNG plots to --out (default docs/img; with --quick a new
temporary directory). The last lines read ``test accuracy (EMA): ...`` and
``test accuracy (PreciseBN): ...``: means over the whole grid at the last epoch.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from common import (
    THREADS_HELP,
    Digits,
    State,
    accuracy,
    batch_size_int,
    bn_state,
    input_batches,
    limit_threads,
    load_digits,
    positive_int,
    precise_accuracy,
    sgd,
    steps_per_epoch,
    train_epoch,
)
from lenet_digits import build_lenet
from mlp_digits import build_mlp
from nn import Sequential
from numpy.typing import NDArray

if TYPE_CHECKING:
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


def _panels(grid: Grid, title: str) -> tuple[Figure, NDArray[np.object_]]:
    import matplotlib.pyplot as plt

    rows, cols = len(grid.momenta), len(grid.batch_sizes)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.1 * cols, 2.7 * rows + 0.5), sharex=True, sharey=True, squeeze=False
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


def _save(fig: Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _seeds_caption(grid: Grid, band: str) -> str:
    if len(grid.seeds) == 1:
        return f"seed {grid.seeds[0]}"
    return f"mean of seeds {', '.join(map(str, grid.seeds))}" + (f", {band}" if band else "")


def plot_per_epoch(grid: Grid, n_train: int, out: Path, model: str) -> list[Path]:
    """Accuracy and statistics error per epoch: a panel per (momentum, batch size)."""
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
        fig, axes = _panels(grid, f"{MODEL_NAMES[model]} on digits: {what} per epoch\n({caption})")
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
            low = float(np.percentile(grid.acc[..., [j for j, _, _ in shown]], 3))
            axes[0, 0].set_ylim(max(0.0, low - 0.02), 1.0)
        else:
            axes[0, 0].set_yscale("log")
        axes[0, 0].legend(fontsize=7, loc="lower right" if name == "accuracy" else "upper right")
        paths.append(_save(fig, out / f"ema_vs_precise_{name}.png"))
    return paths


def plot_samples(grid: Grid, n_train: int, out: Path, model: str) -> Path:
    """Last-epoch accuracy and statistics error against the number of PreciseBN samples."""
    import matplotlib.pyplot as plt

    xs = [s or n_train for s in grid.sample_counts]
    cols = len(grid.batch_sizes)
    fig, axes = plt.subplots(
        2, cols, figsize=(3.1 * cols, 5.4), sharex=True, sharey="row", squeeze=False
    )
    ema = grid.index(None)
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
            for m, momentum in enumerate(grid.momenta):
                ax.axhline(
                    last[:, m, ema].mean(),
                    color="C3",
                    lw=1,
                    ls=("-", "--", ":")[m % 3],
                    label=f"EMA, momentum {momentum}",
                )
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"batch {batch_size}", fontsize=9)
            else:
                ax.set_yscale("log")
                ax.set_xlabel("PreciseBN samples")
    axes[0, 0].set_ylabel(f"test accuracy, epoch {grid.epochs}")
    axes[1, 0].set_ylabel("statistics error")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"{MODEL_NAMES[model]} on digits: how many samples PreciseBN needs (of {n_train})\n"
        f"epoch {grid.epochs}, {_seeds_caption(grid, '')}",
        fontsize=10,
    )
    return _save(fig, out / "ema_vs_precise_samples.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(BUILDERS), default="mlp")
    parser.add_argument("--epochs", type=positive_int, default=20)
    parser.add_argument("--batch-sizes", type=batch_size_int, nargs="+", default=[8, 32, 128, 512])
    parser.add_argument(
        "--momenta",
        type=float,
        nargs="+",
        default=[0.9, 0.99],
        help="BatchNorm momenta, the weight of the OLD running value (default 0.9 0.99)",
    )
    parser.add_argument(
        "--samples",
        type=parse_samples,
        nargs="+",
        default=[100, 300, 1000, ALL],
        help="PreciseBN sample counts, 'all' for the whole training set (always included)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, 0.05")
    parser.add_argument(
        "--scale-lr", action="store_true", help="linear scaling: lr * batch / --lr-base-batch"
    )
    parser.add_argument("--lr-base-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="PNG directory (docs/img)")
    parser.add_argument("--quick", action="store_true", help="a small grid in a few seconds")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.batch_sizes, args.seeds, args.samples = 4, [32, 512], [0], [100]
    args.samples = sorted(set(args.samples) | {ALL}, key=lambda s: s or np.inf)
    if args.out is None:
        docs = Path(__file__).resolve().parent.parent / "docs" / "img"
        args.out = Path(tempfile.mkdtemp(prefix="ema_vs_precise_")) if args.quick else docs
    args.out.mkdir(parents=True, exist_ok=True)
    limit_threads(args.threads)

    import matplotlib

    matplotlib.use("Agg")

    data = load_digits(0)
    n_train = len(data.x_train)
    print(
        f"{args.model} on digits ({n_train} train / {len(data.x_test)} test), {args.epochs} "
        f"epochs, lr {args.lr}{' scaled by batch' if args.scale_lr else ''}, seeds {args.seeds}"
    )
    start = time.perf_counter()
    grid = run_grid(args, data)
    print_tables(grid, n_train)
    paths = plot_per_epoch(grid, n_train, args.out, args.model)
    paths.append(plot_samples(grid, n_train, args.out, args.model))
    for path in paths:
        print(f"wrote {path}")
    last = grid.acc[:, :, :, -1].mean(axis=(0, 1, 2))
    print(f"total time {time.perf_counter() - start:.1f}s")
    print(f"test accuracy (EMA): {last[grid.index(None)]:.4f}")
    print(f"test accuracy (PreciseBN): {last[grid.index('train')]:.4f}")


if __name__ == "__main__":
    main()
