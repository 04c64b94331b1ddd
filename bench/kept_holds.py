"""What holding spooled calls' cost costs: the start of a replica whose spool holds N calls, and a renewal.

Run `python -m bench.kept_holds [--db URL] [--calls 10000]`. It writes N rows (a key, a user and a team each)
to a spool in a temporary folder, times reading it and turning it into holds (`Spool.read`,
`budget_store.spooled_holds`: what `SharedLimits.keep_spooled` does at start), then times three renewals of
them (`budget_store.keep_holds`) in a schema of its own (dropped at the end) where a team day budget and a
key month budget have their spend rows. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from decimal import Decimal

from bench.reservations import SERVER, _with_schema


def main() -> None:
    from proxy.core.record import CallRecord
    from proxy.ledger import budget_store, migrations_postgres
    from proxy.ledger.spool import Spool
    from proxy.ledger.sqlconn import connect_postgres
    from proxy.ledger.target import parse_target
    from proxy.ledger.writer import record_row

    parser = argparse.ArgumentParser(prog="python -m bench.kept_holds", description=__doc__.splitlines()[0])
    parser.add_argument("--db", default=SERVER, help="PostgreSQL server URL (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=10_000, help="spooled calls (default: %(default)s)")
    args = parser.parse_args()
    now = time.time()
    with tempfile.TemporaryDirectory() as folder:
        spool = Spool(os.path.join(folder, "spool.jsonl"))
        rows = [record_row(CallRecord(request_id=f"r{i}", started_at=now, ended_at=now, method="POST",
                                      endpoint="/v1/chat/completions", status=200, key_id="k1", user="u1",
                                      tags={"team": "ml"}, cost_usd=Decimal("0.000123"), priced=True))
                for i in range(args.calls)]
        for i in range(0, len(rows), 100):
            spool.append(rows[i:i + 100])
        started = time.perf_counter()
        kept = budget_store.spooled_holds(spool.read())
        print(f"start: {args.calls} spooled calls read and turned into holds in "
              f"{(time.perf_counter() - started) * 1000:.0f} ms")
    schema = f"bench_kept_{os.getpid()}"
    admin = connect_postgres(parse_target(args.db))
    admin.execute(f"CREATE SCHEMA {schema}")
    try:
        conn = connect_postgres(parse_target(_with_schema(args.db, schema)))
        try:
            migrations_postgres.migrate(conn)
            keys = budget_store.spend_keys(now, "k1", "u1", '{"team": "ml"}')
            for key in (keys[1], keys[6]):  # key k1 month, team ml day
                conn.execute("INSERT INTO budget_spend (kind, name, period, label, spent) VALUES (?, ?, ?, ?, 0)",
                             key)
            for turn in range(3):
                started = time.perf_counter()
                budget_store.keep_holds(conn, kept, "bench", now + 60)
                took = time.perf_counter() - started
                held = conn.execute("SELECT count(*) FROM reservations").fetchone()[0]
                print(f"renewal {turn + 1}: {held} holds in {took * 1000:.0f} ms")
        finally:
            conn.close()
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


if __name__ == "__main__":
    main()
