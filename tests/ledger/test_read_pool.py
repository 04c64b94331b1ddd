"""PostgreSQL read connections are kept idle between reads (a new one costs ~7 ms) and checked before
they are used again: one the server dropped meanwhile is replaced, never handed to a report."""

from __future__ import annotations

import pytest

from proxy.ledger import migrations_postgres
from proxy.ledger.read import ReportDatabaseError, open_read
from proxy.ledger.sqlconn import connect_postgres
from proxy.ledger.target import parse_target
from tests.support.ledger import connect


@pytest.fixture
def target(pg_url: str):  # type: ignore[no-untyped-def]
    target = parse_target(pg_url)
    conn = connect_postgres(target)
    migrations_postgres.migrate(conn)
    conn.close()
    return target


def backend(target) -> int:  # type: ignore[no-untyped-def]
    with open_read(target) as conn:
        return int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])


def test_a_read_connection_is_used_again(target) -> None:  # type: ignore[no-untyped-def]
    assert backend(target) == backend(target)


def test_a_connection_the_server_dropped_is_replaced_not_used(target, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    first = backend(target)
    admin = connect(pg_url)
    try:
        assert admin.execute("SELECT pg_terminate_backend(?)", (first,)).fetchone()[0]
    finally:
        admin.close()
    with open_read(target) as conn:  # the dead one is found out before the block, not inside it
        assert conn.execute("SELECT count(*) FROM calls").fetchone()[0] == 0
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != first


def test_a_connection_whose_read_failed_is_not_kept(target) -> None:  # type: ignore[no-untyped-def]
    first = backend(target)
    with pytest.raises(ReportDatabaseError, match="reading ledger .* failed"):
        with open_read(target) as conn:
            conn.execute("SELECT * FROM no_such_table")
    assert backend(target) != first
