"""The proxy on a PostgreSQL ledger, end to end: the openai SDK through the proxy, PostgreSQL behind a TCP
relay that the test cuts and restores (the shared server cannot be stopped)."""

from __future__ import annotations

import json
import time
import urllib.request
from decimal import Decimal
from typing import Any, Callable, Iterator

import openai
import pytest

from tests.support import FakeUpstream, ProxyServer, ledger_rows
from tests.support.ledger import assert_exact
from tests.support.relay import Relay
from tests.support.streams import KEY

REPLY = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}, "finish_reason": "stop",
                      "logprobs": None}],
         "usage": {"prompt_tokens": 14, "completion_tokens": 2, "total_tokens": 16}}


def health(proxy: ProxyServer) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{proxy.url}/healthz", timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def wait_for_ok(proxy: ProxyServer, timeout: float = 30) -> None:
    """Until /healthz says ok (the spool replayed)."""
    deadline = time.monotonic() + timeout
    while health(proxy)[1]["status"] != "ok":
        assert time.monotonic() < deadline, health(proxy)
        time.sleep(0.1)


def back_then_one_call(proxy: ProxyServer, relay: Relay, client: openai.OpenAI) -> None:
    """The server reachable again: wait for the spool's replay, then one call as user "after"."""
    relay.restore()
    wait_for_ok(proxy)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "c"}],
                                   extra_headers={"X-Meter-User": "after"})


def with_password(url: str, password: str) -> str:
    """`url` with a password in it (the server trusts loopback: it is never asked for, only carried)."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{password}@{host}"


@pytest.fixture
def relay(pg_url: str) -> Iterator[Relay]:
    relay = Relay.to(pg_url)
    yield relay
    relay.close()


def test_calls_while_postgres_is_cut_off_complete_from_the_spool_and_land_once(
        upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer], pg_url: str, relay: Relay) -> None:
    upstream.json(REPLY)
    db = with_password(relay.url(pg_url), "topsecret-pw")
    proxy = start_proxy(db=db, ledger_busy_timeout=1.0)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0)
    try:
        status, body = health(proxy)
        assert (status, body["status"], body["backend"]) == (200, "ok", "postgres")
        assert "topsecret" not in json.dumps(body) and ":***@" in body["db"]
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}],
                                       extra_headers={"X-Meter-User": "before"})
        relay.cut()
        for n in range(4):  # each completes: its row is fsynced to the spool first
            out = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "b"}],
                                                 extra_headers={"X-Meter-User": f"during-{n}"})
            assert out.choices[0].message.content == "Hi."
        status, body = health(proxy)
        assert (status, body["status"], body["ledger"], body["spool_depth"]) == (200, "degraded", "spooling", 4)
        assert "topsecret" not in json.dumps(body)
        assert [r["user"] for r in ledger_rows(pg_url)] == ["before"]
        back_then_one_call(proxy, relay, client)
    finally:
        client.close()
    rows = ledger_rows(pg_url)
    assert [r["user"] for r in rows] == ["before", *(f"during-{n}" for n in range(4)), "after"]
    assert len({r["request_id"] for r in rows}) == 6
    assert all(r["cost_usd"] == Decimal("0.000055") for r in rows)
    assert_exact(pg_url)


def test_a_slow_database_shows_on_healthz_and_in_metrics_and_clears(
        upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer], pg_url: str, relay: Relay) -> None:
    """Slow is not down: /healthz stays 200 but says "slow" and why while ledger writes take longer than
    slow_database, and "ok" again once they do not; /metrics has what each response waited for its row."""
    upstream.json(REPLY)
    proxy = start_proxy(db=relay.url(pg_url), slow_database=0.2, metrics_public=True)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0)

    def call() -> None:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}])

    try:
        call()
        assert health(proxy)[1]["status"] == "ok", health(proxy)
        relay.delay = 0.05  # each round trip of a batch now costs at least 0.1 s
        for _ in range(3):
            call()
        status, body = health(proxy)
        assert (status, body["status"]) == (200, "slow"), body
        assert "ledger writes take" in body["reason"] and "slow above 0.2 s" in body["reason"]
        relay.delay = 0.0
        for _ in range(25):  # the median of the last 20 writes is fast again
            call()
        assert health(proxy)[1]["status"] == "ok"
        with urllib.request.urlopen(f"{proxy.url}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
    finally:
        client.close()
    assert "meterproxy_ledger_row_wait_seconds_count 29.0" in metrics
    assert len(ledger_rows(pg_url)) == 29


def test_a_proxy_started_while_postgres_is_away_serves_spools_then_migrates_and_replays_once(
        upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer], pg_url: str, relay: Relay) -> None:
    """The server is away when the proxy starts (a deploy racing the database): the proxy starts anyway,
    /healthz says degraded and why, calls complete once their rows are in the spool; when the server
    answers, the proxy migrates the (empty) schema and replays the rows in order, each once."""
    upstream.json(REPLY)
    relay.cut()
    proxy = start_proxy(db=relay.url(pg_url), ledger_busy_timeout=1.0)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0)
    try:
        status, body = health(proxy)
        assert (status, body["status"], body["ledger"]) == (200, "degraded", "spooling"), body
        for n in range(3):
            out = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "b"}],
                                                 extra_headers={"X-Meter-User": f"early-{n}"})
            assert out.choices[0].message.content == "Hi."
        assert health(proxy)[1]["spool_depth"] == 3
        back_then_one_call(proxy, relay, client)
    finally:
        client.close()
    rows = ledger_rows(pg_url)
    assert [r["user"] for r in rows] == ["early-0", "early-1", "early-2", "after"]
    assert_exact(pg_url)
