"""`meterproxy migrate`: bring a ledger (a SQLite file or a PostgreSQL database) to this build's schema.

Prints the backend, the ledger (a URL without its password) and the schema version; exit 0. Anything that
stops it (an unreachable server, a wrong password, a newer schema, a path that cannot be a database)
is one line on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from typing import Any

from proxy.cli.args import add_ledger_args, db_problem, ledger_path
from proxy.config import ConfigError
from proxy.core.errors import MeterproxyError
from proxy.ledger import migrations, migrations_postgres
from proxy.ledger.sqlconn import connect_postgres
from proxy.ledger.target import Target, parse_target

__all__ = ["add_migrate_parser", "migrate_ledger", "run_migrate"]


def add_migrate_parser(subparsers: Any) -> None:
    """Add `migrate` to the `meterproxy` subparsers."""
    cmd = subparsers.add_parser("migrate", help="create or upgrade the ledger's schema (SQLite or PostgreSQL)",
                                description="Create the ledger, or bring it to this meterproxy's schema, "
                                "and print its schema version.")
    add_ledger_args(cmd)


def migrate_ledger(target: Target) -> int:
    """Run the migrations of `target`'s backend; the schema version it is at now. Raises MeterproxyError
    with a one-line message (never the password)."""
    if target.is_postgres:
        import psycopg

        try:
            conn = connect_postgres(target, application_name="meterproxy-migrate")
        except psycopg.Error as exc:
            raise ConfigError(f"cannot connect to {target}: {_first_line(exc)}") from None
        try:
            return migrations_postgres.migrate(conn)
        except psycopg.Error as exc:
            raise ConfigError(f"cannot migrate {target}: {_first_line(exc)}") from None
        finally:
            conn.close()
    problem = db_problem(target.where)
    if problem is not None:
        raise ConfigError(problem)
    try:
        migrations.create_private(target.where)
        raw = sqlite3.connect(target.where, timeout=30.0, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"cannot open {target}: {exc}") from None
    try:
        return migrations.migrate(raw)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot migrate {target}: {exc}") from None
    finally:
        raw.close()


def run_migrate(args: argparse.Namespace) -> int:
    try:
        target = parse_target(ledger_path(args))
        version = migrate_ledger(target)
    except MeterproxyError as exc:
        print(f"meterproxy: {exc}", file=sys.stderr)
        return 2
    print(f"{target.kind} ledger {target}: schema version {version}")
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
