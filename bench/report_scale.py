"""Report speed on a large ledger: usage reports over 10 million calls, via the rollups and via `calls`.

`python -m bench.report_scale [--calls 10000000] [--dir D] [--keep] [--raw-runs 1] [--time-rebuild]`

Builds a ledger in a temporary directory (on the disk of --dir; the file of 10M calls takes a few GB: the
free space is checked first): the schema from proxy.migrations, rows generated in chunks and inserted with
executemany, each chunk rolled up by `rollups.apply` (the ledger's own hook, with big batches), then days
and months rolled up (each dimension's own rows six hours per transaction, then a day per transaction), then
the views of VIEWS built (rows per pair and per zone, rollup_views.py: a day per transaction), as the proxy's
upkeep does. It prints how long that took and how long each transaction held the write lock,
then times `usage_report` for several group_bys over the whole range and over one month (UTC,
Europe/Berlin, Asia/Kolkata), through the rollups (median of 5 warm runs) and through a raw scan of
`calls` (use_rollups=False), checks both answers are identical, and prints a table. --time-rebuild also
times what rows written without the hook cost: every hour rebuilt, one per transaction. The data: 92 days
(three whole months), 60 keys in 12 teams, 400 users (8 per key), 14 models, 20 operations, a business-
hours daily curve, 3.5% errors, 15% counted usage, exact costs.

It must never touch a ledger it did not create, and never leave the temporary directory behind unless
--keep is given.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from calendar import timegm
from pathlib import Path
from typing import Any

from proxy.config import Settings
from proxy.ledger import rollup_build, rollup_views, rollups
from proxy.ledger.db import COLUMNS, INSERT_SQL
from proxy.ledger.migrations import migrate
from proxy.ledger.rollup_build import in_transaction
from proxy.reports import queries as reports

START = timegm((2026, 7, 1, 0, 0, 0))
END = timegm((2026, 10, 1, 0, 0, 0))
MONTH = (timegm((2026, 8, 1, 0, 0, 0)), timegm((2026, 9, 1, 0, 0, 0)))
BYTES_PER_CALL = 450  # measured: rows, five indexes and rollups, with some headroom
# (model, endpoint, input and output price in picodollars per token: USD per 1M tokens x 1e6)
MODELS = [
    ("gpt-4o", "/v1/chat/completions", 2_500_000, 10_000_000), ("gpt-4o-mini", "/v1/chat/completions", 150_000, 600_000),
    ("gpt-4.1", "/v1/chat/completions", 2_000_000, 8_000_000), ("gpt-4.1-mini", "/v1/chat/completions", 400_000, 1_600_000),
    ("gpt-4.1-nano", "/v1/chat/completions", 100_000, 400_000), ("gpt-5", "/v1/responses", 1_250_000, 10_000_000),
    ("gpt-5-mini", "/v1/responses", 250_000, 2_000_000), ("gpt-5-nano", "/v1/responses", 50_000, 400_000),
    ("o3", "/v1/responses", 2_000_000, 8_000_000), ("o4-mini", "/v1/responses", 1_100_000, 4_400_000),
    ("text-embedding-3-small", "/v1/embeddings", 20_000, 0), ("text-embedding-3-large", "/v1/embeddings", 130_000, 0),
    ("llama-3.1-70b-instruct", "/v1/chat/completions", 0, 0), ("gpt-3.5-turbo", "/v1/completions", 500_000, 1_500_000),
]  # fmt: skip
GROUPINGS = [[], ["key"], ["model"], ["user", "model"], ["tag:team", "operation"], ["day"], ["month", "key"],
             ["week", "model"], ["hour"], ["day", "model"], ["hour", "model"]]  # fmt: skip
ZONES = ("Europe/Berlin", "Asia/Kolkata")  # a whole-hour offset with DST, and a half-hour one
# The views the measured shapes read: the default rollup_pairs, and report_zones set to ZONES.
VIEWS = rollup_views.wanted(Settings().rollup_pairs, ZONES)


def build_views(conn: Any) -> dict[str, float]:
    """Configure VIEWS on ledger `conn` (either backend) and build them as the upkeep does, a day per
    transaction; how long that took and how long each transaction held the write lock. Nothing to do
    on a ledger that has them."""
    in_transaction(conn, lambda: rollup_views.configure(conn, VIEWS))
    held = []
    t = time.perf_counter()
    while True:
        t1 = time.perf_counter()
        if not in_transaction(conn, lambda: rollup_views.advance(conn, VIEWS)):
            break
        held.append(time.perf_counter() - t1)
        print(f"  {len(held):,} view days ...", end="\r", file=sys.stderr)
    if not held:
        return {}
    return {"views": time.perf_counter() - t, "views_median": statistics.median(held), "views_max": max(held)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.report_scale", description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=10_000_000)
    p.add_argument("--dir", help="where to make the temporary directory (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the ledger (its path is printed)")
    p.add_argument("--raw-runs", type=int, default=1, help="runs of each raw-scan report (default 1)")
    p.add_argument("--time-rebuild", action="store_true",
                   help="also time rebuilding every hour, as for rows written without the hook")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ledger", help="measure this ledger, made by an earlier --keep run, instead of building one")
    p.add_argument("--match", help='only the reports whose "range group_by" contains this, e.g. "August user"')
    return p


class _World:
    """Who calls what: keys with their team, users, models and operations."""

    def __init__(self, rng: random.Random) -> None:
        users = [f"user-{i:03d}" for i in range(400)]
        self.keys = []
        for k in range(60):
            self.keys.append((f"{rng.getrandbits(64):016x}", f"team-{k % 12}", rng.sample(users, 8),
                              rng.sample(MODELS, rng.randint(2, 3)), rng.sample(range(20), rng.randint(2, 4))))
        self.key_weights = [1 / (k + 1) for k in range(60)]  # a few busy keys, a long tail
        weights = [0.3] * 7 + [1.0] * 2 + [3.0] * 9 + [1.5] * 3 + [0.6] * 3  # business hours, UTC
        self.hour_weights = weights
        self.statuses = [200] * 965 + [429] * 20 + [500] * 10 + [499] * 5


def _cost_text(pico: int) -> str:
    """Pricing's normalised decimal text for a whole number of picodollars."""
    whole, frac = divmod(pico, 10**12)
    frac_text = f"{frac:012d}".rstrip("0")
    return f"{whole}.{frac_text}" if frac_text else str(whole)


