"""The metered call, called directly: request, headers, chunks and end fed by hand, a real Ledger on a tmp
SQLite file, and the committed row read back. No sockets."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.control.gate import Refusal
from proxy.core.credentials import key_id_of
from proxy.counting.counter import CountPolicy
from proxy.ledger.writer import Ledger
from proxy.metering.call import MeteredCall
from proxy.pricing.table import PriceTable

PRICES = PriceTable.from_mapping({"models": {"gpt-4o": {"input": "2.50", "output": "10.00"},
                                              "gpt-4o-mini": {"input": "0.15", "output": "0.60"}}})
KEY = "sk-test-unit-0000abcd"
CHAT = "/v1/chat/completions"


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    led = Ledger(tmp_path / "ledger.db")
    await led.open()
    yield led
    await led.close()


def headers(**extra: str) -> CIMultiDictProxy[str]:
    h = CIMultiDict({"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    for name, value in extra.items():
        h.add(name.replace("_", "-"), value)
    return CIMultiDictProxy(h)


def row(ledger: Ledger, call: MeteredCall) -> sqlite3.Row:
    conn = sqlite3.connect(ledger.path)
    conn.row_factory = sqlite3.Row
    try:
        found = conn.execute("SELECT * FROM calls WHERE request_id = ?", (call.request_id,)).fetchone()
    finally:
        conn.close()
    assert found is not None, "no committed row"
    return found


def request(model: str, stream: bool = False, **fields: object) -> bytes:
    return json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Say hi"}],
                       **fields}).encode()


async def test_a_json_call_with_usage_is_priced_from_the_upstreams_usage(ledger: Ledger) -> None:
    call = MeteredCall("POST", CHAT, headers(X_Meter_User="alice", X_Meter_Team="search"), prices=PRICES,
                       ledger=ledger)
    assert call.on_request(request("gpt-4o"), "application/json") == request("gpt-4o")  # forwarded unchanged
    call.on_response_headers(200, "application/json")
    call.on_first_byte()
    body = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}}).encode()
    for i in range(0, len(body), 17):  # in pieces, as the socket may deliver it
        call.on_chunk(body[i:i + 17])
    call.on_end()
    await call.finish()
    assert call.recorded is True
    r = row(ledger, call)
    assert (r["method"], r["endpoint"], r["status"], r["error"]) == ("POST", CHAT, 200, None)
    assert (r["key_id"], r["key_hint"], r["user"]) == (key_id_of(KEY), "abcd", "alice")
    assert json.loads(r["tags"]) == {"team": "search"}
    assert (r["requested_model"], r["model"], r["stream"]) == ("gpt-4o", "gpt-4o-2024-08-06", 0)
    assert (r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) == (1000, 200, 1200)
    assert r["usage_source"] == "upstream" and r["priced"] == 1 and r["approximate"] == 0
    # 1000 * 2.50 / 1M + 200 * 10 / 1M, exactly.
    assert Decimal(r["cost_usd"]) == Decimal("0.0045")
    assert r["pricing_version"] == PRICES.version
    assert r["ttfb_ms"] is not None and r["latency_ms"] >= r["ttfb_ms"] >= 0
    assert r["ended_at"] >= r["started_at"]
    assert KEY not in json.dumps(dict(r))  # the key itself is stored nowhere in the row


def sse(*events: dict[str, object]) -> list[bytes]:
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


async def test_a_stream_without_usage_is_counted_and_says_so(ledger: Ledger) -> None:
    call = MeteredCall("POST", CHAT, headers(), prices=PRICES, ledger=ledger, counting=CountPolicy())
    call.on_request(request("gpt-4o-mini", stream=True), "application/json")
    call.on_response_headers(200, "text/event-stream")
    call.on_first_byte()
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024-07-18"}
    events = sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                 {**chunk, "choices": [{"index": 0, "delta": {"content": "Hello"}}]},
                 {**chunk, "choices": [{"index": 0, "delta": {"content": " there"}}]},
                 {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    holds = [call.on_chunk(e) for e in events]
    assert holds[-1] == sum(map(len, events[:-1]))  # [DONE] is held back until the row is committed
    call.on_end()
    await call.finish()
    r = row(ledger, call)
    assert (r["status"], r["stream"], r["model"], r["error"]) == (200, 1, "gpt-4o-mini-2024-07-18", None)
    assert r["usage_source"] == "counted"
    assert r["completion_tokens"] == 2  # "Hello", " there" in o200k_base
    assert r["prompt_tokens"] > 0 and r["total_tokens"] == r["prompt_tokens"] + 2
    # The row says the figure was counted (usage_source); tiktoken's count of a plain chat is exact.
    assert (r["approximate"], r["lower_bound"], r["usage_note"]) == (0, 0, None)
    expected = (Decimal(r["prompt_tokens"]) * Decimal("0.15") + 2 * Decimal("0.60")) / 1_000_000
    assert Decimal(r["cost_usd"]) == expected and r["priced"] == 1


async def test_a_refused_call_is_recorded_with_its_refusal(ledger: Ledger) -> None:
    call = MeteredCall("POST", CHAT, headers(X_Meter_User="mallory", X_Meter_Env="x"), prices=PRICES,
                       ledger=ledger)
    call.on_request(request("gpt-4o"), "application/json")
    call.refused(Refusal(429, "Rate limit reached for key", "rate_limit_error", "rate_limit_exceeded",
                         key_id="key-1", user="bob", team="ads"))
    await call.finish()
    r = row(ledger, call)
    assert (r["status"], r["error"]) == (429, "rate_limit_exceeded: Rate limit reached for key")
    assert (r["key_id"], r["user"]) == ("key-1", "bob")  # the gate's subject, not the headers'
    assert json.loads(r["tags"]) == {"team": "ads", "env": "x"}
    assert r["usage_source"] == "none" and r["total_tokens"] == 0
    assert Decimal(r["cost_usd"]) == 0 and r["priced"] == 1  # nothing spent: priced at zero, not "unpriced"
    assert (r["requested_model"], r["model"]) == ("gpt-4o", "gpt-4o")


async def test_an_unauthenticated_refusal_keeps_no_free_form_tags(ledger: Ledger) -> None:
    call = MeteredCall("POST", CHAT, headers(X_Meter_Env="flood"), prices=PRICES, ledger=ledger)
    call.refused(Refusal(401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key"))
    await call.finish()
    r = row(ledger, call)
    assert (r["status"], json.loads(r["tags"])) == (401, {})


async def test_a_failed_exchange_is_recorded_with_its_error(ledger: Ledger) -> None:
    call = MeteredCall("POST", CHAT, headers(), prices=PRICES, ledger=ledger, counting=CountPolicy())
    call.on_request(request("gpt-4o", stream=True), "application/json")
    call.on_failure(502, "upstream unreachable: connection refused")
    await call.finish()
    r = row(ledger, call)
    assert (r["status"], r["error"]) == (502, "upstream unreachable: connection refused")
    assert r["ttfb_ms"] is None and r["usage_source"] == "none"  # nothing came back, nothing was counted
    assert Decimal(r["cost_usd"]) == 0


async def test_a_stream_broken_off_midway_is_counted_and_keeps_its_error(ledger: Ledger) -> None:
    call = MeteredCall("POST", CHAT, headers(), prices=PRICES, ledger=ledger, counting=CountPolicy())
    call.on_request(request("gpt-4o", stream=True), "application/json")
    call.on_response_headers(200, "text/event-stream")
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o"}
    call.on_chunk(sse({**chunk, "choices": [{"index": 0, "delta": {"content": "Hello"}}]})[0])
    call.on_failure(None, "upstream broke off the response")
    call.on_end()
    await call.finish()
    r = row(ledger, call)
    assert r["status"] == 200 and r["error"].startswith("upstream broke off the response")
    assert r["usage_source"] == "counted" and r["completion_tokens"] == 1


async def test_an_unpriced_model_is_flagged_never_free(ledger: Ledger) -> None:
    call = MeteredCall("POST", CHAT, headers(), prices=PRICES, ledger=ledger)
    call.on_request(request("o9-unknown"), "application/json")
    call.on_response_headers(200, "application/json")
    call.on_chunk(json.dumps({"model": "o9-unknown", "choices": [],
                              "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}).encode())
    call.on_end()
    await call.finish()
    r = row(ledger, call)
    assert r["priced"] == 0 and r["total_tokens"] == 10


async def test_a_call_is_priced_by_the_model_that_answered_it(ledger: Ledger) -> None:
    call = MeteredCall("POST", CHAT, headers(), prices=PRICES, ledger=ledger)
    call.on_request(request("gpt-4o-mini"), "application/json")
    call.on_response_headers(200, "application/json")
    call.on_chunk(json.dumps({"model": "gpt-4o", "choices": [],
                              "usage": {"prompt_tokens": 1000, "completion_tokens": 0, "total_tokens": 1000}}).encode())
    call.on_end()
    await call.finish()
    r = row(ledger, call)
    assert (r["requested_model"], r["model"]) == ("gpt-4o-mini", "gpt-4o")
    assert Decimal(r["cost_usd"]) == Decimal("0.0025")


async def test_a_failure_on_an_unpriced_model_is_flagged_unpriced(ledger: Ledger) -> None:
    call = MeteredCall("POST", CHAT, headers(), prices=PRICES, ledger=ledger)
    call.on_request(request("o9-unknown"), "application/json")
    call.on_failure(504, "upstream timed out")
    call.on_failure(None, "client went away")  # every failure is kept, in order
    await call.finish()
    r = row(ledger, call)
    assert (r["status"], r["error"], r["priced"]) == (504, "upstream timed out; client went away", 0)
