"""Command-line options the ledger-reading commands share (report, accuracy, export, reprice, keys).

One place for how a command finds the ledger (`--db`, else the config file's `db`, else the default) and how
it reads a time range, so every command says and does the same.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Iterable, Sequence, TypeVar, overload

from proxy.config import Settings, load_settings
from proxy.core.times import parse_time
from proxy.ledger.schema import schema_missing
from proxy.ledger.target import parse_target

_DEFAULT_DB = Settings().db
_N = TypeVar("_N")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands report an unknown option themselves, with their own usage.

    Plain argparse hands a subcommand's leftovers back to the top-level parser, which then prints the
    top-level usage: no help to someone who mistyped a `keys create` option."""

    # argparse's own three signatures (typeshed's), so a caller's namespace type is kept.
    @overload
    def parse_known_args(self, args: Iterable[str] | None = None,
                         namespace: None = None) -> tuple[argparse.Namespace, list[str]]: ...
    @overload
    def parse_known_args(self, args: Iterable[str] | None, namespace: _N) -> tuple[_N, list[str]]: ...
    @overload
    def parse_known_args(self, *, namespace: _N) -> tuple[_N, list[str]]: ...

    def parse_known_args(self, args: Iterable[str] | None = None,
                         namespace: object = None) -> tuple[Any, list[str]]:
        parsed, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed, extra


def db_problem(path: str) -> str | None:
    """What stops a ledger from being created at `path`, said plainly (SQLite would only say "unable to
    open database file"); None when it can be opened or created. A PostgreSQL URL is not a path: None."""
    if parse_target(path).is_postgres:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"database {path}: is a directory, not a file"
    if not os.path.exists(folder):
        return f"database {path}: the directory {folder} does not exist (create it, or choose another db path)"
    if not os.path.isdir(folder):
        return f"database {path}: {folder} is not a directory"
    return None


def missing_ledger(db: str) -> str | None:
    """"no ledger at PATH" when a SQLite ledger file does not exist, "no meterproxy schema at URL" when a
    PostgreSQL database has none (a command that only reads must not create or migrate one); else None."""
    target = parse_target(db)
    if target.is_postgres:
        return schema_missing(target)
    if os.path.isfile(db):
        return None
    return f"no ledger at {db}: file not found"


def add_ledger_args(parser: argparse.ArgumentParser, config_help: str = "YAML config file, for its db setting"
                    ) -> None:
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--db", help=f"ledger database (default: the config's db, else {_DEFAULT_DB})")


def ledger_path(args: argparse.Namespace) -> str:
    """--db, else the config's db, else the default. Raises ConfigError for a bad config file."""
    if args.db:
        return str(args.db)
    return load_settings(args.config, serving=False).db if args.config else _DEFAULT_DB


def add_range_args(parser: argparse.ArgumentParser, tz_help: str | None = None) -> None:
    """--since and --until; and --tz when the command reads times in a zone."""
    parser.add_argument("--since", help="start, ISO 8601 or unix seconds (inclusive)")
    parser.add_argument("--until", help="end, ISO 8601 or unix seconds (exclusive)")
    if tz_help is not None:
        parser.add_argument("--tz", help=tz_help)


def time_range(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """The parsed --since/--until (naive times read in --tz when the command has it). Raises ParameterError."""
    tz = getattr(args, "tz", None)
    since = parse_time(args.since, "since", tz) if args.since else None
    until = parse_time(args.until, "until", tz) if args.until else None
    return since, until


def print_views(views: list[dict[str, Any]], columns: Sequence[str], fmt: str, single: bool = False) -> None:
    """Print what a keys or budgets command found: JSON (one object when `single`), or a padded table."""
    if fmt == "json":
        print(json.dumps(views[0] if single else views, indent=2))
        return
    cells = [[_cell(v.get(col)) for col in columns] for v in views]
    widths = [max([len(col), *(len(row[i]) for row in cells)]) for i, col in enumerate(columns)]
    print("  ".join(col.ljust(w) for col, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)
