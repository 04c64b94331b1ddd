"""Recomputing rollups: hours from `calls`, days from hours (with each dimension's own rows), months from days.

`roll_days` once a day is over, so day and month rows exist for reports over long ranges while the hot
path upserts hours only; `make_current` at start-up marks the hours of rows written behind the hook's
back (another tool, a ledger from before rollups) dirty, in one short transaction; `rebuild_dirty`
rebuilds dirty hours (those, or a re-pricing's), a few per transaction, and rolls a day or month up again
once its last dirty hour is done; `rebuild(conn, since, until)` recomputes a range at once. The proxy's
upkeep (retention.RetentionTask) runs them in the background; `ensure` runs them all, for tools and
tests. The caller owns the transaction (except in `make_current` and `ensure`, which take their own).
Both backends, on a `Conn` (a plain sqlite3 connection is wrapped); `in_transaction` takes the ledger's
write lock on PostgreSQL as BEGIN IMMEDIATE does on SQLite, so upkeep and batches never interleave.

This module must never recompute an hour before `pruned_before` (its raw calls are gone; the rollup is
all that is left), and never round a cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from proxy.ledger.db import lock_ledger
from proxy.ledger.rollups import (
    DAY,
    DIMS,
    HOUR,
    INT_COUNTERS,
    MONTH,
    SERIES,
    SUM_COST,
    SUM_COST_SLOW,
    TOTALS,
    AnyConn,
    add_bucket_sql,
    as_conn,
    dim_ids,
    exact_values,
    extent,
    hour_sql,
    month_start,
    next_month,
    projected,
    projection_dims,
    read_state,
    register_functions,
    summed_values,
    team_sql,
)  # fmt: skip
from proxy.ledger.sqlconn import Conn

__all__ = ["HOUR_SQL", "INSERT_SQL", "REGROUP_SQL", "after_reprice", "ensure", "has_dirty", "make_current",
           "project_hours", "rebuild", "rebuild_dirty", "regroup", "roll_days", "sums"]

HOUR_SQL = """
SELECT {hour} / 3600 * 3600 AS h, key_id, model, "user", operation, endpoint, status,
       {team} AS team,
       COUNT(*), COALESCE(SUM(CASE WHEN status NOT BETWEEN 200 AND 299 THEN 1 ELSE 0 END), 0),
       COALESCE(SUM(CASE WHEN priced = 0 THEN 1 ELSE 0 END), 0),
       SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), SUM(reasoning_tokens),
       SUM(total_tokens), SUM(CASE WHEN usage_source = 'counted' THEN 1 ELSE 0 END),
       SUM(CASE WHEN usage_source = 'counted' THEN total_tokens ELSE 0 END), decimal_sum(cost_usd)
