"""Read connections to the ledger: the one way reports, control, the admin API and the UI open it.

`connect_readonly(db)` takes a `--db` value (a SQLite path or a PostgreSQL URL) and returns a `Conn`:
SQLite opened read-only with `decimal_sum` registered, PostgreSQL in read-only transactions. `open_read(db)`
is the same as a context manager (closed at the end of the block); `read_snapshot(conn)` holds one
consistent snapshot over several queries. The writer is `proxy.ledger.writer`.
"""

from __future__ import annotations

import atexit
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from proxy.core.errors import MeterproxyError
from proxy.ledger import picodollars
from proxy.ledger.sqlconn import Conn, connect_postgres, wrap_sqlite
from proxy.ledger.target import Target, parse_target

__all__ = ["ReportDatabaseError", "connect_readonly", "open_read", "read_snapshot"]


class ReportDatabaseError(MeterproxyError):
    """The ledger cannot be read: missing, unreachable, or not a meterproxy ledger."""


def connect_readonly(db: str | os.PathLike[str] | Target) -> Conn:
    """A read-only connection to the ledger `db` (a SQLite path or a PostgreSQL URL).

    Raises ReportDatabaseError, with a one-line message naming the ledger (never its password), when it is
    missing, cannot be reached or is not a meterproxy ledger. A SQLite connection may be used from worker
    threads, one at a time (check_same_thread is off).
    """
    target = db if isinstance(db, Target) else parse_target(db)
    if target.is_postgres:
        return _postgres(target)
    return _sqlite(target)


@contextmanager
def open_read(db: str | os.PathLike[str] | Target) -> Iterator[Conn]:
    """`with open_read(db) as conn:` — connect_readonly, closed when the block ends.

    On PostgreSQL the connection comes from, and goes back to, a few idle ones kept per database (a new one
    costs ~7 ms here: TCP, start-up, settings, the schema check); one that failed, or is not idle when the
    block ends, is closed instead. A database error inside the block (the server went away, a lock timed
    out) is raised as ReportDatabaseError, one line naming the ledger: callers answer it as "the ledger
    cannot be read"."""
    target = db if isinstance(db, Target) else parse_target(db)
    conn = _idle.take(target) if target.is_postgres else None
    if conn is None:
        conn = connect_readonly(target)
    ok = False
    try:
        yield conn
        ok = True
    except conn.Error as exc:
        raise ReportDatabaseError(f"reading ledger {conn.shown} failed: {_first_line(exc)}") from exc
    finally:
        if not (ok and target.is_postgres and _idle.give(target, conn)):
            conn.close_quietly()


class _Idle:
    """Idle PostgreSQL read connections, at most `keep` per database, each checked before it is used again."""

    def __init__(self, keep: int = 4) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._conns: dict[str, list[Conn]] = {}

    def take(self, target: Target) -> Conn | None:
        while True:
            with self._lock:
                found = self._conns.get(target.where)
                if not found:
                    return None
                conn = found.pop()
            try:  # a server restarted meanwhile, or an idle timeout, leaves a dead connection: one round trip
                conn.raw.execute("SELECT 1").fetchone()
                return conn
            except Exception:  # noqa: BLE001 - any failure: this one goes, the next or a new one serves
                conn.close_quietly()

    def give(self, target: Target, conn: Conn) -> bool:
        """Keep `conn` for the next reader of `target`; False if it is not reusable (then the caller closes it)."""
        try:
            if conn.raw.closed or conn.raw.broken or conn.in_transaction:
                return False
        except Exception:  # noqa: BLE001
            return False
        with self._lock:
            kept = self._conns.setdefault(target.where, [])
            if len(kept) >= self._keep:
                return False
            kept.append(conn)
            return True


    def close_all(self) -> None:
        with self._lock:
            conns = [c for kept in self._conns.values() for c in kept]
            self._conns.clear()
        for conn in conns:
            conn.close_quietly()


_idle = _Idle()
atexit.register(_idle.close_all)  # closed, not left to the collector (which warns of open connections)


@contextmanager
def read_snapshot(conn: Conn) -> Iterator[Conn]:
    """Every query in the block sees one snapshot (a batch committed meanwhile is seen whole or not at all).

    Inside a transaction the caller already holds, the block joins it and leaves it open."""
    if conn.in_transaction:
        yield conn
        return
    # PostgreSQL's default READ COMMITTED takes a snapshot per statement; REPEATABLE READ keeps one.
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if conn.is_postgres else "BEGIN")
    try:
        yield conn
    finally:
        conn.rollback()


def _sqlite(target: Target) -> Conn:
    shown = target.shown
    file = Path(target.where)
    if not file.is_file():
        raise ReportDatabaseError(f"no ledger at {shown}: file not found")
    uri = file.resolve().as_uri() + "?mode=ro"
    try:
        raw = sqlite3.connect(uri, uri=True, timeout=5.0, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise ReportDatabaseError(f"cannot open ledger {shown}: {exc}") from exc
    try:
        version = raw.execute("PRAGMA user_version").fetchone()[0]
        has_calls = raw.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'calls'").fetchone()
    except sqlite3.Error as exc:
        raw.close()
        raise ReportDatabaseError(f"cannot read ledger {shown}: {exc}") from exc
    if version < 1 or has_calls is None:
        raw.close()
        raise ReportDatabaseError(f"{shown} is not a meterproxy ledger")
    picodollars.register_functions(raw)
    return wrap_sqlite(raw, shown)


def _postgres(target: Target) -> Conn:
    from proxy.ledger import migrations_postgres

    try:
        conn = connect_postgres(target, application_name="meterproxy-read", read_only=True)
    except Exception as exc:  # psycopg.Error; libpq's message never carries the password
        raise ReportDatabaseError(f"cannot reach ledger {target.shown}: {_first_line(exc)}") from exc
    try:
        version = migrations_postgres.schema_version(conn)
    except conn.Error as exc:
        conn.close()
        raise ReportDatabaseError(f"cannot read ledger {target.shown}: {_first_line(exc)}") from exc
    if version < 1:
        conn.close()
        raise ReportDatabaseError(f"{target.shown} is not a meterproxy ledger (no meterproxy schema in it)")
    return conn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
