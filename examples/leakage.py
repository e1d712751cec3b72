"""Information leakage within a batch (Wu and Johnson 2021, section 6), on the digits.

Data-parallel training where each worker's batch is correlated with the target: every step,
each worker draws its batch from only ``--classes-per-worker`` classes (1 by default: the whole
batch of one class; with more, equal shares). With per-worker BatchNorm a sample's output then
depends on which samples share its batch, and the network can learn to read the label from the
batch statistics instead of from the sample alone: it does well while its batches stay
correlated, and badly when it is evaluated with population statistics. Four ways to normalize
are trained on the same batches, with the same initialization, and compared:

- ``per-worker``: plain BatchNorm on each worker's batch (the leak);
- ``sync``: SyncBN over every worker's batch (``batchnorm.distributed.synchronize``);
- ``shuffle``: shuffle BN as in MoCo, the samples permuted across the workers before the
  network and the logits put back after (``dist.shuffle`` / ``dist.unshuffle``; the gradient
  of unshuffle is shuffle with the same seed);
- ``frozen``: population statistics in training (``bn.freeze_all``), recomputed with
  ``precise_bn(..., group=...)`` at the start of every epoch.

Each is measured three ways: training accuracy (training mode, correlated batches, the last
epoch), test accuracy with population statistics (``precise_bn`` over every worker's batches,
eval mode), and test accuracy in training mode on test batches correlated the same way (each
worker's own statistics, which is what the per-worker network learned to use).

Run::

    python examples/leakage.py                           # 4 workers as threads, 3 seeds
    mpiexec -n 4 python examples/leakage.py --mpi        # 4 MPI ranks
    python examples/leakage.py --quick                   # a few seconds
    python examples/leakage.py --out docs/img            # replace the shipped figure
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np
from common import (
    Digits,
    HelpFormatter,
    figure_dir,
    limit_threads,
    load_digits,
    save_figure,
    sgd,
)
from mlp_digits import build_mlp
from nn import Sequential, softmax_cross_entropy

import batchnorm as bn
from batchnorm import distributed as dist

Group = dist.Group
METHODS = ("per-worker", "sync", "shuffle", "frozen")
MEASURES = (
    "train, correlated batches",
    "test, population statistics",
    "test, correlated batches (train mode)",
)


def correlated_batches(
    y: np.ndarray, workers: int, per_worker: int, classes: int, steps: int, rng: np.random.Generator
) -> list[list[np.ndarray]]:
    """`steps` global batches: for each worker, per_worker indices from `classes` random
    classes (as equal shares as possible). The same on every rank (same rng)."""
    pools = [np.flatnonzero(y == c) for c in range(10)]
    out = []
    for _ in range(steps):
        step = []
        for _ in range(workers):
            chosen = rng.choice(10, size=classes, replace=False)
            shares = np.array_split(np.arange(per_worker), classes)
            step.append(
                np.concatenate(
                    [
                        rng.choice(pools[c], size=len(s), replace=False)
                        for c, s in zip(chosen, shares, strict=True)
                    ]
                )
            )
        out.append(step)
    return out


def layers_of(model: Sequential) -> list[bn.BatchNorm]:
    return [layer for _, layer in bn.batchnorms(model)]


def forward_backward(
    model: Sequential,
    method: str,
    x: np.ndarray,
    y: np.ndarray,
    share: float,
    group: Group,
    seed: tuple[int, ...],
) -> tuple[float, int]:
    """One step's forward and backward on this worker; its loss share and correct count."""
    if method == "shuffle":
        xs, token = dist.shuffle(x, group, seed)
        logits = dist.unshuffle(model(xs), token, group)
    else:
        logits = model(x)
    loss, dlogits = softmax_cross_entropy(logits, y)
    dlogits = dlogits * share  # dy scaled by the GLOBAL batch size
    if method == "shuffle":
        dlogits, _ = dist.shuffle(dlogits, group, seed)  # the gradient of unshuffle
    model.backward(dlogits)
    return loss * share, int((logits.argmax(axis=1) == y).sum())


