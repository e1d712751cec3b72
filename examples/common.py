"""Shared pieces of the digits examples: data, mini-batches, training, and the two evaluations.

The digits examples import this module (and ``nn.py``) from the directory they live in. It uses
only public names of ``batchnorm``.

The data is scikit-learn's bundled copy of the UCI handwritten digits (1,797 images of 8 x 8
pixels with values 0..16, no download), split 80/20 with stratification into 1,437 training and
360 test images, scaled to [0, 1] and shaped (N, 1, 8, 8); the MLP flattens it itself.

Two kinds of test accuracy are measured for the same weights:

- EMA: eval mode with the running statistics BatchNorm updated during training,
  ``running = momentum * running + (1 - momentum) * batch_statistic`` (momentum is the weight
  of the OLD value, 0.9 by default; PyTorch's ``momentum=0.1`` is the same thing).
- PreciseBN: eval mode after :func:`batchnorm.precise_bn` replaced the running statistics with
  the exact statistics of a pass over training batches (Wu and Johnson, "Rethinking 'Batch' in
  BatchNorm", 2021). :func:`precise_accuracy` saves and restores the BatchNorm state around it,
  so the EMA continues untouched.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nn
import numpy as np
from numpy.typing import NDArray

import batchnorm as bn

Array = NDArray[np.float64]
Labels = NDArray[np.int64]
State = list[dict[str, NDArray[Any]]]

NUM_CLASSES = 10


# --- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    """The split digits data: images (N, 1, 8, 8) in [0, 1], labels (N,) in 0..9."""

    x_train: Array
    y_train: Labels
    x_test: Array
    y_test: Labels


def load_digits(seed: int = 0, test_size: float = 0.2) -> Digits:
    """scikit-learn's digits, split with stratification by a seeded shuffle, pixels / 16."""
    from sklearn.datasets import load_digits as sk_load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    data = sk_load_digits()
    images = (data.images / 16.0).astype(np.float64)[:, None]  # (1797, 1, 8, 8)
    labels = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=seed
    )
    return Digits(x_train, y_train, x_test, y_test)


def batch_indices(n: int, batch_size: int, rng: np.random.Generator) -> list[NDArray[np.intp]]:
    """A shuffled pass over range(n) in batches of batch_size; the last batch may be smaller.

    A last batch of one sample is joined to the one before: BatchNorm on (B, L) features
    cannot normalize a batch of one (each channel would have a single value).
    """
    order = rng.permutation(n)
    chunks = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        last = chunks.pop()
        chunks[-1] = np.concatenate([chunks[-1], last])
    return chunks


