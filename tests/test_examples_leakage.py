"""examples/leakage.py in --quick mode: on thread workers, and on MPI ranks when available.

The quick run trains each of the four ways to normalize for 3 epochs on per-worker batches of
one class each and must report the three accuracies of each and write a figure.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed_mpi import run_mpi

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "leakage.py"
METHODS = ("per-worker", "sync", "shuffle", "frozen")
ROW = re.compile(r"^(?P<method>[a-z-]+)\s+0\s+(?P<a>[\d.]+)\s+(?P<b>[\d.]+)\s+(?P<c>[\d.]+)$", re.M)


def rows(stdout: str) -> dict[str, tuple[float, float, float]]:
    found = {
        m["method"]: (float(m["a"]), float(m["b"]), float(m["c"])) for m in ROW.finditer(stdout)
    }
    assert set(found) == set(METHODS), stdout
    return found


@pytest.mark.slow
def test_quick_run_on_threads(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    found = rows(done.stdout)
    for accs in found.values():
        assert all(0.0 <= a <= 1.0 for a in accs)
    # Each worker's batch holds one class: after 3 epochs every remedy learns (chance is 0.1),
    # while per-worker BatchNorm is at chance with population statistics.
    assert all(found[m][1] > 0.5 for m in ("sync", "shuffle", "frozen")), found
    assert found["per-worker"][1] < 0.3, found
    assert "4 workers x 16 samples" in done.stdout
    png = tmp_path / "leakage.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_run_on_mpi_ranks(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    stdout = run_mpi(2, SCRIPT, "--quick", "--mpi", "--out", str(tmp_path), timeout=300)
    assert "2 workers x 16 samples" in stdout
    rows(stdout)
    assert (tmp_path / "leakage.png").exists()
