"""Drives `wrk` (when installed) for the JSON scenarios: a Lua script for the POST body, JSON out of `done()`.

wrk is C and uses little CPU, which matters on a 2-core machine shared with the upstream and the proxy.
It cannot measure time to first byte, so stream scenarios use bench/loadgen.py. This module must never
point wrk at anything but loopback, and never run it without a duration.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from bench import procs

_MARK = "BENCHJSON "
_DONE = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    "BENCHJSON ", summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""


def available() -> str | None:
    """Path of wrk, or None."""
    return shutil.which("wrk")


def _lua_string(data: bytes) -> str:
    text = data.decode()
    level = "=" * 4
    if f"]{level}]" in text:
        raise ValueError("body contains the Lua long-string terminator")
    return f"[{level}[{text}]{level}]"


def write_script(path: Path, body: bytes, headers: dict[str, str]) -> Path:
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body)}"]
    for name, value in headers.items():
        lines.append(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n" + _DONE)
    return path


def run(url: str, script: Path, *, concurrency: int, duration: float, threads: int = 1,
        timeout_s: float = 10.0, cpus: set[int] | None = None) -> dict[str, object]:
    """One wrk run; returns the same shape as loadgen's result (latency in ms)."""
    wrk = available()
    if wrk is None:
        raise RuntimeError("wrk is not installed")
    seconds = max(1, round(duration))
    argv = [wrk, f"-t{min(threads, concurrency)}", f"-c{concurrency}", f"-d{seconds}s",
            f"--timeout={max(1, round(timeout_s))}s", "-s", str(script), url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + timeout_s + 30,
                          preexec_fn=procs.pinned(cpus))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout[-500:]}")
    raw = json.loads(line[len(_MARK):])
    wall = raw["duration_us"] / 1e6
    errors = {k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]}
    # wrk counts a non-2xx response among completed requests and again in errors.status.
    ok = raw["requests"] - raw["status"]
    ms = 1000.0
    return {
        "tool": "wrk", "concurrency": concurrency, "ok": ok, "errors": errors,
        "error_total": sum(errors.values()), "wall_s": round(wall, 3), "rps": round(ok / wall, 1),
        "peak_inflight": concurrency, "bytes": raw["bytes"],
        "latency_ms": {"count": raw["requests"], "mean": round(raw["mean_us"] / ms, 3),
                       "p50": raw["p50_us"] / ms, "p90": raw["p90_us"] / ms, "p99": raw["p99_us"] / ms,
                       "max": raw["max_us"] / ms},
        "ttfb_ms": {"count": 0},
    }
