"""`python -m bench.soak`: a long soak of meterproxy — N mixed calls, its memory watched, every row checked.

Starts the fake upstream and meterproxy (`python -m proxy serve`, ledger in a temporary directory,
accuracy sampling at its default) as child processes on 127.0.0.1, and the load (`bench.soak_load`) as a
third: N calls at fixed concurrency, a seeded mix of JSON with usage, streams with and without usage, and
a few upstream 4xx. Meanwhile meterproxy's VmRSS, open fds and threads are sampled every second. Then
every call must have exactly one ledger row with its expected status and usage source, and the spool
must be empty. Prints a table and PASS/FAIL lines, saves bench/results/soak-<stamp>.json. With
`--tracemalloc` (a separate, slower run: not for the figures) meterproxy runs under `bench.memtrace` and
the report says which source lines and object types grew between warm-up, 50% and 95% of the calls.
It must never send traffic off loopback, run unbounded, or leave a process it started running.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as `python bench/soak.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import memtrace, payloads, procs, report, run, soak_load  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class Watch:
    """Reads the load's progress lines and samples meterproxy's RSS, fds and threads every second.

    `on_mark(calls)` is called (in the sampling thread) the first time the calls done reach each mark."""

    def __init__(self, pid: int, load: subprocess.Popen[str], marks: list[int] | None = None,
                 on_mark: Callable[[int], None] | None = None) -> None:
        self.pid, self.load = pid, load
        self.marks, self.on_mark = sorted(marks or ()), on_mark
        self.done = 0
        self.t0 = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self.stderr_tail: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._sample, daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        assert self.load.stderr is not None
        for line in self.load.stderr:
            if line.startswith(soak_load.PROGRESS):
                self.done = int(line.split()[1])
            else:
                self.stderr_tail = (self.stderr_tail + [line])[-50:]

    def sample(self, done: int | None = None) -> dict[str, Any]:
        return {"t": round(time.monotonic() - self.t0, 1), "done": self.done if done is None else done,
                "rss_mb": procs.rss_mb(self.pid), "fds": procs.open_fds(self.pid), "threads": _threads(self.pid)}

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            s = self.sample()
            self.samples.append(s)
            if len(self.samples) % 15 == 0:
                _log(f"{s['done']} calls, RSS {s['rss_mb']:.1f} MB, {s['fds']} fds, {s['threads']} threads")
            while self.marks and s["done"] >= self.marks[0] and self.on_mark is not None:
                self.on_mark(self.marks.pop(0))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)


def _threads(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def fit_mb_per_100k(samples: list[dict[str, Any]]) -> float | None:
    """Least-squares slope of RSS over calls done, in MB per 100,000 calls."""
    pts = [(s["done"], s["rss_mb"]) for s in samples if s["rss_mb"] is not None]
    if len(pts) < 3:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return round(sum((x - mx) * (y - my) for x, y in pts) / sxx * 100_000, 3) if sxx else None


def rss_figures(samples: list[dict[str, Any]], calls: int, warmup: int) -> dict[str, Any]:
    """RSS at the first sample past warm-up and 25/50/75% of the calls, the max, and the fitted growth."""
    out: dict[str, Any] = {}
    for name, at in (("warm", warmup), ("25%", calls * 0.25), ("50%", calls * 0.5), ("75%", calls * 0.75)):
        hit = next((s for s in samples if s["done"] >= at and s["rss_mb"] is not None), None)
        out[name] = round(hit["rss_mb"], 1) if hit else None
    out["max"] = round(max(s["rss_mb"] or 0 for s in samples), 1)
    out["growth_mb_per_100k_second_half"] = fit_mb_per_100k([s for s in samples if s["done"] >= calls / 2])
    out["growth_mb_per_100k_after_warmup"] = fit_mb_per_100k([s for s in samples if s["done"] >= warmup])
    return out


def check_ledger(db: Path, kinds: bytes, issued: int) -> dict[str, Any]:
    """Every issued call must have exactly one row, with the status and usage source its kind implies."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT session, status, usage_source, counted_prompt_tokens IS NOT NULL "
                            "FROM calls").fetchall()
    finally:
        conn.close()
    seen: dict[int, list[tuple[int, str]]] = {}
    foreign, sampled, sources = 0, 0, Counter[str]()
    for session, status, source, counted in rows:
        tail = session[5:] if session and session.startswith("soak-") else ""
        n = int(tail) if tail.isdigit() else -1
        if not 0 <= n < issued:
            foreign += 1
            continue
        seen.setdefault(n, []).append((status, source))
        sources[source] += 1
        sampled += bool(counted and source == "upstream")
    missing = [n for n in range(issued) if n not in seen]
    duplicated = [n for n, got in seen.items() if len(got) > 1]
    wrong = [[n, soak_load.KINDS[kinds[n]], list(got[0]), list(soak_load.expected_row(n, kinds[n]))]
             for n, got in seen.items() if got[0] != soak_load.expected_row(n, kinds[n])]
    return {"rows": len(rows), "issued": issued, "missing": len(missing), "duplicated": len(duplicated),
            "foreign": foreign, "wrong": len(wrong), "missing_first": missing[:20],
            "duplicated_first": duplicated[:20], "wrong_first": wrong[:20], "usage_sources": dict(sources),
            "accuracy_sampled": sampled,
            "exactly_one_each": not missing and not duplicated and not foreign and len(rows) == issued}


