"""The ledger writer: the one owner of the SQLite write connection, with group commit.

Callers hand `Ledger.record()` a `CallRecord` and get control back only once the transaction holding
that row has committed (synchronous=FULL: it is on disk). A single writer task takes every row queued
while the previous commit ran and writes them in one transaction, so N concurrent callers cost about
one fsync rather than N.

When the database refuses a batch (locked, disk full, read-only, its file deleted), the rows go to the
spool (spool.py): an fsynced JSON Lines file. record() then returns as for a commit — the row is durable —
and the ledger is not `accepting` until the writer has replayed the spool into the database, in order,
which it tries every `retry_interval` seconds. While rows wait in the spool, new rows join them there, so
the database receives them in the order they came. A database file deleted or replaced under the proxy is
noticed before the next batch and opened anew.

Errors:
    LedgerError       the ledger cannot be opened, or a row was neither committed nor spooled

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
from .spool import Spool

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
# Replays may repeat after a crash between commit and clearing the spool: request_id makes them idempotent.
REPLAY_SQL = INSERT_SQL.replace("INSERT INTO", "INSERT OR IGNORE INTO", 1)
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
    row = (
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
    # A value SQLite (or the spool) cannot take must fail this row alone, here, never the writer.
    if all(_storable(v) for v in row):
        return row
    for value in row:
        if isinstance(value, int) and not -_INT64 <= value < _INT64:
            raise LedgerError(f"a number in the row is out of SQLite's range: {value:.3e}")
    return tuple(v.encode("utf-8", "replace").decode() if isinstance(v, str) else v for v in row)


_INT64 = 2**63


def _storable(value: object) -> bool:
    if isinstance(value, str):
        if value.isascii():
            return True
        try:
            value.encode()
        except UnicodeEncodeError:  # a lone surrogate, from a header or an escape in JSON
            return False
        return True
    return not isinstance(value, int) or -_INT64 <= value < _INT64


class Ledger:
    """Appends `CallRecord`s to the SQLite ledger at `path`; see the module docstring.

    `stats` counts: rows_committed, batches (committed transactions), last_batch_size,
    max_batch_size, errors (records whose record() raised because their write failed).
    """

    def __init__(self, path: str | os.PathLike[str], *, max_batch: int = 2000,
                 spool_path: str | os.PathLike[str] | None = None, busy_timeout_ms: int = _BUSY_TIMEOUT_MS,
                 retry_interval: float = 1.0) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._path = os.fspath(path)
        self._max_batch = max_batch
        self._spool = Spool(spool_path) if spool_path is not None else None
        self._busy_timeout_ms = busy_timeout_ms
        self._retry_interval = retry_interval
        self._spooled = False  # rows wait in the spool: new rows join them there, in order
        self._healthy = True
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file the connection has open
        self._db: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._inflight: list[_Item] = []
        self._closed = False
        self.stats: dict[str, int] = dict.fromkeys(
            ("rows_committed", "batches", "last_batch_size", "max_batch_size", "errors", "spooled",
             "replayed"), 0
        )

    @property
    def path(self) -> str:
        return self._path

    @property
    def accepting(self) -> bool:
        """The database takes rows now: nothing waits in the spool and the last write worked."""
        return self._healthy and not self._spooled

    async def open(self) -> None:
        if self._db is not None or self._closed:
            raise LedgerError(f"ledger {self._path} was already opened")
        self._db = await self._connect()
        if self._spool is not None:
            self._spooled = await asyncio.to_thread(self._spool.has_rows)  # left by an earlier run
        self._writer = asyncio.create_task(self._run(), name=f"ledger writer {self._path}")

    async def _connect(self) -> aiosqlite.Connection:
        try:
            # Migrations are plain sqlite3 code; run them on a short-lived connection in a thread
            # rather than reaching into aiosqlite's private thread.
            await asyncio.to_thread(self._prepare_file)
            db = await aiosqlite.connect(self._path, isolation_level="IMMEDIATE")
        except Exception as exc:  # sqlite3.Error, OSError, MigrationError: all mean "unusable path"
            raise LedgerError(f"cannot open ledger {self._path}: {exc}") from exc
        try:
            await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
            self._identity = _file_identity(self._path)
        except (sqlite3.Error, OSError) as exc:
            await db.close()
            raise LedgerError(f"cannot open ledger {self._path}: {exc}") from exc
        return db

    def _prepare_file(self) -> None:
        conn = sqlite3.connect(self._path, timeout=self._busy_timeout_ms / 1000)
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

    async def _run(self) -> None:
        try:
            stopping = False
            while not stopping:
                if self._spooled or not self._healthy:
                    try:
                        item = await asyncio.wait_for(self._queue.get(), self._retry_interval)
                    except asyncio.TimeoutError:
                        await self._replay()
                        continue
                else:
                    item = await self._queue.get()
                batch, stopping = self._take_batch(item)
                if batch:
                    self._inflight = batch
                    await self._write(batch)
                    self._inflight = []
            if self._spooled:
                await self._replay()  # a last try on the way out; what stays is replayed at next start
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

    async def _write(self, batch: list[_Item]) -> None:
        if self._spooled and not await self._replay():
            await self._to_spool(batch, None)
            return
        try:
            db = await self._current_db()
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
        except Exception as exc:  # locked, full, read-only, I/O: the rows go to the spool
            if self._db is not None:
                await self._rollback(self._db)
            self._healthy = False
            await self._to_spool(batch, exc)
            return
        self._healthy = True
        self._succeed(batch)

    async def _current_db(self) -> aiosqlite.Connection:
        """The connection, opened anew if the file was deleted or replaced since it was opened."""
        if self._db is None or _file_identity(self._path) != self._identity:
            old, self._db = self._db, None
            if old is not None:
                log.warning("ledger %s: the database file was deleted or replaced; opening it anew", self._path)
                await old.close()
            self._db = await self._connect()
        return self._db

    async def _to_spool(self, batch: list[_Item], cause: BaseException | None) -> None:
        if self._spool is None:
            self._fail(batch, cause or LedgerError("earlier rows are waiting and there is no spool"))
            return
        try:
            await asyncio.to_thread(self._spool.append, [row for row, _ in batch])
        except (OSError, ValueError) as exc:
            self._fail(batch, LedgerError(f"{cause}; the spool {self._spool.path} failed too: {exc}"))
            return
        if not self._spooled:
            log.error("ledger %s refused a write (%s); rows go to the spool %s until it works again",
                      self._path, cause, self._spool.path)
        self._spooled = True
        self.stats["spooled"] += len(batch)
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)  # durable in the spool

    async def _replay(self) -> bool:
        """Move the spool's rows into the database in one transaction; True if the ledger is clear."""
        rows = await asyncio.to_thread(self._spool.read) if self._spool is not None else []
        db: aiosqlite.Connection | None = None
        try:
            db = await self._current_db()
            if rows:
                await db.executemany(REPLAY_SQL, rows)
            else:
                await db.execute("PRAGMA user_version = user_version")  # a probe: can it write at all?
            await db.commit()
        except Exception as exc:  # still refused: try again later
            if db is not None:
                await self._rollback(db)
            self._healthy = False
            log.debug("ledger %s: replay failed: %s", self._path, exc)
            return False
        # Accepting again from here; the spool's rows are in the database, so clearing it may lag (and a
        # crash before it is cleared only means a harmless, idempotent replay at the next start).
        self._spooled = False
        self._healthy = True
        self.stats["replayed"] += len(rows)
        if rows:
            log.warning("ledger %s works again: %d spooled row(s) replayed", self._path, len(rows))
        if self._spool is not None:
            try:
                await asyncio.to_thread(self._spool.clear)
            except OSError as exc:
                log.error("ledger %s: spool %s not cleared (%s); its rows will be replayed again, without "
                          "duplicates", self._path, self._spool.path, exc)
                self._spooled = True
        return True

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


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _set_error(fut: asyncio.Future[None], error: LedgerError, cause: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled and is no longer waiting
        return
    error.__cause__ = cause
    fut.set_exception(error)
    # Mark it retrieved: if the caller is cancelled between now and its wake-up, asyncio would
    # otherwise log "exception was never retrieved" for an error nobody can act on.
    fut.exception()
