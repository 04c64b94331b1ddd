"""Managed keys, budgets and rate limits end to end: the real proxy, the openai SDK, a real fake upstream
(the first two on both backends: a SQLite file, then a PostgreSQL schema)."""
from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any, Callable

import aiohttp
import openai
import pytest

from proxy.control.limits import Limits, Subject
from tests.support import ADMIN_TOKEN, FakeUpstream, ProxyServer, Reply
from tests.support.http import request

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def admin(proxy: ProxyServer, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, _, raw = request(proxy.url, method=method, path="/admin" + path,
                             body=None if body is None else json.dumps(body).encode(),
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    return status, json.loads(raw)


_clients: list[openai.OpenAI] = []


def sdk(proxy: ProxyServer, key: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    _clients.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Any:
    yield
    while _clients:
        _clients.pop().close()


def test_managed_end_to_end(start_proxy: Callable[..., ProxyServer], upstream: FakeUpstream,
                            ledger_target: str) -> None:
    proxy = start_proxy(keys="managed", upstream_api_key="sk-real-upstream", db=ledger_target)
    status, created = admin(proxy, "POST", "/keys", {"user": "alice", "team": "ml", "budget_usd": "0.01",
                                                     "budget_period": "day", "rpm": 100})
    assert status == 201, created
    key = created["key"]
    upstream.json({"id": "x", "object": "chat.completion", "model": "gpt-4o", "choices": [], "usage": USAGE})
    client = sdk(proxy, key)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                   extra_headers={"X-Meter-User": "mallory"})
    assert upstream.seen[-1].headers["Authorization"] == "Bearer sk-real-upstream"
    row = proxy.rows()[-1]
    assert (row["user"], json.loads(row["tags"]).get("team"), row["key_id"]) == ("alice", "ml", created["key_id"])

    with pytest.raises(openai.RateLimitError) as err:  # worst case of 100k max tokens passes the budget
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=100_000)
    assert err.value.code == "budget_exceeded"
    assert len(upstream.seen) == 1
    assert proxy.rows()[-1]["status"] == 429

    bad = sdk(proxy, "mp-wrong")
    with pytest.raises(openai.AuthenticationError) as auth:
        bad.models.list()
    assert auth.value.code == "invalid_api_key" and len(upstream.seen) == 1
    assert proxy.rows()[-1]["status"] == 401

    mine = json.loads(request(proxy.url, method="GET", path="/meter/usage", body=None,
                              headers={"Authorization": f"Bearer {key}"})[2])
    assert mine["totals"]["calls"] == 2 and mine["budgets"][0]["spent_usd"] == "0.000075"
    status, listed = admin(proxy, "GET", "/keys")
    assert listed["keys"][0]["spent_usd"] == "0.000075"
    admin(proxy, "DELETE", f"/keys/{created['key_id']}")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_passthrough_budget_for_a_user(start_proxy: Callable[..., ProxyServer], upstream: FakeUpstream,
                                       ledger_target: str) -> None:
    proxy = start_proxy(limits={Subject("user", "bob"): Limits(Decimal("0.0001"), "month", rpm=2)},
                        db=ledger_target)
    upstream.json({"model": "gpt-4o", "usage": USAGE})
    client = sdk(proxy, "sk-bob")
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                   user="bob")
    assert upstream.seen[-1].headers["Authorization"] == "Bearer sk-bob"
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       user="bob")
    assert err.value.code == "budget_exceeded"
    status, put = admin(proxy, "PUT", "/budgets/user/bob", {"budget_usd": 1, "rpm": 2})
    assert status == 200
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                   user="bob")
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       user="bob")
    assert err.value.code == "rate_limit_exceeded"
    assert err.value.response.headers["x-ratelimit-limit-requests"] == "2"


def test_budget_holds_under_50_concurrent_calls(start_proxy: Callable[..., ProxyServer],
                                                upstream: FakeUpstream) -> None:
    # Each call: 10 prompt + 5 completion tokens of gpt-4o = 0.000075 USD; max_tokens 5 reserves about that.
    budget = Decimal("0.00075")  # fits 10 such calls
    proxy = start_proxy(limits={Subject("team", "search"): Limits(budget, "day")})
    upstream.reply(Reply(headers={"Content-Type": "application/json"}, pause_before=0.2, content_length=True,
                         chunks=[json.dumps({"model": "gpt-4o", "usage": USAGE}).encode()]))

    async def run() -> list[int]:
        async with aiohttp.ClientSession() as session:
            async def one(n: int) -> int:
                async with session.post(f"{proxy.url}/v1/chat/completions",
                                        headers={"X-Meter-Team": "search", "Authorization": f"Bearer sk-{n:04d}"},
                                        json={"model": "gpt-4o", "max_tokens": 5,
                                              "messages": [{"role": "user", "content": "hi"}]}) as resp:
                    await resp.read()
                    return resp.status
            return await asyncio.gather(*(one(n) for n in range(50)))

    statuses = asyncio.run(run())
    admitted = statuses.count(200)
    assert statuses.count(429) == 50 - admitted and 8 <= admitted <= 10, statuses
    rows = proxy.rows()
    spent = sum(Decimal(r["cost_usd"]) for r in rows)
    assert spent <= budget + Decimal("0.000075")  # never past the budget by more than one call's worth
    assert len(upstream.seen) == admitted  # the refused were never forwarded
    assert sum(r["status"] == 429 for r in rows) == 50 - admitted  # and are recorded as refused