def spool_state(db: Path) -> dict[str, Any]:
    path = Path(f"{db}.spool.jsonl")  # the default spool path: the db's, plus a suffix
    size = path.stat().st_size if path.exists() else None
    return {"exists": size is not None, "bytes": size or 0, "empty": not size}


def log_findings(log: Path) -> dict[str, Any]:
    """Warnings, errors and tracebacks meterproxy logged (a clean soak has none)."""
    levels: Counter[str] = Counter()
    first: list[str] = []
    for line in log.read_text(errors="replace").splitlines():
        parts = line.split(" ", 3)
        level = parts[2] if len(parts) > 2 and parts[2] in ("WARNING", "ERROR", "CRITICAL") else None
        if level or line.startswith("Traceback"):
            levels[level or "Traceback"] += 1
            if len(first) < 10:
                first.append(line[:300])
    return {"counts": dict(levels), "first": first}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    soak_load.add_arguments(p)
    p.add_argument("--warmup", type=int, default=0, help="calls before 'after warm-up' (default N/20, <= 5000)")
    p.add_argument("--max-growth", type=float, default=1.0, help="PASS bound: MB per 100k calls, second half")
    p.add_argument("--tracemalloc", action="store_true", help="run meterproxy under tracemalloc and report what "
                   "grew (slow: a diagnostic run, not for the figures)")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="let the scheduler place every process "
                   "(default: meterproxy on the last CPU, upstream and load on the others, as bench/run.py)")
    p.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--write-md", metavar="PATH", help="also write the report as markdown (bench/SOAK.md)")
    return p


def _log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _start(args: argparse.Namespace, workdir: Path, db: Path) -> dict[str, procs.Service]:
    proxy_cpus, side_cpus = run._layout(args.pin)
    py = sys.executable
    services: dict[str, procs.Service] = {}
    try:
        port = procs.free_port()
        up_url = f"http://{procs.HOST}:{port}"
        services["upstream"] = procs.start("upstream", [py, "-m", "bench.upstream", "--port", str(port)], up_url,
                                           logdir=workdir, cwd=str(REPO), cpus=side_cpus)
        port = procs.free_port()
        traced = [py, "-m", "bench.memtrace", "--dir", str(workdir / "trace"), "--"] if args.tracemalloc else [py, "-m"]
        services["meterproxy"] = procs.start(
            "meterproxy", [*traced, "proxy", "serve", "--host", procs.HOST, "--port", str(port), "--upstream",
                           up_url, "--db", str(db)], f"http://{procs.HOST}:{port}", logdir=workdir,
            cwd=str(REPO), env={**os.environ, "METERPROXY_ADMIN_TOKEN": run.ADMIN_TOKEN}, cpus=proxy_cpus,
            ready_timeout=120 if args.tracemalloc else 30)
    except BaseException:
        for service in reversed(list(services.values())):
            service.stop()
        raise
    return services


def _drive(args: argparse.Namespace, mp: procs.Service, marks: list[int],
           on_mark: Callable[[int], None] | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the load to its end while watching meterproxy: the load's result and the samples (the last at 100%)."""
    argv = [sys.executable, "-m", "bench.soak_load", "--url", mp.url + payloads.CHAT_PATH]
    for name in soak_load.LOAD_ARGS:
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=procs.pinned(run._layout(args.pin)[1]))
    watch = Watch(mp.pid, load, marks, on_mark)
    killer = threading.Timer(args.max_seconds + args.timeout + 120, load.kill)  # the run stays bounded
    killer.start()
    try:
        assert load.stdout is not None
        out = load.stdout.read()
        load.wait()
    finally:
        killer.cancel()
        if load.poll() is None:
            load.kill()
            load.wait()
    watch.stop()
    if load.returncode != 0:
        raise RuntimeError(f"load process failed ({load.returncode}): {''.join(watch.stderr_tail)[-2000:]}")
    result = json.loads(out)
    return result, watch.samples + [watch.sample(result["completed"])]


