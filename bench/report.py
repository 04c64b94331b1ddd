"""Turns a run's figures into the table, the PASS/FAIL lines of the targets, and the saved JSON.

Pure formatting and arithmetic over the results dict, plus reading facts about the machine. It must never
change a measured figure: added latencies are differences against the direct run of the same scenario.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench import profile

TARGETS = {
    "throughput_c32_vs_bare": 0.85,     # meterproxy req/s at c=32 / bare pass-through's, at least
    "added_p50_c1_ms": 0.6,              # at most
    "stream_added_ttfb_p50_ms": 2.0,     # at most, with no errors
    "rss_idle_mb": 80.0,                 # at most
    "rss_streams_mb": 200.0,             # at most, peak with the concurrent streams open
    "ledger_rows_per_s": 20_000.0,       # at least, at the highest micro-benchmark concurrency
}


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=cwd).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _filesystem(path: Path) -> str:
    return _run(["stat", "-f", "-c", "%T", str(path)]) or "unknown"


def _wrk_version(path: str | None) -> str | None:
    if path is None:
        return None
    words = (_run([path, "-v"]).splitlines() or [""])[0].split()
    return " ".join(words[:2]) or "wrk"


def machine(repo: Path, db_dir: Path, wrk_path: str | None) -> dict[str, Any]:
    import aiohttp

    commit = _run(["git", "rev-parse", "--short=12", "HEAD"], repo)
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], repo))
    mem_kb = next((int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal:")), 0)
    return {
        "nproc": os.cpu_count(), "cpu": _cpu_model(), "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "aiohttp": aiohttp.__version__, "git_commit": commit + ("+dirty" if dirty else ""),
        "wrk": _wrk_version(wrk_path),
        "db_filesystem": _filesystem(db_dir),
    }


def loadavg() -> str:
    """1/5/15-minute load averages: other work on the machine (a test suite next door) skews a run."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _f(value: Any, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def _get(result: dict[str, Any], key: str, stat: str) -> float | None:
    value = result.get(key, {}).get(stat)
    return None if value is None else float(value)


def added(results: dict[str, dict[str, Any]], target: str, key: str, stat: str) -> float | None:
    """target's figure minus direct's, both from one scenario's results."""
    mine, direct = results.get(target), results.get("direct")
    if not mine or not direct:
        return None
    a, b = _get(mine, key, stat), _get(direct, key, stat)
    return None if a is None or b is None else a - b


COLUMNS = ("scenario", "target", "req/s", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms", "TTFB p50 ms",
           "+TTFB p50 ms", "errors", "CPU µs/req (loop)", "RSS peak MB", "rows/s")


def _row(target: str, r: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[str]:
    other = target != "direct"
    timed = bool(r.get("stream")) and bool(r.get("ttfb_ms", {}).get("count"))

    def plus(key: str, stat: str) -> str:
        return _f(added(results, target, key, stat), 3, True)

    errors = str(r.get("error_total", "-"))
    if r.get("errors"):
        errors += " (" + ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) + ")"
    return [
        _f(r.get("rps"), 0), _f(_get(r, "latency_ms", "p50"), 3), _f(_get(r, "latency_ms", "p99"), 3),
        plus("latency_ms", "p50") if other else "", plus("latency_ms", "p99") if other else "",
        _f(_get(r, "ttfb_ms", "p50"), 3) if timed else "", plus("ttfb_ms", "p50") if timed and other else "",
        errors, _cpu(r), _f(r.get("rss_peak_mb"), 1),
        _f(r.get("ledger_rows_per_s"), 0),
    ]


def _cpu(r: dict[str, Any]) -> str:
    total, loop = r.get("target_cpu_us_per_req"), r.get("target_loop_cpu_us_per_req")
    return "-" if total is None else f"{total:.0f} ({loop:.0f})" if loop is not None else f"{total:.0f}"


