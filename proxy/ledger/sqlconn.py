"""One database connection, SQLite or PostgreSQL, behind one small interface: the storage seam's base.

Storage modules write SQL once, in SQLite's spelling with `?` placeholders, in the subset both engines
speak (`INSERT … ON CONFLICT`, `CASE`, `FILTER (WHERE …)`, `RETURNING`); `Conn` runs it on either driver,
turning placeholders into psycopg's `%s` on PostgreSQL. What cannot be shared is chosen by
`conn.dialect` ("sqlite" or "postgres") in the storage module that needs it, next to the SQL it changes.

Transactions are explicit on both: `with conn.transaction(): ...` (or `begin()` / `commit()` /
`rollback()`). SQLite's write transactions take the write lock up front (`BEGIN IMMEDIATE`); PostgreSQL's
are plain `BEGIN` (row locks are taken by the statements). Outside a transaction every statement commits
on its own, on both (SQLite `isolation_level=None`, psycopg `autocommit=True`).

Errors: `conn.Error`, `conn.IntegrityError`, `conn.OperationalError` are the driver's classes, so a storage
module catches `conn.IntegrityError` without importing either driver.

The driver is psycopg 3 (sync), not asyncpg: meterproxy's storage already runs on worker threads (one
writer thread, the control store's threads, reports in `asyncio.to_thread`), psycopg speaks the same
DB-API as sqlite3 so one SQL text serves both engines, and measured on this machine it is as fast
(docs/architecture.md, "Storage").
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Protocol

from proxy.ledger.target import Target

__all__ = ["Conn", "Cursor", "connect_postgres", "pg_sql", "unreachable", "wrap_sqlite"]

Dialect = Literal["sqlite", "postgres"]


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn:
    """See the module docstring. Not thread-safe: one thread at a time, as the drivers require."""

    def __init__(self, raw: Any, dialect: Dialect, shown: str) -> None:
        self.raw = raw
        self.dialect: Dialect = dialect
        self.shown = shown  # for messages: a path, or a URL without its password
        if dialect == "postgres":
            import psycopg

            self.Error: type[Exception] = psycopg.Error
            self.IntegrityError: type[Exception] = psycopg.IntegrityError
            self.OperationalError: type[Exception] = psycopg.OperationalError
        else:
            self.Error = sqlite3.Error
            self.IntegrityError = sqlite3.IntegrityError
            self.OperationalError = sqlite3.OperationalError

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgres"

    # --- statements ------------------------------------------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        if self.dialect == "postgres":
            return self.raw.execute(pg_sql(sql), params)  # type: ignore[no-any-return]
        return self.raw.execute(sql, params)  # type: ignore[no-any-return]

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        if self.dialect == "postgres":
            with self.raw.cursor() as cur:
                cur.executemany(pg_sql(sql), rows)  # pipelined by psycopg: one round trip per batch
            return
        self.raw.executemany(sql, rows)

    # --- transactions ----------------------------------------------------------------------------
    @property
    def in_transaction(self) -> bool:
        if self.dialect == "postgres":
            from psycopg.pq import TransactionStatus

            return bool(self.raw.info.transaction_status != TransactionStatus.IDLE)
        return bool(self.raw.in_transaction)

    def begin(self, write: bool = True) -> None:
        if self.dialect == "postgres":
            self.raw.execute("BEGIN")
        else:
            self.raw.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def commit(self) -> None:
        self.raw.execute("COMMIT")

    def rollback(self) -> None:
        """Roll back the open transaction, if any (safe to call when none is open)."""
        if self.in_transaction:
            self.raw.execute("ROLLBACK")

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Conn]:
        """All of the block commits, or none of it (rolled back, the exception raised)."""
        self.begin(write)
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        self.commit()

    def close(self) -> None:
        self.raw.close()

    def close_quietly(self) -> None:
        """Close a connection that may already be broken (nothing is left to close then)."""
        try:
            self.raw.close()
        except Exception:  # noqa: BLE001 - a broken connection has nothing to release
            pass

    @property
    def closed(self) -> bool:
        if self.dialect == "postgres":
            return bool(self.raw.closed)
        try:
            self.raw.execute("SELECT 1")
        except sqlite3.ProgrammingError:
            return True
        return False


def wrap_sqlite(conn: sqlite3.Connection, shown: str = "") -> Conn:
    """A `Conn` over an open sqlite3 connection (opened with isolation_level=None)."""
    return Conn(conn, "sqlite", shown)


def connect_postgres(target: Target, *, application_name: str = "meterproxy", connect_timeout: float = 5.0,
                     read_only: bool = False) -> Conn:
    """A new autocommit connection to the PostgreSQL database of `target`.

    Raises `psycopg.OperationalError` (as `conn.OperationalError`) when the server cannot be reached; its
    message is libpq's, which never carries the password.
    """
    import psycopg

    # Keepalives and a TCP user timeout: a peer that vanished (host down, network cut without a reset) is
    # found within about half a minute on an idle or a sending connection, instead of TCP's many minutes.
    # The ledger's writes have their own, shorter bound (Ledger write_timeout).
    raw = psycopg.connect(target.where, autocommit=True, application_name=application_name,
                          connect_timeout=max(1, int(connect_timeout)), keepalives=1, keepalives_idle=10,
                          keepalives_interval=5, keepalives_count=3, tcp_user_timeout=30_000)
    try:
        raw.execute("SET TIME ZONE 'UTC'")
        if read_only:
            raw.execute("SET default_transaction_read_only = on")
    except BaseException:
        raw.close()
        raise
    return Conn(raw, "postgres", target.shown)


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says a PostgreSQL server could not be reached at all (refused, timed out, no route),
    as opposed to a server that answered and refused (a failed login, no such database, a failed
    migration): an answer from the server carries a SQLSTATE, a connection that failed has none."""
    import psycopg

    if not isinstance(exc, psycopg.OperationalError) or getattr(exc, "sqlstate", None):
        return False
    text = str(exc)
    return not any(word in text for word in ("FATAL", "authentication", "password", "does not exist"))


@functools.lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """SQLite's spelling for psycopg: `?` outside quotes becomes `%s`, a literal `%` becomes `%%`."""
    out: list[str] = []
    quote: str | None = None
    for ch in sql:
        if quote is not None:
            if ch == quote:
                quote = None
            out.append("%%" if ch == "%" else ch)
        elif ch in ("'", '"'):
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
    return "".join(out)
