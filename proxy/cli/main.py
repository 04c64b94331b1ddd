"""The meterproxy command: run the proxy, and read or edit its ledger.

Every operator mistake (bad config, unreadable pricing, unusable database, bad report option) ends the
command with one line on stderr naming the file and the problem, and exit status 2 — never a traceback.
Output cut short by a closed pipe (`meterproxy export | head`) ends the command quietly with status 141,
as other Unix tools do.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from typing import Callable, Sequence

from aiohttp import web

from proxy import __version__
from proxy.app import GATE, LIVE, METRICS, counting_policy, make_admin_site, make_app
from proxy.cli.args import Parser, add_ledger_args, add_range_args, db_problem, ledger_path, time_range
from proxy.cli.budgets import add_budgets_parser, run_budgets
from proxy.cli.copy_ledger import add_copy_parser, run_copy
from proxy.cli.export import add_export_parser, run_export
from proxy.cli.keys import add_keys_parser, run_keys
from proxy.cli.migrate import add_migrate_parser, run_migrate
from proxy.cli.reprice import add_reprice_parser, run_reprice
from proxy.cli.serving import ProxyRunner, raise_open_file_limit, run_workers, worker_spool
from proxy.config import SETTINGS, ConfigError, Settings, load_settings, spool_path
from proxy.core.errors import ParameterError
from proxy.counting import CountingError
from proxy.ledger import rollup_build
from proxy.ledger.target import parse_target
from proxy.ledger.writer import LedgerError
from proxy.metering import logs
from proxy.pricing.table import PriceTable, PricingError
from proxy.reports import accuracy, render
from proxy.reports import queries as reports

log = logging.getLogger("meterproxy")

SIGPIPE_STATUS = 128 + 13  # what a shell reports for a command ended by SIGPIPE


def _flag_help(text: str, default: object) -> str:
    """A setting's help for its flag, with its default said once."""
    if "default" in text or default is None:
        return text
    return f"{text} (default: {default})"


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="meterproxy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"meterproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command", help="one of:",
                                title="commands (meterproxy COMMAND --help for each one's options)")
    serve = sub.add_parser("serve", help="run the proxy", description="Run the proxy.")
    serve.add_argument("--config", help="YAML config file (flags override it)")
    for setting in SETTINGS:
        if setting.flag:
            serve.add_argument(f"--{setting.name}", help=_flag_help(setting.help, setting.default))
    serve.add_argument("--access-log", dest="access_log", action="store_const", const=True, default=None,
                       help="log one JSON line per call (the access_log setting)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="least severe log lines shown, for every meterproxy.* logger (default: INFO)")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="N processes on one port (SO_REUSEPORT), each a replica; needs a PostgreSQL db "
                       "(default: 1)")
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by --workers: this worker's number

    report = sub.add_parser("report", help="usage and cost from the ledger, grouped as asked",
                            description="Usage and cost from the ledger.")
    add_ledger_args(report)
    report.add_argument("--group-by", default="",
                        help=f"comma list of: {', '.join(reports.GROUP_FIELDS)}, tag:<name> (default: totals)")
    add_range_args(report, tz_help="IANA time zone for day/week/month buckets (default: UTC)")
    report.add_argument("--key", help="only this key_id")
    report.add_argument("--user", help="only this user")
    report.add_argument("--model", help="only this model")
    report.add_argument("--format", default="table", choices=["table", "json", "csv"],
                        help="output format (default: table)")

    add_keys_parser(sub)
    add_budgets_parser(sub)
    add_reprice_parser(sub)
    add_migrate_parser(sub)
    add_export_parser(sub)
    add_copy_parser(sub)

    acc = sub.add_parser("accuracy", help="how far the proxy's token counts fall from the provider's, per model",
                         description="How far the proxy's token counts fall from the provider's, per model, "
                         "from the calls sampled by accuracy_sample_rate.")
    add_ledger_args(acc)
    add_range_args(acc)
    acc.add_argument("--model", help="only this model")
    acc.add_argument("--format", default="table", choices=["table", "json"], help="output format (default: table)")
    return parser


