"""Many slow upstream responses at once do not slow the others down; the raw key is in no file at rest."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Callable

import aiohttp

from tests.support import FakeUpstream, ProxyServer, Reply

SLOW = 100
PAUSE = 6.0  # long enough that 20 fast calls on a loaded 2-core machine still finish inside it


def scripted(body: bytes) -> Reply:
    if json.loads(body).get("slow"):
        return Reply(headers={"Content-Type": "text/event-stream"}, pause=PAUSE,
                     chunks=[b'data: {"choices":[]}\n\n', b'data: {"choices":[]}\n\n', b"data: [DONE]\n\n"])
    return Reply(headers={"Content-Type": "application/json"}, content_length=True,
                 chunks=[b'{"model": "gpt-4o", "usage": {"prompt_tokens": 1, "completion_tokens": 1, '
                         b'"total_tokens": 2}}'])


def test_slow_calls_do_not_hold_up_fast_ones(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.handler = scripted

    async def run() -> list[float]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def post(slow: bool) -> float:
                t0 = time.monotonic()
                async with session.post(f"{proxy.url}/v1/chat/completions",
                                        json={"model": "gpt-4o", "stream": slow, "slow": slow}) as resp:
                    await resp.read()
                    assert resp.status == 200
                return time.monotonic() - t0

            slow = [asyncio.create_task(post(True)) for _ in range(SLOW)]
            await asyncio.sleep(0.3)  # all slow streams are open and waiting on the upstream
            fast = [await post(False) for _ in range(20)]
            assert all(not t.done() for t in slow)
            await asyncio.gather(*slow)
            return fast

    fast = asyncio.run(run())
    # Each was answered while 100 streams stall (a blocked pool would hold each for the whole pause).
    assert max(fast) < PAUSE - 1, fast
    assert len(proxy.rows()) == SLOW + 20


def test_raw_key_absent_from_db_wal_and_spool(upstream: FakeUpstream, tmp_path: Path,
                                              start_proxy: Callable[..., ProxyServer]) -> None:
    import sqlite3

    secret = "sk-proj-RAWKEYNEVERATREST9876543210abcdefABCDEF"
    spool = tmp_path / "spool.jsonl"
    proxy = start_proxy(spool=str(spool), ledger_busy_timeout=0.1)
    upstream.handler = scripted
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    import http.client

    def call() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.server.port, timeout=10)
        try:
            conn.request("POST", "/v1/chat/completions", body=b'{"model": "gpt-4o"}', headers=headers)
            assert conn.getresponse().read()
        finally:
            conn.close()

    call()
    locker = sqlite3.connect(proxy.settings.db, isolation_level=None, timeout=10)
    locker.execute("BEGIN EXCLUSIVE")  # the next rows go to the spool
    call()
    spooled = spool.read_bytes()  # while the database is locked, the row waits here
    locker.execute("ROLLBACK")
    locker.close()
    assert spooled.count(b"\n") == 1 and secret.encode() not in spooled and secret[-16:].encode() not in spooled
    deadline = time.monotonic() + 10
    while len(proxy.rows()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert any(p.name.endswith("-wal") for p in files)
    for path in files:
        data = path.read_bytes()
        assert secret.encode() not in data and secret[-16:].encode() not in data, path
