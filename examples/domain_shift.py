"""AdaBN on the digits: BatchNorm statistics recomputed on unlabelled data of a shifted domain.

A network is trained on scikit-learn's digits (the source domain) and tested on deterministic
transformations of the test images (the target domains). Its weights never change; only the
BatchNorm statistics do. Three sets of statistics are compared:

- EMA: the running statistics kept during training on the source;
- PreciseBN: exact population statistics of the source training images
  (``bn.precise_bn`` on source batches);
- AdaBN: exact population statistics of the *target* domain's training images, without their
  labels (``bn.precise_bn(model, target_batches, mode="sequential")``; Li et al., "Revisiting
  Batch Normalization For Practical Domain Adaptation", 2016), on all 1,437 of them and on the
  first --adabn-samples of them.

The domains, applied to pixels in [0, 1]:

- ``source``: the images themselves;
- ``contrast``: ``0.5 * x + 0.3``, half the contrast on a grey background (an affine map of
  every pixel: after a linear layer it is an affine map of every feature, which AdaBN undoes);
- ``gamma``: ``x ** 0.4``, a brightening curve (not affine);
- ``noise``: ``x`` plus Gaussian noise of standard deviation 0.3 (fixed seed);
- ``inverted``: ``1 - x``, dark digits on a white background.

Run::

    python examples/domain_shift.py                     # MLP, 3 seeds -> a new temporary dir
    python examples/domain_shift.py --out docs/img      # regenerate the shipped figure
    python examples/domain_shift.py --quick             # 1 seed, 3 epochs

Prints a Markdown table (test accuracy, mean over seeds and min-max) and writes
``domain_shift.png`` to --out. The last lines read ``test accuracy (<domain>, <method>): ...``
for every domain and method (means over seeds).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import (
    THREADS_HELP,
    Digits,
    HelpFormatter,
    accuracy,
    batch_size_int,
    figure_dir,
    input_batches,
    load_digits,
    positive_int,
    precise_accuracy,
    save_figure,
    seeds_caption,
    sgd,
    train_epoch,
)
from lenet_digits import build_lenet
from mlp_digits import build_mlp
from nn import Sequential
from numpy.typing import NDArray

Array = NDArray[np.float64]

BUILDERS: dict[str, Callable[[np.random.Generator, float], Sequential]] = {
    "mlp": build_mlp,
    "lenet": build_lenet,
}


def _noise(x: Array) -> Array:
    return x + np.random.default_rng(12345).normal(0.0, 0.3, size=x.shape)


DOMAINS: dict[str, Callable[[Array], Array]] = {
    "source": lambda x: x,
    "contrast": lambda x: 0.5 * x + 0.3,
    "gamma": lambda x: x**0.4,
    "noise": _noise,
    "inverted": lambda x: 1.0 - x,
}


def evaluate(
    model: Sequential, data: Digits, batch_size: int, samples: int, seed: int
) -> dict[tuple[str, str], float]:
    """Test accuracy of every (domain, method) for the trained model's weights."""
    rng = np.random.default_rng([seed, 3])
    order = rng.permutation(len(data.x_train))
    source_batches = input_batches(data.x_train[order], batch_size, np.random.default_rng(seed))
    results: dict[tuple[str, str], float] = {}
    for domain, shift in DOMAINS.items():
        x_test = shift(data.x_test)
        results[domain, "EMA"] = accuracy(model, x_test, data.y_test)
        results[domain, "PreciseBN"], _ = precise_accuracy(
            model, source_batches, x_test, data.y_test, mode="sequential"
        )
        target = shift(data.x_train)[order]  # the target domain's images, without labels
        for name, subset in (("AdaBN", target), (f"AdaBN {samples}", target[:samples])):
            batches = input_batches(subset, batch_size, np.random.default_rng(seed))
            results[domain, name], _ = precise_accuracy(
                model, batches, x_test, data.y_test, mode="sequential"
            )
    return results


def method_labels(n_train: int, samples: int) -> dict[str, str]:
    """What each method's bars show, in words (the legend of the figure)."""
    return {
        "EMA": "EMA (running statistics of training)",
        "PreciseBN": f"PreciseBN (all {n_train} source images)",
        "AdaBN": f"AdaBN (all {n_train} target images)",
        f"AdaBN {samples}": f"AdaBN {samples} (only the first {samples} target images)",
    }


