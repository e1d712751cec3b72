"""Shared against per-domain BatchNorm statistics, in training and at test (Wu and Johnson 2021,
section 5), on the digits and a shifted copy of them.

Two domains: the digits (``source``) and the same images shifted (``--shift``, applied to pixels
in [0, 1]: ``contrast`` 0.5 * x + 0.3, ``gamma`` x ** 0.4, ``inverted`` 1 - x). One MLP (that
of ``mlp_digits.py``, with ``bn.DomainBatchNorm(128, 2)`` layers, gamma and beta shared) is
trained on both domains in three ways:

- ``mixed batches, shared``: every batch holds both domains (half each), one set of statistics;
- ``domain batches, shared``: every batch holds one domain (alternating), one set of running
  statistics, but each batch normalized with its own, single-domain, batch statistics;
- ``domain batches, per-domain``: every batch holds one domain and is normalized and recorded
  as that domain (``layer(x, domain=d)``), as DSBN does.

Each trained network is tested with the running statistics recorded in training (``EMA``: one
set, or each domain's own for the per-domain network), and with two kinds of population
statistics (``bn.precise_bn``): ``shared``, those of both domains' training images together,
and ``per-domain``, those of each domain's own training images, used for that domain's test
images. Test accuracy is the mean
over both domains' 360 test images.

Run::

    python examples/domain_stats.py                    # contrast shift, 3 seeds
    python examples/domain_stats.py --shift inverted
    python examples/domain_stats.py --quick            # 1 seed, 3 epochs
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from common import (
    THREADS_HELP,
    HelpFormatter,
    batch_indices,
    limit_threads,
    load_digits,
    positive_int,
    sgd,
)
from nn import Flatten, Linear, ReLU, Sequential, softmax_cross_entropy

import batchnorm as bn

Array = np.ndarray[Any, Any]
SHIFTS: dict[str, Callable[[Array], Array]] = {
    "contrast": lambda x: 0.5 * x + 0.3,
    "gamma": lambda x: x**0.4,
    "inverted": lambda x: 1.0 - x,
}
REGIMES = ("mixed batches, shared", "domain batches, shared", "domain batches, per-domain")
TESTS = ("EMA", "shared", "per-domain")


class Routed:
    """A DomainBatchNorm as a layer of nn.Sequential: calls it with the model's current domain."""

    def __init__(self, layer: bn.DomainBatchNorm) -> None:
        self.layer, self.domain = layer, 0

    def forward(self, x: Array) -> Array:
        return self.layer(x, domain=self.domain)

    def backward(self, dy: Array) -> Array:
        return self.layer.backward(dy)

    def params(self) -> list[tuple[Array, Array]]:
        pairs = [(self.layer.gamma, self.layer.dgamma), (self.layer.beta, self.layer.dbeta)]
        return [(p, g) for p, g in pairs if p is not None and g is not None]

    def train(self) -> Routed:
        self.layer.train()
        return self

    def eval(self) -> Routed:
        self.layer.eval()
        return self


def build(rng: np.random.Generator, hidden: int = 128) -> Sequential:
    return Sequential(
        Flatten(),
        Linear(64, hidden, rng, bias=False),
        Routed(bn.DomainBatchNorm(hidden, 2)),
        ReLU(),
        Linear(hidden, hidden, rng, bias=False),
        Routed(bn.DomainBatchNorm(hidden, 2)),
        ReLU(),
        Linear(hidden, 10, rng),
    )


def routed(model: Sequential) -> list[Routed]:
    return [layer for layer in model.layers if isinstance(layer, Routed)]


def set_domain(model: Sequential, domain: int) -> None:
    for layer in routed(model):
        layer.domain = domain


