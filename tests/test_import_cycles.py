"""No import cycles in the package, function-level and type-checking imports included.

Every ``import bnstats...`` and ``from bnstats... import ...`` anywhere in a module (at the
top, inside a function, under ``TYPE_CHECKING``) is an edge from that module to the one it
names; a cycle is a strongly connected group of two or more modules. Run this file directly
(``python tests/test_import_cycles.py``) to list every cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Every module under ``src/bnstats`` by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted((src / "bnstats").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in its text."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names.add(full if full in modules else node.module)
    return {name for name in names if name in modules}


def import_cycles(src: Path = SRC) -> list[list[str]]:
    """Each group of modules that import one another in a circle, sorted (Tarjan's algorithm)."""
    modules = module_files(src)
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        for other in graph[node]:
            if other not in order:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], order[other])
        if low[node] == order[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for name in graph:
        if name not in order:
            visit(name)
    return sorted(cycles)


def test_the_finder_sees_a_function_level_cycle(tmp_path):
    package = tmp_path / "bnstats"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from bnstats.b import g\n")
    (package / "b.py").write_text("from bnstats import a\n")
    (package / "c.py").write_text("import bnstats.a\n")
    assert import_cycles(tmp_path) == [["bnstats.a", "bnstats.b"]]


def test_no_import_cycle_anywhere():
    """No cycle under src/bnstats, function-level and type-checking imports included."""
    assert import_cycles() == []


if __name__ == "__main__":
    found = import_cycles()
    for cycle in found:
        print("cycle:", " <-> ".join(cycle))
    print(f"{len(found)} import cycle(s) under {SRC / 'bnstats'}")
    sys.exit(1 if found else 0)
