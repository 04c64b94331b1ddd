"""The SQL of usage reports: a report's segments over `calls` and the rollups, on SQLite or PostgreSQL.

`run` returns, per group, one row: the group's values, the integer counters in `rollups.INT_COUNTERS`
order, and the cost as picodollars, their smallest exponent and an exact decimal (`cost` makes the Decimal
adding the calls' costs would give). The segments are one statement (UNION ALL, grouped again in SQL), so
only the answer's rows leave the database. The planning (which source answers which range) is
`proxy.reports.plan`; this module only reads.

Dialects: time labels are strftime on SQLite and to_char on PostgreSQL (same text); a tag is
`json_extract` on SQLite and `jsonb ->` on PostgreSQL, and where a row's tags are not valid JSON the
segment is grouped by the tags text and the tag read in Python (same answer on both: null). PostgreSQL sums
bigint picodollars into numeric, so it never needs SQLite's overflow fallback.

This module must never put a caller's value into SQL text: values are bound, column text comes from the
fixed maps below, tag names are bound, and offsets are formatted as integers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, cast

from proxy.core.attribution import TEAM_TAG
from proxy.core.errors import MeterproxyError
from proxy.core.money import EXACT
from proxy.ledger import rollups
from proxy.ledger.sqlconn import Conn

__all__ = ["FILTER_DIMS", "RAW_COLUMNS", "ROLLUP_GROUPS", "TAG_PREFIX", "TIME_FIELDS", "calls_extent", "label_sql",
           "run"]

TAG_PREFIX = "tag:"
TIME_FIELDS = ("hour", "day", "week", "month")
RAW_COLUMNS = {
    "key": "key_id", "model": "model", "user": '"user"', "session": "session", "operation": "operation",
    "endpoint": "endpoint", "status": "status",
}  # fmt: skip
# Group name -> the rollup dimension (rollups.DIMS) it reads.
ROLLUP_GROUPS = {
    "key": "key_id", "model": "model", "user": "user", "operation": "operation", "endpoint": "endpoint",
    "status": "status", f"tag:{TEAM_TAG}": "team",
}  # fmt: skip
_FILTERS = {"key": "key_id", "user": "user", "model": "model"}  # filter -> its column (a rollup dimension too)
FILTER_DIMS = _FILTERS


def _count(condition: str) -> str:
    return f"COALESCE(SUM(CASE WHEN {condition} THEN 1 ELSE 0 END), 0)"


def _ints(exprs: list[str]) -> str:
    # BIGINT: PostgreSQL's SUM of a BIGINT is NUMERIC, which psycopg would read as a Decimal per counter.
    return ", ".join(f"CAST({e} AS BIGINT) AS c{i}" for i, e in enumerate(exprs))


_WIDTH = len(rollups.INT_COUNTERS)
# Every query below returns the group values g0..gN, the counters c0..c9 (rollups.INT_COUNTERS order) and
# the cost as `pico` (integer picodollars), `exp` (their smallest exponent) and `slow` (an exact decimal
# sum of what has no picodollars): a raw scan's cost is all `slow`.
_RAW_COUNTERS = _ints([
    "COUNT(*)", _count("status NOT BETWEEN 200 AND 299"), _count("priced = 0"),
    *(f"COALESCE(SUM({c}), 0)" for c in ("prompt_tokens", "completion_tokens", "cached_tokens",
                                         "reasoning_tokens", "total_tokens")),
    # How much of the above the proxy counted itself rather than read from the provider.
    _count("usage_source = 'counted'"),
    "COALESCE(SUM(CASE WHEN usage_source = 'counted' THEN total_tokens ELSE 0 END), 0)",
]) + ", CAST(NULL AS BIGINT) AS pico, CAST(NULL AS INTEGER) AS exp, decimal_sum(cost_usd) AS slow"  # fmt: skip
_ROLLUP_INTS = _ints([f"COALESCE(SUM(r.{c}), 0)" for c in rollups.INT_COUNTERS])
_FAST_COST = ("SUM(r.cost_pico) AS pico, MIN(r.cost_exp) AS exp, "
              "decimal_sum(r.cost_usd) FILTER (WHERE r.cost_pico IS NULL) AS slow")
# One rollup row's own counters and cost, in the same columns.
_ROW_COUNTERS = (", ".join(f"r.{c} AS c{i}" for i, c in enumerate(rollups.INT_COUNTERS))
                 + ", r.cost_pico AS pico, r.cost_exp AS exp, CASE WHEN r.cost_pico IS NULL THEN r.cost_usd END AS slow")
_SLOW_COST = "NULL AS pico, NULL AS exp, decimal_sum(r.cost_usd) AS slow"  # when the integer sum would overflow
_OUTER = _ints([f"SUM(c{i})" for i in range(_WIDTH)]) + ", SUM(pico) AS pico, MIN(exp) AS exp, decimal_sum(slow) AS slow"

# A group's sums, as `run` returns them: its values, the counters, then picodollars (an int, a Decimal on
# PostgreSQL when summed, or None), their exponent, and an exact decimal (a Decimal, SQLite's text, or None).
# Its cost is the picodollars at that exponent plus the decimal (`cost`); most groups have no decimal part.
Sums = tuple[Any, ...]
# One segment: (source, lo, hi, UTC offset of its labels, projected, view) as reports/plan.py plans it.
Part = tuple[str, float | None, float | None, int, bool, int | None]


class _BadTags(MeterproxyError):
    """A row's tags are not JSON: the segment is read again, tags parsed in Python."""


