"""The SQL of usage reports: one report segment over `calls` or over the rollups, on SQLite or PostgreSQL.

`run` returns, per group, the group's values, the integer counters in `rollups.INT_COUNTERS` order and
the exact cost as a `Decimal` with the exponent adding the calls' costs would give. The planning (which
source answers which range) is `proxy.reports.plan`; this module only reads.

Dialects: time labels are strftime on SQLite and to_char on PostgreSQL (same text); a tag is
`json_extract` on SQLite and `jsonb ->` on PostgreSQL, and where a row's tags are not valid JSON the
segment is grouped by the tags text and the tag read in Python (same answer on both: null). PostgreSQL sums
bigint picodollars into numeric, so it never needs SQLite's overflow fallback.

This module must never put a caller's value into SQL text: values are bound, column text comes from the
fixed maps below, tag names are bound, and offsets are formatted as integers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any, cast

from proxy.core.attribution import TEAM_TAG
from proxy.core.errors import MeterproxyError
from proxy.core.money import EXACT
from proxy.ledger import rollups
from proxy.ledger.sqlconn import Conn

__all__ = ["RAW_COLUMNS", "ROLLUP_GROUPS", "TAG_PREFIX", "TIME_FIELDS", "calls_extent", "label_sql", "run"]

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


def _count(condition: str) -> str:
    return f"COALESCE(SUM(CASE WHEN {condition} THEN 1 ELSE 0 END), 0)"


_RAW_COUNTERS = ", ".join((
    "COUNT(*)", _count("status NOT BETWEEN 200 AND 299"), _count("priced = 0"),
    *(f"COALESCE(SUM({c}), 0)" for c in ("prompt_tokens", "completion_tokens", "cached_tokens",
                                         "reasoning_tokens", "total_tokens")),
    # How much of the above the proxy counted itself rather than read from the provider.
    _count("usage_source = 'counted'"),
    "COALESCE(SUM(CASE WHEN usage_source = 'counted' THEN total_tokens ELSE 0 END), 0)",
    "decimal_sum(cost_usd)",
))  # fmt: skip
_ROLLUP_INTS = ", ".join(f"COALESCE(SUM(r.{c}), 0)" for c in rollups.INT_COUNTERS)
_FAST_COST = ("SUM(r.cost_pico) AS pico, MIN(r.cost_exp) AS exp, "
              "decimal_sum(r.cost_usd) FILTER (WHERE r.cost_pico IS NULL) AS slow")
_SLOW_COST = "NULL AS pico, NULL AS exp, decimal_sum(r.cost_usd) AS slow"  # when the integer sum would overflow
_ROLLUP_INTS_AS = ", ".join(f"COALESCE(SUM(r.{c}), 0) AS {c}" for c in rollups.INT_COUNTERS)
_OUTER_INTS = ", ".join(f"SUM({c})" for c in rollups.INT_COUNTERS)
_OUTER_COST = "SUM(pico), MIN(exp), decimal_sum(slow)"
_WIDTH = len(rollups.INT_COUNTERS)

Found = tuple[tuple[Any, ...], tuple[int, ...], Decimal]


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


# --- one segment --------------------------------------------------------------------------------------
def run(conn: Conn, *, source: str, lo: float | None, hi: float | None, offset: int, projected: bool,
        groups: list[tuple[str, str]], filters: Mapping[str, str | None], utc: bool) -> Iterator[Found]:
    """(group values, integer counters, cost) per group of the segment [lo, hi) read from `source`
    ("raw" = calls, or a rollup grain "hour" / "day" / "month"); labels at UTC offset `offset`."""
    if source == "raw":
        yield from _raw(conn, lo, hi, offset, groups, filters, utc)
        return
    if conn.is_postgres:  # bigint sums are numeric there: no overflow
        rows = _rollup_rows(conn, source, lo, hi, offset, projected, groups, filters, utc, _FAST_COST)
    else:
        try:
            rows = _rollup_rows(conn, source, lo, hi, offset, projected, groups, filters, utc, _FAST_COST)
        except conn.OperationalError as exc:
            if "overflow" not in str(exc):
                raise
            rows = _rollup_rows(conn, source, lo, hi, offset, projected, groups, filters, utc, _SLOW_COST)
    width = len(groups)
    for row in rows:
        units, exponent, slow = row[width + _WIDTH:]
        cost = rollups.from_pico(int(units), int(exponent)) if units is not None else Decimal(0)
        if slow is not None:
            cost = EXACT.add(cost, Decimal(slow))
        yield tuple(row[:width]), tuple(int(v) for v in row[width:width + _WIDTH]), cost


def _where(conditions: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
    used = [(sql, value) for sql, value in conditions if value is not None]
    return (" WHERE " + " AND ".join(sql for sql, _ in used) if used else ""), [v for _, v in used]


def _group_by(groups: list[tuple[str, str]]) -> str:
    return " GROUP BY " + ", ".join(f"g{i}" for i in range(len(groups))) if groups else ""


def _raw(conn: Conn, lo: float | None, hi: float | None, offset: int, groups: list[tuple[str, str]],
         filters: Mapping[str, str | None], utc: bool) -> Iterator[Found]:
    tagged = any(name.startswith(TAG_PREFIX) for name, _ in groups)
    if not tagged:
        yield from _raw_query(conn, lo, hi, offset, groups, filters, utc, in_sql=True)
        return
    savepoint = conn.in_transaction
    if savepoint:
        conn.execute("SAVEPOINT meter_tags")
    try:
        found = list(_raw_query(conn, lo, hi, offset, groups, filters, utc, in_sql=True))
    except _BadTags:
        if savepoint:  # PostgreSQL's failed statement spoilt the transaction until here
            conn.execute("ROLLBACK TO SAVEPOINT meter_tags")
        found = _merged(_raw_query(conn, lo, hi, offset, groups, filters, utc, in_sql=False))
    if savepoint:
        conn.execute("RELEASE SAVEPOINT meter_tags")
    yield from found


def _raw_query(conn: Conn, lo: float | None, hi: float | None, offset: int, groups: list[tuple[str, str]],
               filters: Mapping[str, str | None], utc: bool, in_sql: bool) -> Iterator[Found]:
    """The raw scan; tags extracted in SQL (`in_sql`), or the tags text selected and the tags read here."""
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
    width = len(groups)
    try:
        rows = conn.execute(sql, params + where_params).fetchall()
    except conn.Error as exc:
        if tag_names and in_sql and _is_bad_json(conn, exc):
            raise _BadTags from exc
        raise
    for row in rows:
        values = list(row[:width])
        for i, tag in tag_names.items():
            values[i] = _tag_value(values[i], tag, in_sql, conn.is_postgres)
        # Not `row[-1] or 0`: PostgreSQL's numeric 0.000 is a Decimal, falsy, and its exponent counts.
        cost = Decimal(0) if row[-1] is None else Decimal(row[-1])
        yield tuple(values), tuple(int(v) for v in row[width:width + _WIDTH]), cost


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


def _merged(found: Iterator[Found]) -> list[Found]:
    """Groups that became one once their tags were read (several tags texts, one tag value)."""
    sums: dict[tuple[Any, ...], tuple[list[int], Decimal]] = {}
    for values, ints, cost in found:
        known = sums.get(values)
        if known is None:
            sums[values] = (list(ints), cost)
        else:
            sums[values] = ([a + b for a, b in zip(known[0], ints)], EXACT.add(known[1], cost))
    return [(values, tuple(ints), cost) for values, (ints, cost) in sums.items()]


def _rollup_rows(conn: Conn, source: str, lo: float | None, hi: float | None, offset: int, projected: bool,
                 groups: list[tuple[str, str]], filters: Mapping[str, str | None], utc: bool,
                 cost_sql: str) -> list[tuple[Any, ...]]:
    # NULL: a lossy segment's detail (a group the rollups do not hold).
    dims = [(f'd."{ROLLUP_GROUPS[name]}"' if name in ROLLUP_GROUPS else "NULL") + f" AS g{i}"
            for i, (name, _) in enumerate(groups) if name not in TIME_FIELDS]
    used = {ROLLUP_GROUPS[n] for n, _ in groups if n in ROLLUP_GROUPS}
    used |= {_FILTERS[k] for k, v in filters.items() if v is not None}
    # By time alone: each bucket's totals row; by one dimension, its own rows where the segment has
    # them; else every dimension set's row.
    grain = rollups.GRAINS[source]
    needs_dims = bool(used)
    if not used:
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
        sql = f"SELECT {', '.join([*dims, _ROLLUP_INTS, cost_sql])} FROM {source_sql}{where}{_group_by(groups)}"
        return cast(list[tuple[Any, ...]], conn.execute(sql, params).fetchall())
    # Sum per bucket first, then label: the label runs once per bucket and group, not per row.
    dim_names = [f"g{i}" for i, (name, _) in enumerate(groups) if name not in TIME_FIELDS]
    inner = (f"SELECT {', '.join(['r.bucket AS b', *dims, _ROLLUP_INTS_AS, cost_sql])} "
             f"FROM {source_sql}{where} GROUP BY {', '.join(['r.bucket', *dim_names])}")
    outer = [f"{label_sql(name, 'b', offset, utc, conn.dialect)} AS g{i}" if name in TIME_FIELDS else f"g{i}"
             for i, (name, _) in enumerate(groups)]
    sql = f"SELECT {', '.join([*outer, _OUTER_INTS, _OUTER_COST])} FROM ({inner}) AS per_bucket{_group_by(groups)}"
    return cast(list[tuple[Any, ...]], conn.execute(sql, params).fetchall())
