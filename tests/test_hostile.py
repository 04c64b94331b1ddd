"""Hostile or broken input, end to end over loopback: a real fake upstream, the real proxy, raw sockets.

Whatever a client or an upstream sends — bodies that are not JSON or nest 100,000 deep, binary or
CR/LF-laden headers, duplicated keys, torn or lying SSE streams, absurd usage numbers — the proxy passes
the bytes through untouched, answers cleanly (never a 500, never a crash), records a row that says what
it could not read, keeps its ledger writing for the calls that follow, and never writes a raw key to
the database or the logs.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import socket
import sqlite3
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.ledger import Ledger, LedgerError
from proxy.record import CallRecord
from tests.support import FakeUpstream, ProxyServer, Reply, split

KEY = "sk-proj-hostile0123456789abcdefghijklmnopqrstuvwxyz"
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
CHAT = {"id": "c1", "object": "chat.completion", "model": "gpt-4o-2024-08-06", "usage": USAGE,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}
DELTA = b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
DONE = b"data: [DONE]\n\n"
DEEP = b"[" * 100_000 + b"]" * 100_000
MSGS = [{"role": "user", "content": "hi"}]


def key_id(key: str | bytes) -> str:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()[:16]


def exchange(url: str, headers: bytes = b"", body: bytes = b"{}", target: bytes = b"/v1/chat/completions",
             method: bytes = b"POST") -> tuple[int, dict[str, str], bytes]:
    """Send the request head exactly as given (http.client would refuse or normalise it); read the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     + b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body) + headers
                     + b"\r\n" + body)
        resp = http.client.HTTPResponse(sock, method=method.decode())
        resp.begin()
        return resp.status, dict(resp.getheaders()), resp.read()


def post(url: str, body: bytes, key: str = KEY) -> tuple[int, bytes]:
    status, _, got = exchange(url, b"Authorization: Bearer " + key.encode() + b"\r\n", body)
    return status, got


def new_rows(proxy: ProxyServer, before: int) -> list[dict[str, Any]]:
    return proxy.rows()[before:]


def assert_ledger_still_writes(proxy: ProxyServer, upstream: FakeUpstream) -> None:
    """A plain call after the hostile one still gets its row: nothing poisoned the ledger's writer."""
    before = len(proxy.rows())
    body = upstream.json(CHAT)
    assert post(proxy.url, json.dumps({"model": "gpt-4o", "messages": MSGS}).encode()) == (200, body)
    rows = new_rows(proxy, before)
    assert [(r["status"], r["prompt_tokens"], r["usage_source"]) for r in rows] == [(200, 5, "upstream")]


def assert_storable(row: dict[str, Any]) -> None:
    for name in ("user", "session", "operation", "tags", "model", "requested_model", "error", "key_hint"):
        if row[name] is not None:
            row[name].encode("utf-8")  # no lone surrogates: SQLite and the spool can hold it


def stored_bytes(proxy: ProxyServer) -> bytes:
    """Everything at rest: the database, its WAL, the spool."""
    db = Path(proxy.settings.db)
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}.spool.jsonl")) if p.exists())


# --- request bodies ----------------------------------------------------------------------------

def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "gpt-4o", "messages": MSGS, **fields}).encode()


BODIES = {
    "not json": b"this is not json {",
    "not utf-8": bytes(range(256)) * 4,
    "json list": b'[{"model": "gpt-4o", "messages": []}]',
    "json number": b"42",
    "100k nested arrays": DEEP,
    "100k nested messages": b'{"model":"gpt-4o","messages":' + DEEP + b"}",
    "1 MB model": chat(model="m" * 1_000_000),
    "stream is a string": chat(stream="true"),
    "messages a string": chat(messages="hello"),
    "messages of wrong types": chat(messages=[1, None, "x", {"role": 5, "content": {"a": [1]}}]),
    "messages an object": chat(messages={"role": "user"}, tools="none", n="2"),
    "lone surrogates": b'{"model":"gpt-4o\\ud800","user":"\\udc80x","messages":[{"role":"user","content":"\\ud83d"}]}',
    "utf-16": chat().decode().encode("utf-16"),
}