def train(
    regime: str, xs: list[Array], y: Array, args: argparse.Namespace, seed: int
) -> Sequential:
    model = build(np.random.default_rng([seed, 0]))
    opt = sgd(args.lr)
    rng = np.random.default_rng([seed, 1])
    half = args.batch_size // 2
    for _ in range(args.epochs):
        model.train()
        if regime.startswith("mixed"):
            steps = [
                (np.concatenate([xs[0][a], xs[1][b]]), np.concatenate([y[a], y[b]]), 0)
                for a, b in zip(batch_indices(len(y), half, rng), batch_indices(len(y), half, rng),
                                strict=False)
            ]  # fmt: skip
        else:
            per = [batch_indices(len(y), args.batch_size, rng) for _ in xs]
            steps = [(xs[d][i], y[i], d) for pair in zip(*per, strict=False)
                     for d, i in enumerate(pair)]  # fmt: skip
        for x, labels, d in steps:
            set_domain(model, d if regime.endswith("per-domain") else 0)
            _, dlogits = softmax_cross_entropy(model(x), labels)
            model.backward(dlogits)
            opt.step(model.parameters())
    return model


def test(
    model: Sequential, kind: str, xs: list[Array], tests: list[Array], y_test: Array, regime: str
) -> float:
    """Eval-mode accuracy over both test sets with the running statistics of training (EMA,
    the slots as trained) or population statistics (shared: both domains' training images in
    slot 0; per-domain: each domain's own in its slot)."""
    layers = [r.layer for r in routed(model)]
    rng = np.random.default_rng(7)
    if kind == "EMA":
        pass
    elif kind == "shared":
        mixed = np.concatenate(xs)[rng.permutation(2 * len(xs[0]))]
        batches = [mixed[i : i + 64] for i in range(0, len(mixed), 64)]
        set_domain(model, 0)
        bn.precise_bn(model, batches, len(batches), layers=[la.domains[0] for la in layers])
    else:
        for d, x in enumerate(xs):
            batches = [x[i : i + 64] for i in range(0, len(x), 64)]
            set_domain(model, d)
            bn.precise_bn(model, batches, len(batches), layers=[la.domains[d] for la in layers])
    model.eval()
    correct = 0
    per_domain = kind == "per-domain" or (kind == "EMA" and regime.endswith("per-domain"))
    for d, x in enumerate(tests):
        set_domain(model, d if per_domain else 0)
        correct += int((model(x).argmax(axis=1) == y_test).sum())
    model.train()
    return correct / (len(y_test) * len(tests))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument(
        "--shift", choices=sorted(SHIFTS), default="contrast",
        help="how the second domain's images differ from the digits",
    )  # fmt: skip
    p.add_argument("--epochs", type=positive_int, default=20, help="training epochs")
    p.add_argument("--batch-size", type=positive_int, default=32, help="SGD batch size")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random seeds")
    p.add_argument("--quick", action="store_true", help="3 epochs, one seed")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 3, [0]
    limit_threads(args.threads)
    data = load_digits(0)
    shift = SHIFTS[args.shift]
    xs, tests = [data.x_train, shift(data.x_train)], [data.x_test, shift(data.x_test)]
    print(
        f"digits and their '{args.shift}' shift: 2 x {len(data.x_train)} train / 2 x "
        f"{len(data.x_test)} test images; {args.epochs} epochs, batch {args.batch_size}, lr "
        f"{args.lr}, seeds {args.seeds}"
    )
    print(
        "| training | test: EMA, as trained | test: shared population | test: per-domain "
        "population |"
    )
    print("|---|---|---|---|")
    start = time.perf_counter()
    for regime in REGIMES:
        accs = np.array(
            [[test(model, kind, xs, tests, data.y_test, regime) for kind in TESTS]
             for model in (train(regime, xs, data.y_train, args, s) for s in args.seeds)]
        )  # fmt: skip
        cells = [f"{accs[:, k].mean():.3f} ({accs[:, k].min():.3f}-{accs[:, k].max():.3f})"
                 for k in range(len(TESTS))]  # fmt: skip
        print(f"| {regime} | " + " | ".join(cells) + " |")
    print(f"total time {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
