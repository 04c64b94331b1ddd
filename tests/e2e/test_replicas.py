"""Several meterproxy processes on one PostgreSQL ledger: the same figures from every replica, no completed
response without its row when one is killed with -9 under load, `serve --workers N`, /admin/replicas."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import aiohttp
import openai
import psycopg

from tests.support import FakeUpstream
from tests.support.cli import free_port, run_cli
from tests.support.replicas import (
    HEARTBEAT,
    Replica,
    ReplicaSet,
    get_json,
    pids_in,
    replicas_fixture,  # noqa: F401  (the `replicas` fixture)
    spread,
    wait_for,
)
from tests.support.streams import SMALL_USAGE, scripted

USAGE = SMALL_USAGE


def ledger_rows(db: str, sql: str) -> list[tuple[Any, ...]]:
    if db.startswith("postgresql://"):
        with psycopg.connect(db) as conn:
            return [tuple(r) for r in conn.execute(sql)]
    conn = sqlite3.connect(db)
    try:
        return [tuple(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def test_usage_is_the_same_from_every_replica(replicas: Callable[..., ReplicaSet], upstream: FakeUpstream,
                                              pg_url: str) -> None:
    upstream.handler = scripted
    group = replicas(pg_url, upstream.url, 3)
    for n, url in enumerate(spread(group.urls, 30)):
        with openai.OpenAI(base_url=url + "/v1", api_key="sk-test-key-0001", max_retries=0) as client:
            answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                                    user=f"user-{n % 4}")
        assert answer.usage is not None and answer.usage.total_tokens == 15
    answers = [get_json(url, "/admin/usage?group_by=user,model") for url in group.urls]
    assert all(status == 200 for status, _ in answers)
    first = answers[0][1]
    assert all(body == first for _, body in answers[1:])
    assert first["totals"]["calls"] == 30
    total = sum((Decimal(str(cost)) for (cost,) in ledger_rows(pg_url, "SELECT cost_usd FROM calls")), Decimal(0))
    assert Decimal(first["totals"]["cost_usd"]) == total  # the report is the rows' exact sum
    assert len(upstream.seen) == 30


async def _one_call(session: aiohttp.ClientSession, url: str, n: int, done: list[str]) -> None:
    op = f"call-{n}"
    stream = n % 2 == 0
    try:
        async with session.post(f"{url}/v1/chat/completions", headers={"X-Meter-Operation": op},
                                json={"model": "gpt-4o", "stream": stream}) as resp:
            if resp.status != 200:
                return
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


def test_kill_9_of_one_replica_loses_no_completed_call_and_the_others_serve_on(
        replicas: Callable[..., ReplicaSet], upstream: FakeUpstream, pg_url: str) -> None:
    upstream.handler = scripted
    group = replicas(pg_url, upstream.url, 3)
    victim = group[0]
    done: list[str] = []
    urls = spread(group.urls, 200)
    on_victim = {f"call-{n}" for n, url in enumerate(urls) if url == victim.url}

    async def load() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            calls = [asyncio.create_task(_one_call(session, url, n, done)) for n, url in enumerate(urls)]
            # Kill once the victim has completed calls of both kinds, with many still in flight on it.
            while (len(on_victim.intersection(done)) < 12 or
                   not any(int(op.split("-")[1]) % 2 == 0 for op in on_victim.intersection(done))):
                await asyncio.sleep(0.002)
            victim.proc.kill()
            await asyncio.gather(*calls)

    asyncio.run(load())
    victim.proc.wait(timeout=10)
    lost_on_victim = on_victim - set(done)
    assert lost_on_victim, "the kill came too late: every call on the victim completed"
    assert set(done) - on_victim == {f"call-{n}" for n, u in enumerate(urls) if u != victim.url}, \
        "a call on a surviving replica did not complete"
    recorded = {op for (op,) in ledger_rows(pg_url, "SELECT operation FROM calls")}
    missing = sorted(set(done) - recorded)
    assert not missing, f"{len(missing)} calls completed for the client but have no row: {missing[:5]}"

    # The others keep serving, and see the victim as not alive once 3 heartbeats are missed.
    for survivor in group.replicas[1:]:
        status, body = get_json(survivor.url, "/admin/usage")
        assert status == 200
        with openai.OpenAI(base_url=survivor.url + "/v1", api_key="sk-test-key-0001", max_retries=0) as client:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "after"}])
    wait_for(lambda: victim.proc.pid not in pids_in(get_json(group[1].url, "/admin/replicas")[1]),
             timeout=5 + 3 * HEARTBEAT * 4, what="the killed replica to show as not alive")
    listed = get_json(group[1].url, "/admin/replicas")[1]
    assert victim.proc.pid in pids_in(listed, alive=False)  # its row stays (no clean stop), not alive
    assert pids_in(listed) == {r.proc.pid for r in group.replicas[1:]}


def test_workers_2_on_postgres_answer_and_both_are_replicas(upstream: FakeUpstream, pg_url: str,
                                                          tmp_path: Path) -> None:
    upstream.handler = scripted
    parent = Replica(tmp_path, "workers", pg_url, upstream.url, workers=2)
    try:
        parent.wait_healthy()
        wait_for(lambda: len(pids_in(get_json(parent.url, "/admin/replicas")[1])) == 2, what="two workers' rows")
        pids = pids_in(get_json(parent.url, "/admin/replicas")[1])
        assert parent.proc.pid not in pids  # the parent serves nothing itself
        for _ in range(20):
            with openai.OpenAI(base_url=parent.url + "/v1", api_key="sk-test-key-0001", max_retries=0) as client:
                answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
            assert answer.usage is not None and answer.usage.total_tokens == 15
        assert ledger_rows(pg_url, "SELECT count(*) FROM calls") == [(20,)]
        assert pids_in(get_json(parent.url, "/admin/replicas")[1]) == pids
    finally:
        code = parent.stop()
    assert code == 0, parent.output[-3000:]
    assert ledger_rows(pg_url, "SELECT count(*) FROM replicas") == [(0,)]  # each worker deleted its row


def test_workers_refuse_a_sqlite_ledger(tmp_path: Path) -> None:
    done = run_cli("serve", "--workers", "2", "--db", str(tmp_path / "ledger.db"), "--port", str(free_port()))
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "--workers 2 needs a PostgreSQL ledger" in line and "ledger.db" in line
    assert not os.path.exists(tmp_path / "ledger.db")


def test_workers_refuse_port_0(pg_url: str) -> None:
    done = run_cli("serve", "--workers", "2", "--db", pg_url, "--port", "0")
    assert done.returncode == 2 and "needs a fixed port" in done.stderr, done.stderr


def test_a_worker_that_dies_is_reported_and_the_other_serves_on(upstream: FakeUpstream, pg_url: str,
                                                                tmp_path: Path) -> None:
    upstream.handler = scripted
    parent = Replica(tmp_path, "workers", pg_url, upstream.url, workers=2)
    try:
        parent.wait_healthy()
        wait_for(lambda: len(pids_in(get_json(parent.url, "/admin/replicas")[1])) == 2, what="two workers' rows")
        first, second = sorted(pids_in(get_json(parent.url, "/admin/replicas")[1]))
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: f"(pid {first}) was killed by signal 9; 1 of 2 still serving" in parent.output,
                 what="the parent to report the dead worker")
        assert parent.proc.poll() is None  # the parent and the other worker serve on
        for _ in range(5):
            with openai.OpenAI(base_url=parent.url + "/v1", api_key="sk-test-key-0001", max_retries=0) as client:
                client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    finally:
        code = parent.stop()
    assert code == 128 + signal.SIGKILL  # a worker died: the parent's status says so
    assert ledger_rows(pg_url, "SELECT pid FROM replicas") == [(first,)]  # the killed one could not delete its row
    assert second != first
