"""Minimal NumPy layers for the example scripts (not part of the ``batchnorm`` package).

Every layer follows one small protocol: ``forward(x)`` (also ``layer(x)``), ``backward(dy)``
returning dx, ``params()`` listing ``(array, grad)`` pairs, and ``train()``/``eval()``.
Gradients are *overwritten* (not accumulated) by each backward, as in ``batchnorm.BatchNorm``.
Weights use PyTorch's layouts, (out, in) and (out, in, kh, kw), so ``batchnorm.fold`` and
PyTorch comparisons need no transposes. A layer keeps what backward needs from the last forward
only: call backward once per forward, and do not mutate x in between.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

Array = NDArray[np.float64]
Pair = tuple[Array, Array]
IntPair = int | tuple[int, int]


def _pair(v: IntPair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _windows(x: Array, kernel: tuple[int, int], stride: tuple[int, int]) -> Array:
    """View (N, C, H, W) as (N, C, Ho, Wo, kh, kw) strided windows, without copying."""
    view = sliding_window_view(x, kernel, axis=(2, 3))
    return view[:, :, :: stride[0], :: stride[1]]


def _col2im(cols: Array, shape: tuple[int, ...], stride: tuple[int, int]) -> Array:
    """Adjoint of :func:`_windows`: sum (N, C, Ho, Wo, kh, kw) window values into (N, C, H, W).

    Looping over the kh*kw kernel offsets (not pixels) keeps every add a big vectorized slice;
    overlapping windows (stride < kernel) simply add up, which np.add.at would also do but slower.
    """
    out = np.zeros(shape, dtype=cols.dtype)
    _, _, ho, wo, kh, kw = cols.shape
    sh, sw = stride
    for i in range(kh):
        for j in range(kw):
            out[:, :, i : i + sh * ho : sh, j : j + sw * wo : sw] += cols[..., i, j]
    return out


def _kaiming_uniform(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> Array:
    # He et al. 2015: Var(w) = 2 / fan_in keeps ReLU activations from shrinking with depth;
    # U(-b, b) has variance b^2 / 3, hence b = sqrt(6 / fan_in).
    bound = np.sqrt(6.0 / fan_in)
    return rng.uniform(-bound, bound, size=shape)


class Module:
    """Base of the layers here: mode flag, ``__call__`` = forward, no parameters."""

    training: bool = True

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def forward(self, x: Array) -> Array:
        raise NotImplementedError

    def backward(self, dy: Array) -> Array:
        raise NotImplementedError

    def params(self) -> list[Pair]:
        return []

    def train(self) -> Module:
        self.training = True
        return self

    def eval(self) -> Module:
        self.training = False
        return self


class _Weighted(Module):
    """Shared by Linear and Conv2d: Kaiming-uniform weight, zero bias, grads of the same shapes."""

    def __init__(
        self, shape: tuple[int, ...], bias: bool, rng: np.random.Generator | int | None
    ) -> None:
        fan_in = int(np.prod(shape[1:]))
        self.weight = _kaiming_uniform(np.random.default_rng(rng), shape, fan_in)
        self.bias: Array | None = np.zeros(shape[0]) if bias else None
        self.dweight = np.zeros_like(self.weight)
        self.dbias: Array | None = None if self.bias is None else np.zeros_like(self.bias)

    def params(self) -> list[Pair]:
        pairs = [(self.weight, self.dweight)]
        if self.bias is not None and self.dbias is not None:
            pairs.append((self.bias, self.dbias))
        return pairs


class Linear(_Weighted):
    """y = x @ weight.T + bias, x of shape (N, in_features), y of shape (N, out_features).

    ``weight`` is (out_features, in_features), ``bias`` (out_features,) or None; backward sets
    ``dweight`` and ``dbias``. ``rng`` is a Generator or a seed.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rng: np.random.Generator | int | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__((out_features, in_features), bias, rng)

    def forward(self, x: Array) -> Array:
        self._x = x
        y: Array = x @ self.weight.T
        return y if self.bias is None else y + self.bias

    def backward(self, dy: Array) -> Array:
        # Written in place so that (param, grad) pairs taken before backward stay current.
        self.dweight[...] = dy.T @ self._x
        if self.dbias is not None:
            self.dbias[...] = dy.sum(axis=0)
        return dy @ self.weight


