"""flax.linen.BatchNorm as users call it (its defaults), and with use_fast_variance=False.

Conventions mapped: flax's momentum weighs the OLD value (as ours), its running variance is the
biased one (an unbiased case is not supported), channels last (x is moved to (N, ..., C)),
scale, bias and statistics float32 (flax's param_dtype), float64 for float64 input. float64
rows need jax's 64-bit mode, which building these rows switches on (``jax_enable_x64``).
Gradients come from ``jax.vjp``.
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
    """flax (defaults: use_fast_variance=True) and flax with use_fast_variance=False."""
    try:
        jax = importlib.import_module("jax")
        flax = importlib.import_module("flax")
        nn = importlib.import_module("flax.linen")
    except ImportError:
        raise _validate.missing_framework("jax", "flax", "jax flax") from None
    jax.config.update("jax_enable_x64", True)
    version = f"flax {flax.__version__} / jax {jax.__version__}"
    conventions = (
        "momentum as ours; running_var biased; channels last; float32 scale/bias (float64 "
        "for float64 input)"
    )
    return [
        Implementation("flax", version, _DTYPES, _runner(jax, nn, fast=True), conventions),
        Implementation(
            "flax-exact-var",
            version,
            _DTYPES,
            _runner(jax, nn, fast=False),
            conventions + "; use_fast_variance=False",
        ),
    ]


def _runner(jax: Any, nn: Any, *, fast: bool) -> Any:
    jnp = jax.numpy
    compiled: dict[tuple[bool, float, float, str], Any] = {}

    def step_for(training: bool, momentum: float, eps: float, pdt: Any) -> Any:
        """One jitted forward + backward per configuration (jit caches each shape)."""
        key = (training, momentum, eps, jnp.dtype(pdt).name)
        if key not in compiled:
            module = nn.BatchNorm(
                use_running_average=not training,
                momentum=momentum,
                epsilon=eps,
                use_fast_variance=fast,
                param_dtype=pdt,
            )

            def step(x: Any, scale: Any, bias: Any, stats: Any, dy: Any) -> Any:
                def apply(x: Any, scale: Any, bias: Any) -> Any:
                    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
                    return module.apply(variables, x, mutable=["batch_stats"])

                (y, updates), pullback = jax.vjp(apply, x, scale, bias)
                zero = jax.tree_util.tree_map(jnp.zeros_like, updates)
                return y, updates, pullback((dy.astype(y.dtype), zero))

            compiled[key] = jax.jit(step)
        return compiled[key]

    def run(case: Case, inp: CaseInputs) -> dict[str, Any] | None:
        if case.mode == "running" and inp.unbiased:
            return None  # flax's running variance is the biased one
        # A float64 user keeps float64 parameters and statistics; else flax's float32.
        pdt = jnp.float64 if case.dtype == "float64" else jnp.float32
        momentum = 0.99 if inp.momentum is None else float(inp.momentum)
        step = step_for(case.mode != "eval", momentum, inp.eps, pdt)
        c = case.shape[1]
        stats: dict[str, Any] = {"mean": np.zeros(c), "var": np.ones(c)}
        if case.mode == "eval":
            stats = {"mean": inp.mean, "var": inp.var}
        elif case.mode == "running":
            stats = {"mean": inp.running_mean, "var": inp.running_var}
        batch_stats = {k: jnp.asarray(v, dtype=pdt) for k, v in stats.items()}
        x = jnp.asarray(np.moveaxis(inp.x, 1, -1))
        scale = jnp.asarray(inp.gamma, dtype=pdt)
        bias = jnp.asarray(inp.beta, dtype=pdt)
        dy = jnp.asarray(np.moveaxis(inp.dy, 1, -1))
        y, updates, (dx, dscale, dbias) = step(x, scale, bias, batch_stats, dy)
        out = {
            "y": np.moveaxis(np.asarray(y), -1, 1),
            "dx": np.moveaxis(np.asarray(dx), -1, 1),
            "dgamma": np.asarray(dscale),
            "dbeta": np.asarray(dbias),
        }
        if case.mode == "running":
            out["running_mean"] = np.asarray(updates["batch_stats"]["mean"])
            out["running_var"] = np.asarray(updates["batch_stats"]["var"])
        return out

    return run
