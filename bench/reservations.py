"""Shared budget reservations per second: N processes, team budgets, one PostgreSQL database.

Run `python -m bench.reservations [--db URL] [--procs 3] [--concurrency 8] [--seconds 5] [--teams 1]
[--connections 2]`. It makes a schema
of its own in the database (dropped at the end), and each process reserves through `SharedLimits` (its
pool of `--connections` connections, as a replica has) with `--concurrency` reservations in flight; every 50 granted
reservations are settled by writing their rows the way the ledger does (one transaction, `settle_rows`).
Prints reservations per second (all processes) and the latency of one reservation. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import time
from decimal import Decimal
from urllib.parse import quote, urlsplit, urlunsplit

SERVER = os.environ.get("METERPROXY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _with_schema(url: str, schema: str) -> str:
    parts = urlsplit(url)
    option = "options=" + quote(f"-csearch_path={schema}", safe="")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, f"{parts.query}&{option}" if parts.query else option,
                       ""))


def _worker(url: str, concurrency: int, seconds: float, start_at: float, out: multiprocessing.Queue,
            connections: int, teams: int) -> None:
    from proxy.control.limits import Limits, Subject
    from proxy.control.shared import SharedHold, SharedLimits
    from proxy.core.record import CallRecord
    from proxy.ledger.budget_store import settle_rows
    from proxy.ledger.db import INSERT_SQL
    from proxy.ledger.sqlconn import connect_postgres
    from proxy.ledger.target import parse_target
    from proxy.ledger.writer import record_row

    target = parse_target(url)
    limits_of = [[(Subject("team", f"bench-{n}"), Limits(budget_usd=Decimal("1000000"), budget_period="month"))]
                 for n in range(teams)]
    ledger = connect_postgres(target)
    latencies: list[float] = []
    refused = 0

    async def run() -> None:
        nonlocal refused
        shared = SharedLimits(target, connections=connections)
        await shared.open()
        settled: list[tuple[SharedHold, str]] = []
        await asyncio.sleep(max(0.0, start_at - time.time()))
        end = time.time() + seconds

        async def one() -> None:
            nonlocal refused
            while time.time() < end:
                t0 = time.perf_counter()
                limits = random.choice(limits_of)
                held = await shared.acquire(os.urandom(16).hex(), limits, 0, Decimal("0.01"), time.time())
                latencies.append(time.perf_counter() - t0)
                if not isinstance(held, SharedHold):
                    refused += 1
                    continue
                settled.append((held, limits[0][0].name))
                if len(settled) >= 50:
                    batch, settled[:] = list(settled), []
                    rows = [record_row(CallRecord(request_id=h.id, started_at=time.time(), method="POST",
                                                  endpoint="/v1/chat/completions", ended_at=time.time(),
                                                  status=200, tags={"team": team},
                                                  cost_usd=Decimal("0.004"), priced=True)) for h, team in batch]
                    await asyncio.to_thread(_write, rows)
                    for h, _ in batch:
                        h.settle(Decimal("0.004"))

        def _write(rows: list[tuple[object, ...]]) -> None:
            with ledger.transaction():
                ledger.executemany(INSERT_SQL, rows)
                settle_rows(ledger, rows)

        await asyncio.gather(*[one() for _ in range(concurrency)])
        await shared.close()

    asyncio.run(run())
    ledger.close()
    out.put((latencies, refused))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", default=SERVER)
    ap.add_argument("--procs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--teams", type=int, default=1, help="budgets the reservations spread over (default 1: one hot row)")
    ap.add_argument("--connections", type=int, default=2, help="each process's pg_pool_size (default 2)")
    args = ap.parse_args()

    import psycopg

    from proxy.ledger.migrations_postgres import migrate
    from proxy.ledger.sqlconn import connect_postgres
    from proxy.ledger.target import parse_target

    schema = f"bench_reservations_{os.getpid()}"
    with psycopg.connect(args.db, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    url = _with_schema(args.db, schema)
    try:
        conn = connect_postgres(parse_target(url))
        migrate(conn)
        ctx = multiprocessing.get_context("spawn")
        out: multiprocessing.Queue = ctx.Queue()
        start_at = time.time() + 2.0
        procs = [ctx.Process(target=_worker, args=(url, args.concurrency, args.seconds, start_at, out, args.connections,
                                                                 args.teams))
                 for _ in range(args.procs)]
        for p in procs:
            p.start()
        results = [out.get(timeout=args.seconds + 60) for _ in procs]
        for p in procs:
            p.join(30)
        latencies = sorted(x for lat, _ in results for x in lat)
        refused = sum(r for _, r in results)
        spent, rows = conn.execute("SELECT (SELECT decimal_sum(spent) FROM budget_spend WHERE period = 'month'),"
                                   " (SELECT decimal_sum(cost_usd) FROM calls)").fetchone()
        conn.close()
        print(f"{args.procs} processes x {args.concurrency} in flight, {args.seconds:g} s, {args.teams} team budget(s), "
              f"{args.connections} connection(s) each")
        print(f"reservations: {len(latencies)} ({len(latencies) / args.seconds:.0f}/s), refused {refused}")
        print(f"latency ms: p50 {statistics.median(latencies) * 1000:.2f}  "
              f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.2f}")
        print(f"spend row {spent} == rows' sum {rows}: {spent == rows}")
    finally:
        with psycopg.connect(args.db, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


if __name__ == "__main__":
    main()
