"""The control tables (managed keys, limits per subject, sent alerts), on the ledger's SQLite file or its
PostgreSQL database.

Two connections of its own, one for reads and one for writes, each used from worker threads one call at
a time, so the event loop never waits on the database and a write waiting for a lock never holds up a key
lookup. `read(fn)` / `write(fn)` hand `fn` a `proxy.ledger.sqlconn.Conn`; the SQL is in
`proxy.ledger.control_store`. A connection found broken (PostgreSQL restarted, a network cut) is dropped
and opened again at the next call; while the database is down a call raises `ControlDBError` (one line).

Other processes (the `meterproxy keys` CLI, other replicas) change these tables directly. Triggers bump
`keys_changes.version` on every change, and `watch()` polls that one row once a second; on PostgreSQL a
LISTEN connection is told of every change at once (the poll is its fallback, and a lost LISTEN connection
is opened again), so a replica drops its caches within a second of a revoke made anywhere.

This module must never touch the `calls` table and never run a query on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Callable, TypeVar

from proxy.core.errors import MeterproxyError
from proxy.ledger import control_store
from proxy.ledger.sqlconn import Conn, unreachable
from proxy.ledger.target import Target, parse_target

__all__ = ["ControlDB", "ControlDBError"]

log = logging.getLogger("meterproxy")
T = TypeVar("T")
_RELISTEN_MAX = 5.0  # seconds between attempts to open the LISTEN connection again, at most


class ControlDBError(MeterproxyError):
    """The control tables cannot be opened, read or written; the message is one line for the operator."""


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ControlDB:
    """The control tables of the ledger `db` (a SQLite path or a PostgreSQL URL); see the module docstring."""

    def __init__(self, db: str | os.PathLike[str] | Target, *, busy_timeout: float = 5.0,
                 connect_timeout: float = 5.0) -> None:
        self.target = db if isinstance(db, Target) else parse_target(db)
        self.path = self.target.where  # the path or URL as given (may hold a password): never print it
        self.shown = self.target.shown  # for messages
        self._busy_timeout = busy_timeout
        self._connect_timeout = connect_timeout
        self._reader: Conn | None = None
        self._writer: Conn | None = None
        self._opened = False
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._listeners: list[Callable[[], object]] = []
        self._watcher: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._version: int | None = None
        self._down: str | None = None  # the error of an outage already logged, until it ends
        self.listening = False  # PostgreSQL: the LISTEN connection is up (changes arrive at once)

    @property
    def is_postgres(self) -> bool:
        return self.target.is_postgres

    # --- opening and closing -------------------------------------------------------------------
    def open_sync(self, *, migrate: bool = True) -> None:
        """Open (creating and migrating the schema if needed). For the CLI; the proxy uses `open()`.
        `migrate` False (a command that only reads): a schema not at this meterproxy's version is refused
        with one line, and nothing is changed."""
        if self._opened:
            return
        writer = self._connect()
        try:
            if migrate:
                control_store.prepare(writer)
            elif (problem := control_store.behind(writer)) is not None:
                raise ControlDBError(problem)
            self._version = control_store.read_version(writer)
            self._reader = self._connect()
        except ControlDBError:
            writer.close()
            raise
        except Exception as exc:  # the driver's error, MigrationError: the database is unusable
            writer.close()
            raise ControlDBError(f"cannot open the control tables of {self.shown}: {_line(exc)}") from exc
        self._writer = writer
        self._opened = True

    def _connect(self) -> Conn:
        try:
            return control_store.connect(self.target, busy_timeout=self._busy_timeout,
                                         connect_timeout=self._connect_timeout)
        except Exception as exc:  # sqlite3.Error, psycopg.Error, OSError
            raise ControlDBError(f"cannot open the control tables of {self.shown}: {_line(exc)}") from exc

    async def open(self, *, lazily: bool = False) -> None:
        """`open_sync` on a thread. `lazily` (the proxy on PostgreSQL): a server that cannot be reached now
        is an outage, not a failed start — calls that need the tables get ControlDBError until it answers."""
        try:
            await asyncio.to_thread(self.open_sync)
        except ControlDBError as exc:
            if not (lazily and self.is_postgres and isinstance(exc.__cause__, Exception)
                    and unreachable(exc.__cause__)):
                raise
            self._opened = True  # connections are made at the first call that finds the server
            self._outage(str(exc))

    def close_sync(self) -> None:
        self._opened = False
        for lock, name in ((self._read_lock, "_reader"), (self._write_lock, "_writer")):
            with lock:
                conn = getattr(self, name)
                setattr(self, name, None)
                if conn is not None:
                    _close_quietly(conn)

    async def close(self) -> None:
        tasks = [t for t in (self._watcher, self._listener) if t is not None]
        self._watcher = self._listener = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(self.close_sync)

    # --- running statements --------------------------------------------------------------------
    def read_sync(self, fn: Callable[[Conn], T]) -> T:
        """Run `fn` on the read connection; a connection found broken is replaced and `fn` run once more
        (a read is safe to repeat)."""
        with self._read_lock:
            for attempt in (1, 2):
                conn = self._reader = self._usable(self._reader)
                try:
                    result = fn(conn)
                except conn.Error as exc:
                    self._reader = self._failed(conn, exc)
                    if attempt == 1 and self._reader is None:
                        continue
                    raise ControlDBError(f"cannot read the control tables of {self.shown}: {_line(exc)}") from exc
                self._up()
                return result
            raise AssertionError("unreachable")

    def write_sync(self, fn: Callable[[Conn], T]) -> T:
        """Run `fn` in one write transaction: all of it commits, or none of it. A connection found broken
        when the transaction begins (nothing sent yet) is replaced and the transaction begun there."""
        with self._write_lock:
            conn = self._writer = self._usable(self._writer)
            try:
                conn.begin()
            except conn.Error as exc:
                self._writer = self._failed(conn, exc)
                if self._writer is not None:
                    raise ControlDBError(f"cannot write the control tables of {self.shown}: {_line(exc)}") from exc
                conn = self._writer = self._usable(None)
                try:
                    conn.begin()
                except conn.Error as again:
                    self._writer = self._failed(conn, again)
                    raise ControlDBError(f"cannot write the control tables of {self.shown}: {_line(again)}"
                                         ) from again
            try:
                result = fn(conn)
                conn.commit()
            except BaseException as exc:
                broken = isinstance(exc, conn.Error)
                try:
                    conn.rollback()
                except conn.Error:
                    broken = True
                if broken:
                    self._writer = self._failed(conn, exc)
                    raise ControlDBError(f"cannot write the control tables of {self.shown}: {_line(exc)}") from exc
                raise
            self._up()
            return result

    async def read(self, fn: Callable[[Conn], T]) -> T:
        return await asyncio.to_thread(self.read_sync, fn)

    async def write(self, fn: Callable[[Conn], T], *, keys_or_limits: bool = True) -> T:
        """Run `fn` in a write transaction; if it changed keys or limits, caches drop now, not at the next poll."""
        result = await asyncio.to_thread(self.write_sync, fn)
        if keys_or_limits:
            self._notify()
        return result

    def _usable(self, conn: Conn | None) -> Conn:
        """`conn`, or a new connection when it was dropped after a failure (the database may be back)."""
        if not self._opened:
            raise ControlDBError(f"the control tables of {self.shown} are not open")
        if conn is not None:
            return conn
        try:
            return self._connect()
        except ControlDBError as exc:
            self._outage(str(exc))
            raise

    def _failed(self, conn: Conn, exc: BaseException) -> Conn | None:
        """After `exc` on `conn`: keep a healthy connection, drop a broken one (reopened at the next call)."""
        if not _broken(conn):
            try:
                conn.rollback()
                return conn
            except conn.Error:
                pass
        _close_quietly(conn)
        self._outage(f"control tables of {self.shown}: {_line(exc)}")
        return None

    def _outage(self, message: str) -> None:
        if self._down is None:
            log.error("control: %s (keys and limits are served from memory; retrying)", message)
        self._down = message

    def _up(self) -> None:
        if self._down is not None:
            self._down = None
            log.warning("control: the control tables of %s are reachable again", self.shown)

    @property
    def down(self) -> str | None:
        """The one-line error of the current outage, or None when the last statement worked."""
        return self._down

    # --- noticing changes made elsewhere -------------------------------------------------------
    def on_change(self, listener: Callable[[], object]) -> None:
        """Call `listener()` (on the event loop) whenever keys or limits may have changed."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:  # one cache's bug must not keep the others stale
                log.exception("control: change listener failed")

    def start_watch(self, interval: float = 1.0) -> None:
        """Poll the change counter every `interval` seconds; on PostgreSQL also LISTEN for changes."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(interval), name=f"control watch {self.shown}")
        if self.is_postgres and self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name=f"control listen {self.shown}")

    async def check_changes(self) -> bool:
        """Poll the change counter once; notify listeners and return True if it moved."""
        version = await self.read(control_store.read_version)
        if version == self._version:
            return False
        self._version = version
        self._notify()
        return True

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_changes()
            except ControlDBError as exc:  # a locked or vanished file, a server down: try again later
                log.debug("control: cannot poll for key changes: %s", exc)

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            started = time.monotonic()
            try:
                await control_store.listen(self.target, self._notify, self._listening,
                                           connect_timeout=self._connect_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection was lost or refused: poll meanwhile, then LISTEN again
                if self.listening:
                    log.warning("control: lost the LISTEN connection to %s (%s); polling until it is back",
                                self.shown, _line(exc))
            finally:
                self.listening = False
            if time.monotonic() - started > 10:
                delay = 0.1  # it had been up a while: this is a new outage
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RELISTEN_MAX)

    def _listening(self) -> None:
        self.listening = True
        self._notify()  # changes made while it was not listening were missed: drop the caches once


def _broken(conn: Conn) -> bool:
    if not conn.is_postgres:
        return False
    raw = conn.raw
    return bool(raw.closed or getattr(raw, "broken", False))


def _close_quietly(conn: Conn) -> None:
    try:
        conn.close()
    except Exception:  # closing a broken connection may fail too: it is gone either way
        pass
