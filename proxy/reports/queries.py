"""Read-only usage reports over the ledger, shared by the admin API and the CLI.

Synchronous, on a read connection of its own (`ledger.read.open_read`: SQLite or PostgreSQL); the admin
API runs these functions in a thread. Money is summed exactly (decimal_sum over decimal text or NUMERIC, or
integer picodollars from the rollups), never as floats. Usage reports read the hour/day/month rollups where
they can and `calls` for the rest (reports/plan.py decides, ledger/report_sql.py queries); either way the
answer is the same to the last digit, and the same on both backends. This module holds no SQL: the
storage modules (ledger/report_sql.py, ledger/calls_read.py) do.

Errors:
    ParameterError (ValueError)    a bad query parameter; `param` names it, the message is for the user
    ReportDatabaseError         the ledger file is missing, unreadable or not a meterproxy ledger

This module must never write to the ledger and never round money.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from proxy.core.errors import ParameterError
from proxy.core.money import EXACT
from proxy.core.times import iso, parse_time, parse_tz
from proxy.ledger import calls_read, report_sql, rollups
from proxy.ledger.read import (  # re-exported: reports' callers use them
    ReportDatabaseError,
    connect_readonly,
    open_read,
    read_snapshot,
)
from proxy.ledger.sqlconn import Conn
from proxy.reports import plan as report_plan

__all__ = [
    "COUNTERS", "GROUP_FIELDS", "GROUP_ROW_KEYS", "ReportDatabaseError",
    "USAGE_SOURCES", "connect_readonly", "get_call", "list_calls", "open_read", "read_snapshot", "parse_time", "parse_tz", "plan_segments", "usage_report",
]  # fmt: skip




GROUP_ROW_KEYS = {"key": "key_id"}  # where a group's value sits in a row, when not under its own name
GROUP_FIELDS: tuple[str, ...] = (*report_sql.RAW_COLUMNS, *report_plan.TIME_FIELDS)
_TAG_PREFIX = report_sql.TAG_PREFIX
_TAG_NAME = re.compile(r"[A-Za-z0-9_.-]+")

_TOKENS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "total_tokens")
# A report row's counters, in output order.
COUNTERS: tuple[str, ...] = (
    "calls", "errors", "unpriced_calls", *_TOKENS, "cost_usd", "counted_calls", "counted_tokens",
)  # fmt: skip
MAX_LIMIT = 1000
USAGE_SOURCES = ("upstream", "counted", "none")  # where a row's token figures came from



def usage_report(
    conn: Conn,
    *,
    group_by: Sequence[str] = (),
    since: float | None = None,
    until: float | None = None,
    key: str | None = None,
    user: str | None = None,
    model: str | None = None,
    tz: str | None = None,
    use_rollups: bool = True,
) -> dict[str, Any]:
    """Counters per group over calls started in [since, until); see the module docstring.

    `tz` (an IANA name; default UTC) sets where hour/day/week/month buckets begin. The answer comes from
    rollups where they can give it and from `calls` otherwise (report_plan.py); `use_rollups=False`
    reads `calls` only, which gives the same answer until retention has pruned calls."""
    groups = _parse_group_by(group_by)
    zone = parse_tz(tz)
    _check_time(since, "since")
    _check_time(until, "until")
    if since is not None and until is not None and until <= since:
        raise ParameterError("until: must be later than since", "until")
    filters = {"key": key, "user": user, "model": model}
    # One read transaction: every query sees the same snapshot, so a batch committed meanwhile is
    # counted in full or not at all, never in the rollups and in calls both.
    with read_snapshot(conn):
        state = rollups.read_state(conn) if use_rollups else rollups.State(False, False, None)
        filtered = frozenset(report_sql.FILTER_DIMS[k] for k, v in filters.items() if v is not None)
        segments = plan_segments(conn, [name for name, _ in groups], since, until, zone, state, filtered)
        found = report_sql.run(conn, [(s.source, s.lo, s.hi, s.offset, s.projected, s.view) for s in segments],
                               groups=groups, filters=filters, utc=zone is None)
    rows, order = _rows(found, len(groups))
    names = (*(out for _, out in groups), *COUNTERS)
    report: dict[str, Any] = {
        "since": None if since is None else iso(since),
        "until": None if until is None else iso(until),
        "group_by": [name for name, _ in groups],
        "tz": "UTC" if zone is None else zone.key,
        "rows": [dict(zip(names, rows[i])) for i in order],
        "totals": _totals(found, len(groups)),
    }
    pruned = state.pruned_before
    if pruned is not None and (since is None or since < pruned):
        report["pruned_before"] = iso(pruned)  # raw calls before it are gone; see report_plan.py
    return report


def plan_segments(conn: Conn, names: list[str], since: float | None, until: float | None,
                  zone: ZoneInfo | None, state: rollups.State,
                  filtered: frozenset[str] = frozenset()) -> list[report_plan.Segment]:
    """The sources that answer a report (for tests and the benchmark: which path a report takes)."""
    if not state.exists and (zone is None or not any(n in report_plan.TIME_FIELDS for n in names)):
        return [report_plan.Segment("raw", since, until)]
    extent = rollups.extent(conn) if state.exists else report_sql.calls_extent(conn)
    dirty: list[int] = []
    if state.exists and extent is not None:
        dirty = rollups.dirty_hours(conn, extent[0] if since is None else since,
                                    extent[1] if until is None else until)
    return report_plan.plan(names=names, since=since, until=until, zone=zone, state=state, extent=extent,
                            dirty=dirty, filtered=filtered)


def _parse_group_by(group_by: Sequence[str]) -> list[tuple[str, str]]:
    """[(name, output key)], deduplicated; a comma-separated item counts as several."""
    if isinstance(group_by, str):
        group_by = [group_by]
    groups: dict[str, str] = {}
    for item in group_by:
        for name in (part.strip() for part in str(item).split(",")):
            if not name:
                continue
            if name.startswith(_TAG_PREFIX):
                if not _TAG_NAME.fullmatch(name[len(_TAG_PREFIX):]):
                    raise ParameterError(
                        f"group_by: bad tag name in {name!r}; "
                        "tag names use only letters, digits, '_', '.' and '-'",
                        "group_by",
                    )
                groups[name] = name
            elif name in GROUP_FIELDS:
                groups[name] = GROUP_ROW_KEYS.get(name, name)
            else:
                raise ParameterError(
                    f"group_by: unknown field {name!r}; valid: {', '.join(GROUP_FIELDS)}, "
                    "tag:<name>",
                    "group_by",
                )
    return list(groups.items())


def _check_time(value: float | None, param: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ParameterError(f"{param}: must be unix seconds, got {value!r}", param)


# A row's counters: the integer counters (rollups.INT_COUNTERS order) before and after the cost.
_BEFORE_COST = COUNTERS.index("cost_usd")
assert COUNTERS[:_BEFORE_COST] + COUNTERS[_BEFORE_COST + 1:] == rollups.INT_COUNTERS


def _rows(found: list[report_sql.Sums], width: int) -> tuple[list[tuple[Any, ...]], list[int]]:
    """The report's rows as tuples in output order (group values, then COUNTERS), groups without calls left
    out, and their order: the most expensive first, then by the group values (None last; a tag's text and
    numbers apart)."""
    end = width + len(rollups.INT_COUNTERS)
    cut = width + _BEFORE_COST
    rows: list[tuple[Any, ...]] = []
    keys: list[tuple[Any, ...]] = []
    # Costs in whole picodollars (the common case) are ordered by the integer; any decimal part: Decimals.
    fast = all(f[end + 2] is None and f[end] is not None for f in found if f[width])
    for f in found:
        if not f[width]:
            continue  # no GROUP BY yields one all-zero row over an empty range
        rank: int | Decimal
        if fast:
            units = f[end] if f[end].__class__ is int else int(f[end])
            text, rank = rollups.pico_text(units, f[end + 1]), -units
        else:
            amount = report_sql.cost(f[end], f[end + 1], f[end + 2])
            # copy_negate, unlike unary minus, does not round to the context's 28 digits.
            text, rank = format(amount, "f"), amount.copy_negate()
        rows.append((*f[:cut], text, *f[cut:end]))
        keys.append((rank, *[(v is None, v.__class__ is str, "" if v is None else v) for v in f[:width]]))
    return rows, sorted(range(len(rows)), key=keys.__getitem__)


def _totals(found: list[report_sql.Sums], width: int) -> dict[str, Any]:
    end = width + len(rollups.INT_COUNTERS)
    found = [f for f in found if f[width]]
    ints = [sum(column) for column in zip(*(f[width:end] for f in found))] if found else [0] * (end - width)
    exps = [f[end + 1] for f in found if f[end] is not None]
    units = sum(int(f[end]) for f in found if f[end] is not None)
    decs = [f[end + 2] for f in found if f[end + 2] is not None]
    if not decs:
        text = rollups.pico_text(units, min([0, *exps]))
    else:
        total = report_sql.cost(units if exps else None, min(exps) if exps else None, None)
        for dec in decs:
            total = EXACT.add(total, Decimal(dec))
        text = format(total, "f")
    return dict(zip(COUNTERS, (*ints[:_BEFORE_COST], text, *ints[_BEFORE_COST:])))


def list_calls(
    conn: Conn,
    *,
    key: str | None = None,
    limit: int = 50,
    before: str | None = None,
    user: str | None = None,
    model: str | None = None,
    status: str | int | None = None,
    usage_source: str | None = None,
) -> dict[str, Any]:
    """The newest calls first, `limit` at a time; pass the returned `next` as `before` for more.

    Filters (each optional, all must match): key (key_id), user, model, status (an HTTP status), usage_source
    (upstream, counted or none)."""
    limit = _check_limit(limit)
    cursor = None
    if before is not None:
        # ASCII digits, and short enough to be a SQLite integer (a 19-digit one may not be).
        if not isinstance(before, str) or not re.fullmatch(r"[1-9][0-9]{0,17}", before):
            raise ParameterError(f"before: {before!r} is not a cursor from a previous page", "before")
        cursor = int(before)
    if status is not None:
        if isinstance(status, bool) or not re.fullmatch(r"[1-9]\d{2}", str(status).strip()):
            raise ParameterError(f"status: {status!r} is not an HTTP status (100 to 999)", "status")
        status = int(str(status).strip())
    if usage_source is not None and usage_source not in USAGE_SOURCES:
        raise ParameterError(f"usage_source: must be one of {', '.join(USAGE_SOURCES)}", "usage_source")
    found = calls_read.calls_page(conn, key=key, user=user, model=model, status=status,  # one extra: a next page?
                                  usage_source=usage_source, before_id=cursor, limit=limit + 1)
    page = found[:limit]
    return {
        "calls": [_call(row) for row in page],
        "next": str(page[-1][0]) if len(found) > limit else None,
    }


def get_call(conn: Conn, request_id: str) -> dict[str, Any] | None:
    """Every column of one call's row, by its request_id (None when there is none): what list_calls gives
    and the rest (pricing version, audio tokens, service tier, re-pricing, ...); "ts" is started_at rendered."""
    if not isinstance(request_id, str) or not request_id or len(request_id) > 200:
        return None
    call = calls_read.call_by_request_id(conn, request_id)
    if call is None:
        return None
    call["ts"] = iso(call["started_at"])
    try:
        call["tags"] = json.loads(call["tags"]) if call.get("tags") else {}
    except ValueError:
        pass  # shown as stored
    for name in ("stream", "priced", "approximate", "lower_bound"):
        if name in call and call[name] is not None:
            call[name] = bool(call[name])
    return call


def _check_limit(limit: Any) -> int:
    if isinstance(limit, str) and re.fullmatch(r"[0-9]{1,6}", limit.strip()):
        limit = int(limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ParameterError(f"limit: must be a whole number from 1 to {MAX_LIMIT}", "limit")
    return limit


def _call(row: tuple[Any, ...]) -> dict[str, Any]:
    call = dict(zip(calls_read.CALL_FIELDS, row[1:]))
    call["ts"] = iso(call["ts"])
    try:
        call["tags"] = json.loads(call["tags"])
    except ValueError:
        pass  # written by another tool: shown as stored, the page must not fail on one odd row
    call["stream"] = bool(call["stream"])
    call["priced"] = bool(call["priced"])
    call["approximate"] = bool(call["approximate"])
    call["lower_bound"] = bool(call["lower_bound"])
    return call
