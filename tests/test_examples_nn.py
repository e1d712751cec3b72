"""Tests of examples/nn.py, the NumPy layers the example scripts train with.

Every gradient is checked against central differences in float64; Conv2d's forward against a
direct convolution (and PyTorch when installed); SGD against a hand computation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from helpers import examples_nn

import batchnorm
from batchnorm.gradcheck import numerical_gradient, relative_error

nn = examples_nn()

TOL = 1e-7


def param_gradient(forward: Callable[[], Any], param: np.ndarray, dy: Any) -> np.ndarray:
    """Numerical gradient of sum(forward() * dy) with respect to param, which is set in place."""
    saved = param.copy()

    def f(value: np.ndarray) -> Any:
        param[...] = value
        return forward()

    try:
        return numerical_gradient(f, saved, dy)
    finally:
        param[...] = saved


def check_layer(layer: Any, x: np.ndarray, rng: np.random.Generator) -> None:
    """dx and every (param, grad) of layer against finite differences."""
    y = layer(x)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    grads = [g.copy() for _, g in layer.params()]
    assert relative_error(dx, numerical_gradient(layer.forward, x, dy)) < TOL
    for (param, _), grad in zip(layer.params(), grads, strict=True):
        num = param_gradient(lambda: layer.forward(x), param, dy)
        assert relative_error(grad, num) < TOL


def naive_conv2d(x, w, b, stride, padding):  # type: ignore[no-untyped-def]
    sh, sw = stride
    ph, pw = padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, _, h, wd = xp.shape
    o, _, kh, kw = w.shape
    ho, wo = (h - kh) // sh + 1, (wd - kw) // sw + 1
    y = np.zeros((n, o, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
            y[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
    return y if b is None else y + b[:, None, None]


# --- single layers -------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients(bias: bool) -> None:
    rng = np.random.default_rng(0)
    layer = nn.Linear(4, 3, rng, bias=bias)
    if layer.bias is not None:
        layer.bias[...] = rng.standard_normal(3)  # a zero bias would hide a wrong broadcast
    assert len(layer.params()) == (2 if bias else 1)
    check_layer(layer, rng.standard_normal((5, 4)), rng)


CONV_CASES = [
    # (C, O, kernel, stride, padding, H, W)
    (2, 3, 3, 1, 0, 5, 5),
    (2, 3, 3, 2, 1, 5, 6),
    (1, 2, (2, 3), (2, 1), (1, 2), 4, 5),
    (3, 2, 2, 2, 0, 4, 4),
]


@pytest.mark.parametrize(("c", "o", "k", "s", "p", "h", "w"), CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_gradients(
    c: int, o: int, k: Any, s: Any, p: Any, h: int, w: int, bias: bool
) -> None:
    rng = np.random.default_rng(1)
    layer = nn.Conv2d(c, o, k, stride=s, padding=p, bias=bias, rng=rng)
    if layer.bias is not None:
        layer.bias[...] = rng.standard_normal(o)
    check_layer(layer, rng.standard_normal((2, c, h, w)), rng)


@pytest.mark.parametrize(("c", "o", "k", "s", "p", "h", "w"), CONV_CASES)
def test_conv2d_forward_matches_direct_convolution(
    c: int, o: int, k: Any, s: Any, p: Any, h: int, w: int
) -> None:
    rng = np.random.default_rng(2)
    layer = nn.Conv2d(c, o, k, stride=s, padding=p, rng=rng)
    layer.bias[...] = rng.standard_normal(o)
    x = rng.standard_normal((3, c, h, w))
    expected = naive_conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_conv2d_and_pools_match_torch() -> None:
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    layer = nn.Conv2d(3, 4, 3, stride=2, padding=1, rng=rng)
    layer.bias[...] = rng.standard_normal(4)
    x = rng.standard_normal((2, 3, 7, 8))
    xt = torch.from_numpy(x)
    want = F.conv2d(xt, torch.from_numpy(layer.weight), torch.from_numpy(layer.bias), 2, 1)
    np.testing.assert_allclose(layer(x), want.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(nn.MaxPool2d(2)(x), F.max_pool2d(xt, 2).numpy())
    np.testing.assert_allclose(nn.AvgPool2d(3, 2)(x), F.avg_pool2d(xt, 3, 2).numpy(), rtol=1e-14)


def distinct_input(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Values at least 0.1 apart: no ties and no kinks within a finite-difference step."""
    return rng.permutation(np.arange(int(np.prod(shape)))).reshape(shape) * 0.1 - 1.0


