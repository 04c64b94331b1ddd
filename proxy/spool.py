"""The spool: ledger rows that could not be committed to SQLite, kept durably until they can be.

An append-only JSON Lines file, one row (in `ledger.COLUMNS` order) per line, fsynced after every
append. The ledger writer appends a batch when the database refuses it (locked, disk full, read-only,
gone) and replays the file, in order, once the database works again; rows carry their unique
request_id, so a replay that is interrupted and repeated never duplicates them (INSERT OR IGNORE).

Everything here is blocking file I/O: the writer runs it in a thread. It must never hold a raw API key
(rows never do) and never drop a line it could not parse without saying so.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger("meterproxy")

Row = tuple[Any, ...]


class Spool:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def has_rows(self) -> bool:
        try:
            return os.path.getsize(self.path) > 0
        except OSError:
            return False

    def append(self, rows: list[Row]) -> None:
        """Append rows durably (written and fsynced before this returns). Raises OSError."""
        data = "".join(json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n" for row in rows)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data.encode())
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[Row]:
        """Every complete row, in order. A torn last line (a crash mid-append) is skipped and logged."""
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return []
        rows: list[Row] = []
        for number, line in enumerate(lines, start=1):
            try:
                value = json.loads(line)
            except ValueError:
                log.error("spool %s: line %d is not a complete row; skipped", self.path, number)
                continue
            if isinstance(value, list):
                rows.append(tuple(value))
        return rows

    def clear(self) -> None:
        """Empty the spool once its rows are committed to the database."""
        fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
