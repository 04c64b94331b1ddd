"""`meterproxy export`: the command's arguments and its run; the rows and their formats are proxy.reports.export."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from proxy.cli.args import add_ledger_args, add_range_args, ledger_path, time_range
from proxy.config import ConfigError
from proxy.core.errors import ParameterError
from proxy.reports import queries as reports
from proxy.reports.export import columns, iter_calls, write, write_file

__all__ = ["add_export_parser", "run_export"]


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "export", help="raw call rows as JSON Lines or spreadsheet-safe CSV, for billing systems")
    add_ledger_args(parser)
    add_range_args(parser, tz_help="IANA time zone for --since/--until without an offset (default UTC)")
    parser.add_argument("--key", help="only this key_id")
    parser.add_argument("--format", default="jsonl", choices=["jsonl", "csv"], help="output format (default: jsonl)")
    parser.add_argument("--output", "-o", help="file to write (default: standard output)")
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Run `meterproxy export`; 0 on success, 2 with one line on stderr on any operator error."""
    try:
        db = ledger_path(args)
        since, until = time_range(args)
        if since is not None and until is not None and until <= since:
            raise ParameterError("until: must be later than since", "until")
        conn = reports.connect_readonly(db)
    except (ConfigError, ParameterError, reports.ReportDatabaseError) as exc:
        print(f"meterproxy: {exc}", file=sys.stderr)
        return 2
    calls = iter_calls(conn, since=since, until=until, key=args.key)
    try:
        if args.output is None:
            write(args.format, calls, sys.stdout, columns(conn))
            sys.stdout.flush()
        else:
            write_file(args.output, args.format, calls, columns(conn))
    except BrokenPipeError:
        raise  # the reader went away (`| head`): the CLI ends quietly
    except (OSError, conn.Error) as exc:
        print(f"meterproxy: export failed: {exc}", file=sys.stderr)
        return 2
    finally:
        calls.close()  # its cursor first, while the connection is still open
        conn.close()
    return 0
