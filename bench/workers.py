"""`serve --workers 2` against one worker, both on one PostgreSQL ledger: requests per second and latency.

Starts the fake upstream (bench/upstream.py) and, for each worker count, a fresh PostgreSQL database and
`meterproxy serve --workers N` on it (`sqlite`: one process on a SQLite file, for reference); drives non-streamed chat completions with wrk (installed: `which wrk`)
for `--duration` seconds at `--concurrency`, after one unmeasured second; checks every answered call has its
ledger row; prints one JSON line per run and a table. Only loopback; every process it starts it stops.

    python -m bench.workers --pg postgresql://postgres@127.0.0.1:5432/postgres --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sqlite3
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from bench import payloads, procs, wrk


def _database(server: str, name: str) -> str:
    parts = urlsplit(server)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def _count(db: str) -> int:
    if db.startswith("postgresql://"):
        with psycopg.connect(db) as conn:
            return int(conn.execute("SELECT count(*) FROM calls").fetchone()[0])
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT count(*) FROM calls").fetchone()[0])
    finally:
        conn.close()


def _ledger_metrics(url: str) -> dict[str, float]:
    """Mean commit time and rows per batch of the ledger, from the proxy's /metrics (one worker's, when
    several answer on the port)."""
    request = urllib.request.Request(url + "/metrics", headers={"Authorization": "Bearer bench"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        text = answer.read().decode()
    found = {m[0]: float(m[1]) for m in re.findall(
        r"^meterproxy_ledger_(commit_seconds_sum|commit_seconds_count|batch_rows_sum) (\S+)$", text, re.M)}
    batches = found.get("commit_seconds_count", 0.0)
    if not batches:
        return {"batches": 0}
    return {"batches": batches, "commit_ms_mean": round(found["commit_seconds_sum"] / batches * 1000, 3),
            "rows_per_batch": round(found.get("batch_rows_sum", 0.0) / batches, 1)}


def _ours(label: str, database: str) -> bool:
    """Whether a postgres process (procs.named_cpu_seconds' label) works for `database`: its backends and
    autovacuum workers name it; the server's shared processes (WAL writer, checkpointer…) count too."""
    words = label.split()
    if "127.0.0.1" in words or "[local]" in label or "autovacuum" in words:
        return database in words
    return True


def run_one(workers: int, *, server: str, upstream: str, workdir: Path, duration: float,
            concurrency: int, sqlite: bool = False) -> dict[str, object]:
    """One run: `workers` processes on a fresh PostgreSQL database (or one process on a SQLite file)."""
    name = f"meterproxy_bench_{os.getpid()}_{secrets.token_hex(3)}"
    if sqlite:
        db = str(workdir / f"{name}.db")
    else:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        db = _database(server, name)
    port = procs.free_port()
    config = workdir / f"workers-{workers}.yaml"
    config.write_text(json.dumps({"spool": str(workdir / f"spool-{workers}.jsonl"), "spool_reserve": 0}))
    argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port), "--db", db,
            "--upstream", upstream, "--workers", str(workers), "--log-level", "WARNING"]
    service = procs.start(f"workers-{workers}", argv, f"http://{procs.HOST}:{port}", logdir=workdir,
                          env={**os.environ, "METERPROXY_ADMIN_TOKEN": "bench"})
    try:
        script = wrk.write_script(workdir / "chat.lua", payloads.chat_request(stream=False),
                                  payloads.request_headers())
        url = service.url + payloads.CHAT_PATH
        wrk.run(url, script, concurrency=concurrency, duration=1)  # warm: pools, caches, every worker up
        before = _count(db)
        cpu_before = procs.tree_cpu_seconds(service.pid), procs.named_cpu_seconds("postgres")
        result = wrk.run(url, script, concurrency=concurrency, duration=duration)
        cpu_after = procs.tree_cpu_seconds(service.pid), procs.named_cpu_seconds("postgres")
        result["ledger"] = _ledger_metrics(service.url)
        # CPU per answered call: steadier than req/s on a shared machine, and what caps req/s on two cores.
        # The server's figure counts every postgres process (other work on it included).
        answered = max(int(result.get("ok", 0)), 1)  # type: ignore[call-overload]
        # The server's figure: the backends of this run's database and the server's own processes (WAL
        # writer, checkpointer…), not other databases' backends (another run's tests on the same server).
        ours = {k: v - cpu_before[1].get(k, 0.0) for k, v in cpu_after[1].items() if _ours(k, name)}
        result["cpu_us_per_call"] = {"proxy": round((cpu_after[0] - cpu_before[0]) / answered * 1e6, 1),
                                     "postgres": round(sum(ours.values()) / answered * 1e6, 1)}
        result["postgres_cpu_us_per_call"] = {k: round(v / answered * 1e6, 1) for k, v in ours.items()
                                              if v / answered * 1e6 >= 1}
    finally:
        code = service.stop(grace=60)
    rows = _count(db) - before
    if not sqlite:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return {"workers": "sqlite" if sqlite else workers, "exit": code, "rows_recorded": rows, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default=os.environ.get("METERPROXY_TEST_PG",
                                                       "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--workers", default="1,2",
                        help="comma list of worker counts on PostgreSQL, 'sqlite' for one process on a SQLite "
                        "file (default: 1,2)")
    args = parser.parse_args()
    if wrk.available() is None:
        sys.exit("bench.workers: wrk is not installed")
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as folder:
        workdir = Path(folder)
        port = procs.free_port()
        upstream = procs.start("upstream", [sys.executable, "-m", "bench.upstream", "--port", str(port)],
                               f"http://{procs.HOST}:{port}", logdir=workdir)
        results = []
        try:
            for spec in args.workers.split(","):
                result = run_one(1 if spec == "sqlite" else int(spec), server=args.pg, upstream=upstream.url,
                                 workdir=workdir, duration=args.duration, concurrency=args.concurrency,
                                 sqlite=spec == "sqlite")
                print(json.dumps(result), flush=True)
                results.append(result)
        finally:
            upstream.stop()
    print(f"{'workers':>7}  {'req/s':>8}  {'p50 ms':>7}  {'p99 ms':>7}  {'errors':>6}  {'proxy µs':>8}  "
          f"{'pg µs':>6}  rows = answered")
    for r in results:
        lat = r["latency_ms"]
        assert isinstance(lat, dict)
        print(f"{r['workers']:>7}  {r['rps']:>8}  {lat['p50']:>7.2f}  {lat['p99']:>7.2f}  {r['error_total']:>6}  "
              f"{r['cpu_us_per_call']['proxy']:>8}  {r['cpu_us_per_call']['postgres']:>6}  "  # type: ignore[index]
              f"{r['rows_recorded']} >= {r['ok']}")
    # A spec given more than once (`--workers sqlite,1,sqlite,1,…`, alternating so that the machine's load
    # falls on both alike): the median of its runs, and each against SQLite's median.
    by_spec: dict[str, list[float]] = {}
    for r in results:
        by_spec.setdefault(str(r["workers"]), []).append(float(r["rps"]))  # type: ignore[arg-type]
    if any(len(v) > 1 for v in by_spec.values()):
        base = statistics.median(by_spec["sqlite"]) if "sqlite" in by_spec else None
        for spec, values in by_spec.items():
            ratio = f"  {statistics.median(values) / base:.2f}x SQLite" if base and spec != "sqlite" else ""
            print(f"{spec:>7}  median {statistics.median(values):8.1f} req/s over {len(values)} runs "
                  f"({min(values):.0f}-{max(values):.0f}){ratio}")


if __name__ == "__main__":
    main()