def steps_per_epoch(n: int, batch_size: int) -> int:
    """How many batches :func:`batch_indices` makes of n samples."""
    return -(-n // batch_size) - (n > batch_size and n % batch_size == 1)


def input_batches(
    x: Array, batch_size: int, rng: np.random.Generator, num_samples: int | None = None
) -> list[Array]:
    """Inputs for precise_bn: the first num_samples (None: all) of a shuffle, in batches."""
    n = len(x) if num_samples is None else min(num_samples, len(x))
    order = rng.permutation(len(x))[:n]
    return [x[order[idx]] for idx in batch_indices(n, batch_size, rng)]


# --- models' BatchNorm layers --------------------------------------------------------------------


def bn_layers(model: nn.Sequential) -> list[bn.BatchNorm]:
    """The BatchNorm layers of a Sequential, in forward order."""
    return [layer for layer in model.layers if isinstance(layer, bn.BatchNorm)]


def bn_state(model: nn.Sequential) -> State:
    """Copies of every BatchNorm's state (parameters, running statistics, counter)."""
    return [layer.state_dict() for layer in bn_layers(model)]


def load_bn_state(model: nn.Sequential, state: State) -> None:
    """Put back what :func:`bn_state` saved."""
    for layer, saved in zip(bn_layers(model), state, strict=True):
        layer.load_state_dict(saved)


# --- training and evaluation ---------------------------------------------------------------------


def train_epoch(
    model: nn.Sequential,
    opt: nn.SGD,
    x: Array,
    y: Labels,
    batch_size: int,
    rng: np.random.Generator,
) -> float:
    """One shuffled pass of SGD in training mode; returns the mean loss over the batches."""
    model.train()
    losses = []
    for idx in batch_indices(len(x), batch_size, rng):
        loss, dlogits = nn.softmax_cross_entropy(model(x[idx]), y[idx])
        model.backward(dlogits)
        opt.step(model.parameters())
        losses.append(loss)
    return float(np.mean(losses))


def accuracy(model: nn.Sequential, x: Array, y: Labels, batch_size: int = 512) -> float:
    """Fraction of correct predictions in eval mode (running statistics); mode is restored."""
    was_training = model.training
    model.eval()
    try:
        correct = sum(
            int((model(x[i : i + batch_size]).argmax(axis=1) == y[i : i + batch_size]).sum())
            for i in range(0, len(x), batch_size)
        )
    finally:
        if was_training:
            model.train()
    return correct / len(x)


def precise_accuracy(
    model: nn.Sequential,
    batches: Sequence[Array],
    x_test: Array,
    y_test: Labels,
    mode: str = "train",
) -> tuple[float, State]:
    """Test accuracy with PreciseBN statistics from `batches`, and the state that gave it.

    The BatchNorm state of the model is restored afterwards, so the EMA is left untouched.
    """
    saved = bn_state(model)
    try:
        bn.precise_bn(model, batches, num_batches_precise=len(batches), mode=mode)
        return accuracy(model, x_test, y_test), bn_state(model)
    finally:
        load_bn_state(model, saved)


# --- the two classifier scripts ------------------------------------------------------------------


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text}")
        return value

    return parse


positive_int = int_at_least(1)
# BatchNorm needs two values per channel: on (B, L) features, two samples per batch.
batch_size_int = int_at_least(2)


