"""Rollup views: day and month rows per pair of dimensions, and per configured time zone.

A view (a rollup_views row, `rollups.View`) holds rows at grains `View.grain(DAY)` and `View.grain(MONTH)`:
- zone '' (UTC), dims a pair (`rollup_pairs`: "user,model"): each UTC day's rows summed by that pair, made from
  the day's full dimension sets once the day is rolled up, and its month's rows (the days so far);
- a configured zone (`report_zones`): FULL, the local day's full dimension sets, made from the hours' rows
  (whole hours) and from `calls` (the part of an hour a half-hour zone's midnight cuts); and, made from those,
  the local day's totals (ALL), each dimension's own rows, each configured pair's; local months from their
  days.
Rows exist for the days starting in [days_from, days_until): `advance` (the upkeep, one day per transaction)
moves days_until on, UTC pair days up to `days_until` of the rollups, zone days up to `projected_until`
(every hour before it is finished); a view added later is built the same way from the ledger's first day, in
the background, and reports use its rows only where it covers. `rebuild` makes a view's days and months again
wherever the hours under them were rebuilt (rollup_build: a range, dirty hours, a re-pricing), once the day
holds no dirty hour. A call recorded late for an hour before projected_until marks its hour dirty (the
rollups' hook), so views are exact through late calls too.

This module must never read `calls` before `pruned_before` (a zone day that would need them starts the
zone's rows anew after it), never round a cost, and never commit: its callers own the transaction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from proxy.ledger.rollup_build import (
    HOUR_SQL,
    INSERT_SQL,
    REGROUP_SQL,
    has_dirty,
    regroup,
    sums,
)  # fmt: skip
from proxy.ledger.rollups import (
    ALL,
    DAY,
    DIMS,
    FULL,
    HOUR,
    INT_COUNTERS,
    MONTH,
    SERIES,
    AnyConn,
    View,
    add_bucket_sql,
    as_conn,
    dim_ids,
    exact_values,
    extent,
    hour_sql,
    month_start,
    next_month,
    read_state,
    read_views,
    register_functions,
    team_sql,
    upsert_sql,
    view_dims,
)  # fmt: skip
from proxy.ledger.sqlconn import Conn

__all__ = ["advance", "configure", "local_day", "local_month", "rebuild", "wanted"]

_DAY = 86400
_INTS = ", ".join(f"SUM(r.{c})" for c in INT_COUNTERS)


def wanted(pairs: Iterable[Iterable[str]], zones: Iterable[str]) -> list[tuple[str, str]]:
    """The (zone, dims) of every view `rollup_pairs` (DIMS names) and `report_zones` call for."""
    pair_dims = [view_dims(p) for p in pairs]
    out = [("", p) for p in pair_dims]
    for zone in zones:
        out += [(zone, FULL), (zone, ALL), *((zone, d) for d in DIMS), *((zone, p) for p in pair_dims)]
    return list(dict.fromkeys(out))


def configure(conn: AnyConn, views: Iterable[tuple[str, str]]) -> int:
    """Add the views (zone, dims) that do not exist yet (empty: `advance` builds them); returns how many.
    Views no longer wanted keep their rows and stay exact, and are no longer extended."""
    conn = as_conn(conn)
    have = {(v.zone, v.dims) for v in read_views(conn)}
    missing = [v for v in views if v not in have]
    if missing:
        conn.executemany("INSERT INTO rollup_views (zone, dims) VALUES (?, ?)", missing)
        conn.execute("UPDATE rollup_state SET views = (SELECT count(*) FROM rollup_views) WHERE id = 1")
    return len(missing)


# --- local days ------------------------------------------------------------------------------------
def _midnight(zone: ZoneInfo, year: int, month: int, day: int) -> int:
    return int(datetime(year, month, day, tzinfo=zone).timestamp())


def local_day(zone: ZoneInfo, t: float) -> tuple[int, int]:
    """[start, end) of the local day of `zone` holding unix time `t`."""
    d = datetime.fromtimestamp(t, zone).date()
    n = d + timedelta(days=1)
    return _midnight(zone, d.year, d.month, d.day), _midnight(zone, n.year, n.month, n.day)


def local_month(zone: ZoneInfo, t: float) -> tuple[int, int]:
    """[start, end) of the local month of `zone` holding unix time `t`."""
    d = datetime.fromtimestamp(t, zone)
    y, m = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return _midnight(zone, d.year, d.month, 1), _midnight(zone, y, m, 1)


def _bounds(view: View, t: int) -> tuple[int, int]:
    """The day of `view` starting at or holding `t`."""
    return (t - t % _DAY, t - t % _DAY + _DAY) if not view.zone else local_day(ZoneInfo(view.zone), t)


def _month(view: View, t: int) -> tuple[int, int]:
    return (month_start(t), next_month(month_start(t))) if not view.zone else local_month(ZoneInfo(view.zone), t)


def _cut(start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) outside whole hours (a half-hour zone's midnight), to read from calls."""
    ha, hb = math.ceil(start / 3600) * 3600, end - end % 3600
    return [(a, b) for a, b in ((start, min(ha, end)), (max(hb, start), end)) if a < b]