@pytest.mark.parametrize(("kernel", "stride"), [(2, None), (3, 2), ((2, 3), (1, 2)), (2, 1)])
def test_maxpool_gradients(kernel: Any, stride: Any) -> None:
    rng = np.random.default_rng(4)
    check_layer(nn.MaxPool2d(kernel, stride), distinct_input(rng, (2, 2, 5, 6)), rng)


def test_maxpool_routes_a_tie_to_one_position() -> None:
    pool = nn.MaxPool2d(2)
    y = pool(np.ones((1, 1, 2, 2)))
    dx = pool.backward(np.full_like(y, 3.0))
    np.testing.assert_array_equal(dx, [[[[3.0, 0.0], [0.0, 0.0]]]])


@pytest.mark.parametrize(("kernel", "stride"), [(2, None), (3, 2), ((2, 3), (1, 2))])
def test_avgpool_gradients(kernel: Any, stride: Any) -> None:
    rng = np.random.default_rng(5)
    check_layer(nn.AvgPool2d(kernel, stride), rng.standard_normal((2, 2, 5, 6)), rng)


def test_flatten_gradients() -> None:
    rng = np.random.default_rng(6)
    layer = nn.Flatten()
    x = rng.standard_normal((2, 3, 2, 2))
    assert layer(x).shape == (2, 12)
    check_layer(layer, x, rng)


def test_relu_gradients() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 5))
    x += np.sign(x) * 0.1  # away from the kink at 0
    check_layer(nn.ReLU(), x, rng)


def test_softmax_cross_entropy() -> None:
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((6, 4)) * 3.0
    labels = rng.integers(0, 4, 6)
    loss, dlogits = nn.softmax_cross_entropy(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(6), labels]).mean(), rel=1e-12)
    num = numerical_gradient(lambda z: nn.softmax_cross_entropy(z, labels)[0], logits, 1.0)
    assert relative_error(dlogits, num) < TOL


def test_softmax_cross_entropy_is_stable_for_huge_logits() -> None:
    loss, dlogits = nn.softmax_cross_entropy(np.array([[1000.0, 0.0], [0.0, -1000.0]]), [1, 0])
    assert loss == pytest.approx(500.0)
    assert np.all(np.isfinite(dlogits))


# --- Sequential, SGD, training ----------------------------------------------------------


def mlp(rng: np.random.Generator, *middle: Any) -> Any:
    # A bias before BatchNorm is cancelled by its mean (zero gradient), so it is left out there.
    first = nn.Linear(3, 6, rng, bias=not middle)
    return nn.Sequential(first, *middle, nn.ReLU(), nn.Linear(6, 4, rng))


def check_model(model: Any, x: np.ndarray, labels: np.ndarray) -> None:
    """End-to-end gradients of the mean cross-entropy, for x and every parameter."""

    def loss() -> float:
        return nn.softmax_cross_entropy(model(x), labels)[0]

    _, dlogits = nn.softmax_cross_entropy(model(x), labels)
    dx = model.backward(dlogits)
    pairs = list(model.parameters())
    grads = [g.copy() for _, g in pairs]
    num_dx = numerical_gradient(lambda v: nn.softmax_cross_entropy(model(v), labels)[0], x, 1.0)
    assert relative_error(dx, num_dx) < TOL
    for (param, _), grad in zip(pairs, grads, strict=True):
        assert relative_error(grad, param_gradient(loss, param, 1.0)) < TOL


