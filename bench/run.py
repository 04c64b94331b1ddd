"""`python -m bench`: the whole benchmark in one run, on loopback, stopping by itself.

Starts the fake upstream, the bare pass-through and meterproxy (ledger on) as child processes on
127.0.0.1, runs every scenario against each target side by side (direct, bare, meterproxy, and any
`--proxy NAME=URL`), then the ledger micro-benchmark, and optionally py-spy profiles of meterproxy.
Prints a table and PASS/FAIL lines, and saves bench/results/<timestamp>.json and latest.json.
It must never send traffic off loopback, run unbounded, or leave a process it started running.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import payloads, procs, profile, report, scenarios, wrk

REPO = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "bench-admin-token"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one round, shorter scenarios (about a minute and a half)")
    p.add_argument("--json-seconds", type=float, default=0, help="measured seconds per JSON scenario "
                   "(default 2, quick 1); stream scenarios at c=1 run up to twice this")
    p.add_argument("--rounds", type=int, default=0, help="rounds of each JSON and c=1 stream scenario, interleaved "
                   "across targets; the median round by req/s is reported (default 3, quick 1)")
    p.add_argument("--streams", type=int, default=1000, help="concurrent streams (default 1000)")
    p.add_argument("--stream-chunks", type=int, default=payloads.DEFAULT_CHUNKS)
    p.add_argument("--stream-interval-ms", type=float, default=100.0,
                   help="upstream pause between chunks of the concurrent streams (default 100: 1,000 "
                   "streams of 100 chunks are then 10,000 chunks/s, which leaves this 2-core machine headroom)")
    p.add_argument("--long-prompt-words", type=int, default=8000, help="~tokens of the long prompt")
    p.add_argument("--only", help="comma list of scenario names to run")
    p.add_argument("--proxy", action="append", default=[], metavar="NAME=URL",
                   help="another proxy to measure; it must forward to --upstream-port on 127.0.0.1")
    p.add_argument("--upstream-port", type=int, default=0, help="fixed port of the fake upstream")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="let the scheduler place every process "
                   "(default: the proxies on the last CPU, the upstream and the load on the others, which keeps "
                   "c=1 figures from swinging with where the scheduler happens to put them)")
    p.add_argument("--no-wrk", action="store_true", help="use the built-in client even if wrk is installed")
    p.add_argument("--no-ledger-bench", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="then profile with py-spy: meterproxy under json-c1, json-c32 and the streams, the "
                   "bare pass-through under json-c32 and the streams as the baseline")
    p.add_argument("--profile-only", action="store_true", help="profile, skip the measured scenarios")
    p.add_argument("--meterproxy-config", metavar="PATH", help="config file for meterproxy (its --config)")
    p.add_argument("--db-dir", help="directory of the ledger files (default: a new temporary directory)")
    p.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--write-md", metavar="PATH", help="also write the report as markdown (bench/RESULTS.md)")
    return p


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _layout(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(CPUs of the proxies, CPUs of the upstream and the load): pinned, the last CPU for the proxies."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


def _start_services(args: argparse.Namespace, workdir: Path, db: Path,
                    services: dict[str, procs.Service]) -> None:
    """Start the three servers into `services` (so the caller stops whichever did start)."""
    py = sys.executable
    proxy_cpus, side_cpus = _layout(args.pin)
    up_port = args.upstream_port or procs.free_port()
    up_url = f"http://{procs.HOST}:{up_port}"
    services["upstream"] = procs.start("upstream", [py, "-m", "bench.upstream", "--port", str(up_port)],
                                       up_url, logdir=workdir, cwd=str(REPO), cpus=side_cpus)
    port = procs.free_port()
    services["bare"] = procs.start("bare", [py, "-m", "bench.passthrough", "--port", str(port),
                                            "--upstream", up_url], f"http://{procs.HOST}:{port}",
                                   logdir=workdir, cwd=str(REPO), cpus=proxy_cpus)
    port = procs.free_port()
    env = {**os.environ, "METERPROXY_ADMIN_TOKEN": ADMIN_TOKEN}
    services["meterproxy"] = procs.start(
        "meterproxy", [py, "-m", "proxy", "serve", "--host", procs.HOST, "--port", str(port),
                       "--upstream", up_url, "--db", str(db),
                       *(["--config", args.meterproxy_config] if args.meterproxy_config else [])],
        f"http://{procs.HOST}:{port}", logdir=workdir, cwd=str(REPO), env=env, cpus=proxy_cpus)


def _warm(url: str, workdir: Path) -> None:
    """A few calls so lazy imports and pools are in place before idle memory is read."""
    body = workdir / "warm-idle.body"
    body.write_bytes(payloads.chat_request(stream=False))
    subprocess.run([sys.executable, "-m", "bench.loadgen", "--url", url + payloads.CHAT_PATH, "--body-file",
                    str(body), "--concurrency", "4", "--requests", "100", "--duration", "5"],
                   capture_output=True, timeout=60, cwd=REPO, check=True)


def _ledger_bench(workdir: Path, quick: bool) -> dict[str, Any]:
    d = workdir / "ledger-bench"
    d.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "bench.ledger_bench", "--dir", str(d), "--concurrency", "1,32,1000",
            "--rows", "20000" if quick else "50000", "--duration", "2" if quick else "3"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"ledger benchmark failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median req/s, whole (its figures stay consistent), with every round's req/s."""
    good = sorted((r for r in rounds if "rps" in r), key=lambda r: r["rps"])
    if not good:
        return rounds[-1]
    chosen = dict(good[(len(good) - 1) // 2])
    chosen["rounds_rps"] = [r.get("rps") for r in rounds]
    return chosen


def _measure(chosen: list[scenarios.Scenario], targets: list[scenarios.Target], upstream_pid: int,
             workdir: Path, have_wrk: bool, rounds: int, load_cpus: set[int] | None,
             ) -> dict[str, dict[str, dict[str, Any]]]:
    """Every scenario against every target; short scenarios `rounds` times, interleaved, median kept."""
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for sc in chosen:
        repeat = 1 if sc.stream and sc.concurrency > 1 else rounds  # the long one runs once
        seen: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for n in range(repeat):
            for target in targets:
                _log(f"{sc.name} -> {target.name}" + (f" (round {n + 1}/{repeat})" if repeat > 1 else ""))
                try:
                    r = scenarios.run(sc, target, upstream_pid=upstream_pid, workdir=workdir,
                                      have_wrk=have_wrk, warm=n == 0, load_cpus=load_cpus)
                except Exception as exc:  # one broken target must not lose the others' figures
                    _log(f"  failed: {exc}")
                    r = {"failed": str(exc)[:500]}
                seen[target.name].append(r)
                if "rps" in r:
                    _log(f"  {r['rps']:.0f} req/s, p50 {r['latency_ms'].get('p50')} ms, errors {r['error_total']}")
        runs[sc.name] = {name: _median_round(rs) for name, rs in seen.items()}
    return runs


PROFILED = {"meterproxy": ("json-c1", "json-c32", "stream-c"), "bare": ("json-c32", "stream-c")}


def _profile(chosen: list[scenarios.Scenario], targets: list[scenarios.Target], upstream_pid: int,
             workdir: Path, have_wrk: bool, results_dir: Path, stamp: str,
             load_cpus: set[int] | None) -> dict[str, Any]:
    """py-spy on meterproxy (and, as the baseline, the bare pass-through) under the chosen loads."""
    out: dict[str, Any] = {}
    for target in targets:
        wanted = PROFILED.get(target.name, ())
        for sc in chosen:
            if target.pid is None or not any(sc.name.startswith(w) for w in wanted):
                continue
            key = f"{target.name} {sc.name}"
            raw = results_dir / f"profile-{target.name}-{sc.name}-{stamp}.txt"
            _log(f"profiling {key} (py-spy)")
            try:
                recorder = profile.Recorder(target.pid, raw)
            except RuntimeError as exc:  # no py-spy: the measured figures still count
                _log(f"  profile skipped: {exc}")
                return out
            time.sleep(1.0)  # let py-spy attach before the load starts
            try:
                r = scenarios.run(sc, target, upstream_pid=upstream_pid, workdir=workdir, have_wrk=have_wrk,
                                  load_cpus=load_cpus)
            finally:
                recorder.stop()
            out[key] = {"raw": str(raw), "rps_while_profiled": r.get("rps"),
                        "loop_cpu_us_per_req": r.get("target_loop_cpu_us_per_req"),
                        **profile.summarise(raw)}
    return out


def _comparisons(profiles: dict[str, Any]) -> dict[str, Any]:
    """meterproxy's loop-thread cost per request against the bare pass-through's, per profiled scenario."""
    out = {}
    for key, prof in profiles.items():
        target, _, scenario = key.partition(" ")
        base = profiles.get(f"bare {scenario}")
        if target != "meterproxy" or base is None:
            continue
        if prof.get("loop_cpu_us_per_req") and base.get("loop_cpu_us_per_req"):
            out[scenario] = profile.compare(Path(prof["raw"]), prof["loop_cpu_us_per_req"], Path(base["raw"]),
                                            base["loop_cpu_us_per_req"])
    return out


def _extra_targets(specs: list[str]) -> list[scenarios.Target]:
    out = []
    for spec in specs:
        name, _, url = spec.partition("=")
        host = urlsplit(url).hostname or ""
        if not name or not (host.startswith("127.") or host in ("localhost", "::1")):
            raise SystemExit(f"--proxy {spec!r}: give NAME=URL with a loopback URL (http://127.0.0.1:PORT)")
        out.append(scenarios.Target(name, url))
    return out


def _pinning_text(pin: bool) -> str:
    proxy_cpus, side_cpus = _layout(pin)
    if proxy_cpus is None:
        return "no CPU pinning"
    return f"proxies pinned to CPU {sorted(proxy_cpus)}, upstream and load to CPU {sorted(side_cpus or [])}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it: 1,000 streams need fds
    have_wrk = wrk.available() is not None and not args.no_wrk
    if not have_wrk:
        _log("wrk not used (install it with apt-get install wrk): JSON load comes from the built-in client")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    chosen = scenarios.build(quick=args.quick, json_seconds=args.json_seconds,
                             stream_interval_ms=args.stream_interval_ms, stream_chunks=args.stream_chunks,
                             streams=args.streams, long_prompt_words=args.long_prompt_words)
    if args.only:
        names = set(args.only.split(","))
        chosen = [sc for sc in chosen if sc.name in names]
    stream_name = f"stream-c{args.streams}"
    extra = _extra_targets(args.proxy)  # refuse a non-loopback URL before anything starts
    load_before = report.loadavg()
    with tempfile.TemporaryDirectory(prefix="meterproxy-bench-") as tmp:
        workdir = Path(tmp)
        db_dir = Path(args.db_dir) if args.db_dir else workdir
        db_dir.mkdir(parents=True, exist_ok=True)
        db = db_dir / f"bench-{stamp}.db"
        services: dict[str, procs.Service] = {}
        try:
            _start_services(args, workdir, db, services)
            up, bare, mp = services["upstream"], services["bare"], services["meterproxy"]
            _log(f"upstream {up.url}, bare {bare.url}, meterproxy {mp.url} (ledger {db})")
            rss: dict[str, float | None] = {"start": procs.rss_mb(mp.pid)}
            for service in (bare, mp):
                _warm(service.url, workdir)
            time.sleep(1.0)
            rss["idle"], rss["bare_idle"] = procs.rss_mb(mp.pid), procs.rss_mb(bare.pid)
            targets = [scenarios.Target("direct", up.url), scenarios.Target("bare", bare.url, bare.pid),
                       scenarios.Target("meterproxy", mp.url, mp.pid, db)]
            targets += extra
            rounds = args.rounds or (1 if args.quick else 3)
            load_cpus = _layout(args.pin)[1]
            runs = {} if args.profile_only else _measure(chosen, targets, up.pid, workdir, have_wrk, rounds,
                                                         load_cpus)
            time.sleep(1.0)
            rss["after"] = procs.rss_mb(mp.pid)
            ledger = {} if args.no_ledger_bench or args.profile_only else _ledger_bench(db_dir, args.quick)
            profiles = (_profile(chosen, targets, up.pid, workdir, have_wrk, results_dir, stamp, load_cpus)
                        if args.profile or args.profile_only else {})
            machine = report.machine(REPO, db_dir, wrk.available())
        finally:
            for service in reversed(list(services.values())):
                service.stop()
    ktokens = args.long_prompt_words / 1000
    data: dict[str, Any] = {
        "timestamp": stamp, "machine": machine,
        "config": {k: v for k, v in vars(args).items() if k not in ("results_dir", "write_md")},
        "load_tool": {"json": "wrk" if have_wrk else "client", "streams": "client"},
        "pinning": _pinning_text(args.pin), "loadavg": {"start": load_before, "end": report.loadavg()},
        "runs": runs, "rss_mb": rss, "ledger": ledger,
        "counting": report.counting_cost(runs, "meterproxy", ktokens) if runs else {},
        "profiles": profiles, "profile_vs_bare": _comparisons(profiles),
    }
    data["targets"] = report.targets(runs, rss, ledger.get("levels", []), stream_name) if runs else []
    path = report.save(data, results_dir, stamp)
    text = report.markdown(data)
    print(text)
    if args.write_md:
        Path(args.write_md).write_text("# Benchmark results\n\n" + text)
    _log(f"saved {path} and {results_dir / 'latest.json'}")
    return 0