FROM calls WHERE started_at >= ? AND started_at < ?
GROUP BY h, key_id, model, "user", operation, endpoint, status, team
"""  # {hour}, {team}: hour_sql and team_sql of the connection
_INTS = ", ".join(f"SUM(r.{c})" for c in INT_COUNTERS)
REGROUP_SQL = f"""
SELECT r.dim_id, {_INTS}, {{cost}}
FROM rollups r WHERE r.grain = ? AND r.bucket >= ? AND r.bucket < ? GROUP BY r.dim_id
"""
_SERIES_SQL = f"""
SELECT r.bucket, {_INTS}, {{cost}}
FROM rollups r WHERE r.grain = 0 AND r.bucket >= ? AND r.bucket < ? GROUP BY r.bucket
"""  # fixed column names only
# One dimension's own rows for each hour of a day, from the hours' full dimension sets.
_PROJECT_SQL = f"""
SELECT r.bucket, d."{{dim}}", {_INTS}, {{cost}}
FROM rollups r {{join}} rollup_dims d ON d.id = r.dim_id
WHERE r.grain = {HOUR} AND r.bucket >= ? AND r.bucket < ? GROUP BY r.bucket, d."{{dim}}"
"""  # {dim}: a name from DIMS only; {join}: SQLite's CROSS JOIN fixes the join order, PostgreSQL plans it
INSERT_SQL = f"""INSERT INTO rollups (grain, bucket, dim_id, {", ".join(INT_COUNTERS)}, cost_usd, cost_pico, cost_exp)
VALUES ({", ".join("?" * (3 + len(INT_COUNTERS) + 3))})"""
_DAY = 86400


def sums(conn: Conn, sql: str, params: tuple[Any, ...], keys: int,
          **names: str) -> list[tuple[Any, ...]]:
    """Rows of `sql` (a template with {cost}): `keys` leading group values, then the counter values."""
    width = keys + len(INT_COUNTERS)
    if conn.dialect == "postgres":
        # SUM of BIGINT is NUMERIC there (it never overflows): whole numbers, made ints here.
        found = conn.execute(sql.format(cost=SUM_COST, join="JOIN", **names), params).fetchall()
        return [(*r[:keys], *summed_values([int(v) for v in r[keys:width]],
                                           None if r[width] is None else int(r[width]), r[width + 1],
                                           None if r[width + 2] is None else format(r[width + 2], "f")))
                for r in found]
    try:
        found = conn.execute(sql.format(cost=SUM_COST, join="CROSS JOIN", **names), params).fetchall()
    except conn.OperationalError as exc:
        if "overflow" not in str(exc):
            raise
        found = conn.execute(sql.format(cost=SUM_COST_SLOW, join="CROSS JOIN", **names), params).fetchall()
    return [(*r[:keys], *summed_values(r[keys:width], *r[width:])) for r in found]


def _state(conn: Conn) -> tuple[int | None, int | None, int | None]:
    """days_until, pruned_before, projected_until."""
    days_until, pruned, projected_until = conn.execute(
        "SELECT days_until, pruned_before, projected_until FROM rollup_state WHERE id = 1").fetchone()
    return days_until, pruned, projected_until


def _first_day(conn: Conn, target: int) -> int:
    """The first day with data, or `target` if it is earlier or there is none."""
    whole = extent(conn)
    return target if whole is None else min(target, whole[0] - whole[0] % _DAY)


def rebuild(conn: AnyConn, since: float | None = None, until: float | None = None) -> int:
    """Recompute the hours [since, until) touches from `calls`, then the day and month rows over them;
    hours before `pruned_before` are left alone. With no bounds everything is rebuilt and the rollups are
    marked current (covered_id = max(calls.id)). Returns the hour rows written."""
    conn = as_conn(conn)
    register_functions(conn)
    days_until, pruned, projected_until = _state(conn)
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
            if projected_until is not None and lo < projected_until:
                _project_hours(conn, lo, min(hi, projected_until))
            if days_until is not None and lo < days_until:
                _roll_up(conn, lo - lo % _DAY, min(hi, days_until))
            conn.execute("DELETE FROM rollup_dirty WHERE hour >= ? AND hour < ?", (lo, hi))
            _views().rebuild(conn, lo, hi)
    if since is None and until is None:
        newest = conn.execute("SELECT coalesce(max(id), 0) FROM calls").fetchone()[0]
        conn.execute("UPDATE rollup_state SET covered_id = ? WHERE id = 1", (newest,))
    return written


def _rebuild_hours(conn: Conn, lo: int, hi: int) -> int:
    found = conn.execute(HOUR_SQL.format(hour=hour_sql(conn), team=team_sql(conn)), (lo, hi)).fetchall()
    if conn.dialect == "postgres":  # SUMs are NUMERIC there, the cost a Decimal: as SQLite gives them
        found = [(*r[:8], *(int(v) for v in r[8:18]), format(r[18], "f")) for r in found]
    ids = dim_ids(conn, {tuple(r[1:8]) for r in found})
    conn.execute("DELETE FROM rollups WHERE grain IN (?, ?) AND bucket >= ? AND bucket < ?",
                 (HOUR, HOUR + TOTALS, lo, hi))
    conn.executemany(INSERT_SQL, [(HOUR, r[0], ids[tuple(r[1:8])], *exact_values(r[8:18], r[18])) for r in found])
    series = sums(conn, _SERIES_SQL, (lo, hi), 1)
    conn.executemany(INSERT_SQL, [(HOUR + TOTALS, r[0], SERIES, *r[1:]) for r in series])
    return len(found)


def _roll_up(conn: Conn, lo: int, hi: int, fresh: bool = False) -> None:
    """Day rows for the days in [lo, hi) (day-aligned lo) from their hours, then their months from days.

    `fresh`: the days are at or after `days_until`, so no month row holds them yet: each day's rows are
    added to its month's instead of summing the whole month again."""
    days = range(lo, hi, _DAY)
    for day in days:
        _roll_day(conn, day)
        if fresh:
            month = month_start(day)
            for into, of in _MONTH_FROM_DAY:
                conn.execute(add_bucket_sql(conn), (into, month, of, day))
    if not fresh:
        for month in sorted({month_start(d) for d in days}):
            _roll_month(conn, month)


def _roll_day(conn: Conn, day: int) -> None:
    """A day's rows from its hours: its full dimension sets and totals, and every dimension's own rows for
    the day from its hours' own rows (which must be there)."""
    end = day + _DAY
    regroup(conn, DAY, HOUR, day, end)
    regroup(conn, DAY + TOTALS, HOUR + TOTALS, day, end)
    for dim in DIMS:
        regroup(conn, projected(DAY, dim), projected(HOUR, dim), day, end)


