"""An MLP with BatchNorm on (B, L) features, trained with SGD on scikit-learn's digits.

Model: flatten 8x8 -> Linear(64, 128) -> BatchNorm(128) -> ReLU -> Linear(128, 128) ->
BatchNorm(128) -> ReLU -> Linear(128, 10). The linear layers before BatchNorm have no bias (its
beta takes that role). After every epoch the same weights are evaluated twice on the test set:
with the EMA running statistics and with PreciseBN statistics (``batchnorm.precise_bn``).

Run::

    python examples/mlp_digits.py                       # 30 epochs, a few seconds
    python examples/mlp_digits.py --quick               # 3 epochs
    python examples/mlp_digits.py --momentum 0.99 --batch-size 256
    python examples/mlp_digits.py --use-precise-stats   # keep PreciseBN statistics each epoch

The last lines read ``test accuracy (EMA): ...`` and ``test accuracy (PreciseBN): ...``.
"""

from __future__ import annotations

import numpy as np
from common import Defaults, classifier_parser, run_classifier
from nn import Flatten, Linear, ReLU, Sequential

import batchnorm as bn

DEFAULTS = Defaults(epochs=30, batch_size=32, lr=0.05, quick_epochs=3)


def build_mlp(rng: np.random.Generator, momentum: float, hidden: int = 128) -> Sequential:
    """The MLP above; `momentum` is BatchNorm's (weight of the old running value)."""
    return Sequential(
        Flatten(),
        Linear(64, hidden, rng, bias=False),
        bn.BatchNorm(hidden, momentum=momentum),
        ReLU(),
        Linear(hidden, hidden, rng, bias=False),
        bn.BatchNorm(hidden, momentum=momentum),
        ReLU(),
        Linear(hidden, 10, rng),
    )


def main(argv: list[str] | None = None) -> None:
    parser = classifier_parser(__doc__.splitlines()[0], DEFAULTS)
    run_classifier(parser.parse_args(argv), build_mlp, DEFAULTS)


if __name__ == "__main__":
    main()
