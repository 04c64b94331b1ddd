"""How far the proxy's own token counts fall from the provider's, per model (read-only).

A share of calls that carry the provider's usage (`accuracy_sample_rate`) are counted as well; the ledger
keeps both figures. This reports, per model: calls sampled, and for prompt and completion tokens the mean
error (signed: negative means the count is low), the mean and worst absolute error, and the mean absolute
error as a percentage of the provider's figure. The SQL is ledger/calls_read.py: accuracy_rows.
"""

from __future__ import annotations

from typing import Any

from proxy.core.times import iso
from proxy.ledger.calls_read import accuracy_rows
from proxy.ledger.sqlconn import Conn

_SIDES = ("prompt", "completion")


def accuracy_report(conn: Conn, *, since: float | None = None, until: float | None = None,
                    model: str | None = None) -> dict[str, Any]:
    rows = []
    for record in accuracy_rows(conn, since=since, until=until, model=model):
        row: dict[str, Any] = {"model": record[0], "calls_sampled": record[1]}
        for i, side in enumerate(_SIDES):
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
