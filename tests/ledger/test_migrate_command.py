"""`meterproxy migrate`: either backend migrated and its version printed; an unreachable server is one line."""

from __future__ import annotations

import socket

import pytest

from proxy.cli.main import main
from proxy.ledger import migrations, migrations_postgres
from tests.support.ledger import connect, is_postgres


def test_migrate_creates_the_schema_and_says_its_version(ledger_target: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    newest = len(migrations_postgres.MIGRATIONS if is_postgres(ledger_target) else migrations.MIGRATIONS)
    for _ in range(2):  # the second run finds it current
        assert main(["migrate", "--db", ledger_target]) == 0
        out = capsys.readouterr().out
        assert out.endswith(f": schema version {newest}\n") and out.count("\n") == 1
    conn = connect(ledger_target, functions=False)
    try:
        assert conn.execute("SELECT count(*) FROM calls").fetchone()[0] == 0
        assert conn.execute("SELECT covered_id FROM rollup_state").fetchone()[0] == 0
    finally:
        conn.close()


def test_an_unreachable_server_is_one_line_without_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["migrate", "--db", f"postgresql://meter:hunter2-secret@127.0.0.1:{port}/ledger"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"meterproxy: cannot connect to postgresql://meter:***@127.0.0.1:{port}/ledger: ")
    assert err.count("\n") == 1 and "hunter2" not in err and "Traceback" not in err


def test_a_sqlite_path_in_a_missing_directory_is_one_line(tmp_path: object,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--db", f"{tmp_path}/no/such/dir/l.db"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meterproxy: database ") and "does not exist" in err and err.count("\n") == 1
