"""Rollups: the ledger's counters per hour, day and month, kept in step with `calls` for fast reports.

A rollup row holds, for one time bucket (UTC hour, day or month start, unix seconds) and one dimension
set (key_id, model, user, operation, endpoint, status, team = the `team` tag; grains hour/day/month +
TOTALS hold each bucket's totals over all of them, for reports by time alone), the same counters a usage
report sums: calls, errors, unpriced_calls, tokens, counted_calls / counted_tokens, and the cost. The cost
is exact decimal text (`cost_usd`, the truth), plus the same sum in picodollars (`cost_pico`, 1e-12 USD)
with the smallest exponent of the costs in it (`cost_exp`) whenever that is exact, so that reports can
add costs in SQL integers and still print exactly what adding the decimals would.

`apply` is the ledger's after_insert hook: it runs inside the batch's transaction, aggregates the batch
in Python and upserts one row per touched (hour, dims) — and per (day, dims) and (month, dims) only for
hours before `days_until`: day and month rows are rolled up from the hours once a day is over
(`roll_days`, run by the maintenance task), which keeps the hot path at one upsert per group.
`rebuild` recomputes hours from `calls` and days and months from hours (after a re-pricing, an import);
both live in rollup_build.py. `rollup_state.covered_id` says up to which calls.id the rollups hold every
row; reports trust the rollups only while it equals max(calls.id). Rows written without the hook (a
script, another tool, a ledger from before rollups) break that until `make_current` (at start-up) marks
every hour holding calls dirty: reports read dirty hours from `calls`, and the upkeep rebuilds them an
hour per transaction (`rebuild_dirty`). Hours before `pruned_before` (retention) exist only here; a
re-pricing of a call still in `calls` in such an hour moves their rows by its delta (`move_pruned`).

Projections: for finished hours (before `projected_until`, made a few hours per transaction by
`project_hours`) and for rolled-up days and months (before `days_until`) each dimension also has rows of
its own, at grain `projected(grain, dim)`, summed over every other dimension. A report that groups or
filters by one dimension alone (by model, by key per week, a key's daily totals) reads those: tens of rows
per bucket where the full dimension sets are thousands. Their dim_id names a rollup_dims row holding that
dimension's value and NULL for the others (`projection_dims`); only the projected column of it means
anything.

Views (rollup_views.py builds them; `View`, `read_views` here): day and month rows per configured pair of
dimensions (UTC) and per configured zone (local days and months: full sets, totals, each dimension's and
each pair's), at grains VIEW_BASE + VIEW_STEP * view id + DAY/MONTH. The hook never writes them: a call
for an hour before projected_until marks its hour dirty when any view exists, and the upkeep rebuilds it.

Both backends: every function takes a `Conn` (a plain sqlite3 connection is wrapped). The SQL is shared
where the engines agree; the cost upsert, the hour of a timestamp and the team expression are spelled
per dialect beside each other (`upsert_sql`, `add_bucket_sql`, `hour_sql`, `team_sql`).

covered_id — the rule, on both backends: every write transaction that adds calls rows holds the ledger's
write lock from before its first INSERT to its commit (SQLite: BEGIN IMMEDIATE; PostgreSQL:
`db.lock_ledger`, SHARE ROW EXCLUSIVE on calls, which every other INSERT waits for too). So the batches
of every replica commit one at a time, ids are handed out to one of them at a time, and when `apply`
runs, every row another transaction added is committed and visible. `apply` then moves covered_id to
max(calls.id) if the only rows above covered_id are the batch's own, and sets it to -1 (not current)
otherwise. SQLite reuses the ids of a rolled-back batch, so there "only the batch's" is covered_id +
len(rows) == max(id); a PostgreSQL sequence leaves gaps after a rollback, so there it is a count of the
rows above covered_id. Ids committing out of order cannot happen under the lock; without it (a plain
INSERT by another tool racing a batch) the lock makes that INSERT wait, and the next batch sees it.

This module must never round a cost, never recompute an hour whose raw calls were pruned, and never
commit or roll back: its callers own the transaction.
"""

from __future__ import annotations

import calendar
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from proxy.core.attribution import TEAM_TAG
from proxy.ledger.db import COLUMNS, TwoPhase
from proxy.ledger.picodollars import (
    EXACT,
    PICO_DIGITS,
    PICO_LIMIT,
    SUM_COST,
    SUM_COST_SLOW,
    exact_values,
    from_pico,
    parse_plain,
    pico,
    pico_text,
    register_functions,
    summed_values,
)  # fmt: skip
from proxy.ledger.sqlconn import Conn, wrap_sqlite

