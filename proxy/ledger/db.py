"""The ledger's write connection, SQLite or PostgreSQL, used from the ledger writer's one thread.

Each method is one round trip from the event loop: a whole batch is inserted, extended by the registered
`after_insert` hooks (rollups, in the same transaction) and committed in a single call, so the writer wakes
the loop once per batch. Every failure rolls the transaction back before it is raised: a failed batch is
never committed later by accident; `insert` returns only once the batch is committed (SQLite
synchronous=FULL; PostgreSQL synchronous_commit as the server has it, `on` by default).

SQLite: a database file (or its WAL) deleted or replaced under the proxy is noticed before a batch, and
opened anew; and after each commit, so that a batch that went into the file being deleted while it ran is
written again into the new one, before anyone is told it is committed. PostgreSQL: a broken connection is
opened anew before the next batch; `insert_each` isolates a bad row with a SAVEPOINT per row (an error
aborts a PostgreSQL transaction); every write transaction takes the ledger's write lock first
(`rollups.lock_ledger`), as SQLite's BEGIN IMMEDIATE does, so replicas' batches commit one at a time and
`rollup_state.covered_id` stays right (see rollups.py).

Never called from the event loop itself (it blocks on the commit), never from two threads at once.
"""

from __future__ import annotations

import logging
import operator
import os
import socket
import sqlite3
from typing import Any, Callable, Protocol

from proxy.core.errors import MeterproxyError
from proxy.ledger.migrations import create_private, migrate
from proxy.ledger.sqlconn import Conn, connect_postgres, unreachable, wrap_sqlite
from proxy.ledger.target import Target, parse_target

log = logging.getLogger("meterproxy.ledger")

Row = tuple[Any, ...]


class AfterInsert(Protocol):
    """What runs in each batch's transaction once its rows are in (rollups, shared spend): `hook(conn, rows)`."""

    def __call__(self, conn: Conn, rows: list[Row], /) -> None: ...


Answer = tuple[Any, ...]


class TwoPhase:
    """An after_insert hook that needs to know something of the database first (the rollups' state): on
    PostgreSQL its `prelude` (one SELECT, one row, no parameters) is a statement prepared once per
    connection (`meterproxy_<name>`) and executed in the batch's first round trip, with BEGIN and the
    write lock; its answer is handed to `run`, so the hook's own statements need no answer and ride with
    the COMMIT. Called without an answer (SQLite, copy-ledger, one row at a time), `run` is given None and
    asks for itself. The prelude runs after the lock: under it, what it reads is what the hook would have
    read later in the transaction."""

    def __init__(self, name: str, prelude: str, run: Callable[[Conn, list[Row], Answer | None], None]) -> None:
        self.name, self.prelude, self.run = f"meterproxy_{name}", prelude, run
        self.__doc__ = run.__doc__

    def __call__(self, conn: Conn, rows: list[Row], /, answer: Answer | None = None) -> None:
        self.run(conn, rows, answer)


# A prepared statement that is gone (deallocated by anyone sharing the session) or stale (a migration changed
# what it returns).
_STALE_STATEMENT = frozenset(("26000", "0A000"))


OnOpen = Callable[[Conn], Any]
COLUMNS: tuple[str, ...] = (
    "request_id", "started_at", "ended_at", "key_id", "key_hint", "user", "session", "operation",
    "tags", "method", "endpoint", "requested_model", "model", "stream", "status", "error",
    "latency_ms", "ttfb_ms", "prompt_tokens", "completion_tokens", "cached_tokens",
    "reasoning_tokens", "total_tokens", "usage_source", "priced", "cost_usd",
    "approximate", "lower_bound", "usage_note", "counted_prompt_tokens", "counted_completion_tokens",
    "audio_prompt_tokens", "audio_completion_tokens", "service_tier", "pricing_version", "original_cost_usd",
    "repriced_at",
)  # fmt: skip
# The columns that hold text, and integers, when a row is as record_row makes it.
TEXT_COLUMNS = frozenset((
    "request_id", "key_id", "key_hint", "user", "session", "operation", "tags", "method", "endpoint",
    "requested_model", "model", "error", "usage_source", "cost_usd", "usage_note", "service_tier",
    "pricing_version", "original_cost_usd",
))  # fmt: skip
INT_COLUMNS = frozenset((
    "stream", "status", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
    "total_tokens", "priced", "approximate", "lower_bound", "counted_prompt_tokens", "counted_completion_tokens",
    "audio_prompt_tokens", "audio_completion_tokens",
))  # fmt: skip
_TEXT_AT = operator.itemgetter(*(i for i, c in enumerate(COLUMNS) if c in TEXT_COLUMNS))


