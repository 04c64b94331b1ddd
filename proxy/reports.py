"""Read-only usage reports over the ledger, shared by the admin API and the CLI.

Everything is synchronous sqlite3 on a read-only connection of its own; the admin API runs these
functions in a thread. Money is summed exactly: `cost_usd` is decimal text and is added up by a
Python aggregate of `Decimal`s, never by SQLite's float SUM.

Errors:
    ReportError (ValueError)    a bad query parameter; `param` names it, the message is for the user
    ReportDatabaseError         the ledger file is missing, unreadable or not a meterproxy ledger

This module must never write to the ledger, never put a caller's value into SQL text (values are
bound parameters, grouping columns come from a fixed whitelist), and never round money.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timezone
from decimal import Context, Decimal, Inexact
from pathlib import Path
from typing import Any

__all__ = [
    "COUNTERS", "GROUP_FIELDS", "GROUP_ROW_KEYS", "ReportDatabaseError", "ReportError",
    "connect_readonly", "list_calls", "parse_time", "usage_report",
]  # fmt: skip


class ReportError(ValueError):
    """A bad query parameter; the message is meant for the user and names the parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ReportDatabaseError(Exception):
    """The ledger cannot be read: missing, not SQLite, or not a meterproxy ledger."""


# name -> SQL expression: the only column text that ever reaches SQL.
_GROUPS: dict[str, str] = {
    "key": "key_id", "model": "model", "user": '"user"', "session": "session",
    "operation": "operation", "endpoint": "endpoint", "status": "status",
    # Whole seconds, so that a bucket's edge agrees with the since/until comparison.
    "hour": "strftime('%Y-%m-%dT%H:00Z', CAST(started_at AS INTEGER), 'unixepoch')",
    "day": "strftime('%Y-%m-%d', CAST(started_at AS INTEGER), 'unixepoch')",
    "month": "strftime('%Y-%m', CAST(started_at AS INTEGER), 'unixepoch')",
}  # fmt: skip
GROUP_ROW_KEYS = {"key": "key_id"}  # where a group's value sits in a row, when not under its own name
GROUP_FIELDS: tuple[str, ...] = tuple(_GROUPS)
_TAG_PREFIX = "tag:"
_TAG_NAME = re.compile(r"[A-Za-z0-9_.-]+")

_TOKENS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "total_tokens")
_COUNTER_SQL: dict[str, str] = {
    "calls": "COUNT(*)",
    "errors": "COALESCE(SUM(status NOT BETWEEN 200 AND 299), 0)",
    "unpriced_calls": "COALESCE(SUM(priced = 0), 0)",
    **{name: f"COALESCE(SUM({name}), 0)" for name in _TOKENS},
    "cost_usd": "decimal_sum(cost_usd)",
    # How much of the above the proxy counted itself rather than read from the provider.
    "counted_calls": "COALESCE(SUM(usage_source = 'counted'), 0)",
    "counted_tokens": "COALESCE(SUM(CASE WHEN usage_source = 'counted' THEN total_tokens ELSE 0 END), 0)",
}
COUNTERS: tuple[str, ...] = tuple(_COUNTER_SQL)
# list_calls output, in SELECT order; "ts" is started_at rendered.
_CALL_FIELDS = (
    "request_id", "ts", "key_id", "key_hint", "user", "session", "operation", "tags", "method",
    "endpoint", "model", "requested_model", "stream", "status", "error", "latency_ms", "ttfb_ms",
    *_TOKENS, "usage_source", "priced", "cost_usd", "approximate", "lower_bound", "usage_note",
    "counted_prompt_tokens", "counted_completion_tokens",
)  # fmt: skip
_CALL_SQL = ", ".join(
    {"ts": "started_at", "user": '"user"'}.get(name, name) for name in ("id", *_CALL_FIELDS)
)
MAX_LIMIT = 1000

