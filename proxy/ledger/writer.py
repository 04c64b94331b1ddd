"""The ledger writer: the one owner of the ledger's write connection (SQLite or PostgreSQL), with group commit.

Callers hand `Ledger.record()` a `CallRecord` and get control back only once the transaction holding
that row has committed (synchronous=FULL: it is on disk). A single writer task takes every row queued
while the previous commit ran and writes them in one transaction, so N concurrent callers cost about
one fsync rather than N. The transaction itself runs on one dedicated thread (ledger_db.py), in one call
per batch: plain sqlite3 rather than aiosqlite, whose two round trips per batch (insert, commit) woke
the event loop twice.

When the database refuses a batch (locked, disk full, read-only, its file deleted), the rows go to the
spool (spool.py): an fsynced JSON Lines file. record() then returns as for a commit — the row is durable —
and the ledger is not `accepting` until the writer has replayed the spool into the database, in order,
which it tries every `retry_interval` seconds, in the background: while rows wait in the spool, new rows
join them there directly (so the database receives them in the order they came, and no batch waits for a
locked database's busy timeout), and a replay attempt waits at most a moment for a lock. A row that could
be neither committed nor spooled raises LedgerError to its caller, and the ledger is not `storing` until
the database or the spool takes rows again (probed every `retry_interval`). A database file deleted or
replaced under the proxy is noticed before the next batch and opened anew, and after each commit: a batch
that may have gone into the deleted file is written again into the new one.

On PostgreSQL (`path` a postgresql:// URL) the same holds with the server in the database's place: a
server that cannot be reached, restarts or refuses writes sends rows to the spool (always a local file),
and they are replayed in order, each once (request_id is unique; a replay skips rows already there),
once it takes writes again; the connection is opened anew before the next attempt.

Errors:
    LedgerError       the ledger cannot be opened, or a row was neither committed nor spooled

This module must never store or log anything that is not in the record, never let one failed commit
stop later rows, and never leave a caller waiting on a writer that has died.
"""

from __future__ import annotations

import asyncio
import json
import logging
import operator
import os
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any, Callable

from proxy.core.errors import MeterproxyError
from proxy.core.recent import Recent
from proxy.core.record import CallRecord
from proxy.ledger.db import COLUMNS, INSERT_SQL, INT_COLUMNS, TEXT_COLUMNS, LedgerDB, row_text
from proxy.ledger.spool import Spool
from proxy.ledger.target import Target, parse_target

__all__ = ["COLUMNS", "INSERT_SQL", "Ledger", "LedgerError", "record_row"]

log = logging.getLogger("meterproxy.ledger")

_BUSY_TIMEOUT_MS = 5000
_REPLAY_BUSY_MS = 50  # a replay attempt's wait for a lock held elsewhere: it is retried, rows are not held up
_STOP = object()  # queued by close(): everything ahead of it is written, then the writer ends

Row = tuple[Any, ...]
_Item = tuple[Row, "asyncio.Future[None]"]


class LedgerError(MeterproxyError):
    """The ledger could not be opened, or a record was not committed."""


class WriteTimeout(MeterproxyError):
    """A database write got no answer within the ledger's write_timeout and was interrupted."""


DEFAULT_WRITE_TIMEOUT = 15.0  # seconds: see Ledger._bounded


def record_row(rec: CallRecord) -> Row:
    """The `calls` row for a record, in `COLUMNS` order."""
    cost = rec.cost_usd
    # A float here would be stored rounded; a NaN would poison every sum over it.
    if not isinstance(cost, Decimal) or not cost.is_finite():
        raise LedgerError(f"cost_usd must be a finite Decimal, got {type(cost).__name__} {cost!r}")
    try:
        tags = _tags_json(rec.tags) if rec.tags else "{}"
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
        rec.counted_completion_tokens, rec.audio_prompt_tokens, rec.audio_completion_tokens, rec.service_tier,
        rec.pricing_version, None if rec.original_cost_usd is None else format(rec.original_cost_usd, "f"),
        rec.repriced_at,
    )  # fmt: skip
    # A value SQLite (or the spool) cannot take must fail this row alone, here, never the writer. The
    # common row (text that encodes, numbers in range) is recognised in a few C calls; anything else is
    # looked at value by value below.
    if _fits(row):
        return row
    for value in row:
        if isinstance(value, int) and not -_INT64 <= value < _INT64:
            raise LedgerError(f"a number in the row is out of SQLite's range: {value:.3e}")
    return tuple(v.encode("utf-8", "replace").decode() if isinstance(v, str) else v for v in row)