def plot(
    table: dict[tuple[str, str], list[float]],
    methods: list[str],
    out: Path,
    caption: str,
    labels: dict[str, str],
) -> Path:
    import matplotlib.pyplot as plt

    domains = list(DOMAINS)
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        values = np.array([table[d, method] for d in domains])  # (domains, seeds)
        xs = np.arange(len(domains)) + (j - (len(methods) - 1) / 2) * width
        mean = values.mean(axis=1)
        err = None
        if values.shape[1] > 1:  # one seed has no spread to draw
            err = np.stack([mean - values.min(axis=1), values.max(axis=1) - mean])
        ax.bar(xs, mean, width, yerr=err, capsize=2, label=labels[method], color=f"C{j}")
    ax.set_xticks(np.arange(len(domains)), domains)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.25)  # room for the legend above the bars
    ax.set_yticks(np.linspace(0.0, 1.0, 6))
    ax.axhline(0.1, color="grey", lw=0.8, ls=":", label="chance: 1 in 10 classes")
    ax.grid(axis="y", alpha=0.3)
    handles, texts = ax.get_legend_handles_labels()  # the chance line last, after the bars
    order = [*range(1, len(handles)), 0]
    ax.legend([handles[i] for i in order], [texts[i] for i in order], fontsize=7.5,
              loc="upper center", ncols=2)  # fmt: skip
    ax.set_title(f"BatchNorm statistics under domain shift ({caption})", fontsize=10)
    fig.tight_layout()
    path = out / "domain_shift.png"
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", choices=sorted(BUILDERS), default="mlp", help="the network")
    parser.add_argument("--epochs", type=positive_int, default=20, help="training epochs")
    parser.add_argument(
        "--batch-size", type=batch_size_int, default=32, help="SGD and PreciseBN batch size"
    )
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random seeds")
    parser.add_argument(
        "--adabn-samples",
        type=positive_int,
        default=64,
        help="target images for the small AdaBN (the first of the shuffled target training set)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for the PNG figure (default: a new temporary directory)",
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 3, [0]
    args.out = figure_dir(args.out, "domain_shift_", args.threads)

    data = load_digits(0)
    print(
        f"{args.model} trained on digits ({len(data.x_train)} train / {len(data.x_test)} test), "
        f"{args.epochs} epochs of batches of {args.batch_size}, lr {args.lr}, seeds {args.seeds}"
    )
    start = time.perf_counter()
    table: dict[tuple[str, str], list[float]] = {}
    for seed in args.seeds:
        model = BUILDERS[args.model](np.random.default_rng([seed, 0]), 0.9)
        opt = sgd(args.lr)
        shuffle_rng = np.random.default_rng([seed, 1])
        for _ in range(args.epochs):
            train_epoch(model, opt, data.x_train, data.y_train, args.batch_size, shuffle_rng)
        for key, value in evaluate(model, data, args.batch_size, args.adabn_samples, seed).items():
            table.setdefault(key, []).append(value)
        print(f"  seed {seed} done ({time.perf_counter() - start:.1f}s)", flush=True)
    methods = ["EMA", "PreciseBN", "AdaBN", f"AdaBN {args.adabn_samples}"]

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    print()
    print("| domain | EMA (source) | PreciseBN (source) | AdaBN (target, all) | "
          f"AdaBN (target, {args.adabn_samples}) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for domain in DOMAINS:
        print(f"| {domain} | " + " | ".join(cell(table[domain, m]) for m in methods) + " |")
    print()
    caption = f"{args.model}, {args.epochs} epochs, {seeds_caption(args.seeds, 'bars')}"
    labels = method_labels(len(data.x_train), args.adabn_samples)
    path = plot(table, methods, args.out, caption, labels)
    print(f"wrote {path}")
    print(f"total time {time.perf_counter() - start:.1f}s")
    for domain in DOMAINS:
        for method in methods:
            print(f"test accuracy ({domain}, {method}): {np.mean(table[domain, method]):.4f}")


if __name__ == "__main__":
    main()
