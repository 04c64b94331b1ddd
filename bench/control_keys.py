"""Managed keys across two control stores (two replicas' worth) on SQLite and on PostgreSQL.

`python -m bench.control_keys [--pg postgresql://postgres@127.0.0.1:5432/postgres] [--keys 200] [--revokes 30]`

For each backend: two `ControlDB`s on one database (SQLite: a temporary file; PostgreSQL: a schema of its own
in the --pg database, dropped at the end). Store A creates --keys keys; store B looks each up once with its
cache empty (a read on B's connection: "miss") and once more ("hit": memory). Then, --revokes times: B has
the key cached, A revokes it, and the time until B's lookup answers it revoked is taken. On SQLite that is
the poll (once a second); on PostgreSQL the LISTEN connection (the poll is set to an hour, so only LISTEN
can tell B). Prints the mean miss and hit and the median and slowest revoke delay.

It must never touch a schema or file it did not create.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from proxy.control.db import ControlDB
from proxy.control.keys import KeyStore


async def measure(name: str, db: str, keys: int, revokes: int) -> str:
    a, b = ControlDB(db), ControlDB(db)
    await a.open()
    await b.open()
    try:
        b.start_watch(interval=1.0 if name == "sqlite" else 3600.0)
        while b.is_postgres and not b.listening:
            await asyncio.sleep(0.01)
        on_a, on_b = KeyStore(a), KeyStore(b)
        made = [await on_a.create({"user": "bench"}) for _ in range(keys)]
        await asyncio.sleep(1.2 if name == "sqlite" else 0.2)  # the changes' own cache drops pass first
        on_b.invalidate()
        start = time.perf_counter()
        for key, _ in made:
            await on_b.lookup(key)
        miss = (time.perf_counter() - start) / keys
        start = time.perf_counter()
        for key, _ in made:
            await on_b.lookup(key)
        hit = (time.perf_counter() - start) / keys
        delays = []
        for key, record in made[:revokes]:
            await on_b.lookup(key)
            start = time.perf_counter()
            await on_a.revoke(record.key_id)
            while True:
                found = await on_b.lookup(key)
                if found is not None and found.revoked_at is not None:
                    break
                await asyncio.sleep(0.001)
            delays.append(time.perf_counter() - start)
        return (f"{name:8}  lookup miss {miss * 1e6:6.0f} us  hit {hit * 1e6:4.1f} us  revoke seen by the other "
                f"store: median {statistics.median(delays) * 1e3:7.1f} ms, slowest {max(delays) * 1e3:7.1f} ms "
                f"(n={len(delays)})")
    finally:
        await a.close()
        await b.close()


async def run(pg: str | None, keys: int, revokes: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        print(await measure("sqlite", str(Path(folder) / "ledger.db"), keys, revokes))
    if pg is None:
        return
    import psycopg

    schema = f"bench_control_{secrets.token_hex(4)}"
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        joiner = "&" if "?" in pg else "?"
        url = f"{pg}{joiner}options={quote(f'-csearch_path={schema}', safe='')}"
        print(await measure("postgres", url, keys, revokes))
    finally:
        with psycopg.connect(pg, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.control_keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="PostgreSQL database to make a temporary schema in ('none': SQLite only)")
    parser.add_argument("--keys", type=int, default=200, help="keys to create and look up (default 200)")
    parser.add_argument("--revokes", type=int, default=30, help="revokes to time (default 30)")
    args = parser.parse_args(argv)
    asyncio.run(run(None if args.pg == "none" else args.pg, args.keys, min(args.revokes, args.keys)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