def row_text(row: Row) -> str | None:
    """The row's text columns joined (one C call instead of a look at each value); None when one of them
    holds something other than text or NULL, so the caller looks at each value instead."""
    try:
        return "".join(filter(None, _TEXT_AT(row)))
    except TypeError:
        return None


COPY_SQL = "COPY calls ({}) FROM STDIN".format(", ".join(f'"{c}"' for c in COLUMNS))
INSERT_SQL = "INSERT INTO calls ({}) VALUES ({})".format(
    ", ".join(f'"{c}"' for c in COLUMNS), ", ".join("?" * len(COLUMNS))
)


class WritesRefused(MeterproxyError):
    """PostgreSQL would refuse a write: a read-only server, session or role (the message says which)."""


def lock_ledger(conn: Conn) -> None:
    """Take the ledger's write lock for the open transaction (PostgreSQL; on SQLite BEGIN IMMEDIATE has it).

    SHARE ROW EXCLUSIVE on `calls` conflicts with itself and with every INSERT, UPDATE and DELETE of calls:
    the batches of every replica, and the upkeep, commit one at a time, and a plain INSERT by another tool
    is either committed and visible, or waits until this transaction has committed. Readers never wait."""
    if conn.dialect == "postgres":
        conn.execute(LOCK_SQL)


LOCK_SQL = "LOCK TABLE calls IN SHARE ROW EXCLUSIVE MODE"


