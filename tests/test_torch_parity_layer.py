"""The BatchNorm layer against PyTorch's BatchNorm1d/2d/3d: training runs step by step, eval
mode, state dicts in both directions, and folding into a convolution.

Our momentum weights the old running value and PyTorch's the new one, so our 0.9 is PyTorch's
0.1; momentum=None is the cumulative average in both. Skipped when torch is not installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import batchnorm as bn  # noqa: E402
from batchnorm.fold import fold_batchnorm  # noqa: E402

RTOL = 1e-10

MODULES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
SHAPES = [(16, 3), (8, 3, 5), (4, 3, 3, 5), (2, 3, 2, 3, 4)]
# (ours, PyTorch's)
MOMENTA = [(0.9, 0.1), (None, None), (0.75, 0.25), (0.0, 1.0)]


def torch_bn(shape: tuple[int, ...], c: int, **options: Any) -> Any:
    module = getattr(torch.nn, MODULES[len(shape)])(c, **options)
    return module.double()


def set_affine(ours: bn.BatchNorm, theirs: Any, seed: int) -> None:
    if not ours.affine:
        return
    rng = np.random.default_rng(seed)
    c = ours.num_features
    ours.gamma[:] = rng.uniform(0.5, 2.0, c)
    ours.beta[:] = rng.normal(size=c)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(ours.gamma))
        theirs.bias.copy_(torch.from_numpy(ours.beta))


def torch_step(module: Any, x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, ...]:
    """Forward and backward through a torch module; returns y, dx, dweight, dbias (or None)."""
    for p in module.parameters():
        p.grad = None
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = module(xt)
    yt.backward(torch.from_numpy(dy))
    grads = [None, None]
    if module.affine:
        grads = [module.weight.grad.numpy(), module.bias.grad.numpy()]
    return yt.detach().numpy(), xt.grad.numpy(), *grads


def assert_close(actual: Any, expected: Any, what: str) -> None:
    if expected is None:
        assert actual is None, what
        return
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=1e-12, err_msg=what)


def assert_same_buffers(ours: bn.BatchNorm, theirs: Any, step: int) -> None:
    if not ours.track_running_stats:
        assert ours.running_mean is None and theirs.running_mean is None
        return
    assert_close(ours.running_mean, theirs.running_mean.numpy(), f"running_mean, step {step}")
    assert_close(ours.running_var, theirs.running_var.numpy(), f"running_var, step {step}")
    assert ours.num_batches_tracked == int(theirs.num_batches_tracked), step


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{MODULES[len(s)]}-{len(s)}d")
@pytest.mark.parametrize("momenta", MOMENTA, ids=lambda m: f"ours={m[0]}-torch={m[1]}")
def test_five_training_steps_match(shape: tuple[int, ...], momenta: tuple[Any, Any]) -> None:
    ours_momentum, torch_momentum = momenta
    c = shape[1]
    rng = np.random.default_rng(0)
    ours = bn.BatchNorm(c, eps=1e-5, momentum=ours_momentum)
    theirs = torch_bn(shape, c, eps=1e-5, momentum=torch_momentum)
    set_affine(ours, theirs, seed=1)
    for step in range(1, 6):
        x = rng.normal(float(step), 2.0, size=shape)
        dy = rng.normal(size=shape)
        y_t, dx_t, dw_t, db_t = torch_step(theirs, x, dy)
        y = ours(x)
        dx = ours.backward(dy)
        assert_close(y, y_t, f"y, step {step}")
        assert_close(dx, dx_t, f"dx, step {step}")
        assert_close(ours.dgamma, dw_t, f"dgamma, step {step}")
        assert_close(ours.dbeta, db_t, f"dbeta, step {step}")
        assert_same_buffers(ours, theirs, step)
    # Then eval mode, normalizing with the running statistics.
    ours.eval()
    theirs.eval()
    x = rng.normal(2.0, 3.0, size=shape)
    dy = rng.normal(size=shape)
    y_t, dx_t, dw_t, db_t = torch_step(theirs, x, dy)
    assert_close(ours(x), y_t, "eval y")
    assert_close(ours.backward(dy), dx_t, "eval dx")
    assert_close(ours.dgamma, dw_t, "eval dgamma")
    assert_close(ours.dbeta, db_t, "eval dbeta")
    assert_same_buffers(ours, theirs, 6)


@pytest.mark.parametrize("shape", [(16, 3), (4, 3, 3, 5)])
@pytest.mark.parametrize(
    "options",
    [
        {"affine": False},
        {"track_running_stats": False},
        {"affine": False, "track_running_stats": False},
    ],
)
def test_options_match(shape: tuple[int, ...], options: dict[str, bool]) -> None:
    c = shape[1]
    rng = np.random.default_rng(2)
    ours = bn.BatchNorm(c, momentum=0.9, **options)
    theirs = torch_bn(shape, c, momentum=0.1, **options)
    set_affine(ours, theirs, seed=3)
    for step, training in enumerate([True, True, True, False, False], start=1):
        ours.train(training)
        theirs.train(training)
        x = rng.normal(1.0, 2.0, size=shape)
        dy = rng.normal(size=shape)
        y_t, dx_t, dw_t, db_t = torch_step(theirs, x, dy)
        assert_close(ours(x), y_t, f"y, step {step}")
        assert_close(ours.backward(dy), dx_t, f"dx, step {step}")
        assert_close(ours.dgamma, dw_t, f"dgamma, step {step}")
        assert_close(ours.dbeta, db_t, f"dbeta, step {step}")
        assert_same_buffers(ours, theirs, step)


def test_channels_last_matches_on_permuted_input() -> None:
    rng = np.random.default_rng(4)
    ours = bn.BatchNorm(3, momentum=0.9, axis=-1)
    theirs = torch.nn.BatchNorm2d(3, momentum=0.1).double()
    set_affine(ours, theirs, seed=5)
    for step in range(1, 6):
        x = rng.normal(size=(4, 5, 6, 3))  # (N, H, W, C)
        dy = rng.normal(size=x.shape)
        to_nchw = (0, 3, 1, 2)
        y_t, dx_t, dw_t, _ = torch_step(
            theirs, np.ascontiguousarray(x.transpose(to_nchw)), dy.transpose(to_nchw).copy()
        )
        assert_close(ours(x), y_t.transpose(0, 2, 3, 1), f"y, step {step}")
        assert_close(ours.backward(dy), dx_t.transpose(0, 2, 3, 1), f"dx, step {step}")
        assert_close(ours.dgamma, dw_t, f"dgamma, step {step}")
        assert_same_buffers(ours, theirs, step)


def test_eps_maps_directly() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(0.0, 0.01, size=(6, 2))  # small variance: eps matters
    ours = bn.BatchNorm(2, eps=1e-3)
    theirs = torch.nn.BatchNorm1d(2, eps=1e-3).double()
    assert_close(ours(x), theirs(torch.from_numpy(x)).detach().numpy(), "y")


# --- state dicts ---------------------------------------------------------------------------------


def trained_torch(module: Any, shape: tuple[int, ...], dtype: Any, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    module = module.to(dtype)
    if module.affine:
        with torch.no_grad():
            module.weight.uniform_(0.5, 2.0)
            module.bias.normal_()
    for _ in range(3):
        module(torch.from_numpy(rng.normal(1.0, 2.0, size=shape)).to(dtype))
    return module


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("cls", "shape", "options"),
    [
        ("BatchNorm1d", (8, 4), {}),
        ("BatchNorm1d", (8, 4, 3), {"affine": False}),
        ("BatchNorm2d", (2, 4, 3, 3), {}),
        ("BatchNorm2d", (2, 4, 3, 3), {"track_running_stats": False}),
    ],
)
def test_torch_state_dict_loads_as_it_is(
    cls: str, shape: tuple[int, ...], options: dict[str, bool], dtype: str
) -> None:
    torch.manual_seed(0)
    module = trained_torch(getattr(torch.nn, cls)(4, **options), shape, getattr(torch, dtype), 1)
    state = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    ours = bn.BatchNorm(4, **options)
    result = ours.load_state_dict(state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert list(ours.state_dict()) == list(state)
    if ours.track_running_stats:
        assert ours.num_batches_tracked == 3
        # float32 -> float64 is exact, so the values are the module's own.
        assert np.array_equal(ours.running_var, state["running_var"].astype(np.float64))
    ours.eval()
    module = module.double().eval()
    x = np.random.default_rng(2).normal(size=shape)
    expected = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours(x), expected, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("options", [{}, {"affine": False}, {"track_running_stats": False}])
def test_our_state_dict_loads_into_torch(options: dict[str, bool]) -> None:
    rng = np.random.default_rng(3)
    ours = bn.BatchNorm(3, **options)
    if ours.affine:
        ours.gamma[:] = rng.uniform(0.5, 2.0, 3)
        ours.beta[:] = rng.normal(size=3)
    for _ in range(4):
        ours(rng.normal(1.0, 2.0, size=(5, 3, 4)))
    module = torch.nn.BatchNorm1d(3, **options).double()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    if ours.track_running_stats:
        assert int(module.num_batches_tracked) == 4
    ours.eval()
    module.eval()
    x = rng.normal(size=(5, 3, 4))
    expected = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours(x), expected, rtol=RTOL, atol=1e-12)


def test_training_continues_identically_after_loading_torch_state() -> None:
    torch.manual_seed(1)
    module = trained_torch(torch.nn.BatchNorm2d(3), (2, 3, 4, 4), torch.float64, 4)
    ours = bn.BatchNorm(3, momentum=0.9)
    ours.load_state_dict({k: v.detach().numpy() for k, v in module.state_dict().items()})
    rng = np.random.default_rng(5)
    for step in range(4, 7):
        x = rng.normal(size=(2, 3, 4, 4))
        dy = rng.normal(size=x.shape)
        y_t, *_ = torch_step(module, x, dy)
        assert_close(ours(x), y_t, f"y, step {step}")
        assert_same_buffers(ours, module, step)


# --- folding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("stride", "padding"), [(1, 0), (2, 1)])
def test_fold_matches_torch_conv_then_bn(
    with_bias: bool, affine: bool, stride: int, padding: int
) -> None:
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(3, 5, 3, stride=stride, padding=padding, bias=with_bias).double()
    norm = trained_torch(torch.nn.BatchNorm2d(5, affine=affine), (4, 5, 3, 3), torch.float64, 6)
    norm.eval()
    ours = bn.BatchNorm(5, affine=affine)
    ours.load_state_dict({k: v.detach().numpy() for k, v in norm.state_dict().items()})
    ours.eval()
    weight = conv.weight.detach().numpy()
    bias = conv.bias.detach().numpy() if with_bias else None
    w_f, b_f = fold_batchnorm(weight, bias, ours)

    x = torch.from_numpy(np.random.default_rng(7).normal(size=(2, 3, 9, 8)))
    expected = norm(conv(x)).detach().numpy()
    folded = torch.nn.functional.conv2d(
        x, torch.from_numpy(w_f), torch.from_numpy(b_f), stride=stride, padding=padding
    )
    np.testing.assert_allclose(folded.numpy(), expected, rtol=1e-12, atol=1e-12)

    if affine:  # PyTorch's own fusion gives the same weights.
        from torch.nn.utils.fusion import fuse_conv_bn_weights

        w_t, b_t = fuse_conv_bn_weights(
            conv.weight,
            conv.bias,
            norm.running_mean,
            norm.running_var,
            norm.eps,
            norm.weight,
            norm.bias,
        )
        np.testing.assert_allclose(w_f, w_t.detach().numpy(), rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(b_f, b_t.detach().numpy(), rtol=1e-13, atol=1e-15)


def test_fold_matches_torch_linear_then_bn() -> None:
    torch.manual_seed(3)
    fc = torch.nn.Linear(6, 4).double()
    norm = trained_torch(torch.nn.BatchNorm1d(4), (10, 4), torch.float64, 8).eval()
    ours = bn.BatchNorm(4)
    ours.load_state_dict({k: v.detach().numpy() for k, v in norm.state_dict().items()})
    w_f, b_f = fold_batchnorm(fc.weight.detach().numpy(), fc.bias.detach().numpy(), ours.eval())
    x = torch.from_numpy(np.random.default_rng(9).normal(size=(7, 6)))
    expected = norm(fc(x)).detach().numpy()
    folded = torch.nn.functional.linear(x, torch.from_numpy(w_f), torch.from_numpy(b_f))
    np.testing.assert_allclose(folded.numpy(), expected, rtol=1e-12, atol=1e-12)
