"""The raw call rows (`meterproxy export`, whose command is proxy.cli.export), for billing systems, as JSON Lines or spreadsheet-safe CSV.

Every column of `calls` is exported, in the table's own order (so columns added by later migrations
follow), plus `ts` (started_at as ISO 8601). In JSON Lines money columns are decimal strings, exactly as
stored; tags are an object; flags are booleans. In CSV tags are compact JSON, and any text cell a
spreadsheet would run as a formula (= + - @) is neutralised as in report CSVs. Rows are streamed in
(started_at, id) order straight from a read-only cursor, never loaded all at once; with --output the file
appears only when complete (written beside it, then renamed).

This module must never write to the ledger, never turn money into a float, and never leave a partial
file under the name asked for.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import tempfile
from collections.abc import Generator, Iterator
from typing import IO, Any

from proxy.core.times import iso
from proxy.reports import queries as reports
from proxy.reports.render import csv_cell

__all__ = ["columns", "iter_calls", "write", "write_csv", "write_file", "write_jsonl"]

_FLAGS = frozenset({"stream", "priced", "approximate", "lower_bound"})
_FETCH = 2000


def columns(conn: sqlite3.Connection) -> list[str]:
    """The calls table's columns, in order, then "ts"."""
    return [row[1] for row in conn.execute("PRAGMA table_info(calls)")] + ["ts"]


def iter_calls(conn: sqlite3.Connection, *, since: float | None = None, until: float | None = None,
               key: str | None = None) -> Generator[dict[str, Any], None, None]:
    """Call rows started in [since, until) (and of `key`), oldest first, one dict at a time."""
    names = columns(conn)[:-1]
    select = ", ".join(f'"{n}"' for n in names)  # names come from the schema, not the caller
    where, params = reports.where_sql(("started_at >= ?", since), ("started_at < ?", until), ("key_id = ?", key))
    cursor = conn.execute(f"SELECT {select} FROM calls{where} ORDER BY started_at, id", params)
    try:
        while batch := cursor.fetchmany(_FETCH):
            for row in batch:
                call = dict(zip(names, row))
                call["ts"] = iso(call["started_at"])
                yield call
    finally:
        cursor.close()


def _json_ready(call: dict[str, Any]) -> dict[str, Any]:
    tags = call.get("tags")
    if isinstance(tags, str):
        try:
            call["tags"] = json.loads(tags)
        except ValueError:
            pass  # kept as stored: an export must not fail on one odd row
    for flag in _FLAGS & call.keys():
        if call[flag] is not None:
            call[flag] = bool(call[flag])
    return call


def write_jsonl(calls: Iterator[dict[str, Any]], out: IO[str]) -> int:
    n = 0
    for call in calls:
        out.write(json.dumps(_json_ready(call), ensure_ascii=False, separators=(",", ":")))
        out.write("\n")
        n += 1
    return n


def write_csv(calls: Iterator[dict[str, Any]], out: IO[str], names: list[str]) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names)
    n = 0
    for call in calls:
        # Numbers cannot hold a formula; text (user, tags, error, ...) is neutralised.
        writer.writerow([csv_cell(v) if isinstance(v, str) else ("" if v is None else v)
                         for v in (call.get(name) for name in names)])
        n += 1
    return n


def write(fmt: str, calls: Iterator[dict[str, Any]], out: IO[str], names: list[str]) -> int:
    return write_csv(calls, out, names) if fmt == "csv" else write_jsonl(calls, out)


def write_file(path: str, fmt: str, calls: Iterator[dict[str, Any]], names: list[str]) -> int:
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=".export-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            n = write(fmt, calls, out, names)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    return n
