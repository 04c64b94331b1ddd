"""Rendering a usage report (reports.usage_report's dict) as CSV or as a text table for a terminal.

Pure: a report in, text out. Both outputs must be safe with values that came from client headers:
CSV cells a spreadsheet would run as formulas are defused, control characters never reach a terminal.
"""

from __future__ import annotations

import csv
import io
import re
from decimal import Decimal
from typing import Any

from proxy.reports import COUNTERS, GROUP_ROW_KEYS

_FORMULA_START = re.compile(r"\s*[=+\-@]")
_TABLE_COUNTERS = (
    ("calls", "calls"), ("errors", "errors"), ("unpriced_calls", "unpriced_calls"),
    ("counted_calls", "counted_calls"), ("prompt", "prompt_tokens"), ("completion", "completion_tokens"),
    ("cached", "cached_tokens"), ("reasoning", "reasoning_tokens"), ("total", "total_tokens"),
    ("cost_usd", "cost_usd"),
)  # fmt: skip
UNPRICED_MARK = "*"
_MAX_CELL = 48


def _group_columns(report: dict[str, Any]) -> list[str]:
    """Output keys of the report's group fields; a lone "group" column when it has none."""
    columns = [GROUP_ROW_KEYS.get(name, name) for name in report["group_by"]]
    return columns or ["group"]


def _labelled_rows(report: dict[str, Any], columns: list[str]) -> list[dict[str, Any]]:
    rows = report["rows"] if report["group_by"] else [{"group": "all", **r} for r in report["rows"]]
    total = {**dict.fromkeys(columns, ""), columns[0]: "TOTAL", **report["totals"]}
    return [*rows, total]


def to_csv(report: dict[str, Any]) -> str:
    """CSV: a header, one line per row, then a TOTAL line. Formula-like cells are defused."""
    columns = _group_columns(report)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*columns, *COUNTERS])
    for row in _labelled_rows(report, columns):
        writer.writerow([csv_cell(row.get(name)) for name in (*columns, *COUNTERS)])
    return out.getvalue()


def csv_cell(value: Any) -> str:
    """A value as a CSV cell a spreadsheet will not run: text starting with = + - @ (after blanks) is
    prefixed with a quote. Used by the reports' CSV and by `meterproxy export`."""
    text = "" if value is None else str(value)
    # A spreadsheet would run "=HYPERLINK(...)" from a user/tag header; a quote makes it text.
    return "'" + text if _FORMULA_START.match(text) else text


def to_table(report: dict[str, Any]) -> str:
    """A fixed-width text table for a terminal, ending with a TOTAL line.

    Costs carry one number of decimals per table, so they compare by eye (padding only: the figures stay
    exact). A cost that includes unpriced calls is marked, with a note under the table: it is not free."""
    columns = _group_columns(report)
    header = [*columns, *(title for title, _ in _TABLE_COUNTERS)]
    rows = _labelled_rows(report, columns)
    places = max((_places(row["cost_usd"]) for row in rows), default=0)
    lines = [
        [_text_cell(row.get(name)) for name in columns]
        + [_cost_cell(row, places) if counter == "cost_usd" else _number_cell(row[counter])
           for _, counter in _TABLE_COUNTERS]
        for row in rows
    ]
    header[-1] += " "  # the cost cells' mark column
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    numeric = len(columns)

    def render(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(w) if i >= numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths))
        )

    rule = "  ".join("-" * w for w in widths)
    body = [render(cells).rstrip() for cells in lines]
    out = [render(header), rule, *body[:-1], rule, body[-1]]  # the header keeps the mark column: as wide as the rule
    unpriced = report["totals"].get("unpriced_calls") or 0
    if unpriced:
        out.append(f"{UNPRICED_MARK} includes {unpriced:,} unpriced call(s): their model has no price, so their "
                   "cost is unknown, not 0 (add the model to the pricing table, then run meterproxy reprice)")
    return "\n".join(out) + "\n"


def _places(cost: Any) -> int:
    exponent = Decimal(str(cost)).as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _cost_cell(row: dict[str, Any], places: int) -> str:
    cost = Decimal(str(row["cost_usd"]))
    if row.get("unpriced_calls") and not cost:
        return "unpriced" + UNPRICED_MARK  # never a 0 that reads as a free call
    # Padding with zeros, never rounding: `places` is the most any cost in the table has.
    text = f"{cost:.{places}f}"
    return text + (UNPRICED_MARK if row.get("unpriced_calls") else " ")


def _text_cell(value: Any) -> str:
    if value is None:
        return "-"
    # Values come from client headers: escape control characters so they cannot drive the terminal.
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"


def _number_cell(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)
