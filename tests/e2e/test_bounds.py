"""Memory bounds through a real proxy, whatever the upstream or the client sends: decompression bombs, endless
SSE lines, bodies from callers who fail authentication, /metrics, and the inject edit on streams the upstream
framed or compressed against the request. (The same bounds measured on a real process: test_bounds_process.py;
the decoders', the SSE decoder's and the metrics' own bounds, called directly: tests/forwarding/test_decoding.py,
tests/metering/test_sse.py, tests/metering/test_metrics.py.)"""

from __future__ import annotations

import gzip
import json
import socket
import zlib
from typing import Any, Callable

import brotli
import pytest

from tests.support import ADMIN_TOKEN, FakeUpstream, ProxyServer, Reply, split
from tests.support.http import request
from tests.support.streams import CHAT, openai_like

MiB = 1 << 20
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda b: gzip.compress(b, compresslevel=9, mtime=0),
    "deflate": lambda b: zlib.compress(b, 9),
    "br": lambda b: brotli.compress(b, quality=5),
}


def zeros_body(size: int) -> bytes:
    """A JSON chat completion padded with `size` spaces: it compresses ~1000:1."""
    return b'{"model":"gpt-4o","usage":' + json.dumps(USAGE).encode() + b"," + b" " * size + b'"x":1}'


# --- through the proxy: the bytes flow, metering stops, the row says so ------------------------------
@pytest.mark.parametrize("encoding", sorted(COMPRESS))
def test_a_compressed_bomb_reaches_the_client_unchanged_and_the_row_says_metering_stopped(
        encoding: str, upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(max_meter_bytes=MiB)
    bomb = COMPRESS[encoding](zeros_body(32 * MiB))
    upstream.reply(Reply(headers={"Content-Type": "application/json", "Content-Encoding": encoding},
                         chunks=split(bomb, 16 * 1024)))
    status, headers, got = request(proxy.url, headers={"Accept-Encoding": encoding})
    assert status == 200 and got == bomb and headers["Content-Encoding"] == encoding
    row = proxy.rows()[-1]
    assert row["usage_note"] is not None and "max_meter_bytes (1048576 bytes)" in row["usage_note"]
    assert row["usage_source"] == "none" and "metering stopped" in row["error"]


def test_managed_compressed_bomb_is_cut_not_decoded_forever(upstream: FakeUpstream,
                                                            start_proxy: Callable[..., ProxyServer]) -> None:
    # Managed mode watches a compressed body's decoded copy for the real key: past the cap it cannot, and cuts.
    import http.client

    proxy = start_proxy(keys="managed", upstream_api_key="sk-real-upstream-key-0123", max_meter_bytes=MiB)
    status, _, raw = request(proxy.url, path="/admin/keys", body=json.dumps({"user": "u"}).encode(),
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 201
    key = json.loads(raw)["key"]
    bomb = COMPRESS["gzip"](zeros_body(32 * MiB))
    upstream.reply(Reply(headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                         chunks=split(bomb, 16 * 1024)))
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": "gpt-4o"}),
                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                          "Accept-Encoding": "gzip"})
    got = b""
    try:
        resp = conn.getresponse()
        got = resp.read()
    except (http.client.HTTPException, ConnectionError):
        pass  # broken off: what a cut is
    finally:
        conn.close()
    assert len(got) < len(bomb)
    row = proxy.rows()[-1]
    assert "the upstream key could not be watched for" in row["error"]
    assert "max_meter_bytes" in row["usage_note"]