# --- time labels --------------------------------------------------------------------------------------
def label_sql(field: str, seconds: str, offset: int, utc: bool, dialect: str = "sqlite") -> str:
    """SQL for a time bucket's label from the integer unix seconds expression `seconds`.

    Labels: hour "2026-11-23T14:00Z" (or "+01:00" in a zone), day "2026-11-23", week "2026-W48" (ISO 8601:
    the week belongs to the year of its Thursday), month "2026-11"."""
    local = f"({seconds} + {int(offset)})" if offset else seconds
    suffix = "Z" if utc else _suffix(offset)
    if dialect == "postgres":
        moment = f"(to_timestamp({local}) AT TIME ZONE 'UTC')"
        pattern = {"hour": 'YYYY-MM-DD"T"HH24":00"', "day": "YYYY-MM-DD", "month": "YYYY-MM",
                   "week": 'IYYY"-W"IW'}[field]
        text = f"to_char({moment}, '{pattern}')"
        return f"{text} || '{suffix}'" if field == "hour" else text
    if field == "hour":
        return f"strftime('%Y-%m-%dT%H:00', {local}, 'unixepoch') || '{suffix}'"
    if field == "day":
        return f"strftime('%Y-%m-%d', {local}, 'unixepoch')"
    if field == "month":
        return f"strftime('%Y-%m', {local}, 'unixepoch')"
    thursday = f"date({local}, 'unixepoch', '-3 days', 'weekday 4')"
    return (f"strftime('%Y', {thursday}) || '-W' || "
            f"printf('%02d', (CAST(strftime('%j', {thursday}) AS INTEGER) + 6) / 7)")


def _suffix(offset: int) -> str:
    sign = "-" if offset < 0 else "+"
    h, rest = divmod(abs(int(offset)), 3600)
    m, s = divmod(rest, 60)
    return f"{sign}{h:02d}:{m:02d}" + (f":{s:02d}" if s else "")


def _whole_seconds(conn: Conn, column: str) -> str:
    # SQLite's CAST truncates (times are positive: the floor); PostgreSQL's rounds, so floor first.
    return rollups.hour_sql(conn, column)


def calls_extent(conn: Conn) -> tuple[int, int] | None:
    """[first call's whole second, last call's whole second + 1) of `calls`; None when it is empty."""
    lo, hi = conn.execute(f"SELECT (SELECT {_whole_seconds(conn, 'min(started_at)')} FROM calls), "
                          f"(SELECT {_whole_seconds(conn, 'max(started_at)')} + 1 FROM calls)").fetchone()
    return None if lo is None else (int(lo), int(hi))


