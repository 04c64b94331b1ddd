"""Retention and rollup upkeep: delete raw call rows older than `retention_days`; the rollups keep them.

`prune(conn, older_than)` deletes the calls that started before the whole hour at or below `older_than`, in
bounded batches (one short transaction each, so the ledger writer is never held up for long), after making
sure the rollups hold every one of them. It moves `rollup_state.pruned_before` to that hour: reports then
answer the pruned period from the rollups (report_plan.py says which groups lose their detail there).

`RetentionTask` is the asyncio task the proxy runs (at start, then hourly): it rebuilds hours marked dirty
(a re-pricing, rows written without the hook), gives finished hours each dimension's own rows, rolls
finished days up into day and month rows, builds the views' days (rollup_views.py: pairs, zones), then prunes when `retention_days` is set; every transaction is
`paced`, so the ledger writer is never starved.
Its blocking work runs in a thread on a connection of its own; stop() lets the current batch finish.
Both backends: the task takes a db string or Target; `prune` and `paced` take a Conn (or a sqlite3
connection), and every transaction holds the ledger's write lock (`rollup_build.in_transaction`).

This module must never delete a call the rollups do not hold, never delete part of an hour, and never
hold the write lock for more than one batch at a time.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from proxy.core.errors import MeterproxyError
from proxy.ledger import rollup_build, rollup_views, rollups
from proxy.ledger.rollup_build import in_transaction
from proxy.ledger.rollups import AnyConn, as_conn
from proxy.ledger.sqlconn import Conn, connect_postgres, wrap_sqlite
from proxy.ledger.target import Target, parse_target

__all__ = ["RetentionError", "RetentionTask", "prune"]

log = logging.getLogger("meterproxy.retention")
_HOUR = 3600


class RetentionError(MeterproxyError):
    """The ledger cannot be pruned (no rollups to keep the counts)."""


def paced(conn: AnyConn, work: Callable[[], Any], stop: threading.Event | None = None,
          gap: float = 0.0) -> Any:
    """`work()` in one IMMEDIATE transaction, then a pause as long as the transaction held the lock (at
    least `gap` seconds; cut short by `stop`). Back to back, maintenance transactions starve the ledger
    writer: its busy handler retries every 100 ms at most, lands inside the next transaction each time,
    and gives up after busy_timeout (seen: 5 s waits and spooled rows while a 10M-call ledger upgraded)."""
    started = time.monotonic()
    result = in_transaction(conn, work)
    if gap > 0:
        wait = max(gap, time.monotonic() - started)
        if stop is not None:
            stop.wait(wait)
        else:
            time.sleep(wait)
    return result


def prune(conn: AnyConn, older_than: float, batch_size: int = 5000,
          stop: threading.Event | None = None, gap: float = 0.0) -> int:
    """Delete calls started before the hour `older_than` falls in; returns how many. `conn` must be in
    autocommit mode (isolation_level=None): each batch is its own transaction, `paced` by `gap`."""
    conn = as_conn(conn)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    cutoff = int(older_than) // _HOUR * _HOUR
    if not rollups.read_state(conn).exists:
        raise RetentionError("the ledger has no rollups (schema older than migration 5); nothing pruned")
    if rollup_build.make_current(conn):
        log.warning("retention: rollups were not current (rows written without the proxy); rebuilding them")
    # The dirty hours about to lose their raw rows, rebuilt a day's worth per transaction first.
    while (stop is None or not stop.is_set()) and paced(
            conn, lambda: rollup_build.rebuild_dirty(conn, max_hours=24, before=cutoff), stop, gap):
        pass
    if stop is not None and stop.is_set():
        return 0
    in_transaction(conn, lambda: _prepare(conn, cutoff))
    deleted = 0
    while stop is None or not stop.is_set():
        n = paced(conn, lambda: _delete_batch(conn, cutoff, batch_size), stop, gap)
        deleted += n
        if n < batch_size:
            break
    return deleted


def _prepare(conn: Conn, cutoff: int) -> None:
    """Rebuild the dirty hours about to lose their raw rows, then move pruned_before to `cutoff`."""
    pruned = rollups.read_state(conn).pruned_before
    if pruned is not None and pruned >= cutoff:
        return
    rollup_build.rebuild_dirty(conn, max_hours=None, before=cutoff)  # any marked since; leaves pruned hours alone
    conn.execute("DELETE FROM rollup_dirty WHERE hour < ?", (cutoff,))
    conn.execute("UPDATE rollup_state SET pruned_before = ? WHERE id = 1", (cutoff,))


def _delete_batch(conn: Conn, cutoff: int, batch_size: int) -> int:
    if not rollups.read_state(conn).current:
        # Rows arrived without the hook since prune() began: the next run rebuilds first.
        raise RetentionError("rollups stopped being current while pruning; try again")
    cur = conn.execute("DELETE FROM calls WHERE id IN (SELECT id FROM calls WHERE started_at < ? "
                       "ORDER BY started_at LIMIT ?)", (cutoff, batch_size))
    # Deleting the newest rows lowers max(id): keep covered_id equal to it, as it was.
    newest = conn.execute("SELECT coalesce(max(id), 0) FROM calls").fetchone()[0]
    conn.execute("UPDATE rollup_state SET covered_id = ? WHERE id = 1", (newest,))
    return cur.rowcount


class RetentionTask:
    """At start and every `interval` seconds: roll up finished days, rebuild dirty hours, prune.

    `retention_days` None keeps every call (the upkeep still runs). start() and `await stop()` from the
    event loop; stop() waits for the batch under way, never for a whole prune."""

    def __init__(self, db_path: str | Target, retention_days: float | None, *, interval: float = 3600.0,
                 batch_size: int = 5000, busy_timeout_ms: int = 5000,
                 clock: Callable[[], float] = time.time, gap: float = 0.1,
                 views: Sequence[tuple[str, str]] = ()) -> None:
        if retention_days is not None and not retention_days > 0:
            raise ValueError("retention_days must be more than 0")
        self._target = db_path if isinstance(db_path, Target) else parse_target(db_path)
        self._path = self._target.shown  # for messages
        self._days = retention_days
        self._interval = interval
        self._batch = batch_size
        self._busy_ms = busy_timeout_ms
        self._clock = clock
        self._gap = gap  # the least pause between two of its transactions (see `paced`)
        self._task: asyncio.Task[None] | None = None
        self._stopping = threading.Event()
        self._wake: asyncio.Event | None = None
        self._views = tuple(views)  # rollup_views.wanted(rollup_pairs, report_zones)
        self.last: dict[str, int] = {}  # what the last run did
        self.runs = 0

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("RetentionTask already started")
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="meterproxy retention")

    async def stop(self) -> None:
        self._stopping.set()
        if self._wake is not None:
            self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait([task])  # never cancels the thread's batch midway

    async def run_once(self) -> dict[str, int]:
        """One pass in a worker thread; returns {"days_rolled", "dirty_rebuilt", "view_days", "pruned"}."""
        result = await asyncio.to_thread(self._once)
        self.last, self.runs = result, self.runs + 1
        return result

    async def _run(self) -> None:
        assert self._wake is not None
        while not self._stopping.is_set():
            try:
                result = await self.run_once()
                if result["pruned"]:
                    log.info("retention: %d call row(s) older than %s days pruned", result["pruned"], self._days)
                if result["dirty_rebuilt"]:
                    log.info("rollups: %d hour(s) rebuilt from calls", result["dirty_rebuilt"])
            except Exception:  # the next run tries again; a maintenance failure never stops the proxy
                log.exception("retention: maintenance of %s failed", self._path)
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval)
            except TimeoutError:
                pass

    def _connect(self) -> Conn:
        if self._target.is_postgres:
            conn = connect_postgres(self._target, application_name="meterproxy-upkeep")
            conn.execute(f"SET lock_timeout = {int(self._busy_ms)}")
            return conn
        raw = sqlite3.connect(self._target.where, timeout=self._busy_ms / 1000, isolation_level=None)
        raw.execute(f"PRAGMA busy_timeout = {int(self._busy_ms)}")
        return wrap_sqlite(raw, self._path)

    def _once(self) -> dict[str, int]:
        conn = self._connect()
        try:
            if not rollups.read_state(conn).exists:
                return {"days_rolled": 0, "dirty_rebuilt": 0, "view_days": 0, "pruned": 0}
            now = self._clock()
            days = hours = 0
            # One dirty hour, six hours' own rows, or one day per transaction, each followed by a pause
            # as long: none holds the lock long, and the ledger writer gets its turns. Dirty hours first:
            # own rows and days made from them before they are rebuilt would be made again.
            stop, gap = self._stopping, self._gap
            while not stop.is_set():
                n = paced(conn, lambda: rollup_build.rebuild_dirty(conn, max_hours=1), stop, gap)
                hours += n
                if not n:
                    break
            while not stop.is_set() and paced(conn, lambda: rollup_build.project_hours(conn, now, max_hours=6), stop, gap):
                pass
            while not stop.is_set():
                n = paced(conn, lambda: rollup_build.roll_days(conn, now, max_days=1), stop, gap)
                days += n
                if not n:
                    break
            # Rows per pair and per zone: one day per transaction, after the days they are made from.
            views = 0
            if self._views and not stop.is_set():
                in_transaction(conn, lambda: rollup_views.configure(conn, self._views))
                while not stop.is_set():
                    n = paced(conn, lambda: rollup_views.advance(conn, self._views), stop, gap)
                    views += n
                    if not n:
                        break
            pruned = 0
            if self._days is not None and not stop.is_set():
                pruned = prune(conn, now - self._days * 86400, self._batch, stop, gap)
            return {"days_rolled": days, "dirty_rebuilt": hours, "view_days": views, "pruned": pruned}
        finally:
            conn.close()
