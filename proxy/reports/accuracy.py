"""How far the proxy's own token counts fall from the provider's, per model (read-only).

A share of calls that carry the provider's usage (`accuracy_sample_rate`) are counted as well; the ledger
keeps both figures. This reports, per model: calls sampled, and for prompt and completion tokens the mean
error (signed: negative means the count is low), the mean and worst absolute error, and the mean absolute
error as a percentage of the provider's figure. Never writes; values are bound parameters.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from proxy.core.times import iso
from proxy.reports.queries import where_sql

_SIDES = (("prompt", "counted_prompt_tokens", "prompt_tokens"),
          ("completion", "counted_completion_tokens", "completion_tokens"))


def _side_sql(counted: str, actual: str) -> list[str]:
    diff = f"({counted} - {actual})"
    present = f"{counted} IS NOT NULL"
    return [
        f"SUM({present})",
        f"AVG(CASE WHEN {present} THEN {diff} END)",
        f"AVG(CASE WHEN {present} THEN ABS({diff}) END)",
        f"MAX(CASE WHEN {present} THEN ABS({diff}) END)",
        f"AVG(CASE WHEN {present} AND {actual} > 0 THEN 100.0 * ABS({diff}) / {actual} END)",
    ]


def accuracy_report(conn: sqlite3.Connection, *, since: float | None = None, until: float | None = None,
                    model: str | None = None) -> dict[str, Any]:
    where, params = where_sql(
        ("usage_source = ?", "upstream"), ("started_at >= ?", since), ("started_at < ?", until),
        ("model = ?", model),
    )
    sampled = "(counted_prompt_tokens IS NOT NULL OR counted_completion_tokens IS NOT NULL)"
    select = ["model", "COUNT(*)"] + [sql for _, counted, actual in _SIDES for sql in _side_sql(counted, actual)]
    sql = (f"SELECT {', '.join(select)} FROM calls{where}{' AND' if where else ' WHERE'} {sampled} "
           "GROUP BY model ORDER BY COUNT(*) DESC, model")
    rows = []
    for record in conn.execute(sql, params):
        row: dict[str, Any] = {"model": record[0], "calls_sampled": record[1]}
        for i, (side, _, _) in enumerate(_SIDES):
            n, mean, mean_abs, worst, pct = record[2 + 5 * i:7 + 5 * i]
            row[side] = {"calls": n or 0, "mean_error": _round(mean), "mean_abs_error": _round(mean_abs),
                         "worst_abs_error": worst, "mean_abs_error_pct": _round(pct)}
        rows.append(row)
    return {"since": iso(since),
            "until": iso(until), "models": rows}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def accuracy_table(report: dict[str, Any]) -> str:
    header = ["model", "sampled", "prompt mean", "prompt |mean|", "prompt worst", "prompt %",
              "completion mean", "completion |mean|", "completion worst", "completion %"]
    lines = [header]
    for row in report["models"]:
        cells = [str(row["model"]), str(row["calls_sampled"])]
        for side in ("prompt", "completion"):
            s = row[side]
            cells += ["-" if v is None else str(v) for v in
                      (s["mean_error"], s["mean_abs_error"], s["worst_abs_error"], s["mean_abs_error_pct"])]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     .rstrip() for line in lines) + "\n"
