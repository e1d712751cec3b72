"""The examples in docstrings and in the Markdown docs run and give what they show."""

from __future__ import annotations

import doctest
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import batchnorm

ROOT = Path(__file__).resolve().parents[1]
MODULES = [
    "batchnorm",
    "batchnorm.functional",
    "batchnorm.layer",
    "batchnorm.precise",
    "batchnorm.gradcheck",
    "batchnorm.conformance",
    "batchnorm.fold",
    "batchnorm.distributed",
    "batchnorm._groups",  # MPIGroup and thread_groups, re-exported by batchnorm.distributed
    "batchnorm.renorm",
    "batchnorm._model",
    "batchnorm.domain",
]
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A fenced ```python block runs unless the line before it is this comment (for snippets that
# need the reader's own model or data).
NOT_RUN = "<!-- not run -->"
FENCE = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.DOTALL)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_public_name_has_an_example() -> None:
    exempt = {"BatchNormCache", "__version__", "distributed", "fold", "gradcheck"}
    for name in set(batchnorm.__all__) - exempt:
        doc = getattr(batchnorm, name).__doc__ or ""
        assert ">>>" in doc, f"batchnorm.{name} has no example in its docstring"


def _script(path: Path) -> str:
    """The runnable ```python blocks of one Markdown file, in order, as one script: later
    blocks may use what earlier ones defined, as a reader running the page would."""
    text = "\n" + path.read_text(encoding="utf-8")
    blocks = [
        match.group("code")
        for match in FENCE.finditer(text)
        if match.group("before").strip() != NOT_RUN
    ]
    return "\n\n".join(blocks)


RUNNABLE = [path for path in MARKDOWN if _script(path)]


def test_the_readme_has_runnable_examples() -> None:
    assert ROOT / "README.md" in RUNNABLE


@pytest.mark.parametrize("path", RUNNABLE, ids=[p.name for p in RUNNABLE])
def test_markdown_python_blocks_run(path: Path, tmp_path: Path) -> None:
    code = _script(path)
    if "import torch" in code:
        pytest.importorskip("torch")
    script = tmp_path / "blocks.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"a python block of {path.name} failed:\n{done.stderr}"


def test_python_m_batchnorm_prints_version_and_conventions() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "batchnorm"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert batchnorm.__version__ in done.stdout
    assert "weight of the OLD running value" in done.stdout
    assert "examples/" in done.stdout
