"""Ledgers for report tests on either backend: rows written straight into `calls` (no rollups: raw-path
reports), into a SQLite file or a PostgreSQL schema after its migrations."""

from __future__ import annotations

from pathlib import Path

from proxy.core.record import CallRecord
from proxy.ledger import migrations_postgres
from proxy.ledger.db import INSERT_SQL
from proxy.ledger.sqlconn import connect_postgres
from proxy.ledger.target import parse_target
from proxy.ledger.writer import record_row
from tests.support.ledger import write_calls


def write_target(target: str, calls: list[CallRecord]) -> str:
    """`calls` written into the ledger `target` (a SQLite path or a PostgreSQL URL), created if need be."""
    parsed = parse_target(target)
    if not parsed.is_postgres:
        write_calls(Path(target), calls)
        return target
    conn = connect_postgres(parsed)
    try:
        migrations_postgres.migrate(conn)
        with conn.transaction():
            conn.executemany(INSERT_SQL, [record_row(c) for c in calls])
    finally:
        conn.close()
    return target
