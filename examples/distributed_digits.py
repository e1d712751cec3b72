"""Data-parallel training of the digits MLP with synchronized BatchNorm, on MPI or threads.

Every rank holds the same model (the MLP of ``mlp_digits.py``, built from the same seed) and a
part of each global batch: the global batch of ``--batch-size`` samples is split into
``size`` consecutive parts, one per rank. Each step, every rank runs forward and backward on
its part, the weight gradients are summed over the ranks (``batchnorm.distributed.allreduce``:
one allgather, added in rank order), and every rank takes the same SGD step. The loss of each
part is its share of the mean over the GLOBAL batch (dy scaled by the global batch size), so
the summed gradients are those of single-process training on the global batch.

- With SyncBN (the default), every BatchNorm normalizes with the statistics of the whole
  global batch (``batchnorm.distributed.synchronize``), so training reproduces single-process
  training on the global batch: ``--check`` runs that reference on rank 0 and compares the
  losses step by step (equal within 1e-9).
- With ``--no-sync``, each rank's BatchNorm normalizes over its own part only: the
  normalization batch shrinks to batch_size / size, and training differs (``--check`` shows
  by how much). Running statistics then differ between ranks; rank 0's are evaluated.

After training, ``precise_bn(..., group=...)`` recomputes the population statistics over every
rank's batches, the same on every rank.

Run::

    mpiexec -n 4 python examples/distributed_digits.py               # 4 MPI ranks, SyncBN
    mpiexec -n 4 python examples/distributed_digits.py --no-sync     # per-rank BatchNorm
    mpiexec -n 2 python examples/distributed_digits.py --quick --check
    python examples/distributed_digits.py --thread-ranks 4 --check   # 4 threads, no MPI

Without mpiexec (and without ``--thread-ranks``) the script is a group of one.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable

import numpy as np
from common import (
    Digits,
    HelpFormatter,
    accuracy,
    batch_indices,
    limit_threads,
    load_digits,
    sgd,
)
from mlp_digits import build_mlp
from nn import Sequential, softmax_cross_entropy

import batchnorm as bn
from batchnorm import distributed as dist

Group = dist.Group


def global_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's global batches (the same on every rank: same seed); partial ones dropped, so
    that every rank's part has at least two samples for per-rank BatchNorm (--no-sync)."""
    return [idx for idx in batch_indices(n, batch_size, rng) if len(idx) >= batch_size]


def my_part(idx: np.ndarray, group: Group) -> np.ndarray:
    """This rank's consecutive part of a global batch."""
    part: np.ndarray = np.array_split(idx, group.size)[group.rank]
    return part


def train(
    args: argparse.Namespace, data: Digits, group: Group, report: Callable[[str], None]
) -> tuple[Sequential, list[float]]:
    """Data-parallel SGD; returns the model and the global loss of every step."""
    model = build_mlp(np.random.default_rng([args.seed, 0]), args.momentum)
    if not args.no_sync:
        dist.synchronize(model, group)
    opt = sgd(args.lr)
    shuffle = np.random.default_rng([args.seed, 1])
    losses: list[float] = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        steps = global_batches(len(data.x_train), args.batch_size, shuffle)
        for idx in steps:
            part = my_part(idx, group)
            loss, dlogits = softmax_cross_entropy(model(data.x_train[part]), data.y_train[part])
            # The loss is the mean over the global batch: weight this part by its share.
            share = np.array([len(part) / len(idx)])
            model.backward(dlogits * share)
            params, grads = zip(*model.parameters(), strict=True)
            # One allgather for every gradient and the loss, added in rank order on every rank.
            *summed, global_loss = dist.allreduce([*grads, loss * share], group)
            losses.append(float(global_loss[0]))
            opt.step(zip(params, summed, strict=True))
        epoch_loss = np.mean(losses[-len(steps) :])
        report(f"{epoch:>5} {epoch_loss:>8.4f} {accuracy(model, data.x_test, data.y_test):>8.4f}")
    return model, losses


def reference(args: argparse.Namespace, data: Digits) -> list[float]:
    """Single-process training on the global batches: the losses SyncBN must reproduce."""
    solo = dist.thread_groups(1)[0]
    local = argparse.Namespace(**{**vars(args), "no_sync": True})
    return train(local, data, solo, lambda line: None)[1]


def run(args: argparse.Namespace, group: Group) -> None:
    data = load_digits(args.seed)
    say = print if group.rank == 0 else (lambda line: None)
    per_rank = args.batch_size // group.size
    norm = args.batch_size if not args.no_sync else per_rank
    say(
        f"digits: {len(data.x_train)} train / {len(data.x_test)} test images; global batch "
        f"{args.batch_size} over {group.size} ranks (~{per_rank} each); "
        f"{'SyncBN' if not args.no_sync else 'per-rank BatchNorm'}: each BatchNorm normalizes "
        f"over ~{norm} samples"
    )
    say(f"{'epoch':>5} {'loss':>8} {'test acc':>8}")
    model, losses = train(args, data, group, say)
    layers = [layer for layer in model.layers if isinstance(layer, bn.BatchNorm)]
    mine = np.concatenate([np.r_[la.running_mean, la.running_var] for la in layers])
    same = all(np.array_equal(p, mine) for p in group.allgather(mine))
    say(f"running statistics bitwise identical on every rank: {same}")  # False for --no-sync
    shuffle = np.random.default_rng([args.seed, 2])
    batches = [
        data.x_train[my_part(idx, group)]
        for idx in global_batches(len(data.x_train), args.batch_size, shuffle)
    ]
    say(f"test accuracy (EMA): {accuracy(model, data.x_test, data.y_test):.4f}")
    bn.precise_bn(model, batches, len(batches), group=group)
    precise = accuracy(model, data.x_test, data.y_test)
    say(f"test accuracy (PreciseBN over every rank): {precise:.4f}")
    if args.check and group.rank == 0:
        ref = reference(args, data)
        gap = max(abs(a - b) for a, b in zip(losses, ref, strict=True))
        print(f"largest |loss - single-process loss| over {len(ref)} steps: {gap:.3g}")
        if not args.no_sync:
            print(f"SyncBN reproduces single-process training within 1e-9: {gap <= 1e-9}")
            if gap > 1e-9:
                raise SystemExit(1)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over the ranks")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    p.add_argument(
        "--momentum",
        type=float,
        default=0.9,
        help="BatchNorm momentum, the weight of the OLD running value",
    )
    p.add_argument("--no-sync", action="store_true", help="per-rank BatchNorm instead of SyncBN")
    p.add_argument(
        "--check",
        action="store_true",
        help="rank 0 also trains single-process on the global batch and compares",
    )
    p.add_argument(
        "--thread-ranks",
        type=int,
        default=0,
        help="run this many ranks as threads of one process (0: the MPI ranks)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split, weights and shuffles")
    p.add_argument("--quick", action="store_true", help="2 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = 2
    if args.batch_size < 2 * max(args.thread_ranks, 1):
        p.error("--batch-size must give every rank at least 2 samples")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    limit_threads(1)
    if args.thread_ranks:
        groups = dist.thread_groups(args.thread_ranks)
        threads = [threading.Thread(target=run, args=(args, g)) for g in groups]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return
    try:
        group: Group = dist.MPIGroup()
    except ImportError:
        group = dist.thread_groups(1)[0]
    run(args, group)


if __name__ == "__main__":
    main()
