"""Read connections to the ledger: the one way reports, control and the UI open it (read-only, `decimal_sum`
registered). The writer is `proxy.ledger.writer`; nothing outside the ledger opens the file for writing."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from proxy.core.errors import MeterproxyError
from proxy.ledger import rollups

__all__ = ["ReportDatabaseError", "connect_readonly"]


class ReportDatabaseError(MeterproxyError):
    """The ledger cannot be read: missing, not SQLite, or not a meterproxy ledger."""


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
    rollups.register_functions(conn)
    return conn