class Conv2d(_Weighted):
    """2-D cross-correlation (PyTorch's Conv2d) via im2col: (N, C, H, W) -> (N, O, Ho, Wo).

    ``Ho = (H + 2*pad_h - kh) // stride_h + 1``, likewise Wo. ``weight`` is (O, C, kh, kw),
    ``bias`` (O,) or None; backward sets ``dweight`` and ``dbias``. Zero padding;
    kernel_size, stride and padding take an int or an (h, w) pair.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        bias: bool = True,
        rng: np.random.Generator | int | None = None,
    ) -> None:
        self.kernel, self.stride, self.padding = _pair(kernel_size), _pair(stride), _pair(padding)
        super().__init__((out_channels, in_channels, *self.kernel), bias, rng)

    def forward(self, x: Array) -> Array:
        n = x.shape[0]
        ph, pw = self.padding
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
        win = _windows(xp, self.kernel, self.stride)
        ho, wo = win.shape[2:4]
        # One matmul: rows are output pixels, columns are (C, kh, kw) patch entries.
        self._cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, -1)
        self._xp_shape, self._win_shape = xp.shape, win.shape
        y: Array = self._cols @ self.weight.reshape(len(self.weight), -1).T
        if self.bias is not None:
            y += self.bias
        out: Array = y.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)
        return out

    def backward(self, dy: Array) -> Array:
        o = dy.shape[1]
        dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, o)
        self.dweight[...] = (dy2.T @ self._cols).reshape(self.weight.shape)
        if self.dbias is not None:
            self.dbias[...] = dy2.sum(axis=0)
        n, c, ho, wo, kh, kw = self._win_shape
        dcols = (dy2 @ self.weight.reshape(o, -1)).reshape(n, ho, wo, c, kh, kw)
        dxp = _col2im(dcols.transpose(0, 3, 1, 2, 4, 5), self._xp_shape, self.stride)
        ph, pw = self.padding
        return dxp[:, :, ph : dxp.shape[2] - ph, pw : dxp.shape[3] - pw]


class _Pool2d(Module):
    def __init__(self, kernel_size: IntPair, stride: IntPair | None = None) -> None:
        self.kernel = _pair(kernel_size)
        self.stride = self.kernel if stride is None else _pair(stride)


class MaxPool2d(_Pool2d):
    """Max over kh x kw windows (stride defaults to the kernel): (N, C, H, W) -> (N, C, Ho, Wo).

    The gradient goes to one position per window: the first maximum in row-major order on ties.
    """

    def forward(self, x: Array) -> Array:
        win = _windows(x, self.kernel, self.stride)
        flat = win.reshape(*win.shape[:4], -1)
        self._idx = flat.argmax(axis=-1)[..., None]
        self._x_shape, self._win_shape = x.shape, win.shape
        return np.take_along_axis(flat, self._idx, axis=-1)[..., 0]

    def backward(self, dy: Array) -> Array:
        dcols = np.zeros((*self._win_shape[:4], self.kernel[0] * self.kernel[1]), dtype=dy.dtype)
        np.put_along_axis(dcols, self._idx, dy[..., None], axis=-1)
        return _col2im(dcols.reshape(self._win_shape), self._x_shape, self.stride)


class AvgPool2d(_Pool2d):
    """Mean over kh x kw windows (stride defaults to the kernel): (N, C, H, W) -> (N, C, Ho, Wo)."""

    def forward(self, x: Array) -> Array:
        win = _windows(x, self.kernel, self.stride)
        self._x_shape, self._win_shape = x.shape, win.shape
        y: Array = win.mean(axis=(-2, -1))
        return y

    def backward(self, dy: Array) -> Array:
        share = dy / (self.kernel[0] * self.kernel[1])
        # A broadcast view: every window position gets the same share, no copy needed.
        dcols = np.broadcast_to(share[..., None, None], self._win_shape)
        return _col2im(dcols, self._x_shape, self.stride)


class ReLU(Module):
    """max(x, 0), any shape. The gradient at exactly 0 is taken as 0."""

    def forward(self, x: Array) -> Array:
        self._mask = x > 0
        return np.maximum(x, 0)

    def backward(self, dy: Array) -> Array:
        return dy * self._mask


class Flatten(Module):
    """(N, *rest) -> (N, prod(rest))."""

    def forward(self, x: Array) -> Array:
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: Array) -> Array:
        return dy.reshape(self._shape)


def _layer_params(layer: Any) -> list[Pair]:
    """(array, grad) pairs of any layer: ours via params(), a BatchNorm via gamma/beta."""
    if hasattr(layer, "params"):
        pairs: list[Pair] = layer.params()
        return pairs
    pairs = []
    for name in ("gamma", "beta"):
        value, grad = getattr(layer, name, None), getattr(layer, "d" + name, None)
        # affine=False stores None; before its first backward a layer may have no grad yet.
        if value is not None and grad is not None:
            pairs.append((value, grad))
    return pairs


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    ``layers`` is a plain list so that code walking attributes (``batchnorm.precise_bn``) finds
    the BatchNorm layers inside. Any object with forward/backward (and optionally train/eval)
    works as a layer, including ``batchnorm.BatchNorm``.
    """

    def __init__(self, *layers: Any) -> None:
        self.layers: list[Any] = list(layers)

    def forward(self, x: Array) -> Array:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy: Array) -> Array:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def params(self) -> list[Pair]:
        return [pair for layer in self.layers for pair in _layer_params(layer)]

    def parameters(self) -> Iterator[Pair]:
        """Yield (array, grad) of every trainable array; take them after each backward."""
        yield from self.params()

    def train(self) -> Sequential:
        self.training = True
        for layer in self.layers:
            if hasattr(layer, "train"):
                layer.train()
        return self

    def eval(self) -> Sequential:
        self.training = False
        for layer in self.layers:
            if hasattr(layer, "eval"):
                layer.eval()
        return self


