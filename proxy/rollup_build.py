"""Recomputing rollups: hours from `calls`, days from hours, months from days.

`rebuild(conn, since, until)` after anything that changed calls behind the hook's back (a re-pricing, an
import, rows written by another tool, an upgrade to migration 5); `roll_days` once a day is over, so day
and month rows exist for reports over long ranges while the hot path upserts hours only; `ensure` at
start-up; `rebuild_dirty` for hours a re-pricing marked. The caller owns the transaction (except in
`ensure`, which takes its own).

This module must never recompute an hour before `pruned_before` (its raw calls are gone; the rollup is
all that is left), and never round a cost.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from proxy.rollups import (
    DAY, HOUR, INT_COUNTERS, MONTH, SERIES, TOTALS, dim_ids, exact_values, extent, month_start, next_month, read_state,
    register_functions,
)  # fmt: skip

__all__ = ["after_reprice", "ensure", "make_current", "rebuild", "rebuild_dirty", "roll_days"]

_HOUR_SQL = """
SELECT CAST(started_at AS INTEGER) / 3600 * 3600 AS h, key_id, model, "user", operation, endpoint, status,
       json_extract(tags, '$."team"') AS team,
       COUNT(*), COALESCE(SUM(status NOT BETWEEN 200 AND 299), 0), COALESCE(SUM(priced = 0), 0),
       SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), SUM(reasoning_tokens),
       SUM(total_tokens), SUM(usage_source = 'counted'),
       SUM(CASE WHEN usage_source = 'counted' THEN total_tokens ELSE 0 END), decimal_sum(cost_usd)
