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

from proxy.control.limits import period_of
from proxy.core.attribution import TEAM_TAG
from proxy.core.money import EXACT, exact_sum
from proxy.core.times import iso, utc_day
from proxy.reports import queries as reports
from proxy.ui import svg

__all__ = ["DIMENSIONS", "overview", "projection", "trend"]

# The overview's "stacked by" choices: label -> usage_report group field.
DIMENSIONS = {"model": "model", "key": "key", "user": "user", "team": f"tag:{TEAM_TAG}"}
TOP_N = 5
TREND_DAYS = 30
SERIES = len(svg.PALETTE)  # colours in a chart; beyond, the smallest values are drawn together as "other"
_DIVIDE = Context(prec=28)


def projection(month_cost: Decimal, month_start: float, now: float) -> Decimal:
    """This month's spend so far, extended at the same rate to the month's end (an estimate, not money)."""
    start = datetime.fromtimestamp(month_start, UTC)
    end = (start.replace(day=28) + timedelta(days=4)).replace(day=1).timestamp()
    elapsed = max(now - month_start, 1.0)
    return _DIVIDE.multiply(month_cost, _DIVIDE.divide(Decimal(end - month_start), Decimal(elapsed)))


def trend(conn: sqlite3.Connection, dim: str, now: float, days: int = TREND_DAYS) -> dict[str, Any]:
    """Spend per UTC day over the last `days` days (today included), per value of `dim`: the biggest
    SERIES - 1 values each on their own, the rest together as "other" (the day's total less theirs, exactly).

    Asked as the API would be: the values by spend over the range (group_by=dim), then each top value's days
    (group_by=day&dim=value) and the days' totals (group_by=day) — a few small answers rather than one of
    days x values rows (30 x 400 users). team has no filter in the API: it is asked as group_by=day,tag:team."""
    today = period_of("day", now)[0]
    since = today - (days - 1) * 86400
    labels = [utc_day(since + i * 86400) for i in range(days)]
    field = DIMENSIONS[dim]
    out_key = reports.GROUP_ROW_KEYS.get(field, field)
    totals = reports.usage_report(conn, group_by=["day"], since=since)
    per_day_total = {r["day"]: Decimal(r["cost_usd"]) for r in totals["rows"]}
    if dim == "team":
        report = reports.usage_report(conn, group_by=["day", field], since=since)
        per: dict[str, dict[str, Decimal]] = {}
        for row in report["rows"]:
            per.setdefault(_name(row[out_key]), {})[row["day"]] = Decimal(row["cost_usd"])
        ranked = sorted(per, key=lambda n: (-exact_sum(per[n].values()), n))
        top = [(name, per[name]) for name in ranked[:SERIES - 1]]
        rest = len(ranked) - len(top)
    else:
        ranked_rows = reports.usage_report(conn, group_by=[field], since=since)["rows"]
        top = []
        for row in ranked_rows[:SERIES - 1]:
            if row[out_key] is None:  # no filter selects "none": its days stay in "other"
                continue
            days_of = reports.usage_report(conn, group_by=["day"], since=since, **{dim: row[out_key]})
            top.append((_name(row[out_key]), {r["day"]: Decimal(r["cost_usd"]) for r in days_of["rows"]}))
        rest = len(ranked_rows) - len(top)
    series = [(name, [values.get(d, Decimal(0)) for d in labels]) for name, values in top]
    if rest:
        other = [EXACT.subtract(per_day_total.get(d, Decimal(0)), exact_sum(v[i] for _, v in series))
                 for i, d in enumerate(labels)]
        if any(other):
            series.append((f"other ({rest})", other))
    return {"since": totals["since"], "labels": labels, "series": series, "totals": per_day_total}


def _name(value: Any) -> str:
    return "(none)" if value is None else str(value)


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
        "now": iso(now), "today": today, "month": month,
        "projected_usd": projection(month_cost, month_start, now),
        "counted_share": None if not calls else month["totals"]["counted_calls"] / calls,
        "top": top, "trend": chart, "dim": dim,
    }