# --- a report's segments ------------------------------------------------------------------------------
def run(conn: Conn, parts: list[Part], *, groups: list[tuple[str, str]], filters: Mapping[str, str | None],
        utc: bool) -> list[Sums]:
    """The sums per group over the segments `parts` ("raw" = calls, or a rollup grain "hour" / "day" /
    "month"), each group once (in no order); time labels at each segment's UTC offset.

    Several segments are one query (UNION ALL, grouped again in SQL), so only the answer's rows leave the
    database; where that cannot be (a tag read from calls, whose JSON may need reading in Python; SQLite's
    integer sum overflowing), each segment is read alone and the groups added here."""
    if conn.is_postgres:
        # No JIT compilation: these queries read at most some 100,000 rows, which is less work than
        # compiling their expressions (a report of 30 segments spent 1.4 s compiling, 0.5 s running).
        conn.execute("SET LOCAL jit = off" if conn.in_transaction else "SET jit = off")
    if len(parts) == 1:
        return _part(conn, parts[0], groups, filters, utc)
    if parts and not (any(name.startswith(TAG_PREFIX) for name, _ in groups) and any(p[0] == "raw" for p in parts)):
        try:
            return _combined(conn, parts, groups, filters, utc)
        except conn.OperationalError as exc:  # SQLite: an integer sum overflowed
            if conn.is_postgres or "overflow" not in str(exc):
                raise
    width = len(groups)
    end = width + _WIDTH
    merged: dict[tuple[Any, ...], list[Any]] = {}
    for part in parts:
        for row in _part(conn, part, groups, filters, utc):
            values, ints, units, exp, dec = row[:width], row[width:end], row[end], row[end + 1], row[end + 2]
            dec = None if dec is None else Decimal(dec)
            known = merged.get(values)
            if known is None:
                merged[values] = [ints, units, exp, dec]
                continue
            known[0] = tuple(a + b for a, b in zip(known[0], ints))
            if units is not None:
                known[1], known[2] = (units, exp) if known[1] is None else (known[1] + units, min(known[2], exp))
            if dec is not None:
                known[3] = dec if known[3] is None else EXACT.add(known[3], dec)
    return [(*values, *ints, units, exp, dec) for values, (ints, units, exp, dec) in merged.items()]


def cost(units: int | Decimal | None, exp: int | None, dec: Decimal | str | None) -> Decimal:
    """A group's exact cost from its last three sums, with the exponent adding every call's cost as a
    Decimal would give."""
    if units is None:
        return Decimal(0) if dec is None else Decimal(dec)
    total = rollups.from_pico(int(units), exp if exp is not None else 0)
    return total if dec is None else EXACT.add(total, Decimal(dec))


def _part(conn: Conn, part: Part, groups: list[tuple[str, str]], filters: Mapping[str, str | None],
          utc: bool) -> list[Sums]:
    source, lo, hi, offset, projected, view = part
    if source == "raw":
        return _raw(conn, lo, hi, offset, groups, filters, utc)
    sql, params = _rollup_sql(conn, source, lo, hi, offset, projected, view, groups, filters, utc, _FAST_COST)
    if conn.is_postgres:  # bigint sums are numeric there: no overflow
        return _fetch(conn, sql, params)
    try:
        return _fetch(conn, sql, params)
    except conn.OperationalError as exc:
        if "overflow" not in str(exc):
            raise
    sql, params = _rollup_sql(conn, source, lo, hi, offset, projected, view, groups, filters, utc, _SLOW_COST)
    return _fetch(conn, sql, params)


def _fetch(conn: Conn, sql: str, params: list[Any]) -> list[Sums]:
    return cast(list[Sums], conn.execute(sql, params).fetchall())


def _combined(conn: Conn, parts: list[Part], groups: list[tuple[str, str]], filters: Mapping[str, str | None],
              utc: bool) -> list[Sums]:
    branches: list[str] = []
    params: list[Any] = []
    for source, lo, hi, offset, projected, view in parts:
        if source == "raw":
            sql, more, _ = _raw_sql(conn, lo, hi, offset, groups, filters, utc, in_sql=True)
        else:
            sql, more = _rollup_sql(conn, source, lo, hi, offset, projected, view, groups, filters, utc,
                                    _FAST_COST)
        branches.append(sql)
        params += more
    names = [f"g{i}" for i in range(len(groups))]
    sql = f"SELECT {', '.join([*names, _OUTER])} FROM ({' UNION ALL '.join(branches)}) AS parts{_group_by(groups)}"
    return _fetch(conn, sql, params)


