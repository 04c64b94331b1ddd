"""Ledger micro-benchmark: rows/s that `proxy.ledger.Ledger` commits under many concurrent record() calls.

`python -m bench.ledger_bench --dir D --concurrency 1,32,1000 --rows N --duration S` prints one JSON object.
Each level opens a fresh ledger file in D (the same filesystem as the proxy's), builds realistic records
beforehand, then lets `concurrency` tasks call `record()` until N rows or S seconds. It times only
`record()`, which includes turning the record into a row, group commit and fsync. For scale it also
times a bare sqlite3 one-row commit with synchronous=FULL and NORMAL on the same disk. It must never
touch the proxy's own database.

`--pg URL` runs the same levels on PostgreSQL too, in the same run: each level in a fresh schema of that
database (created, migrated by the ledger, dropped after). `--rollups` adds the rollups hook, as the proxy
runs the ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

from bench.stats import summary
from proxy.core.record import CallRecord, Usage
from proxy.ledger import rollups
from proxy.ledger.writer import Ledger


def _record(i: int) -> CallRecord:
    now = time.time()
    rec = CallRecord(request_id=uuid.uuid4().hex, started_at=now, method="POST",
                     endpoint="/v1/chat/completions", ended_at=now + 0.2, key_id="9933df256ad069d3",
                     key_hint="cdef", user=f"user-{i % 50}", operation="bench", tags={"team": "search"},
                     requested_model="gpt-4o-mini", model="gpt-4o-mini-2024-07-18", stream=bool(i & 1),
                     status=200, latency_ms=201.5, ttfb_ms=35.2, priced=True,
                     cost_usd=Decimal("0.0000082500"))
    rec.set_usage(Usage(prompt_tokens=19, completion_tokens=9, total_tokens=28), "upstream")
    return rec


async def _level(path: Path | str, concurrency: int, rows: int, duration: float,
                 with_rollups: bool = False) -> dict[str, object]:
    records = [_record(i) for i in range(rows)]
    ledger = Ledger(path)
    if with_rollups:
        ledger.db.after_insert.append(rollups.apply)
    await ledger.open()
    latencies: list[float] = []
    next_index = 0
    deadline = 0.0

    async def worker() -> None:
        nonlocal next_index
        while next_index < rows and time.perf_counter() < deadline:
            rec = records[next_index]
            next_index += 1
            t0 = time.perf_counter()
            await ledger.record(rec)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    deadline = start + duration
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    stats = dict(ledger.stats)
    await ledger.close()
    return {"backend": ledger.target.kind, "concurrency": concurrency, "rows": len(latencies),
            "wall_s": round(wall, 3),
            "rows_per_s": round(len(latencies) / wall, 1), "batches": stats["batches"],
            "max_batch": stats["max_batch_size"], "errors": stats["errors"],
            "record_latency_ms": summary(latencies)}


def _commit_cost(path: Path, synchronous: str, commits: int = 300) -> dict[str, float | int]:
    """Plain sqlite3, WAL, one one-row transaction at a time: what one commit (and its fsync) costs here."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("CREATE TABLE IF NOT EXISTS t (id TEXT PRIMARY KEY, v REAL, s TEXT)")
        times = []
        for i in range(commits):
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?, ?, ?)", (uuid.uuid4().hex, i * 0.5, "gpt-4o-mini"))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - t0)
        return summary(times)
    finally:
        conn.close()


def _schema_url(url: str, schema: str) -> str:
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    option = "options=" + quote(f"-csearch_path={schema}", safe="")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, f"{parts.query}&{option}" if parts.query else option,
                       ""))


async def _pg_level(url: str, concurrency: int, rows: int, duration: float, with_rollups: bool) -> dict[str, object]:
    import psycopg

    schema = f"meterproxy_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        return await _level(_schema_url(url, schema), concurrency, rows, duration, with_rollups)
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def _main(args: argparse.Namespace) -> dict[str, object]:
    commit = {mode: _commit_cost(Path(args.dir) / f"commit-{mode.lower()}.db", mode) for mode in ("FULL", "NORMAL")}
    out = []
    for c in (int(x) for x in args.concurrency.split(",")):
        path = Path(args.dir) / f"ledger-bench-c{c}.db"
        rows = args.rows if c > 1 else min(args.rows, 2000)  # one at a time is one fsync a row
        out.append(await _level(path, c, rows, args.duration, args.rollups))
        if args.pg:
            out.append(await _pg_level(args.pg, c, rows, args.duration, args.rollups))
    return {"levels": [lv for lv in out if lv["backend"] == "sqlite"],
            "postgres_levels": [lv for lv in out if lv["backend"] == "postgres"],
            "rollups": args.rollups, "sqlite_commit_ms": commit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--concurrency", default="1,32,1000")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--pg", help="also on this PostgreSQL database (a fresh schema per level, dropped after)")
    parser.add_argument("--rollups", action="store_true", help="with the rollups hook, as the proxy runs it")
    args = parser.parse_args()
    json.dump(asyncio.run(_main(args)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