def test_sequential_mlp_gradients() -> None:
    rng = np.random.default_rng(9)
    model = mlp(rng)
    for param, _ in model.parameters():
        param[...] = rng.standard_normal(param.shape)
    x = rng.standard_normal((5, 3))
    hidden = model.layers[0](x)
    assert np.abs(hidden).min() > 1e-3  # no ReLU kink within a finite-difference step
    assert len(list(model.parameters())) == 4
    check_model(model, x, rng.integers(0, 4, 5))


def test_sequential_train_eval_and_layers_list() -> None:
    model = nn.Sequential(nn.Linear(2, 2, 0), nn.Sequential(nn.ReLU()))
    assert isinstance(model.layers, list)
    assert model.eval() is model
    assert not model.training and not model.layers[1].layers[0].training
    assert model.train() is model
    assert model.layers[1].layers[0].training


def test_sgd_momentum_and_weight_decay_by_hand() -> None:
    p = np.array([1.0, -2.0])
    g = np.array([0.5, 0.25])
    opt = nn.SGD(lr=0.1, momentum=0.9, weight_decay=0.01)
    same = p
    opt.step([(p, g)])
    v1 = g + 0.01 * np.array([1.0, -2.0])
    p1 = np.array([1.0, -2.0]) - 0.1 * v1
    np.testing.assert_allclose(p, p1, rtol=1e-15)
    g2 = np.array([-1.0, 2.0])
    opt.step([(p, g2)])
    v2 = 0.9 * v1 + g2 + 0.01 * p1
    np.testing.assert_allclose(p, p1 - 0.1 * v2, rtol=1e-15)
    assert p is same  # updated in place


def test_sgd_plain() -> None:
    p = np.array([1.0])
    nn.SGD(lr=0.5).step([(p, np.array([2.0]))])
    np.testing.assert_array_equal(p, [0.0])


def test_tiny_mlp_learns_separable_blobs() -> None:
    rng = np.random.default_rng(10)
    labels = rng.integers(0, 2, 200)
    x = rng.standard_normal((200, 3)) + np.where(labels[:, None] == 1, 2.0, -2.0)
    model = nn.Sequential(nn.Linear(3, 16, rng), nn.ReLU(), nn.Linear(16, 2, rng))
    opt = nn.SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)
    first = nn.softmax_cross_entropy(model(x), labels)[0]
    for _ in range(50):
        loss, dlogits = nn.softmax_cross_entropy(model(x), labels)
        model.backward(dlogits)
        opt.step(model.parameters())
    assert loss < 0.2 * first
    assert (model(x).argmax(axis=1) == labels).mean() > 0.95


def test_lenet_shapes_and_gradient_flow() -> None:
    rng = np.random.default_rng(11)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, rng=rng),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, rng=rng),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6, 3, rng),
    )
    x = rng.standard_normal((2, 1, 8, 8))
    y = model(x)
    assert y.shape == (2, 3)
    assert model.backward(np.ones_like(y)).shape == x.shape
    assert len(list(model.parameters())) == 6


# --- with BatchNorm ---------------------------------------------------------------------


class KernelBatchNorm:
    """The smallest BatchNorm of the public contract, on the functional kernels.

    Lets these tests check that Sequential and SGD handle any BatchNorm by duck typing, whether
    or not batchnorm.BatchNorm is available.
    """

    def __init__(self, num_features: int, *, affine: bool = True) -> None:
        self.gamma = np.ones(num_features) if affine else None
        self.beta = np.zeros(num_features) if affine else None
        self.dgamma: np.ndarray | None = None
        self.dbeta: np.ndarray | None = None
        self.running_mean, self.running_var = np.zeros(num_features), np.ones(num_features)
        self.training = True

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)

    def forward(self, x: np.ndarray) -> np.ndarray:
        if self.training:
            y, self._cache = batchnorm.forward_train(x, self.gamma, self.beta)
        else:
            args = (self.gamma, self.beta, self.running_mean, self.running_var)
            y, self._cache = batchnorm.forward_eval(x, *args)
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        dx, self.dgamma, self.dbeta = batchnorm.backward(dy, self._cache)
        return dx

    def train(self) -> KernelBatchNorm:
        self.training = True
        return self

    def eval(self) -> KernelBatchNorm:
        self.training = False
        return self


