"""`meterproxy budgets list|set|delete`: budgets and rate limits of passthrough subjects, on the database.

The command-line twin of `/admin/budgets`: `list` is `GET /admin/budgets` (the config's `limits:` and the
ones set through the API or this command, with spend so far), `set KIND NAME` is `PUT`, `delete KIND NAME`
is `DELETE`. It writes the same `subject_limits` table (`--db`: a SQLite file or a PostgreSQL URL), so a
running proxy on the same database picks a change up within about a second. Limits set in the config file are read-only
here, as in the API; a managed key's limits are the key's own (`meterproxy keys update`).
Every operator mistake ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from decimal import Decimal
from typing import Any

from proxy.cli.args import add_ledger_args, db_problem, ledger_path, missing_ledger, print_views
from proxy.config import ConfigError, load_settings
from proxy.control.budgets import spend_since
from proxy.control.db import ControlDB, ControlDBError
from proxy.control.keys import get_key
from proxy.control.limits import (
    KINDS,
    PERIODS,
    Limits,
    Subject,
    delete_limits,
    iso,
    parse_limits,
    period_of,
    read_limits,
    write_limits,
)
from proxy.core.errors import ParameterError
from proxy.ledger.read import ReportDatabaseError

__all__ = ["add_budgets_parser", "run_budgets"]

_TABLE = ("kind", "name", "source", "budget_usd", "budget_period", "spent_usd", "left_usd", "rpm", "tpm")


def add_budgets_parser(subparsers: Any) -> None:
    """Add `budgets` and its subcommands to the `meterproxy` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    add_ledger_args(common, config_help="YAML config file, for its db and limits settings")
    common.add_argument("--format", default="table", choices=["table", "json"], help="output format (default: table)")
    budgets = subparsers.add_parser("budgets", help="budgets and rate limits per key, user or team: list, set, delete",
                                    description="Budgets and rate limits of passthrough keys, users and teams "
                                    "(what /admin/budgets shows and sets).")
    sub = budgets.add_subparsers(dest="budgets_command", required=True, metavar="command", help="one of:")
    sub.add_parser("list", parents=[common], help="every subject's limits, with spend so far and budget left")
    put = sub.add_parser("set", parents=[common], help="set a subject's limits (replacing what it had)")
    delete = sub.add_parser("delete", parents=[common], help="remove limits set with set or the API")
    for parser in (put, delete):
        parser.add_argument("kind", choices=KINDS, help="key (a key_id), user or team")
        parser.add_argument("name", help="the key_id, user or team name")
    put.add_argument("--budget-usd", help="budget in USD (a decimal, e.g. 25.50); leave out for none")
    put.add_argument("--budget-period", choices=PERIODS, help="day, month (UTC calendar month) or total "
                     "(default: month)")
    put.add_argument("--rpm", help="requests per minute")
    put.add_argument("--tpm", help="tokens per minute")


def _fail(message: str) -> int:
    print(f"meterproxy: {message}", file=sys.stderr)
    return 2


def run_budgets(args: argparse.Namespace) -> int:
    try:
        path = ledger_path(args)
        config = load_settings(args.config, serving=False).limits if args.config else {}
        if args.budgets_command == "set":
            problem = db_problem(path)
            if problem is not None:
                return _fail(problem)
            raw = {name: getattr(args, name) for name in ("budget_usd", "budget_period", "rpm", "tpm")
                   if getattr(args, name) is not None}
            limits = parse_limits(raw)
        elif (problem := missing_ledger(path)) is not None:
            return _fail(problem)
        db = ControlDB(path)
        db.open_sync(migrate=args.budgets_command != "list")  # a read never changes the schema
        try:
            return _run(db, args, config, limits if args.budgets_command == "set" else None)
        finally:
            db.close_sync()
    except (ConfigError, ControlDBError, ParameterError, ReportDatabaseError) as exc:
        return _fail(str(exc))


def _run(db: ControlDB, args: argparse.Namespace, config: dict[Subject, Limits], limits: Limits | None) -> int:
    command = args.budgets_command
    if command == "list":
        table = db.read_sync(read_limits)
        entries = [(s, lim, "api" if s in table else "config") for s, lim in sorted({**config, **table}.items())]
        print_views(_views(db, entries), _TABLE, args.format)
        return 0
    subject = Subject(args.kind, args.name)
    if command == "set":
        assert limits is not None
        if subject.kind == "key" and db.read_sync(lambda conn: get_key(conn, subject.name)) is not None:
            return _fail(f"{subject.name} is a managed key: set its limits with meterproxy keys update "
                         f"{subject.name}")
        db.write_sync(lambda conn: write_limits(conn, subject, limits))
        print_views(_views(db, [(subject, limits, "api")]), _TABLE, args.format, single=True)
        return 0
    if not db.write_sync(lambda conn: delete_limits(conn, subject)):
        hint = " (limits from the config file are changed there)" if subject in config else ""
        return _fail(f"no limits set through the API or this command for {subject.kind} {subject.name!r}{hint}")
    if args.format == "json":
        print(json.dumps({"kind": subject.kind, "name": subject.name, "deleted": True}, indent=2))
    else:
        print(f"deleted the limits of {subject.kind} {subject.name!r}")
    return 0


def _views(db: ControlDB, entries: list[tuple[Subject, Limits, str]]) -> list[dict[str, Any]]:
    now = time.time()
    starts = [period_of(limits.budget_period, now)[0] for _, limits, _ in entries]
    spent = db.read_sync(lambda conn: [spend_since(conn, subject, start)
                                       for (subject, _, _), start in zip(entries, starts)])
    views = []
    for (subject, limits, source), start, total in zip(entries, starts, spent):
        left = None if limits.budget_usd is None else max(limits.budget_usd - total, Decimal(0))
        views.append({"kind": subject.kind, "name": subject.name, "source": source,
                      "period": limits.budget_period, "period_start": iso(start), **limits.public(),
                      "spent_usd": format(total, "f"), "left_usd": None if left is None else format(left, "f")})
    return views
