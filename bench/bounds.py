"""Memory bounds of the real proxy process, measured: `python -m bench.bounds` (prints JSON).

Three hostile scenarios against `meterproxy serve` run as a child process (passthrough for the first two,
managed keys for the third), each while a small call (GET /v1/models with a valid key) is made every 20 ms beside it:
- bomb: the upstream answers a 1 MiB gzip body that inflates to 1 GiB; the client reads it all;
- line: the upstream streams one 500 MiB SSE line (then the line end and [DONE]); the client reads it all;
- bodies: eight concurrent 30 MiB request bodies with an invalid key (each answered 401).
A baseline (nothing hostile) gives the small calls' latency on the machine as it is. The upstream, the
proxy and the small-call prober are processes of their own, so that one's work does not delay another's.
For each: the proxy's peak RSS (VmHWM, reset before the scenario through /proc/<pid>/clear_refs) and the
small calls' latencies. tests/test_bounds_process.py runs the same scenarios with generous bounds.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.procs import HOST, free_port, start

MiB = 1 << 20
ADMIN_TOKEN = "bench-bounds-admin"
_ROOT = str(Path(__file__).resolve().parents[1])
SMALL = json.dumps({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]}).encode()
_BOMB_CACHE = Path(tempfile.gettempdir()) / "meterproxy-bench-bomb-1GiB.json.gz"


def bomb() -> bytes:
    """A gzip'd JSON body of 1 GiB (a chat completion padded with spaces): about 1 MiB compressed. Cached."""
    if _BOMB_CACHE.exists():
        return _BOMB_CACHE.read_bytes()
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    spaces = b" " * MiB
    parts = [comp.compress(b'{"model":"gpt-4o","usage":{"prompt_tokens":1,"completion_tokens":1,'
                           b'"total_tokens":2},"pad":"')]
    parts += [comp.compress(spaces) for _ in range(1024)]
    parts.append(comp.compress(b'"}') + comp.flush())
    data = b"".join(parts)
    tmp = _BOMB_CACHE.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(_BOMB_CACHE)
    return data


async def _handle(request: web.Request) -> web.StreamResponse:
    await request.read()
    scenario = request.headers.get("X-Bench-Scenario", "")
    if scenario == "bomb":
        data = request.app[_BOMB]
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        resp.content_length = len(data)
        await resp.prepare(request)
        for i in range(0, len(data), 64 * 1024):
            await resp.write(data[i:i + 64 * 1024])
    elif scenario == "line":
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"')
        block = b"x" * MiB
        for _ in range(500):
            await resp.write(block)
        await resp.write(b'"}}]}\n\ndata: [DONE]\n\n')
    else:
        return web.Response(body=SMALL, content_type="application/json")
    await resp.write_eof()
    return resp


_BOMB = web.AppKey("bomb", bytes)


def serve_upstream(port: int) -> None:
    """The fake upstream (a process of its own): the scenario is named by the X-Bench-Scenario header."""
    app = web.Application(client_max_size=64 * MiB)
    app[_BOMB] = bomb()
    app.router.add_get("/healthz", lambda request: _healthz())
    app.router.add_route("*", "/{tail:.*}", _handle)
    web.run_app(app, host=HOST, port=port, access_log=None, print=None)


async def _healthz() -> web.Response:
    return web.Response(text="ok")


def probe(url: str, key: str) -> None:
    """A small call every 20 ms, each on a new connection, until stdin closes; then latencies (ms) as JSON."""
    import http.client

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    errors: list[str] = []
    ready = False
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status != 200:
                errors.append(f"status {resp.status}")
        except OSError as exc:
            errors.append(repr(exc))
        latencies.append((time.perf_counter() - t0) * 1000)
        if not ready:  # the first call warms up this process; it is not counted
            latencies.clear()
            print("ready", flush=True)
            ready = True
        stop.wait(0.02)
    print(json.dumps({"latencies": latencies, "errors": errors[:5]}))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


