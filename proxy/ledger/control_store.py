"""The control tables' SQL (managed keys, subject limits, sent alerts, the change counter) on either backend.

Functions take a `Conn` (proxy/ledger/sqlconn.py) and plain values and return rows as tuples; the logic
(validation, caching, turning rows into `ManagedKey` / `Limits`) stays in `proxy.control`. Opening the
store's connections is here too: `connect(target)` and `prepare(conn)` (pragmas and migrations), and
`listen(target, ...)`, PostgreSQL's LISTEN on the channel the migration's triggers notify.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from proxy.ledger import migrations, migrations_postgres
from proxy.ledger.picodollars import register_functions
from proxy.ledger.sqlconn import Conn, connect_postgres, wrap_sqlite
from proxy.ledger.target import Target

__all__ = [
    "CHANNEL", "KEY_COLUMNS", "LIMIT_COLUMNS", "behind", "claim_alert", "connect", "delete_limits", "finish_alert",
    "insert_key", "listen", "prepare", "read_version", "revoke_key", "select_key", "select_keys",
    "select_limits", "sent_alerts", "update_key", "upsert_limits",
]  # fmt: skip

CHANNEL = "meterproxy_keys"  # notified by migrations_postgres' triggers on every keys/limits statement

# The columns of a key as `select_key` returns them, in this order (key_hash is never returned).
KEY_COLUMNS = ("key_id", "key_hint", "user", "team", "name", "budget_usd", "budget_period", "expires_at",
               "models", "rpm", "tpm", "created_at", "updated_at", "revoked_at", "routes", "organization",
               "project")
_KEY_SQL = ", ".join(f'"{c}"' for c in KEY_COLUMNS)
_UPDATABLE = frozenset(KEY_COLUMNS) - {"key_id", "key_hint", "created_at", "updated_at", "revoked_at"}
LIMIT_COLUMNS = ("kind", "name", "budget_usd", "budget_period", "rpm", "tpm")


# --- connections -----------------------------------------------------------------------------------
def connect(target: Target, *, busy_timeout: float = 5.0, connect_timeout: float = 5.0) -> Conn:
    """A new connection to the control tables of `target` (SQLite: the file is created owner-only)."""
    if target.is_postgres:
        return connect_postgres(target, application_name="meterproxy control", connect_timeout=connect_timeout)
    migrations.create_private(target.where)  # `meterproxy keys` may be the first to create the ledger file
    raw = sqlite3.connect(target.where, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    register_functions(raw)  # decimal_sum, for the CLI's spend figures read on this connection
    return wrap_sqlite(raw, target.shown)


def prepare(conn: Conn) -> None:
    """Make the schema current (SQLite: WAL and full fsync first)."""
    if conn.is_postgres:
        migrations_postgres.migrate(conn)
        return
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    migrations.migrate(conn.raw)


def behind(conn: Conn) -> str | None:
    """For a command that only reads (it must not change a production schema behind the operator's back):
    one line when the schema is not this meterproxy's, else None. Nothing is written, not even a pragma."""
    if conn.is_postgres:
        version, known = migrations_postgres.schema_version(conn), len(migrations_postgres.MIGRATIONS)
    else:
        version, known = migrations.schema_version(conn.raw), len(migrations.MIGRATIONS)
    if version < known:
        return f"{conn.shown} is at schema {version}, this meterproxy needs {known}; run meterproxy migrate"
    if version > known:
        return f"{conn.shown} is at schema {version}, newer than this meterproxy knows ({known}); upgrade meterproxy"
    return None


def read_version(conn: Conn) -> int:
    """The change counter the triggers bump on every change to keys or limits, by any process."""
    row = conn.execute("SELECT version FROM keys_changes WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


async def listen(target: Target, on_notify: Callable[[], object], on_listening: Callable[[], object],
                 *, connect_timeout: float = 5.0) -> None:
    """PostgreSQL only: LISTEN on CHANNEL on a connection of its own; `on_listening()` once it listens, then
    `on_notify()` for every notification, until cancelled. Raises the driver's error when the connection
    is lost (the caller reconnects)."""
    import psycopg

    aconn = await psycopg.AsyncConnection.connect(target.where, autocommit=True,
                                                  application_name="meterproxy control listen",
                                                  connect_timeout=max(1, int(connect_timeout)))
    try:
        await aconn.execute(f"LISTEN {CHANNEL}")
        on_listening()
        async for _ in aconn.notifies():
            on_notify()
        raise psycopg.OperationalError("the LISTEN connection ended")
    finally:
        try:
            await asyncio.wait_for(aconn.close(), timeout=5)
        except (psycopg.Error, OSError, asyncio.TimeoutError):
            pass


# --- managed keys ----------------------------------------------------------------------------------
def insert_key(conn: Conn, key_hash: str, values: Mapping[str, Any]) -> bool:
    """Insert a key (`values` by KEY_COLUMNS name); False if its key_id or hash is taken (nothing written)."""
    columns = ("key_hash", *KEY_COLUMNS)
    row = (key_hash, *(values.get(c) for c in KEY_COLUMNS))
    names = ", ".join(f'"{c}"' for c in columns)
    cursor = conn.execute(f"INSERT INTO api_keys ({names}) VALUES ({', '.join('?' * len(columns))})"
                          " ON CONFLICT DO NOTHING", row)
    return cursor.rowcount == 1


def select_key(conn: Conn, *, key_id: str | None = None, key_hash: str | None = None) -> tuple[Any, ...] | None:
    """The key (KEY_COLUMNS) with this key_id, or with this hash; None if there is none."""
    if (key_id is None) == (key_hash is None):
        raise ValueError("select_key takes key_id or key_hash")
    where, value = ("key_id", key_id) if key_id is not None else ("key_hash", key_hash)
    row = conn.execute(f"SELECT {_KEY_SQL} FROM api_keys WHERE {where} = ?", (value,)).fetchone()
    return None if row is None else tuple(row)


def select_keys(conn: Conn, *, user: str | None = None, team: str | None = None,
                include_revoked: bool = True) -> list[tuple[Any, ...]]:
    """Keys (KEY_COLUMNS) in creation order, optionally of one user and/or team, optionally active only."""
    clauses: list[str] = []
    params: list[str] = []
    if user is not None:
        clauses.append('"user" = ?')
        params.append(user)
    if team is not None:
        clauses.append("team = ?")
        params.append(team)
    if not include_revoked:
        clauses.append("revoked_at IS NULL")
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(f"SELECT {_KEY_SQL} FROM api_keys{where} ORDER BY created_at, key_id", params)
    return [tuple(row) for row in rows]


def update_key(conn: Conn, key_id: str, values: Mapping[str, Any], updated_at: float) -> bool:
    """Set the named columns of a key; False if there is no such key."""
    unknown = set(values) - _UPDATABLE
    if unknown:  # names are formatted into the statement: only known columns may reach it
        raise ValueError(f"not updatable: {', '.join(sorted(unknown))}")
    sets = "".join(f'"{name}" = ?, ' for name in values)
    cursor = conn.execute(f"UPDATE api_keys SET {sets}updated_at = ? WHERE key_id = ?",
                          (*values.values(), updated_at, key_id))
    return cursor.rowcount == 1


def revoke_key(conn: Conn, key_id: str, at: float) -> None:
    """Mark a key revoked at `at`, unless it already is (the first revocation stands)."""
    conn.execute("UPDATE api_keys SET revoked_at = ?, updated_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                 (at, at, key_id))


# --- subject limits --------------------------------------------------------------------------------
def upsert_limits(conn: Conn, kind: str, name: str, budget_usd: str | None, budget_period: str,
                  rpm: int | None, tpm: int | None, at: float) -> None:
    """Set a subject's row in `subject_limits` (replacing what it had); money as its decimal text."""
    conn.execute(
        "INSERT INTO subject_limits (kind, name, budget_usd, budget_period, rpm, tpm, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, name) DO UPDATE SET budget_usd = excluded.budget_usd,"
        " budget_period = excluded.budget_period, rpm = excluded.rpm, tpm = excluded.tpm,"
        " updated_at = excluded.updated_at",
        (kind, name, budget_usd, budget_period, rpm, tpm, at))


def delete_limits(conn: Conn, kind: str, name: str) -> bool:
    """Remove a subject's row from `subject_limits`; False if it had none."""
    return bool(conn.execute("DELETE FROM subject_limits WHERE kind = ? AND name = ?", (kind, name)).rowcount)


def select_limits(conn: Conn) -> list[tuple[Any, ...]]:
    """Every row of `subject_limits` (LIMIT_COLUMNS); budget_usd is text on SQLite, Decimal on PostgreSQL."""
    rows = conn.execute("SELECT kind, name, budget_usd, budget_period, rpm, tpm FROM subject_limits")
    return [tuple(row) for row in rows]


# --- sent alerts -----------------------------------------------------------------------------------
def claim_alert(conn: Conn, key: Sequence[str], at: float) -> bool:
    """Claim the alert (kind, name, period, threshold): True for the one caller, of any process or replica,
    that inserted its row; every other claim of it finds the row and gets False (on PostgreSQL a concurrent
    claim waits for the first one's transaction, then does nothing)."""
    kind, name, period, threshold = key
    cursor = conn.execute(
        "INSERT INTO budget_alerts (kind, name, period, threshold, created_at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING", (kind, name, period, threshold, at))
    return cursor.rowcount == 1


def finish_alert(conn: Conn, key: Sequence[str], outcome: str, attempts: int, at: float) -> None:
    """Record how a claimed alert's delivery ended."""
    kind, name, period, threshold = key
    conn.execute("UPDATE budget_alerts SET outcome = ?, attempts = ?, finished_at = ? WHERE kind = ? AND name = ?"
                 " AND period = ? AND threshold = ?", (outcome, attempts, at, kind, name, period, threshold))


def sent_alerts(conn: Conn) -> list[tuple[Any, ...]]:
    """Every claimed alert: (kind, name, period, threshold, outcome, attempts), in key order."""
    rows = conn.execute("SELECT kind, name, period, threshold, outcome, attempts FROM budget_alerts"
                        " ORDER BY kind, name, period, threshold")
    return [tuple(row) for row in rows]
