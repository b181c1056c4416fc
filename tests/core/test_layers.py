"""Imports flow one way: orchestration -> (curation, training) -> catalog -> core.

Every import statement of every module (also those inside functions) is read from the source;
a package may import itself and the packages below it, never one above or beside it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OURS = ("core", "catalog", "curation", "training", "orchestration")
ALLOWED = {
    "core": {"core"},
    "catalog": {"catalog", "core"},
    "curation": {"curation", "catalog", "core"},
    "training": {"training", "catalog", "core"},
    "orchestration": set(OURS),
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(n.split(".")[0], node.lineno) for n in names if n.split(".")[0] in OURS}
    return found


@pytest.mark.parametrize("package", OURS)
def test_a_package_imports_only_itself_and_the_layers_below(package):
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in sorted((REPO / package).rglob("*.py"))
        for name, line in sorted(imported_packages(path))
        if name not in ALLOWED[package]
    ]
    assert wrong == []


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from training.recipe import Recipe\n")
    assert imported_packages(module) == {("training", 2)}