def _project_hours(conn: Conn, lo: int, hi: int) -> None:
    """Every dimension's own rows for the hours in [lo, hi), from their full dimension sets."""
    for i, dim in enumerate(DIMS):
        hour_grain = projected(HOUR, dim)
        conn.execute("DELETE FROM rollups WHERE grain = ? AND bucket >= ? AND bucket < ?", (hour_grain, lo, hi))
        found = sums(conn, _PROJECT_SQL, (lo, hi), 2, dim=dim)
        ids = dim_ids(conn, {projection_dims(i, r[1]) for r in found})
        conn.executemany(INSERT_SQL, [(hour_grain, r[0], ids[projection_dims(i, r[1])], *r[2:]) for r in found])


_MONTH_FROM_DAY = ((MONTH, DAY), (MONTH + TOTALS, DAY + TOTALS),
                   *((projected(MONTH, dim), projected(DAY, dim)) for dim in DIMS))


def _roll_month(conn: Conn, month: int) -> None:
    end = next_month(month)
    for into, of in _MONTH_FROM_DAY:
        regroup(conn, into, of, month, end)


def regroup(conn: Conn, into: int, of: int, start: int, end: int) -> None:
    """The `into` rows of the bucket at `start` from the `of` rows in [start, end), dimension set by set."""
    conn.execute("DELETE FROM rollups WHERE grain = ? AND bucket = ?", (into, start))
    found = sums(conn, REGROUP_SQL, (of, start, end), 1)
    conn.executemany(INSERT_SQL, [(into, start, *r) for r in found])