@pytest.mark.parametrize("name", list(BODIES))
def test_any_body_is_forwarded_byte_for_byte_and_recorded(upstream: FakeUpstream, proxy: ProxyServer,
                                                          name: str) -> None:
    body = BODIES[name]
    reply = upstream.json(CHAT)
    assert post(proxy.url, body) == (200, reply)
    assert upstream.seen[-1].body == body
    [row] = new_rows(proxy, 0)
    # The meter survived the body: the response's usage was read.
    assert (row["status"], row["prompt_tokens"], row["completion_tokens"], row["usage_source"], row["error"]) \
        == (200, 5, 2, "upstream", None)
    assert row["requested_model"] is None or len(row["requested_model"]) <= 256
    assert_storable(row)
    assert_ledger_still_writes(proxy, upstream)


@pytest.mark.parametrize("name", list(BODIES))
def test_any_body_with_a_streamed_answer_is_counted(upstream: FakeUpstream, proxy: ProxyServer, name: str) -> None:
    body = BODIES[name]
    stream = upstream.sse(DELTA + DONE)
    assert post(proxy.url, body) == (200, stream)
    assert upstream.seen[-1].body == body
    [row] = new_rows(proxy, 0)
    # No usage in the stream: counted, whatever the request looked like.
    assert (row["status"], row["stream"], row["usage_source"], row["completion_tokens"]) == (200, 1, "counted", 1)
    assert_storable(row)
    assert_ledger_still_writes(proxy, upstream)


def test_a_counted_call_whose_request_was_unreadable_says_so(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.sse(DELTA + DONE)
    assert post(proxy.url, b"this is not json")[0] == 200
    [row] = new_rows(proxy, 0)
    assert row["usage_source"] == "counted" and row["usage_note"] is not None


@pytest.fixture
def small_proxy(start_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    return start_proxy(max_request_bytes=1000)


def padded(size: int) -> bytes:
    head = b'{"model":"gpt-4o","messages":[],"pad":"'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def test_body_at_the_limit_is_forwarded(upstream: FakeUpstream, small_proxy: ProxyServer) -> None:
    reply = upstream.json(CHAT)
    body = padded(1000)
    assert post(small_proxy.url, body) == (200, reply)
    assert upstream.seen[-1].body == body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_gets_413_and_nothing_is_forwarded(upstream: FakeUpstream, small_proxy: ProxyServer,
                                                               chunked: bool) -> None:
    upstream.json(CHAT)
    body = padded(1001)
    host, port = small_proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        if chunked:
            conn.request("POST", "/v1/chat/completions", body=iter(split(body, 100)), headers=headers,
                         encode_chunked=True)
        else:
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        resp = conn.getresponse()
        status, got = resp.status, resp.read()
    finally:
        conn.close()
    assert status == 413
    err = json.loads(got)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "request_too_large"
    assert upstream.seen == []
    assert_ledger_still_writes(small_proxy, upstream)


def test_body_over_the_limit_is_recorded(upstream: FakeUpstream, small_proxy: ProxyServer) -> None:
    assert post(small_proxy.url, padded(1001))[0] == 413
    [row] = new_rows(small_proxy, 0)
    assert row["status"] == 413 and row["key_id"] == key_id(KEY)


# --- headers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [
    b"X-Custom: " + b"a" * 20_000,
    b"X-Meter-Tag: " + b"t" * 100_000,
    b"Authorization: Bearer " + KEY.encode() * 400,
    b"".join(b"X-Meter-T%d: v\r\n" % i for i in range(1000))[:-2],
], ids=["20 KB header", "100 KB X-Meter-Tag", "20 KB key", "1000 X-Meter headers"])
def test_oversized_headers_get_a_clean_4xx(upstream: FakeUpstream, proxy: ProxyServer, header: bytes) -> None:
    upstream.json(CHAT)
    status, _, _ = exchange(proxy.url, header + b"\r\n")
    assert 400 <= status < 500
    assert upstream.seen == []
    assert_ledger_still_writes(proxy, upstream)


