"""The proxy as a real process: killed with SIGKILL under load, and stopped with SIGTERM mid-stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import ADMIN_TOKEN, FakeUpstream, Reply, streams
from tests.support.cli import ROOT, free_port
from tests.support.streams import SMALL_USAGE

USAGE = SMALL_USAGE


def stream_body() -> bytes:
    return streams.stream_body(parts=10)


def scripted(body: bytes) -> Reply:
    return streams.scripted(body, parts=10, plain_pause=0.2)


class Served:
    def __init__(self, tmp_path: Path, upstream: str, db: Path, *extra: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--port", str(self.port), "--db", str(db),
             "--upstream", upstream, *extra], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT), "METERPROXY_ADMIN_TOKEN": ADMIN_TOKEN})
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                    return
            except OSError:
                assert self.proc.poll() is None, self.proc.communicate()[1]
                assert time.monotonic() < deadline, "proxy did not become ready"
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err.decode()


async def one_call(session: aiohttp.ClientSession, url: str, n: int, done: list[str]) -> None:
    op = f"call-{n}"
    stream = n % 2 == 0
    try:
        async with session.post(f"{url}/v1/chat/completions", headers={"X-Meter-Operation": op},
                                json={"model": "gpt-4o", "stream": stream}) as resp:
            if not stream:
                if json.loads(await resp.read()).get("usage") == USAGE:
                    done.append(op)
                return
            body = b""
            async for part in resp.content.iter_any():
                body += part
                if body.endswith(b"data: [DONE]\n\n"):
                    done.append(op)  # complete for a client: SDKs stop reading at [DONE]
                    break
    except (aiohttp.ClientError, ValueError, asyncio.TimeoutError):
        pass  # cut off by the kill: the client never had the whole response


def test_kill_9_under_load_loses_no_completed_call(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.handler = scripted
    db = tmp_path / "ledger.db"
    served = Served(tmp_path, upstream.url, db)
    done: list[str] = []

    async def load() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            calls = [asyncio.create_task(one_call(session, served.url, n, done)) for n in range(200)]
            # Kill once both kinds have completed calls, so both durability paths are under test.
            while sum(int(op.split("-")[1]) % 2 == 0 for op in done) < 15 or len(done) < 40:
                await asyncio.sleep(0.002)
            served.proc.kill()  # SIGKILL while many calls are in flight
            await asyncio.gather(*calls)

    asyncio.run(load())
    served.proc.communicate(timeout=10)  # reaps it and closes its stderr pipe
    assert 40 <= len(done) < 200, "the kill came too late to test anything"

    restarted = Served(tmp_path, upstream.url, db)  # the database opens clean after the crash
    code, err = restarted.stop()
    assert code == 0, err
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        recorded = {r[0] for r in conn.execute("SELECT operation FROM calls")}
    finally:
        conn.close()
    missing = sorted(set(done) - recorded)
    assert not missing, f"{len(missing)} calls completed for the client but have no row: {missing[:5]}"


def test_sigterm_lets_a_stream_finish_and_flushes(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.handler = lambda body: Reply(headers={"Content-Type": "text/event-stream"}, pause=0.1,
                                          chunks=[stream_body()[i:i + 60] for i in range(0, len(stream_body()), 60)])
    db = tmp_path / "ledger.db"
    served = Served(tmp_path, upstream.url, db)
    result: dict[str, Any] = {}

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{served.url}/v1/chat/completions", json={"model": "gpt-4o", "stream": True},
                                    headers={"X-Meter-Operation": "in-flight"}) as resp:
                first = await resp.content.readany()
                served.proc.send_signal(signal.SIGTERM)  # mid-stream
                await asyncio.sleep(0.3)
                try:  # nothing new is accepted once stopping
                    async with session.get(f"{served.url}/healthz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        result["late"] = r.status
                except aiohttp.ClientError:
                    result["late"] = "refused"
                result["body"] = first + await resp.read()

    asyncio.run(run())
    _, err = served.proc.communicate(timeout=60)
    assert served.proc.returncode == 0, err
    assert result["body"] == stream_body()
    assert result["late"] == "refused"
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT operation, total_tokens, status FROM calls").fetchall()
    finally:
        conn.close()
    assert rows == [("in-flight", 15, 200)]


def test_calls_still_running_when_the_grace_ends_are_recorded_as_499(upstream: FakeUpstream,
                                                                     tmp_path: Path) -> None:
    # A stream far longer than the grace: 40 chunks, 0.25 s apart (10 s), the grace 0.5 s.
    body = stream_body()
    upstream.handler = lambda _: Reply(headers={"Content-Type": "text/event-stream"}, pause=0.25,
                                       chunks=[body[i:i + 20] for i in range(0, len(body), 20)])
    (tmp_path / "proxy.yaml").write_text("shutdown_grace: 0.5\n")
    db = tmp_path / "ledger.db"
    served = Served(tmp_path, upstream.url, db, "--config", str(tmp_path / "proxy.yaml"))

    async def run() -> bytes:
        got = b""
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{served.url}/v1/chat/completions", json={"model": "gpt-4o", "stream": True},
                                    headers={"X-Meter-Operation": "cut-off"}) as resp:
                try:
                    async for part in resp.content.iter_any():
                        got += part
                        if got.count(b"\n\n") >= 2 and served.proc.poll() is None:
                            served.proc.send_signal(signal.SIGTERM)
                except aiohttp.ClientError:
                    pass  # cut off by the shutdown
        return got

    got = asyncio.run(run())
    _, err = served.proc.communicate(timeout=60)
    assert served.proc.returncode == 0, err
    assert b"[DONE]" not in got
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT operation, status, error, completion_tokens, usage_source FROM calls").fetchall()
    finally:
        conn.close()
    assert len(rows) == 1, err.decode()[-3000:]
    operation, status, error, completion, source = rows[0]
    assert (operation, status, source) == ("cut-off", 499, "counted")
    assert "proxy shut down" in error and completion >= 1  # the tokens streamed before the cut, counted
    assert b"1 call(s) still in flight when shutdown_grace ended" in err