def test_a_body_under_the_cap_is_still_metered(upstream: FakeUpstream,
                                               start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(max_meter_bytes=MiB)
    body = gzip.compress(zeros_body(MiB // 2))
    upstream.reply(Reply(headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                         chunks=split(body, 4096)))
    status, _, got = request(proxy.url, headers={"Accept-Encoding": "gzip"})
    assert status == 200 and got == body
    row = proxy.rows()[-1]
    assert (row["usage_source"], row["prompt_tokens"], row["usage_note"]) == ("upstream", 10, None)


def test_an_endless_sse_line_flows_to_the_client_and_metering_stops(
        upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(max_meter_bytes=MiB)
    head = b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    line = b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"' + b"z" * (3 * MiB) + b'"}}]}\n\n'
    tail = b'data: {"model":"gpt-4o","choices":[],"usage":' + json.dumps(USAGE).encode() + b"}\n\ndata: [DONE]\n\n"
    body = head + line + tail
    upstream.sse(body, chunk_size=64 * 1024)
    status, _, got = request(proxy.url, body=json.dumps({**CHAT, "stream": True}).encode())
    assert status == 200 and got == body
    row = proxy.rows()[-1]
    assert row["usage_note"] is not None and "metering stopped" in row["usage_note"]
    assert row["usage_source"] == "none"


def test_a_stream_past_the_cap_still_ends_only_after_its_row_is_committed(
        upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer]) -> None:
    import http.client

    proxy = start_proxy(max_meter_bytes=MiB)
    big = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"z" * (2 * MiB) + b'"}}]}\n\n'
    body = big + b"data: [DONE]\n\n"
    # The upstream keeps the connection open a while after [DONE]: the row can only be committed at its end.
    upstream.reply(Reply(headers={"Content-Type": "text/event-stream"}, chunks=[*split(big, 256 * 1024),
                                                                               b"data: [DONE]\n\n"],
                         pause_after=1.0))
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**CHAT, "stream": True}),
                 headers={"Authorization": "Bearer sk-test-key-0001", "Content-Type": "application/json"})
    resp = conn.getresponse()
    got = b""
    while not got.endswith(b"data: [DONE]\n\n"):
        piece = resp.read1(65536)
        assert piece, "the stream ended early"
        got += piece
    rows = proxy.rows()  # the client has [DONE]: its row is already there
    conn.close()
    assert got == body
    assert len(rows) == 1 and "metering stopped" in rows[0]["usage_note"]


# --- callers who fail authentication ----------------------------------------------------------------
def test_an_invalid_managed_key_is_refused_before_its_body_is_read(
        upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(keys="managed", upstream_api_key="sk-real-upstream")
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # Announce 30 MiB and send 1 KiB: the answer must come without the rest (it never comes).
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer mp-nope-0000\r\n"
                     b"Content-Type: application/json\r\nX-Meter-Colour: red\r\nContent-Length: 31457280\r\n\r\n"
                     + b"{" + b" " * 1023)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b'"code": "invalid_api_key"' in answer or b'"code":"invalid_api_key"' in answer
    assert upstream.seen == []
    row = proxy.rows()[-1]
    assert row["status"] == 401 and json.loads(row["tags"] or "{}") == {}


def test_refused_unauthenticated_calls_store_no_tags(upstream: FakeUpstream,
                                                     start_proxy: Callable[..., ProxyServer]) -> None:
    junk = {f"X-Meter-T{i}": "v" * 200 for i in range(30)}
    managed = start_proxy(keys="managed", upstream_api_key="sk-real-upstream")
    assert request(managed.url, headers={"Authorization": "Bearer mp-unknown-key-1234", **junk})[0] == 401
    assert json.loads(managed.rows()[-1]["tags"] or "{}") == {}
    # Passthrough: the upstream refuses the key; the row is kept, its tags are not.
    passthrough = start_proxy()
    upstream.json({"error": {"message": "Incorrect API key", "type": "invalid_request_error",
                             "code": "invalid_api_key", "param": None}}, status=401)
    assert request(passthrough.url, headers=junk)[0] == 401
    assert json.loads(passthrough.rows()[-1]["tags"] or "{}") == {}
    upstream.json({"model": "gpt-4o", "usage": USAGE})  # an authenticated call keeps its tags
    assert request(passthrough.url, headers={"X-Meter-Colour": "red"})[0] == 200
    assert json.loads(passthrough.rows()[-1]["tags"]) == {"colour": "red"}