def population_statistics(
    model: Sequential,
    data: Digits,
    args: argparse.Namespace,
    group: Group,
    rng: np.random.Generator,
) -> None:
    """precise_bn over every worker's correlated batches (their union is the population)."""
    steps = correlated_batches(
        data.y_train, group.size, args.per_worker, args.classes_per_worker, args.precise_steps, rng
    )
    batches = [data.x_train[step[group.rank]] for step in steps]
    bn.precise_bn(model, batches, len(batches), layers=layers_of(model), group=group)


def accuracy(model: Sequential, x: np.ndarray, y: np.ndarray, group: Group) -> float:
    """Eval-mode accuracy on this worker's share of the test set, summed over the workers."""
    model.eval()
    part = np.array_split(np.arange(len(x)), group.size)[group.rank]
    correct = float((model(x[part]).argmax(axis=1) == y[part]).sum())
    model.train()
    total = dist.allreduce([np.array([correct])], group)[0]
    return float(total[0]) / len(x)


def correlated_test_accuracy(
    model: Sequential, data: Digits, args: argparse.Namespace, group: Group, seed: int
) -> float:
    """Training-mode accuracy on correlated test batches, each worker's own statistics; the
    BatchNorm state is restored afterwards."""
    saved = bn.model_state_dict(model)
    layers = layers_of(model)
    groups, frozen = [layer.group for layer in layers], [layer.frozen for layer in layers]
    for layer in layers:
        layer.group, layer.frozen = None, False
    rng = np.random.default_rng([seed, 9])
    steps = correlated_batches(
        data.y_test, group.size, args.per_worker, args.classes_per_worker, args.test_steps, rng
    )
    correct = 0.0
    for step in steps:
        idx = step[group.rank]
        correct += float((model(data.x_test[idx]).argmax(axis=1) == data.y_test[idx]).sum())
    for layer, g, f in zip(layers, groups, frozen, strict=True):
        layer.group, layer.frozen = g, f
    bn.load_model_state_dict(model, saved)
    total = dist.allreduce([np.array([correct])], group)[0]
    return float(total[0]) / (len(steps) * group.size * args.per_worker)


def train(
    method: str, data: Digits, args: argparse.Namespace, group: Group, seed: int
) -> tuple[float, float, float]:
    """Train one method; return its three accuracies (the same on every worker)."""
    model = build_mlp(np.random.default_rng([seed, 0]), args.momentum)
    if method == "sync":
        dist.synchronize(model, group)
    opt = sgd(args.lr)
    batch_rng, precise_rng = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
    global_batch = group.size * args.per_worker
    steps_per_epoch = max(1, len(data.x_train) // global_batch)
    if method == "frozen":
        bn.freeze_all(model)
    train_acc = 0.0
    for epoch in range(args.epochs):
        if method == "frozen":  # population statistics of the current weights
            population_statistics(model, data, args, group, precise_rng)
        model.train()
        correct = 0
        steps = correlated_batches(
            data.y_train,
            group.size,
            args.per_worker,
            args.classes_per_worker,
            steps_per_epoch,
            batch_rng,
        )
        for t, step in enumerate(steps):
            idx = step[group.rank]
            _, right = forward_backward(
                model,
                method,
                data.x_train[idx],
                data.y_train[idx],
                len(idx) / global_batch,
                group,
                (seed, epoch, t),
            )
            correct += right
            params, grads = zip(*model.parameters(), strict=True)
            summed = dist.allreduce(list(grads), group)
            opt.step(zip(params, summed, strict=True))
        total = dist.allreduce([np.array([float(correct)])], group)[0]
        train_acc = float(total[0]) / (len(steps) * global_batch)
    cheat = correlated_test_accuracy(model, data, args, group, seed)
    population_statistics(model, data, args, group, precise_rng)
    return train_acc, accuracy(model, data.x_test, data.y_test, group), cheat


def run(args: argparse.Namespace, group: Group) -> dict[str, list[tuple[float, float, float]]]:
    data = load_digits(0)
    say = print if group.rank == 0 else (lambda *a, **k: None)
    say(
        f"digits: {len(data.x_train)} train / {len(data.x_test)} test images; {group.size} "
        f"workers x {args.per_worker} samples, each worker's batch from "
        f"{args.classes_per_worker} class{'es' if args.classes_per_worker > 1 else ''}; "
        f"{args.epochs} epochs, lr {args.lr}, seeds "
        f"{args.seeds}"
    )
    say(
        f"{'method':<11} {'seed':>4} "
        + " ".join(f"{m:>12}" for m in ("train", "test (pop)", "test (corr)"))
    )
    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in args.methods}
    start = time.perf_counter()
    for method in args.methods:
        for seed in args.seeds:
            accs = train(method, data, args, group, seed)
            results[method].append(accs)
            say(f"{method:<11} {seed:>4} " + " ".join(f"{a:>12.4f}" for a in accs))
    say("means over the seeds:")
    for method in args.methods:
        mean = np.mean(results[method], axis=0)
        say(
            f"{method:<11} train {mean[0]:.4f}  test with population statistics {mean[1]:.4f}  "
            f"test on correlated batches {mean[2]:.4f}  gap {mean[0] - mean[1]:+.4f}"
        )
    say(f"total time {time.perf_counter() - start:.1f}s")
    return results


