"""The ledger writer: the one owner of the SQLite write connection, with group commit.

Callers hand `Ledger.record()` a `CallRecord` and get control back only once the transaction holding
that row has committed (synchronous=FULL: it is on disk). A single writer task takes every row queued
while the previous commit ran and writes them in one transaction, so N concurrent callers cost about
one fsync rather than N.

Errors:
    LedgerError       the ledger cannot be opened, or a row was not committed (the message says why)

This module must never store or log anything that is not in the record, never let one failed commit
stop later rows, and never leave a caller waiting on a writer that has died.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from decimal import Decimal
from typing import Any

import aiosqlite

from .migrations import migrate
from .record import CallRecord

__all__ = ["COLUMNS", "INSERT_SQL", "Ledger", "LedgerError", "record_row"]

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = (
    "request_id", "started_at", "ended_at", "key_id", "key_hint", "user", "session", "operation",
    "tags", "method", "endpoint", "requested_model", "model", "stream", "status", "error",
    "latency_ms", "ttfb_ms", "prompt_tokens", "completion_tokens", "cached_tokens",
    "reasoning_tokens", "total_tokens", "usage_source", "priced", "cost_usd",
    "approximate", "lower_bound", "usage_note", "counted_prompt_tokens", "counted_completion_tokens",
)  # fmt: skip
INSERT_SQL = "INSERT INTO calls ({}) VALUES ({})".format(
    ", ".join(f'"{c}"' for c in COLUMNS), ", ".join("?" * len(COLUMNS))
)
_BUSY_TIMEOUT_MS = 5000
_STOP = object()  # queued by close(): everything ahead of it is written, then the writer ends

Row = tuple[Any, ...]
_Item = tuple[Row, "asyncio.Future[None]"]


class LedgerError(Exception):
    """The ledger could not be opened, or a record was not committed."""


def record_row(rec: CallRecord) -> Row:
    """The `calls` row for a record, in `COLUMNS` order."""
    cost = rec.cost_usd
    # A float here would be stored rounded; a NaN would poison every sum over it.
    if not isinstance(cost, Decimal) or not cost.is_finite():
        raise LedgerError(f"cost_usd must be a finite Decimal, got {type(cost).__name__} {cost!r}")
    try:
        tags = json.dumps(rec.tags, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"tags are not a JSON object of strings: {exc}") from exc
    return (
        rec.request_id, rec.started_at, rec.ended_at, rec.key_id, rec.key_hint, rec.user,
        rec.session, rec.operation,
        tags,
        rec.method, rec.endpoint, rec.requested_model, rec.model, int(rec.stream), rec.status,
        rec.error, rec.latency_ms, rec.ttfb_ms, rec.prompt_tokens, rec.completion_tokens,
        rec.cached_tokens, rec.reasoning_tokens, rec.total_tokens, rec.usage_source,
        int(rec.priced), format(cost, "f"),
        int(rec.approximate), int(rec.lower_bound), rec.usage_note, rec.counted_prompt_tokens,
        rec.counted_completion_tokens,
    )  # fmt: skip


class Ledger:
    """Appends `CallRecord`s to the SQLite ledger at `path`; see the module docstring.

    `stats` counts: rows_committed, batches (committed transactions), last_batch_size,
    max_batch_size, errors (records whose record() raised because their write failed).
    """

    def __init__(self, path: str | os.PathLike[str], *, max_batch: int = 2000) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._path = os.fspath(path)
        self._max_batch = max_batch
        self._db: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._inflight: list[_Item] = []
        self._closed = False
        self.stats: dict[str, int] = dict.fromkeys(
            ("rows_committed", "batches", "last_batch_size", "max_batch_size", "errors"), 0
        )

    @property
    def path(self) -> str:
        return self._path

    async def open(self) -> None:
        if self._db is not None or self._closed:
            raise LedgerError(f"ledger {self._path} was already opened")
        try:
            # Migrations are plain sqlite3 code; run them on a short-lived connection in a thread
            # rather than reaching into aiosqlite's private thread.
            await asyncio.to_thread(self._prepare_file)
            db = await aiosqlite.connect(self._path, isolation_level="IMMEDIATE")
        except Exception as exc:  # sqlite3.Error, OSError, MigrationError: all mean "unusable path"
            raise LedgerError(f"cannot open ledger {self._path}: {exc}") from exc
        try:
            await db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            await db.close()
            raise LedgerError(f"cannot open ledger {self._path}: {exc}") from exc
        self._db = db
        self._writer = asyncio.create_task(self._run(db), name=f"ledger writer {self._path}")

    def _prepare_file(self) -> None:
        conn = sqlite3.connect(self._path, timeout=_BUSY_TIMEOUT_MS / 1000)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(f"journal_mode is {mode!r}, WAL is required (is it a file?)")
            migrate(conn)
        finally:
            conn.close()

    async def record(self, rec: CallRecord) -> None:
        """Write one row; return once it is committed. Raises LedgerError if it was not."""
        if self._closed or self._writer is None:
            raise LedgerError(f"ledger {self._path} is not open")
        if self._writer.done():
            raise LedgerError(f"ledger {self._path} writer has stopped; the row was not written")
        row = record_row(rec)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((row, fut))
        # Not shielded: if the caller is cancelled the future is cancelled too and the writer
        # skips it; the row itself stays in its batch.
        await fut

    async def close(self) -> None:
        """Commit everything queued so far, stop the writer and close the connection."""
        if self._closed:
            return
        self._closed = True
        writer, db = self._writer, self._db
        try:
            if writer is not None and not writer.done():
                self._queue.put_nowait(_STOP)
                await asyncio.wait([writer])  # unlike `await writer`, never cancels it
        finally:
            if writer is not None:
                if not writer.done():
                    writer.cancel()  # close() itself was cancelled: do not leave the task behind
                    await asyncio.wait([writer])
                if not writer.cancelled():
                    writer.exception()  # a death was already reported to its callers
            self._db = None
            if db is not None:
                await db.close()

    async def _run(self, db: aiosqlite.Connection) -> None:
        try:
            stopping = False
            while not stopping:
                batch, stopping = self._take_batch(await self._queue.get())
                if batch:
                    self._inflight = batch
                    await self._write(db, batch)
                    self._inflight = []
        except BaseException as exc:
            reason = "was cancelled" if isinstance(exc, asyncio.CancelledError) else f"died: {exc}"
            self._fail_all(f"ledger {self._path} writer {reason}; the row may not be written")
            raise

    def _take_batch(self, first: Any) -> tuple[list[_Item], bool]:
        """`first` plus every row already queued, up to max_batch; and whether close() was seen."""
        batch: list[_Item] = []
        item = first
        while True:
            if item is _STOP:
                return batch, True
            batch.append(item)
            if len(batch) >= self._max_batch:
                return batch, False
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return batch, False

    async def _write(self, db: aiosqlite.Connection, batch: list[_Item]) -> None:
        try:
            await db.executemany(INSERT_SQL, [row for row, _ in batch])
            await db.commit()
        except sqlite3.IntegrityError as exc:
            await self._rollback(db)
            if len(batch) == 1:
                self._fail(batch, exc)
            else:
                # One bad row (say a repeated request_id) must not cost its neighbours their rows.
                await self._write_one_by_one(db, batch)
            return
        except Exception as exc:
            await self._rollback(db)
            self._fail(batch, exc)
            return
        self._succeed(batch)

    async def _write_one_by_one(self, db: aiosqlite.Connection, batch: list[_Item]) -> None:
        good: list[_Item] = []
        bad: list[tuple[_Item, Exception]] = []
        try:
            for item in batch:
                try:
                    await db.execute(INSERT_SQL, item[0])
                    good.append(item)
                except sqlite3.IntegrityError as exc:  # aborts the statement, not the transaction
                    bad.append((item, exc))
            await db.commit()
        except Exception as exc:
            await self._rollback(db)
            self._fail(batch, exc)
            return
        self._succeed(good)
        for item, exc in bad:
            self._fail([item], exc)

    async def _rollback(self, db: aiosqlite.Connection) -> None:
        try:
            await db.rollback()
        except Exception as exc:
            # Half a batch might sit in an open transaction and be committed with the next one,
            # after its callers were told it failed. Stop instead: later records get LedgerError.
            raise LedgerError(f"rollback failed, ledger writer stopping: {exc}") from exc

    def _succeed(self, batch: list[_Item]) -> None:
        if not batch:
            return
        stats = self.stats
        stats["rows_committed"] += len(batch)
        stats["batches"] += 1
        stats["last_batch_size"] = len(batch)
        stats["max_batch_size"] = max(stats["max_batch_size"], len(batch))
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)

    def _fail(self, batch: list[_Item], cause: BaseException) -> None:
        log.warning("ledger %s: %d row(s) not written: %s", self._path, len(batch), cause)
        self.stats["errors"] += len(batch)
        for _, fut in batch:
            _set_error(fut, LedgerError(f"ledger write to {self._path} failed: {cause}"), cause)

    def _fail_all(self, message: str) -> None:
        pending = self._inflight
        self._inflight = []
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if item is not _STOP:
                pending.append(item)
        self.stats["errors"] += len(pending)
        for _, fut in pending:
            _set_error(fut, LedgerError(message), None)


def _set_error(fut: asyncio.Future[None], error: LedgerError, cause: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled and is no longer waiting
        return
    error.__cause__ = cause
    fut.set_exception(error)
    # Mark it retrieved: if the caller is cancelled between now and its wake-up, asyncio would
    # otherwise log "exception was never retrieved" for an error nobody can act on.
    fut.exception()