THREADS_HELP = (
    "BLAS threads for NumPy: the matrices here are small, and more threads mostly wait for "
    "each other"
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The --help format of every example: each option's help, then its default once, as
    "(default: X)". None and False (an unset option, an off switch) are not shown: an option
    whose unset value means something says so in its help, in the same format."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


@dataclass(frozen=True)
class Defaults:
    """Per-script defaults of the shared command-line flags."""

    epochs: int
    batch_size: int
    lr: float
    quick_epochs: int


def classifier_parser(description: str, defaults: Defaults) -> argparse.ArgumentParser:
    """The flags shared by mlp_digits.py and lenet_digits.py."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="training epochs")
    p.add_argument(
        "--batch-size", type=batch_size_int, default=defaults.batch_size, help="SGD batch size"
    )
    p.add_argument("--lr", type=float, default=defaults.lr, help="SGD learning rate")
    p.add_argument(
        "--momentum",
        type=float,
        default=0.9,
        help="BatchNorm momentum, the weight of the OLD running value: running = momentum * "
        "running + (1 - momentum) * batch (PyTorch's 0.1 is 0.9 here)",
    )
    p.add_argument(
        "--use-precise-stats",
        action="store_true",
        help="after every epoch, replace the running statistics with PreciseBN ones in place "
        "(as SlowFast and pycls do); the EMA then restarts from them",
    )
    p.add_argument(
        "--num-batches-precise",
        type=positive_int,
        default=200,
        help="batches for PreciseBN, at most one pass over the training set",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split, weights and shuffles")
    p.add_argument(
        "--quick", action="store_true", help=f"{defaults.quick_epochs} epochs, a few seconds"
    )
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    return p


def seeds_caption(seeds: Sequence[int], spread: str) -> str:
    """'seed 0', or 'seeds 0, 1, 2; band: min-max over the seeds' for `spread` 'band': a
    figure names its spread only when several seeds give it one."""
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"seeds {', '.join(map(str, seeds))}; {spread}: min-max over the seeds"


def limit_threads(threads: int) -> None:
    """Cap the BLAS thread pools (threadpoolctl comes with scikit-learn)."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    threadpool_limits(threads)


def figure_dir(out: Path | None, prefix: str, threads: int) -> Path:
    """The folder for a study's figures (a new temporary one when out is None, so that the
    shipped figures change only with an explicit --out), with BLAS capped at `threads` and
    matplotlib drawing off screen."""
    folder = Path(tempfile.mkdtemp(prefix=prefix)) if out is None else out
    folder.mkdir(parents=True, exist_ok=True)
    limit_threads(threads)
    import matplotlib

    matplotlib.use("Agg")
    return folder


def save_figure(fig: Any, path: Path) -> Path:
    """Write fig to path as a 100-dpi PNG, close it, and return the path."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sgd(lr: float) -> nn.SGD:
    """The optimizer of every example: momentum 0.9, weight decay 5e-4 (also on gamma, beta)."""
    return nn.SGD(lr, momentum=0.9, weight_decay=5e-4)


def run_classifier(
    args: argparse.Namespace,
    build: Callable[[np.random.Generator, float], nn.Sequential],
    defaults: Defaults,
) -> dict[str, float]:
    """Train build(rng, bn_momentum) on the digits; print per-epoch and final accuracies.

    Every epoch measures the test accuracy with the EMA statistics and with PreciseBN
    statistics of the same weights. Without ``--use-precise-stats`` the PreciseBN evaluation
    runs on saved-and-restored state, so training and its EMA are exactly those of a run
    without PreciseBN. With it, the PreciseBN statistics stay in the model, and the next
    epoch's EMA starts from them. The weights are the same either way: running statistics do
    not enter a training-mode forward pass.
    """
    limit_threads(args.threads)
    epochs = defaults.quick_epochs if args.quick else args.epochs
    data = load_digits(args.seed)
    # Separate streams: initialization, training shuffles and PreciseBN batches, so that the
    # choice of PreciseBN flags cannot change the weights.
    init_rng, shuffle_rng, precise_rng = (np.random.default_rng([args.seed, k]) for k in range(3))
    model = build(init_rng, args.momentum)
    opt = sgd(args.lr)
    per_epoch = steps_per_epoch(len(data.x_train), args.batch_size)
    num_precise = min(args.num_batches_precise, per_epoch)
    print(
        f"digits: {len(data.x_train)} train / {len(data.x_test)} test images; "
        f"{epochs} epochs of {per_epoch} batches of {args.batch_size}, lr {args.lr}, "
        f"BatchNorm momentum {args.momentum}; PreciseBN on {num_precise} batches"
        + (" (in place each epoch)" if args.use_precise_stats else "")
    )
    print(f"{'epoch':>5} {'loss':>8} {'EMA':>7} {'PreciseBN':>9} {'time':>7}")
    start = time.perf_counter()
    ema = precise = 0.0
    for epoch in range(1, epochs + 1):
        loss = train_epoch(model, opt, data.x_train, data.y_train, args.batch_size, shuffle_rng)
        ema = accuracy(model, data.x_test, data.y_test)
        batches = input_batches(data.x_train, args.batch_size, precise_rng)[:num_precise]
        if args.use_precise_stats:
            bn.precise_bn(model, batches, num_batches_precise=num_precise)
            precise = accuracy(model, data.x_test, data.y_test)
        else:
            precise, _ = precise_accuracy(model, batches, data.x_test, data.y_test)
        elapsed = time.perf_counter() - start
        print(f"{epoch:>5} {loss:>8.4f} {ema:>7.4f} {precise:>9.4f} {elapsed:>6.1f}s")
    samples = sum(len(b) for b in batches)
    print(f"test accuracy (EMA): {ema:.4f}")
    print(f"test accuracy (PreciseBN): {precise:.4f}")
    print(f"PreciseBN used {samples} training samples; total time {elapsed:.1f}s")
    return {"ema": ema, "precise": precise, "seconds": elapsed}
