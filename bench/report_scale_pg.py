"""Report speed on PostgreSQL: usage reports over 10 million calls, via the rollups and via `calls`.

`python -m bench.report_scale_pg [--calls 10000000] [--server URL] [--raw-runs 1] [--keep] [--reuse NAME]
[--match TEXT]`

Creates a database of its own on the server (default postgresql://postgres@127.0.0.1:5432/postgres; the
database is `meterproxy_bench_<pid>`, dropped at the end unless --keep; `--reuse NAME` measures a kept one
again, after running any newer migrations on it), runs the PostgreSQL migrations,
generates the calls in SQL (`INSERT … SELECT … FROM generate_series`: 92 days, 60 keys in 12 teams, 400
users, 14 models, 20 operations, 3.5% errors, 15% counted usage, exact costs in whole picodollars), then
builds the rollups in SQL the way `rollup_build` defines them (hour rows per dimension set, day and month rows,
each bucket's totals, each dimension's own rows; picodollars and exponents), marks them current, builds the
views (bench.report_scale.VIEWS: the default pairs, Berlin and Kolkata) as the upkeep does, and times
the same `usage_report` shapes as bench/report_scale.py (SQLite): median of 5 warm runs through the rollups,
and a raw scan of `calls` (use_rollups=False) whose answer must be identical.

It must never touch a database it did not create.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import psycopg

from bench.report_scale import END, MODELS, START, build_views, measure, print_table
from proxy.ledger import migrations_postgres, rollups
from proxy.ledger.sqlconn import connect_postgres
from proxy.ledger.target import parse_target

SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
# Each dimension's column in the per-hour base table, and how a NULL reads in a hash join (none are NULL here,
# but a dimension set may hold NULLs in general).
_DIMS = [("key_id", "key_id"), ("model", "model"), ("usr", '"user"'), ("operation", "operation"),
         ("endpoint", "endpoint"), ("status", "status"), ("team", "team")]  # fmt: skip
_INTS = rollups.INT_COUNTERS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.report_scale_pg", description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=10_000_000)
    p.add_argument("--server", default=os.environ.get("METERPROXY_TEST_PG", SERVER))
    p.add_argument("--raw-runs", type=int, default=1, help="runs of each raw-scan report (0: none, no check)")
    p.add_argument("--keep", action="store_true", help="keep the database (its URL is printed)")
    p.add_argument("--reuse", metavar="NAME",
                   help="measure database NAME on the server, made by an earlier --keep run, instead of building one "
                        "(its newer migrations are run first; it is never dropped)")
    p.add_argument("--match", help='only the reports whose "range group_by" contains this, e.g. "August user"')
    return p


def _database_url(server: str, name: str) -> str:
    parts = urlsplit(server)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def _calls_sql(n: int) -> str:
    models = ", ".join(f"'{m}'" for m, *_ in MODELS)
    endpoints = ", ".join(f"'{e}'" for _, e, *_ in MODELS)
    p_in = ", ".join(str(p) for *_, p, _ in MODELS)
    p_out = ", ".join(str(p) for *_, p in MODELS)
    span = END - START
    # r: one row's random draws; k: its key (a few busy keys, a long tail); m: its model (2-3 per key).
    return f"""
    INSERT INTO calls (request_id, started_at, ended_at, key_id, key_hint, "user", session, operation, tags,
        method, endpoint, requested_model, model, stream, status, error, latency_ms, ttfb_ms, prompt_tokens,
        completion_tokens, cached_tokens, reasoning_tokens, total_tokens, usage_source, priced, cost_usd,
        approximate, lower_bound, pricing_version)
    SELECT 'r' || g, t, t + 0.8, 'key-' || k, 'k' || k, 'user-' || ((k * 8 + u) % 400), 's' || (g / 7),
        'op-' || ((k + o) % 20), '{{"team":"team-' || (k % 12) || '"}}', 'POST', (ARRAY[{endpoints}])[m],
        (ARRAY[{models}])[m], (ARRAY[{models}])[m], (r3 < 0.4)::int, status,
        CASE WHEN status = 200 THEN NULL ELSE 'upstream error' END, 800.0, 120.0, prompt, completion,
        prompt / 2, completion / 4, prompt + completion, CASE WHEN r4 < 0.15 THEN 'counted' ELSE 'upstream' END,
        CASE WHEN (ARRAY[{p_in}])[m] > 0 THEN 1 ELSE 0 END,
        round((prompt::numeric * (ARRAY[{p_in}]::bigint[])[m] + completion::numeric * (ARRAY[{p_out}]::bigint[])[m])
              / 1000000000000, 12),
        0, 0, 'bench'
    FROM (
        SELECT g, {START} + (g - 1 + r1) * {span}::float8 / {n} AS t, k, u, o, r3, r4,
            1 + (k * 3 + floor(r2 * 3)::int) % {len(MODELS)} AS m,
            CASE WHEN r5 < 0.965 THEN 200 WHEN r5 < 0.985 THEN 429 WHEN r5 < 0.995 THEN 500 ELSE 499 END AS status,
            CASE WHEN r5 < 0.965 THEN 20 + floor(r3 * 6000)::int ELSE 0 END AS prompt,
            CASE WHEN r5 < 0.965 THEN floor(r4 * 1200)::int ELSE 0 END AS completion
        FROM (
            SELECT g, random() AS r1, random() AS r2, random() AS r3, random() AS r4, random() AS r5,
                floor(60 * power(random(), 2))::int AS k, floor(random() * 8)::int AS u,
                floor(random() * 4)::int AS o
            FROM generate_series(1, {n}) AS g
        ) AS draws
    ) AS c
    """


_KEY = " AND ".join(f"COALESCE(b.{c}::text, '\x01') = COALESCE(d.{q}::text, '\x01')" for c, q in _DIMS)


def _rollup_sql() -> list[str]:
    """The rollups of `calls`, as rollup_build makes them: statements to run in order."""
    counters = ", ".join(f"SUM({c})" for c in _INTS)
    dim_cols = ", ".join(c for c, _ in _DIMS)
    pg_cols = ", ".join(q for _, q in _DIMS)
    sums = f"{counters}, SUM(cost_usd), SUM(cost_pico), MIN(cost_exp)"
    out = [
        "SET work_mem = '256MB'",
        # meter_team (PostgreSQL migration 1) is declared PARALLEL SAFE but has an EXCEPTION block, which a
        # parallel worker cannot run ("cannot start subtransactions during a parallel operation").
        "SET max_parallel_workers_per_gather = 0",
        # One pass over calls: the sums per hour and dimension set.
        """CREATE UNLOGGED TABLE bench_base AS SELECT floor(started_at)::bigint / 3600 * 3600 AS hour,
            key_id, model, "user" AS usr, operation, endpoint, status, meter_team(tags) AS team,
            COUNT(*) AS calls, SUM(CASE WHEN status NOT BETWEEN 200 AND 299 THEN 1 ELSE 0 END) AS errors,
            SUM(CASE WHEN priced = 0 THEN 1 ELSE 0 END) AS unpriced_calls, SUM(prompt_tokens) AS prompt_tokens,
            SUM(completion_tokens) AS completion_tokens, SUM(cached_tokens) AS cached_tokens,
            SUM(reasoning_tokens) AS reasoning_tokens, SUM(total_tokens) AS total_tokens,
            SUM(CASE WHEN usage_source = 'counted' THEN 1 ELSE 0 END) AS counted_calls,
            SUM(CASE WHEN usage_source = 'counted' THEN total_tokens ELSE 0 END) AS counted_tokens,
            SUM(cost_usd) AS cost_usd, SUM(round(cost_usd * 1000000000000))::bigint AS cost_pico,
            LEAST(0, MIN(-scale(cost_usd))) AS cost_exp
            FROM calls GROUP BY 1, 2, 3, 4, 5, 6, 7, 8""",
        f"""INSERT INTO rollup_dims ({pg_cols}) SELECT DISTINCT {dim_cols} FROM bench_base
            ON CONFLICT DO NOTHING""",
        *(f"""INSERT INTO rollup_dims ({q}) SELECT DISTINCT {c} FROM bench_base ON CONFLICT DO NOTHING"""
          for c, q in _DIMS),
        "ANALYZE bench_base", "ANALYZE rollup_dims",  # else the joins below are planned as nested loops
        f"""CREATE UNLOGGED TABLE bench_ids AS SELECT b.*, d.id AS dim_id FROM bench_base b
            JOIN rollup_dims d ON {_KEY}""",
    ]
    buckets = {
        rollups.HOUR: "hour",
        rollups.DAY: "hour - hour % 86400",
        rollups.MONTH: "extract(epoch FROM date_trunc('month', to_timestamp(hour) AT TIME ZONE 'UTC'))::bigint",
    }
    into = f"INSERT INTO rollups (grain, bucket, dim_id, {', '.join(_INTS)}, cost_usd, cost_pico, cost_exp)"
    for grain, bucket in buckets.items():
        if grain != rollups.HOUR:
            out.append(f"{into} SELECT {grain}, {bucket}, dim_id, {sums} FROM bench_ids GROUP BY 2, 3")
        else:
            out.append("ANALYZE bench_ids")
            out.append(f"{into} SELECT {grain}, hour, dim_id, {', '.join(_INTS)}, cost_usd, cost_pico, cost_exp "
                       "FROM bench_ids")
        out.append(f"{into} SELECT {grain + rollups.TOTALS}, {bucket}, {rollups.SERIES}, {sums} FROM bench_ids "
                   "GROUP BY 2")
        for i, (c, q) in enumerate(_DIMS):
            own = " AND ".join([f"COALESCE(b.{c}::text, '\x01') = COALESCE(d.{q}::text, '\x01')"]
                               + [f"d.{other} IS NULL" for j, (_, other) in enumerate(_DIMS) if j != i])
            out.append(f"{into} SELECT {rollups.projected(grain, rollups.DIMS[i])}, b.bucket, d.id, "
                       f"{', '.join(f'b.{x}' for x in _INTS)}, b.cost_usd, b.cost_pico, b.cost_exp FROM "
                       f"(SELECT {bucket} AS bucket, {c}, {sums} "
                       f"FROM bench_base GROUP BY 1, 2) AS b("
                       f"bucket, {c}, {', '.join(_INTS)}, cost_usd, cost_pico, cost_exp) JOIN rollup_dims d ON {own}")
    out += [
        f"UPDATE rollup_state SET covered_id = (SELECT max(id) FROM calls), days_until = {END}, "
        f"projected_until = {END} WHERE id = 1",
        "DROP TABLE bench_ids", "DROP TABLE bench_base", "ANALYZE",
    ]
    return out


def build(url: str, calls: int) -> dict[str, float]:
    conn = connect_postgres(parse_target(url))
    spent: dict[str, float] = {}
    try:
        migrations_postgres.migrate(conn)
        conn.execute("SELECT setseed(0.42)")
        t = time.perf_counter()
        conn.execute(_calls_sql(calls))
        spent["insert calls"] = time.perf_counter() - t
        t = time.perf_counter()
        for sql in _rollup_sql():
            t1 = time.perf_counter()
            conn.raw.execute(sql)  # no placeholders in these
            print(f"  {time.perf_counter() - t1:7.2f} s  {' '.join(sql.split())[:90]}", file=sys.stderr)
        spent["rollups"] = time.perf_counter() - t
        conn.raw.execute("VACUUM ANALYZE calls")
        spent.update(build_views(conn))
        conn.raw.execute("ANALYZE rollups")
    finally:
        conn.close()
    return spent


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    spent: dict[str, float] = {}
    if args.reuse:  # made by an earlier --keep run: never dropped here
        url = _database_url(args.server, args.reuse)
        conn = connect_postgres(parse_target(url))
        try:
            migrations_postgres.migrate(conn)  # a newer schema's migrations (indexes) on the kept rows
            spent = build_views(conn)  # and the views it has not got
        finally:
            conn.close()
        results = measure(url, args.raw_runs, args.match)
    else:
        name = f"meterproxy_bench_{os.getpid()}"
        url = _database_url(args.server, name)
        with psycopg.connect(args.server, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            spent = build(url, args.calls)
            print(f"built {args.calls:,} calls: " + ", ".join(f"{k} {v:.1f} s" for k, v in spent.items()),
                  file=sys.stderr)
            results = measure(url, args.raw_runs, args.match)
        finally:
            if not args.keep:
                with psycopg.connect(args.server, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if args.keep or args.reuse:
        with psycopg.connect(url) as info:
            size = info.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()
            calls = info.execute("SELECT count(*) FROM calls").fetchone()
        print(f"database {parse_target(url).shown}: {calls[0] if calls else 0:,} calls, {size[0] if size else '?'}"
              + (f" (reuse it: --reuse {parse_target(url).where.rsplit('/', 1)[-1]})" if args.keep else ""))
    print_table(results)
    if spent:
        print("build: " + ", ".join(f"{k} {v:.0f} s" if v >= 10 else f"{k} {v:.2f} s" for k, v in spent.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