__all__ = [
    "ADD_BUCKET", "ALL", "COVERED_SQL", "DAY", "DIMS", "FULL", "VIEW_BASE", "VIEW_STEP", "View", "read_views",
    "view_dims", "GRAINS", "HOUR", "INT_COUNTERS", "MONTH", "PROJECTED", "SERIES", "SUM_COST",
    "SUM_COST_SLOW", "TEAM_SQL", "TOTALS", "AnyConn", "State", "add_bucket_sql", "as_conn", "hour_sql", "team_sql",
    "upsert_sql", "apply", "dim_ids", "dirty_hours", "exact_values",
    "dims_of", "extent", "from_pico", "month_start", "move_pruned", "next_month", "pico", "pico_text", "projected",
    "projection_dims", "read_state", "register_functions", "summed_values",
]  # fmt: skip

HOUR, DAY, MONTH = 0, 1, 2
# A bucket's totals over every dimension set, for reports by time alone: their own grains (so that a range
# of them is contiguous in the primary key), with dim_id SERIES (rollup_dims ids start at 1).
TOTALS = 3  # grain + TOTALS
SERIES = 0
GRAINS = {"hour": HOUR, "day": DAY, "month": MONTH}
DIMS = ("key_id", "model", "user", "operation", "endpoint", "status", "team")
# One dimension's own rows (see the module docstring): grain + PROJECTED * (its index in DIMS + 1).
PROJECTED = 10
INT_COUNTERS = (
    "calls", "errors", "unpriced_calls", "prompt_tokens", "completion_tokens", "cached_tokens",
    "reasoning_tokens", "total_tokens", "counted_calls", "counted_tokens",
)  # fmt: skip
_COL = {name: COLUMNS.index(name) for name in (
    "started_at", "key_id", "model", "user", "operation", "endpoint", "status", "tags", "prompt_tokens",
    "completion_tokens", "cached_tokens", "reasoning_tokens", "total_tokens", "usage_source", "priced",
    "cost_usd")}  # fmt: skip

_DIM_SQL = " AND ".join(f'"{d}" IS ?' for d in DIMS)
_DIM_COLUMNS = ", ".join(f'"{d}"' for d in DIMS)
_D_COLUMNS = ", ".join(f'd."{d}"' for d in DIMS)
_P = "(cost_pico + excluded.cost_pico)"
_FITS = f"typeof({_P}) = 'integer' AND {_P} < {PICO_LIMIT}"
_E = "min(cost_exp, excluded.cost_exp)"
# The cost text of picodollars P with exponent E, in SQL: no Python call while both sides are whole
# picodollars (the common case); mp_decimal_add only when one is not.
_P_TEXT = (f"({_P} / {10**PICO_DIGITS}) || CASE WHEN {_E} < 0 THEN '.' || "
           f"substr(printf('%0{PICO_DIGITS}d', {_P} % {10**PICO_DIGITS}), 1, -{_E}) ELSE '' END")
_COUNTER_COLUMNS = f"{', '.join(INT_COUNTERS)}, cost_usd, cost_pico, cost_exp"
_INTO = f"INSERT INTO rollups (grain, bucket, dim_id, {_COUNTER_COLUMNS})"
_UPSERT = f"""
{_INTO} VALUES ({", ".join("?" * (3 + len(INT_COUNTERS) + 3))})
ON CONFLICT (grain, bucket, dim_id) DO UPDATE SET
    {", ".join(f"{c} = {c} + excluded.{c}" for c in INT_COUNTERS)},
    cost_usd = CASE WHEN {_FITS} THEN {_P_TEXT} ELSE mp_decimal_add(cost_usd, excluded.cost_usd) END,
    cost_pico = CASE WHEN {_FITS} THEN {_P} END,
    cost_exp = CASE WHEN {_FITS} THEN {_E} END
"""
# PostgreSQL: NUMERIC adds exactly by itself; the picodollars stay while both sides have them and the sum
# fits (both are below 2**62, so the sum cannot overflow BIGINT before it is compared).
_PG_P = "(rollups.cost_pico + excluded.cost_pico)"
_PG_FITS = f"rollups.cost_pico IS NOT NULL AND excluded.cost_pico IS NOT NULL AND {_PG_P} < {PICO_LIMIT}"
_PG_UPSERT = f"""
{_INTO} VALUES ({", ".join("?" * (3 + len(INT_COUNTERS) + 3))})
ON CONFLICT (grain, bucket, dim_id) DO UPDATE SET
    {", ".join(f"{c} = rollups.{c} + excluded.{c}" for c in INT_COUNTERS)},
    cost_usd = rollups.cost_usd + excluded.cost_usd,
    cost_pico = CASE WHEN {_PG_FITS} THEN {_PG_P} END,
    cost_exp = CASE WHEN {_PG_FITS} THEN least(rollups.cost_exp, excluded.cost_exp) END
"""
# The same for many rows in one statement (one round trip, one plan): the rows as one JSON array of arrays,
# in key order, so that two batches touching some of the same rows lock them in the same order. One text
# parameter costs psycopg a few microseconds where an array per column cost ~40 (its list dumpers are
# Python); `->>` gives each number's own text, cast exactly (bigint, numeric), and JSON null is NULL.
_PG_TYPES = ("integer", "bigint", "bigint", *("bigint" for _ in INT_COUNTERS), "numeric", "bigint", "integer")
_PG_UPSERT_ROWS = _PG_UPSERT.replace(
    f"VALUES ({', '.join('?' * (3 + len(INT_COUNTERS) + 3))})",
    "SELECT " + ", ".join(f"(r ->> {i})::{t}" for i, t in enumerate(_PG_TYPES))
    + " FROM json_array_elements(?::json) AS r ORDER BY 1, 2, 3")