FROM calls WHERE started_at >= ? AND started_at < ?
GROUP BY h, key_id, model, "user", operation, endpoint, status, team
"""
_REGROUP_SQL = f"""
SELECT dim_id, {", ".join(f"SUM({c})" for c in INT_COUNTERS)}, decimal_sum(cost_usd)
FROM rollups WHERE grain = ? AND bucket >= ? AND bucket < ? GROUP BY dim_id
"""
_SERIES_SQL = f"""
SELECT bucket, {", ".join(f"SUM({c})" for c in INT_COUNTERS)}, decimal_sum(cost_usd)
FROM rollups WHERE grain = 0 AND bucket >= ? AND bucket < ? GROUP BY bucket
"""  # fixed column names only
_INSERT = f"""INSERT INTO rollups (grain, bucket, dim_id, {", ".join(INT_COUNTERS)}, cost_usd, cost_pico, cost_exp)
VALUES ({", ".join("?" * (3 + len(INT_COUNTERS) + 3))})"""
_DAY = 86400


def _state(conn: sqlite3.Connection) -> tuple[int | None, int | None]:
    days_until, pruned = conn.execute("SELECT days_until, pruned_before FROM rollup_state WHERE id = 1").fetchone()
    return days_until, pruned


def rebuild(conn: sqlite3.Connection, since: float | None = None, until: float | None = None) -> int:
    """Recompute the hours [since, until) touches from `calls`, then the day and month rows over them;
    hours before `pruned_before` are left alone. With no bounds everything is rebuilt and the rollups are
    marked current (covered_id = max(calls.id)). Returns the hour rows written."""
    register_functions(conn)
    days_until, pruned = _state(conn)
    lo = int(since) // 3600 * 3600 if since is not None else None
    hi = math.ceil(until / 3600) * 3600 if until is not None else None
    whole = extent(conn) if lo is None or hi is None else None
    if whole is not None:
        lo, hi = (whole[0] if lo is None else lo), (whole[1] if hi is None else hi)
    written = 0
    if lo is not None and hi is not None:
        lo = max(lo, pruned) if pruned is not None else lo
        if lo < hi:
            written = _rebuild_hours(conn, lo, hi)
            if days_until is not None and lo < days_until:
                _roll_up(conn, lo - lo % _DAY, min(hi, days_until))
            conn.execute("DELETE FROM rollup_dirty WHERE hour >= ? AND hour < ?", (lo, hi))
    if since is None and until is None:
        newest = conn.execute("SELECT coalesce(max(id), 0) FROM calls").fetchone()[0]
        conn.execute("UPDATE rollup_state SET covered_id = ? WHERE id = 1", (newest,))
    return written


def _rebuild_hours(conn: sqlite3.Connection, lo: int, hi: int) -> int:
    found = conn.execute(_HOUR_SQL, (lo, hi)).fetchall()
    ids = dim_ids(conn, {tuple(r[1:8]) for r in found})
    conn.execute("DELETE FROM rollups WHERE grain IN (?, ?) AND bucket >= ? AND bucket < ?",
                 (HOUR, HOUR + TOTALS, lo, hi))
    conn.executemany(_INSERT, [(HOUR, r[0], ids[tuple(r[1:8])], *exact_values(r[8:18], r[18])) for r in found])
    series = conn.execute(_SERIES_SQL, (lo, hi)).fetchall()
    conn.executemany(_INSERT, [(HOUR + TOTALS, r[0], SERIES, *exact_values(r[1:11], r[11])) for r in series])
    return len(found)


def _roll_up(conn: sqlite3.Connection, lo: int, hi: int) -> None:
    """Day rows for the days in [lo, hi) (day-aligned lo) from their hours, then their months from days."""
    days = range(lo, hi, _DAY)
    for day in days:
        _regroup(conn, DAY, HOUR, day, day + _DAY)
    for month in sorted({month_start(d) for d in days}):
        _regroup(conn, MONTH, DAY, month, next_month(month))


def _regroup(conn: sqlite3.Connection, grain: int, source: int, start: int, end: int) -> None:
    """The `grain` rows of the bucket at `start` from the `source` rows in [start, end); totals too."""
    for into, of in ((grain, source), (grain + TOTALS, source + TOTALS)):
        conn.execute("DELETE FROM rollups WHERE grain = ? AND bucket = ?", (into, start))
        found = conn.execute(_REGROUP_SQL, (of, start, end)).fetchall()
        conn.executemany(_INSERT, [(into, start, r[0], *exact_values(r[1:11], r[11])) for r in found])


def roll_days(conn: sqlite3.Connection, until: float | None = None, max_days: int = 62) -> int:
    """Roll up the days after `days_until` that end by `until` (default: now), at most `max_days` of them,
    into day and month rows, and move `days_until` on. Returns the days rolled up."""
    register_functions(conn)
    days_until, _ = _state(conn)
    target = int(time.time() if until is None else until) // _DAY * _DAY
    start = days_until
    if start is None:  # never rolled up: from the first day with data
        whole = extent(conn)
        start = target if whole is None else min(target, whole[0] - whole[0] % _DAY)
    end = min(target, start + max_days * _DAY)
    if end > start:
        _roll_up(conn, start, end)
    if days_until is None or end > days_until:
        conn.execute("UPDATE rollup_state SET days_until = ? WHERE id = 1", (max(start, end),))
    return max(0, (end - start) // _DAY)


def rebuild_dirty(conn: sqlite3.Connection, max_hours: int | None = 24) -> int:
    """Rebuild the hours marked dirty (oldest first, at most `max_hours`; None: all), then their days and
    months once each. Returns how many hours."""
    register_functions(conn)
    sql, params = "SELECT hour FROM rollup_dirty ORDER BY hour", []
    if max_hours is not None:
        sql, params = sql + " LIMIT ?", [max_hours]
    hours = [h for (h,) in conn.execute(sql, params)]
    if not hours:
        return 0
    days_until, pruned = _state(conn)
    runs: list[list[int]] = []
    for hour in hours:  # contiguous hours as one recomputation each
        if runs and runs[-1][1] == hour:
            runs[-1][1] = hour + 3600
        else:
            runs.append([hour, hour + 3600])
    for lo, hi in runs:
        lo = max(lo, pruned) if pruned is not None else lo
        if lo < hi:
            _rebuild_hours(conn, lo, hi)
    if days_until is not None:
        days = sorted({h - h % _DAY for h in hours if h < days_until and (pruned is None or h >= pruned)})
        for day in days:
            _regroup(conn, DAY, HOUR, day, day + _DAY)
        for month in sorted({month_start(d) for d in days}):
            _regroup(conn, MONTH, DAY, month, next_month(month))
    conn.executemany("DELETE FROM rollup_dirty WHERE hour = ?", [(h,) for h in hours])
    return len(hours)


def after_reprice(conn: sqlite3.Connection, report: object = None) -> None:
    """For `proxy.reprice.reprice(after=...)`: rebuild, inside the re-pricing's own transaction, every hour
    it changed (its UPDATEs marked them dirty), so reports read the new costs from the rollups at once."""
    if read_state(conn).exists:
        rebuild_dirty(conn, max_hours=None)


def make_current(conn: sqlite3.Connection) -> bool:
    """A full rebuild, in one IMMEDIATE transaction, if the rollups are not current (rows written without
    the hook, a ledger from before migration 5). Returns whether it rebuilt. `conn` must be in autocommit
    mode (isolation_level=None)."""
    state = read_state(conn)
    if not state.exists or state.current:
        return False

    def rebuild_if_stale() -> bool:
        if read_state(conn).current:  # another process rebuilt it while we waited for the lock
            return False
        rebuild(conn)
        return True

    return bool(in_transaction(conn, rebuild_if_stale))


def ensure(conn: sqlite3.Connection, until: float | None = None) -> bool:
    """make_current, then roll every finished day up (a month of days per transaction). Run it before
    the proxy takes traffic: a full rebuild of a large ledger takes a while (bench/report_scale.py
    measures it). Returns whether it rebuilt."""
    rebuilt = make_current(conn)
    if read_state(conn).exists:
        while in_transaction(conn, lambda: roll_days(conn, until, max_days=31)):
            pass
    return rebuilt


def in_transaction(conn: sqlite3.Connection, work: Callable[[], Any]) -> Any:
    """Run `work` in one IMMEDIATE transaction on an autocommit connection; roll back if it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result