def softmax_cross_entropy(logits: Array, labels: NDArray[np.integer[Any]]) -> tuple[float, Array]:
    """Mean cross-entropy of (N, K) logits against (N,) integer labels, and d loss / d logits.

    Uses log-softmax with the row maximum subtracted, so large logits cannot overflow exp.
    """
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - log_z
    rows = np.arange(n)
    loss = -float(log_p[rows, labels].mean())
    dlogits = np.exp(log_p)
    dlogits[rows, labels] -= 1.0
    return loss, dlogits / n


class SGD:
    """SGD with momentum and L2 weight decay, PyTorch's form, updating arrays in place::

        g = grad + weight_decay * param
        v = momentum * v + g            (v starts at 0)
        param -= lr * v

    ``step`` takes the (param, grad) pairs each time (``model.parameters()`` after backward),
    because a layer may replace its grad arrays; velocities follow the param array itself.
    Weight decay applies to every pair given, BatchNorm's gamma and beta included.
    """

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        # Keyed by id; holding the param itself keeps the id from being reused by another array.
        self._velocity: dict[int, tuple[Array, Array]] = {}

    def step(self, pairs: Iterable[Pair]) -> None:
        for param, grad in pairs:
            g = grad + self.weight_decay * param if self.weight_decay else grad
            if self.momentum:
                if id(param) not in self._velocity:
                    self._velocity[id(param)] = (param, np.zeros_like(param))
                v = self._velocity[id(param)][1]
                v *= self.momentum
                v += g
                g = v
            param -= self.lr * g
