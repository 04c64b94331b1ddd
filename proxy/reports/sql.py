"""The SQL of one report segment (report_plan.Segment): over `calls`, or over the rollups.

Both shapes return, per group, the group's values, the integer counters in `rollups.INT_COUNTERS` order
and the exact cost as a `Decimal` with the exponent adding the calls' costs would give.

This module must never put a caller's value into SQL text: values are bound, column text comes from the
fixed maps below, tag names are bound as JSON paths, and offsets are formatted as integers.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from decimal import Context, Decimal, Inexact
from typing import Any

from proxy.ledger import rollups
from proxy.reports.plan import ROLLUP_GROUPS, TIME_FIELDS, Segment, label_sql

__all__ = ["RAW_COLUMNS", "TAG_PREFIX", "run"]

TAG_PREFIX = "tag:"
RAW_COLUMNS = {
    "key": "key_id", "model": "model", "user": '"user"', "session": "session", "operation": "operation",
    "endpoint": "endpoint", "status": "status",
}  # fmt: skip
_FILTERS = {"key": "key_id", "user": "user", "model": "model"}  # filter -> its column (a rollup dimension too)
_RAW_COUNTERS = ", ".join((
    "COUNT(*)", "COALESCE(SUM(status NOT BETWEEN 200 AND 299), 0)", "COALESCE(SUM(priced = 0), 0)",
    *(f"COALESCE(SUM({c}), 0)" for c in ("prompt_tokens", "completion_tokens", "cached_tokens",
                                         "reasoning_tokens", "total_tokens")),
    # How much of the above the proxy counted itself rather than read from the provider.
    "COALESCE(SUM(usage_source = 'counted'), 0)",
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
_EXACT = Context(prec=200, traps=[Inexact])
_WIDTH = len(rollups.INT_COUNTERS)

Found = tuple[tuple[Any, ...], tuple[int, ...], Decimal]


def run(conn: sqlite3.Connection, segment: Segment, groups: list[tuple[str, str]],
        filters: Mapping[str, str | None], utc: bool) -> Iterator[Found]:
    """(group values, integer counters, cost) per group of `segment`."""
    if segment.source == "raw":
        yield from _raw(conn, segment, groups, filters, utc)
        return
    try:
        rows = _rollup_rows(conn, segment, groups, filters, utc, _FAST_COST)
    except sqlite3.OperationalError as exc:
        if "overflow" not in str(exc):
            raise
        rows = _rollup_rows(conn, segment, groups, filters, utc, _SLOW_COST)
    width = len(groups)
    for row in rows:
        units, exponent, slow = row[width + _WIDTH:]
        cost = rollups.from_pico(units, exponent) if units is not None else Decimal(0)
        if slow is not None:
            cost = _EXACT.add(cost, Decimal(slow))
        yield tuple(row[:width]), row[width:width + _WIDTH], cost


def _where(conditions: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
    used = [(sql, value) for sql, value in conditions if value is not None]
    return (" WHERE " + " AND ".join(sql for sql, _ in used) if used else ""), [v for _, v in used]


def _group_by(groups: list[tuple[str, str]]) -> str:
    return " GROUP BY " + ", ".join(f"g{i}" for i in range(len(groups))) if groups else ""


def _raw(conn: sqlite3.Connection, segment: Segment, groups: list[tuple[str, str]],
         filters: Mapping[str, str | None], utc: bool) -> Iterator[Found]:
    select: list[str] = []
    params: list[Any] = []
    for i, (name, _) in enumerate(groups):
        if name.startswith(TAG_PREFIX):
            select.append(f"json_extract(tags, ?) AS g{i}")
            params.append(f'$."{name[len(TAG_PREFIX):]}"')
        elif name in TIME_FIELDS:
            select.append(f"{label_sql(name, 'CAST(started_at AS INTEGER)', segment.offset, utc)} AS g{i}")
        else:
            select.append(f"{RAW_COLUMNS[name]} AS g{i}")
    where, where_params = _where([("started_at >= ?", segment.lo), ("started_at < ?", segment.hi),
                                  *((f'"{_FILTERS[k]}" = ?', v) for k, v in filters.items())])
    sql = f"SELECT {', '.join([*select, _RAW_COUNTERS])} FROM calls{where}{_group_by(groups)}"
    width = len(groups)
    for row in conn.execute(sql, params + where_params):
        yield tuple(row[:width]), row[width:width + _WIDTH], Decimal(row[-1] or 0)


def _rollup_rows(conn: sqlite3.Connection, segment: Segment, groups: list[tuple[str, str]],
                 filters: Mapping[str, str | None], utc: bool, cost_sql: str) -> list[tuple[Any, ...]]:
    # NULL: a lossy segment's detail (a group the rollups do not hold).
    dims = [(f'd."{ROLLUP_GROUPS[name]}"' if name in ROLLUP_GROUPS else "NULL") + f" AS g{i}"
            for i, (name, _) in enumerate(groups) if name not in TIME_FIELDS]
    used = {ROLLUP_GROUPS[n] for n, _ in groups if n in ROLLUP_GROUPS}
    used |= {_FILTERS[k] for k, v in filters.items() if v is not None}
    # By time alone: each bucket's totals row; by one dimension, its own rows where the segment has
    # them; else every dimension set's row.
    grain = rollups.GRAINS[segment.source]
    needs_dims = bool(used)
    if not used:
        grain += rollups.TOTALS
    elif len(used) == 1 and segment.projected:
        grain = rollups.projected(grain, next(iter(used)))
    conditions = [("r.grain = ?", grain), ("r.bucket >= ?", segment.lo), ("r.bucket < ?", segment.hi),
                  *((f'd."{_FILTERS[k]}"', v) for k, v in filters.items())]
    where, params = _where([(sql if sql.endswith("?") else f"{sql} = ?", v) for sql, v in conditions])
    # CROSS JOIN keeps the rollups' time range as the outer loop, whatever the filters.
    source = "rollups r CROSS JOIN rollup_dims d ON d.id = r.dim_id" if needs_dims else "rollups r"
    times = [(i, name) for i, (name, _) in enumerate(groups) if name in TIME_FIELDS]
    if not times:
        sql = f"SELECT {', '.join([*dims, _ROLLUP_INTS, cost_sql])} FROM {source}{where}{_group_by(groups)}"
        return conn.execute(sql, params).fetchall()
    # Sum per bucket first, then label: the label's strftime runs once per bucket and group, not per row.
    dim_names = [f"g{i}" for i, (name, _) in enumerate(groups) if name not in TIME_FIELDS]
    inner = (f"SELECT {', '.join(['r.bucket AS b', *dims, _ROLLUP_INTS_AS, cost_sql])} "
             f"FROM {source}{where} GROUP BY {', '.join(['r.bucket', *dim_names])}")
    outer = [f"{label_sql(name, 'b', segment.offset, utc)} AS g{i}" if name in TIME_FIELDS else f"g{i}"
             for i, (name, _) in enumerate(groups)]
    sql = (f"SELECT {', '.join([*outer, _OUTER_INTS, _OUTER_COST])} FROM ({inner}){_group_by(groups)}")
    return conn.execute(sql, params).fetchall()
