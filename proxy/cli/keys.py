"""`meterproxy keys create|list|show|update|revoke`: managed keys, on the database file directly.

Works on a SQLite file or a PostgreSQL URL (`--db`), whether or not proxies are running on it: a running
proxy notices the change within about a second (PostgreSQL tells it at once; it also polls ControlDB's
change counter once a second). `create` prints the new key once; nothing can show it again.
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
from proxy.control.keys import (
    ManagedKey,
    create_key,
    get_key,
    list_keys,
    parse_key_fields,
    revoke_key,
    update_key,
)
from proxy.control.limits import PERIODS, Subject, iso, period_of
from proxy.core.errors import ParameterError
from proxy.ledger.read import ReportDatabaseError

__all__ = ["add_keys_parser", "run_keys"]

_CLEAR = "none"  # an option given as "none" clears the field
_TABLE = ("key_id", "user", "team", "name", "status", "budget_usd", "budget_period", "spent_usd", "left_usd",
          "rpm", "tpm", "expires_at", "models", "routes")


def add_keys_parser(subparsers: Any) -> None:
    """Add `keys` and its subcommands to the `meterproxy` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    add_ledger_args(common)
    common.add_argument("--format", default="table", choices=["table", "json"], help="output format (default: table)")
    keys = subparsers.add_parser("keys", help="managed keys: create, list, show, update, revoke")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="command", help="one of:")

    create = sub.add_parser("create", parents=[common], help="issue a key (printed once)")
    create.add_argument("--user", required=True, help="the user the key's calls are attributed to")
    _field_options(create)
    update = sub.add_parser("update", parents=[common], help=f"change a key's fields ('{_CLEAR}' clears one)")
    update.add_argument("key_id", help="the key to change (its key_id, from keys list)")
    update.add_argument("--user", help="the user the key's calls are attributed to")
    _field_options(update)
    listing = sub.add_parser("list", parents=[common], help="keys with spend so far and budget left")
    listing.add_argument("--user", help="only this user's keys")
    listing.add_argument("--team", help="only this team's keys")
    listing.add_argument("--active", action="store_true", help="leave out revoked keys")
    show = sub.add_parser("show", parents=[common], help="one key")
    show.add_argument("key_id", help="the key to show")
    revoke = sub.add_parser("revoke", parents=[common], help="revoke a key (its calls stay in the ledger)")
    revoke.add_argument("key_id", help="the key to revoke")


def _field_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--team", help="team, for team budgets and reports")
    parser.add_argument("--name", help="a label for the key")
    parser.add_argument("--budget-usd", help="budget in USD (a decimal, e.g. 25.50)")
    parser.add_argument("--budget-period", choices=PERIODS, help="day, month (UTC calendar month) or total")
    parser.add_argument("--expires", help="expiry: ISO 8601 (2026-12-31T00:00:00Z) or unix seconds")
    parser.add_argument("--model", action="append", help="an allowed model or glob (repeat; 'none': any model)")
    parser.add_argument("--rpm", help="requests per minute")
    parser.add_argument("--tpm", help="tokens per minute")
    parser.add_argument("--route", action="append",
                        help="a route the key may call, e.g. 'POST /v1/files' or 'default' for the default "
                             "inference routes (repeat; 'none': the default routes only)")
    parser.add_argument("--organization", help="OpenAI-Organization to send upstream for this key")
    parser.add_argument("--project", help="OpenAI-Project to send upstream for this key")


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for option, field in (("user", "user"), ("team", "team"), ("name", "name"), ("budget_usd", "budget_usd"),
                          ("budget_period", "budget_period"), ("expires", "expires_at"), ("rpm", "rpm"),
                          ("tpm", "tpm"), ("organization", "organization"), ("project", "project")):
        value = getattr(args, option, None)
        if value is not None:
            raw[field] = None if value == _CLEAR else value
    if args.model:
        raw["models"] = None if args.model == [_CLEAR] else args.model
    if args.route:
        raw["routes"] = None if args.route == [_CLEAR] else args.route
    return parse_key_fields(raw, creating=args.keys_command == "create")


def _fail(message: str) -> int:
    print(f"meterproxy: {message}", file=sys.stderr)
    return 2


def _warn_if_passthrough(config: str | None) -> None:
    """A key made for a proxy that does not check keys does nothing: say so before it is handed out."""
    if config is None:
        print("meterproxy: note: a managed key is honoured only by a proxy started with keys: managed (no "
              "--config given, so this could not be checked)", file=sys.stderr)
    elif load_settings(config, serving=False).keys != "managed":
        print(f"meterproxy: warning: {config} has keys: passthrough, so a proxy started with it forwards "
              "clients' own keys and ignores this one; it is honoured only under keys: managed", file=sys.stderr)


def run_keys(args: argparse.Namespace) -> int:
    try:
        path = ledger_path(args)
        if args.keys_command != "create" and (problem := missing_ledger(path)) is not None:
            return _fail(problem)
        fields = _fields(args) if args.keys_command in ("create", "update") else {}
        if args.keys_command == "create":
            problem = db_problem(path)
            if problem is not None:
                return _fail(problem)
            _warn_if_passthrough(args.config)
        db = ControlDB(path)
        db.open_sync(migrate=args.keys_command not in ("list", "show"))  # a read never changes the schema
        try:
            return _run(db, args, fields)
        finally:
            db.close_sync()
    except (ConfigError, ControlDBError, ParameterError, ReportDatabaseError) as exc:
        return _fail(str(exc))


def _run(db: ControlDB, args: argparse.Namespace, fields: dict[str, Any]) -> int:
    command = args.keys_command
    if command == "create":
        key, record = db.write_sync(lambda conn: create_key(conn, fields))
        view = _views(db, [record])[0]
        if args.format == "json":
            print(json.dumps({"key": key, **view}, indent=2))
        else:
            print(f"key:    {key}\nkey_id: {record.key_id}\n(the key is shown this once: store it now)")
        return 0
    if command == "list":
        found = db.read_sync(lambda conn: list_keys(conn, user=args.user, team=args.team,
                                                    include_revoked=not args.active))
        print_views(_views(db, found), _TABLE, args.format)
        return 0
    key_id = args.key_id
    if command == "show":
        found_key = db.read_sync(lambda conn: get_key(conn, key_id))
    elif command == "update":
        found_key = db.write_sync(lambda conn: update_key(conn, key_id, fields))
    else:
        found_key = db.write_sync(lambda conn: revoke_key(conn, key_id))
    if found_key is None:
        return _fail(f"no key {key_id!r}")
    print_views(_views(db, [found_key]), _TABLE, args.format, single=True)
    if command in ("update", "revoke"):
        print(f"meterproxy: a proxy running on {db.shown} applies this within about a second (it is told of key "
              "changes, or polls for them)", file=sys.stderr)
    return 0


def _views(db: ControlDB, keys: list[ManagedKey]) -> list[dict[str, Any]]:
    now = time.time()
    starts = [period_of(key.budget_period, now)[0] for key in keys]
    spent = db.read_sync(lambda conn: [spend_since(conn, Subject("key", key.key_id), start)
                                       for key, start in zip(keys, starts)])
    views = []
    for key, start, total in zip(keys, starts, spent):
        left = None if key.budget_usd is None else max(key.budget_usd - total, Decimal(0))
        views.append({**key.public(now), "period_start": iso(start), "spent_usd": format(total, "f"),
                      "left_usd": None if left is None else format(left, "f")})
    return views
