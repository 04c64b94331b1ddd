"""The storage seam: no SQL statement text is left in reports/, ui/ or metering/ (it lives in proxy/ledger/)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import proxy

ROOT = Path(proxy.__file__).parent
# Statements as this code base spells them (keywords in capitals), anywhere in a literal or f-string part.
SQL = re.compile(r"\b(SELECT\s|INSERT\s+INTO\b|UPDATE\s+\S+\s+SET\b|DELETE\s+FROM\b|PRAGMA\s|BEGIN\b|ROLLBACK\b)")


def sql_literals(path: Path) -> list[tuple[int, str]]:
    """String constants (f-string parts included) that start like an SQL statement."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
            found.append((node.lineno, node.value[:60]))
    return found


@pytest.mark.parametrize("package", ["reports", "ui", "metering"])
def test_no_sql_strings_outside_the_storage_modules(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    found = {f"{path.relative_to(ROOT)}:{line}": text for path in files for line, text in sql_literals(path)}
    assert not found, f"SQL text outside proxy/ledger/: {found}"


def test_the_scan_finds_sql() -> None:
    # The scan itself: it sees plain strings and f-string parts, and passes prose.
    assert SQL.search("SELECT 1") and SQL.search(" FROM calls; UPDATE rollup_state SET covered_id = 0")
    assert SQL.search("(SELECT min(a) FROM b)") and SQL.search("INSERT INTO calls")
    assert not SQL.search("Selected calls") and not SQL.search("update the key") and not SQL.search("SELECTED")
    assert sql_literals(ROOT / "ledger" / "report_sql.py")
