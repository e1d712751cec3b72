"""PyTorch's ``torch.nn.functional.batch_norm`` (CPU, and CUDA when a device is present).

Conventions mapped: PyTorch's momentum weighs the NEW value (ours 0.9 is its 0.1), its running
variance is always the unbiased one (a biased case is not supported), channels at axis 1 and
x passed with its strides (channels-last memory is PyTorch's channels_last format). Gradients
come from autograd; on a second-order case, from autograd's double backward: the gradients of
y with ``create_graph=True``, then those of ``<g_dx, dx> + <g_dgamma, dgamma> + <g_dbeta,
dbeta>`` with respect to x, weight and dy (PyTorch's ``batchnorm_double_backward``).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from batchnorm import _validate
from batchnorm._audit._core import Implementation
from batchnorm.conformance import Case, CaseInputs

_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})


def implementations() -> list[Implementation]:
    """torch-cpu, and torch-cuda when torch sees a CUDA device."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        raise _validate.missing_framework("torch", "torch", "torch") from None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [
        Implementation(
            f"torch-{device}",
            str(torch.__version__),
            _DTYPES,
            _runner(torch, device),
            conventions="momentum -> 1 - momentum; running_var always unbiased",
            second_order=True,
        )
        for device in devices
    ]


def _runner(torch: Any, device: str) -> Any:
    def run(case: Case, inp: CaseInputs) -> dict[str, Any] | None:
        if case.mode == "running" and not inp.unbiased:
            return None  # PyTorch's running variance is always unbiased
        dt = _torch_dtype(torch, inp.x.dtype)
        x = _tensor(torch, inp.x, device).detach().requires_grad_(True)
        stat_dt = dt  # the statistics are exact in x's dtype
        w = torch.tensor(inp.gamma, dtype=dt, device=device, requires_grad=True)
        b = torch.tensor(inp.beta, dtype=dt, device=device, requires_grad=True)
        rm = rv = None
        if case.mode == "eval":
            rm = torch.tensor(inp.mean, dtype=stat_dt, device=device)
            rv = torch.tensor(inp.var, dtype=stat_dt, device=device)
        elif case.mode == "running":
            rm = torch.tensor(inp.running_mean, dtype=stat_dt, device=device)
            rv = torch.tensor(inp.running_var, dtype=stat_dt, device=device)
        momentum = 1.0 - float(inp.momentum) if inp.momentum is not None else 0.1
        y = torch.nn.functional.batch_norm(
            x, rm, rv, w, b, training=case.mode != "eval", momentum=momentum, eps=inp.eps
        )
        if case.second_order:
            return _double_backward(torch, y, x, w, b, inp, device)
        y.backward(_tensor(torch, inp.dy, device))
        out = {
            "y": _array(torch, y, inp.x.dtype),
            "dx": _array(torch, x.grad, inp.x.dtype),
            "dgamma": _array(torch, w.grad, None),
            "dbeta": _array(torch, b.grad, None),
        }
        if case.mode == "running":
            out["running_mean"] = _array(torch, rm, None)
            out["running_var"] = _array(torch, rv, None)
        return out

    return run


def _double_backward(
    torch: Any, y: Any, x: Any, w: Any, b: Any, inp: CaseInputs, device: str
) -> dict[str, Any]:
    """gx, ggamma, gdy by autograd through autograd (all tensors in x's dtype)."""
    assert inp.g_dx is not None and inp.g_dgamma is not None and inp.g_dbeta is not None
    dy = _tensor(torch, inp.dy, device).detach().requires_grad_(True)
    dx, dw, db = torch.autograd.grad(y, [x, w, b], dy, create_graph=True)

    def weight(v: np.ndarray[Any, Any]) -> Any:
        return torch.tensor(v, dtype=x.dtype, device=device)

    total = (
        (_tensor(torch, inp.g_dx, device) * dx).sum()
        + (weight(inp.g_dgamma) * dw).sum()
        + (weight(inp.g_dbeta) * db).sum()
    )
    gx, ggamma, gdy = torch.autograd.grad(total, [x, w, dy])
    return {
        "gx": _array(torch, gx, inp.x.dtype),
        "ggamma": _array(torch, ggamma, None),
        "gdy": _array(torch, gdy, inp.x.dtype),
    }


def _torch_dtype(torch: Any, dtype: np.dtype[Any]) -> Any:
    return getattr(torch, dtype.name)


def _tensor(torch: Any, a: np.ndarray[Any, Any], device: str) -> Any:
    """a as a tensor with the same strides (bfloat16 through float32, exactly)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.astype(np.float32)).to(device=device, dtype=torch.bfloat16)
    return torch.from_numpy(a).to(device)


def _array(torch: Any, t: Any, dtype: np.dtype[Any] | None) -> np.ndarray[Any, Any]:
    """A tensor back as NumPy (bfloat16 back to x's dtype, exactly)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        values: np.ndarray[Any, Any] = t.float().numpy()
        return values.astype(dtype) if dtype is not None else values
    arr: np.ndarray[Any, Any] = t.numpy()
    return arr
