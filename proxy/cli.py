"""The `meterproxy` command: `serve` runs the proxy, `report` reads the ledger.

Every operator mistake (bad config, unreadable pricing, unusable database, bad report option) ends the
command with one line on stderr naming the file and the problem, and exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Sequence

from aiohttp import web

from proxy import accuracy, render, reports, rollups
from proxy.app import GATE, LIVE, METRICS, counting_policy, make_admin_site, make_app
from proxy.cli_args import add_ledger_args, add_range_args, ledger_path, time_range
from proxy.cli_keys import add_keys_parser, run_keys
from proxy.export import add_export_parser, run_export
from proxy.reprice import add_reprice_parser, run_reprice
from proxy.serving import ProxyRunner, raise_open_file_limit
from proxy.config import SETTINGS, ConfigError, Settings, load_settings
from proxy.counting import CountingError
from proxy.ledger import LedgerError
from proxy.pricing import PriceTable, PricingError

log = logging.getLogger("meterproxy")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterproxy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="YAML config file (flags override it)")
    for setting in SETTINGS:
        if setting.flag:
            serve.add_argument(f"--{setting.name}", help=f"{setting.help} (default: {setting.default})")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    report = sub.add_parser("report", help="usage and cost from the ledger")
    add_ledger_args(report)
    report.add_argument("--group-by", default="", help=f"comma list of: {', '.join(reports.GROUP_FIELDS)}, tag:<name>")
    add_range_args(report, tz_help="IANA time zone for day/week/month buckets (default UTC)")
    report.add_argument("--key", help="only this key_id")
    report.add_argument("--user", help="only this user")
    report.add_argument("--model", help="only this model")
    report.add_argument("--format", default="table", choices=["table", "json", "csv"])

    add_keys_parser(sub)
    add_reprice_parser(sub)
    add_export_parser(sub)

    acc = sub.add_parser("accuracy", help="how far the proxy's token counts fall from the provider's, per model")
    add_ledger_args(acc)
    add_range_args(acc)
    acc.add_argument("--model", help="only this model")
    acc.add_argument("--format", default="table", choices=["table", "json"])
    return parser


def _fail(message: str) -> int:
    print(f"meterproxy: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "accuracy":
        return _accuracy(args)
    if args.command == "keys":
        return run_keys(args)
    if args.command == "reprice":
        return run_reprice(args, after=rollups.after_reprice)  # rebuild the rollup hours it changed
    if args.command == "export":
        return run_export(args)
    return _report(args)


# --- serve ----------------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {s.name: getattr(args, s.name) for s in SETTINGS if s.flag}
    try:
        settings = load_settings(args.config, flags)
        prices = PriceTable.load(settings.pricing)
        counting_policy(settings).load()
    except (ConfigError, PricingError, CountingError) as exc:
        return _fail(str(exc))
    try:
        return asyncio.run(_run(settings, prices))
    except (LedgerError, OSError) as exc:
        return _fail(str(exc))


async def _run(settings: Settings, prices: PriceTable) -> int:
    files = raise_open_file_limit()
    # aiohttp reads a keep-alive timeout of 0 as "close after each response": null means no limit instead.
    keepalive = settings.keepalive_timeout if settings.keepalive_timeout is not None else 10.0**9
    bounds = dict(header_timeout=settings.header_timeout, keepalive_timeout=keepalive)
    runner = ProxyRunner(make_app(settings, prices), access_log=None, handle_signals=False,
                         shutdown_timeout=settings.shutdown_grace or 0.0, **bounds)
    await runner.setup()
    admin_runner = None
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
        await site.start()
        if settings.admin_port is not None:
            admin_runner = ProxyRunner(
                make_admin_site(settings, runner.app[GATE], runner.app[LIVE], runner.app[METRICS]),
                access_log=None, handle_signals=False, **bounds)
            await admin_runner.setup()
            await web.TCPSite(admin_runner, settings.admin_host, settings.admin_port).start()
            log.info("admin API on http://%s:%s/admin", settings.admin_host, settings.admin_port)
        log.info("meterproxy listening on http://%s:%s -> %s (ledger %s, pricing %s, version %s)",
                 settings.host, settings.port, settings.upstream, settings.db, prices.source, prices.version)
        log.info("open-file limit: %d (each client connection holds one)", files)
        if settings.admin_token is None:
            log.warning("METERPROXY_ADMIN_TOKEN is not set: the admin API answers 401")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        runner.app[LIVE].install_sighup(loop)  # SIGHUP reloads the price table
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: finishing in-flight calls and flushing the ledger")
    finally:
        if admin_runner is not None:
            await admin_runner.cleanup()
        await runner.cleanup()
    return 0


# --- report, accuracy -----------------------------------------------------------------------------
def _accuracy(args: argparse.Namespace) -> int:
    try:
        since, until = time_range(args)
        conn = reports.connect_readonly(ledger_path(args))
        try:
            result = accuracy.accuracy_report(conn, since=since, until=until, model=args.model)
        finally:
            conn.close()
    except (ConfigError, reports.ReportError, reports.ReportDatabaseError) as exc:
        return _fail(str(exc))
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        sys.stdout.write(accuracy.accuracy_table(result))
    return 0


def _report(args: argparse.Namespace) -> int:
    try:
        group_by = [g.strip() for g in args.group_by.split(",") if g.strip()]
        since, until = time_range(args)
        conn = reports.connect_readonly(ledger_path(args))
        try:
            report = reports.usage_report(conn, group_by=group_by, since=since, until=until,
                                          key=args.key, user=args.user, model=args.model, tz=args.tz)
        finally:
            conn.close()
    except (ConfigError, reports.ReportError, reports.ReportDatabaseError) as exc:
        return _fail(str(exc))
    if args.format == "json":
        print(json.dumps(report, indent=2))
    elif args.format == "csv":
        sys.stdout.write(render.to_csv(report))
    else:
        sys.stdout.write(render.to_table(report))
    return 0