def _buildable(start: int, end: int, pruned: int | None) -> bool:
    """Whether the calls a zone day needs beyond its whole hours are still there."""
    return pruned is None or all(a - a % 3600 >= pruned for a, _ in _cut(start, end))


# --- one day of a view -----------------------------------------------------------------------------
def _full_day(conn: Conn, view: View, start: int, end: int) -> None:
    """A zone's local day of full dimension sets: its whole hours' rows, plus the cut parts from calls."""
    grain = view.grain(DAY)
    conn.execute("DELETE FROM rollups WHERE grain = ? AND bucket = ?", (grain, start))
    ha, hb = math.ceil(start / 3600) * 3600, end - end % 3600
    if ha < hb:
        conn.executemany(INSERT_SQL, [(grain, start, *r) for r in sums(conn, REGROUP_SQL, (HOUR, ha, hb), 1)])
    for a, b in _cut(start, end):
        found = conn.execute(HOUR_SQL.format(hour=hour_sql(conn), team=team_sql(conn)), (a, b)).fetchall()
        if conn.dialect == "postgres":
            found = [(*r[:8], *(int(v) for v in r[8:18]), format(r[18], "f")) for r in found]
        ids = dim_ids(conn, {tuple(r[1:8]) for r in found})
        conn.executemany(upsert_sql(conn),
                         [(grain, start, ids[tuple(r[1:8])], *exact_values(r[8:18], r[18])) for r in found])


def _projected_day(conn: Conn, view: View, of_grain: int, start: int) -> None:
    """`view`'s rows for the day at `start`, summed from the full dimension sets at (of_grain, start)."""
    grain = view.grain(DAY)
    conn.execute("DELETE FROM rollups WHERE grain = ? AND bucket = ?", (grain, start))
    names = view.names
    if not names:
        sql = (f"SELECT {_INTS}, {{cost}} FROM rollups r WHERE r.grain = ? AND r.bucket = ? "
               "HAVING COUNT(*) > 0")
        conn.executemany(INSERT_SQL, [(grain, start, SERIES, *r) for r in sums(conn, sql, (of_grain, start), 0)])
        return
    cols = ", ".join(f'd."{n}"' for n in names)
    sql = (f"SELECT {cols}, {_INTS}, {{cost}} FROM rollups r {{join}} rollup_dims d ON d.id = r.dim_id "
           f"WHERE r.grain = ? AND r.bucket = ? GROUP BY {cols}")
    found = sums(conn, sql, (of_grain, start), len(names))
    index = [DIMS.index(n) for n in names]

    def dims(row: tuple[Any, ...]) -> tuple[Any, ...]:
        values = dict(zip(index, row))
        return tuple(values.get(i) for i in range(len(DIMS)))

    ids = dim_ids(conn, {dims(r) for r in found})
    conn.executemany(INSERT_SQL, [(grain, start, ids[dims(r)], *r[len(names):]) for r in found])


def _day(conn: Conn, view: View, start: int, end: int, full: View | None) -> None:
    """`view`'s rows for the day [start, end): a UTC pair's from the day rows, a zone's FULL from hours and
    calls, the zone's others from its FULL rows (`full`)."""
    if not view.zone:
        _projected_day(conn, view, DAY, start)
    elif view.dims == FULL:
        _full_day(conn, view, start, end)
    else:
        assert full is not None
        _projected_day(conn, view, full.grain(DAY), start)


