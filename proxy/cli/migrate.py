"""`meterproxy migrate`: bring a ledger (a SQLite file or a PostgreSQL database) to this build's schema.

Prints the backend, the ledger (a URL without its password) and the schema version; exit 0. Anything that
stops it (an unreachable server, a wrong password, a newer schema, a path that cannot be a database)
is one line on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from proxy.cli.args import add_ledger_args, db_problem, ledger_path
from proxy.config import ConfigError
from proxy.core.errors import MeterproxyError
from proxy.ledger.schema import migrate_target
from proxy.ledger.target import parse_target

__all__ = ["add_migrate_parser", "run_migrate"]


def add_migrate_parser(subparsers: Any) -> None:
    """Add `migrate` to the `meterproxy` subparsers."""
    cmd = subparsers.add_parser("migrate", help="create or upgrade the ledger's schema (SQLite or PostgreSQL)",
                                description="Create the ledger, or bring it to this meterproxy's schema, "
                                "and print its schema version.")
    add_ledger_args(cmd)


def run_migrate(args: argparse.Namespace) -> int:
    try:
        target = parse_target(ledger_path(args))
        problem = None if target.is_postgres else db_problem(target.where)
        if problem is not None:
            raise ConfigError(problem)
        version = migrate_target(target)
    except MeterproxyError as exc:
        print(f"meterproxy: {exc}", file=sys.stderr)
        return 2
    print(f"{target.kind} ledger {target}: schema version {version}")
    return 0