def test_a_large_body_is_read_the_same_when_parsed_in_a_thread(openai_upstream: FakeUpstream,
                                                               start_proxy: Callable[..., ProxyServer]) -> None:
    # Over 256 KiB the body is parsed (and the include_usage edit made) off the event loop: same outcome.
    proxy = start_proxy(stream_usage="inject")
    req = {**CHAT, "messages": [{"role": "user", "content": "日本" * 300_000}], "user": "big-body"}
    sent = json.dumps(req, ensure_ascii=False).encode()
    assert len(sent) > 1_000_000
    status, _, got = request(proxy.url, body=sent)
    assert status == 200 and got == openai_like(sent)
    seen = openai_upstream.seen[-1]
    assert seen.headers["Content-Length"] == str(len(seen.body)) and "Transfer-Encoding" not in seen.headers
    forwarded = json.loads(seen.body)
    assert forwarded.pop("stream_options") == {"include_usage": True} and forwarded == req
    row = proxy.rows()[-1]
    assert (row["requested_model"], row["user"], row["usage_source"]) == ("gpt-4o-mini", "big-body", "upstream")


# --- /metrics --------------------------------------------------------------------------------------
def test_metrics_needs_the_admin_token_unless_public(upstream: FakeUpstream,
                                                      start_proxy: Callable[..., ProxyServer]) -> None:
    guarded = start_proxy()
    status, _, body = request(guarded.url, method="GET", path="/metrics", body=None)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_admin_token"
    status, _, body = request(guarded.url, method="GET", path="/metrics", body=None,
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200 and b"meterproxy_requests" in body
    public = start_proxy(metrics_public=True)
    status, _, body = request(public.url, method="GET", path="/metrics", body=None, headers={"Authorization": ""})
    assert status == 200 and b"meterproxy_requests" in body


# --- stream_usage: inject on streams the upstream framed or compressed against the request ------------
def _inject_reply(body: bytes, **kw: Any) -> Reply:
    return Reply(headers={"Content-Type": "text/event-stream", **kw.pop("headers", {})}, **kw)


def test_inject_with_content_length_on_the_stream(upstream: FakeUpstream,
                                                  start_proxy: Callable[..., ProxyServer]) -> None:
    upstream.handler = lambda body: _inject_reply(body, chunks=split(openai_like(body), 9), content_length=True)
    proxy = start_proxy(stream_usage="inject")
    sent = json.dumps(CHAT).encode()
    status, headers, got = request(proxy.url, body=sent)
    assert status == 200 and got == openai_like(sent)
    assert headers.get("Content-Length") in (None, str(len(got)))
    row = proxy.rows()[-1]
    assert (row["usage_source"], row["prompt_tokens"]) == ("upstream", 21)


@pytest.mark.parametrize("encoding", sorted(COMPRESS))
@pytest.mark.parametrize("content_length", [False, True])
def test_inject_on_a_stream_compressed_against_identity(encoding: str, content_length: bool,
                                                        upstream: FakeUpstream,
                                                        start_proxy: Callable[..., ProxyServer]) -> None:
    upstream.handler = lambda body: _inject_reply(body, headers={"Content-Encoding": encoding},
                                                  chunks=split(COMPRESS[encoding](openai_like(body)), 11),
                                                  content_length=content_length)
    proxy = start_proxy(stream_usage="inject")
    sent = json.dumps(CHAT).encode()
    status, headers, got = request(proxy.url, body=sent, headers={"Accept-Encoding": encoding})
    assert upstream.seen[-1].headers["Accept-Encoding"] == "identity"
    # The client gets the stream it would have got without the option, as plain bytes, said to be plain.
    assert status == 200 and got == openai_like(sent)
    assert "Content-Encoding" not in headers and headers.get("Content-Length") in (None, str(len(got)))
    row = proxy.rows()[-1]
    assert (row["usage_source"], row["prompt_tokens"], row["completion_tokens"]) == ("upstream", 21, 3)