_JSON_ROWS = json.JSONEncoder(separators=(",", ":"), check_circular=False)  # no default: only int, str, None
_BUCKET_SELECT = (f"SELECT ?, ?, dim_id, {_COUNTER_COLUMNS} FROM rollups WHERE grain = ? AND bucket = ? "
                  "ORDER BY dim_id")
# Add the rows of one bucket (grain ?, bucket ?) into another bucket (grain ?, bucket ?), row by row.
ADD_BUCKET = _UPSERT.replace(f"VALUES ({', '.join('?' * (3 + len(INT_COUNTERS) + 3))})", _BUCKET_SELECT)
_PG_ADD_BUCKET = _PG_UPSERT.replace(f"VALUES ({', '.join('?' * (3 + len(INT_COUNTERS) + 3))})", _BUCKET_SELECT)

AnyConn = Conn | sqlite3.Connection


def as_conn(conn: AnyConn) -> Conn:
    """`conn` as a Conn: a plain sqlite3 connection (autocommit, isolation_level=None) is wrapped."""
    return conn if isinstance(conn, Conn) else wrap_sqlite(conn)


def upsert_sql(conn: Conn) -> str:
    """Add one rollup row's counters (VALUES) into the row of its (grain, bucket, dim_id)."""
    return _PG_UPSERT if conn.dialect == "postgres" else _UPSERT


def add_bucket_sql(conn: Conn) -> str:
    """ADD_BUCKET in the dialect of `conn`."""
    return _PG_ADD_BUCKET if conn.dialect == "postgres" else ADD_BUCKET


def hour_sql(conn: Conn, column: str = "started_at") -> str:
    """The whole seconds of a unix time column, in SQL (truncated; PostgreSQL's CAST would round)."""
    return f"floor({column})::BIGINT" if conn.dialect == "postgres" else f"CAST({column} AS INTEGER)"


def projected(grain: int, dim: str) -> int:
    """The grain of `dim`'s own rows for HOUR, DAY or MONTH."""
    return grain + PROJECTED * (DIMS.index(dim) + 1)


def projection_dims(index: int, value: Any) -> tuple[Any, ...]:
    """The rollup_dims tuple naming value `value` of DIMS[index] alone."""
    return tuple(value if i == index else None for i in range(len(DIMS)))


# --- time buckets ----------------------------------------------------------------------------------
def month_start(ts: int) -> int:
    y, m = time.gmtime(ts)[:2]
    return calendar.timegm((y, m, 1, 0, 0, 0))


