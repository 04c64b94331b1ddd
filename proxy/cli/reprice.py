"""`meterproxy reprice`: the command's arguments and its run; re-pricing itself is proxy.ledger.reprice."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from proxy.cli.args import add_ledger_args, add_range_args, ledger_path, time_range
from proxy.config import SHIPPED_PRICING, ConfigError, load_settings
from proxy.core.errors import ParameterError
from proxy.ledger.reprice import AfterReprice, RepriceError, render_report, reprice_file
from proxy.pricing.table import PriceTable, PricingError

__all__ = ["add_reprice_parser", "run_reprice"]


def add_reprice_parser(subparsers: Any) -> None:
    """Add `reprice` to the `meterproxy` subparsers."""
    cmd = subparsers.add_parser("reprice", help="recompute recorded calls' cost with the current price table")
    add_ledger_args(cmd, config_help="YAML config file, for its db and pricing settings")
    cmd.add_argument("--pricing", help="price table (default: the config's pricing, else the shipped table)")
    add_range_args(cmd)
    cmd.add_argument("--model", help="only calls of this model (a glob with * ? [ matches several)")
    cmd.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    cmd.add_argument("--format", default="table", choices=["table", "json"], help="output format (default: table)")


def run_reprice(args: argparse.Namespace, after: AfterReprice | None = None) -> int:
    """Run `meterproxy reprice`; 0 when done, 2 with one line on stderr when it cannot be.

    `after` is handed to `reprice()` (e.g. the rollup rebuild)."""
    try:
        db = ledger_path(args)
        pricing = args.pricing or (load_settings(args.config, serving=False).pricing if args.config
                                   else SHIPPED_PRICING)
        table = PriceTable.load(pricing)
        since, until = time_range(args)
        report = reprice_file(str(db), table, since, until, args.model, args.dry_run, after)
    except (ConfigError, PricingError, ParameterError, RepriceError) as exc:
        print(f"meterproxy: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps({"pricing": table.source, **report.as_json()}, indent=2))
    else:
        sys.stdout.write(render_report(report, table.source))
    return 0
