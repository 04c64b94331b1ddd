"""Counting through the proxy: a stream without usage gets exact counts, flagged as counted."""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any, Callable

import openai
import pytest

from tests.support import ADMIN_TOKEN, FakeUpstream, ProxyServer, Reply
from tests.support.http import request
from tests.support.streams import KEY, capture, chunk, sse

WEATHER = "e2aad469b71d1d4894ff833ea147020a9d875eb7ce644a0ff355581690a4cbfd.sse"  # 14 / 30
TOOL = "2018feb66ae13fcf5333d61b95849decc68d3f63bd38172889367e1afb1e04f7.sse"  # 44 / 16
SF = [{"role": "user", "content": "What's the weather like in SF?"}]
NYC_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}

def without_usage(stream: bytes) -> bytes:
    """The same stream as if the client had not asked for usage: no usage chunk."""
    events = stream.split(b"\n\n")
    return b"\n\n".join(e for e in events if b'"usage"' not in e)

def test_stream_without_usage_is_counted_exactly(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.sse(without_usage(capture(WEATHER)), chunk_size=40)
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0) as client:
        text = "".join(p.choices[0].delta.content or "" for p in
                       client.chat.completions.create(model="gpt-4o", messages=SF, stream=True) if p.choices)
    assert text
    row = proxy.rows()[-1]
    assert (row["usage_source"], row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        "counted", 14, 30, 44)
    assert (row["approximate"], row["lower_bound"], row["priced"]) == (0, 0, 1)
    assert row["cost_usd"] == "0.000335"  # the figure the provider's usage gives (test_openai_sdk)

def test_tool_call_stream_counted_within_two_tokens(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.sse(without_usage(capture(TOOL)), chunk_size=40)
    req = {"model": "gpt-4o", "stream": True, "tools": [NYC_TOOL],
           "messages": [{"role": "user", "content": "what's the weather in NYC?"}]}
    request(proxy.url, body=json.dumps(req).encode())
    row = proxy.rows()[-1]
    assert row["usage_source"] == "counted"
    assert abs(row["completion_tokens"] - 16) <= 2 and abs(row["prompt_tokens"] - 44) <= 2

def test_unknown_model_count_is_flagged_approximate(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.sse(sse(chunk("llama-3.1-8b-instruct", "Hello"), chunk("llama-3.1-8b-instruct", " there")))
    request(proxy.url, body=json.dumps({"model": "llama-3.1-8b-instruct", "stream": True, "messages": SF}).encode())
    row = proxy.rows()[-1]
    assert (row["usage_source"], row["approximate"], row["priced"]) == ("counted", 1, 0)
    assert row["completion_tokens"] == 2 and row["usage_note"]

def test_reasoning_model_count_is_a_lower_bound(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.sse(sse(chunk("o3-2025-04-16", "42")))
    request(proxy.url, body=json.dumps({"model": "o3", "stream": True, "messages": SF}).encode())
    row = proxy.rows()[-1]
    assert (row["usage_source"], row["lower_bound"]) == ("counted", 1)
    assert "lower bound" in row["usage_note"]

def test_upstream_error_is_not_counted(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.json({"error": {"message": "bad"}}, status=400)
    request(proxy.url, body=json.dumps({"model": "gpt-4o", "stream": True, "messages": SF}).encode())
    row = proxy.rows()[-1]
    assert (row["usage_source"], row["total_tokens"]) == ("none", 0)

def test_client_gone_mid_stream_keeps_the_tokens_counted_so_far(upstream: FakeUpstream,
                                                                 proxy: ProxyServer) -> None:
    parts = [b'data: ' + json.dumps(chunk("gpt-4o", " hello")).encode() + b"\n\n"] * 30
    upstream.reply(Reply(headers={"Content-Type": "text/event-stream"}, chunks=parts, pause=0.05))
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/chat/completions",
                 body=json.dumps({"model": "gpt-4o", "stream": True, "messages": SF}).encode())
    resp = conn.getresponse()
    got = b""
    while got.count(b"\n\n") < 5:
        got += resp.read1(65536)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 5
    while not proxy.rows() and time.monotonic() < deadline:
        time.sleep(0.05)
    row = proxy.rows()[-1]
    assert row["status"] == 499 and row["usage_source"] == "counted"
    assert 5 <= row["completion_tokens"] < 30 and row["prompt_tokens"] == 14

def test_accuracy_sampling_and_report(upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(accuracy_sample_rate=1.0)
    upstream.sse(capture(WEATHER), chunk_size=64)
    for _ in range(3):
        request(proxy.url, body=json.dumps({"model": "gpt-4o", "stream": True, "messages": SF,
                                            "stream_options": {"include_usage": True}}).encode())
    upstream.json({"model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": "Sunny and mild."}}],
        "usage": {"prompt_tokens": 15, "completion_tokens": 4, "total_tokens": 19}})
    request(proxy.url, body=json.dumps({"model": "gpt-4o", "messages": SF}).encode())
    rows = proxy.rows()
    assert [(r["usage_source"], r["counted_prompt_tokens"], r["counted_completion_tokens"]) for r in rows] == [
        ("upstream", 14, 30)] * 3 + [("upstream", 14, 4)]
    status, _, body = request(proxy.url, method="GET", path="/admin/accuracy", body=None,
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    report: dict[str, Any] = json.loads(body)
    assert status == 200
    (model,) = report["models"]
    assert model["model"] == "gpt-4o-2024-08-06" and model["calls_sampled"] == 4
    assert model["prompt"]["worst_abs_error"] == 1 and model["prompt"]["mean_error"] == -0.25
    assert model["completion"]["worst_abs_error"] == 0

def test_default_rate_samples_few(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.json({"model": "gpt-4o", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    for _ in range(20):
        request(proxy.url)
    sampled = [r for r in proxy.rows() if r["counted_prompt_tokens"] is not None]
    assert len(sampled) <= 5  # 1% by default; 20 calls would all be counted if sampling were on for all

@pytest.fixture(autouse=True)
def _need_captures() -> None:
    capture(WEATHER)


def test_accuracy_cli(upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer]) -> None:
    from tests.support.cli import run_cli

    proxy = start_proxy(accuracy_sample_rate=1.0)
    upstream.sse(capture(WEATHER), chunk_size=64)
    request(proxy.url, body=json.dumps({"model": "gpt-4o", "stream": True, "messages": SF,
                                        "stream_options": {"include_usage": True}}).encode())
    as_json = json.loads(run_cli("accuracy", "--db", proxy.settings.db, "--format", "json").stdout)
    (model,) = as_json["models"]
    assert model["calls_sampled"] == 1 and model["prompt"]["worst_abs_error"] == 0
    table = run_cli("accuracy", "--db", proxy.settings.db)
    assert table.returncode == 0 and "gpt-4o-2024-08-06" in table.stdout
    bad = run_cli("accuracy", "--db", proxy.settings.db, "--since", "whenever")
    assert bad.returncode == 2 and "since" in bad.stderr