def plot(results: dict[str, list[tuple[float, float, float]]], title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 4.0))
    methods = list(results)
    width = 0.26
    for k, measure in enumerate(MEASURES):
        values = np.array([[r[k] for r in results[m]] for m in methods])
        xs = np.arange(len(methods)) + (k - 1) * width
        ax.bar(xs, values.mean(axis=1), width, label=measure)
        for i, row in enumerate(values):  # every seed as a dot
            ax.plot([xs[i]] * len(row), row, "k.", markersize=3)
    ax.set_xticks(np.arange(len(methods)), methods)
    ax.set_ylabel("accuracy (bars: mean over seeds; dots: seeds)")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def title(args: argparse.Namespace, workers: int) -> str:
    return (
        f"{workers} workers x {args.per_worker} samples, each worker's batch from "
        f"{args.classes_per_worker} of 10 classes; {args.epochs} epochs"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--workers", type=int, default=4, help="thread workers")
    p.add_argument("--mpi", action="store_true", help="the ranks of MPI.COMM_WORLD as workers")
    p.add_argument("--per-worker", type=int, default=16, help="samples per worker")
    p.add_argument(
        "--classes-per-worker", type=int, default=1, help="classes in each worker's batch"
    )
    p.add_argument("--epochs", type=int, default=20, help="training epochs")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    p.add_argument(
        "--momentum", type=float, default=0.9,
        help="BatchNorm momentum, weight of the OLD running value",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random seeds")
    p.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS),
        help="the BatchNorm set-ups to compare",
    )  # fmt: skip
    p.add_argument(
        "--precise-steps", type=int, default=20,
        help="steps of correlated batches for population statistics",
    )  # fmt: skip
    p.add_argument("--test-steps", type=int, default=20, help="steps of correlated test batches")
    p.add_argument(
        "--out", type=Path, default=None,
        help="folder for leakage.png (default: a new temporary folder; --out docs/img replaces "
        "the shipped figure)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="3 epochs, one seed")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.precise_steps, args.test_steps = 3, [0], 5, 5
    if args.per_worker < 2 * args.classes_per_worker:
        p.error("--per-worker must give every class of a worker's batch at least 2 samples")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    folder = figure_dir(args.out, "leakage-", 1)
    if args.mpi:
        group: Group = dist.MPIGroup()
        results = run(args, group)
        if group.rank == 0:
            print(f"figure: {plot(results, title(args, group.size), folder / 'leakage.png')}")
        return
    limit_threads(1)
    groups = dist.thread_groups(args.workers, timeout=600)
    out: dict[int, dict[str, list[tuple[float, float, float]]]] = {}

    def work(g: Group) -> None:
        try:
            out[g.rank] = run(args, g)
        except BaseException:
            g.abort()  # type: ignore[attr-defined]
            raise

    threads = [threading.Thread(target=work, args=(g,)) for g in groups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if 0 not in out:
        raise SystemExit(1)
    print(f"figure: {plot(out[0], title(args, args.workers), folder / 'leakage.png')}")


if __name__ == "__main__":
    main()
