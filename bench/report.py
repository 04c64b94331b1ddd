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
import sys
from pathlib import Path
from typing import Any

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
        "wrk": _run([wrk_path, "-v"]).splitlines()[0] if wrk_path else None,
        "db_filesystem": _filesystem(db_dir),
    }


def _f(value: Any, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def _get(result: dict[str, Any], key: str, stat: str) -> float | None:
    value = result.get(key, {}).get(stat)
    return None if value is None else float(value)


def added(results: dict[str, dict[str, Any]], scenario: str, target: str, key: str, stat: str) -> float | None:
    """target's figure minus direct's, for the same scenario."""
    mine, direct = results.get(target), results.get("direct")
    if not mine or not direct:
        return None
    a, b = _get(mine, key, stat), _get(direct, key, stat)
    return None if a is None or b is None else a - b


HEADER = ("| scenario | target | req/s | p50 ms | p99 ms | +p50 ms | +p99 ms | TTFB p50 | +TTFB p50 | "
          "errors | proxy CPU µs/req | RSS peak MB | ledger rows/s |")


def table(runs: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [HEADER, "|" + "---|" * HEADER.count("|")[:-1] if False else "|" + "|".join(["---"] * 13) + "|"]
    for scenario, results in runs.items():
        for target, r in results.items():
            is_direct = target == "direct"
            stream = bool(r.get("ttfb_ms", {}).get("count")) and r.get("tool") == "client" and "stream" in scenario or "prompt" in scenario
            lines.append("| " + " | ".join([
                scenario, target, _f(r.get("rps"), 0),
                _f(_get(r, "latency_ms", "p50"), 3), _f(_get(r, "latency_ms", "p99"), 3),
                "" if is_direct else _f(added(results, scenario, target, "latency_ms", "p50"), 3, True),
                "" if is_direct else _f(added(results, scenario, target, "latency_ms", "p99"), 3, True),
                _f(_get(r, "ttfb_ms", "p50"), 3) if stream else "",
                "" if is_direct or not stream else _f(added(results, scenario, target, "ttfb_ms", "p50"), 3, True),
                str(r.get("error_total", "-")), _f(r.get("target_cpu_us_per_req"), 0),
                _f(r.get("rss_peak_mb"), 1), _f(r.get("ledger_rows_per_s"), 0),
            ]) + " |")
    return "\n".join(lines)


def save(data: dict[str, Any], results_dir: Path, stamp: str) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=False)
    path = results_dir / f"{stamp}.json"
    path.write_text(text)
    (results_dir / "latest.json").write_text(text)
    return path


def python_of(executable: str = sys.executable) -> str:
    return executable