def test_meter_values_and_tags_are_bounded(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.json(CHAT)
    many = b"".join(b"X-Meter-T%03d: v%d\r\n" % (i, i) for i in range(100))
    long = b"X-Meter-User: " + b"u" * 8000 + b"\r\nX-Meter-Tag: " + b"t" * 8000 + b"\r\n"
    status, _, _ = exchange(proxy.url, many + long)
    assert status == 200
    [row] = new_rows(proxy, 0)
    tags = json.loads(row["tags"])
    assert len(tags) == 32 and len(row["user"]) == 256
    assert all(len(v) <= 256 for v in tags.values())
    assert not [k for k, _ in upstream.seen[-1].header_items if k.lower().startswith("x-meter-")]


@pytest.mark.parametrize("auth", [
    [b"Authorization: Bearer sk-first-aaaaaaaaaaaa", b"Authorization: Bearer sk-second-bbbbbbbbbbbb"],
    [b"api-key: sk-first-aaaaaaaaaaaa", b"api-key: sk-second-bbbbbbbbbbbb"],
    [b"Authorization: Bearer sk-first-aaaaaaaaaaaa", b"api-key: sk-second-bbbbbbbbbbbb"],
], ids=["Authorization twice", "api-key twice", "Authorization and api-key"])
def test_two_different_keys_are_refused(upstream: FakeUpstream, proxy: ProxyServer, auth: list[bytes]) -> None:
    # Which one would the upstream bill? Neither is guessed: the request is refused, recorded, never forwarded.
    upstream.json(CHAT)
    status, _, body = exchange(proxy.url, b"".join(line + b"\r\n" for line in auth))
    assert status == 400 and json.loads(body)["error"]["code"] == "ambiguous_credentials"
    assert upstream.seen == []
    [row] = new_rows(proxy, 0)
    assert row["status"] == 400
    stored = stored_bytes(proxy)
    assert b"sk-first-aaaaaaaaaaaa" not in stored and b"sk-second-bbbbbbbbbbbb" not in stored


def test_the_same_key_twice_is_forwarded_once(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.json(CHAT)
    line = b"Authorization: Bearer sk-first-aaaaaaaaaaaa\r\n"
    status, _, _ = exchange(proxy.url, line + line)
    assert status == 200
    [row] = new_rows(proxy, 0)
    assert row["key_id"] == key_id("sk-first-aaaaaaaaaaaa")
    assert [v for k, v in upstream.seen[-1].header_items if k.lower() == "authorization"] == [
        "Bearer sk-first-aaaaaaaaaaaa"]


@pytest.mark.parametrize("target,header", [
    (b"/v1/chat/completions", b"X-Meter-User: alice\rInjected: yes"),
    (b"/v1/chat/completions", b"X-Custom: a\nInjected: yes"),
    (b"/v1/chat/completions", b"X-Custom: a\r\n Injected: yes"),  # obsolete line folding
    (b"/v1/chat/completions", b"X-Custom: a\x00Injected: yes"),
    (b"/v1/chat/completions%0d%0aInjected:%20yes", b"X-Custom: a"),
], ids=["bare CR", "bare LF", "obs-fold", "NUL", "encoded CRLF in path"])
def test_cr_lf_never_splits_into_a_forwarded_header(upstream: FakeUpstream, proxy: ProxyServer, target: bytes,
                                                    header: bytes) -> None:
    upstream.json(CHAT)
    status, _, _ = exchange(proxy.url, header + b"\r\n", target=target)
    assert status < 500
    for seen in upstream.seen:
        assert "injected" not in {k.lower() for k, _ in seen.header_items}
        assert not any(c in v for _, v in seen.header_items for c in "\r\n\0")
    if status >= 400:
        assert upstream.seen == []
    assert_ledger_still_writes(proxy, upstream)


@pytest.mark.parametrize("header", [
    b"X-Meter-User: caf\xe9 \xff\xfe\x80 bob",
    b"X-Meter-Session: \xc3\x28\xa0\xa1",
    b"X-Meter-Operation: " + bytes(range(0x80, 0x100)) * 2,
    b"X-Meter-T\xe9am: blue",
    b"X-Meter-Team: " + b"\xe9" * 300,
], ids=["latin-1 user", "broken utf-8 session", "300 high bytes operation", "binary tag name", "300 bytes tag"])
def test_binary_meter_headers_are_stored_safely_and_bounded(upstream: FakeUpstream, proxy: ProxyServer,
                                                            header: bytes) -> None:
    upstream.json(CHAT)
    status, _, _ = exchange(proxy.url, header + b"\r\n")
    if status >= 400:  # the HTTP parser may refuse the header outright; then nothing is forwarded
        assert status < 500 and upstream.seen == []
    else:
        assert status == 200
        [row] = new_rows(proxy, 0)
        assert_storable(row)
        values = [row["user"], row["session"], row["operation"], *json.loads(row["tags"]).values()]
        assert all(v is None or len(v) <= 256 for v in values)
        assert any(v for v in values), "the header was attributed"
    assert_ledger_still_writes(proxy, upstream)


def test_binary_key_is_attributed_as_the_upstream_receives_it(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.json(CHAT)
    raw_key = b"sk-\xff\xfe\xe9-binary-0123456789"
    status, _, _ = exchange(proxy.url, b"Authorization: Bearer " + raw_key + b"\r\n")
    assert status == 200
    [row] = new_rows(proxy, 0)
    received = upstream.seen[-1].headers["Authorization"].removeprefix("Bearer ")
    assert row["key_id"] == key_id(received.encode("utf-8", "surrogateescape"))
    assert_storable(row)
    assert_ledger_still_writes(proxy, upstream)


# --- responses ---------------------------------------------------------------------------------

def usage_event(usage: object) -> bytes:
    return b'data: {"model":"gpt-4o","choices":[],"usage":' + json.dumps(usage).encode() + b"}\n\n"


GOOD_USAGE = usage_event({"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
STREAMS: dict[str, tuple[bytes, str | None, int | None]] = {
    # name: (upstream body, text the row's error must hold, provider prompt tokens the row must hold)
    "garbage bytes": (bytes(range(256)) * 3, "no events", None),
    "garbage then usage": (b"\xff\xfe\x00garbage\n\n" + DELTA + GOOD_USAGE + DONE, None, 3),
    "last event without blank line": (DELTA + GOOD_USAGE[:-2], None, 3),
    "[DONE] without blank line": (DELTA + GOOD_USAGE + DONE[:-2], None, 3),
    "NUL bytes": (DELTA.replace(b"hi", b"h\x00i") + b"\x00\x00data: \x00\n\n" + GOOD_USAGE + DONE, None, 3),
    "NUL bytes, no usage": (DELTA.replace(b"hi", b"h\x00i") + b"data: \x00\n\n" + DONE, "not JSON", None),
    "invalid JSON in data": (b"data: {not json\n\n" + DELTA + DONE, "not JSON", None),
    # Usage read after a bad event: the call's figures are good, so the row carries no error.
    "100k nested arrays in data": (b"data: " + DEEP + b"\n\n" + DELTA + GOOD_USAGE + DONE, None, 3),
    "usage with wrong types": (DELTA + usage_event({"prompt_tokens": "3", "completion_tokens": [1]}) + DONE,
                               "unreadable usage", None),
    "negative usage": (DELTA + usage_event({"prompt_tokens": -3, "completion_tokens": 1}) + DONE,
                       "unreadable usage", None),
    "2**70 tokens": (DELTA + usage_event({"prompt_tokens": 2**70, "completion_tokens": 1}) + DONE,
                     "unreadable usage", None),
    "1e400 and NaN tokens": (DELTA + b'data: {"choices":[],"usage":{"prompt_tokens":1e400,"completion_tokens":NaN}}'
                             b"\n\n" + DONE, "unreadable usage", None),
    "usage is a list": (DELTA + usage_event([1, 2]) + DONE, "unreadable usage", None),
    "lone surrogates": (b'data: {"model":"gpt\\ud800","choices":[],"error":{"message":"\\udc80 bad"}}\n\n' + DONE,
                        "bad", None),
}


@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("name", list(STREAMS))
def test_broken_streams_pass_through_untouched_and_are_recorded(upstream: FakeUpstream, proxy: ProxyServer,
                                                                name: str, chunk_size: int | None) -> None:
    body, error, prompt = STREAMS[name]
    upstream.sse(body, chunk_size=chunk_size)
    assert post(proxy.url, chat(stream=True)) == (200, body)
    [row] = new_rows(proxy, 0)
    assert row["status"] == 200 and row["stream"] == 1
    if error is None:
        assert row["error"] is None
    else:
        assert error in (row["error"] or "")
    if prompt is not None:
        assert (row["prompt_tokens"], row["usage_source"]) == (prompt, "upstream")
    else:
        assert row["usage_source"] == "counted"
    assert_storable(row)
    assert_ledger_still_writes(proxy, upstream)


def test_done_in_the_middle_then_more_events(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    first = DELTA + DONE
    body = first + DELTA + GOOD_USAGE + DONE
    # The upstream pauses after the first [DONE]: the proxy commits there, then passes the rest on as is.
    upstream.sse(body, splits=[len(first)], pause=0.2)
    assert post(proxy.url, chat(stream=True)) == (200, body)
    [row] = new_rows(proxy, 0)
    assert row["status"] == 200 and row["usage_source"] in ("counted", "upstream")
    assert_ledger_still_writes(proxy, upstream)


TEN_MB = json.dumps("x" * 10_000_000).encode()
JSON_BODIES: dict[str, tuple[bytes, str]] = {
    "a 10 MB JSON string": (TEN_MB, "not a JSON object"),
    "not JSON": (b"\xff\xfe <html>oops", "not JSON"),
    "100k nested arrays": (b'{"usage":' + DEEP + b"}", "not JSON"),
    "2**70 tokens": (json.dumps({**CHAT, "usage": {"prompt_tokens": 2**70, "completion_tokens": 1}}).encode(),
                     "unreadable usage"),
    "negative tokens": (json.dumps({**CHAT, "usage": {"prompt_tokens": -1, "completion_tokens": 1}}).encode(),
                        "unreadable usage"),
    "wrong types": (json.dumps({**CHAT, "usage": {"prompt_tokens": [1], "completion_tokens": {}}}).encode(),
                    "unreadable usage"),
}


@pytest.mark.parametrize("name", list(JSON_BODIES))
def test_broken_json_bodies_pass_through_untouched_and_are_recorded(upstream: FakeUpstream, proxy: ProxyServer,
                                                                    name: str) -> None:
    body, error = JSON_BODIES[name]
    upstream.reply(Reply(headers={"Content-Type": "application/json"}, chunks=split(body, 1 << 20),
                         content_length=True))
    assert post(proxy.url, chat()) == (200, body)
    [row] = new_rows(proxy, 0)
    assert row["status"] == 200 and error in (row["error"] or "")
    assert row["usage_source"] == "counted"  # the provider's figure was unreadable: ours instead
    assert_ledger_still_writes(proxy, upstream)


# --- the ledger's last line of defence --------------------------------------------------------

@pytest.mark.parametrize("field,value", [("user", "\udc80"), ("prompt_tokens", 2**63)], ids=["surrogate", "2**63"])
async def test_one_unstorable_row_does_not_stop_the_ledger(tmp_path: Path, field: str, value: object) -> None:
    ledger = Ledger(tmp_path / "l.db", spool_path=tmp_path / "l.spool.jsonl", retry_interval=0.05)
    await ledger.open()
    try:
        bad = CallRecord(request_id="bad", started_at=1.0, method="POST", endpoint="/v1/chat/completions")
        setattr(bad, field, value)
        try:
            await ledger.record(bad)  # refusing this one row is fine; storing it cleaned up is fine too
        except LedgerError:
            pass
        await ledger.record(CallRecord(request_id="good", started_at=2.0, method="POST",
                                       endpoint="/v1/chat/completions"))
        assert ledger.accepting
    finally:
        await ledger.close()
    conn = sqlite3.connect(tmp_path / "l.db")
    try:
        assert "good" in {r for (r,) in conn.execute("SELECT request_id FROM calls")}
    finally:
        conn.close()


# --- logs --------------------------------------------------------------------------------------

def log_text(records: list[logging.LogRecord]) -> Iterator[str]:
    for record in records:
        yield record.getMessage()
        yield repr(record.args)
        if record.exc_info:
            yield "".join(traceback.format_exception(*record.exc_info))
        if record.exc_text:
            yield record.exc_text
        if record.stack_info:
            yield record.stack_info


def assert_no_key_in(records: list[logging.LogRecord], key: str) -> None:
    for text in log_text(records):
        assert key not in text and key[-20:] not in text


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)  # the root logger: "meterproxy", aiohttp's, asyncio's, aiosqlite's
    return caplog


def test_raw_key_never_reaches_the_logs(upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer],
                                        tmp_path: Path, all_logs: pytest.LogCaptureFixture) -> None:
    proxy = start_proxy(stream_usage="inject", accuracy_sample_rate=1.0)
    auth = b"Authorization: Bearer " + KEY.encode() + b"\r\n"
    azure = b"api-key: " + KEY.encode() + b"\r\n"
    upstream.json(CHAT)
    assert exchange(proxy.url, auth, chat())[0] == 200
    assert exchange(proxy.url, azure, chat())[0] == 200
    # Inputs that made a meter raise before (a lone surrogate re-encoded for injection, 100k nesting).
    upstream.sse(DELTA + DONE)
    body = b'{"model":"gpt-4o","stream":true,"stream_options":{"x":1},"messages":"\\ud800"}'
    assert exchange(proxy.url, auth, body)[0] == 200
    assert exchange(proxy.url, auth, b'{"stream":true,"messages":' + DEEP + b"}")[0] == 200
    # The upstream breaks off mid-stream.
    upstream.reply(Reply(headers={"Content-Type": "text/event-stream"}, chunks=[DELTA, DELTA, DONE],
                         break_after=1))
    with pytest.raises(http.client.IncompleteRead):
        exchange(proxy.url, auth, chat(stream=True))
    # A dead upstream.
    dead = start_proxy(upstream="http://127.0.0.1:9", db=str(tmp_path / "dead.db"))
    assert exchange(dead.url, auth, chat())[0] == 502
    assert all_logs.records, "logging was captured"
    assert_no_key_in(all_logs.records, KEY)
    assert KEY.encode() not in stored_bytes(proxy) + stored_bytes(dead)


@pytest.mark.parametrize("line", [
    b"Authorization: Bearer " + KEY.encode() + b"\x01",
    b"Authorization: Bearer " + KEY.encode() + b"\rX: y",
    b"Authorization: Bearer " + KEY.encode() + b"a" * 9000,
], ids=["control char", "bare CR", "too long"])
def test_raw_key_in_a_malformed_header_never_reaches_the_logs(upstream: FakeUpstream, proxy: ProxyServer,
                                                              all_logs: pytest.LogCaptureFixture,
                                                              line: bytes) -> None:
    assert 400 <= exchange(proxy.url, line + b"\r\n")[0] < 500
    assert_no_key_in(all_logs.records, KEY)


def test_key_echoed_by_the_upstream_is_not_stored(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    upstream.json({"error": {"message": f"Incorrect API key provided: {KEY}", "type": "invalid_request_error",
                             "code": "invalid_api_key"}}, status=401)
    assert post(proxy.url, chat())[0] == 401
    assert KEY.encode() not in stored_bytes(proxy)