BN_CLASSES = [
    pytest.param(KernelBatchNorm, id="kernel-bn"),
    pytest.param(
        getattr(batchnorm, "BatchNorm", None),
        id="batchnorm.BatchNorm",
        marks=pytest.mark.skipif(
            not hasattr(batchnorm, "BatchNorm"), reason="batchnorm.BatchNorm not available"
        ),
    ),
]


@pytest.mark.parametrize("bn_class", BN_CLASSES)
def test_sequential_with_batchnorm_gradients_in_train_mode(bn_class: Any) -> None:
    rng = np.random.default_rng(12)
    norm = bn_class(6)
    model = mlp(rng, norm).train()
    norm.gamma[...] = rng.uniform(0.5, 1.5, 6)
    norm.beta[...] = rng.standard_normal(6)
    x = rng.standard_normal((8, 3))
    labels = rng.integers(0, 4, 8)
    model.backward(nn.softmax_cross_entropy(model(x), labels)[1])
    pairs = list(model.parameters())
    assert len(pairs) == 5
    assert any(p is norm.gamma for p, _ in pairs) and any(p is norm.beta for p, _ in pairs)
    assert np.abs(norm(model.layers[0](x))).min() > 1e-3  # away from ReLU's kink
    check_model(model, x, labels)


@pytest.mark.parametrize("bn_class", BN_CLASSES)
def test_sequential_propagates_mode_to_batchnorm(bn_class: Any) -> None:
    norm = bn_class(4)
    model = nn.Sequential(nn.Linear(3, 4, 0), nn.Sequential(norm), nn.ReLU())
    assert model.eval() is model and norm.training is False
    x = np.random.default_rng(13).standard_normal((5, 3))
    # Eval mode with fresh running statistics (0, 1) is an affine map close to the identity.
    np.testing.assert_allclose(model(x), np.maximum(model.layers[0](x) / np.sqrt(1 + 1e-5), 0))
    assert model.train() is model and norm.training is True


@pytest.mark.parametrize("bn_class", BN_CLASSES)
def test_batchnorm_without_affine_has_no_parameters(bn_class: Any) -> None:
    model = nn.Sequential(nn.Linear(3, 4, 0, bias=False), bn_class(4, affine=False))
    model.backward(model(np.random.default_rng(14).standard_normal((5, 3))))
    assert len(list(model.parameters())) == 1


@pytest.mark.parametrize("bn_class", BN_CLASSES)
def test_sgd_trains_batchnorm_parameters_in_place(bn_class: Any) -> None:
    rng = np.random.default_rng(15)
    norm = bn_class(4)
    gamma = norm.gamma
    model = nn.Sequential(nn.Linear(3, 4, rng), norm, nn.ReLU(), nn.Linear(4, 2, rng))
    labels = rng.integers(0, 2, 16)
    x = rng.standard_normal((16, 3)) + labels[:, None]
    opt = nn.SGD(lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        loss, dlogits = nn.softmax_cross_entropy(model(x), labels)
        losses.append(loss)
        model.backward(dlogits)
        opt.step(model.parameters())
    assert norm.gamma is gamma and not np.allclose(gamma, 1.0)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.skipif(not hasattr(batchnorm, "precise_bn"), reason="batchnorm.precise_bn missing")
def test_precise_bn_finds_batchnorm_inside_sequential() -> None:
    rng = np.random.default_rng(16)
    first = nn.Linear(3, 4, rng)
    norm = batchnorm.BatchNorm(4)
    model = nn.Sequential(first, nn.Sequential(norm, nn.ReLU()), nn.Linear(4, 2, rng))
    batches = [rng.standard_normal((8, 3)) + 2.0 for _ in range(3)]
    batchnorm.precise_bn(model, batches, num_batches_precise=3)
    expected = np.concatenate([first(b) for b in batches]).mean(axis=0)
    np.testing.assert_allclose(norm.running_mean, expected, rtol=1e-12)
    assert norm.training
