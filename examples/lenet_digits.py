"""A LeNet-style CNN with BatchNorm on (N, C, H, W) conv features and on a dense layer.

Model, for 8x8 images (the layout of d2l's LeNet with BatchNorm, scaled down)::

    Conv2d(1, 16, 3, padding=1) -> BatchNorm(16) -> ReLU -> MaxPool2d(2)     16 x 4 x 4
    Conv2d(16, 32, 3, padding=1) -> BatchNorm(32) -> ReLU -> MaxPool2d(2)    32 x 2 x 2
    Flatten -> Linear(128, 64) -> BatchNorm(64) -> ReLU -> Linear(64, 10)

Conv and linear layers before BatchNorm have no bias (its beta takes that role). The conv
BatchNorm layers take statistics over N, H and W per channel, the dense one over the batch.
After every epoch the same weights are evaluated twice on the test set: with the EMA running
statistics and with PreciseBN statistics (``batchnorm.precise_bn``).

Run::

    python examples/lenet_digits.py                     # 15 epochs, well under a minute
    python examples/lenet_digits.py --quick             # 2 epochs
    python examples/lenet_digits.py --use-precise-stats --num-batches-precise 10

The last lines read ``test accuracy (EMA): ...`` and ``test accuracy (PreciseBN): ...``.
"""

from __future__ import annotations

import numpy as np
from common import Defaults, classifier_parser, run_classifier
from nn import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential

import batchnorm as bn

DEFAULTS = Defaults(epochs=15, batch_size=32, lr=0.05, quick_epochs=2)


def build_lenet(
    rng: np.random.Generator, momentum: float, widths: tuple[int, int, int] = (16, 32, 64)
) -> Sequential:
    """The CNN above; `momentum` is BatchNorm's (weight of the old running value)."""
    c1, c2, hidden = widths
    return Sequential(
        Conv2d(1, c1, 3, padding=1, bias=False, rng=rng),
        bn.BatchNorm(c1, momentum=momentum),
        ReLU(),
        MaxPool2d(2),
        Conv2d(c1, c2, 3, padding=1, bias=False, rng=rng),
        bn.BatchNorm(c2, momentum=momentum),
        ReLU(),
        MaxPool2d(2),
        Flatten(),
        Linear(c2 * 2 * 2, hidden, rng, bias=False),
        bn.BatchNorm(hidden, momentum=momentum),
        ReLU(),
        Linear(hidden, 10, rng),
    )


def main(argv: list[str] | None = None) -> None:
    parser = classifier_parser(__doc__.splitlines()[0], DEFAULTS)
    run_classifier(parser.parse_args(argv), build_lenet, DEFAULTS)


if __name__ == "__main__":
    main()
