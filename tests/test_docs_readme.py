"""The README tells a new user what they need: every optional dependency behind a skipped test,
and every public entry point in its tour."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# Module imported by a test -> the name the README uses for it.
DISTRIBUTIONS = {
    "torch": "PyTorch",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "mpi4py": "mpi4py",
    "mkdocs": "mkdocs",
    "material": "mkdocs-material",
    "mkdocstrings": "mkdocstrings",
    "mkdocstrings_handlers.python": "mkdocstrings",
}


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def _skip_note() -> str:
    install = _section("Install")
    match = re.search(r"Tests that need an optional dependency.*?(?:\n\n|$)", install, re.DOTALL)
    assert match, "the Install section has no note on skipped tests"
    return " ".join(match.group(0).split())


def test_the_skip_note_names_every_optional_dependency() -> None:
    note = _skip_note()
    for name in ["PyTorch", "scikit-learn", "matplotlib", "tqdm", "mpi4py", "mkdocs", "Chromium"]:
        assert name in note, name


def test_every_module_a_test_skips_without_is_named() -> None:
    note = _skip_note()
    skipped: set[str] = set()
    for path in (ROOT / "tests").glob("*.py"):
        skipped |= set(re.findall(r"importorskip\(\s*\"([\w.]+)\"", path.read_text("utf-8")))
    assert {"torch", "sklearn", "tqdm"} <= skipped
    for module in skipped:
        assert DISTRIBUTIONS.get(module, module) in note, module


def test_the_tour_shows_folding() -> None:
    tour = _section("A 30-second tour")
    blocks = re.findall(r"```python\n(.*?)```", tour, re.DOTALL)
    assert any("fold_batchnorm(" in block for block in blocks)
