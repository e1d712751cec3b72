"""The audit's report card: a text table, JSON, and the error-against-offset plot."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from batchnorm._audit._core import Implementation, Row

#: Errors of 0 (this library's float64 road is the reference itself) are drawn here.
PLOT_FLOOR = 1e-17


def text(impls: Sequence[Implementation], rows: Sequence[Row]) -> str:
    """One table per implementation, then its failures with their likely causes."""
    out: list[str] = []
    for impl in impls:
        mine = [r for r in rows if r.implementation == impl.name]
        out.append(f"== {impl.name} ({impl.version})")
        if impl.conventions:
            out.append(f"   conventions mapped: {impl.conventions}")
        width = max([30, *(len(r.case) for r in mine)])
        out.append(
            f"{'case':<{width}} {'dtype':<8} {'output':<12} {'error':>9} {'tolerance':>9} "
            f"{'err/tol':>8} {'digits lost':>11}  ok"
        )
        for r in mine:
            if not r.supported:
                why = r.cause or f"not expressible in {impl.name}"
                out.append(f"{r.case:<{width}} {r.dtype:<8} n/a ({why})")
                continue
            ratio = r.error / r.tolerance if r.tolerance else math.inf
            out.append(
                f"{r.case:<{width}} {r.dtype:<8} {r.output:<12} {r.error:9.2e} {r.tolerance:9.2e} "
                f"{ratio:8.2g} {r.digits_lost:11.1f}  {'yes' if r.passed else 'NO'}"
            )
        failed = [r for r in mine if r.supported and not r.passed]
        ran = sum(r.supported for r in mine)
        out.append(f"{impl.name}: {ran - len(failed)} of {ran} cases passed")
        for r in failed:
            line = f"  FAIL {r.case}: {r.output} error {r.error:.2e} > tolerance {r.tolerance:.2e}"
            out.append(line)
            if r.cause:
                out.append(f"       likely cause: {r.cause}")
            if r.known:
                out.append(f"       known: {r.known}")
        out.append("")
    return "\n".join(out)


def as_json(impls: Sequence[Implementation], rows: Sequence[Row]) -> str:
    """``{implementation: [row, ...]}``; each row has case, error, tolerance, passed and more."""
    data: dict[str, list[dict[str, Any]]] = {}
    for impl in impls:
        data[impl.name] = [
            {**r.as_dict(), "version": impl.version} for r in rows if r.implementation == impl.name
        ]
    return json.dumps(data, indent=1)


def plot(rows: Sequence[Row], path: str, pyplot: Any) -> None:
    """y's error against the data's offset, per implementation and dtype, on log axes.

    One colour per implementation (this library in black, thick), one line style per dtype;
    dtypes with a single offset case (float16, bfloat16) are left out.
    """
    fig, ax = pyplot.subplots(figsize=(10, 5.5))
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        if r.supported and r.mode == "train" and r.case.startswith("offset_") and r.offset > 0:
            err = r.errors.get("y", math.inf)
            if math.isfinite(err):
                series.setdefault((r.implementation, r.dtype), []).append((r.offset, err))
    names = sorted({name for name, _ in series if name != "batchnorm"})
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)} | {"batchnorm": "black"}
    styles = {"float32": "-", "float64": "--"}
    for (name, dtype), points in sorted(series.items()):
        if len(points) < 2:
            continue
        points.sort()
        ours = name == "batchnorm"
        ax.plot(
            [p[0] for p in points],
            [max(p[1], PLOT_FLOOR) for p in points],
            styles.get(dtype, ":"),
            marker="o",
            markersize=4,
            color=colours[name],
            linewidth=2.5 if ours else 1.4,
            label=f"{name} {dtype}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offset of the data (mean per channel; std 0.5 to 2)")
    ax.set_ylabel("normwise error of y against the float64 reference")
    ax.set_title(
        "BatchNorm error against offset: solid float32, dashed float64 "
        f"(an error of 0 is drawn at {PLOT_FLOOR:g})",
        fontsize="medium",
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