def project_hours(conn: AnyConn, until: float | None = None, max_hours: int = 24) -> int:
    """Give the hours after `projected_until` of the days that ended by `until` (default: now), at most
    `max_hours` of them, each dimension's own rows, and move `projected_until` on: the costly part of
    rolling a day up, done a few hours per transaction ahead of it. Returns the hours done."""
    conn = as_conn(conn)
    register_functions(conn)
    _, _, projected_until = _state(conn)
    target = int(time.time() if until is None else until) // _DAY * _DAY
    start = projected_until if projected_until is not None else _first_day(conn, target)
    end = min(target, start + max_hours * 3600)
    if end > start:
        _project_hours(conn, start, end)
    if projected_until is None or end > projected_until:
        conn.execute("UPDATE rollup_state SET projected_until = ? WHERE id = 1", (max(start, end),))
    return max(0, (end - start) // 3600)


def roll_days(conn: AnyConn, until: float | None = None, max_days: int = 62) -> int:
    """Roll up the days after `days_until` that end by `until` (default: now), at most `max_days` of them,
    into day and month rows, and move `days_until` on; hours `project_hours` has not reached yet get
    their own rows first. Returns the days rolled up."""
    conn = as_conn(conn)
    register_functions(conn)
    days_until, _, projected_until = _state(conn)
    target = int(time.time() if until is None else until) // _DAY * _DAY
    start = days_until if days_until is not None else _first_day(conn, target)
    end = min(target, start + max_days * _DAY)
    if end > start:
        if projected_until is None or projected_until < end:
            _project_hours(conn, start if projected_until is None else max(start, projected_until), end)
            conn.execute("UPDATE rollup_state SET projected_until = ? WHERE id = 1", (end,))
        _roll_up(conn, start, end, fresh=True)
    if days_until is None or end > days_until:
        conn.execute("UPDATE rollup_state SET days_until = ? WHERE id = 1", (max(start, end),))
    return max(0, (end - start) // _DAY)


def rebuild_dirty(conn: AnyConn, max_hours: int | None = 24, before: int | None = None) -> int:
    """Rebuild the hours marked dirty (oldest first, at most `max_hours`, None: all; only those before
    `before` if given), then the days and months they are in that have no dirty hour left (reports read
    a day or month with a dirty hour from its hours, so it is rolled up once, when its last one is
    rebuilt). Returns how many hours."""
    conn = as_conn(conn)
    register_functions(conn)
    sql, params = "SELECT hour FROM rollup_dirty", []
    if before is not None:
        sql, params = sql + " WHERE hour < ?", [before]
    sql += " ORDER BY hour"
    if max_hours is not None:
        sql, params = sql + " LIMIT ?", [*params, max_hours]
    hours = [h for (h,) in conn.execute(sql, params)]
    if not hours:
        return 0
    days_until, pruned, projected_until = _state(conn)
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
            if projected_until is not None and lo < projected_until:  # those hours have their own rows too
                _project_hours(conn, lo, min(hi, projected_until))
    conn.executemany("DELETE FROM rollup_dirty WHERE hour = ?", [(h,) for h in hours])
    if days_until is not None:
        days = sorted({h - h % _DAY for h in hours if h < days_until and (pruned is None or h >= pruned)})
        clean = [d for d in days if not has_dirty(conn, d, d + _DAY)]
        for day in clean:
            _roll_day(conn, day)
        for month in sorted({month_start(d) for d in clean}):  # month rows hold the days before days_until
            if not has_dirty(conn, month, min(next_month(month), days_until)):
                _roll_month(conn, month)
    for lo, hi in runs:  # the views' days over them, those with no dirty hour left
        _views().rebuild(conn, lo, hi)
    return len(hours)


def has_dirty(conn: Conn, lo: int, hi: int) -> bool:
    return conn.execute("SELECT 1 FROM rollup_dirty WHERE hour >= ? AND hour < ? LIMIT 1", (lo, hi)).fetchone() is not None


def after_reprice(conn: AnyConn, report: object = None) -> None:
    """For `proxy.reprice.reprice(after=...)`: rebuild, inside the re-pricing's own transaction, every hour
    it changed (its UPDATEs marked them dirty), so reports read the new costs from the rollups at once."""
    if read_state(conn).exists:
        rebuild_dirty(conn, max_hours=None)


def make_current(conn: AnyConn) -> bool:
    """If the rollups are not current (rows written without the hook, a ledger from before migration 5),
    mark every hour holding calls or rollups dirty and call the rollups current: reports read those
    hours from `calls` (right, if slower) until `rebuild_dirty` has rebuilt them, an hour per
    transaction, in the background (RetentionTask). One short IMMEDIATE transaction, whatever the
    ledger's size. Returns whether it marked anything. `conn` must be in autocommit mode
    (isolation_level=None)."""
    conn = as_conn(conn)
    state = read_state(conn)
    if not state.exists or state.current:
        return False

    def mark_if_stale() -> bool:
        if read_state(conn).current:  # another process did it while we waited for the lock
            return False
        _, pruned, _ = _state(conn)
        hours = set(_hours_with_calls(conn, pruned or 0))
        hours.update(h for (h,) in conn.execute("SELECT bucket FROM rollups WHERE grain = ? AND bucket >= ?",
                                                (HOUR + TOTALS, pruned or 0)))
        conn.executemany("INSERT INTO rollup_dirty (hour) VALUES (?) ON CONFLICT DO NOTHING",
                         [(h,) for h in sorted(hours)])
        newest = conn.execute("SELECT coalesce(max(id), 0) FROM calls").fetchone()[0]
        conn.execute("UPDATE rollup_state SET covered_id = ? WHERE id = 1", (newest,))
        return True

    return bool(in_transaction(conn, mark_if_stale))


def _hours_with_calls(conn: Conn, since: int) -> list[int]:
    """The hours from `since` on holding any call: one index seek each, not a scan of every call."""
    hours: list[int] = []
    at = since
    while True:
        found = conn.execute("SELECT min(started_at) FROM calls WHERE started_at >= ?", (at,)).fetchone()[0]
        if found is None:
            return hours
        hour = math.floor(found) // 3600 * 3600
        hours.append(hour)
        at = hour + 3600


def ensure(conn: AnyConn, until: float | None = None) -> bool:
    """make_current, then rebuild every dirty hour and roll every finished day up (a day or an hour per
    transaction): what the proxy's RetentionTask does in the background, all at once (for tests, the
    benchmark and tools). Returns whether make_current marked anything."""
    conn = as_conn(conn)
    marked = make_current(conn)
    if read_state(conn).exists:
        while in_transaction(conn, lambda: roll_days(conn, until, max_days=1)):
            pass
        while in_transaction(conn, lambda: rebuild_dirty(conn, max_hours=24)):
            pass
        while in_transaction(conn, lambda: _views().advance(conn)):
            pass
    return marked


def _views() -> Any:
    """rollup_views, which builds on this module's helpers (imported when first needed)."""
    from proxy.ledger import rollup_views

    return rollup_views


def in_transaction(conn: AnyConn, work: Callable[[], Any]) -> Any:
    """Run `work` in one write transaction on an autocommit connection, holding the ledger's write lock
    (SQLite: BEGIN IMMEDIATE; PostgreSQL: db.lock_ledger); roll back if it raises."""
    c = as_conn(conn)
    c.begin()
    try:
        lock_ledger(c)
        result = work()
        c.commit()
    except BaseException:
        c.rollback()
        raise
    return result
