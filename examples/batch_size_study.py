"""The normalization batch size: test accuracy against the ghost batch size, three ways.

"Rethinking 'Batch' in BatchNorm" (Wu and Johnson, 2021) separates the batch size of SGD from
the *normalization batch size*, the number of samples whose statistics normalize each other.
Here the SGD batch is fixed (--batch-size, default 128) and every BatchNorm layer normalizes
ghost batches of k samples (``bn.BatchNorm(C, ghost_batch_size=k)``), for k from 2 to the
whole batch. The trained weights are then tested three ways:

- EMA: eval mode with the running statistics kept during training (one update per ghost batch;
  momentum 0.9, the weight of the OLD value);
- PreciseBN: eval mode with population statistics, ``bn.precise_bn`` over one pass of the
  training set in training batches (the layers normalize ghost batches during the pass, as in
  training, so each layer's statistics describe the inputs it got in training);
- mini-batch: the test set in batches of --batch-size in training mode, so every ghost batch of
  k test samples is normalized with its own statistics, as in training. The state is saved and
  restored around it. This is the paper's remedy for the train-test inconsistency of small
  normalization batches; it needs test batches of k samples (from one distribution) at
  inference.

Run::

    python examples/batch_size_study.py                 # 5 seeds, a few minutes; new temp dir
    python examples/batch_size_study.py --out docs/img  # regenerate the shipped figure
    python examples/batch_size_study.py --quick         # 1 seed, 4 ghost sizes, under 30 s

Prints a Markdown table (mean over seeds and min-max) and writes ``batch_size_study.png`` to
--out. The last lines read ``test accuracy (k=<k>, <method>): ...`` (means over seeds).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import nn
import numpy as np
from common import (
    THREADS_HELP,
    Digits,
    HelpFormatter,
    accuracy,
    batch_indices,
    batch_size_int,
    bn_layers,
    bn_state,
    figure_dir,
    load_bn_state,
    load_digits,
    positive_int,
    precise_accuracy,
    save_figure,
    seeds_caption,
    sgd,
)
from lenet_digits import build_lenet
from mlp_digits import build_mlp
from nn import Sequential
from numpy.typing import NDArray

import batchnorm as bn

METHODS = ("EMA", "PreciseBN", "mini-batch")


def build_lenet_conv(rng: np.random.Generator, momentum: float) -> Sequential:
    """lenet_digits.py's CNN without its dense BatchNorm (the dense layer gets a bias): every
    BatchNorm left normalizes conv features, k x H x W values per channel for k images."""
    return Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False, rng=rng),
        bn.BatchNorm(16, momentum=momentum),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False, rng=rng),
        bn.BatchNorm(32, momentum=momentum),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64, rng),
        nn.ReLU(),
        nn.Linear(64, 10, rng),
    )


BUILDERS: dict[str, Callable[[np.random.Generator, float], Sequential]] = {
    "mlp": build_mlp,
    "lenet": build_lenet,
    "lenet-conv": build_lenet_conv,
}
MODEL_NAMES = {"mlp": "MLP", "lenet": "LeNet", "lenet-conv": "LeNet, conv BatchNorm only"}


def build(model: str, rng: np.random.Generator, ghost: int) -> Sequential:
    """examples/mlp_digits.py's MLP or lenet_digits.py's CNN (BatchNorm momentum 0.9), every
    BatchNorm layer normalizing ghost batches of `ghost` samples."""
    net = BUILDERS[model](rng, 0.9)
    for layer in bn_layers(net):
        layer.ghost_batch_size = ghost
    return net


def trimmed(chunks: list[NDArray[np.intp]], ghost: int) -> list[NDArray[np.intp]]:
    """Batches whose last ghost batch keeps two samples: a last batch that would end in a
    ghost batch of one sample leaves that sample out (one of 1,437 per epoch, a different one
    each epoch)."""
    if len(chunks[-1]) % ghost == 1:
        chunks[-1] = chunks[-1][:-1]
    return [c for c in chunks if len(c)]


def train(model: Sequential, data: Digits, ghost: int, batch_size: int, epochs: int, lr: float,
          seed: int) -> None:  # fmt: skip
    """SGD in shuffled batches (examples/common.py's train_epoch loop, ghost-safe batches)."""
    opt = sgd(lr)
    rng = np.random.default_rng([seed, 1])
    model.train()
    for _ in range(epochs):
        for idx in trimmed(batch_indices(len(data.x_train), batch_size, rng), ghost):
            _, dlogits = nn.softmax_cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            model.backward(dlogits)
            opt.step(model.parameters())


def minibatch_accuracy(model: Sequential, x: NDArray[np.float64], y: NDArray[np.int64],
                       batch_size: int) -> float:  # fmt: skip
    """Accuracy in training mode on test batches of batch_size (each layer splitting them into
    its ghost batches); the BatchNorm state is restored afterwards.

    Every test sample counts once. A last batch that would end in a ghost batch of one sample
    is run with the sample before it in front (and that sample's second prediction ignored).
    """
    saved = bn_state(model)
    ghost = bn_layers(model)[0].ghost_batch_size or batch_size
    model.train()
    correct = 0
    try:
        for lo in range(0, len(x), batch_size):
            hi = min(lo + batch_size, len(x))
            extra = 1 if (hi - lo) % ghost == 1 else 0
            predicted = model(x[lo - extra : hi]).argmax(axis=1)[extra:]
            correct += int((predicted == y[lo:hi]).sum())
    finally:
        load_bn_state(model, saved)
    return correct / len(x)


def run(
    model_name: str, data: Digits, ghost: int, batch_size: int, epochs: int, lr: float, seed: int
) -> dict[str, float]:
    model = build(model_name, np.random.default_rng([seed, 0]), ghost)
    train(model, data, ghost, batch_size, epochs, lr, seed)
    rng = np.random.default_rng([seed, 2])
    chunks = trimmed(batch_indices(len(data.x_train), batch_size, rng), ghost)
    precise, _ = precise_accuracy(model, [data.x_train[c] for c in chunks], data.x_test,
                                  data.y_test)  # fmt: skip
    order = np.random.default_rng([seed, 3]).permutation(len(data.x_test))
    mini = minibatch_accuracy(model, data.x_test[order], data.y_test[order], batch_size)
    return {
        "EMA": accuracy(model, data.x_test, data.y_test),
        "PreciseBN": precise,
        "mini-batch": mini,
    }


def plot(ghosts: list[int], acc: NDArray[np.float64], out: Path, title: str) -> Path:
    """acc[seed, ghost, method]: mean and min-max band against the ghost batch size."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for j, (method, style) in enumerate(zip(METHODS, ("-o", "-s", "--^"), strict=True)):
        runs = acc[:, :, j]
        axes[0].plot(ghosts, runs.mean(axis=0), style, color=f"C{j}", ms=4, label=method)
        if len(runs) > 1:
            axes[0].fill_between(ghosts, runs.min(axis=0), runs.max(axis=0), color=f"C{j}",
                                 alpha=0.15, lw=0)  # fmt: skip
    gap = acc[:, :, 2] - acc[:, :, 1]
    axes[1].plot(ghosts, gap.mean(axis=0), "-o", color="C3", ms=4)
    if len(gap) > 1:
        axes[1].fill_between(ghosts, gap.min(axis=0), gap.max(axis=0), color="C3", alpha=0.15, lw=0)
    axes[1].axhline(0.0, color="grey", lw=0.8)
    axes[0].set_ylabel("test accuracy")
    axes[1].set_ylabel("mini-batch minus PreciseBN")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ghosts, [str(k) for k in ghosts])
        ax.set_xlabel("normalization (ghost) batch size k")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "batch_size_study.png"
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", choices=sorted(BUILDERS), default="mlp", help="the network")
    parser.add_argument("--batch-size", type=batch_size_int, default=128, help="SGD batch size")
    parser.add_argument(
        "--ghost-sizes",
        type=batch_size_int,
        nargs="+",
        default=[2, 4, 8, 16, 32, 64, 128],
        help="normalization batch sizes k (at most --batch-size)",
    )
    parser.add_argument("--epochs", type=positive_int, default=30, help="training epochs")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="random seeds"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for the PNG figure (default: a new temporary directory)",
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, k in 2 8 32 128, 4 epochs")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.ghost_sizes = 4, [0], [2, 8, 32, 128]
    ghosts = sorted({min(k, args.batch_size) for k in args.ghost_sizes})
    args.out = figure_dir(args.out, "batch_size_study_", args.threads)

    data = load_digits(0)
    print(
        f"{MODEL_NAMES[args.model]} on digits ({len(data.x_train)} train / {len(data.x_test)} "
        f"test), SGD batch {args.batch_size}, {args.epochs} epochs, lr {args.lr}, seeds "
        f"{args.seeds}"
    )
    start = time.perf_counter()
    acc = np.zeros((len(args.seeds), len(ghosts), len(METHODS)))
    for g, ghost in enumerate(ghosts):
        for s, seed in enumerate(args.seeds):
            result = run(args.model, data, ghost, args.batch_size, args.epochs, args.lr, seed)
            acc[s, g] = [result[m] for m in METHODS]
        mean = acc[:, g].mean(axis=0)
        means = ", ".join(f"{m} {v:.4f}" for m, v in zip(METHODS, mean, strict=True))
        print(f"  k = {ghost:>4}: {means} ({time.perf_counter() - start:.1f}s)", flush=True)

    def cell(values: NDArray[np.float64]) -> str:
        if values.size == 1:
            return f"{values.item():.3f}"
        return f"{values.mean():.3f} ({values.min():.3f}-{values.max():.3f})"

    print()
    print("| ghost batch size k | EMA | PreciseBN | mini-batch (k) |")
    print("|---|---|---|---|")
    for g, ghost in enumerate(ghosts):
        print(f"| {ghost} | " + " | ".join(cell(acc[:, g, j]) for j in range(len(METHODS))) + " |")
    print()
    title = (
        f"{MODEL_NAMES[args.model]} on digits: inference statistics against k\n(SGD batch "
        f"{args.batch_size}, {args.epochs} epochs, {seeds_caption(args.seeds, 'band')})"
    )
    print(f"wrote {plot(ghosts, acc, args.out, title)}")
    print(f"total time {time.perf_counter() - start:.1f}s")
    for g, ghost in enumerate(ghosts):
        for j, method in enumerate(METHODS):
            print(f"test accuracy (k={ghost}, {method}): {acc[:, g, j].mean():.4f}")


if __name__ == "__main__":
    main()