def _where(conditions: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
    used = [(sql, value) for sql, value in conditions if value is not None]
    return (" WHERE " + " AND ".join(sql for sql, _ in used) if used else ""), [v for _, v in used]


def _group_by(groups: list[tuple[str, str]]) -> str:
    return " GROUP BY " + ", ".join(f"g{i}" for i in range(len(groups))) if groups else ""


def _raw(conn: Conn, lo: float | None, hi: float | None, offset: int, groups: list[tuple[str, str]],
         filters: Mapping[str, str | None], utc: bool) -> list[Sums]:
    tagged = any(name.startswith(TAG_PREFIX) for name, _ in groups)
    if not tagged:
        return _raw_query(conn, lo, hi, offset, groups, filters, utc, in_sql=True)
    savepoint = conn.in_transaction
    if savepoint:
        conn.execute("SAVEPOINT meter_tags")
    try:
        found = list(_raw_query(conn, lo, hi, offset, groups, filters, utc, in_sql=True))
    except _BadTags:
        if savepoint:  # PostgreSQL's failed statement spoilt the transaction until here
            conn.execute("ROLLBACK TO SAVEPOINT meter_tags")
        found = _merged(_raw_query(conn, lo, hi, offset, groups, filters, utc, in_sql=False), len(groups))
    if savepoint:
        conn.execute("RELEASE SAVEPOINT meter_tags")
    return found


def _raw_sql(conn: Conn, lo: float | None, hi: float | None, offset: int, groups: list[tuple[str, str]],
             filters: Mapping[str, str | None], utc: bool, in_sql: bool) -> tuple[str, list[Any], dict[int, str]]:
    """The raw scan's SQL, its parameters and the tags it groups by (index -> name); tags extracted in SQL
    (`in_sql`), or the tags text selected, for the caller to read the tags."""
    select: list[str] = []
    params: list[Any] = []
    tag_names: dict[int, str] = {}
    for i, (name, _) in enumerate(groups):
        if name.startswith(TAG_PREFIX):
            tag = name[len(TAG_PREFIX):]
            tag_names[i] = tag
            if not in_sql:
                select.append(f"tags AS g{i}")
            elif conn.is_postgres:
                select.append(f"(tags::jsonb -> CAST(? AS TEXT)) AS g{i}")
                params.append(tag)
            else:
                select.append(f"json_extract(tags, ?) AS g{i}")
                params.append(f'$."{tag}"')
        elif name in TIME_FIELDS:
            label = label_sql(name, _whole_seconds(conn, "started_at"), offset, utc, conn.dialect)
            select.append(f"{label} AS g{i}")
        else:
            select.append(f"{RAW_COLUMNS[name]} AS g{i}")
    where, where_params = _where([("started_at >= ?", lo), ("started_at < ?", hi),
                                  *((f'"{_FILTERS[k]}" = ?', v) for k, v in filters.items())])
    sql = f"SELECT {', '.join([*select, _RAW_COUNTERS])} FROM calls{where}{_group_by(groups)}"
    return sql, params + where_params, tag_names


def _raw_query(conn: Conn, lo: float | None, hi: float | None, offset: int, groups: list[tuple[str, str]],
               filters: Mapping[str, str | None], utc: bool, in_sql: bool) -> list[Sums]:
    """The raw scan; tags extracted in SQL (`in_sql`), or the tags text selected and the tags read here."""
    sql, params, tag_names = _raw_sql(conn, lo, hi, offset, groups, filters, utc, in_sql)
    try:
        rows = _fetch(conn, sql, params)
    except conn.Error as exc:
        if tag_names and in_sql and _is_bad_json(conn, exc):
            raise _BadTags from exc
        raise
    if not tag_names:
        return rows
    out = []
    for row in rows:
        read = list(row)
        for i, tag in tag_names.items():
            read[i] = _tag_value(read[i], tag, in_sql, conn.is_postgres)
        out.append(tuple(read))
    return out


def _is_bad_json(conn: Conn, exc: Exception) -> bool:
    if conn.is_postgres:
        return getattr(exc, "sqlstate", None) == "22P02"  # invalid_text_representation: tags::jsonb
    return "malformed JSON" in str(exc)


def _tag_value(value: Any, tag: str, in_sql: bool, postgres: bool) -> Any:
    """A tag's value as SQLite's json_extract gives it: text, an integer or a real, true/false as 1/0, an
    object or array as compact JSON text, None where absent or the tags are not a JSON object."""
    if not in_sql:
        try:
            parsed = json.loads(value) if isinstance(value, str) else None
        except ValueError:
            return None
        value = parsed.get(tag) if isinstance(parsed, dict) else None
    elif not postgres:
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return value


def _merged(found: list[Sums], width: int) -> list[Sums]:
    """Groups that became one once their tags were read (several tags texts, one tag value): raw sums,
    whose cost is all decimal."""
    sums: dict[tuple[Any, ...], tuple[list[int], Decimal | None]] = {}
    for row in found:
        values, ints, dec = row[:width], row[width:width + _WIDTH], row[-1]
        dec = None if dec is None else Decimal(dec)
        known = sums.get(values)
        if known is None:
            sums[values] = (list(ints), dec)
        else:
            added = dec if known[1] is None else known[1] if dec is None else EXACT.add(known[1], dec)
            sums[values] = ([a + b for a, b in zip(known[0], ints)], added)
    return [(*values, *ints, None, None, dec) for values, (ints, dec) in sums.items()]


def _rollup_sql(conn: Conn, source: str, lo: float | None, hi: float | None, offset: int, projected: bool,
                view: int | None, groups: list[tuple[str, str]], filters: Mapping[str, str | None], utc: bool,
                cost_sql: str) -> tuple[str, list[Any]]:
    # NULL: a lossy segment's detail (a group the rollups do not hold).
    dims = [(f'd."{ROLLUP_GROUPS[name]}"' if name in ROLLUP_GROUPS else "NULL") + f" AS g{i}"
            for i, (name, _) in enumerate(groups) if name not in TIME_FIELDS]
    used = {ROLLUP_GROUPS[n] for n, _ in groups if n in ROLLUP_GROUPS}
    used |= {_FILTERS[k] for k, v in filters.items() if v is not None}
    # A view's rows where the plan chose one (a pair's, a zone's: `projected` when summed by exactly the
    # dimensions used). Else by time alone: each bucket's totals row; by one dimension, its own rows where
    # the segment has them; else every dimension set's row.
    grain = rollups.GRAINS[source]
    needs_dims = bool(used)
    if view is not None:
        grain = rollups.VIEW_BASE + rollups.VIEW_STEP * view + grain
    elif not used:
        grain += rollups.TOTALS
    elif len(used) == 1 and projected:
        grain = rollups.projected(grain, next(iter(used)))
    conditions = [("r.grain = ?", grain), ("r.bucket >= ?", lo), ("r.bucket < ?", hi),
                  *((f'd."{_FILTERS[k]}"', v) for k, v in filters.items())]
    where, params = _where([(sql if sql.endswith("?") else f"{sql} = ?", v) for sql, v in conditions])
    # SQLite: CROSS JOIN keeps the rollups' time range as the outer loop, whatever the filters. PostgreSQL
    # has no CROSS JOIN … ON (and plans the join order itself).
    join = "JOIN" if conn.is_postgres else "CROSS JOIN"
    source_sql = f"rollups r {join} rollup_dims d ON d.id = r.dim_id" if needs_dims else "rollups r"
    times = [(i, name) for i, (name, _) in enumerate(groups) if name in TIME_FIELDS]
    if not times:
        return f"SELECT {', '.join([*dims, _ROLLUP_INTS, cost_sql])} FROM {source_sql}{where}{_group_by(groups)}", params
    if grain != rollups.GRAINS[source] and (view is None or projected) and any(name == source for _, name in times):
        # One row per bucket and group (a totals row, or one dimension's own), and a label of the source's
        # own grain, which no other bucket of the segment shares: each row is its group, nothing to sum.
        labels = [f"{label_sql(name, 'r.bucket', offset, utc, conn.dialect)} AS g{i}" if name in TIME_FIELDS
                  else dims.pop(0) for i, (name, _) in enumerate(groups)]
        return f"SELECT {', '.join([*labels, _ROW_COUNTERS])} FROM {source_sql}{where}", params
    # Sum per bucket first, then label: the label runs once per bucket and group, not per row.
    dim_names = [f"g{i}" for i, (name, _) in enumerate(groups) if name not in TIME_FIELDS]
    inner = (f"SELECT {', '.join(['r.bucket AS b', *dims, _ROLLUP_INTS, cost_sql])} "
             f"FROM {source_sql}{where} GROUP BY {', '.join(['r.bucket', *dim_names])}")
    outer = [f"{label_sql(name, 'b', offset, utc, conn.dialect)} AS g{i}" if name in TIME_FIELDS else f"g{i}"
             for i, (name, _) in enumerate(groups)]
    return f"SELECT {', '.join([*outer, _OUTER])} FROM ({inner}) AS per_bucket{_group_by(groups)}", params
