"""Commands that only read never migrate: on a ledger one migration behind this meterproxy, `keys list`,
`keys show` and `budgets list` refuse with one line (and status 2); `report`, `export` and `accuracy` read
it as it is through read-only connections. Either way its version and tables stay as they were. Commands
that write (`migrate`, `keys create`) still migrate it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from proxy.cli.main import main
from proxy.ledger import migrations, migrations_postgres
from proxy.ledger.sqlconn import Conn, connect_postgres
from proxy.ledger.target import parse_target
from tests.support.ledger import is_postgres


def _newest(db: str) -> int:
    return len(migrations_postgres.MIGRATIONS if is_postgres(db) else migrations.MIGRATIONS)


def _old_ledger(db: str) -> int:
    """The ledger `db` built by this meterproxy's migrations but the last one; its version."""
    old = _newest(db) - 1
    if is_postgres(db):
        conn = connect_postgres(parse_target(db))
        try:
            assert migrations_postgres.migrate(conn, upto=old) == old
        finally:
            conn.close()
    else:
        raw = sqlite3.connect(db, isolation_level=None)
        try:
            assert migrations.migrate(raw, upto=old) == old
        finally:
            raw.close()
    return old


def _schema(db: str) -> tuple[int, list[str]]:
    """(version, every table and column) of the ledger, read without touching it."""
    if is_postgres(db):
        conn: Conn = connect_postgres(parse_target(db))
        try:
            version = migrations_postgres.schema_version(conn)
            columns = conn.execute("SELECT table_name || '.' || column_name FROM information_schema.columns "
                                   "WHERE table_schema = current_schema() ORDER BY 1").fetchall()
            return version, [c for (c,) in columns]
        finally:
            conn.close()
    raw = sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True)
    try:
        version = migrations.schema_version(raw)
        tables = [t for (t,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        columns = [f"{t}.{c[1]}" for t in tables for c in raw.execute(f'PRAGMA table_info("{t}")')]
        mode = raw.execute("PRAGMA journal_mode").fetchone()[0]
        return version, [*columns, f"journal_mode={mode}"]
    finally:
        raw.close()


@pytest.mark.parametrize("argv", [["keys", "list"], ["keys", "show", "k-none"], ["budgets", "list"]],
                         ids=["keys-list", "keys-show", "budgets-list"])
def test_a_read_command_on_an_older_schema_refuses_and_changes_nothing(
        ledger_target: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    old = _old_ledger(ledger_target)
    before = _schema(ledger_target)
    assert main([*argv, "--db", ledger_target]) == 2
    err = capsys.readouterr().err
    shown = parse_target(ledger_target).shown
    assert err == (f"meterproxy: {shown} is at schema {old}, this meterproxy needs {_newest(ledger_target)}; "
                   "run meterproxy migrate\n")
    assert _schema(ledger_target) == before


@pytest.mark.parametrize("argv", [["report"], ["export"], ["accuracy"]])
def test_report_export_and_accuracy_read_an_older_schema_as_it_is(
        ledger_target: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    _old_ledger(ledger_target)
    before = _schema(ledger_target)
    assert main([*argv, "--db", ledger_target]) == 0
    capsys.readouterr()
    assert _schema(ledger_target) == before


def test_commands_that_write_still_migrate(ledger_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    _old_ledger(ledger_target)
    assert main(["keys", "create", "--db", ledger_target, "--user", "ann"]) == 0
    assert _schema(ledger_target)[0] == _newest(ledger_target)
    assert main(["keys", "list", "--db", ledger_target]) == 0  # current now: read as before
    capsys.readouterr()