def table(runs: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A markdown table: one row per scenario and target; + columns are differences against direct."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for scenario, results in runs.items():
        for target, r in results.items():
            lines.append("| " + " | ".join([scenario, target, *_row(target, r, results)]) + " |")
    return "\n".join(lines)


def ledger_table(levels: list[dict[str, Any]]) -> str:
    lines = ["| concurrent record() calls | rows | rows/s | batches | largest batch | record() p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for lv in levels:
        lat = lv.get("record_latency_ms", {})
        lines.append(f"| {lv['concurrency']} | {lv['rows']} | {lv['rows_per_s']:.0f} | {lv['batches']} | "
                     f"{lv['max_batch']} | {_f(lat.get('p50'), 3)} | {_f(lat.get('p99'), 3)} |")
    return "\n".join(lines)


def counting_cost(runs: dict[str, dict[str, dict[str, Any]]], target: str, ktokens: float) -> dict[str, Any]:
    """What the long prompt costs the target per 1k prompt tokens beyond a short prompt.

    Latency: (added p50 of the long-prompt stream) - (added p50 of the short one), per 1k tokens.
    CPU: the same difference in the target's CPU per request, less the bare pass-through's difference
    (moving a bigger body), per 1k tokens.
    """
    long_, short = runs.get("longprompt-nousage-c1", {}), runs.get("stream-nousage-c1", {})
    out: dict[str, Any] = {"prompt_ktokens": ktokens}
    a = added(long_, target, "latency_ms", "p50")
    b = added(short, target, "latency_ms", "p50")
    if a is not None and b is not None:
        out["added_latency_ms_per_1k_tokens"] = round((a - b) / ktokens, 4)

    def cpu(results: dict[str, Any], name: str) -> float | None:
        value = results.get(name, {}).get("target_cpu_us_per_req")
        return None if value is None else float(value)

    parts = [cpu(long_, target), cpu(short, target), cpu(long_, "bare"), cpu(short, "bare")]
    if None not in parts:
        mp_l, mp_s, bare_l, bare_s = parts  # type: ignore[misc]
        out["cpu_us_per_1k_tokens"] = round(((mp_l - mp_s) - (bare_l - bare_s)) / ktokens, 1)
    return out


def targets(runs: dict[str, dict[str, dict[str, Any]]], rss: dict[str, float | None],
            ledger: list[dict[str, Any]], stream_scenario: str, target: str = "meterproxy",
            ) -> list[tuple[str, bool | None, str]]:
    """(target, passed or None when not measured, what was measured) for each of the issue's targets."""
    t = TARGETS
    out: list[tuple[str, bool | None, str]] = []
    c32 = runs.get("json-c32", {})
    mine, bare = c32.get(target, {}).get("rps"), c32.get("bare", {}).get("rps")
    if mine and bare:
        ratio = mine / bare
        out.append(("throughput c=32 >= 85% of bare", ratio >= t["throughput_c32_vs_bare"],
                    f"{mine:.0f} req/s vs bare {bare:.0f} req/s = {ratio:.0%}"))
    else:
        out.append(("throughput c=32 >= 85% of bare", None, "not measured"))
    a = added(runs.get("json-c1", {}), target, "latency_ms", "p50")
    out.append(("added p50 latency c=1 <= 0.6 ms", None if a is None else a <= t["added_p50_c1_ms"],
                "not measured" if a is None else f"+{a:.3f} ms over direct"))
    streams = runs.get(stream_scenario, {})
    r = streams.get(target, {})
    a = added(streams, target, "ttfb_ms", "p50")
    if r and a is not None:
        errors = int(r.get("error_total", 0))
        ok = errors == 0 and a <= t["stream_added_ttfb_p50_ms"]
        out.append((f"{stream_scenario}: no errors, +TTFB p50 <= 2 ms", ok,
                    f"{errors} errors, +{a:.3f} ms TTFB p50, {r.get('peak_inflight')} streams open at peak"))
    else:
        out.append((f"{stream_scenario}: no errors, +TTFB p50 <= 2 ms", None, "not measured"))
    idle, peak = rss.get("idle"), streams.get(target, {}).get("rss_peak_mb")
    out.append(("RSS idle <= 80 MB", None if idle is None else idle <= t["rss_idle_mb"],
                "not measured" if idle is None else f"{idle:.1f} MB"))
    out.append((f"RSS with {stream_scenario} open <= 200 MB", None if peak is None else peak <= t["rss_streams_mb"],
                "not measured" if peak is None else f"{peak:.1f} MB peak"))
    if ledger:
        top = max(ledger, key=lambda lv: lv["concurrency"])
        out.append(("ledger >= 20,000 rows/s", top["rows_per_s"] >= t["ledger_rows_per_s"],
                    f"{top['rows_per_s']:.0f} rows/s with {top['concurrency']} concurrent record() calls"))
    else:
        out.append(("ledger >= 20,000 rows/s", None, "not measured"))
    return out


def target_lines(checks: list[tuple[str, bool | None, str]]) -> str:
    word = {True: "PASS", False: "FAIL", None: "SKIP"}
    return "\n".join(f"{word[ok]}  {name}: {detail}" for name, ok, detail in checks)


def save(data: dict[str, Any], results_dir: Path, stamp: str) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=False)
    path = results_dir / f"{stamp}.json"
    path.write_text(text)
    (results_dir / "latest.json").write_text(text)
    return path


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} MB"


