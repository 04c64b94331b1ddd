"""The replicas table: one row per running proxy (its heartbeat), on SQLite or PostgreSQL.

Each proxy process upserts its row every `heartbeat_interval` seconds (`beat`) and deletes it when it stops
cleanly (`remove`); a replica killed outright keeps its row, shown as not alive once it is 3 intervals old,
and dropped by the next live replica's beat after `FORGET_AFTER` seconds. All the SQL of the table is here.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.ledger.read import ReportDatabaseError, connect_readonly
from proxy.ledger.sqlconn import Conn, connect_postgres, wrap_sqlite
from proxy.ledger.target import parse_target

__all__ = ["ALIVE_INTERVALS", "FORGET_AFTER", "Replica", "beat", "driver_errors", "list_replicas", "open_conn",
           "remove"]

ALIVE_INTERVALS = 3  # a replica seen within 3 of its intervals is alive
FORGET_AFTER = 86400.0  # a row not seen for a day is deleted (a replica that was killed, not stopped)

_COLUMNS = "id, host, pid, version, pricing_version, started_at, seen_at, interval_s"


@dataclass(frozen=True)
class Replica:
    id: str
    host: str
    pid: int
    version: str
    pricing_version: str | None
    started_at: float
    seen_at: float
    interval_s: float

    def alive(self, now: float) -> bool:
        return now - self.seen_at <= ALIVE_INTERVALS * self.interval_s


def driver_errors() -> tuple[type[Exception], ...]:
    """What opening or reading the table raises when the database is down, missing or unreadable."""
    import psycopg

    return (sqlite3.Error, psycopg.Error, ReportDatabaseError, OSError)


def open_conn(db: str, *, read_only: bool = False, busy_timeout: float = 5.0) -> Conn:
    """A connection to the ledger `db` (a SQLite path or a PostgreSQL URL) for the replicas table.

    Raises the driver's error (`sqlite3.Error`, `psycopg.Error`) or `ReportDatabaseError` (a SQLite file
    that is missing or not a ledger, when read-only)."""
    target = parse_target(db)
    if target.is_postgres:
        return connect_postgres(target, application_name="meterproxy-replicas", read_only=read_only,
                                connect_timeout=busy_timeout)
    if read_only:
        return connect_readonly(target)
    # mode=rw: never create the file (the ledger does that, with its mode and its migrations)
    uri = Path(target.where).resolve().as_uri() + "?mode=rw"
    raw = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    return wrap_sqlite(raw, target.shown)


def beat(conn: Conn, replica: Replica) -> None:
    """Insert or refresh `replica`'s row (and forget rows not seen for FORGET_AFTER seconds)."""
    with conn.transaction():
        conn.execute(
            f"INSERT INTO replicas ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "pricing_version = excluded.pricing_version, seen_at = excluded.seen_at, "
            "interval_s = excluded.interval_s",
            (replica.id, replica.host, replica.pid, replica.version, replica.pricing_version,
             replica.started_at, replica.seen_at, replica.interval_s))
        conn.execute("DELETE FROM replicas WHERE seen_at < ?", (replica.seen_at - FORGET_AFTER,))


def remove(conn: Conn, replica_id: str) -> None:
    conn.execute("DELETE FROM replicas WHERE id = ?", (replica_id,))


def list_replicas(conn: Conn) -> list[Replica]:
    """Every row, the most recently started first."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM replicas ORDER BY started_at DESC, id").fetchall()
    return [_replica(row) for row in rows]


def _replica(row: Any) -> Replica:
    rid, host, pid, version, pricing, started, seen, interval = row
    return Replica(str(rid), str(host), int(pid), str(version), None if pricing is None else str(pricing),
                   float(started), float(seen), float(interval))
