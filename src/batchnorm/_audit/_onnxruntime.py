"""onnxruntime running a one-node BatchNormalization model (opset 15) built with onnx.

Conventions mapped: ONNX's momentum weighs the OLD value (as ours), its training-mode running
variance is the biased one (an unbiased case is not supported), channels at axis 1, and the
epsilon and momentum attributes are float32: onnxruntime applies float32(1e-5), so the
reference is built with that eps (else the float64 rows would show a false error of hundreds
of units), and float32(0.9) as momentum. The
model computes y only (no gradients); training_mode=1 gives y and the running statistics.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from batchnorm import _validate
from batchnorm._audit._core import Implementation
from batchnorm.conformance import Case, CaseInputs

_DTYPES = frozenset({"float64", "float32", "float16"})


def implementations() -> list[Implementation]:
    """onnxruntime on its CPU execution provider."""
    try:
        onnx = importlib.import_module("onnx")
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        raise _validate.missing_framework("onnxruntime", "onnx", "onnx onnxruntime") from None
    sessions: dict[tuple[str, bool, float, float], Any] = {}

    def session(dtype: np.dtype[Any], training: bool, eps: float, momentum: float) -> Any:
        key = (dtype.name, training, eps, momentum)
        if key not in sessions:
            model = _model(onnx, dtype, training, eps, momentum)
            sessions[key] = ort.InferenceSession(
                model.SerializeToString(), providers=["CPUExecutionProvider"]
            )
        return sessions[key]

    def run(case: Case, inp: CaseInputs) -> dict[str, Any] | None:
        if case.mode == "running" and inp.unbiased:
            return None  # ONNX's running variance is the biased one
        training = case.mode != "eval"
        dt = inp.x.dtype
        c = case.shape[1]
        mean: Any = np.zeros(c)
        var: Any = np.ones(c)
        if case.mode == "eval":
            mean, var = inp.mean, inp.var
        elif case.mode == "running":
            mean, var = inp.running_mean, inp.running_var
        feeds = {
            "X": np.ascontiguousarray(inp.x),
            "scale": inp.gamma.astype(dt),
            "B": inp.beta.astype(dt),
            "input_mean": np.asarray(mean).astype(dt),
            "input_var": np.asarray(var).astype(dt),
        }
        momentum = 0.9 if inp.momentum is None else float(inp.momentum)
        got = session(dt, training, inp.eps, momentum).run(None, feeds)
        out: dict[str, Any] = {"y": got[0]}
        if case.mode == "running":
            out["running_mean"], out["running_var"] = got[1], got[2]
        return out

    return [
        Implementation(
            "onnxruntime",
            f"onnxruntime {ort.__version__} / onnx {onnx.__version__}",
            _DTYPES,
            run,
            "momentum as ours; running_var biased; epsilon and momentum stored as float32",
            float32_attributes=True,
        )
    ]


def _model(onnx: Any, dtype: np.dtype[Any], training: bool, eps: float, momentum: float) -> Any:
    helper = onnx.helper
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    outputs = ["Y", "running_mean", "running_var"] if training else ["Y"]
    node = helper.make_node(
        "BatchNormalization",
        ["X", "scale", "B", "input_mean", "input_var"],
        outputs,
        epsilon=eps,
        momentum=momentum,
        training_mode=int(training),
    )
    graph = helper.make_graph(
        [node],
        "batchnorm",
        [helper.make_tensor_value_info(n, elem, None) for n in node.input],
        [helper.make_tensor_value_info(n, elem, None) for n in outputs],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