def next_month(start: int) -> int:
    y, m = time.gmtime(start)[:2]
    return calendar.timegm((y + m // 12, m % 12 + 1, 1, 0, 0, 0))


# --- the after_insert hook -------------------------------------------------------------------------
class _Acc:
    """One bucket's sums while a batch is aggregated: whole picodollars in integers, any other cost
    exactly in `slow`. Their sum has the exponent adding every cost as a Decimal would give."""

    __slots__ = ("exp", "ints", "pico", "slow")

    def __init__(self) -> None:
        self.ints = [0] * len(INT_COUNTERS)
        self.pico = 0
        self.exp = 0  # as decimal_sum, which starts from Decimal(0)
        self.slow: Decimal | None = None

    def add_cost(self, text: str) -> None:
        parsed = parse_plain(text)
        if parsed is not None:
            self.pico += parsed[0]
            self.exp = min(self.exp, parsed[1])
        else:
            self.slow = EXACT.add(self.slow if self.slow is not None else Decimal(0), Decimal(text))

    def merge(self, other: _Acc) -> None:
        self.ints = [a + b for a, b in zip(self.ints, other.ints)]
        self.pico += other.pico
        self.exp = min(self.exp, other.exp)
        if other.slow is not None:
            self.slow = EXACT.add(self.slow if self.slow is not None else Decimal(0), other.slow)

    def values(self) -> tuple[Any, ...]:
        if self.slow is None and self.pico < PICO_LIMIT:
            return (*self.ints, pico_text(self.pico, self.exp), self.pico, self.exp)
        total = EXACT.add(from_pico(self.pico, self.exp), self.slow or Decimal(0))
        return exact_values(self.ints, format(total, "f"))


# The team of a call is its "team" tag (X-Meter-Team, or the managed key's team): `core.attribution.team_of`
# on a record, TEAM_SQL on a stored row, `_team` on a row about to be stored (what TEAM_SQL will read).
# Migration 3 indexes this very expression; a query must spell it the same way to use the index.
TEAM_SQL = f"(CASE WHEN json_valid(tags) THEN json_extract(tags, '$.{TEAM_TAG}') END)"
_PG_TEAM_SQL = "meter_team(tags)"  # migrations_postgres: text, NULL when tags is not a JSON object


def team_sql(conn: Conn) -> str:
    """TEAM_SQL in the dialect of `conn` (the expression its team index is on)."""
    return _PG_TEAM_SQL if conn.dialect == "postgres" else TEAM_SQL


def _team(tags: str) -> Any:
    if tags == "{}":
        return None
    value = json.loads(tags).get(TEAM_TAG)
    if value is None or isinstance(value, (str, int, float)):
        return int(value) if isinstance(value, bool) else value  # as json_extract returns it
    return json.dumps(value, separators=(",", ":"))


def _pg_team(tags: str) -> Any:
    """What meter_team(tags) (jsonb ->> 'team') returns: always text."""
    if tags == "{}":
        return None
    value = json.loads(tags).get(TEAM_TAG)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, separators=(", ", ": "))


def _aggregate(rows: Iterable[Sequence[Any]], team_of: Any = _team) -> dict[tuple[int, tuple[Any, ...]], _Acc]:
    """Sums per (hour, dims) over the batch's rows."""
    c = _COL
    teams: dict[str, Any] = {}
    out: dict[tuple[int, tuple[Any, ...]], _Acc] = {}
    for row in rows:
        tags = row[c["tags"]]
        team = teams[tags] if tags in teams else teams.setdefault(tags, team_of(tags))
        status = row[c["status"]]
        key = (int(row[c["started_at"]]) // 3600 * 3600,
               (row[c["key_id"]], row[c["model"]], row[c["user"]], row[c["operation"]], row[c["endpoint"]],
                status, team))  # fmt: skip
        acc = out.get(key)
        if acc is None:
            acc = out[key] = _Acc()
        counted = row[c["usage_source"]] == "counted"
        total = row[c["total_tokens"]]
        ints = acc.ints
        ints[0] += 1
        ints[1] += not 200 <= status <= 299
        ints[2] += not row[c["priced"]]
        ints[3] += row[c["prompt_tokens"]]
        ints[4] += row[c["completion_tokens"]]
        ints[5] += row[c["cached_tokens"]]
        ints[6] += row[c["reasoning_tokens"]]
        ints[7] += total
        ints[8] += counted
        ints[9] += total if counted else 0
        acc.add_cost(row[c["cost_usd"]])
    return out


# id(conn) -> (the newest rollup_dims row when last seen, dims -> id). The newest row is checked before
# each use: ids are never reused except after a rollback, and a rollback changes the newest row.
_DIM_CACHE: dict[int, tuple[tuple[Any, ...] | None, dict[tuple[Any, ...], int]]] = {}
_DIM_CACHE_MAX = 200_000




# PostgreSQL: dimension sets (a JSON array of DIMS-ordered arrays, sorted: two transactions adding the same
# new sets lock them in the same order) added where absent, every one's id and values returned. The no-op
# update makes an existing set's row come back too; the unique index counts NULLs as values. One statement
# where a set at a time took two round trips and a scan of rollup_dims each (IS NOT DISTINCT FROM uses no
# index): the first day of a pair or zone's views adds thousands, and held the ledger's lock for seconds.
_PG_DIMS_UPSERT = (
    f"INSERT INTO rollup_dims ({_DIM_COLUMNS}) SELECT "
    + ", ".join(f"(e.v ->> {i}){'::integer' if d == 'status' else ''}" for i, d in enumerate(DIMS))
    + " FROM json_array_elements(?::json) WITH ORDINALITY AS e(v, ord) ORDER BY e.ord"
    f" ON CONFLICT ({_DIM_COLUMNS}) DO UPDATE SET key_id = excluded.key_id RETURNING id, {_DIM_COLUMNS}")
_JSON_DIMS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False)
_NEWEST_DIM = f"SELECT id, {_DIM_COLUMNS} FROM rollup_dims ORDER BY id DESC LIMIT 1"
_UNREAD: Any = object()


