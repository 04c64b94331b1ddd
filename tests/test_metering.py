"""What lands in the ledger: usage per endpoint and shape, cost, attribution, and when the row commits."""

from __future__ import annotations

import hashlib
import http.client
import json
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.support import FakeUpstream, ProxyServer, Reply
from tests.test_forwarding import request

KEY = "sk-test-key-0001"
KEY_ID = hashlib.sha256(KEY.encode()).hexdigest()[:16]


def sse(*events: Any, done: bool = True, event_names: bool = False) -> bytes:
    out = b""
    for e in events:
        if event_names:
            out += b"event: " + e["type"].encode() + b"\n"
        out += b"data: " + json.dumps(e).encode() + b"\n\n"
    return out + (b"data: [DONE]\n\n" if done else b"")


def chunk(model: str = "gpt-4o-2024-08-06", content: str | None = "x", **extra: Any) -> dict[str, Any]:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    return {"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": choices, **extra}


def body(path: str, model: str = "gpt-4o", stream: bool = False, **extra: Any) -> bytes:
    return json.dumps({"model": model, "stream": stream, **extra}).encode()


# Each case: endpoint, upstream reply body (JSON object or SSE bytes), expected
# (prompt, completion, cached, reasoning, total, model, cost).
CASES: list[tuple[str, str, Any, tuple[int, int, int, int, int, str, str]]] = [
    ("chat json with cached + reasoning", "/v1/chat/completions",
     {"model": "gpt-4o-2024-08-06", "choices": [], "usage": {
         "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
         "prompt_tokens_details": {"cached_tokens": 1920},
         "completion_tokens_details": {"reasoning_tokens": 0}}},
     # (86 * 2.5 + 1920 * 1.25 + 300 * 10) / 1e6
     (2006, 300, 1920, 0, 2306, "gpt-4o-2024-08-06", "0.005615")),
    ("chat stream with usage chunk", "/v1/chat/completions",
     sse(chunk(), chunk(content=None, usage={"prompt_tokens": 14, "completion_tokens": 30, "total_tokens": 44})),
     (14, 30, 0, 0, 44, "gpt-4o-2024-08-06", "0.000335")),
    ("vllm cumulative usage: last wins", "/v1/chat/completions",
     sse(chunk("gpt-4o-mini", usage={"prompt_tokens": 226, "completion_tokens": 1, "total_tokens": 227}),
         chunk("gpt-4o-mini", usage={"prompt_tokens": 226, "completion_tokens": 20, "total_tokens": 246}),
         chunk("gpt-4o-mini", content=None,
               usage={"prompt_tokens": 226, "completion_tokens": 20, "total_tokens": 246})),
     # 226 * 0.15 + 20 * 0.6 per 1M
     (226, 20, 0, 0, 246, "gpt-4o-mini", "0.0000459")),
    ("groq usage on the finish chunk", "/v1/chat/completions",
     sse(chunk("gpt-4.1-nano"), {"model": "gpt-4.1-nano", "choices": [
         {"index": 0, "delta": {}, "finish_reason": "stop"}], "x_groq": {"id": "r"},
         "usage": {"queue_time": 0.04, "prompt_tokens": 45, "completion_tokens": 662, "total_tokens": 707}}),
     (45, 662, 0, 0, 707, "gpt-4.1-nano", "0.0002693")),
    ("legacy completions", "/v1/completions",
     {"object": "text_completion", "model": "gpt-3.5-turbo-instruct", "choices": [],
      "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}},
     # 5 * 1.50 + 7 * 2.00 per 1M: the shipped table prices the legacy completions model
     (5, 7, 0, 0, 12, "gpt-3.5-turbo-instruct", "0.0000215")),
    ("embeddings", "/v1/embeddings",
     {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
      "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}},
     (8, 0, 0, 0, 8, "text-embedding-3-small", "0.00000016")),
    ("responses json with reasoning", "/v1/responses",
     {"object": "response", "model": "o3-2025-04-16", "status": "completed", "usage": {
         "input_tokens": 81, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 1035,
         "output_tokens_details": {"reasoning_tokens": 832}, "total_tokens": 1116}},
     # 81 * 2 + 1035 * 8 per 1M
     (81, 1035, 0, 832, 1116, "o3-2025-04-16", "0.008442")),
    ("responses stream", "/v1/responses",
     sse({"type": "response.created", "sequence_number": 0, "response": {"model": "gpt-5", "usage": None}},
         {"type": "response.output_text.delta", "sequence_number": 1, "delta": "hi"},
         {"type": "response.completed", "sequence_number": 2, "response": {"model": "gpt-5-2025-08-07", "usage": {
             "input_tokens": 37, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 11,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 48}}},
         done=False, event_names=True),
     # 37 * 1.25 + 11 * 10 per 1M
     (37, 11, 0, 0, 48, "gpt-5-2025-08-07", "0.00015625")),
]


@pytest.mark.parametrize("name,path,reply,expected", CASES, ids=[c[0] for c in CASES])
def test_usage_recorded_exactly_with_cost(upstream: FakeUpstream, proxy: ProxyServer, name: str, path: str,
                                          reply: Any, expected: tuple[Any, ...]) -> None:
    if isinstance(reply, bytes):
        upstream.sse(reply, chunk_size=17)
    else:
        upstream.json(reply)
    status, _, got = request(proxy.url, path=path, body=body(path, stream=isinstance(reply, bytes)))
    assert status == 200
    row = proxy.rows()[-1]
    figures = (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"], row["reasoning_tokens"],
               row["total_tokens"], row["model"], row["cost_usd"])
    assert figures == expected
    assert Decimal(row["cost_usd"]) == Decimal(expected[-1])
    assert row["usage_source"] == "upstream"
    assert row["endpoint"] == path and row["key_id"] == KEY_ID and row["key_hint"] == "0001"


def test_unpriced_model_is_flagged_not_free(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.json({"model": "my-local-llama", "choices": [],
                   "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
    request(proxy.url, body=body("/v1/chat/completions", model="my-local-llama"))
    row = proxy.rows()[-1]
    assert (row["priced"], row["cost_usd"], row["total_tokens"]) == (0, "0", 15)


def test_stream_of_an_uncountable_endpoint_is_recorded_as_none(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.sse(sse(chunk(), chunk()))
    request(proxy.url, path="/v1/audio/speech", body=body("/v1/audio/speech", stream=True))
    row = proxy.rows()[-1]
    assert (row["usage_source"], row["total_tokens"], row["stream"]) == ("none", 0, 1)


def test_unreadable_usage_passes_bytes_and_says_so(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    sent = upstream.json({"model": "gpt-4o", "usage": {"prompt_tokens": "many", "completion_tokens": -1}})
    status, _, got = request(proxy.url)
    assert (status, got) == (200, sent)
    row = proxy.rows()[-1]
    # The provider's figure is unusable, so the proxy's own count stands in, and the row says why.
    assert row["usage_source"] == "counted" and "unreadable usage" in row["error"]


def test_attribution_headers_and_body_user(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.json({"model": "gpt-4o", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    request(proxy.url, headers={"X-Meter-User": "alice", "X-Meter-Session": "s-1", "X-Meter-Operation": "summarise",
                                "X-Meter-Team": "blue", "X-Meter-Feature": "search"},
            body=body("/v1/chat/completions", user="body-user"))
    request(proxy.url, body=body("/v1/chat/completions", user="body-user"),
            headers={"Authorization": "", "api-key": "azure-key-abcd"})
    first, second = proxy.rows()[-2:]
    assert (first["user"], first["session"], first["operation"]) == ("alice", "s-1", "summarise")
    assert json.loads(first["tags"]) == {"team": "blue", "feature": "search"}
    assert second["user"] == "body-user"
    assert second["key_id"] == hashlib.sha256(b"azure-key-abcd").hexdigest()[:16]
    assert second["key_hint"] == "abcd"


def test_raw_key_never_reaches_disk(upstream: FakeUpstream, proxy: ProxyServer, tmp_path: Path) -> None:
    secret = "sk-proj-THISISARAWKEYTHATMUSTNEVERBESTORED0123456789"
    upstream.json({"model": "gpt-4o", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    for _ in range(3):
        request(proxy.url, headers={"Authorization": f"Bearer {secret}"})
    upstream.reply(Reply(status=401, headers={"Content-Type": "application/json"}, content_length=True,
                         chunks=[b'{"error": {"message": "Incorrect API key provided"}}']))
    request(proxy.url, headers={"Authorization": f"Bearer {secret}"})
    assert len(proxy.rows()) == 4
    files = [p for p in tmp_path.iterdir() if p.name.startswith("ledger.db")]
    assert any(p.name.endswith("-wal") for p in files)  # the WAL is searched too, not only the main file
    for path in files:
        data = path.read_bytes()
        assert secret.encode() not in data and secret[-20:].encode() not in data
    assert proxy.rows()[-1]["key_hint"] == secret[-4:]


def _read_until(resp: http.client.HTTPResponse, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        part = resp.read1(65536)
        assert part, f"stream ended before {marker!r}"
        seen += part
    return seen


@pytest.mark.parametrize("path,reply", [
    ("/v1/chat/completions",
     sse(chunk(), chunk(content=None, usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}))),
    ("/v1/responses",
     sse({"type": "response.completed", "response": {"model": "gpt-5", "usage": {
         "input_tokens": 3, "output_tokens": 4, "total_tokens": 7}}}, done=False, event_names=True)),
])
def test_stream_row_committed_before_client_sees_the_end(upstream: FakeUpstream, proxy: ProxyServer, path: str,
                                                         reply: bytes) -> None:
    # The upstream lingers after its last event, so the row cannot come from the end of the connection.
    marker = b"[DONE]" if path.endswith("completions") else b"response.completed"
    upstream.sse(reply, pause_after=1.5)
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", path, body=body(path, stream=True),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        seen = _read_until(resp, marker)
        rows = proxy.rows()  # at this instant, from a separate connection
        assert rows and rows[-1]["total_tokens"] == 7
        assert seen + resp.read() == reply
    finally:
        conn.close()


def test_json_row_committed_before_client_has_body(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    for i in range(20):
        upstream.json({"model": "gpt-4o", "usage": {"prompt_tokens": i, "completion_tokens": 1,
                                                    "total_tokens": i + 1}})
        request(proxy.url)
        conn = sqlite3.connect(proxy.settings.db)
        try:
            count, last = conn.execute("SELECT count(*), max(prompt_tokens) FROM calls").fetchone()
        finally:
            conn.close()
        assert (count, last) == (i + 1, i)


# One stream per provider shape (shared/reference/streaming.md D), through the proxy: expected
# (prompt, completion, cached, reasoning, total, served model).
AZURE_FIRST = {"choices": [], "created": 0, "id": "", "model": "", "object": "",
               "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}
AZURE_TRAILER = {"choices": [{"content_filter_offsets": {}, "content_filter_results": {}, "finish_reason": None,
                              "index": 0}], "created": 0, "id": "", "model": "", "object": ""}
SHAPES: list[tuple[str, bytes, tuple[int, int, int, int, int, str]]] = [
    ("groq x_groq only", sse(chunk("llama-3.3-70b-versatile"),
                             {"model": "llama-3.3-70b-versatile", "choices": [
                                 {"index": 0, "delta": {}, "finish_reason": "stop"}],
                              "x_groq": {"id": "r", "usage": {"queue_time": 0.1, "prompt_tokens": 45,
                                                              "completion_tokens": 662, "total_tokens": 707}}}),
     (45, 662, 0, 0, 707, "llama-3.3-70b-versatile")),
    ("azure empty first chunk and trailing filter chunks",
     sse(AZURE_FIRST, chunk("gpt-5-nano-2025-08-07"), AZURE_TRAILER,
         {"choices": [], "created": 1, "id": "c", "model": "gpt-5-nano-2025-08-07", "object": "chat.completion.chunk",
          "usage": {"completion_tokens": 78, "completion_tokens_details": {"reasoning_tokens": 64},
                    "prompt_tokens": 15, "prompt_tokens_details": {"cached_tokens": 0}, "total_tokens": 93}}),
     (15, 78, 0, 64, 93, "gpt-5-nano-2025-08-07")),
    ("deepseek cache hits on the finish chunk",
     sse(chunk("deepseek-chat", usage=None),
         {"model": "deepseek-chat", "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "length"}],
          "usage": {"prompt_tokens": 13, "completion_tokens": 400, "total_tokens": 413,
                    "prompt_cache_hit_tokens": 5, "prompt_cache_miss_tokens": 8}}),
     (13, 400, 5, 0, 413, "deepseek-chat")),
    ("xai reasoning outside completion",
     sse(chunk("grok-3-mini"), chunk("grok-3-mini", None, usage={
         "prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 354,
         "prompt_tokens_details": {"text_tokens": 12, "cached_tokens": 11},
         "completion_tokens_details": {"reasoning_tokens": 340}, "num_sources_used": 0})),
     (12, 342, 11, 340, 354, "grok-3-mini")),
    ("llama.cpp usage chunk sent unasked",
     sse(chunk("gemma-3-1b-it"), chunk("gemma-3-1b-it", None, usage={
         "completion_tokens": 31, "prompt_tokens": 75, "total_tokens": 106}, timings={"predicted_ms": 1.5})),
     (75, 31, 0, 0, 106, "gemma-3-1b-it")),
    ("ollama", sse(chunk("llama3.2"), chunk("llama3.2", None, usage={
        "prompt_tokens": 26, "completion_tokens": 9, "total_tokens": 35})),
     (26, 9, 0, 0, 35, "llama3.2")),
]


@pytest.mark.parametrize("name,reply,expected", SHAPES, ids=[s[0] for s in SHAPES])
def test_provider_stream_shapes(upstream: FakeUpstream, proxy: ProxyServer, name: str, reply: bytes,
                                expected: tuple[Any, ...]) -> None:
    upstream.sse(reply, chunk_size=23)
    status, _, got = request(proxy.url, body=body("/v1/chat/completions", stream=True))
    assert (status, got) == (200, reply)
    row = proxy.rows()[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"], row["reasoning_tokens"],
            row["total_tokens"], row["model"]) == expected
    assert row["usage_source"] == "upstream"
