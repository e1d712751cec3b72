"""Quickstart: the functional Batch Normalization kernels in a few seconds.

Shows ``forward_train``, ``forward_eval`` and ``backward`` on a fully connected (B, L) input and
on a convolutional (N, C, H, W) input, the statistics the training cache exposes, a finite-
difference gradient check, and a channels-last (N, H, W, C) call with ``axis=-1``.

Run::

    python examples/quickstart.py            # the whole tour, a few seconds
    python examples/quickstart.py --seed 3   # other random data

``--quick`` is accepted for symmetry with the other examples; this script is always quick.
"""

from __future__ import annotations

import argparse

import numpy as np

import batchnorm as bn

np.set_printoptions(precision=4, suppress=True)


def show_channels(label: str, values: np.ndarray, limit: int = 4) -> None:
    """Print the first `limit` per-channel values under a label."""
    more = f" ... ({values.size} channels)" if values.size > limit else ""
    shown = np.round(values[:limit], 4) + 0.0  # + 0.0 turns -0.0 into 0.0
    print(f"  {label:<28} {shown}{more}")


def per_channel_stats(y: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (biased) variance of y over every axis but `axis`, in float64."""
    others = tuple(i for i in range(y.ndim) if i != axis % y.ndim)
    y64 = y.astype(np.float64)
    return y64.mean(axis=others), y64.var(axis=others)


def print_gradcheck(title: str, errors: dict[str, float]) -> None:
    """Print one gradient check; tests parse the 'relative error of NAME: VALUE' lines."""
    print(f"  gradient check, {title}")
    for name, err in errors.items():
        print(f"    relative error of {name + ':':<8} {err:.2e}")


def fully_connected(rng: np.random.Generator) -> None:
    print("1. Fully connected input, x of shape (B, L): one channel per feature")
    x = rng.normal(loc=3.0, scale=2.0, size=(64, 10))
    gamma, beta = np.ones(10), np.zeros(10)  # a fresh layer's parameters

    y, cache = bn.forward_train(x, gamma, beta)  # batch statistics
    print(f"  x {x.shape} {x.dtype} -> y {y.shape} {y.dtype}")
    y_mean, y_var = per_channel_stats(y, axis=1)
    show_channels("per-channel mean of y:", y_mean)
    show_channels("per-channel var of y:", y_var)
    show_channels("cache.mean:", cache.mean)
    show_channels("cache.var (biased):", cache.var)
    print(f"  {'cache.count (m):':<28} {cache.count}")

    dy = rng.standard_normal(y.shape)
    dx, dgamma, dbeta = bn.backward(dy, cache)
    assert dgamma is not None and dbeta is not None  # None only when gamma / beta were None
    print(f"  dx {dx.shape}, dgamma {dgamma.shape}, dbeta {dbeta.shape}")
    # The gradient through the batch mean makes dx sum to zero in each channel.
    print(f"  {'max |sum(dx)| per channel:':<28} {np.abs(dx.sum(axis=0)).max():.1e}")

    # Evaluation with the batch's own statistics reproduces the training output.
    y_eval, _ = bn.forward_eval(x, gamma, beta, cache.mean, cache.var)
    print(f"  {'forward_eval, same stats:':<28} max |y_eval - y| = {np.abs(y_eval - y).max():.1e}")

    # What a layer keeps for eval mode: momentum weights the OLD value, and running_var
    # receives the unbiased variance m / (m - 1) * var.
    momentum, m = 0.9, cache.count
    running_mean = momentum * np.zeros(10) + (1 - momentum) * cache.mean
    running_var = momentum * np.ones(10) + (1 - momentum) * cache.var * m / (m - 1)
    show_channels("running_mean after 1 step:", running_mean)
    show_channels("running_var after 1 step:", running_var)

    small = rng.normal(1.0, 2.0, size=(16, 4))
    g, b = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    print_gradcheck("train, (16, 4)", bn.gradcheck.check_gradients(small, g, b, seed=1))
    print_gradcheck(
        "eval, (16, 4)",
        bn.gradcheck.check_gradients(
            small, g, b, training=False, mean=rng.standard_normal(4), var=rng.uniform(0.5, 2, 4)
        ),
    )


def convolutional(rng: np.random.Generator) -> np.ndarray:
    print("\n2. Convolutional input, x of shape (N, C, H, W): statistics over N, H and W")
    x = rng.normal(loc=-1.0, scale=0.5, size=(8, 3, 16, 16)).astype(np.float32)
    gamma = np.array([1.0, 2.0, 0.5])
    beta = np.array([0.0, 1.0, -1.0])

    y, cache = bn.forward_train(x, gamma, beta)
    print(f"  x {x.shape} {x.dtype} -> y {y.shape} {y.dtype} (output dtype = input dtype)")
    y_mean, y_var = per_channel_stats(y, axis=1)
    show_channels("per-channel mean of y:", y_mean)  # = beta
    show_channels("per-channel var of y:", y_var)  # = gamma**2 * var / (var + eps)
    show_channels("cache.mean:", cache.mean)
    show_channels("cache.var (biased):", cache.var)
    print(f"  {'cache.count (m = N*H*W):':<28} {cache.count}")

    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dgamma, dbeta = bn.backward(dy, cache)
    print(f"  dx {dx.shape} {dx.dtype}, dgamma {dgamma}, dbeta {dbeta}")

    small = rng.normal(0.5, 1.5, size=(2, 3, 4, 4))
    print_gradcheck("train, (2, 3, 4, 4)", bn.gradcheck.check_gradients(small, gamma, beta))
    return x


def channels_last(x_nchw: np.ndarray) -> None:
    print("\n3. Channels-last input, x of shape (N, H, W, C), axis=-1")
    x_nhwc = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
    y_nhwc, cache = bn.forward_train(x_nhwc, axis=-1)
    y_nchw, _ = bn.forward_train(x_nchw, axis=1)
    diff = np.abs(y_nhwc - y_nchw.transpose(0, 2, 3, 1)).max()
    print(f"  x {x_nhwc.shape} -> y {y_nhwc.shape}, cache.count {cache.count}")
    print(f"  {'max |y(NHWC) - y(NCHW)|:':<28} {diff:.1e} (float32 rounding)")
    small = np.random.default_rng(7).normal(size=(2, 3, 3, 4))
    print_gradcheck(
        "train, (2, 3, 3, 4), axis=-1", bn.gradcheck.check_gradients(small, axis=-1, seed=2)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="accepted for the test suite; the run is already fast"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data (default: 0)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    fully_connected(rng)
    x_nchw = convolutional(rng)
    channels_last(x_nchw)


if __name__ == "__main__":
    main()
