"""``python -m batchnorm``: the version, the conventions on one screen, where to start, the
examples, the variants and the documentation."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import batchnorm
from batchnorm import _guide

CONVENTIONS = """\
Conventions (docs/conventions.md has the details):
  eps              1e-5, added to the variance: invstd = 1 / sqrt(var + eps)
  momentum         weight of the OLD running value, default 0.9:
                     running = momentum * running + (1 - momentum) * batch_statistic
                   PyTorch's momentum weights the new value: its 0.1 is our 0.9.
                   momentum=None keeps the cumulative average of all batches.
  normalize with   the biased batch variance (divide by m)
  running_var      gets the unbiased m / (m - 1) variance; unbiased=False for the biased one
  shapes           x is (N, C, *spatial); statistics per channel over every other axis;
                   axis=1 by default, axis=-1 for channels-last
  dtypes           output dtype = input dtype; float16 is computed in float32;
                   per-channel state and gradients of gamma/beta are float64
"""

START = """\
Start here:
  import batchnorm as bn
  y, cache = bn.forward_train(x, gamma, beta)     dx, dgamma, dbeta = bn.backward(dy, cache)
  layer = bn.BatchNorm(C); y = layer(x); layer.eval()
  bn.precise_bn(model, batches, num_batches_precise=200)
  bn.gradcheck.check_kernels(my_forward, my_backward)   # check your own kernels
  python -m batchnorm audit torch jax onnxruntime      # a report card of other frameworks
"""


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m batchnorm",
        description=(
            f"batchnorm {batchnorm.__version__}: the reference Batch Normalization in NumPy.\n"
            "Without arguments: print the version, the conventions, where to start, the "
            "examples, the variants and the documentation."
        ),
        epilog=CONVENTIONS + "\n" + START + "\n" + _guide.text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Print the version, the conventions and where to start; ``-h``/``--help`` for usage."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["audit"]:  # python -m batchnorm audit ...: the conformance audit
        from batchnorm._audit._cli import main as audit

        raise SystemExit(audit(args[1:]))
    parser = _parser()
    parser.add_argument("--version", action="version", version=f"batchnorm {batchnorm.__version__}")
    parser.parse_args(argv)
    print(f"batchnorm {batchnorm.__version__}: the reference Batch Normalization in NumPy\n")
    print(CONVENTIONS)
    print(START)
    print(_guide.text(), end="")


if __name__ == "__main__":
    main()
