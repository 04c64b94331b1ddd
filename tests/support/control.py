"""Test support for the control tables on either backend: another process's statement, the stored bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from proxy.ledger import control_store
from proxy.ledger.target import parse_target


def other_process(db: str, sql: str, params: Sequence[Any] = ()) -> int:
    """Run one statement on a connection of its own (as the CLI or another replica would); its rowcount."""
    conn = control_store.connect(parse_target(db))
    try:
        return conn.execute(sql, params).rowcount
    finally:
        conn.close()


def query(db: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    conn = control_store.connect(parse_target(db))
    try:
        return [tuple(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


def stored_bytes(db: str) -> bytes:
    """Everything the control tables hold, as bytes: SQLite's file and WAL, or PostgreSQL's rows as text."""
    target = parse_target(db)
    if not target.is_postgres:
        wal = Path(db + "-wal")
        return Path(db).read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    rows = query(db, "SELECT k::text FROM api_keys k UNION ALL SELECT l::text FROM subject_limits l")
    return "\n".join(row[0] for row in rows).encode()
