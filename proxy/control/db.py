"""The control tables (managed keys, limits per subject, sent alerts) on the ledger's SQLite file.

Two connections of its own, one for reads and one for writes, each used from worker threads one call at
a time, so the event loop never waits on SQLite and a write waiting for the file's write lock never holds
up a key lookup. Writes take the write lock up front (BEGIN IMMEDIATE) and are rare (an admin changing a
key); the ledger writer and these connections share the file through WAL and the busy timeout.

Other processes (the `meterproxy keys` CLI) change these tables directly. Triggers bump
`keys_changes.version` on every change, and `watch()` polls that one row so a running proxy drops its
caches within a second of a revoke made anywhere.

This module must never touch the `calls` table and never run SQLite on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from typing import Callable, TypeVar

from proxy.core.errors import MeterproxyError
from proxy.ledger.migrations import create_private, migrate

__all__ = ["ControlDB", "ControlDBError"]

log = logging.getLogger("meterproxy")
T = TypeVar("T")


class ControlDBError(MeterproxyError):
    """The control tables cannot be opened or written; the message is one line for the operator."""


class ControlDB:
    """The control tables at `path`; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        self._busy_timeout = busy_timeout
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._listeners: list[Callable[[], object]] = []
        self._watcher: asyncio.Task[None] | None = None
        self._version: int | None = None

    # --- opening and closing -------------------------------------------------------------------
    def open_sync(self) -> None:
        """Open (creating and migrating the file if needed). For the CLI; the proxy uses `open()`."""
        if self._writer is not None:
            return
        writer = self._connect()
        try:
            writer.execute("PRAGMA journal_mode = WAL")
            writer.execute("PRAGMA synchronous = FULL")
            migrate(writer)
            self._version = _read_version(writer)
            self._reader = self._connect()
        except Exception as exc:  # sqlite3.Error, MigrationError: the file is unusable
            writer.close()
            raise ControlDBError(f"cannot open {self.path}: {exc}") from exc
        self._writer = writer

    def _connect(self) -> sqlite3.Connection:
        try:
            create_private(self.path)  # `meterproxy keys` may be the first to create the ledger file
            return sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None,
                                   check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise ControlDBError(f"cannot open {self.path}: {exc}") from exc

    async def open(self) -> None:
        await asyncio.to_thread(self.open_sync)

    def close_sync(self) -> None:
        for lock, name in ((self._read_lock, "_reader"), (self._write_lock, "_writer")):
            with lock:
                conn = getattr(self, name)
                setattr(self, name, None)
                if conn is not None:
                    conn.close()

    async def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await asyncio.to_thread(self.close_sync)

    # --- running statements --------------------------------------------------------------------
    def read_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._read_lock:
            return fn(self._connection(self._reader))

    def write_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in one IMMEDIATE transaction: all of it commits, or none of it."""
        with self._write_lock:
            conn = self._connection(self._writer)
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self.read_sync, fn)

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, keys_or_limits: bool = True) -> T:
        """Run `fn` in a write transaction; if it changed keys or limits, caches drop now, not at the next poll."""
        result = await asyncio.to_thread(self.write_sync, fn)
        if keys_or_limits:
            self._notify()
        return result

    def _connection(self, conn: sqlite3.Connection | None) -> sqlite3.Connection:
        if conn is None:
            raise ControlDBError(f"control tables of {self.path} are not open")
        return conn

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
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(interval), name=f"control watch {self.path}")

    async def check_changes(self) -> bool:
        """Poll the change counter once; notify listeners and return True if it moved."""
        version = await self.read(_read_version)
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
            except (sqlite3.Error, ControlDBError) as exc:  # a locked or vanished file: try again later
                log.warning("control: cannot poll %s for key changes: %s", self.path, exc)


def _read_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT version FROM keys_changes WHERE id = 1").fetchone()
    return int(row[0]) if row else 0
