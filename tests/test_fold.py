"""fold.fold_batchnorm: an eval-mode BatchNorm folded into the linear or conv layer before it.

The folded layer must reproduce (layer, then BatchNorm in eval mode) to 1e-12 in float64. The
convolution here is a direct one written with einsum, independent of the code under test.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.fold import fold_batchnorm


def eval_layer(c: int, seed: int = 0, **options: Any) -> bn.BatchNorm:
    """An eval-mode layer with non-trivial parameters and running statistics."""
    rng = np.random.default_rng(seed)
    layer = bn.BatchNorm(c, eps=1e-3, **options)
    if layer.affine:
        layer.gamma[:] = rng.uniform(-2.0, 2.0, c)  # negative scales flip the filter's sign
        layer.beta[:] = rng.normal(size=c)
    layer.running_mean[:] = rng.normal(0.0, 3.0, c)
    layer.running_var[:] = rng.uniform(0.01, 5.0, c)
    layer.running_var[0] = 0.0  # a dead channel: eps alone keeps it finite
    return layer.eval()


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    y = x @ w.T
    return y if b is None else y + b


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int = 1) -> np.ndarray:
    """Direct cross-correlation, no padding: (N, C_in, H, W) * (C_out, C_in, kh, kw)."""
    kh, kw = w.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    windows = windows[:, :, ::stride, ::stride]  # (N, C_in, H', W', kh, kw)
    y = np.einsum("nchwij,ocij->nohw", windows, w)
    return y if b is None else y + b[None, :, None, None]


def conv2d_naive(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """The same convolution as four loops, to check conv2d itself."""
    n, _, h, wd = x.shape
    c_out, _, kh, kw = w.shape
    y = np.zeros((n, c_out, h - kh + 1, wd - kw + 1))
    for i in range(y.shape[2]):
        for j in range(y.shape[3]):
            patch = x[:, :, i : i + kh, j : j + kw]
            y[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3]))
    return y if b is None else y + b[None, :, None, None]


def test_reference_conv_agrees_with_loops() -> None:
    rng = np.random.default_rng(1)
    x, w, b = rng.normal(size=(2, 3, 6, 5)), rng.normal(size=(4, 3, 3, 2)), rng.normal(size=4)
    np.testing.assert_allclose(conv2d(x, w, b), conv2d_naive(x, w, b), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_into_linear(with_bias: bool, affine: bool) -> None:
    rng = np.random.default_rng(2)
    layer = eval_layer(5, affine=affine)
    w = rng.normal(size=(5, 7))
    b = rng.normal(size=5) if with_bias else None
    x = rng.normal(size=(20, 7))
    expected = layer(linear(x, w, b))
    w_f, b_f = fold_batchnorm(w, b, layer)
    assert w_f.shape == w.shape and b_f.shape == (5,)
    np.testing.assert_allclose(linear(x, w_f, b_f), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("kernel", "stride"), [((3, 3), 1), ((1, 1), 1), ((3, 2), 2)])
def test_fold_into_conv(
    with_bias: bool, affine: bool, kernel: tuple[int, int], stride: int
) -> None:
    rng = np.random.default_rng(3)
    layer = eval_layer(4, affine=affine)
    w = rng.normal(size=(4, 3, *kernel))
    b = rng.normal(size=4) if with_bias else None
    x = rng.normal(size=(2, 3, 7, 6))
    expected = layer(conv2d(x, w, b, stride))
    w_f, b_f = fold_batchnorm(w, b, layer)
    assert w_f.shape == w.shape and b_f.shape == (4,)
    np.testing.assert_allclose(conv2d(x, w_f, b_f, stride), expected, rtol=1e-12, atol=1e-12)


def test_fold_into_channels_last_conv_output() -> None:
    # The BatchNorm's axis does not matter to folding: axis 0 of the weight is the channel.
    rng = np.random.default_rng(4)
    layer = eval_layer(4, axis=-1)
    w, b = rng.normal(size=(4, 2, 3, 3)), rng.normal(size=4)
    x = rng.normal(size=(2, 2, 5, 5))
    expected = layer(np.moveaxis(conv2d(x, w, b), 1, -1))
    w_f, b_f = fold_batchnorm(w, b, layer)
    np.testing.assert_allclose(
        np.moveaxis(conv2d(x, w_f, b_f), 1, -1), expected, rtol=1e-12, atol=1e-12
    )


def test_fold_into_conv1d_and_conv3d_weights() -> None:
    # Any (C_out, ...) weight is scaled along axis 0.
    rng = np.random.default_rng(5)
    layer = eval_layer(3)
    scale = layer.gamma / np.sqrt(layer.running_var + layer.eps)
    for shape in [(3, 2, 5), (3, 2, 2, 2, 2)]:
        w = rng.normal(size=shape)
        w_f, b_f = fold_batchnorm(w, None, layer)
        expected = w * scale.reshape((3,) + (1,) * (len(shape) - 1))
        np.testing.assert_allclose(w_f, expected, rtol=1e-15)
        np.testing.assert_allclose(
            b_f, layer.beta - layer.running_mean * scale, rtol=1e-14, atol=1e-15
        )


def test_fold_of_a_fresh_layer() -> None:
    # gamma 1, beta 0, mean 0, var 1: a scaling by 1/sqrt(1 + eps) and nothing else.
    layer = bn.BatchNorm(2).eval()
    w = np.array([[1.0, 2.0], [3.0, 4.0]])
    w_f, b_f = fold_batchnorm(w, np.array([1.0, -1.0]), layer)
    np.testing.assert_allclose(w_f, w / np.sqrt(1 + 1e-5), rtol=1e-15)
    np.testing.assert_allclose(b_f, np.array([1.0, -1.0]) / np.sqrt(1 + 1e-5), rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fold_keeps_the_weight_dtype(dtype: type) -> None:
    rng = np.random.default_rng(6)
    layer = eval_layer(3)
    w = rng.normal(size=(3, 4)).astype(dtype)
    w_f, b_f = fold_batchnorm(w, None, layer)
    assert w_f.dtype == dtype and b_f.dtype == dtype
    w64, b64 = fold_batchnorm(w.astype(np.float64), None, layer)
    rtol = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(w_f, w64, rtol=rtol)
    np.testing.assert_allclose(b_f, b64, rtol=rtol)


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_does_not_mutate_or_alias(with_bias: bool) -> None:
    rng = np.random.default_rng(7)
    layer = eval_layer(3)
    state = {k: v.copy() for k, v in layer.state_dict().items()}
    w = rng.normal(size=(3, 2, 3, 3))
    b = rng.normal(size=3) if with_bias else None
    w_copy = w.copy()
    b_copy = None if b is None else b.copy()
    w_f, b_f = fold_batchnorm(w, b, layer)
    assert np.array_equal(w, w_copy)
    if b is not None:
        assert np.array_equal(b, b_copy)
        assert not np.shares_memory(b_f, b)
    assert not np.shares_memory(w_f, w)
    for key, value in layer.state_dict().items():
        assert np.array_equal(value, state[key]), key
    assert layer.training is False
    for array in [layer.gamma, layer.beta, layer.running_mean, layer.running_var]:
        assert not np.shares_memory(w_f, array) and not np.shares_memory(b_f, array)


def test_fold_refuses_training_mode() -> None:
    layer = eval_layer(3).train()
    with pytest.raises(ValueError, match=r"training mode.*layer\.eval\(\)"):
        fold_batchnorm(np.ones((3, 2)), None, layer)


def test_fold_refuses_a_layer_without_running_statistics() -> None:
    layer = bn.BatchNorm(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_batchnorm(np.ones((3, 2)), None, layer)
    # In training mode as well (either reason is a correct refusal).
    with pytest.raises(ValueError, match="cannot fold"):
        fold_batchnorm(np.ones((3, 2)), None, layer.train())


@pytest.mark.parametrize(
    ("weight", "bias", "error", "match"),
    [
        (np.ones((4, 2)), None, ValueError, r"3 outputs.*\(4, 2\)"),
        (np.ones((2, 3)), None, ValueError, r"3 outputs.*\(2, 3\)"),
        (np.ones(3), None, ValueError, r"got shape \(3,\)"),
        (np.float64(1.0), None, ValueError, "got shape"),
        (np.ones((3, 2)), np.ones(4), ValueError, r"bias must have shape \(3,\)"),
        (np.ones((3, 2)), np.ones((3, 1)), ValueError, r"bias must have shape \(3,\)"),
        (np.ones((3, 2)), np.array([1.0, np.nan, 0.0]), ValueError, "finite"),
        (np.ones((3, 2), dtype=np.int64), None, TypeError, "weight must have dtype"),
        (np.ones((3, 2)), np.array(["a", "b", "c"]), TypeError, "bias"),
        (None, None, TypeError, "weight"),
    ],
)
def test_fold_rejects_bad_weight_or_bias(weight: Any, bias: Any, error: type, match: str) -> None:
    layer = eval_layer(3)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=match):
        fold_batchnorm(weight, bias, layer)
    for key, value in layer.state_dict().items():
        assert np.array_equal(value, before[key])


def test_folded_network_matches_layer_by_layer() -> None:
    # conv -> BN -> relu -> flatten -> linear -> BN, folded twice.
    rng = np.random.default_rng(8)
    bn1, bn2 = eval_layer(4, seed=1), eval_layer(3, seed=2)
    w1, b1 = rng.normal(size=(4, 2, 3, 3)), rng.normal(size=4)
    w2, b2 = rng.normal(size=(3, 4 * 3 * 3)), None
    x = rng.normal(size=(5, 2, 5, 5))

    def net(w1: Any, b1: Any, w2: Any, b2: Any, norm1: Any, norm2: Any) -> np.ndarray:
        h = norm1(conv2d(x, w1, b1))
        h = np.maximum(h, 0.0).reshape(5, -1)
        return norm2(linear(h, w2, b2))

    expected = net(w1, b1, w2, b2, bn1, bn2)
    w1_f, b1_f = fold_batchnorm(w1, b1, bn1)
    w2_f, b2_f = fold_batchnorm(w2, b2, bn2)
    folded = net(w1_f, b1_f, w2_f, b2_f, lambda h: h, lambda h: h)
    np.testing.assert_allclose(folded, expected, rtol=1e-12, atol=1e-12)
