"""The forwarding core, end to end over real loopback HTTP: what the client gets is what the upstream sent."""

from __future__ import annotations

import http.client
import json
import socket
import time
import zlib
from typing import Callable

import brotli
import pytest

from tests.support import FakeUpstream, ProxyServer, Reply, gzipped, split
from tests.support.http import CHAT_REQUEST, request

CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi é 日本"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 14, "completion_tokens": 3, "total_tokens": 17}}


def test_json_body_status_and_headers_pass_through(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    body = upstream.json(CHAT, headers={"X-Request-Id": "req-123", "openai-processing-ms": "42"})
    status, headers, got = request(proxy.url)
    assert status == 200
    assert got == body
    assert headers["X-Request-Id"] == "req-123"
    assert headers["openai-processing-ms"] == "42"
    assert headers["Content-Type"] == "application/json"


def test_request_forwarded_byte_for_byte_with_query_and_prefix(upstream: FakeUpstream,
                                                               start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(upstream=upstream.url + "/openai")
    upstream.json(CHAT)
    raw = b'{"model":"gpt-4o",  "messages":[{"role":"user","content":"x"}],"user":"u\\u00e9"}'
    status, _, _ = request(proxy.url, path="/v1/chat/completions?api-version=2024-10-21&x=%2F",
                           body=raw, headers={"X-Meter-User": "alice", "X-Meter-Team": "blue",
                                              "Accept-Encoding": "gzip", "OpenAI-Organization": "org-1"})
    assert status == 200
    seen = upstream.seen[-1]
    assert seen.body == raw
    assert seen.path_qs == "/openai/v1/chat/completions?api-version=2024-10-21&x=%2F"
    assert seen.headers["Authorization"] == "Bearer sk-test-key-0001"
    assert seen.headers["OpenAI-Organization"] == "org-1"
    assert seen.headers["Accept-Encoding"] == "gzip"
    assert not [k for k in seen.headers if k.lower().startswith("x-meter-")]
    # Nothing added that the client did not send.
    assert "User-Agent" not in seen.headers


@pytest.mark.parametrize("encoding,encode", [("gzip", gzipped), ("br", brotli.compress),
                                             ("deflate", zlib.compress)])
def test_compressed_body_reaches_client_compressed_and_is_metered(
        upstream: FakeUpstream, proxy: ProxyServer, encoding: str, encode: Callable[[bytes], bytes]) -> None:
    plain = json.dumps(CHAT).encode()
    wire = encode(plain)
    upstream.reply(Reply(headers={"Content-Type": "application/json", "Content-Encoding": encoding},
                         chunks=split(wire, 7)))
    status, headers, got = request(proxy.url, headers={"Accept-Encoding": encoding})
    assert status == 200
    assert headers["Content-Encoding"] == encoding
    assert got == wire
    row = proxy.rows()[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (14, 3, "upstream")


def test_sse_relayed_unchanged_under_awkward_splits(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    events = [
        {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": "é日本"}, "finish_reason": None}]},
        {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": [],
         "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}},
    ]
    body = b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\r\n\r\n" for e in events)
    body = b": keep-alive\n\n" + body + b"data: [DONE]\r\n\r\n"
    # Split inside a UTF-8 character, inside "data:", between \r and \n, inside [DONE].
    cut_utf8 = body.index("日".encode()) + 1
    cut_done = body.index(b"[DONE]") + 3
    cuts = [3, 20, cut_utf8, body.index(b"\r\n") + 1, cut_done]
    upstream.sse(body, splits=cuts, pause=0.01)
    status, headers, got = request(proxy.url)
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert got == body
    row = proxy.rows()[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["model"], row["stream"]) == (9, 2, "gpt-4o-mini", 1)


@pytest.mark.parametrize("status,body,ctype,message", [
    (400, b'{"error": {"message": "bad model", "type": "invalid_request_error", "param": "model", "code": null}}',
     "application/json", "bad model"),
    (429, b'{"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}',
     "application/json", "Rate limit reached"),
    (503, b"<html>upstream overloaded</html>", "text/html", "<html>upstream overloaded</html>"),
    (500, b"", "text/plain", None),
])
def test_upstream_errors_pass_through_and_are_recorded(upstream: FakeUpstream, proxy: ProxyServer, status: int,
                                                       body: bytes, ctype: str, message: str | None) -> None:
    upstream.reply(Reply(status=status, headers={"Content-Type": ctype}, chunks=[body] if body else [],
                         content_length=True))
    got_status, _, got = request(proxy.url)
    assert (got_status, got) == (status, body)
    row = proxy.rows()[-1]
    assert row["status"] == status
    assert row["error"] == message
    assert row["usage_source"] == "none" and row["cost_usd"] == "0"


def test_dead_upstream_gives_502_in_openai_shape(start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(upstream="http://127.0.0.1:9")  # discard port: nothing listens
    status, headers, got = request(proxy.url)
    assert status == 502
    err = json.loads(got)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Upstream unreachable" in err["message"] and err["code"] == "upstream_unreachable"
    row = proxy.rows()[-1]
    assert row["status"] == 502 and "unreachable" in row["error"] and row["requested_model"] == "gpt-4o"


def test_slow_upstream_gives_504_and_a_row(upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(first_byte_timeout=0.3)
    upstream.reply(Reply(pause_before=2.0, chunks=[b"{}"], headers={"Content-Type": "application/json"}))
    t0 = time.monotonic()
    status, _, got = request(proxy.url)
    assert status == 504 and time.monotonic() - t0 < 1.8
    assert json.loads(got)["error"]["code"] == "upstream_timeout"
    assert proxy.rows()[-1]["status"] == 504


def test_stream_breaking_off_ends_client_stream_without_done(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    first = b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hel"}}]}\n\n'
    upstream.reply(Reply(headers={"Content-Type": "text/event-stream"},
                         chunks=[first, b'data: {"model":"gpt-4o","choices":[]}\n\n', b"data: [DONE]\n\n"],
                         pause=0.05, break_after=1))
    with pytest.raises(http.client.IncompleteRead) as broken:
        request(proxy.url)
    assert broken.value.partial == first  # exactly what the upstream sent, and no [DONE]
    row = proxy.rows()[-1]
    assert row["status"] == 200 and "broke off" in row["error"]


@pytest.mark.parametrize("path", ["/admin/usage", "/v2/models", "/", "/healthz/x"])
def test_nothing_but_v1_reaches_upstream(upstream: FakeUpstream, proxy: ProxyServer, path: str) -> None:
    upstream.json(CHAT)
    status, _, got = request(proxy.url, method="GET", path=path, body=None)
    assert status in (401, 404)
    assert set(json.loads(got)["error"]) == {"message", "type", "param", "code"}
    assert upstream.seen == []


def test_get_models_forwarded_and_recorded(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    body = upstream.json({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]})
    status, _, got = request(proxy.url, method="GET", path="/v1/models", body=None)
    assert (status, got) == (200, body)
    assert upstream.seen[-1].method == "GET" and upstream.seen[-1].body == b""
    row = proxy.rows()[-1]
    assert (row["endpoint"], row["method"], row["priced"], row["usage_source"]) == ("/v1/models", "GET", 1, "none")


def test_healthz(proxy: ProxyServer) -> None:
    status, _, got = request(proxy.url, method="GET", path="/healthz", body=None)
    assert (status, json.loads(got)) == (200, {"status": "ok", "backend": "sqlite", "db": proxy.settings.db})


def test_request_too_large_gets_413(upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(max_request_bytes=1000)
    upstream.json(CHAT)
    status, _, got = request(proxy.url, body=b'{"model":"gpt-4o","x":"' + b"a" * 2000 + b'"}')
    assert status == 413
    assert json.loads(got)["error"]["code"] == "request_too_large"
    assert upstream.seen == []


def raw_exchange(url: str, request_line_target: str) -> tuple[bytes, bytes]:
    """Send a request line exactly as given (http.client would normalise it) and return (status line, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {request_line_target} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
                     .encode())
        data = b""
        while part := sock.recv(65536):
            data += part
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


@pytest.mark.parametrize("target,status,upstream_path", [
    ("/v1/../admin/usage", b"400", None),
    ("/v1/%2e%2e/%2E%2E/x", b"400", None),
    ("/v1/a/../../../x", b"400", None),
    ("/v1/./models", b"400", None),
    ("//admin/usage", b"404", None),
    ("/v1%2f..%2fadmin/usage", b"404", None),
    ("http://evil.example/v1/models", b"200", "/openai/v1/models"),
    ("/v1/models?after=../../y", b"200", "/openai/v1/models?after=../../y"),
    # An encoded slash could be decoded into another route upstream: refused, never forwarded.
    ("/v1/files/file-%2Fabc/content", b"400", None),
    ("/v1/models/ft%3Agpt-4o%3Aacme", b"200", "/openai/v1/models/ft%3Agpt-4o%3Aacme"),
])
def test_paths_never_leave_the_upstream_base(upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer],
                                             target: str, status: bytes, upstream_path: str | None) -> None:
    proxy = start_proxy(upstream=upstream.url + "/openai")
    upstream.json({"object": "list", "data": []})
    status_line, body = raw_exchange(proxy.url, target)
    assert status_line.split(b" ")[1] == status
    if upstream_path is None:
        assert upstream.seen == []
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    else:
        assert [s.path_qs for s in upstream.seen] == [upstream_path]


def test_headers_match_a_direct_call(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.reply(Reply(headers={"Content-Type": "application/json; charset=utf-8", "Set-Cookie": "a=1",
                                  "x-ratelimit-remaining-tokens": "999", "Cache-Control": "no-store"},
                         chunks=[b"{}"], content_length=True))

    def headers(url: str) -> list[tuple[str, str]]:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", "/v1/models")
            resp = conn.getresponse()
            resp.read()
            return [(k.lower(), v) for k, v in resp.getheaders() if k.lower() not in ("date", "connection")]
        finally:
            conn.close()

    assert headers(proxy.url) == headers(upstream.url)


def test_client_gone_mid_stream_is_recorded_as_499(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    events = [b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"t"}}]}\n\n'] * 40
    upstream.reply(Reply(headers={"Content-Type": "text/event-stream"}, chunks=events + [b"data: [DONE]\n\n"],
                         pause=0.05))
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/chat/completions", body=CHAT_REQUEST, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.read1(65536).startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 5
    while not proxy.rows() and time.monotonic() < deadline:
        time.sleep(0.05)
    row = proxy.rows()[-1]
    assert row["status"] == 499 and "client disconnected" in row["error"]
    # The upstream call was dropped rather than read to the end: well under the 2 s the whole stream takes.
    assert row["latency_ms"] < 1500


def test_stream_chunks_arrive_as_the_upstream_sends_them(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    first = b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    upstream.reply(Reply(headers={"Content-Type": "text/event-stream"}, pause=1.0,
                         chunks=[first, b'data: {"model":"gpt-4o","choices":[]}\n\n', b"data: [DONE]\n\n"]))
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        t0 = time.monotonic()
        conn.request("POST", "/v1/chat/completions", body=CHAT_REQUEST, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.read1(65536) == first
        assert time.monotonic() - t0 < 0.9  # not held until the upstream's next chunk, a second later
        assert resp.read().endswith(b"data: [DONE]\n\n")
    finally:
        conn.close()