def dim_ids(conn: AnyConn, dims: Iterable[tuple[Any, ...]],
            newest: tuple[Any, ...] | None = _UNREAD) -> dict[tuple[Any, ...], int]:
    """The rollup_dims id of each dimension tuple (DIMS order), added where missing (in sorted order, so
    that two transactions adding the same new tuples meet in the same order). `newest` is the newest
    rollup_dims row (id, then DIMS), None if there is none, when the caller has read it in this transaction."""
    conn = as_conn(conn)
    postgres = conn.dialect == "postgres"
    if newest is _UNREAD:
        found = conn.execute(_NEWEST_DIM).fetchone()
        newest = None if found is None else tuple(found)
    seen, ids = _DIM_CACHE.get(id(conn.raw), (None, {}))
    if seen != newest or len(ids) > _DIM_CACHE_MAX:
        ids = {}
    missing = [d for d in dims if d not in ids]
    if postgres and len(missing) > 1:
        missing.sort(key=_sort_key)
    if postgres and missing:
        # Every missing set in one statement: added where absent, and each one's id returned either way.
        got = {tuple(r[1:]): int(r[0]) for r in conn.execute(_PG_DIMS_UPSERT, (_JSON_DIMS.encode(missing),))}
        for d in missing:
            ids[d] = got[d]
        newest = None  # read again below
        missing = []
    for d in missing:
        found = conn.execute(f"SELECT id FROM rollup_dims WHERE {_DIM_SQL}", d).fetchone()
        if found is None:
            cur: Any = conn.raw.execute(f"INSERT INTO rollup_dims ({_DIM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", d)
            newest = (cur.lastrowid, *d)
            ids[d] = int(cur.lastrowid or 0)
        else:
            ids[d] = found[0]
    if len(_DIM_CACHE) > 16:  # connections come and go in tests; the ledger keeps one
        _DIM_CACHE.clear()
    if postgres and newest is None:
        found = conn.execute(f"SELECT id, {_DIM_COLUMNS} FROM rollup_dims ORDER BY id DESC LIMIT 1").fetchone()
        newest = None if found is None else tuple(found)
    _DIM_CACHE[id(conn.raw)] = (newest, ids)
    return ids


def _sort_key(value: Sequence[Any]) -> tuple[Any, ...]:
    """A total order over tuples holding None, text and numbers (None first, then by type, then value)."""
    return tuple((v is not None, type(v).__name__, v if v is not None else 0) for v in value)


def _upsert(conn: Conn, hours: dict[tuple[int, tuple[Any, ...]], _Acc],
            days_until: int | None, projected_until: int | None, newest: tuple[Any, ...] | None) -> None:
    late = [(hour, dims) for hour, dims in hours if projected_until is not None and hour < projected_until]
    ids = dim_ids(conn, {dims for _, dims in hours}
                  | {projection_dims(i, v) for _, dims in late for i, v in enumerate(dims)}, newest)
    rows = [(HOUR, hour, ids[dims], *acc.values()) for (hour, dims), acc in hours.items()]
    summed: dict[tuple[int, int, int], _Acc] = {}  # series rows, and days, months and projections of late hours
    for (hour, dims), acc in hours.items():
        for key in _rows_of(hour, dims, ids, days_until, projected_until)[1:]:
            if key in summed:
                summed[key].merge(acc)
            else:
                summed[key] = _copy(acc)
    rows += [(*key, *acc.values()) for key, acc in summed.items()]
    if conn.dialect == "postgres":
        # In key order: two batches upserting some of the same rows lock them in the same order, so
        # they cannot deadlock even without the ledger lock (retention, an import).
        rows.sort(key=lambda r: (r[0], r[1], r[2]))
        conn.execute(_PG_UPSERT_ROWS, (_JSON_ROWS.encode(rows),))
        return
    try:
        conn.executemany(_UPSERT, rows)
    except sqlite3.OperationalError as exc:
        # Registered only when missing: registering a function makes SQLite prepare every statement of
        # the connection again, which cost more than the rest of a one-row batch.
        if "no such function" not in str(exc):
            raise
        register_functions(conn)
        conn.executemany(_UPSERT, rows)