_INT64 = 2**63
# One encoder for every row's tags: json.dumps with options builds a new one per call.
_tags_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
_INT_AT = operator.itemgetter(*(i for i, c in enumerate(COLUMNS) if c in INT_COLUMNS))
_FLOAT_AT = operator.itemgetter(*(i for i, c in enumerate(COLUMNS) if c not in INT_COLUMNS and c not in TEXT_COLUMNS))
_FLOATS = frozenset((float, type(None)))


def _fits(row: Row) -> bool:
    """Whether every text in the row encodes as UTF-8 and every integer column fits 64 bits (True means
    the row is storable as it is; False only that `_storable` must look at each value)."""
    text = row_text(row)
    if text is None:
        return False
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:  # a lone surrogate, from a header or an escape in JSON
            return False
    # The other columns: numbers that fit, or NULL; anything else (a text, an int where a float goes) is
    # looked at value by value, as before this fast path.
    if not {v.__class__ for v in _FLOAT_AT(row)} <= _FLOATS:
        return False
    try:
        ints: list[int] = [v for v in _INT_AT(row) if v is not None]
        return bool(-_INT64 <= min(ints) and max(ints) < _INT64)
    except TypeError:
        return False


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
    """Appends `CallRecord`s to the ledger at `path` (a SQLite path, a PostgreSQL URL or a Target); see the
    module docstring.

    `stats` counts: rows_committed, batches (committed transactions), last_batch_size,
    max_batch_size, errors (records whose record() raised because their write failed), spooled, replayed.
    """

    def __init__(self, path: str | os.PathLike[str] | Target, *, max_batch: int = 2000,
                 spool_path: str | os.PathLike[str] | None = None, busy_timeout_ms: int = _BUSY_TIMEOUT_MS,
                 retry_interval: float = 1.0, spool_reserve_bytes: int = 0,
                 write_timeout: float | None = DEFAULT_WRITE_TIMEOUT) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.target = path if isinstance(path, Target) else parse_target(path)
        self._path = self.target.shown  # never the password: it is in every message
        self._max_batch = max_batch
        self._spool = Spool(spool_path, spool_reserve_bytes) if spool_path is not None else None
        self._retry_interval = retry_interval
        self._write_timeout = write_timeout
        self.writes = Recent()  # the last batches' write times, and the one under way: is the database slow?
        self._replay_busy_ms = min(busy_timeout_ms, _REPLAY_BUSY_MS)
        self._next_retry = 0.0
        self._spooled = False  # rows wait in the spool: new rows join them there, in order
        self._healthy = True
        self._storing = True  # False: the last row was neither committed nor spooled
        self._refusal: str | None = None  # what the database said when it last refused a write
        self._spool_rows = 0  # rows waiting in the spool
        self.db = LedgerDB(self.target, busy_timeout_ms)  # its methods run on the writer thread only
        self._thread: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._inflight: list[_Item] = []
        self._opened = False
        self._closed = False
        self.on_commit: Callable[[float, int], None] | None = None  # (seconds, rows) after each commit
        self.stats: dict[str, int] = dict.fromkeys(
            ("rows_committed", "batches", "last_batch_size", "max_batch_size", "errors", "spooled",
             "replayed"), 0
        )

    @property
    def path(self) -> str:
        return self._path

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def spool_depth(self) -> int:
        """Rows waiting in the spool for the database to take them."""
        return self._spool_rows

    @property
    def degraded(self) -> str | None:
        """Why rows are not going into the database now (for /healthz), or None while it takes them."""
        if self.accepting and self._storing:
            return None
        spool = self._spool.path if self._spool is not None else "(no spool)"
        why = f"the database refuses writes ({self._refusal})" if self._refusal else "the database refuses writes"
        if not self._storing:
            return f"{why}, and the spool {spool} too: calls are refused"
        return f"{why}; {self._spool_rows} row(s) wait in the spool {spool}"

    @property
    def accepting(self) -> bool:
        """The database takes rows now: nothing waits in the spool and the last write worked."""
        return self._healthy and not self._spooled

    @property
    def storing(self) -> bool:
        """A row can be stored now, in the database or the spool: False after one could be stored in neither,
        until the background retry finds that the database or the spool takes rows again."""
        return self._storing

    async def _on_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking ledger call on the writer thread: one hop, one wake-up of the loop."""
        assert self._thread is not None
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _bounded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`_on_thread` for a write that every waiting response depends on: past `write_timeout` the
        database call is interrupted (a network that drops packets silently, a server that stopped
        answering) and raises, so its rows go to the spool instead of holding their calls forever."""
        assert self._thread is not None
        self.writes.start()
        try:
            return await self._bounded_call(fn, *args)
        finally:
            self.writes.end()

    async def _bounded_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._thread is not None
        call = asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        if self._write_timeout is None:
            return await call
        try:
            return await asyncio.wait_for(asyncio.shield(call), self._write_timeout)
        except asyncio.TimeoutError:
            log.warning("ledger %s: a write took over %.3g s; interrupting it (its rows go to the spool)",
                        self._path, self._write_timeout)
            self.db.interrupt()
            try:
                return await call
            except Exception as exc:
                raise WriteTimeout(f"no answer from the database within {self._write_timeout:.3g} s "
                                   f"({_first_line(exc)})") from exc

    async def open(self) -> None:
        if self._opened or self._closed:
            raise LedgerError(f"ledger {self._path} was already opened")
        self._opened = True
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ledger-writer")
        unreachable: str | None = None
        try:
            await self._on_thread(self.db.open)
        except Exception as exc:  # sqlite3.Error, OSError, MigrationError: all mean "unusable path"
            if not (self.db.unreachable(exc) and self._spool is not None):
                self._thread.shutdown(wait=False)
                self._thread = None
                raise LedgerError(f"cannot open ledger {self._path}: {_first_line(exc)}") from exc
            # A PostgreSQL server away at start is an outage like any other: serve, spool, and connect,
            # migrate and replay once it answers (the background retry).
            unreachable = f"cannot reach the database yet: {_first_line(exc)}"
            log.warning("ledger %s: %s; serving on, rows go to the spool %s until it answers", self._path,
                        unreachable, self._spool.path)
        if self._spool is not None:
            self._spooled = await self._on_thread(self._spool.has_rows)  # left by an earlier run
            if self._spooled:
                self._spool_rows = len(await self._on_thread(self._spool.read))
            await self._prepare_spool()
        if unreachable is not None:
            self._spooled, self._healthy, self._refusal = True, False, unreachable
            self._next_retry = 0.0  # try at once
        refusal = None if unreachable is not None else await self._on_thread(self.db.refuses_writes)
        if refusal is not None:  # a read-only file, say: serving on, but say so now, not at the first call
            self._healthy, self._refusal = False, refusal
            where = (f"rows go to the spool {self._spool.path} until it does" if self._spool is not None
                     else "calls cannot be recorded")
            log.warning("ledger %s does not accept writes (%s): %s; /healthz reports degraded",
                        self._path, refusal, where)
        self._writer = asyncio.create_task(self._run(), name=f"ledger writer {self._path}")

    async def _prepare_spool(self) -> None:
        spool = self._spool
        assert spool is not None
        try:
            if not await self._on_thread(spool.reserve):
                log.warning("ledger %s: no room for the spool's reserve of %d bytes (%s): a full disk may leave "
                            "the spool no room either", self._path, spool.reserve_bytes, spool.reserve_path)
        except OSError as exc:
            log.warning("ledger %s: cannot make the spool's reserve %s: %s", self._path, spool.reserve_path, exc)
        if not self.target.is_postgres and _same_file_system(self.target.where, spool.path):
            log.warning("ledger %s: the spool %s is on the same file system: a full disk fills both (%s); "
                        "set `spool` to a path on another disk", self._path, spool.path,
                        f"a reserve of {spool.reserve_bytes} bytes is kept for it" if spool.reserve_bytes
                        else "and no reserve is kept for it")

    async def spooled_rows(self) -> list[tuple[Any, ...]]:
        """The rows waiting in the spool (COLUMNS order), oldest first: none while the database takes rows.
        Read once at start by the shared limits, which hold their cost again until they are in `calls`."""
        if self._spool is None or not self._spooled:
            return []
        rows: list[tuple[Any, ...]] = await self._on_thread(self._spool.read)
        return rows

    async def record(self, rec: CallRecord) -> None:
        """Write one row; return once it is committed (or spooled). Raises LedgerError if it was neither."""
        await self.submit(rec)

    def submit(self, rec: CallRecord) -> asyncio.Future[None]:
        """Queue one row; the future resolves once it is committed (or spooled). Cheaper than record() on a
        hot path: no coroutine, and the caller may shield the future itself."""
        if self._closed or self._writer is None:
            raise LedgerError(f"ledger {self._path} is not open")
        if self._writer.done():
            raise LedgerError(f"ledger {self._path} writer has stopped; the row was not written")
        row = record_row(rec)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((row, fut))
        return fut

    async def close(self) -> None:
        """Commit everything queued so far, stop the writer and close the connection."""
        if self._closed:
            return
        self._closed = True
        writer = self._writer
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
            if self._thread is not None:
                try:
                    await self._on_thread(self.db.close)
                finally:
                    self._thread.shutdown(wait=False)
                    self._thread = None

    @property
    def _troubled(self) -> bool:
        return self._spooled or not self._healthy or not self._storing

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            stopping = False
            while not stopping:
                if self._troubled:
                    wait = max(0.0, self._next_retry - loop.time())
                    try:
                        item = await asyncio.wait_for(self._queue.get(), wait)
                    except asyncio.TimeoutError:
                        await self._retry()
                        continue
                else:
                    item = await self._queue.get()
                batch, stopping = self._take_batch(item)
                if batch:
                    self._inflight = batch
                    await self._write(batch)
                    self._inflight = []
                if self._troubled and loop.time() >= self._next_retry:
                    await self._retry()  # rows keep coming: retry between batches all the same
            if self._spooled:
                await self._replay(final=True)  # a last try on the way out; what stays is replayed at next start
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

    async def _retry(self) -> None:
        """The background retry: replay the spool (or probe the database); if neither that nor the spool
        works, see whether the spool has room again."""
        self._next_retry = asyncio.get_running_loop().time() + self._retry_interval
        if await self._replay() or self._storing or self._spool is None:
            return
        try:
            room = await self._on_thread(self._spool.has_room)
        except OSError:
            room = False
        if room:
            log.warning("ledger %s: the spool %s has room again; calls are taken again", self._path,
                        self._spool.path)
            self._storing = True

    async def _write(self, batch: list[_Item]) -> None:
        if self._spooled:  # the background retry replays: no batch waits for a database that refuses
            await self._to_spool(batch, None)
            return
        rows = [row for row, _ in batch]
        started = time.perf_counter()
        try:
            await self._bounded(self.db.insert, rows)
        except self.db.IntegrityError as exc:
            if len(batch) == 1:
                self._fail(batch, exc)
            else:
                # One bad row (say a repeated request_id) must not cost its neighbours their rows.
                await self._write_one_by_one(batch)
            return
        except Exception as exc:  # locked, full, read-only, I/O: the rows go to the spool
            self._healthy, self._refusal = False, _first_line(exc)
            self._next_retry = asyncio.get_running_loop().time() + self._retry_interval
            await self._to_spool(batch, exc)
            return
        self._healthy = self._storing = True
        self._refusal = None
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, len(batch))
        self._succeed(batch)

    async def _write_one_by_one(self, batch: list[_Item]) -> None:
        try:
            outcome = await self._bounded(self.db.insert_each, [row for row, _ in batch])
        except Exception as exc:
            self._healthy, self._refusal = False, _first_line(exc)
            await self._to_spool(batch, exc)
            return
        self._succeed([item for item, err in zip(batch, outcome) if err is None])
        for item, err in zip(batch, outcome):
            if err is not None:
                self._fail([item], err)

    async def _to_spool(self, batch: list[_Item], cause: BaseException | None) -> None:
        if self._spool is None:
            self._fail(batch, cause or LedgerError("earlier rows are waiting and there is no spool"))
            return
        try:
            await self._on_thread(self._spool.append, [row for row, _ in batch])
        except (OSError, ValueError) as exc:
            if self._storing:
                log.error("ledger %s: a row could be neither committed (%s) nor spooled to %s (%s): calls are "
                          "refused with 503 until one of them takes rows again", self._path, cause,
                          self._spool.path, exc)
            self._storing = False
            self._fail(batch, LedgerError(f"{cause}; the spool {self._spool.path} failed too: {exc}"))
            return
        self._storing = True
        self._spool_rows += len(batch)
        if not self._spooled:
            log.error("ledger %s refused a write (%s); rows go to the spool %s until it works again",
                      self._path, cause or self._refusal, self._spool.path)
        log.warning("ledger %s: %d row(s) spooled to %s (%d waiting)", self._path, len(batch), self._spool.path,
                    self._spool_rows)
        self._spooled = True
        self.stats["spooled"] += len(batch)
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)  # durable in the spool

    async def _replay(self, final: bool = False) -> bool:
        """Move the spool's rows into the database in one transaction; True if the ledger is clear."""
        try:
            rows = await self._on_thread(self._spool.read) if self._spool is not None else []
            await self._bounded(self.db.replay, rows, None if final else self._replay_busy_ms)
        except Exception as exc:  # still refused: try again later
            self._healthy, self._refusal = False, _first_line(exc)
            log.debug("ledger %s: replay failed: %s", self._path, exc)
            return False
        # Accepting again from here; the spool's rows are in the database, so clearing it may lag (and a
        # crash before it is cleared only means a harmless, idempotent replay at the next start).
        self._spooled = False
        self._healthy = self._storing = True
        self._refusal, self._spool_rows = None, 0
        self.stats["replayed"] += len(rows)
        if rows:
            log.warning("ledger %s works again: %d spooled row(s) replayed", self._path, len(rows))
        if self._spool is not None:
            try:
                await self._on_thread(self._spool.clear)
            except OSError as exc:
                log.error("ledger %s: spool %s not cleared (%s); its rows will be replayed again, without "
                          "duplicates", self._path, self._spool.path, exc)
                self._spooled = True
            try:
                await self._on_thread(self._spool.reserve)  # made again if a full disk took it
            except OSError:
                pass
        return True

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


def _first_line(exc: BaseException) -> str:
    """An error in one line (libpq's messages run over several; none carries the password)."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _same_file_system(a: str, b: str) -> bool:
    try:
        return os.stat(os.path.dirname(os.path.abspath(a))).st_dev == os.stat(
            os.path.dirname(os.path.abspath(b))).st_dev
    except OSError:
        return False


def _set_error(fut: asyncio.Future[None], error: LedgerError, cause: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled and is no longer waiting
        return
    error.__cause__ = cause
    fut.set_exception(error)
    # Mark it retrieved: if the caller is cancelled between now and its wake-up, asyncio would
    # otherwise log "exception was never retrieved" for an error nobody can act on.
    fut.exception()