def _fail(message: str) -> int:
    print(f"meterproxy: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # serve --workers runs each worker with it
    run: Callable[[argparse.Namespace], int] = {
        "serve": _serve, "accuracy": _accuracy, "keys": run_keys, "budgets": run_budgets, "export": run_export,
        "reprice": lambda a: run_reprice(a, after=rollup_build.after_reprice),  # rebuild the rollup hours it changed
        "report": _report, "migrate": run_migrate, "copy-ledger": run_copy,
    }[args.command]
    try:
        status = run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        return _pipe_closed()
    return status


def _pipe_closed() -> int:
    """The reader of our output went away (`| head`): a normal end for a command that streams. Point stdout
    at /dev/null so the interpreter's last flush cannot fail again, and exit as SIGPIPE would."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return SIGPIPE_STATUS


# --- serve ----------------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    flags = {s.name: getattr(args, s.name) for s in SETTINGS if s.flag}
    flags["access_log"] = args.access_log
    try:
        settings = load_settings(args.config, flags)
        problem = db_problem(settings.db)
        if problem is not None:
            raise ConfigError(problem)
        prices = PriceTable.load(settings.pricing)
        counting_policy(settings).load()
    except (ConfigError, PricingError, CountingError) as exc:
        return _fail(str(exc))
    if args.workers != 1:
        return _serve_workers(args, settings)
    if args.worker is not None:  # one of --workers: a spool file of its own
        settings = dataclasses.replace(settings, spool=worker_spool(spool_path(settings), args.worker))
    logs.setup(args.log_level, settings.access_log)
    if settings.upstream.rstrip("/").endswith("/v1"):
        log.warning("upstream %s ends in /v1: requests keep their own /v1/... path, so they will go to "
                    "%s/v1/...; set upstream to the URL without /v1", settings.upstream, settings.upstream)
    created = _files_not_there(settings)
    started: list[bool] = []
    try:
        return asyncio.run(_run(settings, prices, started, reuse_port=args.worker is not None))
    except (LedgerError, OSError) as exc:
        if not started:
            _remove(created)  # a failed start leaves nothing behind it made (never a ledger that served)
        return _fail(str(exc))


def _serve_workers(args: argparse.Namespace, settings: Settings) -> int:
    """`serve --workers N`: N worker processes on one port, each its own replica of the same ledger."""
    if not 1 <= args.workers <= 256:
        return _fail(f"--workers {args.workers}: from 1 to 256 processes")
    if not parse_target(settings.db).is_postgres:
        return _fail(f"--workers {args.workers} needs a PostgreSQL ledger (--db postgresql://...): several "
                     f"processes cannot share the SQLite ledger {settings.db}; run one process, or see "
                     "docs/deploy.md")
    if settings.port == 0 or settings.admin_port == 0:
        return _fail(f"--workers {args.workers} needs a fixed port: with port 0 each worker would get a port "
                     "of its own")
    logs.setup(args.log_level, settings.access_log)
    return run_workers(args.argv, args.workers)


def _files_not_there(settings: Settings) -> list[str]:
    """The ledger's files that do not exist yet: a start that fails removes them again."""
    spool = spool_path(settings)
    names = [settings.db + suffix for suffix in ("", "-wal", "-shm", "-journal")] + [spool, f"{spool}.reserve"]
    return [name for name in names if not os.path.lexists(name)]


def _remove(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s, created by the failed start: %s", path, exc)


async def _run(settings: Settings, prices: PriceTable, started: list[bool], reuse_port: bool = False) -> int:
    """Serve until SIGINT/SIGTERM; `started` gets an entry once both ports listen."""
    files = raise_open_file_limit()
    # aiohttp reads a keep-alive timeout of 0 as "close after each response": null means no limit instead.
    keepalive = settings.keepalive_timeout if settings.keepalive_timeout is not None else 10.0**9
    bounds = dict(header_timeout=settings.header_timeout, keepalive_timeout=keepalive)
    runner = ProxyRunner(make_app(settings, prices), access_log=None, handle_signals=False,
                         shutdown_timeout=settings.shutdown_grace or 0.0, **bounds)
    try:
        await runner.setup()
    except BaseException:
        await runner.cleanup()  # a resource failed to open: close those opened before it (make_app's cleanup_ctx)
        raise
    admin_runner = None
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=1024, reuse_port=reuse_port or None)
        await site.start()
        if settings.admin_port is not None:
            admin_runner = ProxyRunner(
                make_admin_site(settings, runner.app[GATE], runner.app[LIVE], runner.app[METRICS]),
                access_log=None, handle_signals=False, **bounds)
            await admin_runner.setup()
            await web.TCPSite(admin_runner, settings.admin_host, settings.admin_port,
                              reuse_port=reuse_port or None).start()
            log.info("admin API on http://%s:%s/admin", settings.admin_host, settings.admin_port)
        started.append(True)
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
        with reports.open_read(ledger_path(args)) as conn:
            result = accuracy.accuracy_report(conn, since=since, until=until, model=args.model)
    except (ConfigError, ParameterError, reports.ReportDatabaseError) as exc:
        return _fail(str(exc))
    if args.format == "json":
        print(json.dumps(result, indent=2))
    elif not result["models"]:
        print("no calls sampled for accuracy" + (" in this range" if args.since or args.until else "") +
              (f" for model {args.model!r}" if args.model else "") + ": the proxy counts a call it has usage for "
              "only for the accuracy_sample_rate share of calls (default 0.01); raise accuracy_sample_rate in "
              "the config to sample more")
    else:
        sys.stdout.write(accuracy.accuracy_table(result))
    return 0


def _report(args: argparse.Namespace) -> int:
    try:
        group_by = [g.strip() for g in args.group_by.split(",") if g.strip()]
        since, until = time_range(args)
        with reports.open_read(ledger_path(args)) as conn:
            report = reports.usage_report(conn, group_by=group_by, since=since, until=until,
                                          key=args.key, user=args.user, model=args.model, tz=args.tz)
    except (ConfigError, ParameterError, reports.ReportDatabaseError) as exc:
        return _fail(str(exc))
    if args.format == "json":
        print(json.dumps(report, indent=2))
    elif args.format == "csv":
        sys.stdout.write(render.to_csv(report))
    else:
        sys.stdout.write(render.to_table(report))
    return 0
