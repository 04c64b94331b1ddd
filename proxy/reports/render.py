"""Rendering a usage report (reports.usage_report's dict) as CSV or as a text table for a terminal.

Pure: a report in, text out. Both outputs must be safe with values that came from client headers:
CSV cells a spreadsheet would run as formulas are defused, control characters never reach a terminal.
"""

from __future__ import annotations

import csv
import io
import re
from typing import Any

from proxy.reports.queries import COUNTERS, GROUP_ROW_KEYS

_FORMULA_START = re.compile(r"\s*[=+\-@]")
_TABLE_COUNTERS = (
    ("calls", "calls"), ("errors", "errors"), ("prompt", "prompt_tokens"),
    ("completion", "completion_tokens"), ("cached", "cached_tokens"),
    ("reasoning", "reasoning_tokens"), ("total", "total_tokens"), ("cost_usd", "cost_usd"),
)  # fmt: skip
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
    """A fixed-width text table for a terminal, ending with a TOTAL line."""
    columns = _group_columns(report)
    header = [*columns, *(title for title, _ in _TABLE_COUNTERS)]
    lines = [
        [_text_cell(row.get(name)) for name in columns]
        + [_number_cell(row[counter]) for _, counter in _TABLE_COUNTERS]
        for row in _labelled_rows(report, columns)
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    numeric = len(columns)

    def render(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(w) if i >= numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    body = [render(cells) for cells in lines]
    return "\n".join([render(header), rule, *body[:-1], rule, body[-1]]) + "\n"


def _text_cell(value: Any) -> str:
    if value is None:
        return "-"
    # Values come from client headers: escape control characters so they cannot drive the terminal.
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"


def _number_cell(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)
