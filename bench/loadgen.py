"""The benchmark's own load client: fixed concurrency, bounded count and time, per-request latency and TTFB.

`python -m bench.loadgen --url U --body-file F [...]` runs in its own process and prints one JSON object.
Each of `--concurrency` workers holds one keep-alive connection: it first sends `--warmup` unmeasured
requests (so connection set-up is not counted), all workers then start together, spread over `--ramp`
seconds, and send measured requests until `--requests` were issued or `--duration` seconds passed.
A response is an error if its status is not 2xx, it fails or times out, or (with `--stream`) it does not
end with `data: [DONE]`. It must never target anything but loopback and never run unbounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from bench import payloads
from bench.stats import summary

_TAIL = len(payloads.DONE)
MEASURE_MARK = "measuring"  # written to stderr when the warm-up is over and measured load begins


@dataclass
class _State:
    remaining: int
    start: float = 0.0
    deadline: float = 0.0
    inflight: int = 0
    peak: int = 0
    latency: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    ok: int = 0
    bytes: int = 0
    last_end: float = 0.0


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
               stream: bool) -> tuple[float, float, int, str | None]:
    """One request: (latency s, ttfb s, bytes, error or None)."""
    t0 = time.perf_counter()
    ttfb = 0.0
    size = 0
    tail = b""
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            first = True
            while chunk := await resp.content.readany():
                if first:
                    ttfb = time.perf_counter() - t0
                    first = False
                size += len(chunk)
                if stream:  # keep only the last bytes: the body itself is never held
                    tail = chunk[-_TAIL:] if len(chunk) >= _TAIL else (tail + chunk)[-_TAIL:]
            status = resp.status
    except asyncio.TimeoutError:
        return time.perf_counter() - t0, ttfb, size, "timeout"
    except (aiohttp.ClientError, OSError) as exc:
        return time.perf_counter() - t0, ttfb, size, type(exc).__name__
    latency = time.perf_counter() - t0
    if not 200 <= status < 300:
        return latency, ttfb, size, f"status {status}"
    if stream and tail != payloads.DONE:
        return latency, ttfb, size, "stream without [DONE]"
    return latency, ttfb or latency, size, None


async def _worker(i: int, args: argparse.Namespace, session: aiohttp.ClientSession, body: bytes,
                  warm_body: bytes, headers: dict[str, str], state: _State, ready: asyncio.Event,
                  warmed: list[int]) -> None:
    for _ in range(args.warmup):
        _, _, _, error = await _one(session, args.url, warm_body, headers, stream=False)
        if error:
            state.errors[f"warmup: {error}"] += 1
    warmed[0] += 1
    if warmed[0] == args.concurrency:
        # Set before anyone runs on: a worker that finds `ready` already set does not yield.
        state.start = time.perf_counter()
        state.deadline = state.start + args.duration
        ready.set()
    await ready.wait()
    if args.ramp:
        await asyncio.sleep(args.ramp * i / args.concurrency)
    while state.remaining > 0 and time.perf_counter() < state.deadline:
        state.remaining -= 1
        state.inflight += 1
        state.peak = max(state.peak, state.inflight)
        latency, ttfb, size, error = await _one(session, args.url, body, headers, args.stream)
        state.inflight -= 1
        state.last_end = time.perf_counter()
        if error:
            state.errors[error] += 1
            continue
        state.ok += 1
        state.bytes += size
        state.latency.append(latency)
        state.ttfb.append(ttfb)


async def _run(args: argparse.Namespace) -> dict[str, object]:
    body = open(args.body_file, "rb").read()
    warm_body = open(args.warmup_body_file, "rb").read() if args.warmup_body_file else body
    headers = payloads.request_headers(dict(h.split(":", 1) for h in args.header))
    state = _State(remaining=args.requests)
    ready = asyncio.Event()
    warmed = [0]
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        tasks = [asyncio.create_task(_worker(i, args, session, body, warm_body, headers, state, ready,
                                             warmed)) for i in range(args.concurrency)]
        await ready.wait()
        sys.stderr.write(MEASURE_MARK + "\n")
        sys.stderr.flush()
        await asyncio.gather(*tasks)
    wall = max(state.last_end - state.start, 1e-9)
    return {
        "tool": "client", "concurrency": args.concurrency, "ok": state.ok,
        "errors": dict(state.errors), "error_total": sum(state.errors.values()),
        "wall_s": round(wall, 3), "rps": round(state.ok / wall, 1), "peak_inflight": state.peak,
        "bytes": state.bytes, "latency_ms": summary(state.latency), "ttfb_ms": summary(state.ttfb),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--warmup-body-file", help="body of the warm-up requests (default: --body-file)")
    parser.add_argument("--header", action="append", default=[], help="Name:value, repeatable")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=5.0, help="stop issuing requests after this")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests per worker first")
    parser.add_argument("--ramp", type=float, default=0.0, help="spread worker starts over this many seconds")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request")
    parser.add_argument("--stream", action="store_true", help="expect SSE ending with [DONE]")
    args = parser.parse_args()
    host = urlsplit(args.url).hostname or ""
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        sys.exit(f"loadgen: refusing non-loopback target {host!r}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Hard stop: the whole run may not outlive its bounds by more than a generous margin.
    limit = args.duration + args.ramp + args.timeout + 30 + args.warmup * args.timeout
    result = asyncio.run(asyncio.wait_for(_run(args), limit))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