class LedgerDB:
    def __init__(self, target: Target | str | os.PathLike[str], busy_timeout_ms: int) -> None:
        self.target = target if isinstance(target, Target) else parse_target(target)
        self.path = self.target.shown  # for messages: the SQLite path, or the URL without its password
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: Conn | None = None
        self._prepared: set[str] = set()  # TwoPhase preludes prepared on the open connection
        self._identity: tuple[tuple[int, int] | None, tuple[int, int] | None] | None = None
        self.after_insert: list[AfterInsert] = []
        self.on_open: list[OnOpen] = []  # after migrations, before any batch
        if self.target.is_postgres:
            import psycopg

            self.IntegrityError: type[Exception] = psycopg.IntegrityError
            self.Error: type[Exception] = psycopg.Error
        else:
            self.IntegrityError = sqlite3.IntegrityError
            self.Error = sqlite3.Error

    @property
    def is_postgres(self) -> bool:
        return self.target.is_postgres

    def open(self) -> None:
        """Create or migrate the database and open the write connection (SQLite: WAL, synchronous=FULL)."""
        conn = self._open_postgres() if self.is_postgres else self._open_sqlite()
        try:
            for hook in self.on_open:
                hook(conn)
            if not self.is_postgres:
                self._identity = self._files()
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._prepared = set()

    def _open_sqlite(self) -> Conn:
        path = self.target.where
        create_private(path)
        raw = sqlite3.connect(path, timeout=self._busy_timeout_ms / 1000, isolation_level=None,
                              check_same_thread=False)
        try:
            raw.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            mode = raw.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.DatabaseError(f"journal_mode is {mode!r}, WAL is required (is it a file?)")
            raw.execute("PRAGMA synchronous = FULL")
            migrate(raw)
        except BaseException:
            raw.close()
            raise
        return wrap_sqlite(raw, self.path)

    def _open_postgres(self) -> Conn:
        from proxy.ledger import migrations_postgres

        # Short: while the server is away, each reconnect attempt holds the writer thread (and the spool
        # appends queued behind it) for up to this long. libpq's least is 2 seconds.
        conn = connect_postgres(self.target, application_name="meterproxy-ledger",
                                connect_timeout=min(2.0, max(1.0, self._busy_timeout_ms / 1000)))
        try:
            # A write waits this long for the ledger's write lock (another replica's batch), as SQLite's
            # busy timeout: then the batch goes to the spool rather than hold every call up.
            conn.execute(f"SET lock_timeout = {int(self._busy_timeout_ms)}")
            # A current schema is left alone (no write, no lock): a read-only server still opens, and then
            # says so through refuses_writes, as a read-only SQLite file does.
            if migrations_postgres.schema_version(conn) != len(migrations_postgres.MIGRATIONS):
                migrations_postgres.migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _files(self) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """Which database file and WAL the open connection writes to (SQLite keeps both open)."""
        return file_identity(self.target.where), file_identity(self.target.where + "-wal")

    def _moved(self) -> bool:
        if self.is_postgres:
            return False
        files = self._files()
        if files == self._identity and files[0] is not None:
            return False
        if self._identity is not None and self._identity[1] is None and files[0] == self._identity[0] is not None:
            self._identity = files  # the WAL made after the open: the one this connection writes to
            return False
        return True

    def _broken(self) -> bool:
        assert self._conn is not None
        return self.is_postgres and bool(self._conn.raw.closed or self._conn.raw.broken)

    def _current(self) -> Conn:
        if self._conn is None or self._broken() or self._moved():
            if self._conn is not None:
                if self.is_postgres:
                    log.warning("ledger %s: the connection was lost; connecting again", self.path)
                else:
                    log.warning("ledger %s: the database file was deleted or replaced; opening it anew",
                                self.path)
            self.close()
            self.open()
        assert self._conn is not None
        return self._conn

    def _prepare(self, conn: Conn, hooks: list[TwoPhase]) -> None:
        """Prepare the preludes of `hooks` on the write connection, once per connection."""
        missing = [hook for hook in hooks if hook.name not in self._prepared]
        if not missing:
            return
        there = {name for (name,) in conn.raw.execute("SELECT name FROM pg_prepared_statements")}
        for hook in missing:
            if hook.name in there:
                conn.raw.execute(f"DEALLOCATE {hook.name}")
            conn.raw.execute(f"PREPARE {hook.name} AS {hook.prelude}")
            self._prepared.add(hook.name)

    def _begin_postgres(self, conn: Conn, lock_timeout_ms: int | None) -> list[Answer | None]:
        """BEGIN, the write lock and the preludes of the TwoPhase hooks, in one round trip; their answers in
        the order of after_insert (None for the other hooks)."""
        timeout = "" if lock_timeout_ms is None else f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}; "
        asks = [hook for hook in self.after_insert if isinstance(hook, TwoPhase)]
        sql = f"BEGIN; {timeout}{LOCK_SQL}" + "".join(f"; EXECUTE {hook.name}" for hook in asks)
        for attempt in (1, 2):
            self._prepare(conn, asks)
            try:
                cur = conn.raw.execute(sql)
                break
            except self.Error as exc:
                if getattr(exc, "sqlstate", None) not in _STALE_STATEMENT:
                    raise  # a lock timeout, a broken connection (opened anew, and prepared, before the next)
                self._prepared.clear()  # prepared again before the retry, or the next batch
                if attempt == 2:
                    raise
                _rollback(conn)
        found: list[Answer] = []
        while True:
            if cur.pgresult is not None and cur.pgresult.nfields:  # a SELECT's (`description` costs more)
                row = cur.fetchone()
                found.append(tuple(row) if row is not None else ())
            if not cur.nextset():
                break
        answers = iter(found)
        return [next(answers) if isinstance(hook, TwoPhase) else None for hook in self.after_insert]

    def _transaction(self, rows: list[Row], skip_present: bool = False, lock_timeout_ms: int | None = None) -> None:
        conn = self._current()
        if conn.dialect == "postgres":
            rows = [_pg_row(row) for row in rows]
        hooks = self.after_insert
        answers: list[Answer | None] = []
        if conn.dialect == "postgres":
            # Round trips, not rows, are most of a small batch's time on PostgreSQL: BEGIN, the lock and what
            # the hooks need to know go in one, the hooks' statements ride together (they need no answer
            # unless a new dimension set is added) with the COMMIT.
            answers = self._begin_postgres(conn, lock_timeout_ms)
        else:
            conn.begin()
        try:
            fresh = _absent(conn, rows) if skip_present else rows
            _insert_rows(conn, fresh)
            if conn.dialect == "postgres":
                with conn.raw.pipeline():
                    for hook, answer in zip(hooks, answers):
                        if isinstance(hook, TwoPhase):
                            hook(conn, fresh, answer=answer)
                        else:
                            hook(conn, fresh)
                    conn.commit()
            else:
                for hook in self.after_insert:
                    hook(conn, fresh)
                conn.commit()
        except BaseException:
            _rollback(conn)
            raise
        if self._moved():
            # Deleted or replaced while the batch ran: it may have gone into the file that is gone. Written
            # again into the file now at the path (rows it holds already are skipped), then it counts.
            log.warning("ledger %s: the database file was deleted or replaced during a write; the batch is "
                        "written again into the new one", self.path)
            self._transaction(rows, skip_present=True)

    def unreachable(self, exc: BaseException) -> bool:
        """Whether `exc` (from open) says the PostgreSQL server could not be reached (see sqlconn)."""
        return self.is_postgres and unreachable(exc)

    def interrupt(self) -> None:
        """Make the database call running on the writer thread fail now (from any thread): SQLite's
        interrupt; on PostgreSQL the connection's socket is shut down (a cancel request would travel the same
        silent network), so the call raises and the connection is opened anew before the next write."""
        conn = self._conn
        if conn is None:
            return
        if conn.dialect != "postgres":
            conn.raw.interrupt()
            return
        try:
            fd = conn.raw.pgconn.socket
        except Exception:  # noqa: BLE001 - closed already: nothing runs on it
            return
        with socket.socket(fileno=os.dup(fd)) as sock:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def insert(self, rows: list[Row]) -> None:
        """All rows in one committed transaction, or none (the exception says why)."""
        self._transaction(rows)

    def insert_each(self, rows: list[Row]) -> list[BaseException | None]:
        """The rows one statement each, in one transaction: a row that breaks a constraint is left out
        (its error returned in its place), the rest commit."""
        conn = self._current()
        postgres = conn.dialect == "postgres"
        outcome: list[BaseException | None] = []
        good: list[Row] = []
        conn.begin()
        try:
            lock_ledger(conn)
            for row in rows:
                if postgres:
                    row = _pg_row(row)
                    conn.execute("SAVEPOINT meterproxy_row")  # an error aborts the transaction, not this
                try:
                    conn.execute(INSERT_SQL, row)
                except conn.IntegrityError as exc:  # SQLite: aborts the statement, not the transaction
                    if postgres:
                        conn.execute("ROLLBACK TO SAVEPOINT meterproxy_row")
                    outcome.append(exc)
                    continue
                if postgres:
                    conn.execute("RELEASE SAVEPOINT meterproxy_row")
                outcome.append(None)
                good.append(row)
            for hook in self.after_insert:
                hook(conn, good)
            conn.commit()
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
        if conn.dialect == "postgres":
            if rows:
                self._transaction(rows, skip_present=True, lock_timeout_ms=busy_timeout_ms)
            else:
                self._probe(commit=True)
            return
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
        except (self.Error, WritesRefused, OSError) as exc:
            return str(exc).strip() or type(exc).__name__
        return None

    def _probe(self, commit: bool) -> None:
        conn = self._current()
        if conn.dialect == "postgres":
            # Writes nothing: whether this session could write `calls` at all (a hot standby, a read-only
            # session or database, a role without INSERT), in one round trip.
            ro, standby, may = conn.execute(
                "SELECT current_setting('transaction_read_only'), pg_is_in_recovery(),"
                " has_table_privilege('calls', 'INSERT')").fetchone()
            if standby:
                raise WritesRefused(f"{self.path} is a standby server (read-only)")
            if ro == "on":
                raise WritesRefused(f"{self.path}: the session is read-only (default_transaction_read_only)")
            if not may:
                raise WritesRefused(f"{self.path}: this role may not insert into calls")
            return
        conn.begin()
        try:
            # The value itself, not `= user_version`: SQLite reads a name there as 0 and would reset it.
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            conn.execute(f"PRAGMA user_version = {int(version)}")
            if commit:
                conn.commit()
            else:
                conn.rollback()
        except BaseException:
            _rollback(conn)
            raise