def _set(conn: Conn, view: View, days_from: int | None, days_until: int | None) -> View:
    conn.execute("UPDATE rollup_views SET days_from = ?, days_until = ? WHERE id = ?",
                 (days_from, days_until, view.id))
    return View(view.id, view.zone, view.dims, days_from, days_until)


# --- the upkeep ------------------------------------------------------------------------------------
def advance(conn: AnyConn, only: Iterable[tuple[str, str]] | None = None) -> int:
    """Build one more day of the first view (of `only`, default all) that is behind, adding it to its month
    and moving its days_until on; a zone's FULL day brings its other views that are level with it along.
    Returns how many days were built (0: every view is up to date)."""
    conn = as_conn(conn)
    register_functions(conn)
    state = read_state(conn)
    if not state.current or not state.views:
        return 0
    keep = None if only is None else set(only)
    views = [v for v in state.views if keep is None or (v.zone, v.dims) in keep]
    fulls = {v.zone: v for v in state.views if v.zone and v.dims == FULL}
    whole = extent(conn)
    if whole is None:
        return 0
    for view in views:
        full = fulls.get(view.zone)
        if not view.zone:
            limit = state.days_until
            first = whole[0] - whole[0] % _DAY
        elif view.dims == FULL:
            limit = state.projected_until
            first = local_day(ZoneInfo(view.zone), whole[0])[0]
        else:
            if full is None or full.days_from is None or full.days_until is None:
                continue
            limit, first = full.days_until, full.days_from
            if view.days_until is not None and view.days_until < full.days_from:  # its FULL started anew
                view = _set(conn, view, None, None)
        start = first if view.days_until is None else view.days_until
        if limit is None:
            continue
        start, end = _bounds(view, start)
        if end > limit:
            continue
        built = [view]
        if view.zone and view.dims == FULL:  # the zone's others that are level with it come along
            built += [v for v in views if v.zone == view.zone and v.dims != FULL and v.days_until == view.days_until]
        if view.zone and view.dims == FULL and not _buildable(start, end, state.pruned_before):
            for v in built:  # its cut hour's calls are pruned: its rows start after it
                _set(conn, v, end, end)
            return 1
        days_from = start if view.days_from is None or view.days_until is None else view.days_from
        source = view if view.zone and view.dims == FULL else full
        for v in built:
            _day(conn, v, start, end, source)
            month = _month(v, start)[0]
            conn.execute(add_bucket_sql(conn), (v.grain(MONTH), month, v.grain(DAY), start))
            _set(conn, v, days_from, end)
        return 1
    return 0


def rebuild(conn: AnyConn, lo: int, hi: int) -> None:
    """Make every view's days overlapping the hours [lo, hi) again (those it covers, with no dirty hour left),
    and their months: after those hours were rebuilt from calls (rollup_build)."""
    conn = as_conn(conn)
    views = read_views(conn)
    if not views:
        return
    pruned = conn.execute("SELECT pruned_before FROM rollup_state WHERE id = 1").fetchone()[0]
    fulls = {v.zone: v for v in views if v.zone and v.dims == FULL}
    # FULL views first: their zone's other views are made from them.
    for view in sorted(views, key=lambda v: (v.dims != FULL, v.id)):
        if view.days_from is None or view.days_until is None:
            continue
        if view.zone and view.dims != FULL:
            full = fulls.get(view.zone)
            if full is None or not full.covers(view.days_from, view.days_until):
                continue  # its FULL started anew: `advance` starts it again too
        else:
            full = None
        months: set[int] = set()
        t, _ = _bounds(view, max(lo, view.days_from))
        until = view.days_until
        while t < min(hi, until):
            start, end = _bounds(view, t)
            t = end
            if start < (view.days_from or start) or end > until or has_dirty(conn, start - start % 3600, end):
                continue
            if view.zone and view.dims == FULL and not _buildable(start, end, pruned):
                # Its calls are gone: the rows up to here stay unused (the zone's rows start after it).
                view = fulls[view.zone] = _set(conn, view, end, max(end, until))
                months.clear()
                continue
            _day(conn, view, start, end, full)
            months.add(_month(view, start)[0])
        for month in sorted(months):
            m_end = _month(view, month)[1]
            if not has_dirty(conn, month, min(m_end, until)):
                regroup(conn, view.grain(MONTH), view.grain(DAY), month, m_end)
