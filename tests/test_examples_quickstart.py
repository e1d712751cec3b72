"""examples/quickstart.py runs, and the gradient checks it prints pass."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "quickstart.py"
ERROR_LINE = re.compile(r"relative error of (dx|dgamma|dbeta):\s+(\S+)")


@pytest.mark.slow
def test_quickstart_runs_and_its_gradients_check() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr

    errors = [(name, float(value)) for name, value in ERROR_LINE.findall(result.stdout)]
    # 3 checks with dx, dgamma, dbeta (train and eval (B, L), train (N, C, H, W)) + 1 with dx.
    assert len(errors) == 10, result.stdout
    assert {name for name, _ in errors} == {"dx", "dgamma", "dbeta"}
    for name, err in errors:
        assert 0.0 <= err < 1e-7, f"{name}: relative error {err:.2e}\n{result.stdout}"
