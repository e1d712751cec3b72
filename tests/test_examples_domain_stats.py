"""examples/domain_stats.py in --quick mode: shared against per-domain statistics."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "domain_stats.py"
ROW = re.compile(r"^\| (?P<regime>[a-z, -]+) \| (?P<cells>.*) \|$", re.M)


@pytest.mark.slow
def test_quick_run_prints_the_table() -> None:
    pytest.importorskip("sklearn")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    rows = {
        m["regime"]: [float(c.split()[0]) for c in m["cells"].split(" | ")]
        for m in ROW.finditer(done.stdout)
        if m["regime"] != "training"
    }
    assert list(rows) == [
        "mixed batches, shared", "domain batches, shared", "domain batches, per-domain"
    ], done.stdout  # fmt: skip
    assert all(0.5 < a <= 1.0 for accs in rows.values() for a in accs), rows
    # Training with batches of one domain gives the same weights whether the running statistics
    # are kept per domain or not: population statistics then give the same accuracies.
    assert rows["domain batches, shared"][1:] == rows["domain batches, per-domain"][1:]
