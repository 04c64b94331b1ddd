"""`meterproxy copy-ledger --from LEDGER.db --to postgresql://…`: move a SQLite ledger into PostgreSQL.

Copies calls (with their rollups, as the proxy's ledger writes them), managed keys, limits, sent budget
alerts and the re-pricing audit (the SQL is proxy.ledger.copy_store), then compares calls, tokens
and the exact cost per model on both sides and prints the comparison: exit 0 when they agree, 1 when they
differ, 2 when a ledger cannot be opened. Interrupted, it is resumed by running it again: it copies only
what the target lacks.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import psycopg

from proxy.ledger import copy_store
from proxy.ledger.copy_store import Copied, Totals
from proxy.ledger.migrations_postgres import MigrationError
from proxy.ledger.read import ReportDatabaseError
from proxy.ledger.sqlconn import Conn
from proxy.ledger.target import parse_target

__all__ = ["add_copy_parser", "run_copy"]

PROGRESS_EVERY = 50  # batches between two progress lines on stderr


def add_copy_parser(subparsers: Any) -> None:
    cmd = subparsers.add_parser(
        "copy-ledger", help="copy a SQLite ledger into a PostgreSQL one (resumable), then compare their totals",
        description="Copy a SQLite ledger (calls, keys, limits, budget alerts, re-pricing audit) into a "
        "PostgreSQL ledger, then compare calls, tokens and exact cost per model on both sides. Run it again "
        "after an interruption: it copies only what is missing.")
    cmd.add_argument("--from", dest="source", required=True, metavar="PATH", help="the SQLite ledger to copy")
    cmd.add_argument("--to", dest="target", required=True, metavar="URL",
                     help="the PostgreSQL ledger, postgresql://user@host/db (the password best in PGPASSWORD "
                     "or ~/.pgpass); created or migrated as needed")
    cmd.add_argument("--batch", type=int, default=1000, metavar="N",
                     help="calls per target transaction (default: 1000)")


def _fail(message: str) -> int:
    print(f"meterproxy: {message}", file=sys.stderr)
    return 2


def run_copy(args: argparse.Namespace) -> int:
    source, target = parse_target(args.source), parse_target(args.target)
    if source.is_postgres:
        return _fail(f"--from {source}: copy-ledger reads a SQLite ledger (a file path), not a PostgreSQL URL")
    if not target.is_postgres:
        return _fail(f"--to {target}: copy-ledger writes a PostgreSQL ledger (postgresql://...), not a file")
    if not 1 <= args.batch <= 100_000:
        return _fail(f"--batch {args.batch}: from 1 to 100000 calls per transaction")
    try:
        src = copy_store.open_source(source.where)
    except ReportDatabaseError as exc:
        return _fail(str(exc))
    try:
        try:
            dst = copy_store.open_target(target)
        except (psycopg.Error, MigrationError) as exc:  # libpq's messages never hold the password
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return _fail(f"cannot open {target}: {first}")
        try:
            return copy(src, dst, args.batch, shown=(source.shown, target.shown))
        finally:
            dst.close()
    finally:
        src.close()


def copy(src: Conn, dst: Conn, batch: int, shown: tuple[str, str]) -> int:
    """The copy and the comparison, printed; the exit status."""
    print(f"copying {shown[0]} -> {shown[1]}")
    batches = [0]

    def progress(done: Copied) -> None:
        batches[0] += 1
        if batches[0] % PROGRESS_EVERY == 0:
            print(f"  calls: {done.copied} copied, {done.present} already there ...", file=sys.stderr, flush=True)

    try:
        calls = copy_store.copy_calls(src, dst, batch, progress)
    except KeyboardInterrupt:
        print("interrupted: the batches committed so far stay; run the same command again to copy the rest",
              file=sys.stderr)
        return 130
    except dst.Error as exc:
        print(f"meterproxy: copying calls into {shown[1]} failed: {exc}; run the same command again to resume",
              file=sys.stderr)
        return 2
    print(f"calls: {calls.copied} copied, {calls.present} already there")
    for table, done in copy_store.copy_keys(src, dst).items():
        print(f"{table}: {done.copied} copied, {done.present} already there")
    runs = copy_store.copy_reprice_runs(src, dst)
    print(f"reprice_runs: {runs.copied} copied, {runs.present} already there")
    return compare(copy_store.totals(src), copy_store.totals(dst, only_of=src))


def compare(before: dict[str | None, Totals], after: dict[str | None, Totals]) -> int:
    """Print the per-model comparison; 0 when both sides agree to the last digit, else 1."""
    header = ("model", "calls", "prompt", "completion", "total tokens", "cost USD", "")
    lines: list[tuple[str, ...]] = [header]
    differ = 0
    models = sorted(set(before) | set(after), key=lambda m: (m is None, m or ""))
    for model in models:
        a, b = before.get(model), after.get(model)
        same = a == b
        differ += not same
        name = "(none)" if model is None else model

        def pair(x: object, y: object) -> str:
            return str(x) if x == y else f"{x} / {y}"

        fields = [pair(getattr(a, f, "-") if a else "-", getattr(b, f, "-") if b else "-")
                  for f in ("calls", "prompt_tokens", "completion_tokens", "total_tokens")]
        cost = pair(format(a.cost_usd, "f") if a else "-", format(b.cost_usd, "f") if b else "-")
        lines.append((name, *fields, cost, "ok" if same else "DIFFERS (source / target)"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    print("comparison per model (target: the calls copied from the source):")
    for row in lines:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if differ:
        print(f"the ledgers DIFFER for {differ} model(s): the target is not a faithful copy")
        return 1
    print("the ledgers agree: calls, tokens and exact cost per model")
    return 0