def _rows_of(hour: int, dims: tuple[Any, ...], ids: dict[tuple[Any, ...], int], days_until: int | None,
             projected_until: int | None) -> list[tuple[int, int, int]]:
    """Every rollup row (grain, bucket, dim_id) a call of `hour` and `dims` is summed into now: its hour's
    full dimension set first, then the hour's totals, and for a finished hour each dimension's own row
    and, once its day is rolled up, the day's and month's (else those are made from the hours later)."""
    keys = [(HOUR, hour, ids[dims]), (HOUR + TOTALS, hour, SERIES)]
    rolled = days_until is not None and hour < days_until
    if projected_until is not None and hour < projected_until:
        day = hour - hour % 86400
        month = month_start(day)
        if rolled:
            keys += [(DAY, day, ids[dims]), (DAY + TOTALS, day, SERIES), (MONTH, month, ids[dims]),
                     (MONTH + TOTALS, month, SERIES)]
        for i, value in enumerate(dims):
            own = ids[projection_dims(i, value)]
            step = PROJECTED * (i + 1)
            keys.append((HOUR + step, hour, own))
            if rolled:
                keys += [(DAY + step, day, own), (MONTH + step, month, own)]
    return keys


def dims_of(conn: Conn, key_id: Any, model: Any, user: Any, operation: Any, endpoint: Any, status: Any,
            tags: str) -> tuple[Any, ...]:
    """A stored row's dimension set (DIMS order), its team as the dialect's team expression reads it."""
    return (key_id, model, user, operation, endpoint, status,
            (_pg_team if conn.dialect == "postgres" else _team)(tags))


def move_pruned(conn: AnyConn, changes: dict[tuple[int, tuple[Any, ...]], tuple[int, Decimal]]) -> int:
    """Add a re-pricing's changes of calls in hours before `pruned_before` to the rollup rows holding them.

    `changes`: (hour, dims) -> (change of unpriced_calls, change of cost), from calls whose rows are in
    `calls` but whose hour is pruned (a spooled row replayed after the prune, a copied one): those hours are
    never recomputed (their other calls are gone), so the re-pricing moves them by its delta, in its own
    transaction — the hour, day and month rows, totals and each dimension's own rows, as `apply` added the
    call to them. Exact: each row's new cost is its old one plus the delta, its picodollars made again from
    that. Returns the rollup rows moved."""
    conn = as_conn(conn)
    if not changes:
        return 0
    days_until, projected_until = conn.execute(
        "SELECT days_until, projected_until FROM rollup_state WHERE id = 1").fetchone()
    wanted = {dims for _, dims in changes} | {
        projection_dims(i, v) for hour, dims in changes if projected_until is not None and hour < projected_until
        for i, v in enumerate(dims)}
    ids = dim_ids(conn, wanted)
    moved: dict[tuple[int, int, int], tuple[int, Decimal]] = {}
    for (hour, dims), (unpriced, cost) in changes.items():
        for key in _rows_of(hour, dims, ids, days_until, projected_until):
            had = moved.get(key, (0, Decimal(0)))
            moved[key] = (had[0] + unpriced, EXACT.add(had[1], cost))
    postgres = conn.dialect == "postgres"
    done = 0
    for key in sorted(moved):  # key order: as the hook's upserts lock rows
        unpriced, cost = moved[key]
        found = conn.execute("SELECT cost_usd FROM rollups WHERE grain = ? AND bucket = ? AND dim_id = ?",
                             key).fetchone()
        if found is None:  # no row holds the call (it never reached the rollups): nothing of it to move
            continue
        total = EXACT.add(Decimal(found[0]), cost)
        exact = pico(total)
        conn.execute("UPDATE rollups SET unpriced_calls = unpriced_calls + ?, cost_usd = ?, cost_pico = ?, "
                     "cost_exp = ? WHERE grain = ? AND bucket = ? AND dim_id = ?",
                     (unpriced, total if postgres else format(total, "f"), *(exact or (None, None)), *key))
        done += 1
    return done