def _verdicts(r: dict[str, Any], args: argparse.Namespace) -> list[str]:
    led, rss, fds = r["ledger"], r["rss_mb"], r["fds"]
    growth = rss["growth_mb_per_100k_second_half"]
    checks = [
        (led["exactly_one_each"], f"every call has exactly one row: {led['rows']} rows for {led['issued']} calls "
         f"(missing {led['missing']}, duplicated {led['duplicated']}, foreign {led['foreign']})"),
        (led["wrong"] == 0, f"every row has its call's status and usage source: {led['wrong']} differ"),
        (r["load"]["failed_total"] == 0, f"no call failed at the client: {r['load']['failed_total']}"),
        (r["load"]["completed"] == args.calls, f"all calls done: {r['load']['completed']} of {args.calls}"),
        (args.tracemalloc or (growth is not None and growth <= args.max_growth),
         f"RSS second half <= {args.max_growth:g} MB per 100k calls: "
         + (f"{growth} MB" if growth is not None else "fewer than 3 one-second samples, run more calls")
         + (" (traced run: not judged)" if args.tracemalloc else "")),
        # Idle, meterproxy still holds its keep-alive pool to the upstream: up to one per concurrent call.
        (fds["end_idle"] is not None and fds["end_idle"] <= fds["start"] + args.concurrency + 16,
         f"fds back near start once idle: {fds['start']} at start, {fds['end_idle']} idle after"),
        (r["spool"]["empty"] and r["spool_after_stop"]["empty"], f"spool empty: {r['spool']['bytes']} bytes"),
        (r["proxy_exit"] == 0, f"meterproxy exits 0 on SIGTERM: {r['proxy_exit']}"),
        (not r["proxy_log"]["counts"], f"meterproxy logged no warning or error: {r['proxy_log']['counts']}"),
    ]
    return [f"{'PASS' if ok else 'FAIL'}  {text}" for ok, text in checks]


