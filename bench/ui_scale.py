"""The dashboard's overview on a large ledger: how long its figures and its HTML take.

`python -m bench.ui_scale [--calls 1000000] [--dir D] [--keep] [--ledger PATH] [--runs 5]`

Builds a ledger with bench.report_scale's builder (92 days, July to September 2026; --calls rows) in a
temporary directory, or reads one a `report_scale --keep` run kept (--ledger; opened read-only and immutable,
never written). Then times what GET /admin/ui/ does at the ledger's last minute (2026-09-30 23:59 UTC:
today, this month, the 30-day trend stacked by model and by user, the top keys, users, models and teams):
`proxy.ui.data.overview` on a read-only connection, then the page's HTML (`views.overview_page`: template and
SVG). Prints the median and the slowest of --runs warm runs, after one cold run. The budgets-near-their-limit
list is not timed (it reads the gate's in-memory budget trackers, which a benchmark has none of).

It must never touch a ledger it did not create except to read it, and never leave its directory behind unless --keep is given.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.report_scale import BYTES_PER_CALL, END, build
from proxy.ledger import rollups
from proxy.ledger.sqlconn import Conn, wrap_sqlite
from proxy.ui import data
from proxy.ui.dashboard import overview_page

NOW = END - 60  # the ledger's last minute: "today" is its last day, "this month" its last month


def _connect(path: Path) -> Conn:
    # immutable: no lock, no -wal or -shm file; the ledger is read as it is on disk, never written.
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False,
                           isolation_level=None)
    rollups.register_functions(conn)
    return wrap_sqlite(conn, str(path))


def measure(path: Path, runs: int) -> list[tuple[str, float, float, float]]:
    """[(what, cold ms, median warm ms, slowest warm ms)]."""
    out = []
    for dim in ("model", "user"):
        for what in ("figures", "figures + HTML"):
            times = []
            for _ in range(runs + 1):
                conn = _connect(path)
                try:
                    t = time.perf_counter()
                    view = data.overview(conn, NOW, dim)
                    if what != "figures":
                        body = overview_page(view, [], "x" * 64).text
                        assert body and "month-cost" in body
                    times.append((time.perf_counter() - t) * 1000)
                finally:
                    conn.close()
            out.append((f"by {dim}: {what}", times[0], statistics.median(times[1:]), max(times[1:])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ui_scale", description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=1_000_000)
    p.add_argument("--dir", help="where to make the temporary directory (default: the system's)")
    p.add_argument("--ledger", help="time this ledger (kept by `report_scale --keep`) instead of building one")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--keep", action="store_true", help="keep the ledger it built (its path is printed)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    folder = None
    if args.ledger:
        path = Path(args.ledger)
    else:
        parent = Path(args.dir or tempfile.gettempdir())
        if args.calls * BYTES_PER_CALL > shutil.disk_usage(parent).free * 0.9:
            print(f"not enough disk in {parent} for {args.calls:,} calls", file=sys.stderr)
            return 2
        folder = Path(tempfile.mkdtemp(prefix="meterproxy-ui-scale-", dir=parent))
        path = folder / "ledger.db"
        t = time.perf_counter()
        build(path, args.calls, args.seed)
        print(f"built {args.calls:,} calls in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    try:
        (calls,) = _connect(path).execute("SELECT COUNT(*) FROM calls").fetchone()
        print(f"Overview of {path} ({calls:,} calls, {path.stat().st_size / 1e9:.2f} GB), now = 2026-09-30 23:59 "
              f"UTC, {args.runs} warm runs after one cold:")
        print("| overview | cold ms | median ms | slowest ms |\n|---|---|---|---|")
        for what, cold, median, worst in measure(path, args.runs):
            print(f"| {what} | {cold:,.1f} | {median:,.1f} | {worst:,.1f} |")
    finally:
        if folder is not None and args.keep:
            print(f"kept: {path}", file=sys.stderr)
        elif folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
