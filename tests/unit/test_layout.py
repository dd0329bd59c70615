"""The test tree's own rules: no test module imports another (shared helpers live in
tests/helpers or a conftest), so a test is read and moved without dragging another along."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_test_module_imports_another() -> None:
    offenders = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        tests_imported = sorted(m for m in imported_modules(path)
                                if m.split(".")[-1].startswith("test_") or m.startswith(("tests.unit", "tests.integration")))
        if tests_imported:
            offenders[str(path.relative_to(TESTS))] = tests_imported
    assert offenders == {}


def test_the_rule_above_can_fail(tmp_path: Path) -> None:
    sample = tmp_path / "test_sample.py"
    sample.write_text("from tests.unit.test_ops_rules import used_names\nimport test_other\n")
    assert imported_modules(sample) >= {"tests.unit.test_ops_rules", "test_other"}