def _insert_rows(conn: Conn, rows: list[Row]) -> None:
    """The batch's rows into calls: COPY on PostgreSQL (one stream, no statement per row: 16,000 rows/s at
    1,000 writers against 13,000 with a pipelined executemany, bench/ledger_bench.py), executemany on SQLite.
    A row breaking a constraint fails the whole batch on both; the writer then isolates it (`insert_each`)."""
    if conn.dialect != "postgres":
        conn.executemany(INSERT_SQL, rows)
        return
    with conn.raw.cursor() as cur, cur.copy(COPY_SQL) as copy:
        for row in rows:
            copy.write_row(row)


def _pg_row(row: Row) -> Row:
    """PostgreSQL text cannot hold NUL: one in a value (from a header, an escape in JSON) becomes U+FFFD,
    as record_row does for lone surrogates, so that the row, not the batch, is what it changes."""
    text = row_text(row)
    if text is not None and "\x00" not in text:
        return row
    if any(isinstance(v, str) and "\x00" in v for v in row):
        return tuple(v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in row)
    return row


def _absent(conn: Conn, rows: list[Row]) -> list[Row]:
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


def _rollback(conn: Conn) -> None:
    try:
        conn.rollback()
    except conn.Error:  # a broken connection: nothing is committed, it is opened anew before the next batch
        pass


def file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