# Enough digits for any sum of ledger costs; Inexact is trapped so a sum is exact or an error.
_EXACT = Context(prec=200, traps=[Inexact])


class _DecimalSum:
    """SQLite aggregate: the exact sum of decimal strings, as a plain decimal string."""

    def __init__(self) -> None:
        self.total = Decimal(0)

    def step(self, value: str | None) -> None:
        if value is not None:
            self.total = _EXACT.add(self.total, Decimal(value))

    def finalize(self) -> str:
        return format(self.total, "f")


def connect_readonly(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A read-only connection to the ledger at `path`, with `decimal_sum` registered.

    check_same_thread is off so the admin API may reuse it from worker threads, one at a time.
    """
    file = Path(path)
    if not file.is_file():
        raise ReportDatabaseError(f"no ledger at {os.fspath(path)}: file not found")
    uri = file.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5.0, check_same_thread=False)
    except sqlite3.Error as exc:
        raise ReportDatabaseError(f"cannot open ledger {os.fspath(path)}: {exc}") from exc
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        has_calls = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'calls'"
        ).fetchone()
    except sqlite3.Error as exc:
        conn.close()
        raise ReportDatabaseError(f"cannot read ledger {os.fspath(path)}: {exc}") from exc
    if version < 1 or has_calls is None:
        conn.close()
        raise ReportDatabaseError(f"{os.fspath(path)} is not a meterproxy ledger")
    conn.create_aggregate("decimal_sum", 1, _DecimalSum)  # type: ignore[arg-type]
    return conn


def parse_time(value: str, param: str) -> float:
    """Unix seconds from ISO 8601 (a date, or a datetime; naive means UTC) or from unix seconds."""
    if not isinstance(value, str) or not value.strip():
        raise ReportError(f"{param}: a time is required (ISO 8601 or unix seconds)", param)
    text = value.strip()
    try:
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)  # all digits: unix seconds, even where ISO "basic" would fit
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            seconds = moment.timestamp()
    except (ValueError, OverflowError):
        seconds = math.nan
    if not math.isfinite(seconds):
        raise ReportError(
            f"{param}: {value!r} is not a time; use ISO 8601 (2026-11-23, "
            "2026-11-23T14:00:00Z) or unix seconds",
            param,
        )
    return seconds


def usage_report(
    conn: sqlite3.Connection,
    *,
    group_by: Sequence[str] = (),
    since: float | None = None,
    until: float | None = None,
    key: str | None = None,
    user: str | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Counters per group over calls started in [since, until); see the module docstring."""
    groups = _parse_group_by(group_by)
    _check_time(since, "since")
    _check_time(until, "until")
    if since is not None and until is not None and until <= since:
        raise ReportError("until: must be later than since", "until")

    select: list[str] = []
    params: list[Any] = []
    for i, (name, _) in enumerate(groups):
        if name.startswith(_TAG_PREFIX):
            select.append(f"json_extract(tags, ?) AS g{i}")
            params.append(f'$."{name[len(_TAG_PREFIX):]}"')
        else:
            select.append(f"{_GROUPS[name]} AS g{i}")
    select.extend(_COUNTER_SQL.values())
    where, where_params = where_sql(
        ("started_at >= ?", since), ("started_at < ?", until),
        ("key_id = ?", key), ('"user" = ?', user), ("model = ?", model),
    )  # fmt: skip
    sql = f"SELECT {', '.join(select)} FROM calls{where}"
    if groups:
        sql += " GROUP BY " + ", ".join(f"g{i}" for i in range(len(groups)))

    width = len(groups)
    rows = []
    for found in conn.execute(sql, params + where_params):
        if found[width] == 0:
            continue  # no GROUP BY yields one all-zero row over an empty range
        row = {out: found[i] for i, (_, out) in enumerate(groups)}
        row.update(zip(COUNTERS, found[width:]))
        rows.append(row)
    costs = [Decimal(r["cost_usd"]) for r in rows]
    # copy_negate, unlike unary minus, does not round to the context's 28 digits.
    order = sorted(
        range(len(rows)), key=lambda i: (costs[i].copy_negate(), *_sort_keys(rows[i], groups))
    )
    return {
        "since": None if since is None else iso_time(since),
        "until": None if until is None else iso_time(until),
        "group_by": [name for name, _ in groups],
        "rows": [rows[i] for i in order],
        "totals": _totals(rows, costs),
    }


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
                    raise ReportError(
                        f"group_by: bad tag name in {name!r}; "
                        "tag names use only letters, digits, '_', '.' and '-'",
                        "group_by",
                    )
                groups[name] = name
            elif name in _GROUPS:
                groups[name] = GROUP_ROW_KEYS.get(name, name)
            else:
                raise ReportError(
                    f"group_by: unknown field {name!r}; valid: {', '.join(GROUP_FIELDS)}, "
                    "tag:<name>",
                    "group_by",
                )
    return list(groups.items())


def _check_time(value: float | None, param: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ReportError(f"{param}: must be unix seconds, got {value!r}", param)


def where_sql(*conditions: tuple[str, Any]) -> tuple[str, list[Any]]:
    used = [(sql, value) for sql, value in conditions if value is not None]
    if not used:
        return "", []
    return " WHERE " + " AND ".join(sql for sql, _ in used), [value for _, value in used]


def _sort_keys(row: dict[str, Any], groups: list[tuple[str, str]]) -> list[tuple[bool, bool, Any]]:
    # None sorts last; the middle flag keeps ints and strs (a tag may hold either) apart.
    keys = []
    for _, out in groups:
        value = row[out]
        keys.append((value is None, isinstance(value, str), "" if value is None else value))
    return keys


def _totals(rows: list[dict[str, Any]], costs: list[Decimal]) -> dict[str, Any]:
    totals: dict[str, Any] = {name: sum(r[name] for r in rows) for name in COUNTERS if name != "cost_usd"}
    cost = Decimal(0)
    for c in costs:
        cost = _EXACT.add(cost, c)
    totals["cost_usd"] = format(cost, "f")
    return totals


def iso_time(ts: float) -> str:
    moment = datetime.fromtimestamp(ts, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def list_calls(
    conn: sqlite3.Connection,
    *,
    key: str | None = None,
    limit: int = 50,
    before: str | None = None,
) -> dict[str, Any]:
    """The newest calls first, `limit` at a time; pass the returned `next` as `before` for more."""
    limit = _check_limit(limit)
    cursor = None
    if before is not None:
        if not isinstance(before, str) or not re.fullmatch(r"[1-9]\d{0,18}", before):
            raise ReportError(f"before: {before!r} is not a cursor from a previous page", "before")
        cursor = int(before)
    where, params = where_sql(("key_id = ?", key), ("id < ?", cursor))
    sql = f"SELECT {_CALL_SQL} FROM calls{where} ORDER BY id DESC LIMIT ?"
    found = conn.execute(sql, [*params, limit + 1]).fetchall()  # one extra: is there a next page?
    page = found[:limit]
    return {
        "calls": [_call(row) for row in page],
        "next": str(page[-1][0]) if len(found) > limit else None,
    }


def _check_limit(limit: Any) -> int:
    if isinstance(limit, str) and limit.strip().isdigit():
        limit = int(limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ReportError(f"limit: must be a whole number from 1 to {MAX_LIMIT}", "limit")
    return limit


def _call(row: tuple[Any, ...]) -> dict[str, Any]:
    call = dict(zip(_CALL_FIELDS, row[1:]))
    call["ts"] = iso_time(call["ts"])
    call["tags"] = json.loads(call["tags"])
    call["stream"] = bool(call["stream"])
    call["priced"] = bool(call["priced"])
    call["approximate"] = bool(call["approximate"])
    call["lower_bound"] = bool(call["lower_bound"])
    return call