def _rows(world: _World, rng: random.Random, n: int, first: int, day: int) -> list[tuple[Any, ...]]:
    """`n` calls on the day starting at `day`, oldest first."""
    keys = rng.choices(world.keys, world.key_weights, k=n)
    hours = rng.choices(range(24), world.hour_weights, k=n)
    out = []
    for i in range(n):
        key_id, team, users, models, ops = keys[i]
        model, endpoint, p_in, p_out = rng.choice(models)
        started = day + hours[i] * 3600 + rng.random() * 3600
        status = rng.choice(world.statuses)
        ok = status == 200
        prompt = rng.randrange(20, 6000) if ok else 0
        completion = (rng.randrange(0, 1200) if endpoint != "/v1/embeddings" else 0) if ok else 0
        cached = prompt // 2 if rng.random() < 0.3 else 0
        reasoning = completion // 2 if model.startswith(("o", "gpt-5")) else 0
        priced = p_in > 0 or p_out > 0 or not model.startswith("llama")
        pico = (prompt - cached) * p_in + cached * (p_in // 2) + completion * p_out
        counted = rng.random() < 0.15
        row = (
            f"{first + i:032x}", started, started + 0.8, key_id, key_id[-4:], rng.choice(users),
            f"s{rng.getrandbits(40):x}", f"op-{rng.choice(ops)}", f'{{"team":"{team}"}}', "POST", endpoint,
            model, model, int(rng.random() < 0.4), status, None if ok else "upstream error", 800.0, 120.0,
            prompt, completion, cached, reasoning, prompt + completion, "counted" if counted else "upstream",
            int(priced), _cost_text(pico), int(counted), 0, None, None, None, 0, 0, None, "bench", None, None,
        )  # fmt: skip
        out.append(row)
    out.sort(key=lambda r: r[1])
    return out


def build(path: Path, calls: int, seed: int) -> dict[str, float]:
    assert len(COLUMNS) == 37, "bench/report_scale.py: the calls columns changed; update _rows()"
    rng = random.Random(seed)
    world = _World(rng)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = OFF")  # a benchmark's scratch file: no fsync per chunk
        conn.execute("PRAGMA cache_size = -1000000")
        migrate(conn)
        t0 = time.perf_counter()
        spent = {"generate": 0.0, "insert": 0.0, "rollups": 0.0}
        done = 0
        days = (END - START) // 86400
        for d in range(days):  # a day at a time, in time order, as a ledger grows
            t = time.perf_counter()
            rows = _rows(world, rng, calls * (d + 1) // days - done, done, START + d * 86400)
            spent["generate"] += time.perf_counter() - t
            conn.execute("BEGIN")
            t = time.perf_counter()
            conn.executemany(INSERT_SQL, rows)
            spent["insert"] += time.perf_counter() - t
            t = time.perf_counter()
            rollups.apply(conn, rows)
            spent["rollups"] += time.perf_counter() - t
            conn.execute("COMMIT")
            done += len(rows)
            print(f"  {done:,} calls ...", end="\r", file=sys.stderr)
        # Each dimension's own rows for the hours, six hours per transaction, then day and month rows, a
        # day per transaction, as the proxy's upkeep does (and does after an upgrade to migration 6): how
        # long each transaction holds the write lock matters as much as the total.
        for name, step in (("project_hours", lambda: rollup_build.project_hours(conn, END, max_hours=6)),
                           ("roll_days", lambda: rollup_build.roll_days(conn, END, max_days=1))):
            t = time.perf_counter()
            held = []
            while True:
                t1 = time.perf_counter()
                if not in_transaction(conn, step):
                    break
                held.append(time.perf_counter() - t1)
            spent[name] = time.perf_counter() - t
            spent[f"{name}_median"], spent[f"{name}_max"] = statistics.median(held), max(held)
        spent.update(build_views(conn))
        spent["total"] = time.perf_counter() - t0
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("ANALYZE")
    finally:
        conn.close()
    return spent


def time_rebuild(path: Path) -> dict[str, float]:
    """What a ledger written without the hook costs (a ledger from before migration 5, rows a script
    wrote): make_current at start-up, then every hour rebuilt by the upkeep, one per transaction."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA cache_size = -1000000")
        conn.execute("UPDATE rollup_state SET covered_id = -1")
        t = time.perf_counter()
        rollup_build.make_current(conn)
        out = {"make_current": time.perf_counter() - t}
        held = []
        t = time.perf_counter()
        while True:
            t1 = time.perf_counter()
            if not in_transaction(conn, lambda: rollup_build.rebuild_dirty(conn, max_hours=1)):
                break
            held.append(time.perf_counter() - t1)
        out.update(hours=len(held), total=time.perf_counter() - t, median=statistics.median(held), max=max(held))
        return out
    finally:
        conn.close()


def _time(fn: Any, runs: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) if times else float("nan"), result


def measure(db: str, raw_runs: int, match: str | None = None) -> list[dict[str, Any]]:
    """Time the report shapes on ledger `db` (a SQLite path or a PostgreSQL URL): through the rollups (one
    warm-up, then the median of 5) and, `raw_runs` times, as a raw scan of `calls`, whose answer must be the
    same; only the shapes whose "range group_by" contains `match`, if given."""
    results = []
    with reports.open_read(db) as conn:
        state = rollups.read_state(conn)
        assert state.current, "the rollups are not current"
        zones = {v.id: v.zone.split("/")[-1] for v in state.views}
        ranges: list[tuple[str, float | None, float | None, str | None]] = [
            ("3 months", None, None, None), ("August", *MONTH, None)]
        for zone in ZONES:  # August there: local midnight to local midnight
            ranges.append((f"August, {zone.split('/')[1]}", reports.parse_time("2026-08-01", "since", zone),
                           reports.parse_time("2026-09-01", "until", zone), zone))
        for label, since, until, tz in ranges:
            for group_by in GROUPINGS:
                if match is not None and match not in f"{label} {','.join(group_by)}":
                    continue
                args = {"group_by": group_by, "since": since, "until": until, "tz": tz}
                plan = reports.plan_segments(conn, group_by, since, until, reports.parse_tz(tz), state)
                reports.usage_report(conn, **args)  # warm
                fast_s, fast = _time(lambda a=args: reports.usage_report(conn, **a), 5)
                raw_s, raw = _time(lambda a=args: reports.usage_report(conn, use_rollups=False, **a), raw_runs)
                if raw_runs and fast != raw:
                    raise SystemExit(f"DIFFERENT ANSWERS for {label} {group_by}: rollups and calls disagree")
                sources = "+".join(sorted({s.source if s.view is None else f"{s.source}:{zones[s.view] or 'pair'}"
                                           for s in plan}))
                if not any(g in ("key", "model", "user", "operation", "endpoint", "status", "tag:team")
                           for g in group_by):
                    sources += " totals"  # by time alone: each bucket's totals rows
                results.append({"range": label, "group_by": ",".join(group_by) or "(totals)",
                                "sources": sources, "rows": len(fast["rows"]),
                                "rollups_ms": fast_s * 1000, "raw_ms": raw_s * 1000})
                print(f"  {label:15} {results[-1]['group_by']:22} {sources:20} {len(fast['rows']):7,} rows "
                      f"{fast_s * 1000:9.1f} ms {raw_s * 1000:10.1f} ms", file=sys.stderr)
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    """The results as the Markdown table of docs/reports.md, and how many answered under 100 ms."""
    print("\n| range | group_by | read from | rows | rollups ms (median of 5) | raw scan ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['range']} | {r['group_by']} | {r['sources']} | {r['rows']:,} | {r['rollups_ms']:.1f} | "
              f"{r['raw_ms']:,.0f} | {r['raw_ms'] / max(r['rollups_ms'], 1e-3):,.0f}x |")
    slow = [r for r in results if r["rollups_ms"] >= 100]
    print(f"\n{len(results) - len(slow)} of {len(results)} reports under 100 ms through the rollups"
          + ("" if not slow else "; over: " + ", ".join(f"{r['range']} {r['group_by']} ({r['rollups_ms']:.0f} ms)"
                                                        for r in slow)))


def _sizes(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        q = lambda sql: conn.execute(sql).fetchone()[0]
        return {"calls": q("SELECT count(*) FROM calls"), "hour_rows": q("SELECT count(*) FROM rollups WHERE grain = 0"),
                "day_rows": q("SELECT count(*) FROM rollups WHERE grain = 1"),
                "month_rows": q("SELECT count(*) FROM rollups WHERE grain = 2"),
                "dims": q("SELECT count(*) FROM rollup_dims"), "file_bytes": path.stat().st_size,
                "view_rows": q(f"SELECT count(*) FROM rollups WHERE grain >= {rollups.VIEW_BASE}")}
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.ledger:
        path = Path(args.ledger)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            migrate(conn)  # a ledger from before the views: migrated, and its views built first
            spent = build_views(conn)
        finally:
            conn.close()
        _print(spent, _sizes(path), None, measure(str(path), args.raw_runs, args.match))
        return 0
    parent = Path(args.dir or tempfile.gettempdir())
    need, free = args.calls * BYTES_PER_CALL, shutil.disk_usage(parent).free
    if need > free * 0.9:
        fits = int(free * 0.9 / BYTES_PER_CALL)
        print(f"not enough disk in {parent}: {args.calls:,} calls need about {need / 1e9:.1f} GB, "
              f"{free / 1e9:.1f} GB free; --calls {fits:,} would fit", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="meterproxy-report-scale-", dir=parent))
    path = folder / "ledger.db"
    try:
        print(f"building {args.calls:,} calls in {path} ({free / 1e9:.0f} GB free)", file=sys.stderr)
        spent = build(path, args.calls, args.seed)
        sizes = _sizes(path)
        rebuild = time_rebuild(path) if args.time_rebuild else None
        results = measure(str(path), args.raw_runs, args.match)
        _print(spent, sizes, rebuild, results)
    finally:
        if args.keep:
            print(f"kept: {path}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def _print(spent: dict[str, float], sizes: dict[str, int], rebuild: dict[str, float] | None,
           results: list[dict[str, Any]]) -> None:
    print(f"\nLedger: {sizes['calls']:,} calls, {sizes['file_bytes'] / 1e9:.2f} GB; rollups: "
          f"{sizes['hour_rows']:,} hour rows, {sizes['day_rows']:,} day rows, {sizes['month_rows']:,} month rows, "
          f"{sizes['dims']:,} dimension sets, {sizes['view_rows']:,} rows of views (pairs, zones)")
    if spent:
        print("Build: " + ", ".join(f"{k} {v:.1f} s" for k, v in spent.items() if not k.endswith(("_median", "_max")))
              + "; each transaction held the write lock: " + ", ".join(
                  f"{name} {spent[f'{name}_median'] * 1000:.0f} ms (median), {spent[f'{name}_max'] * 1000:.0f} ms (max)"
                  for name in ("project_hours", "roll_days", "views") if f"{name}_median" in spent))
    if rebuild:
        print(f"Rows written without the hook: make_current {rebuild['make_current'] * 1000:.0f} ms, then "
              f"{rebuild['hours']:,.0f} hours rebuilt in {rebuild['total']:.1f} s, each transaction "
              f"{rebuild['median'] * 1000:.0f} ms (median), {rebuild['max'] * 1000:.0f} ms (max)")
    print_table(results)


if __name__ == "__main__":
    raise SystemExit(main())