def markdown(data: dict[str, Any]) -> str:
    """The whole report as markdown: machine line, table, memory, counting, ledger, targets, profiles."""
    m = data["machine"]
    lines = [
        f"Run {data['timestamp']} at commit {m['git_commit']}: {m['nproc']} cores ({m['cpu']}), "
        f"{m['memory_gb']} GB, Linux {m['kernel']}, Python {m['python']}, aiohttp {m['aiohttp']}, "
        f"load: {m['wrk'] if data['load_tool']['json'] == 'wrk' else 'built-in client (bench/loadgen.py)'} "
        f"for JSON, built-in client for streams; {data['pinning']}; ledger on {m['db_filesystem']}; "
        f"load average {data.get('loadavg', {}).get('start', '?')} before the run, "
        f"{data.get('loadavg', {}).get('end', '?')} after.", "",
        table(data["runs"]), "",
    ]
    rss = data["rss_mb"]
    lines.append(f"meterproxy RSS: {_mb(rss.get('start'))} at start, {_mb(rss.get('idle'))} idle after warm-up, "
                 f"{_mb(rss.get('after'))} idle after the run. Bare pass-through idle: {_mb(rss.get('bare_idle'))}.")
    counting = data.get("counting") or {}
    if counting:
        lines.append(f"Long prompt ({counting['prompt_ktokens']:g}k tokens, stream without usage) vs short: "
                     f"{counting.get('added_latency_ms_per_1k_tokens', '-')} ms added latency and "
                     f"{counting.get('cpu_us_per_1k_tokens', '-')} µs proxy CPU per 1k prompt tokens.")
    if data.get("ledger"):
        commit = data["ledger"]["sqlite_commit_ms"]
        lines += ["", "Ledger micro-benchmark (`proxy.ledger.Ledger`, synchronous=FULL, WAL):", "",
                  ledger_table(data["ledger"]["levels"]), "",
                  f"One bare sqlite3 one-row commit on this disk, p50: {commit['FULL']['p50']:.3f} ms with "
                  f"synchronous=FULL, {commit['NORMAL']['p50']:.3f} ms with NORMAL (WAL)."]
    lines += ["", "```", target_lines([tuple(t) for t in data["targets"]]), "```"]
    for name, prof in data.get("profiles", {}).items():
        lines += ["", "```", profile.render(name, prof, prof.get("loop_cpu_us_per_req")), "```"]
    for name, diff in data.get("profile_vs_bare", {}).items():
        lines += ["", "```", profile.render_compare(name, diff), "```"]
    return "\n".join(lines) + "\n"
