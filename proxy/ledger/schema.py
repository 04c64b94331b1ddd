"""Bringing a ledger, on either backend, to this build's schema: what `meterproxy migrate` runs.

`migrate_target` opens the SQLite file (created owner-only if missing) or connects to PostgreSQL, runs that
backend's numbered migrations (`migrations.py`, `migrations_postgres.py`) and returns the version. Every
failure is a `MigrationError` with one line naming the ledger (never its password).
"""

from __future__ import annotations

import sqlite3

from proxy.ledger import migrations, migrations_postgres
from proxy.ledger.migrations import MigrationError
from proxy.ledger.sqlconn import connect_postgres
from proxy.ledger.target import Target

__all__ = ["migrate_target", "schema_missing"]


def migrate_target(target: Target) -> int:
    if target.is_postgres:
        import psycopg

        try:
            conn = connect_postgres(target, application_name="meterproxy-migrate")
        except psycopg.Error as exc:
            raise MigrationError(f"cannot connect to {target}: {_first_line(exc)}") from None
        try:
            return migrations_postgres.migrate(conn)
        except psycopg.Error as exc:
            raise MigrationError(f"cannot migrate {target}: {_first_line(exc)}") from None
        finally:
            conn.close()
    try:
        migrations.create_private(target.where)
        raw = sqlite3.connect(target.where, timeout=30.0, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise MigrationError(f"cannot open {target}: {exc}") from None
    try:
        return migrations.migrate(raw)
    except sqlite3.Error as exc:
        raise MigrationError(f"cannot migrate {target}: {exc}") from None
    finally:
        raw.close()


def schema_missing(target: Target) -> str | None:
    """For a command that only reads: one line when the PostgreSQL database has no meterproxy schema (it
    must not be created by a read), else None (also when it cannot be reached: opening it says so)."""
    if not target.is_postgres:
        return None
    import psycopg

    try:
        conn = connect_postgres(target, application_name="meterproxy-cli")
    except psycopg.Error:
        return None
    try:
        if migrations_postgres.schema_version(conn) < 1:
            return f"no meterproxy schema at {target.shown}; run meterproxy migrate"
        return None
    except psycopg.Error:
        return None
    finally:
        conn.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
