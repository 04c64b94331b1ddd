"""What the dashboard's pages show, asked of the same functions the admin API's routes call.

Nothing here queries the ledger itself: every figure is a `reports.usage_report` (or `list_calls`,
`accuracy_report`) answer, so a page and `/admin/usage` asked the same question agree to the last digit.
Synchronous, on a read-only connection: run it in a thread.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from typing import Any

from proxy import reports
from proxy.limits import period_of

__all__ = ["DIMENSIONS", "overview", "projection", "trend"]

# The overview's "stacked by" choices: label -> usage_report group field.
DIMENSIONS = {"model": "model", "key": "key", "user": "user", "team": "tag:team"}
TOP_N = 5
TREND_DAYS = 30
_DIVIDE = Context(prec=28)


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def projection(month_cost: Decimal, month_start: float, now: float) -> Decimal:
    """This month's spend so far, extended at the same rate to the month's end (an estimate, not money)."""
    start = datetime.fromtimestamp(month_start, UTC)
    end = (start.replace(day=28) + timedelta(days=4)).replace(day=1).timestamp()
    elapsed = max(now - month_start, 1.0)
    return _DIVIDE.multiply(month_cost, _DIVIDE.divide(Decimal(end - month_start), Decimal(elapsed)))


def trend(conn: sqlite3.Connection, dim: str, now: float, days: int = TREND_DAYS) -> dict[str, Any]:
    """Spend per UTC day over the last `days` days (today included), per value of `dim`."""
    today = period_of("day", now)[0]
    since = today - (days - 1) * 86400
    field = DIMENSIONS[dim]
    report = reports.usage_report(conn, group_by=["day", field], since=since)
    labels = [_day(since + i * 86400) for i in range(days)]
    out_key = reports.GROUP_ROW_KEYS.get(field, field)
    per: dict[str, dict[str, Decimal]] = {}
    for row in report["rows"]:
        name = "(none)" if row[out_key] is None else str(row[out_key])
        per.setdefault(name, {})[row["day"]] = Decimal(row["cost_usd"])
    ranked = sorted(per, key=lambda n: (-sum(per[n].values(), Decimal(0)), n))
    series = [(name, [per[name].get(d, Decimal(0)) for d in labels]) for name in ranked]
    if len(series) > 10:  # the smallest drawn together: a chart of 60 colours says nothing
        rest = series[9:]
        other = [sum((s[1][i] for s in rest), Decimal(0)) for i in range(days)]
        series = [*series[:9], (f"other ({len(rest)})", other)]
    return {"since": report["since"], "labels": labels, "series": series, "report": report}


def overview(conn: sqlite3.Connection, now: float, dim: str = "model") -> dict[str, Any]:
    """The overview's figures: today, this month (UTC), the projection, the trend and the top spenders."""
    day_start = period_of("day", now)[0]
    month_start = period_of("month", now)[0]
    conn.execute("BEGIN")  # one snapshot for every figure on the page
    try:
        today = reports.usage_report(conn, since=day_start)
        month = reports.usage_report(conn, since=month_start)
        top = {}
        for label, field in DIMENSIONS.items():
            report = reports.usage_report(conn, group_by=[field], since=month_start)
            out_key = reports.GROUP_ROW_KEYS.get(field, field)
            top[label] = [{"name": r[out_key], **r} for r in report["rows"][:TOP_N]]
        chart = trend(conn, dim, now)
    finally:
        conn.execute("ROLLBACK")
    month_cost = Decimal(month["totals"]["cost_usd"])
    calls = month["totals"]["calls"]
    return {
        "now": reports.iso_time(now), "today": today, "month": month,
        "projected_usd": projection(month_cost, month_start, now),
        "counted_share": None if not calls else month["totals"]["counted_calls"] / calls,
        "top": top, "trend": chart, "dim": dim,
    }
