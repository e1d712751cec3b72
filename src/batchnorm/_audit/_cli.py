"""``python -m batchnorm audit``: run outside BatchNorm implementations on the conformance cases."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from batchnorm import _validate
from batchnorm._audit import _card, audit, implementations
from batchnorm.conformance import cases

DESCRIPTION = """\
Run BatchNorm implementations on the conformance cases of batchnorm.conformance and print a
report card: for each case the worst output's normwise error against this library's float64
kernels, its tolerance (unit roundoff x growth factor x the case's conditioning), pass or fail,
and the decimal digits lost beyond the dtype's rounding. Implementations: torch (CPU, and
CUDA when present), jax (flax.linen.BatchNorm with its defaults, and with
use_fast_variance=False), onnxruntime (a one-node BatchNormalization model), batchnorm (this
library's float32/float16 roads). The double_backward_* cases measure second derivatives (gx,
ggamma, gdy): torch's autograd double backward and functional.double_backward; n/a for jax
and onnxruntime. Each needs its package; conventions (momentum side, running variance, eps,
layout) are mapped to this library's. docs/conformance.md explains the model and the results.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m batchnorm audit",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "implementations",
        nargs="*",
        default=["torch", "jax", "onnxruntime"],
        help="torch, jax, onnxruntime and/or batchnorm (default: torch jax onnxruntime)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--plot", metavar="FILE", help="save error against offset (needs matplotlib)")
    p.add_argument(
        "--dtype", action="append", help="only this dtype (repeatable; default: all cases)"
    )
    p.add_argument("--case", action="append", help="only this case name (repeatable)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the default cases only (no offset sweep, 880,801-row batch or overflow cases)",
    )
    p.add_argument(
        "--second-order",
        action="store_true",
        help="only the second-derivative cases (double_backward_*: gx, ggamma, gdy)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the audit; print the card (or JSON); 0 on success, 2 on a usage error."""
    args = parser().parse_args(argv)
    pyplot = None
    try:
        if args.plot:
            pyplot = _pyplot()
        impls = implementations(args.implementations)
        orders = [True] if args.second_order else [False, True]
        chosen = (
            cases(names=args.case)
            if args.case
            else [
                case
                for order in orders
                for case in cases(dtypes=args.dtype, extended=not args.quick, second_order=order)
            ]
        )
    except (ImportError, ValueError) as exc:
        print(f"python -m batchnorm audit: {exc}", file=sys.stderr)
        return 2
    names = [i.name for i in impls]
    ours = [] if "batchnorm" in names or not args.plot else implementations(["batchnorm"])
    rows = audit(impls, chosen)
    baseline = audit(ours, chosen) if ours else []
    print(_card.as_json(impls, rows) if args.json else _card.text(impls, rows))
    if pyplot is not None:
        _card.plot([*rows, *baseline], args.plot, pyplot)
        print(f"plot saved to {args.plot}", file=sys.stderr)
    return 0


def _pyplot() -> object:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise _validate.no_matplotlib() from None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