def _soak(args: argparse.Namespace, workdir: Path, warmup: int) -> dict[str, Any]:
    """Start the servers, run the load, check the ledger, stop them: every figure but the summary's."""
    db = workdir / "soak.db"
    services = _start(args, workdir, db)
    try:
        mp = services["meterproxy"]
        _log(f"meterproxy {mp.url} (pid {mp.pid}, ledger {db}); {args.calls} calls at c={args.concurrency}")
        time.sleep(1.0)
        start = {"rss_mb": procs.rss_mb(mp.pid), "fds": procs.open_fds(mp.pid), "threads": _threads(mp.pid)}
        trace_dir, snaps = workdir / "trace", {}

        def snapshot(calls: int) -> None:
            _log(f"tracemalloc snapshot {len(snaps)} at {calls} calls")
            snaps[calls] = memtrace.request(mp.pid, trace_dir, len(snaps))

        # All under the same steady load (same calls in flight), so a diff shows what accumulates, not
        # what a call holds while it runs.
        marks = [warmup, args.calls // 2, args.calls * 19 // 20] if args.tracemalloc else []
        load, samples = _drive(args, mp, marks, snapshot if args.tracemalloc else None)
        time.sleep(2.0)
        idle = {"rss_mb": procs.rss_mb(mp.pid), "fds": procs.open_fds(mp.pid), "threads": _threads(mp.pid)}
        _log(f"load done: {load['completed']} calls in {load['wall_s']} s; checking the ledger")
        kinds = soak_load.plan(args.calls, args.stream_share, args.error_share, args.seed)
        out: dict[str, Any] = {"load": load, "ledger": check_ledger(db, kinds, load["issued"]),
                               "spool": spool_state(db), "samples": samples}
        out["proxy_exit"] = mp.stop(grace=60)
        out["rows_after_stop"], out["spool_after_stop"] = procs.count_rows(db), spool_state(db)
        out["proxy_log"] = log_findings(mp.log)
        out["machine"] = report.machine(REPO, workdir, None)
        if len(snaps) >= 2:
            keys = sorted(snaps)
            out["tracemalloc"] = {"at_calls": keys, "first_to_last": memtrace.diff(trace_dir, 0, len(keys) - 1),
                                  "middle_to_last": memtrace.diff(trace_dir, len(keys) - 2, len(keys) - 1)}
    finally:
        for service in reversed(list(services.values())):
            service.stop()
    rss = {"start": start["rss_mb"], **rss_figures(samples, args.calls, warmup), "100%": samples[-1]["rss_mb"],
           "end_idle": idle["rss_mb"]}
    out["rss_mb"] = {k: round(v, 1) if isinstance(v, float) and not k.startswith("growth") else v
                     for k, v in rss.items()}
    out["fds"] = {"start": start["fds"], "max": max(s["fds"] or 0 for s in samples), "end": samples[-1]["fds"],
                  "end_idle": idle["fds"]}
    out["threads"] = {"start": start["threads"], "max": max(s["threads"] or 0 for s in samples),
                      "end": idle["threads"]}
    return out


def _tracemalloc_md(tm: dict[str, Any]) -> list[str]:
    out = [f"tracemalloc snapshots at {tm['at_calls']} calls (after a full gc each):", ""]
    for name, d in (("first to last", tm["first_to_last"]), ("middle to last", tm["middle_to_last"])):
        out += [f"{name}: traced {d['traced_mb'][0]} -> {d['traced_mb'][1]} MB, net {d['total_size_diff_kb']} KB; "
                f"gc objects {d['objects'][0]} -> {d['objects'][1]}; types grown: {d['types_grown'][:6]}", "",
                "| where | size diff KB | count diff | size KB |", "|---|---|---|---|"]
        out += [f"| `{x['where']}` | {x['size_diff_kb']} | {x['count_diff']} | {x['size_kb']} |"
                for x in d["lines"][:10]]
        out.append("")
    return out


def markdown(r: dict[str, Any]) -> str:
    load, rss, fds, led, m = r["load"], r["rss_mb"], r["fds"], r["ledger"], r["machine"]
    mix = ", ".join(f"{k} {v}" for k, v in sorted(load["by_kind"].items()))
    lat = ", ".join(f"{k} {v.get('p50')} / {v.get('p99')}" for k, v in load["latency_ms"].items())
    spool = "empty" if r["spool"]["empty"] else f"{r['spool']['bytes']} bytes"
    spool_stop = "empty" if r["spool_after_stop"]["empty"] else f"{r['spool_after_stop']['bytes']} bytes"
    logged = json.dumps(r["proxy_log"]["counts"]) if r["proxy_log"]["counts"] else "none"
    lines = [
        f"Run {r['timestamp']} at commit {m.get('git_commit')}: {m.get('nproc')} cores ({m.get('cpu')}), "
        f"Python {m.get('python')}, aiohttp {m.get('aiohttp')}, ledger on {m.get('db_filesystem')}; "
        f"load average {r['loadavg']['start']} before, {r['loadavg']['end']} after.", "",
        f"Command: `{r['command']}`", "",
        "| figure | value |", "|---|---|",
        f"| calls done | {load['completed']} of {r['config']['calls']} ({mix}) |",
        f"| failed at the client | {load['failed_total']} {json.dumps(load['failed']) if load['failed'] else ''} |",
        f"| wall, throughput | {load['wall_s']} s, {load['calls_per_s']} calls/s at concurrency "
        f"{r['config']['concurrency']} |",
        f"| latency p50 / p99 ms | {lat} |",
        f"| RSS MB: start, after warm-up ({r['warmup_calls']} calls) | {rss['start']}, {rss['warm']} |",
        f"| RSS MB: at 25 / 50 / 75 / 100% of calls | {rss['25%']} / {rss['50%']} / {rss['75%']} / {rss['100%']} |",
        f"| RSS MB: max, idle 2 s after | {rss['max']}, {rss['end_idle']} |",
        f"| RSS growth, linear fit over calls | {rss['growth_mb_per_100k_second_half']} MB per 100k calls over the "
        f"second half ({rss['growth_mb_per_100k_after_warmup']} after warm-up) |",
        f"| open fds: start, max, at 100%, idle after | {fds['start']}, {fds['max']}, {fds['end']}, "
        f"{fds['end_idle']} |",
        f"| threads: start, max, idle after | {r['threads']['start']}, {r['threads']['max']}, {r['threads']['end']} |",
        f"| ledger rows vs calls | {led['rows']} rows, {led['issued']} calls: missing {led['missing']}, duplicated "
        f"{led['duplicated']}, foreign {led['foreign']}, wrong status/source {led['wrong']}; "
        f"{r['rows_after_stop']} after stop |",
        f"| rows by usage_source | {json.dumps(led['usage_sources'])}; accuracy-sampled {led['accuracy_sampled']} |",
        f"| spool | {spool} (after stop: {spool_stop}) |",
        f"| meterproxy log: warnings, errors | {logged} |",
        "", "```", *r["verdicts"], "```", "",
    ]
    if "tracemalloc" in r:
        lines += _tracemalloc_md(r["tracemalloc"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    warmup = args.warmup or min(5000, max(1, args.calls // 20))
    load_before = report.loadavg()
    with tempfile.TemporaryDirectory(prefix="meterproxy-soak-") as tmp:
        figures = _soak(args, Path(tmp), warmup)
    command = " ".join(["python -m bench.soak", *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {
        "timestamp": stamp, "command": command, "loadavg": {"start": load_before, "end": report.loadavg()},
        "config": {k: v for k, v in vars(args).items() if k not in ("results_dir", "write_md")},
        "warmup_calls": warmup, **figures}
    result["verdicts"] = _verdicts(result, args)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"soak-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    text = markdown(result)
    print(text)
    if args.write_md:
        Path(args.write_md).write_text("# Soak results\n\n" + text)
    _log(f"saved {path}")
    return 0 if all(v.startswith("PASS") for v in result["verdicts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
