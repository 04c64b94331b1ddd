"""The ledger's write connection: plain, blocking sqlite3, used from the ledger writer's one thread.

Each method is one round trip from the event loop: a whole batch is inserted, extended by the registered
`after_insert` hooks (rollups, in the same transaction) and committed in a single call, so the writer wakes
the loop once per batch. Every failure rolls the transaction back before it is raised: a failed batch is
never committed later by accident. A database file (or its WAL) deleted or replaced under the proxy is
noticed before a batch, and opened anew; and after each commit, so that a batch that went into the file
being deleted while it ran is written again into the new one, before anyone is told it is committed.

Never called from the event loop itself (it blocks on fsync), never from two threads at once.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from typing import Any, Callable

from .migrations import create_private, migrate

log = logging.getLogger("meterproxy.ledger")

Row = tuple[Any, ...]
AfterInsert = Callable[[sqlite3.Connection, list[Row]], None]

COLUMNS: tuple[str, ...] = (
    "request_id", "started_at", "ended_at", "key_id", "key_hint", "user", "session", "operation",
    "tags", "method", "endpoint", "requested_model", "model", "stream", "status", "error",
    "latency_ms", "ttfb_ms", "prompt_tokens", "completion_tokens", "cached_tokens",
    "reasoning_tokens", "total_tokens", "usage_source", "priced", "cost_usd",
    "approximate", "lower_bound", "usage_note", "counted_prompt_tokens", "counted_completion_tokens",
    "audio_prompt_tokens", "audio_completion_tokens", "service_tier", "pricing_version", "original_cost_usd",
    "repriced_at",
)  # fmt: skip
INSERT_SQL = "INSERT INTO calls ({}) VALUES ({})".format(
    ", ".join(f'"{c}"' for c in COLUMNS), ", ".join("?" * len(COLUMNS))
)


class LedgerDB:
    def __init__(self, path: str, busy_timeout_ms: int) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[tuple[int, int] | None, tuple[int, int] | None] | None = None
        self.after_insert: list[AfterInsert] = []
        self.on_open: list[Callable[[sqlite3.Connection], Any]] = []  # after migrations, before any batch

    def open(self) -> None:
        """Create or migrate the file and open the write connection (WAL, synchronous=FULL)."""
        create_private(self.path)
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_ms / 1000, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.DatabaseError(f"journal_mode is {mode!r}, WAL is required (is it a file?)")
            conn.execute("PRAGMA synchronous = FULL")
            migrate(conn)
            for hook in self.on_open:
                hook(conn)
            self._identity = self._files()
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _files(self) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """Which database file and WAL the open connection writes to (SQLite keeps both open)."""
        return file_identity(self.path), file_identity(self.path + "-wal")

    def _moved(self) -> bool:
        files = self._files()
        if files == self._identity and files[0] is not None:
            return False
        if self._identity is not None and self._identity[1] is None and files[0] == self._identity[0] is not None:
            self._identity = files  # the WAL made after the open: the one this connection writes to
            return False
        return True

    def _current(self) -> sqlite3.Connection:
        if self._conn is None or self._moved():
            if self._conn is not None:
                log.warning("ledger %s: the database file was deleted or replaced; opening it anew", self.path)
            self.close()
            self.open()
        assert self._conn is not None
        return self._conn

    def _transaction(self, rows: list[Row], skip_present: bool = False) -> None:
        conn = self._current()
        conn.execute("BEGIN IMMEDIATE")
        try:
            fresh = _absent(conn, rows) if skip_present else rows
            conn.executemany(INSERT_SQL, fresh)
            for hook in self.after_insert:
                hook(conn, fresh)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        if self._moved():
            # Deleted or replaced while the batch ran: it may have gone into the file that is gone. Written
            # again into the file now at the path (rows it holds already are skipped), then it counts.
            log.warning("ledger %s: the database file was deleted or replaced during a write; the batch is "
                        "written again into the new one", self.path)
            self._transaction(rows, skip_present=True)

    def insert(self, rows: list[Row]) -> None:
        """All rows in one committed transaction, or none (the exception says why)."""
        self._transaction(rows)

    def insert_each(self, rows: list[Row]) -> list[BaseException | None]:
        """The rows one statement each, in one transaction: a row that breaks a constraint is left out
        (its error returned in its place), the rest commit."""
        conn = self._current()
        outcome: list[BaseException | None] = []
        good: list[Row] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for row in rows:
                try:
                    conn.execute(INSERT_SQL, row)
                    outcome.append(None)
                    good.append(row)
                except sqlite3.IntegrityError as exc:  # aborts the statement, not the transaction
                    outcome.append(exc)
            for hook in self.after_insert:
                hook(conn, good)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        if self._moved():
            self._transaction(good, skip_present=True)  # as in _transaction: written again into the new file
        return outcome

    def replay(self, rows: list[Row], busy_timeout_ms: int | None = None) -> None:
        """Spooled rows, skipping those already committed (a replay repeated after a crash); with none, a
        probe that the database takes writes at all. `busy_timeout_ms`: how long this attempt waits for a
        lock held elsewhere (the writer retries it later, rather than hold up the rows behind it)."""
        conn = self._current()
        if busy_timeout_ms is not None:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        try:
            if rows:
                self._transaction(rows, skip_present=True)
                return
            self._probe(commit=True)
        finally:
            if busy_timeout_ms is not None and self._conn is not None:
                self._conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")

    def refuses_writes(self) -> str | None:
        """Why the database would refuse a write now (a read-only file, say), or None; writes nothing."""
        try:
            self._probe(commit=False)
        except sqlite3.Error as exc:
            return str(exc)
        return None

    def _probe(self, commit: bool) -> None:
        conn = self._current()
        conn.execute("BEGIN IMMEDIATE")
        try:
            # The value itself, not `= user_version`: SQLite reads a name there as 0 and would reset it.
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            conn.execute(f"PRAGMA user_version = {int(version)}")
            conn.execute("COMMIT" if commit else "ROLLBACK")
        except BaseException:
            _rollback(conn)
            raise


def _absent(conn: sqlite3.Connection, rows: list[Row]) -> list[Row]:
    """The rows whose request_id (column 0) is not in the ledger yet, so hooks see each row once."""
    present: set[str] = set()
    for i in range(0, len(rows), 500):
        ids = [row[0] for row in rows[i:i + 500]]
        sql = f"SELECT request_id FROM calls WHERE request_id IN ({', '.join('?' * len(ids))})"
        present.update(r[0] for r in conn.execute(sql, ids))
    fresh, seen = [], set()
    for row in rows:
        if row[0] not in present and row[0] not in seen:
            seen.add(row[0])
            fresh.append(row)
    return fresh


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
