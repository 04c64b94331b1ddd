"""The soak's load process: N chat calls at fixed concurrency, a seeded mix of kinds, each one tagged.

`python -m bench.soak_load --url U --calls N [...]` prints one JSON object on stdout, and `progress <n>`
lines (calls completed) on stderr four times a second for the watcher. Kinds: JSON with usage, SSE with a
usage chunk, SSE without usage (the proxy must count it), and upstream 4xx errors (the fake upstream's
X-Bench-Status knob). Call n carries `X-Meter-Session: soak-<n>` so its ledger row can be found. The plan
is a pure function of the seed, so the checker rebuilds it. It must never target anything but loopback,
and never run unbounded (a deadline on starting calls, a timeout on each, a hard stop on the whole).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

from bench import payloads, stats
from bench.loadgen import _one as one_call  # one request: latency, bytes, and how it failed

KINDS = ("json", "stream_usage", "stream_nousage", "error")
STREAMS = (1, 2)  # indexes of the streamed kinds
ERROR = 3
ERROR_STATUSES = (400, 404, 429)
# The usage_source each kind's row must carry (its status: 200, or the error's own).
EXPECTED_SOURCE = {"json": "upstream", "stream_usage": "upstream", "stream_nousage": "counted", "error": "none"}
PROGRESS = "progress "


def plan(calls: int, stream_share: float, error_share: float, seed: int) -> bytes:
    """The kind (an index into KINDS) of every call; streams are split evenly with and without usage."""
    rng = random.Random(seed)
    bounds = (error_share, error_share + stream_share / 2, error_share + stream_share)
    out = bytearray(calls)
    for i in range(calls):
        r = rng.random()
        out[i] = ERROR if r < bounds[0] else 1 if r < bounds[1] else 2 if r < bounds[2] else 0
    return bytes(out)


def error_status(i: int) -> int:
    return ERROR_STATUSES[i % len(ERROR_STATUSES)]


def expected_row(i: int, kind: int) -> tuple[int, str]:
    """(status, usage_source) the ledger row of call i must hold."""
    return (error_status(i) if kind == ERROR else 200), EXPECTED_SOURCE[KINDS[kind]]


class _Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kinds = plan(args.calls, args.stream_share, args.error_share, args.seed)
        self.bodies = [payloads.chat_request(stream=False), payloads.chat_request(stream=True, include_usage=True),
                       payloads.chat_request(stream=True), payloads.chat_request(stream=False)]
        self.keys = [f"sk-soak-{k:04d}-0123456789abcdef0123456789abcdef" for k in range(args.keys)]
        self.latency: list[list[float]] = [[] for _ in KINDS]
        self.done: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.failures: list[list[Any]] = []
        self.next = self.completed = 0
        self.deadline = time.monotonic() + args.max_seconds

    def headers(self, i: int, kind: int) -> dict[str, str]:
        a = self.args
        h = {"Content-Type": "application/json", "Authorization": f"Bearer {self.keys[i % len(self.keys)]}",
             "X-Meter-User": f"soak-user-{i % a.users}", "X-Meter-Session": f"soak-{i}",
             payloads.CHUNKS_HEADER: str(a.chunks)}
        if kind == ERROR:
            h[payloads.STATUS_HEADER] = str(error_status(i))
        return h

    async def worker(self, session: aiohttp.ClientSession) -> None:
        while self.next < self.args.calls and time.monotonic() < self.deadline:
            i = self.next
            self.next += 1
            kind = self.kinds[i]
            took, _, _, error = await one_call(session, self.args.url, self.bodies[kind], self.headers(i, kind),
                                               kind in STREAMS)
            if kind == ERROR:  # the upstream's 4xx must reach the client as it was sent
                error = None if error == f"status {error_status(i)}" else (error or "2xx instead of 4xx")
            self.completed += 1
            self.done[KINDS[kind]] += 1
            self.latency[kind].append(took)
            if error:
                self.failed[f"{KINDS[kind]}: {error}"] += 1
                if len(self.failures) < 200:
                    self.failures.append([i, KINDS[kind], error])

    async def progress(self) -> None:
        while True:
            sys.stderr.write(f"{PROGRESS}{self.completed}\n")
            sys.stderr.flush()
            await asyncio.sleep(0.25)

    async def run(self) -> dict[str, Any]:
        a = self.args
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=a.timeout),
                                         auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()) as session:
            reporter = asyncio.create_task(self.progress())
            t0 = time.perf_counter()
            await asyncio.gather(*(self.worker(session) for _ in range(a.concurrency)))
            wall = time.perf_counter() - t0
            reporter.cancel()
        return {"issued": self.next, "completed": self.completed, "wall_s": round(wall, 2),
                "calls_per_s": round(self.completed / wall, 1), "by_kind": dict(self.done),
                "failed": dict(self.failed), "failed_total": sum(self.failed.values()), "failures": self.failures,
                "latency_ms": {KINDS[k]: stats.summary(v) for k, v in enumerate(self.latency) if v}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The load's knobs; the soak driver takes the same ones and passes them on."""
    p.add_argument("--calls", type=int, default=200_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--stream-share", type=float, default=0.3, help="share of streams, half of them without usage")
    p.add_argument("--error-share", type=float, default=0.01, help="share of calls the upstream answers 4xx")
    p.add_argument("--chunks", type=int, default=20, help="SSE chunks per stream")
    p.add_argument("--keys", type=int, default=16, help="distinct API keys the calls rotate through")
    p.add_argument("--users", type=int, default=8, help="distinct X-Meter-User values")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=1800, help="no call is started after this")
    p.add_argument("--timeout", type=float, default=60, help="per call, seconds")


LOAD_ARGS = ("calls", "concurrency", "stream_share", "error_share", "chunks", "keys", "users", "seed",
             "max_seconds", "timeout")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the chat completions URL, on loopback")
    add_arguments(p)
    args = p.parse_args()
    if not args.url.startswith("http://127.0.0.1:"):
        sys.exit(f"soak load: refusing non-loopback target {args.url!r}")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = asyncio.run(asyncio.wait_for(_Run(args).run(), args.max_seconds + args.timeout + 30))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
