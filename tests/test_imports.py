"""Imports inside the package run one way (down), also those made only for type checking."""

from __future__ import annotations

import ast
from pathlib import Path

import batchnorm

PACKAGE = Path(batchnorm.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere (TYPE_CHECKING blocks included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {n for n in names if n in known} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found & known


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # The package's __init__ only re-exports, and __main__ is the entry point: both sit on top.
    known = set(files) - {"batchnorm", "batchnorm.__main__"}
    return {name: _imports(files[name], known) - {name} for name in sorted(known)}


def test_the_module_graph_has_no_cycle() -> None:
    graph = _graph()
    assert "batchnorm.layer" in graph["batchnorm.renorm"]  # the scan sees imports
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(name) :], name]))
        if name not in done:
            for dep in sorted(graph[name]):
                visit(dep, [*path, name])
            done.add(name)

    for name in graph:
        visit(name, [])


def test_saved_state_sits_below_the_layer() -> None:
    graph = _graph()
    assert "batchnorm._saved" in graph["batchnorm.layer"]
    assert graph["batchnorm._saved"] <= {"batchnorm._validate"}