def _copy(acc: _Acc) -> _Acc:
    new = _Acc()
    new.merge(acc)
    return new


# The state and the newest dimension set (for dim_ids' cache) in one query: one round trip, or none of its
# own on PostgreSQL, where it rides with the batch's BEGIN (db.TwoPhase).
_STATE_SQL = (f"SELECT s.covered_id, s.days_until, s.projected_until, s.views, d.id, {_D_COLUMNS} "
              "FROM rollup_state AS s "
              "LEFT JOIN rollup_dims AS d ON d.id = (SELECT max(id) FROM rollup_dims) WHERE s.id = 1")


def _apply(conn: AnyConn, rows: Sequence[Sequence[Any]], state: Sequence[Any] | None) -> None:
    """The ledger's after_insert hook: add the batch's rows (COLUMNS order, just inserted) to the rollups.

    Runs inside the batch's transaction, under the ledger's write lock (see the module docstring on
    covered_id); a failure here rolls the whole batch back. `state` is _STATE_SQL's row when the caller
    has read it in this transaction, under the lock."""
    conn = as_conn(conn)
    postgres = conn.dialect == "postgres"
    if not state:
        state = conn.execute(_STATE_SQL).fetchone()
    covered, days_until, projected_until, views = state[:4]
    if rows:
        newest = None if state[4] is None else tuple(state[4:])
        hours = _aggregate(rows, _pg_team if postgres else _team)
        _upsert(conn, hours, days_until, projected_until, newest)
        if views and projected_until is not None:
            # A late call for hours the views' rows (rollup_views.py) may hold: the upkeep rebuilds its
            # hour and them; reports read it from calls meanwhile. Views stop before projected_until.
            late = sorted({hour for hour, _ in hours if hour < projected_until})
            if late:
                conn.executemany("INSERT INTO rollup_dirty (hour) VALUES (?) ON CONFLICT DO NOTHING",
                                 [(h,) for h in late])
    if postgres:
        # Ids from a sequence: gaps after a rollback, so count the rows above covered_id instead. One
        # statement that needs no answer (it rides with the batch's next round trip): covered_id moves to
        # the newest id when the rows above it are exactly this batch's, else the rollups are not current.
        if covered >= 0:
            conn.execute(COVERED_SQL, (len(rows), covered, len(rows) + 1))
        return
    # The rows just inserted took ids max-n+1..max; anything else means rows arrived without this hook.
    newest = conn.execute("SELECT coalesce(max(id), 0) FROM calls").fetchone()[0]
    only_ours = covered + len(rows) == newest
    if covered >= 0 and only_ours:
        if rows:
            conn.execute("UPDATE rollup_state SET covered_id = ? WHERE id = 1", (newest,))
    elif covered != -1:
        conn.execute("UPDATE rollup_state SET covered_id = -1 WHERE id = 1")


apply = TwoPhase("rollup_state", _STATE_SQL, _apply)
# PostgreSQL: covered_id moves to the newest id when the rows above it (?2) are exactly the batch's (?1 of
# them), else to -1. The ids above it are read in id order, at most one more than the batch has (?3): a
# walk of the primary key's edge. Without the ORDER BY and LIMIT the generic plan of the prepared statement
# scanned the whole of calls at every batch (`id > $1` is a third of any table to the planner).
COVERED_SQL = ("UPDATE rollup_state SET covered_id = CASE WHEN above.n = ? THEN greatest(covered_id, above.newest)"
               " ELSE -1 END FROM (SELECT count(*) AS n, coalesce(max(id), 0) AS newest FROM (SELECT id FROM"
               " calls WHERE id > ? ORDER BY id LIMIT ?) AS ids) AS above WHERE id = 1")


# --- views: rows per pair of dimensions, and per configured zone (rollup_views.py builds them) -------
# A view's rows: grain VIEW_BASE + VIEW_STEP * id + DAY or MONTH (above every grain of PROJECTED's).
VIEW_BASE, VIEW_STEP = 100, 10
FULL, ALL = "*", ""  # a view's dims: every dimension set; totals (dim_id SERIES); else DIMS names joined by ","


@dataclass(frozen=True, slots=True)
class View:
    """One rollup_views row: rows summed by `dims` for the days (local days of `zone`; '' is UTC) that start
    in [days_from, days_until) and the months made only of such days."""

    id: int
    zone: str
    dims: str
    days_from: int | None
    days_until: int | None

    def grain(self, grain: int) -> int:
        return VIEW_BASE + VIEW_STEP * self.id + grain

    @property
    def names(self) -> tuple[str, ...]:
        """The DIMS its rows are summed by (every one for FULL)."""
        return DIMS if self.dims == FULL else tuple(self.dims.split(",")) if self.dims else ()

    def covers(self, lo: int, hi: int) -> bool:
        return (self.days_from is not None and self.days_until is not None
                and self.days_from <= lo and hi <= self.days_until)