class Proxy:
    """`meterproxy serve` as a child process, with one valid key: managed (made through the admin API) or
    passthrough (any key: the fake upstream takes them all)."""

    def __init__(self, upstream: str, workdir: Path, *, managed: bool, extra: dict[str, Any] | None = None) -> None:
        port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "proxy.yaml"
        settings = {"port": port, "db": str(workdir / "ledger.db"), "upstream": upstream,
                    "keys": "managed" if managed else "passthrough", **(extra or {})}
        config.write_text(json.dumps(settings))  # JSON is YAML
        env = {**os.environ, "METERPROXY_ADMIN_TOKEN": ADMIN_TOKEN, "OPENAI_API_KEY": "sk-bench-upstream",
               "PYTHONPATH": _ROOT}
        self.url = f"http://{HOST}:{port}"
        self.service = start("proxy", [sys.executable, "-m", "proxy", "serve", "--config", str(config)], self.url,
                             logdir=workdir, env=env, cwd=str(workdir))
        if not managed:
            self.key = "sk-bench-passthrough-key"
            return
        req = urllib.request.Request(f"{self.url}/admin/keys", data=json.dumps({"user": "bench"}).encode(),
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                              "Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            self.key = json.loads(resp.read())["key"]

    @property
    def pid(self) -> int:
        return self.service.pid

    def stop(self) -> None:
        self.service.stop()


async def _drain(resp: aiohttp.ClientResponse) -> int:
    n = 0
    async for chunk in resp.content.iter_chunked(MiB):
        n += len(chunk)
    return n


async def _bomb(session: aiohttp.ClientSession, url: str, key: str) -> dict[str, Any]:
    async with session.post(f"{url}/v1/chat/completions", json={"model": "gpt-4o"},
                            headers={"Authorization": f"Bearer {key}", "X-Bench-Scenario": "bomb",
                                     "Accept-Encoding": "gzip"}) as resp:
        return {"status": resp.status, "bytes_to_client": await _drain(resp)}


async def _line(session: aiohttp.ClientSession, url: str, key: str) -> dict[str, Any]:
    async with session.post(f"{url}/v1/chat/completions", json={"model": "gpt-4o", "stream": True},
                            headers={"Authorization": f"Bearer {key}", "X-Bench-Scenario": "line"}) as resp:
        return {"status": resp.status, "bytes_to_client": await _drain(resp)}


async def _bodies(session: aiohttp.ClientSession, url: str, key: str) -> dict[str, Any]:
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + b"a" * (30 * MiB - 64) + b'"}]}'

    async def one() -> int:
        try:
            async with session.post(f"{url}/v1/chat/completions", data=io.BytesIO(body),
                                    headers={"Authorization": "Bearer mp-not-a-key-0000",
                                             "Content-Type": "application/json"}) as resp:
                await resp.read()
                return resp.status
        except aiohttp.ClientError:  # the proxy may answer and close before the whole upload is sent
            return -1

    statuses = await asyncio.gather(*(one() for _ in range(8)))
    return {"statuses": sorted(statuses)}


SCENARIOS = {"bomb": _bomb, "line": _line, "bodies": _bodies}


async def _baseline(session: aiohttp.ClientSession, url: str, key: str) -> dict[str, Any]:
    await asyncio.sleep(3)  # nothing hostile: the small calls' latency on this machine, for comparison
    return {}


SCENARIOS = {"baseline": _baseline, "bomb": _bomb, "line": _line, "bodies": _bodies}
REPEAT = {"bomb": 5, "line": 2, "bodies": 3}  # back to back, so that the small calls have time to sample
# The bodies are refused for their managed key. The bomb and the line go through a passthrough proxy: in managed
# mode a compressed body is also watched for the real upstream key, and one past max_meter_bytes is cut.
MANAGED = {"bodies"}


async def _scenario(name: str, proxy: Proxy) -> dict[str, Any]:
    reset = reset_peak(proxy.pid)
    before = peak_rss_mb(proxy.pid)
    prober = subprocess.Popen([sys.executable, "-m", "bench.bounds", "probe", proxy.url, proxy.key],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=_ROOT)
    assert prober.stdout is not None
    await asyncio.to_thread(prober.stdout.readline)  # the prober has made its first call
    t0 = time.perf_counter()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300), auto_decompress=False) as s:
            for _ in range(REPEAT.get(name, 1)):
                outcome = await SCENARIOS[name](s, proxy.url, proxy.key)
    finally:
        seconds = time.perf_counter() - t0
        out, _ = prober.communicate(timeout=60)
    probed = json.loads(out)
    latencies = sorted(probed["latencies"])
    return {"scenario": name, "runs": REPEAT.get(name, 1), **outcome, "seconds": round(seconds, 2), "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(peak_rss_mb(proxy.pid), 1), "peak_reset": reset,
            "small_calls": len(latencies), "small_errors": probed["errors"],
            "small_p50_ms": round(statistics.median(latencies), 1) if latencies else None,
            "small_p99_ms": round(latencies[int(len(latencies) * 0.99)], 1) if latencies else None,
            "small_max_ms": round(latencies[-1], 1) if latencies else None}


def run(names: list[str] | None = None, workdir: Path | None = None) -> list[dict[str, Any]]:
    """Run the scenarios (all by default), each against its proxy process; one result dict per scenario."""
    bomb()  # built (and cached) before anything is timed
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    where = workdir if workdir is not None else Path(tmp.name)  # type: ignore[union-attr]
    port = free_port()
    upstream = start("upstream", [sys.executable, "-m", "bench.bounds", "upstream", str(port)],
                     f"http://{HOST}:{port}", logdir=where, cwd=_ROOT)
    proxies: dict[bool, Proxy] = {}
    try:
        results = []
        for name in names or list(SCENARIOS):
            managed = name in MANAGED
            if managed not in proxies:
                proxies[managed] = Proxy(upstream.url, where / ("managed" if managed else "passthrough"),
                                         managed=managed)
            results.append({"keys": "managed" if managed else "passthrough",
                            **asyncio.run(_scenario(name, proxies[managed]))})
        return results
    finally:
        for proxy in proxies.values():
            proxy.stop()
        upstream.stop()
        if tmp is not None:
            tmp.cleanup()


def main() -> int:
    args = sys.argv[1:]
    if args[:1] == ["upstream"]:
        serve_upstream(int(args[1]))
    elif args[:1] == ["probe"]:
        probe(args[1], args[2])
    else:
        print(json.dumps(run(args or None), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
