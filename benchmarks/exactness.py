"""Errors of every float64 road against exact arithmetic, beside PyTorch's and a textbook kernel's.

x = offset + N(0, 1) (seeded), dy ~ N(0, 1), gamma ~ U(0.5, 2), beta ~ N(0, 1). The reference
is 60-digit decimal arithmetic (tests/exact.py). Errors in units of 2^-52: y and dx normwise,
dgamma relative to the sum of its terms' magnitudes, PopulationStats' unbiased variance
relative. Prints a Markdown table (docs/math.md, "Exact at any offset").

Usage::

    python benchmarks/exactness.py              # torch columns when torch is installed
"""

from __future__ import annotations

import decimal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import exact  # tests/exact.py: the decimal reference

import batchnorm as bn
from batchnorm import distributed as dist

OFFSETS = (0.0, 1e4, 1e6, 1e8)
EPS = 1e-5


def draw(shape: tuple[int, ...], offset: float) -> tuple[Any, ...]:
    rng = np.random.default_rng(0)
    c = shape[1]
    x = offset + rng.standard_normal(shape)
    return x, rng.standard_normal(shape), rng.uniform(0.5, 2.0, c), rng.standard_normal(c)


def ours(x: Any, dy: Any, g: Any, b: Any) -> tuple[Any, Any, Any]:
    y, cache = bn.forward_train(x, g, b, eps=EPS)
    dx, dgamma, _ = bn.backward(dy, cache)
    return y, dx, dgamma


def textbook(x: Any, dy: Any, g: Any, b: Any) -> tuple[Any, Any, Any]:
    """The two-pass kernel of cs231n / d2l in float64, with the compact backward."""
    axes = tuple(i for i in range(x.ndim) if i != 1)
    shape = [1] * x.ndim
    shape[1] = -1
    m = x.size // x.shape[1]
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(var + EPS)
    xhat = (x - mean) * invstd
    y = g.reshape(shape) * xhat + b.reshape(shape)
    sum_dy = dy.sum(axis=axes, keepdims=True)
    dgamma = (dy * xhat).sum(axis=axes, keepdims=True)
    dx = g.reshape(shape) * invstd / m * (m * dy - sum_dy - xhat * dgamma)
    return y, dx, dgamma.ravel()


def torch_kernel(x: Any, dy: Any, g: Any, b: Any) -> tuple[Any, Any, Any]:
    import torch

    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(g, requires_grad=True)
    y = torch.nn.functional.batch_norm(xt, None, None, gt, torch.tensor(b), training=True, eps=EPS)
    y.backward(torch.tensor(dy))
    assert xt.grad is not None and gt.grad is not None
    return y.detach().numpy(), xt.grad.numpy(), gt.grad.numpy()


def synchronized(x: Any, dy: Any, g: Any, b: Any) -> tuple[Any, Any, Any]:
    """Two thread ranks holding 40 and 24 of the 64 rows."""
    groups, results = dist.thread_groups(2), [None, None]
    parts = (slice(0, 40), slice(40, None))

    def run(rank: int) -> None:
        y, cache = dist.forward_train(x[parts[rank]], g, b, groups[rank], eps=EPS)
        results[rank] = (y, *dist.backward(dy[parts[rank]], cache, groups[rank]))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    y = np.concatenate([r[0] for r in results])  # type: ignore[index]
    dx = np.concatenate([r[1] for r in results])  # type: ignore[index]
    return y, dx, results[0][2] + results[1][2]  # type: ignore[index]


def kernel_errors(kernel: Callable[..., tuple[Any, Any, Any]], shape: tuple[int, ...]) -> list[str]:
    rows = []
    for offset in OFFSETS:
        x, dy, g, b = draw(shape, offset)
        ref = exact.forward_backward(x, dy, g, b, eps=EPS)
        y, dx, dgamma = kernel(x, dy, g, b)
        rows.append(
            (
                exact.units(y, ref["y"]),
                exact.units(dx, ref["dx"]),
                exact.sum_units(dgamma, ref["dgamma"], ref["dgamma_scale"]),
            )
        )
    return [" / ".join(f"{v:.2g}" for v in triple) for triple in rows]


def population_errors() -> list[str]:
    """PopulationStats over 20 batches of 32 (std 0.5): the unbiased variance."""
    cells = []
    for offset in OFFSETS:
        rng = np.random.default_rng(1)
        data = offset + 0.5 * rng.standard_normal((640, 3))
        stats = bn.PopulationStats(3)
        for i in range(20):
            stats.update(data[32 * i : 32 * (i + 1)])
        _, var = exact.statistics(data)
        unbiased = var * decimal.Decimal(640) / decimal.Decimal(639)
        cells.append(f"{exact.relative_units(stats.var(), unbiased):.2g}")
    return cells


def main() -> None:
    header = " | ".join(f"offset {o:g}" for o in OFFSETS)
    print(f"| road (y / dx / dgamma, units of 2^-52) | {header} |")
    print("|---|" + "---|" * len(OFFSETS))
    rows: list[tuple[str, list[str]]] = [
        ("batchnorm, (64, 3)", kernel_errors(ours, (64, 3))),
        ("batchnorm, (4, 3, 8, 8)", kernel_errors(ours, (4, 3, 8, 8))),
        ("batchnorm, (8, 3, 32, 40) (streaming)", kernel_errors(ours, (8, 3, 32, 40))),
        ("batchnorm synchronized, 2 ranks (40 + 24 rows)", kernel_errors(synchronized, (64, 3))),
        ("textbook NumPy, (64, 3)", kernel_errors(textbook, (64, 3))),
        ("textbook NumPy, (4, 3, 8, 8)", kernel_errors(textbook, (4, 3, 8, 8))),
    ]
    try:
        import torch

        torch.set_num_threads(1)
        rows += [
            (f"PyTorch {torch.__version__}, (64, 3)", kernel_errors(torch_kernel, (64, 3))),
            (
                f"PyTorch {torch.__version__}, (4, 3, 8, 8)",
                kernel_errors(torch_kernel, (4, 3, 8, 8)),
            ),
        ]
    except ImportError:
        print("(PyTorch is not installed: its rows are left out)", file=sys.stderr)
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| batchnorm PopulationStats, 20 x 32 rows: unbiased var | "
          + " | ".join(population_errors()) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