def view_dims(names: Iterable[str]) -> str:
    """The dims text of a view summed by `names` (DIMS names), in DIMS order."""
    return ",".join(d for d in DIMS if d in set(names))


_VIEWS_SQL = "SELECT id, zone, dims, days_from, days_until FROM rollup_views ORDER BY id"


def read_views(conn: AnyConn) -> tuple[View, ...]:
    return tuple(View(int(r[0]), r[1], r[2], r[3], r[4]) for r in as_conn(conn).execute(_VIEWS_SQL))


# --- state ------------------------------------------------------------------------------------------
class State:
    """What reports need to know: may the rollups be trusted, up to where are day and month rows
    complete, up to where do hours have each dimension's own rows, before when were raw calls pruned,
    and which views exist."""

    __slots__ = ("current", "days_until", "exists", "projected_until", "pruned_before", "views")

    def __init__(self, exists: bool, current: bool, days_until: int | None = None,
                 pruned_before: int | None = None, projected_until: int | None = None,
                 views: tuple[View, ...] = ()) -> None:
        self.exists, self.current = exists, current
        self.days_until, self.pruned_before, self.projected_until = days_until, pruned_before, projected_until
        self.views = views


def read_state(conn: AnyConn) -> State:
    conn = as_conn(conn)
    if conn.dialect == "postgres":  # one schema, migration 1 on: every column is there
        found = conn.execute("SELECT covered_id, days_until, pruned_before, projected_until, "
                             "to_regclass('rollup_views') IS NOT NULL FROM rollup_state WHERE id = 1").fetchone()
        if found is None:
            return State(False, False)
        newest = conn.execute("SELECT coalesce(max(id), 0) FROM calls").fetchone()[0]
        views = read_views(conn) if found[4] else ()  # a ledger read before migration 4 (reads never migrate)
        return State(True, found[0] >= 0 and found[0] == newest, found[1], found[2], found[3], views)
    try:
        found = conn.execute("SELECT covered_id, days_until, pruned_before, projected_until FROM rollup_state "
                             "WHERE id = 1").fetchone()
    except sqlite3.OperationalError:
        try:  # a ledger from before migration 6, read without migrating it: no dimension's own rows
            found = conn.execute("SELECT covered_id, days_until, pruned_before, NULL FROM rollup_state "
                                 "WHERE id = 1").fetchone()
        except sqlite3.OperationalError:  # a ledger from before migration 5
            return State(False, False)
    if found is None:
        return State(False, False)
    newest = conn.execute("SELECT coalesce(max(id), 0) FROM calls").fetchone()[0]
    try:
        views = read_views(conn)
    except sqlite3.OperationalError:  # a ledger from before migration 9
        views = ()
    return State(True, found[0] >= 0 and found[0] == newest, found[1], found[2], found[3], views)


def dirty_hours(conn: AnyConn, lo: float, hi: float) -> list[int]:
    """The hours overlapping [lo, hi) whose calls changed after they were rolled up, in order."""
    found = as_conn(conn).execute("SELECT hour FROM rollup_dirty WHERE hour > ? AND hour < ? ORDER BY hour", (lo - 3600, hi))
    return [h for (h,) in found]


def extent(conn: AnyConn) -> tuple[int, int] | None:
    """[first hour, last hour + 1h) of everything in calls, hour rollups and dirty marks; None if empty."""
    conn = as_conn(conn)
    lo, hi = hour_sql(conn, "min(started_at)"), hour_sql(conn, "max(started_at)")
    # One min or max per subquery: SQLite answers each from an index edge instead of a scan.
    found = conn.execute(
        f"SELECT (SELECT {lo} FROM calls), (SELECT min(bucket) FROM rollups WHERE grain = 0),"
        f" (SELECT min(hour) FROM rollup_dirty), (SELECT {hi} FROM calls),"
        " (SELECT max(bucket) FROM rollups WHERE grain = 0), (SELECT max(hour) FROM rollup_dirty)").fetchone()
    lows, highs = [v for v in found[:3] if v is not None], [v for v in found[3:] if v is not None]
    if not lows:
        return None
    return int(min(lows)) // 3600 * 3600, int(max(highs)) // 3600 * 3600 + 3600
